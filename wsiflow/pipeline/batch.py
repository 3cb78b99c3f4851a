"""Per-batch work: tiles of one slide → one small CellTable (DESIGN §1, §3).

:func:`process_batch` is what a Dask task runs, given the slide and the two models already
opened and loaded (the worker's caches in :mod:`wsiflow.execution.worker` do that once).
For the tiles of a batch:

1. reads each tile's read box (core + halo) at ``seg_mpp``: when ``cls_mpp`` is the slide's
   own µm/px and ``seg_mpp`` an integer multiple of it, the box is read (decoded) once at
   ``cls_mpp`` and the seg image is its k×k reduction in memory, bit-identical to what
   :meth:`Slide.read` gives at ``seg_mpp`` (:meth:`Slide.read_both`);
2. runs the U-Net over the tiles of one read size (all but a slide's odd edge tile)
   together, a few tiles per forward call
   (:meth:`~wsiflow.segment.Segmenter.probability_maps_batch`; on CPU the maps equal the
   one-tile calls');

then, for each tile in turn (:func:`process_tile`):

3. turns its probability maps into cells in level-0 px (:meth:`Segmenter.instances`);
4. keeps the cells the tile **owns** (centroid in its core) that do not touch the read
   region's edge, sorted by (y, x) and numbered ``make_ids(tile.id, n)``;
5. reads the same box at ``cls_mpp`` (unless step 1 did), crops the kept cells and
   classifies them.

The pixels of one batch (each tile's seg and cls images and maps) are held together, and
each tile's are dropped once its cells are classified; the result carries no pixels. Every
step is deterministic, so a task that Dask runs twice (worker loss) returns the same table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from wsiflow.cells import CellTable, make_ids
from wsiflow.config import Pipeline
from wsiflow.errors import ModelError, SlideError
from wsiflow.tiling import Tile

if TYPE_CHECKING:
    from wsiflow.classify import Classifier
    from wsiflow.segment import Segmenter
    from wsiflow.slide import Slide

__all__ = ["LoadedModels", "SegmentedTile", "process_batch", "process_tile", "read_seg_image"]


@dataclass(frozen=True)
class LoadedModels:
    segmenter: Segmenter
    classifier: Classifier
    device: str


@dataclass(frozen=True)
class SegmentedTile:
    """A tile read and through the U-Net: its cls image when the seg read gave it (else
    None), that image's (w, h), and the (cell, nucleus) probability maps at ``seg_mpp``."""

    image: NDArray[np.uint8] | None
    cls_size: tuple[int, int]
    cell: NDArray[np.float32]
    nucleus: NDArray[np.float32] | None


# --------------------------------------------------------------------------- the work


def process_tile(
    slide: Slide, tile: Tile, pipeline: Pipeline, models: LoadedModels, seg: SegmentedTile | None = None
) -> CellTable:
    """One tile → the classified cells it owns (ids final, level-0 px). ``seg``: the tile
    already read and through the U-Net (:func:`process_batch` does that for all its tiles
    at once); without it the tile is read and segmented here."""
    from wsiflow.crops import crop_cells

    n_classes = len(pipeline.taxonomy)
    seg_mpp = pipeline.resolution.seg_mpp
    cls_mpp = pipeline.resolution.cls_mpp
    box = tile.read
    w = tile.read_px[0]
    if seg is None:
        seg = _segment_tiles(slide, [tile], pipeline, models)[0]
    image, (cw, ch) = seg.image, seg.cls_size
    # the read box is exactly read_px pixels at seg_mpp (TileGrid builds it so); the segmenter
    # builds only the cells this tile owns: centroid in the core, not cut by the read box's edge
    cells, _ = models.segmenter.instances(seg.cell, seg.nucleus, (box.x, box.y), box.w / w, seg_mpp, tile)
    del seg
    if len(cells) == 0:
        return CellTable.empty(n_classes)
    order = np.lexsort((cells.x, cells.y))  # by y, then x: deterministic numbering
    kept = cells.take(order)
    kept = _with_ids(kept, tile.id)

    if image is None:
        image = slide.read(box.x, box.y, cw, ch, cls_mpp)
    crops = crop_cells(
        image,
        (box.x, box.y),
        box.w / cw,
        kept.bbox,
        pipeline.classifier.crop.pad_um / cls_mpp,
        pipeline.classifier.input_px,
        pipeline.classifier.crop.rule,
    )
    del image
    probs = models.classifier.predict(crops)
    del crops
    if probs.shape != (len(kept), n_classes):
        raise ModelError(
            f"classifier returned probabilities of shape {probs.shape}, expected ({len(kept)}, {n_classes})"
        )
    return kept.with_classes(probs)


def read_seg_image(
    slide: Slide, tile: Tile, seg_mpp: float, cls_mpp: float
) -> tuple[NDArray[np.uint8], NDArray[np.uint8] | None, tuple[int, int]]:
    """The tile's read box at ``seg_mpp`` (writeable), its cls image when both came from one
    decode (else None: read it at ``cls_mpp`` when needed), and the cls image's (w, h)."""
    box = tile.read
    rgb, image, (cw, ch) = slide.read_both(box.x, box.y, box.w, box.h, tile.read_px, seg_mpp, cls_mpp)
    if not rgb.flags.writeable:  # torch.from_numpy warns on read-only arrays (PIL-backed reads)
        rgb = rgb.copy()
    return rgb, image, (cw, ch)


def _segment_tiles(
    slide: Slide, tiles: Sequence[Tile], pipeline: Pipeline, models: LoadedModels
) -> list[SegmentedTile]:
    """Read ``tiles`` and run the U-Net over them together (one call per read size)."""
    seg_mpp = pipeline.resolution.seg_mpp
    reads = []
    for tile in tiles:
        try:
            reads.append(read_seg_image(slide, tile, seg_mpp, pipeline.resolution.cls_mpp))
        except SlideError:
            raise
        except OSError as exc:
            raise SlideError(slide.path, f"tile {tile.id}: {type(exc).__name__}: {exc}") from exc
    maps = models.segmenter.probability_maps_batch([r[0] for r in reads], seg_mpp)
    return [
        SegmentedTile(image=image, cls_size=size, cell=cell, nucleus=nucleus)
        for (_, image, size), (cell, nucleus) in zip(reads, maps, strict=True)
    ]


def _with_ids(table: CellTable, tile_id: int) -> CellTable:
    cols = table.columns()
    cols["id"] = make_ids(tile_id, len(table))
    cols["tile"] = np.full(len(table), tile_id, np.int64)
    return CellTable(**cols)


def process_batch(
    slide: Slide,
    tiles: Sequence[Tile],
    pipeline: Pipeline,
    models: LoadedModels,
    unreadable: dict[str, list[float]] | None = None,
) -> CellTable:
    """Segment and classify ``tiles`` of one opened slide; the cells they own, in tile order.

    A corrupt source tile of the file is read as white (only its area is lost); when
    ``unreadable`` is given, each such tile met is added as ``"level/col/row"`` → its
    level-0 box [x0, y0, x1, y1]. Raises :class:`~wsiflow.errors.SlideError` when a tile
    cannot be read at all (the runner then isolates and records the failing tile).
    """
    slide.unreadable.clear()
    tables: list[CellTable] = []
    segmented: list[SegmentedTile | None] = list(_segment_tiles(slide, tiles, pipeline, models))
    for i, tile in enumerate(tiles):
        seg, segmented[i] = segmented[i], None  # drop each tile's pixels once it is done
        try:
            tables.append(process_tile(slide, tile, pipeline, models, seg))
        except SlideError:
            raise
        except OSError as exc:
            # a decoder or backend failure surfacing as a builtin: name the tile
            raise SlideError(slide.path, f"tile {tile.id}: {type(exc).__name__}: {exc}") from exc
    if unreadable is not None:
        for (level, col, row), box in slide.unreadable.items():
            unreadable[f"{level}/{col}/{row}"] = [float(v) for v in box]
    return CellTable.concat(tables, n_classes=len(pipeline.taxonomy))

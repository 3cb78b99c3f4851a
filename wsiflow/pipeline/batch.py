"""Per-batch work: tiles of one slide → one small CellTable (DESIGN §1, §3).

:func:`process_batch` is what a Dask task runs, given the slide and the two models already
opened and loaded (the worker's caches in :mod:`wsiflow.execution.worker` do that once).
For each tile in turn:

1. reads the tile's read box (core + halo) at ``seg_mpp``: when ``cls_mpp`` is the slide's
   own µm/px and ``seg_mpp`` an integer multiple of it, the box is read (decoded) once at
   ``cls_mpp`` and the seg image is its k×k reduction in memory, bit-identical to what
   :meth:`Slide.read` gives at ``seg_mpp`` (:func:`_read_once`);
2. segments it (:class:`~wsiflow.segment.Segmenter`) into cells in level-0 px;
3. keeps the cells the tile **owns** (centroid in its core) that do not touch the read
   region's edge, sorted by (y, x) and numbered ``make_ids(tile.id, n)``;
4. reads the same box at ``cls_mpp`` (unless step 1 did), crops the kept cells and
   classifies them.

Only one tile's pixels (its cls and seg images) are held at a time; the result carries no
pixels. Every step is deterministic, so a task that Dask runs twice (worker loss) returns the same table.
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
from wsiflow.types import Box

if TYPE_CHECKING:
    from wsiflow.classify import Classifier
    from wsiflow.segment import Segmenter
    from wsiflow.slide import Slide

__all__ = ["LoadedModels", "process_batch", "process_tile", "read_seg_image"]


@dataclass(frozen=True)
class LoadedModels:
    segmenter: Segmenter
    classifier: Classifier
    device: str


# --------------------------------------------------------------------------- the work


def _read_size(box_w: float, box_h: float, scale: float) -> tuple[int, int]:
    """Output pixels covering a level-0 box at ``scale`` level-0 px per output px."""
    return max(1, round(box_w / scale)), max(1, round(box_h / scale))


def process_tile(slide: Slide, tile: Tile, pipeline: Pipeline, models: LoadedModels) -> CellTable:
    """One tile → the classified cells it owns (ids final, level-0 px)."""
    from wsiflow.classify import crop_cells

    n_classes = len(pipeline.taxonomy)
    seg_mpp = pipeline.resolution.seg_mpp
    cls_mpp = pipeline.resolution.cls_mpp
    box = tile.read
    w = tile.read_px[0]
    rgb, image, (cw, ch) = read_seg_image(slide, tile, seg_mpp, cls_mpp)
    # the read box is exactly read_px pixels at seg_mpp (TileGrid builds it so); the segmenter
    # builds only the cells this tile owns: centroid in the core, not cut by the read box's edge
    core = tile.core
    owned_box = (core.x, core.y, core.x1, core.y1)
    cells, _ = models.segmenter.segment(rgb, (box.x, box.y), box.w / w, seg_mpp, owned_box)
    del rgb
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
    w, h = tile.read_px
    cw, ch = _read_size(box.w, box.h, slide.read_level0_scale(cls_mpp))
    image = _read_once(slide, box, (w, h), (cw, ch), cls_mpp)
    rgb = slide.read(box.x, box.y, w, h, seg_mpp) if image is None else _reduce(image, cw // w)
    if not rgb.flags.writeable:  # torch.from_numpy warns on read-only arrays (PIL-backed reads)
        rgb = rgb.copy()
    return rgb, image, (cw, ch)


def _read_once(
    slide: Slide, box: Box, seg_px: tuple[int, int], cls_px: tuple[int, int], cls_mpp: float
) -> NDArray[np.uint8] | None:
    """The cls image of the read box, when the seg image is exactly its k×k reduction.

    That holds when both reads come from level 0, the cls read is level-0 pixels as they are
    (cls µm/px = the slide's, box on whole pixels) and the seg read is an integer k× of it
    on the same grid: then :meth:`Slide.read` makes the seg image by PIL's ``reduce(k)`` of
    the same level-0 pixels, which :func:`_reduce` repeats, so each tile is decoded once.
    Otherwise (e.g. a 0.5 µm/px slide read at 0.25 µm/px) None: the tile is read twice.
    """
    (w, h), (cw, ch) = seg_px, cls_px
    k = cw // w
    if not (
        abs(slide.read_level0_scale(cls_mpp) - 1.0) < 1e-9
        and k >= 1
        and (cw, ch) == (k * w, k * h)
        and abs(box.w - cw) < 1e-6
        and abs(box.h - ch) < 1e-6
        and float(box.x).is_integer()
        and float(box.y).is_integer()
        and slide.best_level(box.w / w) == 0
    ):
        return None
    return slide.read(box.x, box.y, cw, ch, cls_mpp)


def _reduce(image: NDArray[np.uint8], k: int) -> NDArray[np.uint8]:
    """k×k mean with PIL's rounding: what :meth:`Slide.read` does for an aligned integer factor."""
    if k == 1:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).reduce(k))


def _with_ids(table: CellTable, tile_id: int) -> CellTable:
    cols = table.columns()
    cols["id"] = make_ids(tile_id, len(table))
    cols["tile"] = np.full(len(table), tile_id, np.int64)
    return CellTable(**cols)


def process_batch(slide: Slide, tiles: Sequence[Tile], pipeline: Pipeline, models: LoadedModels) -> CellTable:
    """Segment and classify ``tiles`` of one opened slide; the cells they own, in tile order.

    Raises :class:`~wsiflow.errors.SlideError` when a tile cannot be read (the runner then
    isolates and records the failing tile).
    """
    tables: list[CellTable] = []
    for tile in tiles:
        try:
            tables.append(process_tile(slide, tile, pipeline, models))
        except SlideError:
            raise
        except OSError as exc:
            # a decoder or backend failure surfacing as a builtin: name the tile
            raise SlideError(slide.path, f"tile {tile.id}: {type(exc).__name__}: {exc}") from exc
    return CellTable.concat(tables, n_classes=len(pipeline.taxonomy))

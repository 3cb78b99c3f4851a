"""Per-batch work: tiles of one slide → one small CellTable (DESIGN §1, §3).

:func:`process_batch` is what a Dask task runs, given the slide and the two models already
opened and loaded (the worker's caches in :mod:`wsiflow.execution.worker` do that once).
For each tile in turn:

1. reads the tile's read box (core + halo) clipped to the slide (:meth:`Tile.within`, with
   :func:`edge_margin`: past a slide edge only the segmenter's measured context of white is
   kept) at ``seg_mpp``: when ``cls_mpp`` is the slide's own µm/px and ``seg_mpp`` an
   integer multiple of it, the box is read (decoded) once at ``cls_mpp`` and the seg image
   is its k×k reduction in memory, bit-identical to what :meth:`Slide.read` gives at
   ``seg_mpp`` (:meth:`Slide.read_both`);
2. segments it (:class:`~wsiflow.segment.Segmenter`) into cells in level-0 px;
3. keeps the cells the tile **owns** (centroid in its core) that do not touch the read
   region's edge inside the slide, sorted by (y, x) and numbered ``make_ids(tile.id, n)``;
4. reads the same box at ``cls_mpp`` (unless step 1 did), white beyond the slide edge out to
   the unclipped box (the crops see what an unclipped read gives), crops the kept cells and
   classifies them.

Only one tile's pixels (its cls and seg images) are held at a time; the result carries no
pixels. Every step is deterministic, so a task that Dask runs twice (worker loss) returns the same table.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from wsiflow.cells import CellTable, make_ids
from wsiflow.config import Pipeline
from wsiflow.errors import ModelError, SlideError
from wsiflow.tiling import Tile, halo_pixels
from wsiflow.types import Box

if TYPE_CHECKING:
    from wsiflow.classify import Classifier
    from wsiflow.roi import Rois
    from wsiflow.segment import Segmenter
    from wsiflow.slide import Slide

__all__ = ["LoadedModels", "edge_margin", "process_batch", "process_tile", "read_seg_image"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModels:
    segmenter: Segmenter
    classifier: Classifier
    device: str


# --------------------------------------------------------------------------- the work


MAX_GROW = 2
"""Re-reads of a tile with a box grown by one more halo each, for owned cells the read edge cut."""


def _grown(tile: Tile, extra_px: int) -> Tile:
    """``tile`` with its read box grown by ``extra_px`` seg px on every side (same core); to be
    clipped to the slide (:meth:`Tile.within`), which also sets its ``cuts``."""
    r = tile.read
    s = r.w / tile.read_px[0]  # level-0 px per seg px
    read = Box(r.x - extra_px * s, r.y - extra_px * s, r.w + 2 * extra_px * s, r.h + 2 * extra_px * s)
    px = (tile.read_px[0] + 2 * extra_px, tile.read_px[1] + 2 * extra_px)
    return Tile(tile.id, tile.row, tile.col, tile.core, read, tile.core_px, px)


def edge_margin(segmenter: Segmenter, pipeline: Pipeline) -> tuple[int, int]:
    """(margin_px, align) for :meth:`Tile.within`: the white a read keeps past a slide edge,
    in px at ``seg_mpp``, and the pixel multiple its box keeps to. The margin is the
    segmenter's measured border context (card ``context_um``, rounded up; the halo covers it,
    :func:`~wsiflow.models.bundle.check_halo`): a pixel of the slide that far from the
    image's end sees what it sees in the whole white halo. A card without ``context_um``
    keeps the whole halo. ``align`` is the U-Net's pooling multiple (2**depth)."""
    seg_mpp = pipeline.resolution.seg_mpp
    halo_px = halo_pixels(pipeline.tiling.halo_um, seg_mpp)
    context = segmenter.context_um
    margin = halo_px if context is None else min(halo_px, math.ceil(float(context) / seg_mpp - 1e-9))
    return max(0, margin), max(1, segmenter.multiple)


def process_tile(
    slide: Slide, tile: Tile, pipeline: Pipeline, models: LoadedModels, cut: list[int] | None = None
) -> CellTable:
    """One tile → the classified cells it owns (ids final, level-0 px).

    The tile's read box is clipped to the slide (:meth:`Tile.within`, :func:`edge_margin`).
    A cell whose centroid is in the core but which the read box's edge cuts inside the slide
    (a clump the watershed did not split, an object beyond ``max_object_um``) is never
    dropped silently: the tile is read again with a box grown by one more halo (up to
    :data:`MAX_GROW` times, each clipped to the slide again; the core and its owned cells
    are otherwise the same, the halo already covering the segmenter's context). Cells still
    cut then are left out and their number appended to ``cut`` (the summary counts them)."""
    from wsiflow.crops import crop_cells

    n_classes = len(pipeline.taxonomy)
    seg_mpp = pipeline.resolution.seg_mpp
    cls_mpp = pipeline.resolution.cls_mpp
    width, height = (float(v) for v in slide.dimensions)
    margin_px, align = edge_margin(models.segmenter, pipeline)
    # the read box is exactly read_px pixels at seg_mpp (TileGrid and Tile.within build it so);
    # the segmenter builds only the cells this tile owns: centroid in the core (those the read
    # edge cuts inside the slide flagged)
    halo_px = halo_pixels(pipeline.tiling.halo_um, seg_mpp)
    for grow in range(MAX_GROW + 1):
        full = _grown(tile, grow * halo_px) if grow else tile
        read_tile = full.within(width, height, margin_px, align)
        box, w = read_tile.read, read_tile.read_px[0]
        rgb, image, (cw, ch) = read_seg_image(slide, read_tile, seg_mpp, cls_mpp)
        cells, edge = models.segmenter.segment(
            rgb, (box.x, box.y), box.w / w, seg_mpp, owner=read_tile, keep_cut=True
        )
        del rgb
        if not edge.any():
            break
    if edge.any():
        if cut is not None:
            cut.append(int(edge.sum()))
        log.warning("tile %s: %d owned cell(s) cut by the read edge", tile.id, int(edge.sum()))
        cells = cells.take(~edge)
    if len(cells) == 0:
        return CellTable.empty(n_classes)
    order = np.lexsort((cells.x, cells.y))  # by y, then x: deterministic numbering
    kept = cells.take(order)
    kept = _with_ids(kept, tile.id)

    if image is None:
        image = slide.read(box.x, box.y, cw, ch, cls_mpp)
    image, origin = _white_out_to(image, box, full.read, box.w / cw)
    crops = crop_cells(
        image,
        origin,
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
    return kept.with_classes(probs, pipeline.classifier.min_confidence)


def _white_out_to(
    image: NDArray[np.uint8], box: Box, outer: Box, scale: float
) -> tuple[NDArray[np.uint8], tuple[float, float]]:
    """``image`` (``box`` read at ``scale`` level-0 px per px) padded white out to ``outer``,
    the unclipped box it was clipped from, and its new level-0 origin: a crop that reaches
    past the slide edge sees white there, as in an unclipped read (the slide reader pads
    white), not the black crop_cells gives past the image. Nothing is copied when ``box``
    is ``outer``."""
    left = max(0, round((box.x - outer.x) / scale))
    top = max(0, round((box.y - outer.y) / scale))
    right = max(0, round((outer.x1 - box.x1) / scale))
    bottom = max(0, round((outer.y1 - box.y1) / scale))
    if not (left or top or right or bottom):
        return image, (box.x, box.y)
    padded = np.pad(image, ((top, bottom), (left, right), (0, 0)), constant_values=255)
    return padded, (box.x - left * scale, box.y - top * scale)


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
    rois: Rois | None = None,
    cut_cells: dict[int, int] | None = None,
) -> CellTable:
    """Segment and classify ``tiles`` of one opened slide; the cells they own, in tile order.

    A corrupt source tile of the file is read as white (only its area is lost); when
    ``unreadable`` is given, each such tile met is added as ``"level/col/row"`` → its
    level-0 box [x0, y0, x1, y1]. ``cut_cells`` gets tile id → owned cells left out because
    the read edge cut them even in the grown box (see :func:`process_tile`). With ``rois``
    only the cells whose centroid lies in a region are kept (the others are never counted).
    Raises :class:`~wsiflow.errors.SlideError` when a tile cannot be read at all (the runner
    then isolates and records the failing tile).
    """
    slide.unreadable.clear()
    tables: list[CellTable] = []
    for tile in tiles:
        try:
            cut: list[int] = []
            tables.append(process_tile(slide, tile, pipeline, models, cut))
            if cut and cut_cells is not None:
                cut_cells[tile.id] = sum(cut)
        except SlideError:
            raise
        except OSError as exc:
            # a decoder or backend failure surfacing as a builtin: name the tile
            raise SlideError(slide.path, f"tile {tile.id}: {type(exc).__name__}: {exc}") from exc
    if unreadable is not None:
        for (level, col, row), box in slide.unreadable.items():
            unreadable[f"{level}/{col}/{row}"] = [float(v) for v in box]
    table = CellTable.concat(tables, n_classes=len(pipeline.taxonomy))
    if rois is not None and len(table):
        table = table.take(rois.inside_any(table.x, table.y))
    return table

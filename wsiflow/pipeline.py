"""Per-batch work: tiles of one slide → one small CellTable (DESIGN §1, §3).

:func:`process_batch` is what a Dask task runs. It opens the slide itself (cached per
process and thread, keyed by path), loads the two models once per process (keyed by
weight sha256, device and model settings), and for each tile in turn:

1. reads the tile's read box (core + halo) at ``seg_mpp``: when ``cls_mpp`` is the slide's
   own µm/px and ``seg_mpp`` an integer multiple of it, the box is read (decoded) once at
   ``cls_mpp`` and the seg image is its k×k reduction in memory, bit-identical to what
   :meth:`Slide.read` gives at ``seg_mpp`` (:func:`_read_once`);
2. segments it (:class:`~wsiflow.segment.Segmenter`) into cells in level-0 px;
3. keeps the cells the tile **owns** (centroid in its core) that do not touch the read
   region's edge, sorted by (y, x) and numbered ``make_ids(tile.id, n)``;
4. reads the same box at ``cls_mpp`` (unless step 1 did), crops the kept cells and
   classifies them.

Slides are opened with TiffSlide first (``prefer="tiffslide"``), OpenSlide for what it
cannot read: on JPEG tiles TiffSlide decodes ~2.7× faster here (benchmarks B1) and gives
the same pixels (tests/test_perf_equivalence.py).

Only one tile's pixels (its cls and seg images) are held at a time; the result carries no
pixels. Every step is deterministic, so a task that Dask runs twice (worker loss) returns the same table.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from wsiflow.cells import CellTable, make_ids
from wsiflow.config import Pipeline
from wsiflow.errors import ModelError, SlideError
from wsiflow.tiling import Tile
from wsiflow.types import Box

if TYPE_CHECKING:
    from wsiflow.classify import Classifier
    from wsiflow.models.bundle import ModelBundle
    from wsiflow.segment import Segmenter
    from wsiflow.slide import Slide

__all__ = [
    "LoadedModels",
    "ModelRefs",
    "SlideRef",
    "clear_caches",
    "get_models",
    "get_slide",
    "process_batch",
    "resolve_models",
]

log = logging.getLogger(__name__)

_SLIDES_PER_THREAD = 4


@dataclass(frozen=True, slots=True)
class SlideRef:
    """What a worker needs to open a slide: a path (or fsspec URL) and the mpp override."""

    path: str
    mpp: float | None = None
    backend: str = "auto"


@dataclass(frozen=True, slots=True)
class ModelRefs:
    """The two bundles a batch uses, pinned by the sha256 the client verified.

    A worker that finds different bytes behind ``segmenter``/``classifier`` (another file
    on its file system) raises :class:`~wsiflow.errors.BundleIntegrityError` instead of
    silently computing with other weights. ``device`` is ``auto``, ``cpu`` or ``cuda``;
    ``auto`` is resolved on the worker (CUDA when the worker has it).
    """

    segmenter: str
    segmenter_sha256: str
    classifier: str
    classifier_sha256: str
    device: str = "auto"


@dataclass(frozen=True)
class LoadedModels:
    segmenter: Segmenter
    classifier: Classifier
    device: str


def _ref_for_workers(ref: str) -> str:
    """A bundle path becomes absolute (workers may run elsewhere); a bundle name stays."""
    p = Path(ref)
    if p.suffix.lower() in (".safetensors", ".json") or p.exists():
        return str(p.expanduser().resolve())
    return ref


def resolve_models(pipeline: Pipeline, device: str = "auto") -> tuple[ModelRefs, list[ModelBundle]]:
    """Load both bundles on the client: verify sha256 pins, task and taxonomy.

    Returns the refs to send to workers and the two bundles (for their cards: demo flag,
    names, sha256 for the Zarr attributes).
    """
    from wsiflow.models.bundle import ModelBundle, check_halo, check_taxonomy

    seg = ModelBundle.load(pipeline.segmenter.bundle, pipeline.segmenter.sha256)
    cls = ModelBundle.load(pipeline.classifier.bundle, pipeline.classifier.sha256)
    if seg.task != "segmenter":
        raise ModelError(f"segmenter.bundle {seg.name!r} is a {seg.task} bundle, not a segmenter")
    if cls.task != "classifier":
        raise ModelError(f"classifier.bundle {cls.name!r} is a {cls.task} bundle, not a classifier")
    check_taxonomy(cls.card, pipeline)
    check_halo(seg.card, pipeline)
    if device not in ("auto", "cpu", "cuda"):
        raise ModelError(f"--device must be auto, cpu or cuda, not {device!r}")
    refs = ModelRefs(
        segmenter=_ref_for_workers(pipeline.segmenter.bundle),
        segmenter_sha256=seg.sha256,
        classifier=_ref_for_workers(pipeline.classifier.bundle),
        classifier_sha256=cls.sha256,
        device=device,
    )
    return refs, [seg, cls]


# --------------------------------------------------------------------------- caches
# Per process: models by (weights sha256, device, settings); slides by (path, mpp,
# backend) per thread, because not every backend's handle is safe to share between the
# threads of one Dask worker.

_model_lock = threading.Lock()
_models: dict[tuple[Any, ...], LoadedModels] = {}
_local = threading.local()


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was requested but this worker has no CUDA device")
    return device


def get_models(refs: ModelRefs, pipeline: Pipeline) -> LoadedModels:
    """The segmenter and classifier for ``refs``, built once per process."""
    device = _resolve_device(refs.device)
    key = (
        refs.segmenter_sha256,
        refs.classifier_sha256,
        device,
        pipeline.segmenter.model_dump_json(),
        pipeline.classifier.model_dump_json(),
    )
    with _model_lock:
        hit = _models.get(key)
        if hit is not None:
            return hit
        from wsiflow.classify import Classifier
        from wsiflow.models.bundle import ModelBundle
        from wsiflow.segment import Segmenter

        seg_bundle = ModelBundle.load(refs.segmenter, refs.segmenter_sha256)
        cls_bundle = ModelBundle.load(refs.classifier, refs.classifier_sha256)
        loaded = LoadedModels(
            segmenter=Segmenter(seg_bundle, pipeline.segmenter, device=device),
            classifier=Classifier(cls_bundle, pipeline.classifier, device=device),
            device=device,
        )
        _models[key] = loaded
        log.debug("loaded models %s / %s on %s", seg_bundle.name, cls_bundle.name, device)
        return loaded


def get_slide(ref: SlideRef) -> Slide:
    """An open handle for ``ref``, cached per thread (a few slides, least recently used)."""
    from wsiflow.slide import open_slide

    cache: OrderedDict[SlideRef, Slide] | None = getattr(_local, "slides", None)
    if cache is None:
        cache = OrderedDict()
        _local.slides = cache
    slide = cache.get(ref)
    if slide is not None:
        cache.move_to_end(ref)
        return slide
    # "auto": TiffSlide first (it decodes JPEG tiles ~2.7× faster than OpenSlide here, B1),
    # OpenSlide for what TiffSlide cannot read
    slide = open_slide(ref.path, backend=ref.backend, mpp=ref.mpp, prefer="tiffslide")
    cache[ref] = slide
    while len(cache) > _SLIDES_PER_THREAD:
        _, old = cache.popitem(last=False)
        old.close()
    return slide


def clear_caches() -> None:
    """Close this thread's slides and drop loaded models (tests, worker teardown)."""
    cache: OrderedDict[SlideRef, Slide] | None = getattr(_local, "slides", None)
    if cache:
        for slide in cache.values():
            slide.close()
        cache.clear()
    with _model_lock:
        _models.clear()


# --------------------------------------------------------------------------- the work


def _read_size(box_w: float, box_h: float, scale: float) -> tuple[int, int]:
    """Output pixels covering a level-0 box at ``scale`` level-0 px per output px."""
    return max(1, round(box_w / scale)), max(1, round(box_h / scale))


MAX_GROW = 2
"""Re-reads of a tile with a box grown by one more halo each, for owned cells the read edge cut."""


def _grown(tile: Tile, extra_px: int) -> Tile:
    """``tile`` with its read box grown by ``extra_px`` seg px on every side (same core)."""
    r = tile.read
    s = r.w / tile.read_px[0]  # level-0 px per seg px
    read = Box(r.x - extra_px * s, r.y - extra_px * s, r.w + 2 * extra_px * s, r.h + 2 * extra_px * s)
    px = (tile.read_px[0] + 2 * extra_px, tile.read_px[1] + 2 * extra_px)
    return Tile(tile.id, tile.row, tile.col, tile.core, read, tile.core_px, px)


def process_tile(
    slide: Slide, tile: Tile, pipeline: Pipeline, models: LoadedModels, cut: list[int] | None = None
) -> CellTable:
    """One tile → the classified cells it owns (ids final, level-0 px).

    A cell whose centroid is in the core but which the read box's edge cuts (a clump the
    watershed did not split, an object beyond ``max_object_um``) is never dropped silently:
    the tile is read again with a box grown by one more halo (up to :data:`MAX_GROW` times;
    the core and its owned cells are otherwise the same, the halo already covering the
    segmenter's context). Cells still cut then are left out and their number appended to
    ``cut`` (the summary counts them)."""
    from wsiflow.classify import crop_cells

    n_classes = len(pipeline.taxonomy)
    seg_mpp = pipeline.resolution.seg_mpp
    cls_mpp = pipeline.resolution.cls_mpp
    # the read box is exactly read_px pixels at seg_mpp (TileGrid builds it so); the segmenter
    # builds only the cells this tile owns: centroid in the core (those cut by the edge flagged)
    core = tile.core
    owned_box = (core.x, core.y, core.x1, core.y1)
    halo_px = math.ceil(pipeline.tiling.halo_um / seg_mpp - 1e-9)
    read_tile = tile
    for grow in range(MAX_GROW + 1):
        read_tile = _grown(tile, grow * halo_px) if grow else tile
        box, w = read_tile.read, read_tile.read_px[0]
        rgb, image, (cw, ch) = read_seg_image(slide, read_tile, seg_mpp, cls_mpp)
        cells, edge = models.segmenter.segment(rgb, (box.x, box.y), box.w / w, seg_mpp, owned_box, True)
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


def process_batch(
    slide_ref: SlideRef,
    tiles: Sequence[Tile],
    pipeline: Pipeline,
    models: ModelRefs,
    unreadable: dict[str, list[float]] | None = None,
    cut_cells: dict[int, int] | None = None,
) -> CellTable:
    """Segment and classify ``tiles`` of one slide; the cells they own, in tile order.

    A corrupt source tile of the file is read as white (only its area is lost); when
    ``unreadable`` is given, each such tile met is added as ``"level/col/row"`` → its
    level-0 box [x0, y0, x1, y1]. ``cut_cells`` gets tile id → owned cells left out because
    the read edge cut them even in the grown box (see :func:`process_tile`). Raises
    :class:`~wsiflow.errors.SlideError` when the slide cannot be opened or a tile cannot be
    read at all (the runner then isolates and records the failing tile).
    """
    slide = get_slide(slide_ref)
    loaded = get_models(models, pipeline)
    slide.unreadable.clear()
    tables: list[CellTable] = []
    for tile in tiles:
        try:
            cut: list[int] = []
            tables.append(process_tile(slide, tile, pipeline, loaded, cut))
            if cut and cut_cells is not None:
                cut_cells[tile.id] = sum(cut)
        except SlideError:
            raise
        except OSError as exc:
            # a decoder or backend failure surfacing as a builtin: name the tile
            raise SlideError(slide_ref.path, f"tile {tile.id}: {type(exc).__name__}: {exc}") from exc
    if unreadable is not None:
        for (level, col, row), box in slide.unreadable.items():
            unreadable[f"{level}/{col}/{row}"] = [float(v) for v in box]
    return CellTable.concat(tables, n_classes=len(pipeline.taxonomy))

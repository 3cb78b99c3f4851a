"""Speed-ups that must not change results: one read per tile (the seg image reduced in memory
from the cls read), TiffSlide preferred by workers, per-component post-processing.

Each test compares the fast path with the plain one on the same generated slide and asks
for identical cells (same polygons, classes and probabilities), not merely similar ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from standins import make_random_inception, standin_pipeline, write_smear

from wsiflow.cells import CellTable
from wsiflow.config import Pipeline, parse_pipeline
from wsiflow.execution.worker import SlideRef, clear_caches, get_models, get_slide, resolve_models
from wsiflow.pipeline.batch import process_batch
from wsiflow.slide import Slide, open_slide
from wsiflow.tiling import TileGrid

CLS_MPP = 0.25  # the slide is read as 0.25 µm/px (--mpp): cls = level 0, seg = its 2×2 reduction


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def jpeg_smear(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = write_smear(tmp_path_factory.mktemp("smear") / "smear.svs", compression="jpeg")
    return path


@pytest.fixture(scope="module")
def pipe_k2(standin_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """seg 0.5 µm/px, cls 0.25 µm/px (a 2× integer factor), its own stand-in classifier."""
    seg, _ = standin_models
    data = standin_pipeline(seg, seg)
    data["resolution"] = {"seg_mpp": 0.5, "cls_mpp": CLS_MPP}
    data["segmenter"] = {**data["segmenter"], "min_area_um2": 2.0}  # the smear's cells, read as 0.25 µm/px
    draft = parse_pipeline({**data, "classifier": {**data["classifier"], "bundle": str(seg)}})
    cls = make_random_inception(tmp_path_factory.mktemp("cls") / "cls.safetensors", draft, input_px=75)
    data["classifier"] = {**data["classifier"], "bundle": str(cls)}
    return parse_pipeline(data)


def _all_tiles(ref: SlideRef, pipe: Pipeline) -> CellTable:
    s = get_slide(ref)
    grid = TileGrid.from_pipeline(*s.dimensions, s.mpp, pipe)
    refs, _ = resolve_models(pipe, "cpu")
    return process_batch(s, grid.tiles, pipe, get_models(refs, pipe))


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_seg_image_from_the_cls_read_is_what_the_slide_gives(
    jpeg_smear: Path, pipe_k2: Pipeline, backend: str
) -> None:
    slide = open_slide(jpeg_smear, backend=backend, mpp=CLS_MPP)
    grid = TileGrid.from_pipeline(*slide.dimensions, slide.mpp, pipe_k2)
    used = 0
    for tile in grid.tiles:
        box, (w, h) = tile.read, tile.read_px
        seg, image, (cw, ch) = slide.read_both(box.x, box.y, box.w, box.h, (w, h), 0.5, CLS_MPP)
        if image is None:
            continue
        used += 1
        assert np.array_equal(image, slide.read(box.x, box.y, cw, ch, CLS_MPP))
        assert np.array_equal(seg, slide.read(box.x, box.y, w, h, 0.5))
    assert used == len(grid.tiles)  # every tile of this grid takes the one-read path
    slide.close()


def test_one_read_per_tile_gives_the_same_cells(
    jpeg_smear: Path, pipe_k2: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = SlideRef(str(jpeg_smear), mpp=CLS_MPP)
    fast = _all_tiles(ref, pipe_k2)
    monkeypatch.setattr(Slide, "_one_decode", lambda *a, **k: False)  # the two-read path
    plain = _all_tiles(ref, pipe_k2)
    assert len(fast) > 10
    assert fast.equals(plain)


def test_one_read_is_skipped_when_cls_needs_resampling(jpeg_smear: Path, pipe_k2: Pipeline) -> None:
    slide = open_slide(jpeg_smear, mpp=CLS_MPP * 2)  # cls 0.25 µm/px is now a 2× upsample
    tile = TileGrid.from_pipeline(*slide.dimensions, slide.mpp, pipe_k2).tiles[0]
    box = tile.read
    assert slide.read_both(box.x, box.y, box.w, box.h, tile.read_px, 0.5, CLS_MPP)[1] is None
    slide.close()


def test_tiffslide_and_openslide_give_the_same_cells(jpeg_smear: Path, pipe_k2: Pipeline) -> None:
    a = _all_tiles(SlideRef(str(jpeg_smear), mpp=CLS_MPP, backend="openslide"), pipe_k2)
    b = _all_tiles(SlideRef(str(jpeg_smear), mpp=CLS_MPP, backend="tiffslide"), pipe_k2)
    assert len(a) > 10
    assert a.equals(b)


def test_workers_open_slides_with_tiffslide_first(jpeg_smear: Path) -> None:
    clear_caches()
    assert get_slide(SlideRef(str(jpeg_smear))).backend == "tiffslide"
    clear_caches()


def test_a_batch_through_one_unet_call_gives_the_per_tile_cells(jpeg_smear: Path, pipe_k2: Pipeline) -> None:
    from wsiflow.pipeline.batch import process_tile

    ref = SlideRef(str(jpeg_smear), mpp=CLS_MPP)
    s = get_slide(ref)
    tiles = TileGrid.from_pipeline(*s.dimensions, s.mpp, pipe_k2).tiles
    refs, _ = resolve_models(pipe_k2, "cpu")
    models = get_models(refs, pipe_k2)
    batched = process_batch(s, tiles, pipe_k2, models)
    one_by_one = CellTable.concat(
        [process_tile(s, t, pipe_k2, models) for t in tiles], n_classes=len(pipe_k2.taxonomy)
    )
    assert len(tiles) > 2 and len(batched) > 10
    assert batched.equals(one_by_one)


def test_the_client_plans_with_the_reader_the_workers_read_with(jpeg_smear: Path, pipe_k2: Pipeline) -> None:
    """Both backends open this smear; the identity the plan records must name the reader
    a worker then reads the pixels with (not OpenSlide, open_slide's own default)."""
    from wsiflow.pipeline.plan import plan_slide

    assert open_slide(jpeg_smear).backend == "openslide"  # the default alone would plan with OpenSlide
    plan = plan_slide(str(jpeg_smear), pipe_k2, mpp=CLS_MPP)
    clear_caches()
    worker = get_slide(SlideRef(str(jpeg_smear), mpp=CLS_MPP))
    assert plan.identity["backend"] == worker.backend == "tiffslide"
    clear_caches()

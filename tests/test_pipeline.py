"""wsiflow.pipeline: per-batch work in-process (no Dask) on a generated smear with cells at
known positions, several on tile seams: every cell exactly once, for two tile sizes."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from standins import TILE_UM_A, TILE_UM_B, match_centres, standin_pipeline, write_smear

from wsiflow.cells import ID_TILE_SHIFT, CellTable
from wsiflow.config import Pipeline, parse_pipeline
from wsiflow.errors import BundleIntegrityError, ModelError, SlideError
from wsiflow.execution.tasks import TaskError, batch_task
from wsiflow.execution.worker import (
    ModelRefs,
    SlideRef,
    clear_caches,
    get_models,
    get_slide,
    resolve_models,
)
from wsiflow.pipeline.batch import process_batch
from wsiflow.tiling import TileGrid

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SLIDE_MPP_EDGES = 0.5


@pytest.fixture(scope="module")
def smear(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    return write_smear(tmp_path_factory.mktemp("smear") / "smear.svs")


def _pipe(models: tuple[Path, Path], tile_um: float) -> Pipeline:
    return parse_pipeline(standin_pipeline(*models, tile_um=tile_um))


def _run_all(slide: Path, pipe: Pipeline, refs: ModelRefs, batch: int = 3) -> tuple[CellTable, TileGrid]:
    ref = SlideRef(str(slide))
    s = get_slide(ref)
    grid = TileGrid.from_pipeline(*s.dimensions, s.mpp, pipe)
    models = get_models(refs, pipe)
    tables = [process_batch(s, grid.tiles[i : i + batch], pipe, models) for i in range(0, len(grid), batch)]
    return CellTable.concat(tables, n_classes=len(pipe.taxonomy)), grid


@pytest.fixture(scope="module")
def run_a(smear, standin_models):
    pipe = _pipe(standin_models, TILE_UM_A)
    refs, _ = resolve_models(pipe, "cpu")
    table, grid = _run_all(smear[0], pipe, refs)
    return pipe, refs, table, grid


def test_every_cell_is_found_exactly_once(smear, run_a) -> None:
    _, centres = smear
    pipe, _, table, grid = run_a
    found = np.column_stack([table.x, table.y])
    # the seams of this grid really cut some cells
    on_seam = np.isin(centres[:, 0], grid.x_edges[1:-1]) | np.isin(centres[:, 1], grid.y_edges[1:-1])
    assert on_seam.sum() >= 5
    assert len(table) == len(centres)
    assert match_centres(found, centres) == [1] * len(centres)
    # ownership: each cell lies in its tile's core; ids are per tile, sorted by (y, x)
    owners = grid.owners(table.x, table.y)
    assert np.array_equal(owners, table.tile)
    assert np.array_equal(table.id >> ID_TILE_SHIFT, table.tile)
    for t in np.unique(table.tile):
        sub = table.take(table.tile == t)
        assert np.array_equal(sub.id & ((1 << ID_TILE_SHIFT) - 1), np.arange(len(sub)))
        order = np.lexsort((sub.x, sub.y))
        assert np.array_equal(order, np.arange(len(sub)))
    assert len(np.unique(table.id)) == len(table)
    # classified: probabilities over the taxonomy, class = argmax
    assert table.probs.shape == (len(table), len(pipe.taxonomy))
    assert np.allclose(table.probs.sum(axis=1), 1, atol=1e-4)
    assert np.array_equal(table.class_id, table.probs.argmax(axis=1))
    # disc of radius 9 px at 0.5 µm/px: ~63.6 µm²
    assert np.all(np.abs(table.area_um2 - np.pi * 81 * 0.25) < 8)


def test_counts_identical_for_another_tile_size(smear, standin_models, run_a) -> None:
    _, centres = smear
    pipe_b = _pipe(standin_models, TILE_UM_B)
    refs, _ = resolve_models(pipe_b, "cpu")
    table_b, grid_b = _run_all(smear[0], pipe_b, refs, batch=4)
    table_a = run_a[2]
    assert len(grid_b) != len(run_a[3])
    assert len(table_b) == len(table_a) == len(centres)
    assert match_centres(np.column_stack([table_b.x, table_b.y]), centres) == [1] * len(centres)
    # same cells, same geometry (order and ids differ with the grid)
    a = np.sort(np.round(table_a.x * 1e3) + 1e7 * np.round(table_a.y))
    b = np.sort(np.round(table_b.x * 1e3) + 1e7 * np.round(table_b.y))
    assert np.array_equal(a, b)


def test_batches_are_deterministic_whatever_the_batching(smear, run_a) -> None:
    pipe, refs, table, grid = run_a
    slide, models = get_slide(SlideRef(str(smear[0]))), get_models(refs, pipe)
    single = [process_batch(slide, [t], pipe, models) for t in grid.tiles]
    assert CellTable.concat(single, n_classes=len(pipe.taxonomy)).sorted().equals(table.sorted())


def test_models_and_slides_are_cached(smear, run_a) -> None:
    pipe, refs, _, _ = run_a
    assert get_models(refs, pipe) is get_models(refs, pipe)
    ref = SlideRef(str(smear[0]))
    assert get_slide(ref) is get_slide(ref)
    other: list[object] = []
    th = threading.Thread(target=lambda: other.append(get_slide(ref)))
    th.start()
    th.join()
    assert other[0] is not get_slide(ref)  # one handle per thread


def test_resolve_models_checks_taxonomy_pins_and_task(standin_models) -> None:
    seg, cls = standin_models
    data = standin_pipeline(seg, cls)
    refs, bundles = resolve_models(parse_pipeline(data), "auto")
    assert refs.segmenter == str(seg.resolve()) and refs.device == "auto"
    assert [b.task for b in bundles] == ["segmenter", "classifier"]
    assert all(b.card["demo"] for b in bundles)
    wrong_tax = dict(data, taxonomy=list(reversed(data["taxonomy"])))
    with pytest.raises(ModelError, match="taxonomy"):
        resolve_models(parse_pipeline(wrong_tax), "cpu")
    pinned = dict(data, segmenter={**data["segmenter"], "sha256": "0" * 64})
    with pytest.raises(BundleIntegrityError):
        resolve_models(parse_pipeline(pinned), "cpu")
    swapped = dict(data, segmenter={**data["segmenter"], "bundle": str(cls)})
    with pytest.raises(ModelError, match="not a segmenter"):
        resolve_models(parse_pipeline(swapped), "cpu")


def test_worker_errors_are_scoped(tmp_path: Path, smear, run_a) -> None:
    pipe, refs, _, grid = run_a
    missing = SlideRef(str(tmp_path / "gone.svs"))
    with pytest.raises(SlideError):
        process_batch(get_slide(missing), grid.tiles[:1], pipe, get_models(refs, pipe))
    with pytest.raises(TaskError) as exc:
        batch_task(missing, grid.tiles[:1], pipe, refs)
    assert exc.value.scope == "slide" and "gone.svs" in str(exc.value)
    bad_refs = ModelRefs(refs.segmenter, "f" * 64, refs.classifier, refs.classifier_sha256, "cpu")
    with pytest.raises(TaskError) as exc:
        batch_task(SlideRef(str(smear[0])), grid.tiles[:1], pipe, bad_refs)
    assert exc.value.scope == "run" and "sha256" in str(exc.value)


def test_unreadable_tile_is_a_tile_error(shared_data: Path, standin_models) -> None:
    """unreadable.svs opens but a JPEG tile fails to decode: the batch fails at tile scope."""
    path = shared_data / "slides" / "unreadable.svs"
    tiling = {"tile_um": 2048, "halo_um": 16.0, "max_object_um": 24.0}
    pipe = parse_pipeline({**standin_pipeline(*standin_models), "tiling": tiling})
    refs, _ = resolve_models(pipe, "cpu")
    s = get_slide(SlideRef(str(path)))
    grid = TileGrid.from_pipeline(*s.dimensions, s.mpp or 0.5, pipe)
    with pytest.raises(TaskError) as exc:
        batch_task(SlideRef(str(path)), grid.tiles, pipe, refs)
    assert exc.value.scope == "tile"
    clear_caches()


def test_process_tile_crops_by_the_pipelines_rule(smear, standin_models, monkeypatch) -> None:
    """classifier.crop.rule reaches the crops the classifier is fed."""
    import wsiflow.crops as crops

    seen: list[tuple[str, np.ndarray]] = []
    real = crops.crop_cells

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((args[6] if len(args) > 6 else kwargs.get("rule", "bbox-square"), out))
        return out

    monkeypatch.setattr(crops, "crop_cells", spy)
    data = standin_pipeline(*standin_models, tile_um=TILE_UM_A)
    data["classifier"]["crop"] = {"rule": "bbox-zero-pad", "pad_um": 0.0}
    pipe = parse_pipeline(data)
    refs, _ = resolve_models(pipe, "cpu")
    ref = SlideRef(str(smear[0]))
    s = get_slide(ref)
    grid = TileGrid.from_pipeline(*s.dimensions, s.mpp, pipe)
    table = process_batch(s, grid.tiles[:4], pipe, get_models(refs, pipe))
    assert len(table) == sum(len(c) for _, c in seen) > 0
    assert {rule for rule, _ in seen} == {"bbox-zero-pad"}


def test_an_owned_cell_the_read_edge_cuts_is_read_again_not_lost(
    tmp_path: Path, standin_models, monkeypatch
) -> None:
    """A 60-µm clump (beyond max_object_um, 24 µm here) centred in one tile's core: the read
    edge cuts it, so that tile is read again with a grown box and keeps it whole, exactly
    once (before: both tiles that saw it cut dropped it, silently). Without the re-read
    (MAX_GROW = 0) it is lost, and counted."""
    from standins import BACKGROUND, NUCLEUS, SLIDE_H, SLIDE_MPP, SLIDE_W

    import wsiflow.pipeline.batch as pipeline_mod
    from wsiflow.slide.writer import write_pyramid_tiff

    yy, xx = np.mgrid[0:SLIDE_H, 0:SLIDE_W]
    img = np.empty((SLIDE_H, SLIDE_W, 3), np.uint8)
    img[:] = BACKGROUND
    truth = np.array([[250.0, 400.0], [100.0, 600.0], [700.0, 600.0]])
    for (cx, cy), r in zip(truth, (60, 9, 9), strict=True):  # the clump spans x 190..310
        img[(xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r] = NUCLEUS
    path = tmp_path / "clump.svs"
    write_pyramid_tiff(path, img, mpp=SLIDE_MPP, compression="zlib")
    pipe = _pipe(standin_models, TILE_UM_A)  # 256-px cores, 32-px halo: column 0 reads x < 288
    refs, _ = resolve_models(pipe, "cpu")
    slide, models = get_slide(SlideRef(str(path))), get_models(refs, pipe)
    grid = TileGrid.from_pipeline(SLIDE_W, SLIDE_H, SLIDE_MPP, pipe)

    def run() -> tuple[CellTable, dict[int, int]]:
        cut: dict[int, int] = {}
        tables = [process_batch(slide, [t], pipe, models, cut_cells=cut) for t in grid.tiles]
        return CellTable.concat(tables, len(pipe.taxonomy)), cut

    table, cut = run()
    assert match_centres(np.column_stack([table.x, table.y]), truth) == [1, 1, 1] and len(table) == 3
    big = int(np.argmax(table.area_um2))
    assert tuple(table.bbox[big]) == pytest.approx((190, 340, 310, 460), abs=1) and table.tile[
        big
    ] == grid.owner(250, 400)
    assert cut == {}
    monkeypatch.setattr(pipeline_mod, "MAX_GROW", 0)
    table, cut = run()
    assert match_centres(np.column_stack([table.x, table.y]), truth) == [0, 1, 1]
    assert sum(cut.values()) >= 1  # counted, not silently gone
    clear_caches()


@pytest.mark.parametrize("context_um", [0.0, 4.0])
def test_reads_clipped_to_the_slide_give_the_cells_of_full_reads(
    tmp_path: Path, standin_models, monkeypatch, context_um: float
) -> None:
    """A slide whose size is no multiple of the tiles, with cells cut by its edges and corners:
    reads clipped to the slide (a white margin of the segmenter's context, 0 or 8 px, instead
    of the whole 32-px halo) find the same cells, classes and probabilities as full-size reads,
    read fewer pixels, and a cell the slide edge cuts is kept whole, never flagged as cut."""
    import shutil

    from standins import BACKGROUND, CELL_RADIUS_PX, NUCLEUS

    import wsiflow.crops as crops_mod
    import wsiflow.pipeline.batch as batch
    from wsiflow.models.bundle import ModelBundle, update_card
    from wsiflow.slide.writer import write_pyramid_tiff
    from wsiflow.tiling import Tile

    w, h = 1000, 700  # 0.5 µm/px: 192-px cores leave a 40-px last column and a 124-px last row
    truth = np.array(
        [[4.0, 300.0], [995.0, 120.0], [500.0, 3.0], [610.0, 697.0], [2.0, 2.0], [997.0, 698.0],
         [20.0, 500.0], [985.0, 600.0], [300.0, 690.0], [192.0, 384.0], [960.0, 680.0]]
    )  # fmt: skip
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BACKGROUND
    for cx, cy in truth:
        img[(xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= CELL_RADIUS_PX**2] = NUCLEUS
    path = tmp_path / "edges.svs"
    write_pyramid_tiff(path, img, mpp=SLIDE_MPP_EDGES, compression="zlib")
    seg_dir = tmp_path / "seg"
    seg_dir.mkdir()
    seg_src = standin_models[0]
    for f in (seg_src, seg_src.with_suffix(".json")):
        shutil.copy(f, seg_dir / f.name)
    update_card(ModelBundle.load(seg_dir / seg_src.name), {"context_um": context_um})
    pipe = _pipe((seg_dir / seg_src.name, standin_models[1]), TILE_UM_B)
    refs, _ = resolve_models(pipe, "cpu")
    slide, models = get_slide(SlideRef(str(path))), get_models(refs, pipe)
    assert batch.edge_margin(models.segmenter, pipe) == (round(context_um / 0.5), 2)  # depth-1 U-Net
    grid = TileGrid.from_pipeline(w, h, SLIDE_MPP_EDGES, pipe)
    read_px: list[tuple[int, int]] = []
    crops: list[np.ndarray] = []
    real_read, real_crop = batch.read_seg_image, crops_mod.crop_cells

    def counting(slide, tile, *args, **kwargs):
        read_px.append(tile.read_px)
        return real_read(slide, tile, *args, **kwargs)

    def keeping(*args, **kwargs):
        crops.append(real_crop(*args, **kwargs))
        return crops[-1]

    def run() -> tuple[CellTable, dict[int, int], int, np.ndarray]:
        read_px.clear()
        crops.clear()
        cut: dict[int, int] = {}
        tiles = grid.tiles
        tables = [
            process_batch(slide, tiles[i : i + 3], pipe, models, cut_cells=cut)
            for i in range(0, len(tiles), 3)
        ]
        table = CellTable.concat(tables, len(pipe.taxonomy)).sorted()
        return table, cut, sum(a * b for a, b in read_px), np.concatenate(crops)

    monkeypatch.setattr(batch, "read_seg_image", counting)
    monkeypatch.setattr(crops_mod, "crop_cells", keeping)
    clipped, cut, px, clipped_crops = run()
    with monkeypatch.context() as m:  # the reads before clipping: every tile core + halo, full size
        m.setattr(Tile, "within", lambda self, *args: self)
        full, cut_full, px_full, full_crops = run()
    assert cut == cut_full == {}
    # the classifier sees the same crops: white past the slide edge, not the black past the image
    assert np.array_equal(clipped_crops, full_crops)
    # every disc once, at the centroid of its part inside the slide
    from scipy import ndimage as ndi

    lab, n = ndi.label((img == NUCLEUS).all(axis=2))
    assert n == len(truth)
    centroids = np.array(ndi.center_of_mass(np.ones_like(lab), lab, range(1, n + 1)))[:, ::-1] + 0.5
    assert match_centres(np.column_stack([clipped.x, clipped.y]), centroids, tol=0.5) == [1] * n
    assert clipped.equals(full, atol=1e-9)  # centroids: the last bit moves with the image origin
    assert np.array_equal(clipped.probs, full.probs)
    assert np.array_equal(clipped.poly_xy, full.poly_xy) and np.array_equal(clipped.area_um2, full.area_um2)
    assert px < 0.8 * px_full, (px, px_full)  # 24 tiles of 256² px before
    clear_caches()

"""Every cell exactly once with the shipped segmenters (issue 15 §1): the same cells, ids
aside, whatever the tile size. Generated marrow (demo-seg + mds-demo) with cells laid on the
seams of both grids (megakaryocytes and touching clusters among them), and a real-pixel PBC
mosaic (pb-differential: marrow-seg + pbc8, ../shared/data/pbc through ../shared/tools/composite_slide.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsiflow.cells import CellTable
from wsiflow.config import Pipeline, load_pipeline, parse_pipeline
from wsiflow.execution.worker import SlideRef, clear_caches, get_models, get_slide, resolve_models
from wsiflow.pipeline.batch import process_batch
from wsiflow.tiling import TileGrid

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _with_tile(p: Pipeline, tile_um: float) -> Pipeline:
    data = p.model_dump(mode="json")
    data["tiling"]["tile_um"] = tile_um
    data["tissue"] = {"method": "none", "min_tile_fraction": 0.0}
    return parse_pipeline(data)


def _cells(path: Path, pipe: Pipeline) -> tuple[CellTable, TileGrid, dict[int, int]]:
    refs, _ = resolve_models(pipe, "cpu")
    ref = SlideRef(str(path))
    s = get_slide(ref)
    grid = TileGrid.from_pipeline(*s.dimensions, s.mpp, pipe)
    cut: dict[int, int] = {}
    tiles = grid.tiles
    models = get_models(refs, pipe)
    tables = [
        process_batch(s, tiles[i : i + 4], pipe, models, cut_cells=cut) for i in range(0, len(tiles), 4)
    ]
    t = CellTable.concat(tables, len(pipe.taxonomy))
    return t.take(np.lexsort((t.x, t.y))), grid, cut


def _same_cells(a: CellTable, b: CellTable) -> None:
    assert len(a) == len(b)
    assert np.abs(a.x - b.x).max() < 1e-6 and np.abs(a.y - b.y).max() < 1e-6
    assert np.array_equal(a.area_um2, b.area_um2)
    assert np.array_equal(a.class_id, b.class_id)


def _on_seams(x: np.ndarray, y: np.ndarray, seams_px: np.ndarray, reach_px: np.ndarray) -> np.ndarray:
    dx = np.abs(x[:, None] - seams_px[None, :]).min(axis=1)
    dy = np.abs(y[:, None] - seams_px[None, :]).min(axis=1)
    return (dx < reach_px) | (dy < reach_px)


def test_demo_seg_same_cells_for_two_tile_sizes_with_megakaryocytes_on_seams(tmp_path: Path) -> None:
    from wsiflow.synth import SynthParams, synthesize

    mpp = 0.25
    params = SynthParams(
        width=3072, height=3072, mpp=mpp, seed=11, seam_um=128.0, seam_fraction=0.5,
        touching_fraction=0.3, lineage_mix={"erythroid": 0.3, "granulocytic": 0.3, "megakaryocytic": 0.4},
    )  # fmt: skip
    res = synthesize(tmp_path / "marrow.svs", params)
    base = load_pipeline("mds-demo")  # demo-seg + mds-demo: the generated-cell models
    a, grid_a, cut_a = _cells(res.slide, _with_tile(base, 384.0))  # seams at 384 µm
    b, grid_b, cut_b = _cells(res.slide, _with_tile(base, 256.0))  # seams at 256, 512 µm
    assert len(grid_a) == 4 and len(grid_b) == 9
    _same_cells(a, b)
    assert cut_a == cut_b == {}
    # the comparison is not vacuous: cells, megakaryocytes among them, lie across the seams
    seams = np.array([256, 384, 512]) / mpp
    radius = np.sqrt(a.area_um2 / np.pi) / mpp
    across = _on_seams(a.x, a.y, seams, radius)
    mk = np.isin(a.class_id, [base.class_codes.index("MN"), base.class_codes.index("MD")])
    assert across.sum() >= 20 and (across & mk).sum() >= 3, (across.sum(), (across & mk).sum())
    clear_caches()


def _mosaic(shared_data: Path, out: Path, per_class: int) -> Path:
    tool = shared_data.parent / "tools" / "composite_slide.py"
    r = subprocess.run(
        [sys.executable, str(tool), str(shared_data / "pbc"), str(out), "--per-class", str(per_class),
         "--seed", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.shared_data
def test_pbc_mosaic_same_cells_for_two_tile_sizes(shared_data: Path, tmp_path: Path) -> None:
    """Real pixels: 64 PBC fields (8 per class) edge to edge, pb-differential at 256 and 128 µm
    tiles: the same cells, and each non-platelet field's centre cell found once."""
    import json

    slide = _mosaic(shared_data, tmp_path / "pbc64.svs", 8)
    truth = json.loads(slide.with_suffix(".truth.json").read_text())
    base = load_pipeline("pb-differential")
    a, grid_a, _ = _cells(slide, _with_tile(base, 256.0))
    b, grid_b, _ = _cells(slide, _with_tile(base, 128.0))
    assert len(grid_b) > len(grid_a) > 1
    _same_cells(a, b)
    centres = np.array([[c["x"], c["y"]] for c in truth["cells"] if c["class"] != "platelet"])
    r = 6.0 / truth["mpp"]  # 6 µm, as match_truth.py
    d = np.hypot(a.x[None, :] - centres[:, 0:1], a.y[None, :] - centres[:, 1:2])
    found = (d <= r).sum(axis=1)
    assert (found >= 1).mean() >= 0.95 and (found > 1).sum() <= 1, np.bincount(found)
    clear_caches()

"""``wsiflow run --geoparquet``: ``cells.parquet`` opens with ``geopandas.read_parquet`` and
holds the same cells, classes, measurements and polygons as the Zarr store (a real run:
subprocess, embedded Dask cluster, stand-in models on a generated smear)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from standins import standin_pipeline, write_pipeline_yaml, write_smear

from wsiflow.config import load_pipeline
from wsiflow.writers.zarr_store import CellStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_out(tmp_path_factory: pytest.TempPathFactory, standin_models) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("geoparquet")
    smear, _ = write_smear(d / "smear.svs")
    pipe = write_pipeline_yaml(d / "standin.yaml", standin_pipeline(*standin_models))
    out = d / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "wsiflow", "run", str(smear), "-o", str(out), "--pipeline", str(pipe),
         "--geoparquet", "--workers", "1", "--threads-per-worker", "1", "--no-progress", "--no-report"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out / "smear", pipe


def test_geoparquet_matches_the_zarr_store(run_out) -> None:
    import geopandas as gpd
    import shapely

    slide_dir, pipe_path = run_out
    taxonomy = load_pipeline(pipe_path).taxonomy
    store = CellStore.open(slide_dir / "cells.zarr", mode="r")
    assert store.complete
    cells = store.read_table().sorted()
    assert len(cells) > 10

    frame = gpd.read_parquet(slide_dir / "cells.parquet")
    assert isinstance(frame, gpd.GeoDataFrame) and frame.crs is None  # slide pixel space
    assert len(frame) == len(cells)
    frame = frame.sort_values("id").reset_index(drop=True)
    np.testing.assert_array_equal(frame["id"].to_numpy(), cells.id)
    np.testing.assert_array_equal(frame["tile"].to_numpy(), cells.tile)
    np.testing.assert_array_equal(frame["x"].to_numpy(), cells.x)
    np.testing.assert_array_equal(frame["y"].to_numpy(), cells.y)
    for col in ("area_um2", "perimeter_um", "circularity", "seg_score"):
        np.testing.assert_array_equal(frame[col].to_numpy(), getattr(cells, col), err_msg=col)
    # classes: code and name of every cell's class, and one probability column per class
    codes = [c.code for c in taxonomy]
    names = [c.name for c in taxonomy]
    assert list(frame["class"]) == [codes[k] for k in cells.class_id]
    assert list(frame["class_name"]) == [names[k] for k in cells.class_id]
    for k, code in enumerate(codes):
        np.testing.assert_array_equal(frame[f"p_{code}"].to_numpy(), cells.probs[:, k], err_msg=code)
    # polygons: closed rings with exactly the store's vertices
    assert bool(shapely.is_valid(frame.geometry.values).all())
    for i in range(len(cells)):
        ring = np.asarray(frame.geometry.iloc[i].exterior.coords)
        expected = cells.polygon(i).astype(np.float64)
        np.testing.assert_array_equal(ring[:-1], expected)
        np.testing.assert_array_equal(ring[-1], expected[0])
    # the geometry sits where the store's centroid is (level-0 px, no offset applied)
    cent = frame.geometry.centroid
    assert np.allclose(cent.x.to_numpy(), cells.x, atol=1.0)
    assert np.allclose(cent.y.to_numpy(), cells.y, atol=1.0)

"""``wsiflow run`` end to end (real subprocesses, real Dask): the embedded LocalCluster and
an external ``dask scheduler`` + ``dask worker`` give identical cells; bad slides get one
line each and exit 1; outputs are complete, apart, and never silently overwritten."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from standins import match_centres, standin_pipeline, write_pipeline_yaml, write_smear

from wsiflow.cells import CellTable
from wsiflow.execution.loopback import loopback_cluster
from wsiflow.writers.summary import read_summary_csv
from wsiflow.writers.zarr_store import CellStore

pytestmark = pytest.mark.slow

CLUSTER = ["--workers", "1", "--threads-per-worker", "1", "--no-progress"]


def wsiflow(*args: str | Path, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsiflow", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def cells_of(out_dir: Path) -> CellTable:
    store = CellStore.open(out_dir / "cells.zarr", mode="r")
    assert store.complete
    return store.read_table().sorted()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, standin_models):
    d = tmp_path_factory.mktemp("run")
    (d / "a").mkdir()
    (d / "b").mkdir()
    smear, centres = write_smear(d / "a" / "smear.svs")
    shutil.copy(smear, d / "b" / "smear.svs")  # same name, other folder
    (d / "text.svs").write_text("this is not a slide\n")
    pipe = write_pipeline_yaml(d / "standin.yaml", standin_pipeline(*standin_models))
    return d, smear, centres, pipe


@pytest.fixture(scope="module")
def embedded(setup, generated_slides):
    d, smear, _, pipe = setup
    out = d / "out-embedded"
    # generated_slides.generic: a tiled TIFF without any µm/px
    inputs = [smear, d / "b" / "smear.svs", d / "text.svs", d / "missing.svs", generated_slides.generic]
    proc = wsiflow("run", *inputs, "-o", out, "--pipeline", pipe, *CLUSTER)
    return out, proc


def test_embedded_run_writes_everything_and_reports_bad_slides(setup, embedded) -> None:
    _, _, centres, _ = setup
    out, proc = embedded
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    bad = ("text.svs", "missing.svs", "generic.tiff")
    bad_lines = [ln for ln in proc.stderr.splitlines() if any(b in ln for b in bad)]
    assert len(bad_lines) == 3, proc.stderr
    assert any("text.svs" in ln and "not a whole-slide image" in ln for ln in bad_lines)
    assert any("missing.svs" in ln and "no such file" in ln for ln in bad_lines)
    assert any("generic.tiff" in ln and "--mpp" in ln for ln in bad_lines)
    assert "embedded cluster tcp://127.0.0.1:" in proc.stderr
    # the per-slide table on stdout
    assert "smear.svs" in proc.stdout and "erythroid dysplastic" in proc.stdout and "blast %" in proc.stdout

    # two slides with the same file name got two output folders
    dirs = sorted(p for p in out.iterdir() if p.is_dir())
    assert dirs[0].name == "smear" and len(dirs) == 2 and dirs[1].name.startswith("smear-")
    table = cells_of(out / "smear")
    assert table.equals(cells_of(dirs[1]))
    # every known cell exactly once
    assert match_centres(np.column_stack([table.x, table.y]), centres) == [1] * len(centres)

    # summary.csv: one row per input, errors recorded
    _, rows = read_summary_csv(out / "summary.csv")
    by_slide = {Path(r["path"]).name + r["output"]: r for r in rows}
    assert len(rows) == 5 and len(by_slide) == 5
    statuses = {Path(r["path"]).name: r["status"] for r in rows}
    assert statuses["text.svs"] == statuses["missing.svs"] == statuses["generic.tiff"] == "error"
    ok_rows = [r for r in rows if r["status"] != "error"]
    assert len(ok_rows) == 2 and all(int(r["n_cells"]) == len(centres) for r in ok_rows)

    # summary.json and the QuPath GeoJSON
    doc = orjson.loads((out / "smear" / "summary.json").read_bytes())
    assert doc["summary"]["n_cells"] == len(centres)
    assert doc["slide"]["dimensions"] == [1024, 768]
    with gzip.open(out / "smear" / "cells.geojson.gz") as fh:
        gj = orjson.loads(fh.read())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(centres)
    for f in gj["features"]:
        assert f["properties"]["objectType"] == "detection"
        assert len(f["properties"]["classification"]["color"]) == 3
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 4
    # the same slide in two output folders: the same cell UUIDs (seeded from the slide itself)
    with gzip.open(dirs[1] / "cells.geojson.gz") as fh:
        assert [f["id"] for f in orjson.loads(fh.read())["features"]] == [f["id"] for f in gj["features"]]
    assert doc["slide"]["qupath_offset"] == [0, 0]  # no bounds in an SVS
    # the HTML reports: one per good slide, and the cohort page listing the errors
    assert (out / "smear" / "report.html").is_file() and (dirs[1] / "report.html").is_file()
    cohort = (out / "report.html").read_text()
    assert "text.svs" in cohort and "not a whole-slide image" in cohort
    # no temp files left behind
    assert not [p for p in out.rglob("*.tmp")]


def test_existing_output_is_refused_without_resume_or_overwrite(setup, embedded) -> None:
    _, smear, _, pipe = setup
    out, _ = embedded
    before = (out / "smear" / "summary.json").stat().st_mtime_ns
    proc = wsiflow("run", smear, "-o", out, "--pipeline", pipe, *CLUSTER)
    assert proc.returncode == 2
    assert "output exists" in proc.stderr and "--resume" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "smear" / "summary.json").stat().st_mtime_ns == before
    both = wsiflow("run", smear, "-o", out, "--pipeline", pipe, "--resume", "--overwrite")
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_resume_of_a_complete_output_recomputes_nothing(setup, embedded) -> None:
    _, smear, _, pipe = setup
    out, _ = embedded
    before = cells_of(out / "smear")
    proc = wsiflow("run", smear, "-o", out, "--pipeline", pipe, "--resume", *CLUSTER)
    assert proc.returncode == 0, proc.stderr
    assert "already complete" in proc.stderr
    assert cells_of(out / "smear").equals(before)
    assert str(len(before)) in proc.stdout


def test_external_scheduler_gives_identical_cells(setup, embedded, tmp_path: Path) -> None:
    _, smear, _, pipe = setup
    out_e, _ = embedded
    out = tmp_path / "out-scheduler"
    with loopback_cluster(tmp_path / "dask-logs", n_workers=1, nthreads=1) as pair:
        proc = wsiflow("run", smear, "-o", out, "--pipeline", pipe, "--scheduler", pair.address,
                       "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"scheduler {pair.address}" in proc.stderr
    assert cells_of(out / "smear").equals(cells_of(out_e / "smear"))
    a = orjson.loads((out / "smear" / "summary.json").read_bytes())["summary"]
    b = orjson.loads((out_e / "smear" / "summary.json").read_bytes())["summary"]
    assert a == b



@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--batch-tiles", "0"], "--batch-tiles"),
        (["--max-in-flight", "0"], "--max-in-flight"),
        (["--workers", "0"], "--workers"),
        (["--device", "gpu"], "--device"),
        (["--checkpoint-seconds", "-1"], "--checkpoint-seconds"),
    ],
)
def test_a_bad_option_is_a_usage_error_before_anything_runs(
    tmp_path: Path, args: list[str], key: str
) -> None:
    out = tmp_path / "out"
    proc = wsiflow("run", tmp_path / "missing.svs", "-o", out, *args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wsiflow: error: {key}:")
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # validated before the output folder is made

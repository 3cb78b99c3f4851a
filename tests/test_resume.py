"""Crash safety and worker loss (real subprocesses, real Dask):

* a ``wsiflow run`` killed with SIGKILL mid-way leaves an incomplete store; ``--resume``
  re-does only the tiles not done and ends with the same cells and summary as an
  uninterrupted run;
* killing one of two ``dask worker`` processes mid-run loses nothing: same cells.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from standins import match_centres, standin_pipeline, write_pipeline_yaml, write_smear

from wsiflow.config import load_pipeline
from wsiflow.errors import ConfigError, OutputError
from wsiflow.execution.cluster import ClusterOptions, connect
from wsiflow.execution.loopback import loopback_cluster
from wsiflow.execution.runner import NullReporter, Runner, RunOptions, SlideResult, check_outputs
from wsiflow.execution.worker import resolve_models
from wsiflow.writers.zarr_store import CellStore, read_done

pytestmark = pytest.mark.slow

TILE_UM = 64.0  # 128 px cores: 8 × 6 = 48 tiles, so a run lasts long enough to be killed


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, standin_models):
    d = tmp_path_factory.mktemp("resume")
    smear, centres = write_smear(d / "smear.svs")
    pipe_path = write_pipeline_yaml(d / "p.yaml", standin_pipeline(*standin_models, tile_um=TILE_UM))
    return d, smear, centres, pipe_path


def _runner(session, pipe_path: Path, out: Path, reporter=None, **kw) -> Runner:
    pipe = load_pipeline(pipe_path)
    refs, bundles = resolve_models(pipe, "cpu")
    opts = RunOptions(out=out, batch_tiles=1, flush_seconds=0.0, **kw)
    return Runner(session.client, pipe, refs, bundles, opts, reporter)


@pytest.fixture(scope="module")
def embedded():
    """One embedded cluster for the module: its worker loads the models once."""
    with connect(ClusterOptions(n_workers=1, threads_per_worker=1, device="cpu")) as s:
        yield s


@pytest.fixture(scope="module")
def reference(setup, embedded):
    """An uninterrupted run."""
    d, smear, centres, pipe_path = setup
    out = d / "reference"
    [res] = _runner(embedded, pipe_path, out).run([str(smear)])
    assert res.ok and res.n_cells == len(centres)
    return out, res


def _table(out: Path):
    return CellStore.open(out / "smear" / "cells.zarr", mode="r").read_table().sorted()


def _summary(out: Path) -> dict:
    return orjson.loads((out / "smear" / "summary.json").read_bytes())["summary"]


def test_killed_run_resumes_to_the_same_cells(setup, reference, embedded) -> None:
    d, smear, centres, pipe_path = setup
    out = d / "killed"
    zpath = out / "smear" / "cells.zarr"
    cmd = [
        sys.executable,
        "-m",
        "wsiflow",
        "run",
        str(smear),
        "-o",
        str(out),
        "--pipeline",
        str(pipe_path),
        "--workers",
        "1",
        "--threads-per-worker",
        "1",
        "--batch-tiles",
        "1",
        "--max-in-flight",
        "1",
        "--checkpoint-seconds",
        "0",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        n_done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(Exception):
                n_done = int(read_done(zpath).sum())
            if n_done >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run finished before it could be killed"
        assert n_done >= 3
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the client and its spawned workers: a power cut
        proc.wait(timeout=30)

    assert not CellStore.is_complete(zpath)
    done_before = set(np.flatnonzero(read_done(zpath)).tolist())
    assert 3 <= len(done_before) < 48
    assert not (out / "smear" / "summary.json").exists()
    with pytest.raises(OutputError, match="--resume"):  # refused without --resume/--overwrite
        check_outputs(RunOptions(out=out), [str(smear)])

    [res] = _runner(embedded, pipe_path, out, resume=True).run([str(smear)])
    assert res.ok, res.error
    # no finished tile was recomputed; every other tile was
    assert not done_before & set(res.tiles_computed)
    assert done_before | set(res.tiles_computed) == set(range(48))
    assert res.tiles_skipped == len(done_before)
    ref_out, _ = reference
    table = _table(out)
    assert table.equals(_table(ref_out))
    assert match_centres(np.column_stack([table.x, table.y]), centres) == [1] * len(centres)
    assert _summary(out) == _summary(ref_out)


class _KillWorkerAfter(NullReporter):
    def __init__(self, proc: subprocess.Popen[bytes], after: int) -> None:
        self.proc, self.after, self.seen, self.killed = proc, after, 0, False

    def tiles_done(self, slide: str, n_tiles: int, n_cells: int) -> None:
        self.seen += n_tiles
        if not self.killed and self.seen >= self.after:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.killed = True

    def slide_finished(self, result: SlideResult) -> None:
        pass


def test_losing_a_worker_loses_nothing(setup, reference, tmp_path: Path) -> None:
    _, smear, _, pipe_path = setup
    out = tmp_path / "worker-loss"
    with loopback_cluster(tmp_path / "logs", n_workers=2, nthreads=1) as pair:
        victim = pair.workers[0]
        killer = _KillWorkerAfter(victim, after=4)
        with connect(ClusterOptions(scheduler=pair.address)) as s:
            runner = _runner(s, pipe_path, out, reporter=killer)
            [res] = runner.run([str(smear)])
            assert victim.poll() is not None and killer.killed
            assert len(s.client.nthreads()) == 1
            assert runner.peak_in_flight <= 2 * 2  # the bound: 2 × worker threads
    assert res.ok and not res.failed_tiles, res.error
    ref_out, _ = reference
    assert _table(out).equals(_table(ref_out))
    assert _summary(out) == _summary(ref_out)


def test_unreadable_tile_is_recorded_and_the_slide_completes(setup, embedded, tmp_path: Path) -> None:
    """One corrupt 128-px JPEG tile of the file: read around, white, recorded; no grid tile
    fails, only the cells on that tile are lost and every other cell is found once."""
    from standins import CELL_RADIUS_PX, write_smear_with_corrupt_tile

    _, _, _, pipe_path = setup
    slide, centres, (x0, y0, x1, y1) = write_smear_with_corrupt_tile(tmp_path / "smear.svs")
    out = tmp_path / "out"
    runner = _runner(embedded, pipe_path, out)
    runner.batch_tiles = 3
    [res] = runner.run([str(slide)])
    assert res.ok, res.error
    assert res.failed_tiles == {}  # was: every grid tile whose read box touched it failed
    assert res.unreadable == {"0/2/2": [float(x0), float(y0), float(x1), float(y1)]}
    store = CellStore.open(out / "smear" / "cells.zarr", mode="r")
    assert not np.asarray(store.failed).any()
    doc = orjson.loads((out / "smear" / "summary.json").read_bytes())
    assert doc["tiles"]["unreadable_source_tiles"] == res.unreadable
    summary = doc["summary"]
    assert summary["failed_tiles"] == 0 and summary["unreadable_tiles"] == 1
    assert summary["unreadable_area_fraction"] == pytest.approx(128 * 128 / (1024 * 768))
    assert summary["tissue_skipped_fraction"] == 0.0  # tissue detection off: nothing skipped
    assert any("could not be decoded" in n for n in summary["notes"])
    table = store.read_table()
    found = match_centres(np.column_stack([table.x, table.y]), centres)
    r = CELL_RADIUS_PX + 2
    clear = (
        (centres[:, 0] < x0 - r)
        | (centres[:, 0] > x1 + r)
        | (centres[:, 1] < y0 - r)
        | (centres[:, 1] > y1 + r)
    )
    inside = (centres[:, 0] > x0) & (centres[:, 0] < x1) & (centres[:, 1] > y0) & (centres[:, 1] < y1)
    assert clear.sum() > 0.9 * len(centres) and inside.any()
    assert all(n == 1 for n, ok in zip(found, clear, strict=True) if ok)  # every cell off it, once
    assert all(n == 0 for n, gone in zip(found, inside, strict=True) if gone)  # on it: lost


def test_retry_failed_reruns_the_failed_tiles_of_a_finished_store(
    setup, reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tile fails for good (recorded, slide finished); ``--resume --retry-failed`` later
    re-runs exactly that tile and ends with the uninterrupted run's cells and summary."""
    from distributed import Client

    import wsiflow.pipeline.batch as pipeline_mod
    from wsiflow.errors import SlideError

    _, smear, _, pipe_path = setup
    ref_out, _ = reference
    bad = 7
    real = pipeline_mod.process_tile

    def flaky(slide, tile, pipeline, models, *rest):
        if tile.id == bad:
            raise SlideError(str(smear), f"tile {bad}: simulated read failure")
        return real(slide, tile, pipeline, models, *rest)

    out = tmp_path / "out"
    # tasks run in this process (threads), so the patched function is the one they call
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        session = type("S", (), {"client": client})()
        monkeypatch.setattr(pipeline_mod, "process_tile", flaky)
        [res] = _runner(session, pipe_path, out).run([str(smear)])
        assert res.ok and set(res.failed_tiles) == {bad}
        assert _summary(out)["failed_tiles"] == 1
        monkeypatch.setattr(pipeline_mod, "process_tile", real)
        # a plain --resume keeps the finished store as it is
        [res] = _runner(session, pipe_path, out, resume=True).run([str(smear)])
        assert res.tiles_computed == [] and set(res.failed_tiles) == {bad}
        with pytest.raises(ConfigError, match="use it with --resume"):  # a usage error (exit 2)
            _runner(session, pipe_path, out, retry_failed=True).run([str(smear)])
        [res] = _runner(session, pipe_path, out, resume=True, retry_failed=True).run([str(smear)])
    assert res.ok and res.tiles_computed == [bad] and not res.failed_tiles
    assert CellStore.is_complete(out / "smear" / "cells.zarr")
    assert not np.asarray(CellStore.open(out / "smear" / "cells.zarr", mode="r").failed).any()
    a, b = _table(out), _table(ref_out)
    assert np.array_equal(a.id, b.id) and np.array_equal(a.class_id, b.class_id)
    assert _summary(out) == _summary(ref_out)

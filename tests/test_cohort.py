"""Slides overlapping on the cluster (issue 16, item 1), with real Dask and the stand-in models:

* a cohort run with overlap gives the same CellTables (every column, ids included), the same
  ``summary.json`` documents and the same ``summary.csv`` rows as the same slides run one by
  one (each in its own run, on the one-slide-at-a-time path), with slides of several sizes
  and an unreadable one in the middle;
* one window of ``max_in_flight`` batches holds across slides (counted outside the runner,
  from its submits and the reporter's results), and batches of two slides are in it at once;
* a slide whose finishing raises costs only itself;
* in the run's tail the batches with the most work go out first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from standins import cell_centres, smear_image, standin_pipeline, write_pipeline_yaml

from wsiflow.config import load_pipeline
from wsiflow.execution.cluster import ClusterOptions, connect
from wsiflow.execution.runner import NullReporter, Runner, RunOptions, SlideResult
from wsiflow.execution.worker import resolve_models
from wsiflow.writers.summary import read_summary_csv
from wsiflow.writers.zarr_store import CellStore

pytestmark = pytest.mark.slow

TILE_UM = 64.0  # 128 px cores: the full smear is 8 × 6 tiles
# (width, height) of level 0: crops of the stand-in smear, so every slide has its own tiles
SIZES = {"full": (1024, 768), "left": (512, 768), "strip": (1024, 256), "corner": (300, 200)}


def _write_slides(d: Path) -> list[Path]:
    from wsiflow.slide.writer import write_pyramid_tiff

    img = smear_image(cell_centres())
    paths = []
    for name, (w, h) in SIZES.items():
        p = d / f"{name}.svs"
        write_pyramid_tiff(p, np.ascontiguousarray(img[:h, :w]), mpp=0.5, app_mag=20, compression="zlib")
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, standin_models):
    d = tmp_path_factory.mktemp("cohort")
    full, left, strip, corner = _write_slides(d)
    bad = d / "bad.svs"
    bad.write_text("this is not a slide\n")
    yaml_path = write_pipeline_yaml(d / "p.yaml", standin_pipeline(*standin_models, tile_um=TILE_UM))
    pipe = load_pipeline(yaml_path)
    refs, bundles = resolve_models(pipe, "cpu")
    # the bad slide in the middle; sizes mixed, so slides finish computing out of input order
    inputs = [str(p) for p in (full, corner, bad, strip, left)]
    return d, pipe, refs, bundles, inputs


@pytest.fixture(scope="module")
def session():
    with connect(ClusterOptions(n_workers=1, threads_per_worker=2, device="cpu")) as s:
        yield s


def _runner(session, setup, out: Path, reporter=None, cls=Runner, **kw) -> Runner:
    _, pipe, refs, bundles, _ = setup
    opts = RunOptions(out=out, flush_seconds=0.0, report=False, **kw)
    return cls(session.client, pipe, refs, bundles, opts, reporter)


class _Window(NullReporter):
    """Counts the batches outstanding per slide from the runner's submits and the results
    the reporter is told about (one ``tiles_done`` per batch back: no tile fails here)."""

    def __init__(self) -> None:
        self.out: dict[str, int] = {}
        self.most = 0
        self.most_slides = 0
        self.started: list[str] = []
        self.finished: list[str] = []
        self.notes: list[str] = []

    def submitted(self, slide: str) -> None:
        self.out[slide] = self.out.get(slide, 0) + 1
        self.most = max(self.most, sum(self.out.values()))
        self.most_slides = max(self.most_slides, sum(1 for v in self.out.values() if v))

    def slide_started(self, slide: str, total_tiles: int, done_tiles: int) -> None:
        self.started.append(slide)

    def tiles_done(self, slide: str, n_tiles: int, n_cells: int) -> None:
        assert self.out.get(slide, 0) > 0, f"a result of {slide} that was never submitted"
        self.out[slide] -= 1

    def slide_finished(self, result: SlideResult) -> None:
        self.finished.append(result.label)

    def note(self, message: str) -> None:
        self.notes.append(message)


class _CountingRunner(Runner):
    def _submit(self, plan, batch):  # type: ignore[no-untyped-def]
        assert isinstance(self.reporter, _Window)
        self.reporter.submitted(Path(plan.path).stem)
        return super()._submit(plan, batch)


@pytest.fixture(scope="module")
def cohort(setup, session):
    d, _, _, _, inputs = setup
    out = d / "cohort"
    window = _Window()
    runner = _runner(session, setup, out, window, _CountingRunner, max_in_flight=2, batch_tiles=1)
    results = runner.run(inputs)
    return out, results, window, runner


@pytest.fixture(scope="module")
def one_by_one(setup, session):
    """Each slide in its own run, on the one-slide-at-a-time path, into one OUT."""
    d, _, _, _, inputs = setup
    out = d / "one-by-one"
    results = []
    for p in inputs:
        window = _Window()
        [res] = _runner(session, setup, out, window, _CountingRunner, overlap=False, max_in_flight=2,
                        batch_tiles=1).run([p])
        assert window.most_slides <= 1 and window.most <= 2
        results.append(res)
    return out, results


def _doc(out: Path, name: str) -> dict:
    return orjson.loads((out / name / "summary.json").read_bytes())


def test_cohort_with_overlap_equals_slides_run_one_by_one(setup, cohort, one_by_one) -> None:
    _, _, _, _, inputs = setup
    out_c, res_c, window, _ = cohort
    out_s, res_s = one_by_one
    assert [r.path for r in res_c] == inputs  # results in input order
    assert [r.ok for r in res_c] == [True, True, False, True, True]
    assert [r.ok for r in res_s] == [True, True, False, True, True]
    bad_c, bad_s = res_c[2], res_s[2]
    assert bad_c.error == bad_s.error and "not a whole-slide image" in (bad_c.error or "")
    assert [n for n in window.notes if "bad.svs" in n] == [bad_c.error]  # its one line
    n_cells = []
    for a, b in zip(res_c, res_s, strict=True):
        assert (a.status, a.n_cells, a.tiles_total, a.failed_tiles) == (b.status, b.n_cells, b.tiles_total,
                                                                         b.failed_tiles)
        assert sorted(a.tiles_computed) == sorted(b.tiles_computed)
        if not a.ok:
            assert not (out_c / "bad" / "summary.json").exists()
            continue
        name = Path(a.path).stem
        ta = CellStore.open(out_c / name / "cells.zarr", mode="r").read_table().sorted()
        tb = CellStore.open(out_s / name / "cells.zarr", mode="r").read_table().sorted()
        assert len(ta) > 0 and ta.equals(tb), name  # every column, ids included
        assert _doc(out_c, name) == _doc(out_s, name)  # summary.json holds no timings
        n_cells.append(len(ta))
    assert len(set(n_cells)) == len(n_cells)  # the slides really differ
    # summary.csv: the same rows in the same (input) order, the output folder aside
    cols_c, rows_c = read_summary_csv(out_c / "summary.csv")
    cols_s, rows_s = read_summary_csv(out_s / "summary.csv")
    assert cols_c == cols_s and len(rows_c) == len(inputs)
    strip = [{k: v for k, v in r.items() if k != "output"} for r in rows_c]
    assert strip == [{k: v for k, v in r.items() if k != "output"} for r in rows_s]
    assert [r["path"] for r in rows_c] == inputs


def test_one_window_of_batches_holds_across_slides(setup, cohort) -> None:
    _, _, _, _, inputs = setup
    _, results, window, runner = cohort
    assert window.most <= 2 and runner.peak_in_flight == 2
    assert window.most_slides == 2  # the next slide's batches went out before the last one came back
    assert all(v == 0 for v in window.out.values())  # every batch came back and was stored
    assert sorted(window.finished) == sorted(r.label for r in results)  # every slide once
    assert len(window.started) == len(inputs) - 1  # the bad slide never started


def test_a_slide_whose_finishing_raises_leaves_the_others_done(
    setup, session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsiflow.execution.runner as runner_mod

    _, _, _, _, inputs = setup
    good = [p for p in inputs if "bad" not in p]
    victim = good[1]
    real = runner_mod.finish_slide

    def finish(plan, *args, **kw):  # type: ignore[no-untyped-def]
        if plan.path == victim:
            raise ValueError("simulated finishing failure")
        return real(plan, *args, **kw)

    monkeypatch.setattr(runner_mod, "finish_slide", finish)
    window = _Window()
    out = tmp_path / "out"
    results = _runner(session, setup, out, window, _CountingRunner, max_in_flight=2, batch_tiles=1).run(good)
    assert [r.ok for r in results] == [p != victim for p in good]
    failed = results[1]
    why = "internal error: ValueError: simulated finishing failure (--debug shows details)"
    assert failed.error == f"{victim}: {why}"
    assert window.notes == [failed.error]
    for r in results:
        name = Path(r.path).stem
        assert (out / name / "summary.json").is_file() == r.ok
        assert CellStore.is_complete(out / name / "cells.zarr") == r.ok
    _, rows = read_summary_csv(out / "summary.csv")
    assert [r["status"] == "error" for r in rows] == [p == victim for p in good]
    assert sorted(window.finished) == sorted(r.label for r in results)


def test_a_slide_whose_tiles_all_fail_costs_only_itself(
    setup, one_by_one, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first (largest) slide's tiles all fail: after the first few it is given up with its
    one line (its queued batches dropped, those in flight cancelled), and every other slide
    ends with the cells and summary of its one-by-one run."""
    from distributed import Client

    import wsiflow.pipeline.batch as batch_mod
    from wsiflow.errors import SlideError

    _, pipe, refs, bundles, inputs = setup
    out_s, _ = one_by_one
    victim = inputs[0]
    real = batch_mod.process_tile

    def broken(slide, tile, *rest):  # type: ignore[no-untyped-def]
        if Path(victim).stem in str(slide.path):
            raise SlideError(victim, f"tile {tile.id}: simulated read failure")
        return real(slide, tile, *rest)

    out = tmp_path / "out"
    window = _Window()
    # tasks run in this process (threads), so the patched function is the one they call
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        monkeypatch.setattr(batch_mod, "process_tile", broken)
        opts = RunOptions(out=out, flush_seconds=0.0, report=False, max_in_flight=4, batch_tiles=2)
        results = _CountingRunner(client, pipe, refs, bundles, opts, window).run(inputs)
    first = results[0]
    assert not first.ok and "no tile could be processed" in (first.error or "")
    assert [r.ok for r in results] == [False, True, False, True, True]
    lines = sorted(n for n in window.notes if "failed and is excluded" not in n)
    assert lines == sorted([first.error, results[2].error])  # one line each
    assert not CellStore.is_complete(out / "full" / "cells.zarr")
    for r in results[1:]:
        if r.ok:
            name = Path(r.path).stem
            a = CellStore.open(out / name / "cells.zarr", mode="r").read_table().sorted()
            b = CellStore.open(out_s / name / "cells.zarr", mode="r").read_table().sorted()
            assert a.equals(b) and _doc(out, name) == _doc(out_s, name), name
    assert sorted(window.finished) == sorted(r.label for r in results)


def test_the_runs_tail_sends_the_batches_with_most_work_first(setup, session, tmp_path) -> None:
    _, _, _, _, inputs = setup
    works: list[float] = []

    class _Order(Runner):
        def _submit(self, plan, batch):  # type: ignore[no-untyped-def]
            works.append(plan.work(batch.tiles))
            return super()._submit(plan, batch)

    corner = inputs[1]  # 300 × 200 px: edge tiles have smaller cores, so less work
    runner = _runner(session, setup, tmp_path / "o", None, _Order, max_in_flight=1, batch_tiles=1)
    [res] = runner.run([corner])
    assert res.ok and len(works) == res.tiles_total > 1  # one slide: the whole run is the tail
    assert works == sorted(works, reverse=True) and works[0] > works[-1]

"""The progress sinks: one protocol, and the CLI's bars for overlapping slides."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from wsiflow.cli._progress import BarReporter
from wsiflow.execution.runner import NullReporter, Reporter, SlideResult


def _methods(cls: type) -> dict[str, list[str]]:
    return {
        name: list(inspect.signature(fn).parameters)
        for name, fn in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_every_reporter_has_the_protocols_methods_and_signatures() -> None:
    want = _methods(Reporter)
    assert set(want) == {"run_started", "slide_started", "tiles_done", "slide_finished", "note"}
    for cls in (NullReporter, BarReporter):
        have = _methods(cls)
        assert {k: have.get(k) for k in want} == want, cls.__name__


def test_bar_reporter_keeps_a_bar_per_active_slide_and_counts_the_cohort(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def result(label: str) -> SlideResult:
        return SlideResult(path=f"/x/{label}.svs", name=f"{label}.svs", out_dir=tmp_path / label, status="ok")

    r = BarReporter(enabled=True)
    r.run_started(3)
    r.slide_started("a", 4, 0)
    r.slide_started("b", 2, 1)  # both active at once
    r.tiles_done("a", 2, 10)
    r.tiles_done("b", 1, 5)
    assert set(r._bars) == {"a", "b"}
    assert r._bars["a"].n == 2 and r._bars["b"].n == 2
    r.slide_finished(result("b"))
    assert set(r._bars) == {"a"}
    r.tiles_done("a", 2, 3)
    r.slide_finished(result("a"))
    r.slide_finished(result("c"))  # a slide that failed before it started: counted, no bar
    assert r._bars == {} and r._cells == 18
    assert r._cohort is not None and r._cohort.n == 3 and r._cohort.total == 3
    r.close()
    err = capsys.readouterr().err
    assert "slides" in err and "3/3" in err and "cells=18" in err

"""Truth comparison on hand-made detections with hand-computed results."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from wsiflow.aggregate import BlastStat, LineageStat, SlideSummary, summarize
from wsiflow.config import load_pipeline
from wsiflow.matching import match_centroids
from wsiflow.synth.compare import Detections, Truth, compare


def _summary(
    lineages: tuple[LineageStat, ...] = (),
    blast: BlastStat | None = None,
    rule: str = "nucleated-without-megakaryocytes",
) -> SlideSummary:
    """A run's typed summary with the given lineage and blast rows (the rest as for no cells)."""
    base = summarize(np.zeros(0, np.int64), load_pipeline("mds-demo"))
    return dataclasses.replace(base, lineages=lineages, blast=blast, denominator_rule=rule)


def _truth() -> Truth:
    # five cells of radius 20 px, far apart
    x = np.array([100.0, 300.0, 500.0, 700.0, 900.0])
    y = np.full(5, 100.0)
    code = ("EN", "ED", "GN", "blast", "MN")
    return Truth(x, y, np.full(5, 20.0), code, {})


def test_missed_duplicate_misclassified_exact() -> None:
    t = _truth()
    # cell 0: found (EN); cell 1: found but called EN (misclassified); cell 2: found twice
    # (the second detection 12 px away: a duplicate); cell 3: missed; cell 4: found (MN);
    # plus one detection in empty space (a plain false positive).
    px = np.array([103.0, 298.0, 501.0, 512.0, 905.0, 1500.0])
    py = np.array([100.0, 104.0, 99.0, 100.0, 100.0, 100.0])
    codes = ("EN", "EN", "GN", "GN", "MN", "other")
    c = compare(t, Detections(px, py, codes))
    assert c.n_true == 5 and c.n_pred == 6
    assert c.matched == 4
    assert c.missed == 1
    assert c.false_positives == 2
    assert c.duplicates == 1
    assert c.precision == pytest.approx(4 / 6)
    assert c.recall == pytest.approx(4 / 5)
    assert c.f1 == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    i = {k: n for n, k in enumerate(c.classes)}
    assert c.confusion[i["ED"], i["EN"]] == 1
    assert c.confusion[i["EN"], i["EN"]] == 1
    assert c.confusion[i["GN"], i["GN"]] == 1
    assert c.confusion.sum() == 4
    assert c.accuracy == pytest.approx(3 / 4)
    # the closer of the two detections of cell 2 is the match
    assert [int(p) for p in c.pairs[c.pairs[:, 0] == 2][0]] == [2, 2]
    # fractions: truth erythroid 1 dysplastic / 2; measured 0 / 2 (both called EN)
    assert c.fractions["erythroid"]["truth"] == pytest.approx(0.5)
    assert c.fractions["erythroid"]["measured"] == pytest.approx(0.0)
    assert c.fractions["blast"]["truth"] == pytest.approx(1 / 5)
    assert c.fractions["blast"]["measured"] == pytest.approx(0.0)


def test_gate_is_relative_to_radius() -> None:
    tx, ty = np.array([0.0, 1000.0]), np.array([0.0, 0.0])
    tr = np.array([10.0, 100.0])
    # 8 px off a radius-10 cell (outside 0.5·r) and 40 px off a radius-100 cell (inside)
    pairs = match_centroids(tx, ty, tr, np.array([8.0, 1040.0]), np.array([0.0, 0.0]))
    assert pairs.tolist() == [[1, 1]]


def test_crowded_assignment_is_one_to_one_and_optimal() -> None:
    # two true cells 10 px apart, two detections between them: greedy nearest would pair
    # both with cell 0; the assignment must give one each.
    tx, ty, tr = np.array([0.0, 10.0]), np.zeros(2), np.full(2, 20.0)
    px, py = np.array([4.0, 6.0]), np.zeros(2)
    pairs = match_centroids(tx, ty, tr, px, py)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 0), (1, 1)]


def test_empty_inputs() -> None:
    t = _truth()
    c = compare(t, Detections(np.zeros(0), np.zeros(0), ()))
    assert c.matched == 0 and c.recall == 0.0 and c.precision == 0.0 and c.duplicates == 0


def test_demo_table_puts_measured_next_to_truth() -> None:
    from wsiflow.cli.demo import format_demo

    t = _truth()
    c = compare(t, Detections(t.x, t.y, t.code))
    summary = _summary(
        lineages=(LineageStat("erythroid", 1, 1, 0.5, 0.09, 0.91, "uncertain"),),
        blast=BlastStat(1, 5, 0.2, 0.04, 0.62, "≥20%"),
    )
    truth = {
        "lineages": {
            "erythroid": {"dysplastic": 1, "total": 2, "fraction": 0.5},
            "granulocytic": {"dysplastic": 0, "total": 1, "fraction": 0.0},
        },
        "blasts": {"count": 1, "fraction": 0.2},
        "nucleated": 5,
    }
    text = format_demo(summary, truth, c)
    ery = next(line for line in text.splitlines() if line.startswith("erythroid"))
    assert "50.0%" in ery and "[9.0%, 91.0%]" in ery and "uncertain" in ery and "truth 1/2" in ery
    assert "granulocytic" in text  # a lineage the run did not report still shows its truth
    assert "recall 1.000, precision 1.000, 0 counted twice" in text


def test_blast_fraction_uses_the_runs_denominator_rule() -> None:
    """The run's blast interval is over nucleated cells without megakaryocytes: the truth
    it is checked against must be too (1 blast of 4 non-megakaryocytes, not of 5 cells)."""
    t = _truth()
    px, py = np.array([100.0, 300.0, 500.0, 700.0, 900.0]), np.full(5, 100.0)
    codes = ("EN", "ED", "GN", "blast", "MN")
    blast = BlastStat(1, 4, 0.25, 0.2, 0.3, "10-19%")
    summary = _summary(blast=blast)
    c = compare(t, Detections(px, py, codes, summary))
    assert c.fractions["blast"]["truth"] == pytest.approx(1 / 4)
    assert c.fractions["blast"]["measured"] == pytest.approx(1 / 4) and c.fractions["blast"]["truth_in_ci"]
    c = compare(t, Detections(px, py, codes, _summary(blast=blast, rule="nucleated")))
    assert c.fractions["blast"]["truth"] == pytest.approx(1 / 5)

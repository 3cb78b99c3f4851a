"""Table 3 / Table 4 metrics against values computed by hand on a fixed prediction set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from wsiflow.train.metrics import classification_report, write_report

# Four classes; "c" is never predicted, "d" is absent from the truth and never predicted.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 0, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 0, 1, 0, 0, 1, 1])
CLASSES = ["a", "b", "c", "d"]


def _probs() -> np.ndarray:
    p = np.full((len(Y_PRED), 4), 0.1)
    p[np.arange(len(Y_PRED)), Y_PRED] = 0.7
    return p


def test_hand_computed() -> None:
    r = classification_report(Y_TRUE, _probs(), CLASSES)
    assert r.confusion.tolist() == [[3, 1, 0, 0], [1, 2, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0]]
    a, b, c, d = r.per_class
    # a: TP 3, FN 1, FP 2, TN 4
    assert (a.tp, a.fn, a.fp, a.tn) == (3, 1, 2, 4)
    assert a.sensitivity == pytest.approx(0.75)
    assert a.specificity == pytest.approx(4 / 6)  # TN / (TN + FP)
    assert a.ppv == pytest.approx(0.6)
    assert a.npv == pytest.approx(0.8)  # TN / (TN + FN)
    assert a.accuracy == pytest.approx(0.7)
    assert a.f1 == pytest.approx(6 / 9)
    # AUC by hand: each 0.7-scored positive beats 4 negatives and ties 2 (3 x 5); the 0.1 one ties 4 (2).
    assert a.auc == pytest.approx(17 / 24)
    # AP = sum over thresholds (R_n - R_n-1) P_n = 0.75 * 0.6 + 0.25 * 0.4
    assert a.average_precision == pytest.approx(0.55)
    # b: TP 2, FN 1, FP 3, TN 4
    assert (b.sensitivity, b.specificity, b.ppv, b.npv) == pytest.approx((2 / 3, 4 / 7, 0.4, 0.8))
    assert b.f1 == pytest.approx(0.5) and b.accuracy == pytest.approx(0.6)
    # c: never predicted → PPV undefined; sensitivity 0, specificity 1, NPV 7/10, F1 0
    assert c.ppv is None and c.predicted == 0
    assert (c.sensitivity, c.specificity, c.npv, c.f1) == pytest.approx((0.0, 1.0, 0.7, 0.0))
    # d: absent from the truth → sensitivity, F1, AUC, AP undefined; specificity 1
    assert (
        d.support == 0
        and d.sensitivity is None
        and d.f1 is None
        and d.auc is None
        and d.average_precision is None
    )
    assert d.specificity == 1.0 and d.npv == 1.0 and d.accuracy == 1.0
    assert r.accuracy == pytest.approx(0.5)
    assert r.balanced_accuracy == pytest.approx((0.75 + 2 / 3 + 0) / 3)
    assert r.macro_f1 == pytest.approx((6 / 9 + 0.5 + 0) / 3)
    assert any("c: never predicted" in n for n in r.notes)
    assert any("d: absent" in n for n in r.notes)


def test_agrees_with_sklearn_on_random_predictions() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 300)
    p = rng.dirichlet(np.ones(5), 300)
    p[np.arange(300), y] += rng.uniform(0, 0.6, 300)
    p /= p.sum(1, keepdims=True)
    r = classification_report(y, p, list("vwxyz"))
    pred = p.argmax(1)
    assert [m.sensitivity for m in r.per_class] == pytest.approx(recall_score(y, pred, average=None))
    assert [m.ppv for m in r.per_class] == pytest.approx(precision_score(y, pred, average=None))
    assert r.macro_f1 == pytest.approx(f1_score(y, pred, average="macro"))


def test_write_report(tmp_path: Path) -> None:
    r = classification_report(Y_TRUE, _probs(), CLASSES)
    paths = write_report(r, tmp_path, {"bundle": "x"})
    data = json.loads(paths["json"].read_text())
    assert data["bundle"] == "x" and data["per_class"][2]["ppv"] is None
    assert "nan" in paths["per_class"].read_text().splitlines()[3]  # class c, PPV column
    md = paths["markdown"].read_text()
    assert "| c | 3 |" in md and "n/a" in md and "| a | 3 | 1 | 0 | 0 |" in md
    assert paths["roc"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["confusion"].read_text().splitlines()[1] == "a,3,1,0,0"

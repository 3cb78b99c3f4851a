"""Temperature scaling and calibration error for a classifier (Guo et al., ICML 2017).

A classifier trained on one lab's cells is over-confident on another's; one scalar
temperature ``T`` fitted on the validation split (minimum negative log-likelihood of
``softmax(logits / T)``) keeps every argmax and makes the confidences honest. The fitted
``T`` lives in the bundle card (``calibration.temperature``) and the pipeline applies it.

:func:`expected_calibration_error` is the usual equal-width-bin ECE of the top-class
confidence (15 bins): Σ_b |B_b|/n · |acc(B_b) − conf(B_b)|. The functions here take
log-probabilities or logits (any per-row constant shift gives the same softmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from wsiflow.train.metrics import unit_square_png

__all__ = [
    "N_BINS",
    "Reliability",
    "calibration_summary",
    "expected_calibration_error",
    "fit_temperature",
    "log_probs",
    "nll",
    "plot_reliability",
    "reliability",
    "scaled_probs",
]

N_BINS = 15
T_BOUNDS = (0.05, 20.0)


def log_probs(probs: NDArray[np.floating], floor: float = 1e-12) -> NDArray[np.float64]:
    """Log of softmax probabilities, floored (a logit up to a per-row constant)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), floor, 1.0))


def scaled_probs(logits: NDArray[np.floating], temperature: float) -> NDArray[np.float64]:
    """softmax(logits / T) in float64."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))


def nll(logits: NDArray[np.floating], labels: NDArray[np.integer], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / T)."""
    lp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    y = np.asarray(labels, dtype=np.int64)
    return float(-lp[np.arange(len(y)), y].mean())


def fit_temperature(logits: NDArray[np.floating], labels: NDArray[np.integer]) -> float:
    """The T in [0.05, 20] minimising the validation NLL (bounded search over log T)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise ValueError(f"need logits (n, K) and n labels with n > 0, got {z.shape} and {y.shape}")
    res = minimize_scalar(
        lambda lt: nll(z, y, math.exp(lt)),
        bounds=(math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(math.exp(res.x))


@dataclass(frozen=True)
class Reliability:
    """Per-bin counts, mean confidence and accuracy of the top class (empty bins: NaN)."""

    edges: NDArray[np.float64]
    count: NDArray[np.int64]
    confidence: NDArray[np.float64]
    accuracy: NDArray[np.float64]

    @property
    def ece(self) -> float:
        n = int(self.count.sum())
        if n == 0:
            return 0.0
        keep = self.count > 0
        gap = np.abs(self.accuracy[keep] - self.confidence[keep])
        return float((self.count[keep] * gap).sum() / n)


def reliability(
    probs: NDArray[np.floating], labels: NDArray[np.integer], n_bins: int = N_BINS
) -> Reliability:
    """Equal-width bins of the top-class confidence in (0, 1]."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right-closed bins: (e_i, e_{i+1}]; a confidence of exactly 0 cannot occur for a softmax
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return Reliability(edges=edges, count=count, confidence=mean_conf, accuracy=acc)


def expected_calibration_error(
    probs: NDArray[np.floating], labels: NDArray[np.integer], n_bins: int = N_BINS
) -> float:
    """ECE of the top-class confidence over ``n_bins`` equal-width bins."""
    return reliability(probs, labels, n_bins).ece


def calibration_summary(
    raw: np.ndarray, labels: np.ndarray, temperature: float
) -> tuple[dict[str, Any], dict[str, Reliability], np.ndarray]:
    """ECE/NLL of raw and tempered probabilities → (JSON block, reliability curves, tempered probs)."""
    logits = log_probs(raw)
    tempered = scaled_probs(logits, temperature).astype(np.float32)
    raw_rel, cal_rel = reliability(raw, labels), reliability(tempered, labels)
    curves = {"raw (T = 1)": raw_rel, f"T = {temperature:.3f}": cal_rel}
    block = {
        "temperature": round(temperature, 4),
        "n_bins": N_BINS,
        "ece_raw": round(raw_rel.ece, 4),
        "ece_calibrated": round(cal_rel.ece, 4),
        "nll_raw": round(nll(logits, labels, 1.0), 4),
        "nll_calibrated": round(nll(logits, labels, temperature), 4),
    }
    return block, curves, tempered


def plot_reliability(
    curves: dict[str, Reliability], title: str = "Reliability (top-class confidence)"
) -> bytes:
    """Reliability diagram: per-bin accuracy against mean confidence, one line per curve
    (e.g. raw and temperature-scaled), with the ECE in the legend; PNG bytes."""
    def draw(ax: Any) -> None:
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
        for label, rel in curves.items():
            keep = rel.count > 0
            ax.plot(
                rel.confidence[keep], rel.accuracy[keep], marker="o", ms=3, lw=1.5,
                label=f"{label} (ECE {rel.ece:.4f})",
            )  # fmt: skip

    return unit_square_png(
        draw, "Mean confidence of the predicted class", "Accuracy", title, "upper left", inches=5.5
    )

"""Classifier metrics as in the seed paper: Table 3 (per class, one-vs-rest), Table 4, Fig. 1.

Per class: sensitivity TP/(TP+FN), specificity TN/(TN+FP), AUC (scikit-learn
``roc_auc_score``), accuracy (TP+TN)/N, PPV TP/(TP+FP), NPV TN/(TN+FN), F1 2TP/(2TP+FP+FN)
and average precision (``average_precision_score``). A ratio whose denominator is zero
is undefined and reported as ``None`` (NaN in CSV, "n/a" in Markdown) with a note saying
why — e.g. PPV of a class that was never predicted, or sensitivity / AUC / AP of a class
absent from the ground truth. Overall: accuracy, balanced accuracy (mean sensitivity over
classes present in the ground truth), macro F1 (over classes whose F1 is defined) and the
confusion matrix (rows = truth, columns = prediction).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    roc_curve,
)

from wsiflow.atomic import atomic_write_bytes

PER_CLASS_FIELDS = ("sensitivity", "specificity", "auc", "accuracy", "ppv", "npv", "f1", "average_precision")
_HEAD = {
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "auc": "AUC",
    "accuracy": "Accuracy",
    "ppv": "PPV",
    "npv": "NPV",
    "f1": "F1",
    "average_precision": "AP",
}


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


@dataclass(frozen=True)
class ClassMetrics:
    code: str
    support: int
    predicted: int
    tp: int
    fp: int
    fn: int
    tn: int
    sensitivity: float | None
    specificity: float | None
    auc: float | None
    accuracy: float
    ppv: float | None
    npv: float | None
    f1: float | None
    average_precision: float | None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class ClassificationReport:
    classes: tuple[str, ...]
    n: int
    accuracy: float
    balanced_accuracy: float | None
    macro_f1: float | None
    confusion: np.ndarray
    per_class: tuple[ClassMetrics, ...]
    notes: tuple[str, ...] = ()
    roc: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "n": self.n,
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
            "confusion_matrix": self.confusion.tolist(),
            "per_class": [m.to_dict() for m in self.per_class],
            "notes": list(self.notes),
        }

    def per_class_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["class", "support", "predicted", "tp", "fp", "fn", "tn", *PER_CLASS_FIELDS])
        for m in self.per_class:
            vals = [getattr(m, f) for f in PER_CLASS_FIELDS]
            w.writerow(
                [
                    m.code,
                    m.support,
                    m.predicted,
                    m.tp,
                    m.fp,
                    m.fn,
                    m.tn,
                    *("nan" if v is None else f"{v:.6f}" for v in vals),
                ]
            )
        return buf.getvalue()

    def confusion_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["true \\ predicted", *self.classes])
        for code, row in zip(self.classes, self.confusion, strict=True):
            w.writerow([code, *(int(v) for v in row)])
        return buf.getvalue()

    def to_markdown(self, title: str = "Classifier evaluation") -> str:
        def f(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        lines = [f"## {title}", ""]
        lines.append(
            f"n = {self.n}; accuracy **{f(self.accuracy)}**; balanced accuracy {f(self.balanced_accuracy)}; "
            f"macro F1 **{f(self.macro_f1)}**"
        )
        lines += ["", "### Per class, one-vs-rest (Table 3)", ""]
        lines.append("| Class | n | " + " | ".join(_HEAD[k] for k in PER_CLASS_FIELDS) + " |")
        lines.append("|---|---:|" + "---:|" * len(PER_CLASS_FIELDS))
        for m in self.per_class:
            lines.append(
                f"| {m.code} | {m.support} | " + " | ".join(f(getattr(m, k)) for k in PER_CLASS_FIELDS) + " |"
            )
        lines += ["", "### Confusion matrix (Table 4; rows = truth, columns = prediction)", ""]
        lines.append("| true \\ pred | " + " | ".join(self.classes) + " |")
        lines.append("|---|" + "---:|" * len(self.classes))
        for code, row in zip(self.classes, self.confusion, strict=True):
            lines.append(f"| {code} | " + " | ".join(str(int(v)) for v in row) + " |")
        if self.notes:
            lines += ["", "Notes:", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines) + "\n"


def classification_report(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    y_pred: Sequence[int] | np.ndarray | None = None,
) -> ClassificationReport:
    """Metrics for integer labels ``y_true`` and scores ``probs`` (n, K); ``y_pred`` = argmax by default."""
    yt = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    if p.ndim != 2 or p.shape != (len(yt), k):
        raise ValueError(f"probs must have shape ({len(yt)}, {k}), got {p.shape}")
    yp = np.asarray(y_pred, dtype=np.int64) if y_pred is not None else p.argmax(1)
    n = len(yt)
    labels = np.arange(k)
    cm = confusion_matrix(yt, yp, labels=labels)
    notes: list[str] = []
    per: list[ClassMetrics] = []
    roc: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, code in enumerate(classes):
        tp = int(cm[i, i])
        fn = int(cm[i].sum() - tp)
        fp = int(cm[:, i].sum() - tp)
        tn = int(n - tp - fn - fp)
        pos = yt == i
        auc = ap = None
        if 0 < pos.sum() < n:
            auc = float(roc_auc_score(pos, p[:, i]))
            ap = float(average_precision_score(pos, p[:, i]))
            fpr, tpr, _ = roc_curve(pos, p[:, i])
            roc[code] = (fpr, tpr)
        if pos.sum() == 0:
            notes.append(f"{code}: absent from the ground truth; sensitivity, AUC and AP are undefined")
        elif pos.sum() == n:
            notes.append(f"{code}: every sample is this class; specificity and AUC are undefined")
        if tp + fp == 0:
            notes.append(f"{code}: never predicted; PPV is undefined")
        m = ClassMetrics(
            code=str(code),
            support=tp + fn,
            predicted=tp + fp,
            tp=tp,
            fp=fp,
            fn=fn,
            tn=tn,
            sensitivity=_ratio(tp, tp + fn),
            specificity=_ratio(tn, tn + fp),
            auc=auc,
            accuracy=float((tp + tn) / n) if n else math.nan,
            ppv=_ratio(tp, tp + fp),
            npv=_ratio(tn, tn + fn),
            f1=_ratio(2 * tp, 2 * tp + fp + fn),
            average_precision=ap,
        )
        per.append(m)
    present = [i for i in range(k) if per[i].support > 0]
    defined_f1 = [i for i in range(k) if per[i].f1 is not None]
    macro = (
        float(f1_score(yt, yp, labels=defined_f1, average="macro", zero_division=0)) if defined_f1 else None
    )
    bal: float | None = None
    if present and set(np.unique(yp).tolist()) <= set(present):
        bal = float(balanced_accuracy_score(yt, yp))
    elif present:  # predictions include classes absent from the truth: sklearn warns; same definition
        bal = float(np.mean([per[i].sensitivity or 0.0 for i in present]))
    return ClassificationReport(
        classes=tuple(str(c) for c in classes),
        n=n,
        accuracy=float((yt == yp).mean()) if n else math.nan,
        balanced_accuracy=bal,
        macro_f1=macro,
        confusion=cm,
        per_class=tuple(per),
        notes=tuple(notes),
        roc=roc,
    )


def unit_square_png(
    draw: Callable[[Any], None], xlabel: str, ylabel: str, title: str, legend_loc: str, inches: float = 6.0
) -> bytes:
    """A PNG of curves on the unit square with the grey diagonal (ROC, reliability), drawn by
    ``draw(ax)`` without pyplot (no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(inches, inches), dpi=120)
    FigureCanvasAgg(fig)
    ax: Any = fig.add_subplot(1, 1, 1)
    draw(ax)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc=legend_loc, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_roc(report: ClassificationReport, path: Path, title: str = "ROC, one-vs-rest") -> None:
    """ROC curves per class (Fig. 1) as a PNG."""
    auc_by = {m.code: m.auc for m in report.per_class}

    def draw(ax: Any) -> None:
        for code, (fpr, tpr) in report.roc.items():
            ax.plot(fpr, tpr, lw=1.5, label=f"{code} (AUC {auc_by[code]:.3f})")
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)

    png = unit_square_png(draw, "1 - specificity", "Sensitivity", title, "lower right")
    atomic_write_bytes(path, png, fsync=False, mkdir=True)


def write_report(
    report: ClassificationReport,
    out_dir: Path,
    extra: dict[str, Any] | None = None,
    title: str = "Classifier evaluation",
) -> dict[str, Path]:
    """Write metrics.json, per_class.csv, confusion_matrix.csv, report.md and roc.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "metrics.json",
        "per_class": out_dir / "per_class.csv",
        "confusion": out_dir / "confusion_matrix.csv",
        "markdown": out_dir / "report.md",
        "roc": out_dir / "roc.png",
    }
    payload = {**(extra or {}), **report.to_dict()}
    atomic_write_bytes(
        paths["json"], orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    atomic_write_bytes(paths["per_class"], report.per_class_csv().encode())
    atomic_write_bytes(paths["confusion"], report.confusion_csv().encode())
    atomic_write_bytes(paths["markdown"], report.to_markdown(title).encode())
    plot_roc(report, paths["roc"])
    return paths

"""Compare a run's cells with a generated slide's truth.

Matching (:func:`wsiflow.matching.match_centroids`): every true cell has a gate of
``gate · r`` around its centroid (``r`` its equivalent radius, √(area/π)); a detection whose
centroid lies inside the gate is a candidate. Candidates are assigned one-to-one minimising
total centroid distance (``scipy.optimize.linear_sum_assignment`` per connected group of
candidates, so a million cells never make one dense matrix). Then:

* precision = matched / detections, recall = matched / true cells;
* a **duplicate** is an unmatched detection whose centroid lies within ``dup_gate · r`` of
  a true cell that is already matched (two detections of one cell); it also counts as a
  false positive;
* the confusion matrix counts matched pairs (rows: true class, columns: predicted);
* fraction errors: per lineage dysplastic / (normal + dysplastic) and blast % of all
  nucleated cells, measured over all detections (what the run reports) vs the truth.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from wsiflow.aggregate import SlideSummary
from wsiflow.errors import OutputError
from wsiflow.matching import GATE, match_centroids
from wsiflow.synth.cells import CLASS_CODES, LINEAGE_OF
from wsiflow.synth.layout import LINEAGES
from wsiflow.writers.record import SlideRecord

DUP_GATE = 1.0


@dataclass(frozen=True)
class Truth:
    x: NDArray[np.float64]
    y: NDArray[np.float64]
    radius: NDArray[np.float64]  # equivalent radius, level-0 px
    code: tuple[str, ...]
    summary: dict[str, Any]


@dataclass(frozen=True)
class Detections:
    x: NDArray[np.float64]
    y: NDArray[np.float64]
    code: tuple[str, ...]  # predicted class code ("" when unclassified)
    summary: SlideSummary | None = None  # the run's summary.json (SlideRecord.summary), when found
    source: str = ""


@dataclass(frozen=True)
class Comparison:
    n_true: int
    n_pred: int
    matched: int
    missed: int
    false_positives: int
    duplicates: int
    precision: float
    recall: float
    f1: float
    classes: tuple[str, ...]
    confusion: NDArray[np.int64]  # (K, K): true × predicted, over matched pairs
    accuracy: float  # classification accuracy over matched pairs
    fractions: dict[str, dict[str, Any]]
    pairs: NDArray[np.int64]  # (m, 2): true index, detection index

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_true": self.n_true,
            "n_pred": self.n_pred,
            "matched": self.matched,
            "missed": self.missed,
            "false_positives": self.false_positives,
            "duplicates": self.duplicates,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "classification_accuracy": self.accuracy,
            "classes": list(self.classes),
            "confusion": self.confusion.tolist(),
            "fractions": self.fractions,
        }


def _lineage_fractions(codes: Sequence[str]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for lin in LINEAGES:
        n = sum(1 for c in codes if LINEAGE_OF.get(c) == lin)
        d = sum(1 for c in codes if LINEAGE_OF.get(c) == lin and c.endswith("D"))
        out[lin] = (d, n)
    return out


def compare(truth: Truth, det: Detections, gate: float = GATE, dup_gate: float = DUP_GATE) -> Comparison:
    pairs = match_centroids(truth.x, truth.y, truth.radius, det.x, det.y, gate)
    nt, npred, m = len(truth.x), len(det.x), len(pairs)
    # duplicates: unmatched detections near an already matched true cell
    dups = 0
    if m and npred > m:
        un = np.setdiff1d(np.arange(npred), pairs[:, 1])
        mt = pairs[:, 0]
        tree = cKDTree(np.column_stack([truth.x[mt], truth.y[mt]]))
        dd, k = tree.query(np.column_stack([det.x[un], det.y[un]]), k=min(4, m))
        dd, k = np.atleast_2d(dd.T).T, np.atleast_2d(k.T).T
        within = dd <= dup_gate * truth.radius[mt][np.minimum(k, m - 1)]
        dups = int(np.count_nonzero(within.any(axis=1)))
    classes = tuple(CLASS_CODES) + tuple(sorted({c for c in det.code if c not in CLASS_CODES and c}))
    idx = {c: i for i, c in enumerate(classes)}
    conf = np.zeros((len(classes), len(classes)), np.int64)
    for t, p in pairs:
        pc = det.code[p]
        if pc in idx and truth.code[t] in idx:
            conf[idx[truth.code[t]], idx[pc]] += 1
    precision = m / npred if npred else 0.0
    recall = m / nt if nt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    acc = float(np.trace(conf) / m) if m else 0.0

    fr: dict[str, dict[str, Any]] = {}
    tf, pf = _lineage_fractions(truth.code), _lineage_fractions(det.code)
    run_lin = {item.lineage: item for item in det.summary.lineages} if det.summary else {}
    for lin in LINEAGES:
        (td, tn), (pd, pn) = tf[lin], pf[lin]
        t = td / tn if tn else None
        p = pd / pn if pn else None
        row: dict[str, Any] = {
            "truth": t,
            "measured": p,
            "truth_n": tn,
            "measured_n": pn,
            "error": (p - t) if p is not None and t is not None else None,
        }
        if lin in run_lin:
            lo, hi = run_lin[lin].ci_low, run_lin[lin].ci_high
            row.update(ci_low=lo, ci_high=hi, flag=run_lin[lin].flag)
            if lo is not None and hi is not None and t is not None:
                row["truth_in_ci"] = bool(lo <= t <= hi)
        fr[lin] = row
    tb = sum(1 for c in truth.code if c == "blast")
    pb = sum(1 for c in det.code if c == "blast")
    # the blast % over the run's own denominator (DESIGN §5): without megakaryocytes by default
    rule = det.summary.denominator_rule if det.summary else None
    left_out = {"MN", "MD"} if rule == "nucleated-without-megakaryocytes" else set()
    nt_den = sum(1 for c in truth.code if c not in left_out)
    n_nuc_pred = sum(1 for c in det.code if c and c not in left_out)
    t = tb / nt_den if nt_den else None
    p = pb / n_nuc_pred if n_nuc_pred else None
    brow: dict[str, Any] = {
        "truth": t,
        "measured": p,
        "error": (p - t) if p is not None and t is not None else None,
    }
    if det.summary and det.summary.blast is not None:
        b = det.summary.blast
        brow.update(ci_low=b.ci_low, ci_high=b.ci_high, band=b.band)
        if b.ci_low is not None and b.ci_high is not None and t is not None:
            brow["truth_in_ci"] = bool(b.ci_low <= t <= b.ci_high)
    fr["blast"] = brow
    return Comparison(
        n_true=nt,
        n_pred=npred,
        matched=m,
        missed=nt - m,
        false_positives=npred - m,
        duplicates=dups,
        precision=precision,
        recall=recall,
        f1=f1,
        classes=classes,
        confusion=conf,
        accuracy=acc,
        fractions=fr,
        pairs=pairs,
    )


# --------------------------------------------------------------------------- loading


def truth_geojson_for(path: str | os.PathLike[str]) -> Path:
    """The truth GeoJSON for a slide, a ``.truth.json`` or a ``.truth.geojson`` path."""
    p = Path(path)
    name = p.name
    if name.endswith(".truth.geojson"):
        cand = p
    elif name.endswith(".truth.json"):
        cand = p.with_name(name[: -len(".truth.json")] + ".truth.geojson")
    else:
        stem = name[: -len(p.suffix)] if p.suffix else name
        cand = p.with_name(stem + ".truth.geojson")
    if not cand.is_file():
        raise OutputError(f"{path}: no truth file found (looked for {cand.name})")
    return cand


def load_truth(path: str | os.PathLike[str]) -> Truth:
    gj = truth_geojson_for(path)
    try:
        data = orjson.loads(gj.read_bytes())
        feats = data["features"]
        x = np.array([f["properties"]["x"] for f in feats], np.float64)
        y = np.array([f["properties"]["y"] for f in feats], np.float64)
        mpp_area = np.array([f["properties"]["area_um2"] for f in feats], np.float64)
        code = tuple(str(f["properties"]["code"]) for f in feats)
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise OutputError(f"{gj}: not a wsiflow truth GeoJSON ({exc})") from None
    js = gj.with_name(gj.name[: -len(".truth.geojson")] + ".truth.json")
    summary: dict[str, Any] = orjson.loads(js.read_bytes()) if js.is_file() else {}
    mpp = float(summary.get("mpp", 0.25))
    radius = np.sqrt(mpp_area / math.pi) / mpp
    return Truth(x, y, radius, code, summary)


def _codes_from_attrs(attrs: Mapping[str, Any]) -> tuple[str, ...] | None:
    for key in ("taxonomy", "classes"):
        tax = attrs.get(key)
        if isinstance(tax, list) and tax:
            if all(isinstance(t, dict) and "code" in t for t in tax):
                return tuple(str(t["code"]) for t in tax)
            if all(isinstance(t, str) for t in tax):
                return tuple(tax)
    pipe = attrs.get("pipeline")
    if isinstance(pipe, dict):
        return _codes_from_attrs(pipe)
    return None


def find_slide_dir(out: str | os.PathLike[str], slide_stem: str | None = None) -> Path:
    """``OUT/<slide>`` holding cells.zarr or cells.geojson.gz (``OUT`` itself if it holds them)."""
    root = Path(out)

    def has(p: Path) -> bool:
        return (p / "cells.zarr").exists() or (p / "cells.geojson.gz").exists()

    if has(root):
        return root
    if slide_stem and has(root / slide_stem):
        return root / slide_stem
    dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and has(d)] if root.is_dir() else []
    if len(dirs) == 1:
        return dirs[0]
    if not dirs:
        raise OutputError(f"{out}: no cells.zarr or cells.geojson.gz found")
    raise OutputError(f"{out}: several slides ({', '.join(d.name for d in dirs)}); name one: OUT/<slide>")


def load_detections(slide_dir: str | os.PathLike[str]) -> Detections:
    d = Path(slide_dir)
    record = SlideRecord.load(d / "summary.json") if (d / "summary.json").is_file() else None
    summary = record.summary if record is not None else None
    if (d / "cells.zarr").exists():
        from wsiflow.writers.zarr_store import CellStore

        store = CellStore.open(d / "cells.zarr")  # read-only: nothing is rolled back
        cols = store.read_columns(("x", "y", "class_id"))
        codes = _codes_from_attrs(store.attrs)
        if codes is None:
            from wsiflow.config import load_pipeline

            codes = load_pipeline("mds").class_codes
        cid = cols["class_id"].astype(int)
        code = tuple(codes[c] if 0 <= c < len(codes) else "" for c in cid)
        return Detections(cols["x"].copy(), cols["y"].copy(), code, summary, str(d / "cells.zarr"))
    gz = d / "cells.geojson.gz"
    from wsiflow.config import load_pipeline

    by_name = {c.name: c.code for c in load_pipeline("mds").taxonomy}
    with gzip.open(gz, "rb") as f:
        data = orjson.loads(f.read())
    xs, ys, cs = [], [], []
    for feat in data.get("features", []):
        ring = np.asarray(feat["geometry"]["coordinates"][0], np.float64)
        from wsiflow.synth.slide import polygon_area_centroid

        _, cx, cy = polygon_area_centroid(
            ring[:-1] if len(ring) > 1 and (ring[0] == ring[-1]).all() else ring
        )
        name = (feat.get("properties", {}).get("classification") or {}).get("name", "")
        xs.append(cx)
        ys.append(cy)
        cs.append(by_name.get(name, name))
    return Detections(np.array(xs), np.array(ys), tuple(cs), summary, str(gz))


def format_table(c: Comparison) -> str:
    """A plain-text report of a comparison."""
    lines = [
        f"cells: true {c.n_true}, detected {c.n_pred}, matched {c.matched}, missed {c.missed}, "
        f"false positives {c.false_positives} (duplicates {c.duplicates})",
        f"detection: precision {c.precision:.4f}  recall {c.recall:.4f}  F1 {c.f1:.4f}",
        f"classification accuracy on matched cells: {c.accuracy:.4f}",
        "",
        "confusion (rows: truth, columns: predicted)",
    ]
    w = max(6, *(len(k) for k in c.classes)) + 1
    lines.append(" " * w + "".join(k.rjust(w) for k in c.classes))
    for i, k in enumerate(c.classes):
        if c.confusion[i].sum() == 0 and c.confusion[:, i].sum() == 0:
            continue
        lines.append(k.ljust(w) + "".join(str(v).rjust(w) for v in c.confusion[i]))
    lines += ["", f"{'':16}{'truth':>9}{'measured':>10}{'error':>9}   95% interval"]

    def pct(v: Any) -> str:
        return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "—"

    for k, row in c.fractions.items():
        ci = ""
        if row.get("ci_low") is not None:
            inside = "truth inside" if row.get("truth_in_ci") else "truth OUTSIDE"
            ci = f"   [{pct(row['ci_low'])}, {pct(row['ci_high'])}] {inside}"
        err = row.get("error")
        e = f"{100 * err:+.1f}" if isinstance(err, float) else "—"
        lines.append(f"{k:16}{pct(row.get('truth')):>9}{pct(row.get('measured')):>10}{e:>9}{ci}")
    return "\n".join(lines)

"""The cohort page ``OUT/report.html``: one sortable row per slide, errors with their reasons.

Rows come from ``OUT/summary.csv`` (or, without it, from each slide folder's
``summary.json``); a slide's name links to its own page when that page exists.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsiflow._version import __version__
from wsiflow.atomic import atomic_write_bytes
from wsiflow.errors import OutputError
from wsiflow.writers.report_html import CELLS_NAME, REPORT_NAME, SUMMARY_NAME, now, read_json, render
from wsiflow.writers.summary import read_summary_csv
from wsiflow.writers.zarr_store import FORMAT

__all__ = ["find_slide_dirs", "write_cohort_report"]


def find_slide_dirs(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Sub-folders of ``out_dir`` holding a slide's results (summary.json or a cell store)."""
    root = Path(out_dir)
    found = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.is_dir() and ((p / SUMMARY_NAME).is_file() or _is_store(p / CELLS_NAME)):
            found.append(p)
    return found


def _is_store(path: Path) -> bool:
    try:
        return bool(read_json(path / "zarr.json").get("attributes", {}).get("format") == FORMAT)
    except OutputError:
        return False


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def write_cohort_report(out_dir: str | os.PathLike[str]) -> Path:
    """Write ``out_dir/report.html`` from ``summary.csv`` (or the slide folders); returns its path."""
    root = Path(out_dir)
    if not root.is_dir():
        raise OutputError(f"{root}: no such output folder")
    cols, rows = read_summary_csv(root / "summary.csv")
    if not rows:  # no CSV: one row per slide folder, from its summary.json
        for d in find_slide_dirs(root):
            if (d / SUMMARY_NAME).is_file():
                doc = read_json(d / SUMMARY_NAME)
                s = doc.get("summary") or {}
                row = {
                    "slide": (doc.get("slide") or {}).get("name", d.name),
                    "path": (doc.get("slide") or {}).get("path", ""),
                    "output": str(d),
                    "status": s.get("status", ""),
                    "error": s.get("error") or "",
                }
                row |= _flat_from_summary(s)
                rows.append({k: "" if v is None else str(v) for k, v in row.items()})
        cols = list(dict.fromkeys(k for r in rows for k in r))
    if not rows:
        raise OutputError(f"{root}: no summary.csv and no slide results here")

    lineages = [c[: -len("_dysplastic_pct")] for c in cols if c.endswith("_dysplastic_pct")]
    class_cols = [
        c for c in cols if c.startswith("n_") and c not in ("n_cells", "n_nucleated", "n_unclassified")
    ]
    has_blast = "blast_pct" in cols
    table = []
    errors = []
    for r in rows:
        status = r.get("status", "")
        out = r.get("output", "")
        name = Path(out).name if out else ""
        link = f"{name}/{REPORT_NAME}" if name and (root / name / REPORT_NAME).is_file() else None
        flags = []
        if status == "error":
            errors.append(
                {
                    "slide": r.get("slide") or r.get("path"),
                    "path": r.get("path", ""),
                    "error": r.get("error", ""),
                }
            )
        if r.get("adequate_cells") == "false":
            flags.append(("warn", "too few cells"))
        if r.get("adequate_megakaryocytes") == "false" and lineages:
            flags.append(("warn", "too few megakaryocytes"))
        failed = _float(r.get("failed_tiles"))
        if failed:
            flags.append(("warn", f"{int(failed)} tile(s) failed"))
        lin_cells = []
        for lin in lineages:
            v = _float(r.get(f"{lin}_dysplastic_pct"))
            lo, hi = _float(r.get(f"{lin}_ci_low_pct")), _float(r.get(f"{lin}_ci_high_pct"))
            lin_cells.append({"value": v, "lo": lo, "hi": hi, "flag": r.get(f"{lin}_flag", "")})
        table.append(
            {
                "slide": r.get("slide") or Path(r.get("path", "")).name,
                "path": r.get("path", ""),
                "link": link,
                "status": status,
                "error": r.get("error", ""),
                "n_cells": _float(r.get("n_cells")),
                "lineages": lin_cells,
                "blast": _float(r.get("blast_pct")),
                "blast_band": r.get("blast_band", ""),
                "megakaryocytes": _float(r.get("megakaryocytes")),
                "classes": [_float(r.get(c)) for c in class_cols],
                "flags": flags,
            }
        )
    n_status: dict[str, int] = {}
    for t in table:
        st = str(t["status"])
        n_status[st] = n_status.get(st, 0) + 1
    pipelines = sorted({r.get("pipeline", "") for r in rows if r.get("pipeline")})
    ctx = {
        "title": f"wsiflow cohort report — {root.name}",
        "rows": table,
        "lineages": lineages,
        "class_cols": [c[2:] for c in class_cols],
        "has_blast": has_blast,
        "errors": errors,
        "n_status": sorted(n_status.items()),
        "pipelines": pipelines,
        "out_dir": str(root.resolve()),
        "version": __version__,
        "generated": now(),
    }
    target = root / REPORT_NAME
    atomic_write_bytes(target, render("cohort.html.j2", **ctx))
    return target


def _flat_from_summary(s: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {k: s.get(k) for k in ("n_cells", "megakaryocytes", "failed_tiles")}
    for k in ("adequate_cells", "adequate_megakaryocytes"):
        if k in s:
            row[k] = "true" if s[k] else "false"
    b = s.get("blast") or {}
    if b:
        row["blast_pct"] = None if b.get("fraction") is None else b["fraction"] * 100
        row["blast_band"] = b.get("band") or ""
    for lin in s.get("lineages") or []:
        n = lin["lineage"]
        for key, src in (
            ("dysplastic_pct", "fraction"),
            ("ci_low_pct", "ci_low"),
            ("ci_high_pct", "ci_high"),
        ):
            row[f"{n}_{key}"] = None if lin.get(src) is None else lin[src] * 100
        row[f"{n}_flag"] = lin.get("flag", "")
    for c in s.get("classes") or []:
        row[f"n_{c['code']}"] = c.get("count")
    return row

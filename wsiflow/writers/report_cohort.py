"""The cohort page ``OUT/report.html``: one sortable row per slide, errors with their reasons.

Rows come from ``OUT/summary.csv`` (or, without it, from each slide folder's
``summary.json``); a slide's name links to its own page when that page exists.
"""

from __future__ import annotations

import os
from pathlib import Path

from wsiflow._version import __version__
from wsiflow.atomic import atomic_write_bytes, read_json_object
from wsiflow.errors import OutputError
from wsiflow.writers.record import SlideRecord, SummaryRow
from wsiflow.writers.report_html import CELLS_NAME, REPORT_NAME, SUMMARY_NAME, now, render
from wsiflow.writers.summary import csv_cell, read_summary_csv
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
        return bool(read_json_object(path / "zarr.json").get("attributes", {}).get("format") == FORMAT)
    except OutputError:
        return False


def write_cohort_report(out_dir: str | os.PathLike[str]) -> Path:
    """Write ``out_dir/report.html`` from ``summary.csv`` (or the slide folders); returns its path."""
    root = Path(out_dir)
    if not root.is_dir():
        raise OutputError(f"{root}: no such output folder")
    cols, raw = read_summary_csv(root / "summary.csv")
    if not raw:  # no CSV: one row per slide folder, from its summary.json (the same columns)
        for d in find_slide_dirs(root):
            if (d / SUMMARY_NAME).is_file():
                record = SlideRecord.from_json(read_json_object(d / SUMMARY_NAME), output=str(d))
                row = record.to_row()
                row["slide"] = row["slide"] or d.name
                raw.append({k: csv_cell(v) for k, v in row.items()})
        cols = list(dict.fromkeys(k for r in raw for k in r))
    if not raw:
        raise OutputError(f"{root}: no summary.csv and no slide results here")
    rows = [SummaryRow.from_csv(r, cols) for r in raw]

    lineages = SummaryRow.lineage_names(cols)
    class_codes = SummaryRow.class_codes(cols)
    has_blast = "blast_pct" in cols
    table = []
    errors = []
    for r in rows:
        name = Path(r.output).name if r.output else ""
        link = f"{name}/{REPORT_NAME}" if name and (root / name / REPORT_NAME).is_file() else None
        flags = []
        if r.status == "error":
            errors.append({"slide": r.slide or r.path, "path": r.path, "error": r.error})
        if r.adequate_cells is False:
            flags.append(("warn", "too few cells"))
        if r.adequate_megakaryocytes is False and lineages:
            flags.append(("warn", "too few megakaryocytes"))
        if r.failed_tiles:
            flags.append(("warn", f"{int(r.failed_tiles)} tile(s) failed"))
        lin_cells = [
            {"value": c.value, "lo": c.lo, "hi": c.hi, "flag": c.flag}
            for c in (r.lineages[lin] for lin in lineages)
        ]
        table.append(
            {
                "slide": r.slide or Path(r.path).name,
                "path": r.path,
                "link": link,
                "status": r.status,
                "error": r.error,
                "n_cells": r.n_cells,
                "lineages": lin_cells,
                "blast": r.blast_pct,
                "blast_band": r.blast_band,
                "megakaryocytes": r.megakaryocytes,
                "classes": [r.class_counts[c] for c in class_codes],
                "flags": flags,
            }
        )
    n_status: dict[str, int] = {}
    for t in table:
        st = str(t["status"])
        n_status[st] = n_status.get(st, 0) + 1
    pipelines = sorted({r.pipeline for r in rows if r.pipeline})
    ctx = {
        "title": f"wsiflow cohort report — {root.name}",
        "rows": table,
        "lineages": lineages,
        "class_cols": class_codes,
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


"""Per-slide ``summary.json`` and the run's ``summary.csv`` (one row per slide), atomic.

``summary.csv`` is rewritten whole (temp file + rename) on every update, so a reader never
sees half a row. Columns: ``SUMMARY_BASE_COLUMNS`` first in a fixed order, then any other
columns in the order they first appear; a slide that failed gets status "error" and its
one-line reason in ``error``, the other columns empty.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from wsiflow.atomic import atomic_write_bytes, output_error
from wsiflow.writers.record import SUMMARY_BASE_COLUMNS

__all__ = [
    "SUMMARY_BASE_COLUMNS",
    "csv_cell",
    "read_summary_csv",
    "update_summary_csv",
    "write_summary_csv",
    "write_summary_json",
]


Row = Mapping[str, Any]


def write_summary_json(path: str | os.PathLike[str], summary: Mapping[str, Any]) -> None:
    """Write one slide's summary as indented JSON (numpy scalars allowed), atomically."""
    data = orjson.dumps(
        summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    )
    atomic_write_bytes(path, data + b"\n")


def csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if v == v else ""
    return str(v)


def _columns(rows: Sequence[Row], extra_order: Sequence[str] = ()) -> list[str]:
    cols = list(SUMMARY_BASE_COLUMNS)
    for name in (*extra_order, *(k for r in rows for k in r)):
        if name not in cols:
            cols.append(name)
    return cols


def write_summary_csv(path: str | os.PathLike[str], rows: Sequence[Row], columns: Sequence[str] = ()) -> None:
    """Write all rows (one per slide) atomically; ``columns`` fixes the order of extra columns."""
    cols = _columns(rows, columns)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([csv_cell(r.get(c)) for c in cols])
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def read_summary_csv(path: str | os.PathLike[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows (as strings) of an existing summary.csv; empty if absent."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        raise output_error(p, exc) from exc
    reader = csv.DictReader(io.StringIO(text))
    return list(reader.fieldnames or []), [dict(r) for r in reader]


def update_summary_csv(path: str | os.PathLike[str], row: Row, key: str = "output") -> None:
    """Insert or replace the row whose ``key`` column matches, keeping the others, atomically."""
    if key not in row:
        raise ValueError(f"row needs a {key!r} value")
    cols, rows = read_summary_csv(path)
    new = {k: csv_cell(v) for k, v in row.items()}
    out: list[Row] = []
    replaced = False
    for r in rows:
        if r.get(key) == new[key]:
            if not replaced:
                out.append(new)
                replaced = True
        else:
            out.append(r)
    if not replaced:
        out.append(new)
    write_summary_csv(path, out, [c for c in cols if c])

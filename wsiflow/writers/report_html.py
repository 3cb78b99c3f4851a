"""Jinja2 rendering for the reports: templates shipped in the package, autoescape on."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from importlib import resources
from typing import Any

__all__ = [
    "CELLS_NAME",
    "REPORT_NAME",
    "SUMMARY_NAME",
    "hex_color",
    "now",
    "num",
    "pct",
    "render",
]

_TEMPLATES = "templates"
REPORT_NAME = "report.html"
SUMMARY_NAME = "summary.json"
CELLS_NAME = "cells.zarr"


def environment() -> Any:
    import jinja2

    root = resources.files("wsiflow.writers").joinpath(_TEMPLATES)

    def load(name: str) -> str | None:
        entry = root.joinpath(name)
        return entry.read_text(encoding="utf-8") if entry.is_file() else None

    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(load),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = pct
    env.filters["num"] = num
    return env


def pct(v: Any, digits: int = 1) -> str:
    if v is None or v == "":
        return "–"
    try:
        return f"{float(v) * 100:.{digits}f}%"
    except (TypeError, ValueError):
        return str(v)


def num(v: Any) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, int):
        return f"{v:,}".replace(",", "\u2009")
    return str(v)


def render(template: str, **context: Any) -> bytes:
    html = environment().get_template(template).render(**context)
    return html.encode("utf-8")


def now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def hex_color(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb[:3]))


"""``wsiflow info SLIDE...``: what each slide is and whether its pixels can be read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from wsiflow.cli._app import app, debug_enabled
from wsiflow.cli._logging import quiet_readers

_COLUMNS = ("slide", "format", "size", "levels", "mpp", "vendor", "objective", "readable", "backend")


@app.command()
def info(
    slides: list[str] = typer.Argument(..., help="Slide files (or fsspec URLs).", show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print JSON (a list, one object per slide)."),
    mpp: float | None = typer.Option(None, "--mpp", help="Use this µm/px instead of the metadata."),
    backend: str = typer.Option("auto", "--backend", help="auto, openslide or tiffslide."),
) -> None:
    """Show each slide's format, size, pyramid levels, µm/px, vendor and readability.

    A slide that cannot be opened or read gets one line on stderr; the others still print.
    Exit code 1 if any slide failed.
    """
    import orjson

    quiet_readers(debug_enabled())  # libraries log what we already report in one line
    records = [_describe(s, mpp, backend) for s in slides]
    failed = False
    for rec in records:
        if rec["error"]:
            failed = True
            typer.echo(f"wsiflow: {rec['path']}: {rec['error']}", err=True)
    if json_out:
        typer.echo(orjson.dumps(records, option=orjson.OPT_INDENT_2).decode())
    else:
        rows = [_row(r) for r in records if r["format"] is not None]
        if rows:
            typer.echo(_table(rows))
    if failed:
        raise typer.Exit(code=1)


def _describe(path: str, mpp: float | None, backend: str) -> dict[str, Any]:
    from wsiflow.errors import SlideError, WsiflowError
    from wsiflow.slide import open_slide

    rec: dict[str, Any] = {"path": path, "format": None, "error": None, "readable": False}
    try:
        with open_slide(path, backend=backend, mpp=mpp) as slide:
            rec.update(
                format=slide.format,
                vendor=slide.vendor,
                backend=slide.backend,
                dimensions=list(slide.dimensions),
                level_count=slide.level_count,
                level_dimensions=[list(d) for d in slide.level_dimensions],
                level_downsamples=[round(d, 4) for d in slide.level_downsamples],
                mpp=slide.mpp,
                mpp_source=slide.mpp_source,
                mpp_note=slide.mpp_note,
                objective_power=slide.objective_power,
                associated_images=list(slide.associated_images),
            )
            w, h = slide.dimensions
            side = 256
            try:
                slide.read_scaled(max(0, w // 2 - side // 2), max(0, h // 2 - side // 2), side, side, 1.0)
                rec["readable"] = True
            except SlideError as exc:
                rec["error"] = exc.reason
    except WsiflowError as exc:
        rec["error"] = getattr(exc, "reason", str(exc))
    except Exception as exc:
        if debug_enabled():
            raise
        rec["error"] = (
            f"unexpected error: {' '.join(str(exc).split()) or type(exc).__name__} ({type(exc).__name__})"
        )
    return rec


def _row(r: dict[str, Any]) -> tuple[str, ...]:
    ds = ", ".join(f"{d:g}" for d in r["level_downsamples"])
    mpp = f"{r['mpp']:.4g}" if r["mpp"] is not None else "none"
    if r["mpp_source"] == "override":
        mpp += " (--mpp)"
    elif r["mpp_note"]:
        mpp += " (metadata implausible)"
    obj = f"{r['objective_power']:g}x" if r["objective_power"] else "-"
    return (
        Path(r["path"]).name or r["path"],
        r["format"],
        f"{r['dimensions'][0]}x{r['dimensions'][1]}",
        f"{r['level_count']} ({ds})",
        mpp,
        r["vendor"] or "-",
        obj,
        "yes" if r["readable"] else "no",
        r["backend"],
    )


def _table(rows: list[tuple[str, ...]]) -> str:
    header = tuple(c.upper() for c in _COLUMNS)
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in [header, *rows]
    ]
    return "\n".join(lines)

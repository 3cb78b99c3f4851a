"""``wsiflow report OUT``: rebuild the HTML reports from a run's saved results (no rerun)."""

from __future__ import annotations

from pathlib import Path

import typer

from wsiflow.cli._app import app


@app.command()
def report(
    out: Path = typer.Argument(
        ..., help="Output folder of `wsiflow run` (holds summary.csv and one folder per slide)."
    ),
    slides: list[Path] = typer.Option(
        [], "--slides", help="Folder to look in for slides moved since the run (by file name; repeatable)."
    ),
    per_class: int = typer.Option(
        6, "--per-class", min=0, max=50, help="Gallery cells per class and kind (most confident, borderline)."
    ),
) -> None:
    """Regenerate OUT/report.html and OUT/<slide>/report.html from cells.zarr and the summaries.

    Pixels (thumbnail, zoomed region, gallery crops) are read from the slide files recorded
    in the results; a slide that cannot be found is reported without them, and the page says so.
    """
    from wsiflow.errors import OutputError, WsiflowError
    from wsiflow.writers.report import find_slide_dirs, write_cohort_report, write_slide_report

    if not out.is_dir():
        raise OutputError(f"{out}: no such output folder")
    dirs = find_slide_dirs(out)
    failed = 0
    for d in dirs:
        try:
            page = write_slide_report(d, search=slides, per_kind=per_class)
        except WsiflowError as exc:  # one bad folder must not stop the others
            failed += 1
            typer.echo(f"wsiflow: {' '.join(str(exc).split())}", err=True)
            continue
        typer.echo(f"{page}")
    if not dirs and not (out / "summary.csv").is_file():
        raise OutputError(
            f"{out}: no summary.csv and no slide results here (is it a `wsiflow run` output folder?)"
        )
    typer.echo(f"{write_cohort_report(out)}")
    if failed:
        raise typer.Exit(1)

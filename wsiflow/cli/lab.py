"""``wsiflow review`` and ``wsiflow harvest``: the lab's labelling loop with QuPath."""

from __future__ import annotations

from pathlib import Path

import typer

from wsiflow.cli._app import app


@app.command()
def review(
    results: Path = typer.Argument(..., help="The output folder of `wsiflow run`."),
    out: Path = typer.Option(..., "-o", "--out", help="Folder for the review files."),
    n: int = typer.Option(300, "--n", help="Cells to pick across all slides."),
    strategy: str = typer.Option("uncertain", "--strategy", help="uncertain | stratified | random"),
    per_class: int | None = typer.Option(None, "--per-class", help="At most this many per slide and class."),
    seed: int = typer.Option(0, "--seed"),
    gallery: bool = typer.Option(True, "--gallery/--no-gallery", help="Write gallery.html with the crops."),
) -> None:
    """Pick the cells worth a hematologist's time; write them per slide for QuPath."""
    from wsiflow.train.review import write_review

    meta = write_review(results, out, n, strategy, per_class, seed, gallery)
    for s in meta["slides"]:
        typer.echo(f"{out / s['geojson']}: {len(s['cell_ids'])} cells ({s['key']})")
    typer.echo(
        f"{meta['n_selected']} cells chosen ({strategy}). In QuPath: open each slide, drag its "
        "<slide>.geojson onto it, set the class of every cell, then File > Export objects as GeoJSON "
        "(keep the file name) and run `wsiflow harvest`.",
        err=True,
    )


@app.command()
def harvest(
    results: Path = typer.Argument(..., help="The output folder of the `wsiflow run` that was reviewed."),
    more: list[Path] | None = typer.Argument(
        None, help="More labels files (`--labels A B C` works).", show_default=False
    ),
    labels: list[Path] = typer.Option(
        [], "--labels", help="QuPath GeoJSON exports or id,label CSVs (files or a folder of them)."
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Harvest folder (appended to)."),
    map_: list[str] = typer.Option([], "--map", help="OLD=NEW: map a label to a class code (repeatable)."),
    radius_um: float = typer.Option(3.0, "--radius-um", help="Centroid match radius (no UUID)."),
) -> None:
    """Match the labels to their cells and write training crops cut as inference cuts them."""
    from wsiflow.train.harvest import harvest as run_harvest
    from wsiflow.train.harvest import parse_maps

    files: list[Path] = []
    for p in [*labels, *(more or [])]:
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.suffix.lower() in (".geojson", ".json", ".csv"))
        else:
            files.append(p)
    rep = run_harvest(results, files, out, parse_maps(map_), radius_um)
    d = rep.to_dict()
    typer.echo(
        f"{out / 'manifest.csv'}: {d['added']} cells added, {d['relabelled']} relabelled, "
        f"{d['unchanged']} unchanged; labels {d['per_label']}"
    )
    typer.echo(
        f"matched {d['matched_by_uuid']} by id/UUID, {d['matched_by_centroid']} by centroid; "
        f"{d['unmatched']} unmatched, {d['not_cells']} marked not a cell, "
        f"{d['unlabelled_objects']} objects without a class",
        err=True,
    )
    for ex in d["unmatched_examples"]:
        typer.echo(f"  unmatched: {ex}", err=True)

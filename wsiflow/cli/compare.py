"""``wsiflow compare OUT TRUTH``: a run's cells against a generated slide's truth."""

from __future__ import annotations

from pathlib import Path

import typer

from wsiflow.cli._app import app


@app.command()
def compare(
    out: Path = typer.Argument(..., help="The run's output folder (OUT or OUT/<slide>)."),
    truth: Path = typer.Argument(..., help="The generated slide, its .truth.geojson or its .truth.json."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    gate: float = typer.Option(0.5, "--gate", help="Match within gate × the true cell's radius."),
) -> None:
    """Detection precision/recall (centroid matching), duplicates, per-class confusion, fraction errors."""
    import orjson

    from wsiflow.synth import compare as cmp
    from wsiflow.synth.slide import truth_paths

    t = cmp.load_truth(truth)
    stem = (
        truth.name.split(".truth.")[0]
        if ".truth." in truth.name
        else truth_paths(truth)[0].name.split(".truth.")[0]
    )
    det = cmp.load_detections(cmp.find_slide_dir(out, stem))
    res = cmp.compare(t, det, gate=gate)
    if json_out:
        typer.echo(orjson.dumps({"source": det.source, **res.to_dict()}, option=orjson.OPT_INDENT_2).decode())
    else:
        typer.echo(f"{det.source} vs {cmp.truth_geojson_for(truth)}")
        typer.echo(cmp.format_table(res))

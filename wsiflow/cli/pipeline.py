"""``wsiflow pipeline show|derive``: print a pipeline resolved; pin a pipeline to a new classifier."""

from __future__ import annotations

from pathlib import Path

import typer

from wsiflow.cli._app import app

pipeline_app = typer.Typer(help="Show a pipeline resolved, or derive one pinned to a new classifier.")
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("show")
def show(name: str = typer.Argument(..., help="A shipped pipeline name (mds, ...) or a YAML path.")) -> None:
    """Print the pipeline with every default filled in, and each model resolved and verified."""
    from wsiflow.config import load_pipeline
    from wsiflow.train.deploy import pipeline_yaml, resolved_models

    pipe = load_pipeline(name)
    typer.echo(pipeline_yaml(pipe).rstrip())
    typer.echo("# models (resolved, sha256 verified):")
    for m in resolved_models(pipe):
        flags = ", ".join(
            f
            for f in (
                "pinned" if m["pinned"] else "NOT pinned",
                "DEMO: generated cells only" if m["demo"] else "",
                f"temperature {m['temperature']}" if m["temperature"] is not None else "",
            )
            if f
        )
        typer.echo(f"#   {m['role']}: {m['bundle']} {m['sha256'][:12]}… {m['path']} ({flags})")


@pipeline_app.command("derive")
def derive(
    base: str = typer.Argument(..., help="The pipeline to start from (name or YAML path), e.g. mds."),
    classifier: str = typer.Option(..., "--classifier", help="The new classifier bundle (.safetensors)."),
    out: Path = typer.Option(..., "-o", "--out", help="The pipeline YAML to write."),
    name: str | None = typer.Option(None, "--name", help="Pipeline name (default: the file's stem)."),
) -> None:
    """Write a pipeline pinned to CLASSIFIER (sha256, input size, crop rule from its card)."""
    from wsiflow.train.deploy import derive_pipeline

    pipe = derive_pipeline(base, classifier, out, name)
    typer.echo(
        f"{out}: pipeline {pipe.name!r}, classifier {pipe.classifier.bundle} "
        f"(sha256 {pipe.classifier.sha256})"
    )
    typer.echo(f"use it: wsiflow run SLIDES -o RESULTS --pipeline {out}")

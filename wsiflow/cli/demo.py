"""``wsiflow demo [-o DIR]``: the whole mission on a generated slide, offline, in a few minutes.

Generates a small bone-marrow aspirate smear with known truth (``wsiflow synth``), runs the
full ``wsiflow run`` path on it (embedded Dask cluster, Zarr, QuPath GeoJSON, summary) with
the pipeline's bundles (the shipped demo bundles for ``mds-demo``), then prints each lineage's
measured dysplastic fraction with its 95% interval next to the truth, the blast % next to
the truth, cell detection against the truth, and where the QuPath overlay is.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from wsiflow.cli._app import app, debug_enabled
from wsiflow.cli._logging import quiet_dask
from wsiflow.cli._progress import BarReporter

if TYPE_CHECKING:
    from wsiflow.aggregate import SlideSummary
    from wsiflow.synth.compare import Comparison

DEMO_SIZE = "4000x4000"
DEMO_SEED = 3


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * float(v):.1f}%"


def format_demo(summary: SlideSummary, truth: dict[str, Any], comparison: Comparison) -> str:
    """The closing table: measured (95% interval, call) next to the truth."""
    lines = [f"{'':20}{'measured':>10}  {'95% interval':<17}{'call':<12}{'truth':>8}"]
    by_lin = {d.lineage: d for d in summary.lineages}
    for lin, t in truth["lineages"].items():
        d = by_lin.get(lin)
        ci = f"[{_pct(d.ci_low)}, {_pct(d.ci_high)}]" if d is not None and d.ci_low is not None else "—"
        n = f"{d.dysplastic}/{d.normal + d.dysplastic}" if d is not None else ""
        fraction, flag = (d.fraction, d.flag) if d is not None else (None, "—")
        lines.append(
            f"{lin + ' dysp.':20}{_pct(fraction):>10}  {ci:<17}{flag!s:<12}"
            f"{_pct(t['fraction']):>8}   ({n} cells; truth {t['dysplastic']}/{t['total']})"
        )
    b = summary.blast
    ci = f"[{_pct(b.ci_low)}, {_pct(b.ci_high)}]" if b is not None and b.ci_low is not None else "—"
    fraction, band = (b.fraction, b.band or "—") if b is not None else (None, "—")
    count, nucleated = (b.count, b.nucleated) if b is not None else (0, 0)
    lines.append(
        f"{'blasts':20}{_pct(fraction):>10}  {ci:<17}{band!s:<12}"
        f"{_pct(truth['blasts']['fraction']):>8}   ({count}/{nucleated} cells; "
        f"truth {truth['blasts']['count']}/{truth['nucleated']})"
    )
    c = comparison
    lines.append(
        f"cells detected {c.n_pred} of {c.n_true} true: recall {c.recall:.3f}, precision {c.precision:.3f}, "
        f"{c.duplicates} counted twice; class agreement on matched cells {c.accuracy:.3f}"
    )
    return "\n".join(lines)


@app.command()
def demo(
    out: Path = typer.Option(
        Path("wsiflow-demo"), "-o", "--out", help="Folder for the slide and the outputs."
    ),
    size: str = typer.Option(DEMO_SIZE, "--size", help="Generated slide size WIDTHxHEIGHT (level-0 px)."),
    seed: int = typer.Option(DEMO_SEED, "--seed", help="Seed of the generated slide."),
    pipeline: str = typer.Option(
        "mds-demo", "--pipeline", help="Pipeline name or YAML (default: mds-demo, the demo bundles)."
    ),
    workers: int | None = typer.Option(None, "--workers", help="Embedded cluster: worker processes."),
    threads_per_worker: int | None = typer.Option(None, "--threads-per-worker"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Draw progress bars on stderr."),
) -> None:
    """Generate a smear with known truth, run the whole pipeline on it, and compare with the truth."""
    from wsiflow.cli.synth import parse_size
    from wsiflow.config import load_pipeline
    from wsiflow.execution.cluster import ClusterOptions, ClusterSession
    from wsiflow.execution.runner import RunOptions, run_slides
    from wsiflow.execution.worker import resolve_models
    from wsiflow.synth import SynthParams, synthesize
    from wsiflow.synth import compare as cmp

    t0 = time.perf_counter()
    pipe = load_pipeline(pipeline)
    refs, bundles = resolve_models(pipe, "auto")
    reporter = BarReporter(enabled=progress)
    for b in bundles:
        if b.demo:
            reporter.note(f"warning: {b.task} bundle {b.name!r} is a demo model trained on generated cells")
    w, h = parse_size(size)
    out.mkdir(parents=True, exist_ok=True)
    slide = out / "demo-marrow.svs"
    typer.echo(f"wsiflow demo: generating {slide} ({w}x{h} px at 0.25 µm/px, seed {seed}) …", err=True)
    syn = synthesize(slide, SynthParams(width=w, height=h, mpp=0.25, seed=seed))
    truth = syn.summary
    typer.echo(
        f"wsiflow demo: {truth['nucleated']} nucleated cells drawn in {syn.seconds:.1f} s; "
        "running the pipeline …",
        err=True,
    )
    run_out = out / "run"
    options = RunOptions(out=run_out, overwrite=True)
    cluster = ClusterOptions(
        n_workers=workers, threads_per_worker=threads_per_worker, quiet=not debug_enabled()
    )

    def announce(session: ClusterSession) -> None:
        typer.echo(f"wsiflow: {session.description}", err=True)

    try:
        with quiet_dask(debug_enabled()):
            results = run_slides(
                [str(slide)], pipe, options, cluster, reporter, models=(refs, bundles), on_connect=announce
            )
    finally:
        reporter.close()
    res = results[0]
    if not res.ok or res.summary is None or res.out_dir is None:
        typer.echo(f"wsiflow demo: the run failed: {res.error}", err=True)
        raise typer.Exit(1)
    comparison = cmp.compare(cmp.load_truth(slide), cmp.load_detections(res.out_dir))
    typer.echo("")
    typer.echo(
        f"wsiflow demo — generated bone-marrow smear, {res.n_cells} cells classified "
        f"(demo models: not for real slides)"
    )
    typer.echo(format_demo(res.summary, truth, comparison))
    typer.echo("")
    typer.echo(
        f"QuPath overlay: {res.out_dir / 'cells.geojson.gz'}  (open {slide} in QuPath, then drag it in;"
    )
    typer.echo(f"                the truth is {syn.truth_geojson})")
    typer.echo(f"summary: {res.out_dir / 'summary.json'} ; cells: {res.out_dir / 'cells.zarr'}")
    if (res.out_dir / "report.html").is_file():
        typer.echo(f"report (open in a browser): {res.out_dir / 'report.html'}")
    typer.echo(f"total time {time.perf_counter() - t0:.0f} s")

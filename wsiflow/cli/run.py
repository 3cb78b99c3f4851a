"""``wsiflow run``: slides through Dask workers to Zarr, QuPath GeoJSON and summaries.

Exit codes: 0 all slides done; 1 at least one slide failed (each gets one line on stderr
and an "error" row in summary.csv); 2 usage or configuration errors (nothing was run).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import typer

from wsiflow.cli._app import app, debug_enabled
from wsiflow.cli._logging import quiet_dask, quiet_readers
from wsiflow.cli._progress import BarReporter
from wsiflow.errors import ConfigError, OutputError

if TYPE_CHECKING:

    from wsiflow.config import Pipeline
    from wsiflow.execution.runner import SlideResult
    from wsiflow.types import StorageOptions


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"


def format_table(results: list[SlideResult], pipeline: Pipeline) -> str:
    """The closing per-slide table.

    Dysplasia mode: cells, per-lineage dysplastic fraction with its flag, blast % with its
    WHO band, status. Differential mode: cells and the % of each class.
    """
    if pipeline.mode == "differential":
        extra = [c.code for c in pipeline.taxonomy]
        head = ["slide", "cells", *[f"{c} %" for c in extra], "status"]
    else:
        lineages = [
            lin
            for lin in pipeline.lineages
            if len({c.dysplastic for c in pipeline.taxonomy if c.lineage == lin}) == 2
        ]
        head = ["slide", "cells", *[f"{lin} dysplastic" for lin in lineages], "blast %", "status"]
    rows: list[list[str]] = []
    for r in results:
        s = r.summary
        cells: list[str] = [r.name, str(r.n_cells) if r.ok else "-"]
        if pipeline.mode == "differential":
            by_code = {c.code: c for c in s.classes} if s is not None else {}
            cells += [_pct(by_code[c].fraction) if c in by_code else "-" for c in extra]
        else:
            by_lin = {lin.lineage: lin for lin in s.lineages} if s is not None else {}
            for lin in lineages:
                d = by_lin.get(lin)
                cells.append(f"{_pct(d.fraction)} ({d.flag})" if d else "-")
            blast = s.blast if s is not None else None
            band = f" ({blast.band})" if blast is not None and blast.band else ""
            if blast is not None and blast.call and blast.band and blast.call != blast.band:
                band = f" ({blast.band}; {blast.call})"  # e.g. uncertain between bands
            cells.append(_pct(blast.fraction) + band if blast is not None else "-")
        status = r.status
        if r.failed_tiles and r.ok:
            status += f", {len(r.failed_tiles)} tile(s) failed"
        cells.append(status)
        rows.append(cells)
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def parse_storage_options(text: str | None) -> StorageOptions | None:
    """``--storage-options``: a JSON object, or ``@FILE`` holding one (keeps credentials out
    of the process list). A bad value is a usage error that never echoes the value."""
    from wsiflow.types import StorageOptions

    if text is None:
        return None
    key = "--storage-options"
    source = "the value"
    if text.startswith("@"):
        source = text[1:]
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            raise ConfigError("", key, f"cannot read {source} ({why})") from None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"  # never the text: it may hold a secret
        raise ConfigError("", key, f"{source} is not valid JSON ({where})") from None
    if not isinstance(value, dict):
        raise ConfigError("", key, f"{source} must be a JSON object of fsspec options")
    return StorageOptions(value)


@app.command()
def run(
    slides: list[str] = typer.Argument(..., help="Slide files, globs or fsspec URLs.", show_default=False),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (one sub-folder per slide)."),
    pipeline: str = typer.Option("mds", "--pipeline", help="Shipped pipeline name or a YAML path."),
    scheduler: str | None = typer.Option(
        None, "--scheduler", help="Use an existing Dask scheduler (tcp://HOST:PORT or tls://HOST:PORT)."
    ),
    workers: int | None = typer.Option(None, "--workers", help="Embedded cluster: worker processes."),
    threads_per_worker: int | None = typer.Option(
        None, "--threads-per-worker", help="Embedded cluster: threads (and torch threads) per worker."
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (resolved on each worker)."),
    mpp: float | None = typer.Option(None, "--mpp", help="µm per level-0 pixel, overriding the file."),
    resume: bool = typer.Option(False, "--resume", help="Continue existing outputs; skip finished tiles."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs of these slides."),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="With --resume: also re-run the failed tiles of finished outputs."
    ),
    roi: Path | None = typer.Option(
        None,
        "--roi",
        help="QuPath annotations (GeoJSON polygons): one file, or a folder of <slide-stem>.geojson; "
        "only tiles meeting them are read and only cells inside count.",
    ),
    batch_tiles: int | None = typer.Option(
        None, "--batch-tiles", help="Most tiles per task (default: the pipeline's)."
    ),
    max_in_flight: int | None = typer.Option(
        None, "--max-in-flight", help="Tasks outstanding at once (default: 2 × worker threads)."
    ),
    geoparquet: bool = typer.Option(False, "--geoparquet", help="Also write cells.parquet (GeoParquet)."),
    checkpoint_seconds: float = typer.Option(
        10.0, "--checkpoint-seconds", help="Make finished tiles durable (resumable) at least this often."
    ),
    tls_ca_file: Path | None = typer.Option(
        None, "--tls-ca-file", help="CA certificate (PEM) for TLS to --scheduler (or use a Dask config file)."
    ),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="Client certificate (PEM) for TLS."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="Client private key (PEM) for TLS."),
    storage_options: str | None = typer.Option(
        None,
        "--storage-options",
        help="fsspec options for URL slides (s3://…) as a JSON object, or @FILE holding one; "
        "credentials also come from the usual AWS environment/config. Never printed.",
        show_default=False,
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Draw progress bars on stderr."),
    report: bool = typer.Option(
        True, "--report/--no-report", help="Write OUT/report.html and OUT/<slide>/report.html."
    ),
    overlap: bool = typer.Option(
        True,
        "--overlap/--no-overlap",
        hidden=True,  # --no-overlap: one slide at a time, the path before slides overlapped (benchmarks)
        help="Let the next slides' tiles go out while earlier slides drain and finish.",
    ),
) -> None:
    """Segment and classify cells on whole slides; write Zarr, QuPath GeoJSON and summaries."""
    from wsiflow.config import load_pipeline
    from wsiflow.execution.cluster import ClusterOptions, ClusterSession
    from wsiflow.execution.runner import RunOptions, check_outputs, expand_inputs, prepare_output, run_slides
    from wsiflow.execution.worker import resolve_models
    from wsiflow.writers.lock import output_lock

    debug = debug_enabled()
    quiet_readers(debug)  # libraries log what the runner reports in one line per slide
    options = RunOptions(  # validates the run options (a bad value: usage error, exit 2)
        out=out,
        resume=resume,
        overwrite=overwrite,
        mpp=mpp,
        batch_tiles=batch_tiles,
        max_in_flight=max_in_flight,
        geoparquet=geoparquet,
        flush_seconds=checkpoint_seconds,
        report=report,
        retry_failed=retry_failed,
        roi=roi,
        storage=parse_storage_options(storage_options),
        overlap=overlap,
    )
    cluster_options = ClusterOptions(
        scheduler=scheduler,
        n_workers=workers,
        threads_per_worker=threads_per_worker,
        device=device,
        tls_ca_file=str(tls_ca_file) if tls_ca_file else None,
        tls_cert=str(tls_cert) if tls_cert else None,
        tls_key=str(tls_key) if tls_key else None,
        quiet=not debug,
    )
    pipe = load_pipeline(pipeline)
    if geoparquet or pipe.outputs.geoparquet:
        from wsiflow.writers.geoparquet import geoparquet_available

        why = geoparquet_available()
        if why:
            raise ConfigError("", "--geoparquet", f"GeoParquet output {why} (pip install pyarrow)")

    inputs, notes = expand_inputs(slides, options.storage)
    reporter = BarReporter(enabled=progress)
    for n in notes:
        reporter.note(n)
    try:
        dirs = check_outputs(options, inputs)
    except OutputError as exc:
        raise ConfigError("", "", str(exc)) from None  # existing outputs: a usage error
    prepare_output(out)  # before starting a cluster: an unwritable OUT fails in a second
    with output_lock(out):  # another run writing OUT refuses here (the runner holds it for the run)
        pass
    refs, bundles = resolve_models(pipe, device)
    for b in bundles:
        if b.card.get("demo"):
            reporter.note(
                f"warning: {b.task} bundle {b.name!r} is a demo model; its results are not for interpretation"
            )

    def announce(session: ClusterSession) -> None:
        typer.echo(f"wsiflow: {session.description}", err=True)
        link = session.dashboard_link or "not available (the dashboard needs the 'bokeh' package)"
        typer.echo(f"wsiflow: dashboard: {link}", err=True)

    try:
        with quiet_dask(debug):
            results = run_slides(
                inputs,
                pipe,
                options,
                cluster_options,
                reporter,
                models=(refs, bundles),
                dirs=dirs,
                on_connect=announce,
            )
    finally:
        reporter.close()
    typer.echo(format_table(results, pipe))
    typer.echo(f"outputs: {out}")
    raise typer.Exit(0 if all(r.ok for r in results) else 1)

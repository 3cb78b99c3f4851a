"""``wsiflow run``: slides through Dask workers to Zarr, QuPath GeoJSON and summaries.

Exit codes: 0 all slides done; 1 at least one slide failed (each gets one line on stderr
and an "error" row in summary.csv); 2 usage or configuration errors (nothing was run).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from wsiflow.cli.app import app, debug_enabled
from wsiflow.errors import ConfigError, OutputError, WsiflowError

if TYPE_CHECKING:
    from tqdm import tqdm

    from wsiflow.config import Pipeline
    from wsiflow.execution.runner import SlideResult


class BarReporter:
    """A tqdm bar per slide on stderr: tiles done / total, cells found, cells/s."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: tqdm[Any] | None = None
        self._cells = 0
        self._t0 = 0.0

    def slide_started(self, name: str, total_tiles: int, done_tiles: int) -> None:
        from tqdm import tqdm

        self._close()
        self._cells = 0
        self._t0 = time.perf_counter()
        self._bar = tqdm(
            total=total_tiles,
            initial=done_tiles,
            desc=name[:40],
            unit="tile",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not self.enabled,
            leave=True,
        )
        self._bar.set_postfix_str("cells=0")

    def tiles_done(self, n_tiles: int, n_cells: int) -> None:
        if self._bar is None:
            return
        self._cells += n_cells
        rate = self._cells / max(1e-6, time.perf_counter() - self._t0)
        self._bar.set_postfix_str(f"cells={self._cells} {rate:.1f} cells/s", refresh=False)
        self._bar.update(n_tiles)

    def slide_finished(self, result: SlideResult) -> None:
        self._close()

    def note(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"wsiflow: {message}", file=sys.stderr)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


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
        s = r.summary or {}
        cells: list[str] = [r.name, str(r.n_cells) if r.ok else "-"]
        if pipeline.mode == "differential":
            by_code = {c["code"]: c for c in s.get("classes", [])}
            cells += [_pct(by_code[c]["fraction"]) if c in by_code else "-" for c in extra]
        else:
            by_lin = {lin["lineage"]: lin for lin in s.get("lineages", [])}
            for lin in lineages:
                d = by_lin.get(lin)
                cells.append(f"{_pct(d['fraction'])} ({d['flag']})" if d else "-")
            blast = s.get("blast") or {}
            band = f" ({blast['band']})" if blast.get("band") else ""
            if blast.get("call") and blast.get("band") and blast["call"] != blast["band"]:
                band = f" ({blast['band']}; {blast['call']})"  # e.g. uncertain between bands
            cells.append(_pct(blast.get("fraction")) + band if blast else "-")
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
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Draw progress bars on stderr."),
    report: bool = typer.Option(
        True, "--report/--no-report", help="Write OUT/report.html and OUT/<slide>/report.html."
    ),
) -> None:
    """Segment and classify cells on whole slides; write Zarr, QuPath GeoJSON and summaries."""
    try:
        code = _run(
            slides,
            out,
            pipeline,
            scheduler,
            workers,
            threads_per_worker,
            device,
            mpp,
            resume,
            overwrite,
            batch_tiles,
            max_in_flight,
            geoparquet,
            checkpoint_seconds,
            tls_ca_file,
            tls_cert,
            tls_key,
            progress,
            report,
            retry_failed,
        )
    except WsiflowError as exc:
        if debug_enabled():
            raise
        typer.echo(f"wsiflow: error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(2 if isinstance(exc, ConfigError) else 1) from None
    except Exception as exc:
        if debug_enabled():
            raise
        reason = " ".join(str(exc).split())
        typer.echo(f"wsiflow: error: internal error: {type(exc).__name__}: {reason}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def _usage(message: str) -> ConfigError:
    return ConfigError("", "", message)


def _run(
    slides: list[str],
    out: Path,
    pipeline_ref: str,
    scheduler: str | None,
    workers: int | None,
    threads_per_worker: int | None,
    device: str,
    mpp: float | None,
    resume: bool,
    overwrite: bool,
    batch_tiles: int | None,
    max_in_flight: int | None,
    geoparquet: bool,
    checkpoint_seconds: float,
    tls_ca_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    progress: bool,
    report: bool = True,
    retry_failed: bool = False,
) -> int:
    import logging

    from wsiflow.config import load_pipeline

    if not debug_enabled():  # libraries log what the runner reports in one line per slide
        for name in ("tifffile", "tiffslide", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if resume and overwrite:
        raise _usage("--resume and --overwrite exclude each other")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError("", "--device", f"must be auto, cpu or cuda, not {device!r}")
    if mpp is not None and not (0 < mpp <= 10):
        raise ConfigError("", "--mpp", f"must be within (0, 10] µm/px, got {mpp}")
    for key, value in (
        ("--batch-tiles", batch_tiles),
        ("--workers", workers),
        ("--threads-per-worker", threads_per_worker),
        ("--max-in-flight", max_in_flight),
    ):
        if value is not None and value < 1:
            raise ConfigError("", key, "must be at least 1")
    if checkpoint_seconds < 0:
        raise ConfigError("", "--checkpoint-seconds", "must be at least 0")
    pipe = load_pipeline(pipeline_ref)
    if geoparquet or pipe.outputs.geoparquet:
        from wsiflow.execution.geoparquet import geoparquet_available

        why = geoparquet_available()
        if why:
            raise ConfigError("", "--geoparquet", f"GeoParquet output {why} (pip install pyarrow)")

    from wsiflow.execution.cluster import ClusterOptions, connect
    from wsiflow.execution.runner import Runner, RunOptions, check_outputs, expand_inputs, prepare_output
    from wsiflow.pipeline import resolve_models
    from wsiflow.writers.lock import output_lock

    inputs, notes = expand_inputs(slides)
    reporter = BarReporter(enabled=progress)
    for n in notes:
        reporter.note(n)
    options = RunOptions(
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
    )
    try:
        check_outputs(options, inputs)
    except OutputError as exc:
        raise _usage(str(exc)) from None
    prepare_output(out)  # before starting a cluster: an unwritable OUT fails in a second
    with output_lock(out):  # another run writing OUT refuses here (the runner holds it for the run)
        pass
    refs, bundles = resolve_models(pipe, device)
    for b in bundles:
        if b.card.get("demo"):
            reporter.note(
                f"warning: {b.task} bundle {b.name!r} is a demo model; its results are not for interpretation"
            )
    cluster_options = ClusterOptions(
        scheduler=scheduler,
        n_workers=workers,
        threads_per_worker=threads_per_worker,
        device=device,
        tls_ca_file=str(tls_ca_file) if tls_ca_file else None,
        tls_cert=str(tls_cert) if tls_cert else None,
        tls_key=str(tls_key) if tls_key else None,
        quiet=not debug_enabled(),
    )
    with connect(cluster_options) as session:
        runner = Runner(session.client, pipe, refs, bundles, options, reporter)
        typer.echo(f"wsiflow: {session.description}", err=True)
        link = session.dashboard_link or "not available (the dashboard needs the 'bokeh' package)"
        typer.echo(f"wsiflow: dashboard: {link}", err=True)
        results = runner.run(inputs)
    typer.echo(format_table(results, pipe))
    typer.echo(f"outputs: {out}")
    return 0 if all(r.ok for r in results) else 1

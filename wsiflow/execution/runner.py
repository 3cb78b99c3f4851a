"""Run slides through a Dask cluster: plan → submit batches → collect → finish (DESIGN §1).

This module is the dispatch half of a run; what happens to a slide is the pipeline
layer's (:mod:`wsiflow.pipeline.plan`, :mod:`wsiflow.pipeline.batch`,
:mod:`wsiflow.pipeline.finish`). For each slide, in order:

1. **plan** (client): :func:`wsiflow.pipeline.plan.plan_slide`;
2. **resume bookkeeping**: ``OUT/<slide>/cells.zarr`` holds ``tiles/done``; with
   ``resume`` the finished tiles are skipped (after checking that the pipeline, models and
   slide are the ones the store was made with); a complete store skips the slide;
3. **submit** batches of ``batch_tiles`` tiles with at most ``max_in_flight`` tasks
   outstanding (backpressure: a new batch goes out only when one comes back), and
   **consume** results as they complete: append to the store, mark the tiles done;
4. **failures**: a batch whose tile cannot be read is split into single tiles; a transient
   error is retried a bounded number of times; a tile that still fails is recorded as
   failed (store and summary) and the slide completes without it;
5. **finish**: :func:`wsiflow.pipeline.finish.finish_slide` (GeoJSON, ``summary.json``;
   the store is marked complete last), then :func:`~wsiflow.pipeline.finish.record_slide`
   (the row of ``OUT/summary.csv``, the slide's report).

:func:`prepare_run` checks and creates the output folders once (the CLI calls it before
starting a cluster, and hands its result to :meth:`Runner.run`).

The client holds at most ``max_in_flight`` small CellTables at a time, never all cells of
a slide as Python objects. Appends are idempotent per tile, so a task that Dask runs twice
(worker loss) changes nothing.
"""

from __future__ import annotations

import errno
import glob
import logging
import math
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from distributed import Client, Future, KilledWorker, as_completed

from wsiflow.aggregate import SlideSummary
from wsiflow.cells import CellTable
from wsiflow.config import Pipeline
from wsiflow.errors import ConfigError, OutputError, SlideError, WsiflowError
from wsiflow.execution.cluster import ClusterOptions, ClusterSession, connect
from wsiflow.execution.preflight import check_cluster
from wsiflow.execution.tasks import BatchResult, TaskError, run_batch
from wsiflow.execution.worker import ModelRefs, SlideRef, resolve_models
from wsiflow.models.bundle import ModelBundle
from wsiflow.pipeline.finish import (
    StoreSummary,
    finish_slide,
    model_meta,
    record_run,
    record_slide,
    summarize_store,
)
from wsiflow.pipeline.plan import SlidePlan, plan_slide, slide_name
from wsiflow.tiling import Tile
from wsiflow.types import StorageOptions
from wsiflow.writers.lock import output_lock
from wsiflow.writers.paths import slide_output_dir
from wsiflow.writers.record import SlideRecord
from wsiflow.writers.zarr_store import CellStore

__all__ = [
    "Reporter",
    "RunAborted",
    "RunOptions",
    "Runner",
    "SlideResult",
    "check_outputs",
    "expand_inputs",
    "prepare_output",
    "prepare_run",
    "run_slides",
]

log = logging.getLogger(__name__)

STATUS_ERROR = "error"
# a slide whose first tiles all fail (and none succeed) is given up after this many
FAIL_FAST_TILES = 8


class RunAborted(WsiflowError):
    """The run cannot continue (e.g. workers cannot load the models)."""


@dataclass(frozen=True)
class RunOptions:
    """What a run does with its slides; validated here, once (a bad value is a usage
    error naming the CLI option, exit 2)."""

    out: Path
    resume: bool = False
    overwrite: bool = False
    mpp: float | None = None
    backend: str = "auto"
    batch_tiles: int | None = None  # default: pipeline.tiling.batch_tiles
    max_in_flight: int | None = None  # default: 2 × worker threads
    max_retries: int = 2
    geoparquet: bool = False
    flush_seconds: float = 10.0  # the store makes finished tiles durable at least this often
    report: bool = True  # OUT/<slide>/report.html and OUT/report.html
    retry_failed: bool = False  # with resume: re-run the failed tiles of finished stores too
    roi: Path | None = None  # QuPath annotations: one file, or a folder of <slide-stem>.geojson
    storage: StorageOptions | None = None  # fsspec options for URL inputs (may hold credentials)

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise ConfigError("", "", "--resume and --overwrite exclude each other")
        if self.retry_failed and not self.resume:
            raise ConfigError(
                "", "--retry-failed", "re-runs the failed tiles of existing outputs: use it with --resume"
            )
        if self.mpp is not None and not (0 < self.mpp <= 10):
            raise ConfigError("", "--mpp", f"must be within (0, 10] µm/px, got {self.mpp}")
        for key, value in (("--batch-tiles", self.batch_tiles), ("--max-in-flight", self.max_in_flight)):
            if value is not None and value < 1:
                raise ConfigError("", key, "must be at least 1")
        if self.roi is not None and not Path(self.roi).exists():
            raise ConfigError(str(self.roi), "--roi", "file or folder not found")
        if self.flush_seconds < 0:
            raise ConfigError("", "--checkpoint-seconds", "must be at least 0")


@dataclass
class SlideResult:
    """What happened to one input (also what the CLI prints)."""

    path: str
    name: str
    out_dir: Path | None
    status: str
    error: str | None = None
    n_cells: int = 0
    tiles_total: int = 0
    tiles_skipped: int = 0  # already done (resume)
    tiles_computed: list[int] = field(default_factory=list)
    failed_tiles: dict[int, str] = field(default_factory=dict)
    unreadable: dict[str, list[float]] = field(default_factory=dict)  # corrupt source tiles read as white
    cut_cells: dict[str, int] = field(default_factory=dict)  # tile id → owned cells lost to the read edge
    summary: SlideSummary | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != STATUS_ERROR

    def record(self) -> SlideRecord:
        """What ``summary.csv`` records about this slide (its row: ``record().to_row()``)."""
        return SlideRecord(
            name=self.name,
            path=self.path,
            output=str(self.out_dir or ""),
            status=self.status,
            error=self.error,
            summary=self.summary,
        )


class Reporter(Protocol):
    """Progress sink; the CLI draws bars, tests record calls."""

    def slide_started(self, name: str, total_tiles: int, done_tiles: int) -> None: ...

    def tiles_done(self, n_tiles: int, n_cells: int) -> None: ...

    def slide_finished(self, result: SlideResult) -> None: ...

    def note(self, message: str) -> None: ...


class NullReporter:
    def slide_started(self, name: str, total_tiles: int, done_tiles: int) -> None:
        pass

    def tiles_done(self, n_tiles: int, n_cells: int) -> None:
        pass

    def slide_finished(self, result: SlideResult) -> None:
        pass

    def note(self, message: str) -> None:
        log.warning("%s", message)


# --------------------------------------------------------------------------- inputs


def expand_inputs(
    args: Sequence[str], storage: StorageOptions | None = None
) -> tuple[list[str], list[str]]:
    """Paths, globs and URLs → (unique inputs in order, notes about duplicates).

    An argument naming an existing file is taken literally even if it contains glob
    characters; a glob matching nothing is kept, so it gets its own "not found" line.
    A URL with glob characters (``s3://bucket/marrow/*.svs``) is listed through fsspec
    with ``storage``; one that cannot be listed is kept too, and fails with its reason
    when the slide is opened.
    """
    out: list[str] = []
    notes: list[str] = []
    seen: dict[str, str] = {}
    for arg in args:
        if "://" in arg:
            candidates = _glob_url(arg, storage) if glob.has_magic(arg) else [arg]
        elif os.path.lexists(arg) or not glob.has_magic(arg):
            candidates = [arg]
        else:
            candidates = sorted(glob.glob(arg)) or [arg]
        for c in candidates:
            key = c if "://" in c else os.path.realpath(c)
            if key in seen:
                notes.append(f"{c}: given more than once (same file as {seen[key]}); processed once")
                continue
            seen[key] = c
            out.append(c)
    return out, notes


def _glob_url(pattern: str, storage: StorageOptions | None) -> list[str]:
    """The URLs an fsspec glob matches, sorted; ``[pattern]`` when none match or listing fails."""
    import fsspec

    try:
        fs, where = fsspec.core.url_to_fs(pattern, **(storage.to_dict() if storage else {}))
        found = fs.glob(where, detail=True)
    except Exception:  # listing denied, no such bucket, no credentials: opening it says why
        log.debug("cannot list %s", pattern, exc_info=True)
        return [pattern]
    urls = sorted(fs.unstrip_protocol(p) for p, info in found.items() if info.get("type") != "directory")
    return urls or [pattern]


def check_outputs(options: RunOptions, inputs: Sequence[str]) -> dict[str, Path]:
    """Output folder per input; refuses existing outputs without resume/overwrite."""
    taken: set[str] = set()
    dirs = {path: slide_output_dir(options.out, path, taken) for path in inputs}
    if not (options.resume or options.overwrite):
        existing = [d for d in dirs.values() if d.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise OutputError(
                f"{existing[0]}: output exists{more}; pass --resume to continue or --overwrite to replace it"
            )
    return dirs


def prepare_output(out: Path) -> None:
    """Create the output folder and prove it takes files (a real write: root ignores
    permission bits, so ``os.access`` says yes to read-only mounts and immutable folders)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{out}: cannot create the output folder (a file of that name exists)") from None
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".wsiflow-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{out}: output folder is not writable ({exc.strerror or exc})") from None


def prepare_run(options: RunOptions, inputs: Sequence[str]) -> dict[str, Path]:
    """Create ``options.out`` (proving it takes files), then the output folder per input
    (:func:`check_outputs`). Run once per run, before any slide."""
    prepare_output(options.out)
    return check_outputs(options, inputs)


def run_slides(
    inputs: Sequence[str],
    pipeline: Pipeline,
    options: RunOptions,
    cluster: ClusterOptions,
    reporter: Reporter | None = None,
    *,
    models: tuple[ModelRefs, Sequence[ModelBundle]] | None = None,
    dirs: dict[str, Path] | None = None,
    on_connect: Callable[[ClusterSession], None] | None = None,
) -> list[SlideResult]:
    """The one entry point of a run (``wsiflow run``, ``wsiflow demo``, the benchmarks).

    ``models`` (refs and verified bundles) and ``dirs`` (from :func:`prepare_run`) are made
    here unless the caller made them first (the CLI does, to fail before a cluster
    starts); ``on_connect`` sees the cluster session before the first slide. Then every
    worker is checked (:func:`~wsiflow.execution.preflight.check_cluster`): one that would
    compute different numbers stops the run before any slide (exit 2).
    """
    if dirs is None:
        dirs = prepare_run(options, inputs)
    refs, bundles = models if models is not None else resolve_models(pipeline, cluster.device)
    with connect(cluster) as session:
        if on_connect is not None:
            on_connect(session)
        # every worker computes with the client's version and weights, and reads the slides
        check_cluster(session.client, refs, inputs, options.storage)
        return Runner(session.client, pipeline, refs, bundles, options, reporter).run(inputs, dirs)


# --------------------------------------------------------------------------- batches


@dataclass
class _Batch:
    tiles: list[Tile]
    attempts: int = 0

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tiles]


def _batches(tiles: Sequence[Tile], k: int) -> Iterator[_Batch]:
    for i in range(0, len(tiles), k):
        yield _Batch(list(tiles[i : i + k]))


class Runner:
    """Runs slides on ``client`` with ``pipeline`` and the verified model ``bundles``."""

    def __init__(
        self,
        client: Client,
        pipeline: Pipeline,
        models: ModelRefs,
        bundles: Sequence[ModelBundle],
        options: RunOptions,
        reporter: Reporter | None = None,
    ) -> None:
        self.client = client
        self.pipeline = pipeline
        self.models = models
        self.bundles = list(bundles)
        self.options = options
        self.reporter: Reporter = reporter or NullReporter()
        self.batch_tiles = options.batch_tiles or pipeline.tiling.batch_tiles
        self.peak_in_flight = 0  # the most tasks outstanding at once (the bound is checked in tests)

    # ------------------------------------------------------------------ public

    def run(self, inputs: Sequence[str], dirs: dict[str, Path] | None = None) -> list[SlideResult]:
        """Every input in turn; ``dirs`` is :func:`prepare_run`'s result (made here when None)."""
        if dirs is None:
            dirs = prepare_run(self.options, inputs)
        with output_lock(self.options.out):  # one writer per output folder
            return self._run(inputs, dirs)

    def _run(self, inputs: Sequence[str], dirs: dict[str, Path]) -> list[SlideResult]:
        results: list[SlideResult] = []
        for path in inputs:
            result = self.run_slide(path, dirs[path])
            results.append(result)
            # one row per slide; rows of slides from earlier runs into the same OUT stay
            record_slide(
                self.options.out,
                result.record(),
                out_dir=result.out_dir if result.status != STATUS_ERROR else None,
                slide_path=path,
                report=self.options.report,
                note=self.reporter.note,
                storage=self.options.storage,
            )
            self.reporter.slide_finished(result)
        if self.options.report:
            record_run(self.options.out, self.reporter.note)
        return results

    # ------------------------------------------------------------------ one slide

    def run_slide(self, path: str, out_dir: Path) -> SlideResult:
        t0 = time.perf_counter()
        result = SlideResult(path=path, name=slide_name(path), out_dir=out_dir, status=STATUS_ERROR)
        try:
            self._run_slide(path, out_dir, result)
        except RunAborted:
            raise
        except WsiflowError as exc:
            if getattr(exc, "errno", None) == errno.ENOSPC:
                raise  # a full disk fails every later write too: stop with this one line
            self._slide_failed(result, _one_line(str(exc), path))
        except Exception as exc:  # a bug must cost one slide, not the night's batch
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise OutputError(
                    f"{exc.filename or out_dir}: cannot write (No space left on device; "
                    "free some space, then rerun with --resume)"
                ) from None
            log.debug("slide %s failed", path, exc_info=True)
            why = f"internal error: {_reason(exc)} (--debug shows details)"
            self._slide_failed(result, _one_line(why, path))
        result.seconds = time.perf_counter() - t0
        return result

    def _slide_failed(self, result: SlideResult, message: str) -> None:
        result.status = STATUS_ERROR
        result.error = message
        result.summary = None
        self.reporter.note(message)

    def _store_attrs(self, plan: SlidePlan) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline.model_dump(mode="json"),
            "models": model_meta(self.bundles),
            "slide": plan.identity,
            "taxonomy": [c.model_dump(mode="json") for c in self.pipeline.taxonomy],
            "tiles_selected": [t.id for t in plan.tiles],
            **({"rois": plan.rois.to_json()} if plan.rois is not None else {}),
        }

    def _open_store(self, plan: SlidePlan, out_dir: Path, result: SlideResult) -> CellStore | None:
        """The store to append to, or None when the slide is already complete (resume)."""
        zpath = out_dir / "cells.zarr"
        attrs = self._store_attrs(plan)
        if out_dir.exists() and self.options.overwrite:
            shutil.rmtree(out_dir)
        if zpath.exists() and self.options.resume:
            store = CellStore.open(zpath, mode="r+", flush_seconds=self.options.flush_seconds)
            _check_resumable(store.attrs, attrs, zpath)
            if store.complete and (out_dir / "summary.json").is_file():
                if not (self.options.retry_failed and store.failed.any()):
                    return None
                store.mark_incomplete()  # its failed tiles are not done: they are re-run
            return store
        out_dir.mkdir(parents=True, exist_ok=True)
        return CellStore.create(
            zpath,
            n_tiles=len(plan.grid),
            n_classes=len(self.pipeline.taxonomy),
            attrs=attrs,
            flush_seconds=self.options.flush_seconds,
        )

    def _run_slide(self, path: str, out_dir: Path, result: SlideResult) -> None:
        o = self.options
        plan = plan_slide(path, self.pipeline, o.mpp, o.backend, o.storage, o.roi)
        result.tiles_total = len(plan.tiles)
        store = self._open_store(plan, out_dir, result)
        if store is None:  # complete from an earlier run: same numbers, nothing recomputed
            result.tiles_skipped = len(plan.tiles)
            self.reporter.note(f"{path}: already complete in {out_dir}; skipped (--resume)")
            finished = CellStore.open(out_dir / "cells.zarr")  # read-only
            self._summarized(summarize_store(plan, finished, self.pipeline), result)
            return
        done = np.asarray(store.done, bool)
        todo = [t for t in plan.tiles if not done[t.id]]
        result.tiles_skipped = len(plan.tiles) - len(todo)
        self.reporter.slide_started(result.name, len(plan.tiles), result.tiles_skipped)
        self._compute(plan, store, todo, result)
        if plan.tiles and len(result.failed_tiles) == len(plan.tiles):
            first = next(iter(result.failed_tiles.values()))
            raise SlideError(path, f"all {len(plan.tiles)} tiles failed (first: {first})")
        summary = finish_slide(
            plan,
            store,
            out_dir,
            self.pipeline,
            model_meta(self.bundles),
            geoparquet=self.options.geoparquet,
        )
        self._summarized(summary, result)

    def _in_flight(self) -> int:
        if self.options.max_in_flight:
            return max(1, self.options.max_in_flight)
        threads = sum(self.client.nthreads().values())
        return max(2, 2 * threads)

    def _submit(self, plan: SlidePlan, batch: _Batch) -> Future:
        return self.client.submit(
            run_batch,
            SlideRef(path=plan.path, mpp=self.options.mpp, backend=self.options.backend,
                     storage=self.options.storage),
            batch.tiles,
            self.pipeline,
            self.models,
            plan.rois,
            pure=False,
            key=f"wsiflow-batch-{batch.tiles[0].id}-{batch.attempts}-{os.urandom(6).hex()}",
        )

    def _compute(self, plan: SlidePlan, store: CellStore, todo: list[Tile], result: SlideResult) -> None:
        # batch_tiles is an upper bound: a small slide is cut finer so every worker thread
        # gets work (results do not depend on batching)
        threads = max(1, sum(self.client.nthreads().values()))
        k = max(1, min(self.batch_tiles, math.ceil(len(todo) / threads)))
        queue: deque[_Batch] = deque(_batches(todo, k))
        limit = self._in_flight()
        inflight: dict[Any, tuple[Future, _Batch]] = {}
        succeeded = 0

        def fill() -> list[Future]:
            new: list[Future] = []
            while queue and len(inflight) < limit:
                b = queue.popleft()
                fut = self._submit(plan, b)
                inflight[fut.key] = (fut, b)
                new.append(fut)
                self.peak_in_flight = max(self.peak_in_flight, len(inflight))
            return new

        if not queue:
            return
        ac = as_completed(fill(), loop=self.client.loop)  # backpressure: a result lets one more out
        try:
            for fut in ac:
                _, batch = inflight.pop(fut.key)
                if fut.status == "finished":
                    res: BatchResult = fut.result()
                    table: CellTable = res.table
                    if set(res.unreadable) - set(result.unreadable) or res.cut_cells:
                        result.unreadable.update(res.unreadable)
                        result.cut_cells.update({str(k): v for k, v in res.cut_cells.items()})
                        # in the store as they arrive, so a resumed run still counts them
                        store.update_attrs({"unreadable": result.unreadable, "cut_cells": result.cut_cells})
                    store.append(table, batch.ids)
                    result.tiles_computed.extend(batch.ids)
                    result.n_cells += len(table)
                    succeeded += len(batch.ids)
                    self.reporter.tiles_done(len(batch.ids), len(table))
                else:
                    exc = _exception_of(fut)
                    self._failed(plan, store, batch, exc, queue, result)
                    if not succeeded and len(result.failed_tiles) >= min(FAIL_FAST_TILES, len(plan.tiles)):
                        first = next(iter(result.failed_tiles.values()))
                        raise SlideError(plan.path, f"no tile could be processed (first: {first})")
                fut.release()
                for new_fut in fill():
                    ac.add(new_fut)
        finally:
            if inflight:
                self.client.cancel([f for f, _ in inflight.values()])

    def _failed(
        self,
        plan: SlidePlan,
        store: CellStore,
        batch: _Batch,
        exc: BaseException | None,
        queue: deque[_Batch],
        result: SlideResult,
    ) -> None:
        if isinstance(exc, TaskError) and exc.scope == "run":
            raise RunAborted(f"workers cannot run the models: {exc.message}")
        if isinstance(exc, TaskError) and exc.scope == "slide":
            raise SlideError(plan.path, f"workers cannot open it: {exc.message}")
        deterministic = isinstance(exc, TaskError | KilledWorker)
        reason = _reason(exc)
        if not deterministic and batch.attempts < self.options.max_retries:
            log.debug("retrying batch %s after %s", batch.ids, reason)
            queue.appendleft(_Batch(batch.tiles, batch.attempts + 1))
            return
        if len(batch.tiles) > 1:
            # isolate the failing tile: one task per tile, fresh retry budget
            for t in reversed(batch.tiles):
                queue.appendleft(_Batch([t]))
            return
        tile = batch.tiles[0]
        store.mark_failed([tile.id])
        result.failed_tiles[tile.id] = reason
        self.reporter.tiles_done(1, 0)
        self.reporter.note(f"{plan.path}: tile {tile.id} failed and is excluded ({reason})")

    # ------------------------------------------------------------------ finish

    @staticmethod
    def _summarized(done: StoreSummary, result: SlideResult) -> None:
        result.n_cells = done.n_cells
        result.summary = done.summary
        result.status = done.summary.status
        for tid in done.failed_tiles:
            result.failed_tiles.setdefault(tid, "failed in an earlier run")


def _exception_of(fut: Future) -> BaseException | None:
    """The error of a failed or cancelled future (a cancelled one is retried like a transient error)."""
    try:
        return fut.exception()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # CancelledError derives from BaseException
        return exc


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, TaskError):
        return exc.message
    if isinstance(exc, KilledWorker):
        return "the worker process died while processing it"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _one_line(message: str, path: str) -> str:
    text = " ".join(message.split())
    return text if path in text else f"{path}: {text}"


def _check_resumable(have: dict[str, Any], want: dict[str, Any], where: Path) -> None:
    for key, what in (
        ("pipeline", "the pipeline settings"),
        ("models", "the model bundles"),
        ("tiles_selected", "the selected tiles"),
        ("rois", "the regions of interest"),
    ):
        if have.get(key) != want.get(key):
            raise OutputError(f"{where}: cannot resume: {what} changed since it was started; use --overwrite")
    hs, ws = have.get("slide", {}), want.get("slide", {})
    for key in ("dimensions", "mpp", "size_bytes"):
        if hs.get(key) != ws.get(key):
            raise OutputError(f"{where}: cannot resume: the slide's {key} changed; use --overwrite")

"""Run slides through a Dask cluster: plan → submit batches → collect → finish (DESIGN §1).

This module is the dispatch half of a run; what happens to a slide is the pipeline
layer's (:mod:`wsiflow.pipeline.plan`, :mod:`wsiflow.pipeline.batch`,
:mod:`wsiflow.pipeline.finish`). For each slide:

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

**Slides overlap** (``RunOptions.overlap``, the default): one dispatch loop on the calling
thread keeps a single window of at most ``max_in_flight`` batches outstanding across all
slides. A planner thread plans (and opens the stores of) up to :data:`PLAN_AHEAD` slides
ahead; the next planned slide joins the window as soon as the slides already in it have
fewer queued batches than the window holds, so the cluster never waits at a slide boundary;
batches go out earliest slide first. Once the last slide has gone to the planner (the run's
tail: at most ``PLAN_AHEAD + MAX_ACTIVE_SLIDES`` slides left) every planned slide joins and
the batch with the most work goes out first (:meth:`~wsiflow.pipeline.plan.SlidePlan.work`,
the stained area of its tiles, known from the plan), so the run does not end on one long
batch running alone while the other workers wait. A slide whose batches are all back is handed to one
finisher thread (finish, then record), in input order, so ``summary.csv`` rows are written
one at a time and in the order of a one-by-one run. Only the dispatch thread touches Dask
futures, the stores being appended to and the :class:`Reporter` (the threads' notes are
replayed by it). ``overlap=False`` is the one-slide-at-a-time path (plan, compute, finish,
record, next), kept for comparison (``wsiflow run --no-overlap``, the cohort benchmark).

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
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import Future as LocalFuture
from concurrent.futures import wait as wait_local
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
from wsiflow.execution.tasks import BatchResult, TaskError, batch_task
from wsiflow.execution.worker import ModelRefs, SlideRef, resolve_models
from wsiflow.heap import trim_freed_memory
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
# overlap: slides planned (stores opened) ahead of dispatch, and slides with batches in the window
PLAN_AHEAD = 2
MAX_ACTIVE_SLIDES = 4


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
    overlap: bool = True  # slides overlap on the cluster; False: one slide at a time (plan … record, next)

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

    @property
    def label(self) -> str:
        """The slide's unique name in this run (its output folder's); progress is keyed on it."""
        return self.out_dir.name if self.out_dir is not None else self.name

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
    """Progress sink; the CLI draws bars, tests record calls.

    The runner calls it from one thread only (the one that called :meth:`Runner.run`), also
    when slides overlap: several slides may be between ``slide_started`` and
    ``slide_finished`` at once, told apart by ``slide`` (:attr:`SlideResult.label`).
    """

    def run_started(self, n_slides: int) -> None: ...

    def slide_started(self, slide: str, total_tiles: int, done_tiles: int) -> None: ...

    def tiles_done(self, slide: str, n_tiles: int, n_cells: int) -> None: ...

    def slide_finished(self, result: SlideResult) -> None: ...

    def note(self, message: str) -> None: ...


class NullReporter:
    def run_started(self, n_slides: int) -> None:
        pass

    def slide_started(self, slide: str, total_tiles: int, done_tiles: int) -> None:
        pass

    def tiles_done(self, slide: str, n_tiles: int, n_cells: int) -> None:
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
    trim_freed_memory()  # the client's peak follows each step, not the sum of all (wsiflow.heap)
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
    work: float = 0.0  # SlidePlan.work of the tiles: the order of the run's tail

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tiles]


def _batches(tiles: Sequence[Tile], k: int) -> Iterator[_Batch]:
    for i in range(0, len(tiles), k):
        yield _Batch(list(tiles[i : i + k]))


def _tail_split(tiles: Sequence[Tile], k: int, threads: int) -> Iterator[_Batch]:
    """Batches of ``k`` tiles, the last ``k · threads`` tiles one per batch."""
    head = max(0, len(tiles) - k * threads) if k > 1 else len(tiles)
    yield from _batches(tiles[:head], k)
    yield from _batches(tiles[head:], 1)


def _next_slide(active: Sequence[_SlideRun], largest_first: bool) -> _SlideRun | None:
    """The slide whose next batch goes out: the earliest with batches queued; with
    ``largest_first`` (the run's tail) the one whose next batch has the most work, each queue
    sorted by work once, largest first, so that the run does not end on one long batch
    running alone while the other workers wait. None: nothing is queued."""
    waiting = [s for s in active if s.queue]
    if not waiting:
        return None
    if not largest_first:
        return waiting[0]
    for s in waiting:
        if not s.largest_first:
            s.queue = deque(sorted(s.queue, key=lambda b: -b.work))
            s.largest_first = True
    return max(waiting, key=lambda s: s.queue[0].work)  # ties: the earliest slide


@dataclass(eq=False)
class _SlideRun:
    """One slide on its way through a run (client side)."""

    index: int
    result: SlideResult
    out_dir: Path
    t0: float = field(default_factory=time.perf_counter)
    plan: SlidePlan | None = None
    store: CellStore | None = None  # None once planned: complete from an earlier run (resume)
    todo: list[Tile] = field(default_factory=list)
    queue: deque[_Batch] = field(default_factory=deque)  # batches not yet submitted
    largest_first: bool = False  # queue sorted by work, largest first (the run's tail)
    outstanding: set[Any] = field(default_factory=set)  # keys of its batches in flight
    succeeded: int = 0  # tiles whose batch came back
    failed: bool = False  # the slide failed (its error is in ``result``)

    @property
    def path(self) -> str:
        return self.result.path


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
        """Every input (overlapping on the cluster unless ``options.overlap`` is off);
        ``dirs`` is :func:`prepare_run`'s result (made here when None). Results in input order."""
        if dirs is None:
            dirs = prepare_run(self.options, inputs)
        with output_lock(self.options.out):  # one writer per output folder
            self.reporter.run_started(len(inputs))
            if self.options.overlap:
                results = self._overlapping(inputs, dirs)
            else:
                results = self._one_at_a_time(inputs, dirs)
            if self.options.report:
                record_run(self.options.out, self.reporter.note)
            return results

    def _one_at_a_time(self, inputs: Sequence[str], dirs: dict[str, Path]) -> list[SlideResult]:
        results: list[SlideResult] = []
        for path in inputs:
            result = self.one_slide(path, dirs[path])
            results.append(result)
            self._record(result, self.reporter.note)
            self.reporter.slide_finished(result)
        return results

    def _record(self, result: SlideResult, note: Callable[[str], None]) -> None:
        # one row per slide; rows of slides from earlier runs into the same OUT stay
        record_slide(
            self.options.out,
            result.record(),
            out_dir=result.out_dir if result.status != STATUS_ERROR else None,
            slide_path=result.path,
            report=self.options.report,
            note=note,
            storage=self.options.storage,
        )

    # ------------------------------------------------------------------ one slide

    def one_slide(self, path: str, out_dir: Path) -> SlideResult:
        """One slide, start to finish, on this thread (the sequential path)."""
        t0 = time.perf_counter()
        result = SlideResult(path=path, name=slide_name(path), out_dir=out_dir, status=STATUS_ERROR)
        try:
            self._compute_and_finish(_SlideRun(0, result, out_dir, t0))
        except Exception as exc:
            self._slide_failed(result, self._failure(exc, path, out_dir), self.reporter.note)
        result.seconds = time.perf_counter() - t0
        return result

    def _failure(self, exc: BaseException, path: str, out_dir: Path) -> str:
        """The one line of a slide that failed with ``exc``; re-raises what must stop the run
        (workers that cannot run the models, a full disk, an interrupt)."""
        if isinstance(exc, RunAborted):
            raise exc
        if isinstance(exc, WsiflowError):
            if getattr(exc, "errno", None) == errno.ENOSPC:
                raise exc  # a full disk fails every later write too: stop with this one line
            return _one_line(str(exc), path)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OutputError(
                f"{exc.filename or out_dir}: cannot write (No space left on device; "
                "free some space, then rerun with --resume)"
            ) from None
        if not isinstance(exc, Exception):
            raise exc
        # a bug must cost one slide, not the night's batch
        log.debug("slide %s failed", path, exc_info=exc)
        return _one_line(f"internal error: {_reason(exc)} (--debug shows details)", path)

    @staticmethod
    def _slide_failed(result: SlideResult, message: str, note: Callable[[str], None]) -> None:
        result.status = STATUS_ERROR
        result.error = message
        result.summary = None
        note(message)

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

    def _prepare(self, s: _SlideRun) -> None:
        """Plan the slide and open its store; the tiles still to do go to ``s.todo`` (no
        Dask, no reporter: it runs on the planner thread when slides overlap)."""
        o = self.options
        s.plan = plan = plan_slide(s.path, self.pipeline, o.mpp, o.backend, o.storage, o.roi)
        s.result.tiles_total = len(plan.tiles)
        s.store = self._open_store(plan, s.out_dir, s.result)
        if s.store is None:  # complete from an earlier run: same numbers, nothing recomputed
            s.result.tiles_skipped = len(plan.tiles)
            return
        done = np.asarray(s.store.done, bool)
        s.todo = [t for t in plan.tiles if not done[t.id]]
        s.result.tiles_skipped = len(plan.tiles) - len(s.todo)

    def _queue_batches(self, s: _SlideRun, last: bool = False) -> None:
        # batch_tiles is an upper bound: a small slide is cut finer so every worker thread
        # gets work (results do not depend on batching). The run's last slide ends in
        # one-tile batches (one batch's worth per worker thread), so the run does not end on
        # one long batch running alone while the other workers wait.
        threads = max(1, sum(self.client.nthreads().values()))
        k = max(1, min(self.batch_tiles, math.ceil(len(s.todo) / threads)))
        s.queue = deque(_tail_split(s.todo, k, threads) if last else _batches(s.todo, k))
        s.todo = []
        assert s.plan is not None
        for b in s.queue:
            b.work = s.plan.work(b.tiles)

    def _already_complete(self, s: _SlideRun) -> str:
        return f"{s.path}: already complete in {s.out_dir}; skipped (--resume)"

    def _summarize_complete(self, s: _SlideRun) -> None:
        assert s.plan is not None
        finished = CellStore.open(s.out_dir / "cells.zarr")  # read-only
        self._summarized(summarize_store(s.plan, finished, self.pipeline), s.result)

    def _compute_and_finish(self, s: _SlideRun) -> None:
        self._prepare(s)
        if s.store is None:
            self.reporter.note(self._already_complete(s))
            self._summarize_complete(s)
            return
        self.reporter.slide_started(s.result.label, s.result.tiles_total, s.result.tiles_skipped)
        self._queue_batches(s)
        self._compute(s)
        self._finish(s)

    def _finish(self, s: _SlideRun) -> None:
        """Summary, GeoJSON, ``summary.json``; the store marked complete (finisher thread when
        slides overlap)."""
        plan, store, result = s.plan, s.store, s.result
        assert plan is not None and store is not None
        if plan.tiles and len(result.failed_tiles) == len(plan.tiles):
            first = next(iter(result.failed_tiles.values()))
            raise SlideError(s.path, f"all {len(plan.tiles)} tiles failed (first: {first})")
        summary = finish_slide(
            plan,
            store,
            s.out_dir,
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
            batch_task,
            SlideRef(path=plan.path, mpp=self.options.mpp, backend=self.options.backend,
                     storage=self.options.storage),
            batch.tiles,
            self.pipeline,
            self.models,
            plan.rois,
            pure=False,
            key=f"wsiflow-batch-{batch.tiles[0].id}-{batch.attempts}-{os.urandom(6).hex()}",
        )

    def _stored(self, s: _SlideRun, res: BatchResult, batch: _Batch) -> None:
        """A batch came back: its cells into the slide's store, its tiles marked done."""
        result, store = s.result, s.store
        assert store is not None
        table: CellTable = res.table
        if set(res.unreadable) - set(result.unreadable) or res.cut_cells:
            result.unreadable.update(res.unreadable)
            result.cut_cells.update({str(k): v for k, v in res.cut_cells.items()})
            # in the store as they arrive, so a resumed run still counts them
            store.update_attrs({"unreadable": result.unreadable, "cut_cells": result.cut_cells})
        store.append(table, batch.ids)
        result.tiles_computed.extend(batch.ids)
        result.n_cells += len(table)
        s.succeeded += len(batch.ids)
        self.reporter.tiles_done(result.label, len(batch.ids), len(table))

    def _batch_failed(self, s: _SlideRun, batch: _Batch, exc: BaseException | None) -> None:
        self._failed(s, batch, exc)
        plan = s.plan
        assert plan is not None
        if not s.succeeded and len(s.result.failed_tiles) >= min(FAIL_FAST_TILES, len(plan.tiles)):
            first = next(iter(s.result.failed_tiles.values()))
            raise SlideError(s.path, f"no tile could be processed (first: {first})")

    def _compute(self, s: _SlideRun) -> None:
        """The sequential path: this slide's batches, at most ``max_in_flight`` outstanding."""
        assert s.plan is not None
        plan = s.plan
        limit = self._in_flight()
        inflight: dict[Any, tuple[Future, _Batch]] = {}

        def fill() -> list[Future]:
            new: list[Future] = []
            while s.queue and len(inflight) < limit:
                b = s.queue.popleft()
                fut = self._submit(plan, b)
                inflight[fut.key] = (fut, b)
                new.append(fut)
                self.peak_in_flight = max(self.peak_in_flight, len(inflight))
            return new

        if not s.queue:
            return
        ac = as_completed(fill(), loop=self.client.loop)  # backpressure: a result lets one more out
        try:
            for fut in ac:
                _, batch = inflight.pop(fut.key)
                if fut.status == "finished":
                    self._stored(s, fut.result(), batch)
                else:
                    self._batch_failed(s, batch, _exception_of(fut))
                fut.release()
                for new_fut in fill():
                    ac.add(new_fut)
        finally:
            if inflight:
                self.client.cancel([f for f, _ in inflight.values()])

    def _failed(self, s: _SlideRun, batch: _Batch, exc: BaseException | None) -> None:
        plan, store, queue, result = s.plan, s.store, s.queue, s.result
        assert plan is not None and store is not None
        if isinstance(exc, TaskError) and exc.scope == "run":
            raise RunAborted(f"workers cannot run the models: {exc.message}")
        if isinstance(exc, TaskError) and exc.scope == "slide":
            raise SlideError(plan.path, f"workers cannot open it: {exc.message}")
        deterministic = isinstance(exc, TaskError | KilledWorker)
        reason = _reason(exc)
        if not deterministic and batch.attempts < self.options.max_retries:
            log.debug("retrying batch %s after %s", batch.ids, reason)
            queue.appendleft(_Batch(batch.tiles, batch.attempts + 1, batch.work))
            return
        if len(batch.tiles) > 1:
            # isolate the failing tile: one task per tile, fresh retry budget
            for t in reversed(batch.tiles):
                queue.appendleft(_Batch([t], work=plan.work([t])))
            return
        tile = batch.tiles[0]
        store.mark_failed([tile.id])
        result.failed_tiles[tile.id] = reason
        self.reporter.tiles_done(result.label, 1, 0)
        self.reporter.note(f"{plan.path}: tile {tile.id} failed and is excluded ({reason})")

    # ------------------------------------------------------------------ overlapping slides

    def _finish_job(self, s: _SlideRun) -> list[str]:
        """Finisher thread: finish the slide (unless it failed), then its row and report.
        Returns the notes for the dispatch thread to pass to the reporter; raises only what
        must stop the run."""
        notes: list[str] = []
        if not s.failed:
            try:
                if s.store is None:
                    self._summarize_complete(s)
                else:
                    self._finish(s)
            except Exception as exc:
                self._slide_failed(s.result, self._failure(exc, s.path, s.out_dir), notes.append)
        s.result.seconds = time.perf_counter() - s.t0
        self._record(s.result, notes.append)
        return notes

    def _overlapping(self, inputs: Sequence[str], dirs: dict[str, Path]) -> list[SlideResult]:
        slides = [
            _SlideRun(i, SlideResult(path=p, name=slide_name(p), out_dir=d, status=STATUS_ERROR), d)
            for i, (p, d) in enumerate((p, dirs[p]) for p in inputs)
        ]
        limit = self._in_flight()
        pending: deque[_SlideRun] = deque(slides)  # not yet planned
        planning: deque[tuple[_SlideRun, LocalFuture[None]]] = deque()  # in input order
        active: list[_SlideRun] = []  # batches queued or in flight, in input order
        computed: dict[int, _SlideRun] = {}  # all batches back (or failed): waiting to be finished
        finishing: deque[tuple[_SlideRun, LocalFuture[list[str]]]] = deque()
        next_finish = 0  # slides go to the finisher in input order
        inflight: dict[Any, tuple[Future, _Batch, _SlideRun]] = {}  # by task key
        ac = as_completed([], loop=self.client.loop)
        planner = ThreadPoolExecutor(1, thread_name_prefix="wsiflow-plan")
        finisher = ThreadPoolExecutor(1, thread_name_prefix="wsiflow-finish")

        def computed_all(s: _SlideRun) -> None:
            if s in active:
                active.remove(s)
            computed[s.index] = s

        def drop(s: _SlideRun, exc: BaseException) -> None:
            """The slide failed: its one line, its batches cancelled; the others go on."""
            self._slide_failed(s.result, self._failure(exc, s.path, s.out_dir), self.reporter.note)
            s.failed = True
            s.queue.clear()
            gone = [inflight.pop(k)[0] for k in s.outstanding if k in inflight]
            s.outstanding.clear()
            if gone:
                self.client.cancel(gone)
            computed_all(s)

        def tail() -> bool:
            """Every slide is planned or planning: at most PLAN_AHEAD + MAX_ACTIVE_SLIDES left."""
            return not pending

        def can_activate() -> bool:
            if tail():  # all the rest join, so their batches can be ordered together
                return True
            return len(active) < MAX_ACTIVE_SLIDES and sum(len(a.queue) for a in active) < limit

        def activate(s: _SlideRun, planned: LocalFuture[None]) -> None:
            try:
                planned.result()
                if s.store is None:
                    self.reporter.note(self._already_complete(s))
                    computed_all(s)
                    return
                self.reporter.slide_started(s.result.label, s.result.tiles_total, s.result.tiles_skipped)
                self._queue_batches(s, last=not pending and not planning)
            except Exception as exc:
                drop(s, exc)
                return
            if s.queue:
                active.append(s)
            else:
                computed_all(s)

        def submit(s: _SlideRun) -> None:
            assert s.plan is not None
            b = s.queue.popleft()
            fut = self._submit(s.plan, b)
            inflight[fut.key] = (fut, b, s)
            s.outstanding.add(fut.key)
            ac.add(fut)
            self.peak_in_flight = max(self.peak_in_flight, len(inflight))

        def fill() -> None:
            while len(inflight) < limit:
                s = _next_slide(active, largest_first=tail())
                if s is None:
                    return
                submit(s)

        def collect(fut: Future) -> None:
            entry = inflight.pop(fut.key, None)
            if entry is None:  # a batch of a slide that failed meanwhile (cancelled)
                fut.release()
                return
            _, batch, s = entry
            s.outstanding.discard(fut.key)
            try:
                if fut.status == "finished":
                    self._stored(s, fut.result(), batch)
                else:
                    self._batch_failed(s, batch, _exception_of(fut))
            except Exception as exc:
                drop(s, exc)
            finally:
                fut.release()
            if not s.failed and not s.queue and not s.outstanding:
                computed_all(s)

        try:
            while True:
                while pending and len(planning) < PLAN_AHEAD:
                    s = pending.popleft()
                    planning.append((s, planner.submit(self._prepare, s)))
                while planning and planning[0][1].done() and can_activate():
                    activate(*planning.popleft())
                    if pending:
                        s = pending.popleft()
                        planning.append((s, planner.submit(self._prepare, s)))
                fill()
                while next_finish in computed:
                    s = computed.pop(next_finish)
                    next_finish += 1
                    finishing.append((s, finisher.submit(self._finish_job, s)))
                while finishing and finishing[0][1].done():
                    s, job = finishing.popleft()
                    for message in job.result():  # raises what must stop the run
                        self.reporter.note(message)
                    self.reporter.slide_finished(s.result)
                if next_finish == len(slides) and not finishing:
                    break
                # wait for a batch, the next plan (when it could join) or the next finished slide
                watch: list[LocalFuture[Any]] = []
                if planning and can_activate():
                    watch.append(planning[0][1])
                if finishing:
                    watch.append(finishing[0][1])
                if inflight:
                    if watch:
                        while not ac.has_ready() and not any(f.done() for f in watch):
                            time.sleep(0.01)
                    ready = ac.next_batch(block=not watch)
                    for fut in ready:
                        collect(fut)
                elif watch:
                    wait_local(watch, return_when=FIRST_COMPLETED)
                else:  # pragma: no cover - a slide is always planning, in flight or finishing
                    raise RuntimeError("dispatch stalled: no batch, plan or finish outstanding")
        finally:
            if inflight:
                self.client.cancel([f for f, _, _ in inflight.values()])
            planner.shutdown(wait=True, cancel_futures=True)
            finisher.shutdown(wait=True, cancel_futures=True)
        return [s.result for s in slides]

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

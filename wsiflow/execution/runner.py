"""Run slides through a Dask cluster: plan → submit batches → collect → write (DESIGN §1).

For each slide, in order:

1. **plan** (client): open the slide, require a trustworthy µm/px, build the tile grid,
   drop background tiles with the tissue mask of a thumbnail;
2. **resume bookkeeping**: ``OUT/<slide>/cells.zarr`` holds ``tiles/done``; with
   ``resume`` the finished tiles are skipped (after checking that the pipeline, models and
   slide are the ones the store was made with); a complete store skips the slide;
3. **submit** batches of ``batch_tiles`` tiles with at most ``max_in_flight`` tasks
   outstanding (backpressure: a new batch goes out only when one comes back), and
   **consume** results as they complete: append to the store, mark the tiles done;
4. **failures**: a batch whose tile cannot be read is split into single tiles; a transient
   error is retried a bounded number of times; a tile that still fails is recorded as
   failed (store and summary) and the slide completes without it;
5. **finish**: GeoJSON, ``summary.json`` and a row of ``OUT/summary.csv``, each written to
   a temporary name and renamed; the store is marked complete last.

The client holds at most ``max_in_flight`` small CellTables at a time, never all cells of
a slide as Python objects. Appends are idempotent per tile, so a task that Dask runs twice
(worker loss) changes nothing.
"""

from __future__ import annotations

import errno
import functools
import glob
import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson
from distributed import Client, Future, KilledWorker, as_completed

from wsiflow._version import __version__
from wsiflow.aggregate import summarize
from wsiflow.cells import CellTable
from wsiflow.config import Pipeline
from wsiflow.errors import MppError, OutputError, SlideError, WsiflowError
from wsiflow.execution.geoparquet import write_geoparquet
from wsiflow.execution.tasks import BatchResult, TaskError, run_batch
from wsiflow.models.bundle import ModelBundle
from wsiflow.pipeline import ModelRefs, SlideRef
from wsiflow.slide import open_slide
from wsiflow.tiling import Tile, TileGrid
from wsiflow.tissue import select_tiles, tissue_mask
from wsiflow.writers import geojson as geojson_writer
from wsiflow.writers import summary as summary_writer
from wsiflow.writers.lock import output_lock
from wsiflow.writers.paths import slide_output_dir
from wsiflow.writers.report import write_cohort_report, write_slide_report
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
]

log = logging.getLogger(__name__)

STATUS_ERROR = "error"
THUMBNAIL_MAX_PX = 4096
# a slide whose first tiles all fail (and none succeed) is given up after this many
FAIL_FAST_TILES = 8


class RunAborted(WsiflowError):
    """The run cannot continue (e.g. workers cannot load the models)."""


@dataclass(frozen=True)
class RunOptions:
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
    summary: dict[str, Any] | None = None
    row: dict[str, Any] | None = None  # flat summary.csv columns (SlideSummary.to_row)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != STATUS_ERROR


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


def expand_inputs(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Paths, globs and URLs → (unique inputs in order, notes about duplicates).

    An argument naming an existing file is taken literally even if it contains glob
    characters; a glob matching nothing is kept, so it gets its own "not found" line.
    """
    out: list[str] = []
    notes: list[str] = []
    seen: dict[str, str] = {}
    for arg in args:
        if "://" in arg:
            candidates = [arg]
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


def check_outputs(options: RunOptions, inputs: Sequence[str]) -> dict[str, Path]:
    """Output folder per input; refuses existing outputs without resume/overwrite."""
    taken: set[str] = set()
    dirs = {path: slide_output_dir(options.out, path, taken) for path in inputs}
    if options.retry_failed and not options.resume:
        raise OutputError("--retry-failed re-runs the failed tiles of existing outputs: use it with --resume")
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


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class SlidePlan:
    ref: SlideRef
    identity: dict[str, Any]
    grid: TileGrid
    tiles: list[Tile]  # selected (stained) tiles
    tissue_fraction: float


def _slide_name(path: str) -> str:
    base = path.rstrip("/").rsplit("/", 1)[-1]
    return base or path


def slide_uid(path: str, identity: Mapping[str, Any], head_bytes: int = 1 << 20) -> str:
    """A short hex id of the slide itself (what seeds its cells' UUIDs): a hash of its size,
    dimensions and first MiB (local files; a URL's path stands in), so the same slide gets
    the same UUIDs in any output folder and under any name, and two slides never share them."""
    h = hashlib.sha256()
    h.update(orjson.dumps([identity.get("size_bytes"), identity.get("dimensions")]))
    if "://" in path:
        h.update(path.encode("utf-8"))
    else:
        try:
            with open(path, "rb") as fh:
                h.update(fh.read(head_bytes))
        except OSError:
            h.update(str(Path(path).resolve()).encode("utf-8"))
    return h.hexdigest()[:32]


def plan_slide(path: str, pipeline: Pipeline, mpp: float | None, backend: str = "auto") -> SlidePlan:
    if "://" not in path:
        p = Path(path)
        if p.is_dir():
            raise SlideError(path, "is a directory, not a slide file")
    slide = open_slide(path, backend=backend, mpp=mpp)
    try:
        if slide.mpp is None:
            note = f"{slide.mpp_note}; " if getattr(slide, "mpp_note", None) else ""
            raise MppError(path, f"{note}no trustworthy µm/px in the file; pass --mpp X to set it")
        w, h = (int(v) for v in slide.dimensions)
        if w <= 0 or h <= 0:
            raise SlideError(path, f"image has zero size ({w}×{h})")
        grid = TileGrid.from_pipeline(w, h, float(slide.mpp), pipeline)
        # thumbnail near the configured µm/px (bounded), its true µm/px from its size
        want = max(w, h) * float(slide.mpp) / pipeline.tissue.thumbnail_mpp
        thumb = slide.thumbnail(int(min(THUMBNAIL_MAX_PX, max(64, round(want)))))
        thumb_mpp = w * float(slide.mpp) / max(1, thumb.shape[1])
        mask = tissue_mask(thumb, pipeline.tissue, mpp=thumb_mpp, slide_size=(w, h))
        tiles, fraction = select_tiles(grid, mask, pipeline.tissue.min_tile_fraction)
        size = None
        if "://" not in path:
            try:
                size = Path(path).stat().st_size
            except OSError:
                size = None
        identity = {
            "path": path if "://" in path else str(Path(path).resolve()),
            "name": _slide_name(path),
            "size_bytes": size,
            "dimensions": [w, h],
            "mpp": float(slide.mpp),
            "mpp_override": mpp,
            "vendor": slide.vendor,
            "objective_power": slide.objective_power,
            "backend": slide.backend,
            # QuPath's frame: level-0 minus the file's bounds corner (GeoJSON is written in it)
            "qupath_offset": list(slide.bounds_offset),
        }
        identity["uid"] = slide_uid(path, identity)
    finally:
        slide.close()
    ref = SlideRef(path=str(identity["path"]), mpp=mpp, backend=backend)
    return SlidePlan(ref, identity, grid, tiles, fraction)


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
        if self.batch_tiles < 1:
            raise OutputError("batch_tiles must be at least 1")

    # ------------------------------------------------------------------ public

    def run(self, inputs: Sequence[str]) -> list[SlideResult]:
        prepare_output(self.options.out)
        with output_lock(self.options.out):  # one writer per output folder
            return self._run(inputs)

    def _run(self, inputs: Sequence[str]) -> list[SlideResult]:
        dirs = check_outputs(self.options, inputs)
        results: list[SlideResult] = []
        for path in inputs:
            result = self.run_slide(path, dirs[path])
            results.append(result)
            # one row per slide; rows of slides from earlier runs into the same OUT stay
            csv_path = self.options.out / "summary.csv"
            summary_writer.update_summary_csv(csv_path, _csv_row(result), key="output")
            if self.options.report and result.out_dir is not None and result.status != STATUS_ERROR:
                self._write_report(
                    functools.partial(write_slide_report, result.out_dir, slide_path=path), path
                )
            self.reporter.slide_finished(result)
        if self.options.report:
            self._write_report(
                functools.partial(write_cohort_report, self.options.out), str(self.options.out)
            )
        return results

    def _write_report(self, write: Callable[[], object], what: str) -> None:
        # A report that cannot be drawn costs a note, never the slide's results.
        try:
            write()
        except (WsiflowError, OSError, ValueError) as exc:
            self.reporter.note(f"{what}: HTML report not written ({_reason(exc)})")

    # ------------------------------------------------------------------ one slide

    def run_slide(self, path: str, out_dir: Path) -> SlideResult:
        t0 = time.perf_counter()
        result = SlideResult(path=path, name=_slide_name(path), out_dir=out_dir, status=STATUS_ERROR)
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
        result.summary = result.row = None
        self.reporter.note(message)

    def _store_attrs(self, plan: SlidePlan) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline.model_dump(mode="json"),
            "models": {
                b.task: {"name": b.name, "sha256": b.sha256, "demo": bool(b.card.get("demo", False))}
                for b in self.bundles
            },
            "slide": plan.identity,
            "taxonomy": [c.model_dump(mode="json") for c in self.pipeline.taxonomy],
            "tiles_selected": [t.id for t in plan.tiles],
        }

    def _open_store(self, plan: SlidePlan, out_dir: Path, result: SlideResult) -> CellStore | None:
        """The store to append to, or None when the slide is already complete (resume)."""
        zpath = out_dir / "cells.zarr"
        attrs = self._store_attrs(plan)
        if out_dir.exists() and self.options.overwrite:
            shutil.rmtree(out_dir)
        if zpath.exists() and self.options.resume:
            store = CellStore.open(zpath, flush_seconds=self.options.flush_seconds)
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
        plan = plan_slide(path, self.pipeline, self.options.mpp, self.options.backend)
        result.tiles_total = len(plan.tiles)
        store = self._open_store(plan, out_dir, result)
        if store is None:  # complete from an earlier run: same numbers, nothing recomputed
            result.tiles_skipped = len(plan.tiles)
            self.reporter.note(f"{path}: already complete in {out_dir}; skipped (--resume)")
            self._summarize(plan, CellStore.open(out_dir / "cells.zarr", mode="r"), result)
            return
        done = np.asarray(store.done, bool)
        todo = [t for t in plan.tiles if not done[t.id]]
        result.tiles_skipped = len(plan.tiles) - len(todo)
        self.reporter.slide_started(result.name, len(plan.tiles), result.tiles_skipped)
        self._compute(plan, store, todo, result)
        if plan.tiles and len(result.failed_tiles) == len(plan.tiles):
            first = next(iter(result.failed_tiles.values()))
            raise SlideError(path, f"all {len(plan.tiles)} tiles failed (first: {first})")
        self._finish(plan, store, out_dir, result)

    def _in_flight(self) -> int:
        if self.options.max_in_flight:
            return max(1, self.options.max_in_flight)
        threads = sum(self.client.nthreads().values())
        return max(2, 2 * threads)

    def _submit(self, plan: SlidePlan, batch: _Batch) -> Future:
        return self.client.submit(
            run_batch,
            plan.ref,
            batch.tiles,
            self.pipeline,
            self.models,
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
                        raise SlideError(plan.ref.path, f"no tile could be processed (first: {first})")
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
            raise SlideError(plan.ref.path, f"workers cannot open it: {exc.message}")
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
        self.reporter.note(f"{plan.ref.path}: tile {tile.id} failed and is excluded ({reason})")

    # ------------------------------------------------------------------ finish

    def _summarize(self, plan: SlidePlan, store: CellStore, result: SlideResult) -> set[int]:
        if store.writable:
            store.flush()
        failed = np.flatnonzero(np.asarray(store.failed, bool))
        failed_set = {int(i) for i in failed}
        selected_area = sum(t.core.w * t.core.h for t in plan.tiles) or 1.0
        failed_area = sum(t.core.w * t.core.h for t in plan.tiles if t.id in failed_set)
        class_ids = store.read_column("class_id")  # one small column, not the polygons
        w, h = plan.identity["dimensions"]  # the grid's cores tile the whole slide
        result.unreadable = {**(store.attrs.get("unreadable") or {}), **result.unreadable}
        result.cut_cells = {**(store.attrs.get("cut_cells") or {}), **result.cut_cells}
        lost = sum((b[2] - b[0]) * (b[3] - b[1]) for b in result.unreadable.values())
        summary = summarize(
            class_ids,
            self.pipeline,
            failed_tiles=len(failed_set),
            failed_area_fraction=failed_area / selected_area,
            tiles_total=len(plan.tiles),
            tissue_skipped_fraction=max(0.0, 1.0 - sum(t.core.w * t.core.h for t in plan.tiles) / (w * h)),
            unreadable_tiles=len(result.unreadable),
            cells_cut_at_read_edge=sum(result.cut_cells.values()),
            unreadable_area_fraction=min(1.0, lost / selected_area),
        )
        result.n_cells = len(class_ids)
        result.summary = summary.to_dict()
        result.row = summary.to_row()
        result.status = summary.status
        for tid in failed_set:
            result.failed_tiles.setdefault(tid, "failed in an earlier run")
        return failed_set

    def _finish(self, plan: SlidePlan, store: CellStore, out_dir: Path, result: SlideResult) -> None:
        failed_set = self._summarize(plan, store, result)
        if self.pipeline.outputs.geojson:
            # streamed from the store in canonical id order, a chunk at a time (bounded memory)
            geojson_writer.write_geojson(
                out_dir / "cells.geojson.gz",
                store.iter_sorted(),
                self.pipeline.taxonomy,
                slide_id=str(plan.identity.get("uid") or out_dir.name),
                offset=tuple(plan.identity.get("qupath_offset") or (0, 0)),
            )
        if self.options.geoparquet or self.pipeline.outputs.geoparquet:
            cells = store.read_table().sorted()  # opt-in output: pyarrow writes one table
            write_geoparquet(out_dir / "cells.parquet", cells, self.pipeline.taxonomy)
            del cells
        doc = {
            "wsiflow_version": __version__,
            "slide": plan.identity,
            "pipeline": self.pipeline.name,
            "models": self._store_attrs(plan)["models"],
            "tissue_fraction": plan.tissue_fraction,
            "tiles": {
                "grid": len(plan.grid),
                "selected": len(plan.tiles),
                "failed": sorted(failed_set),
                # source tiles of the file that could not be decoded (read as white): level/col/row → box
                "unreadable_source_tiles": dict(sorted(result.unreadable.items())),
            },
            "summary": result.summary,
        }
        summary_writer.write_summary_json(out_dir / "summary.json", doc)
        store.finalize({"summary_status": result.status})


def _csv_row(r: SlideResult) -> dict[str, Any]:
    row: dict[str, Any] = {"slide": r.name, "path": r.path, "output": str(r.out_dir or "")}
    if r.row is not None:
        row.update(r.row)
    row.setdefault("status", r.status)
    row.setdefault("error", r.error or "")
    return row


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
    ):
        if have.get(key) != want.get(key):
            raise OutputError(f"{where}: cannot resume: {what} changed since it was started; use --overwrite")
    hs, ws = have.get("slide", {}), want.get("slide", {})
    for key in ("dimensions", "mpp", "size_bytes"):
        if hs.get(key) != ws.get(key):
            raise OutputError(f"{where}: cannot resume: the slide's {key} changed; use --overwrite")

"""Finish one slide on the client, once its tiles are in the cell store (DESIGN §1, §5).

:func:`finish_slide` is the one place a slide's results are assembled, in this order:

1. the summary of the committed cells (:func:`summarize_store`: one small column read,
   never the polygons);
2. ``cells.geojson.gz`` (QuPath), streamed from the store in id order, and, opt-in,
   ``cells.parquet`` (GeoParquet);
3. ``summary.json`` (identity, models, tiles, the summary), written atomically;
4. the store is marked complete last, so a killed run never looks finished.

:func:`record_slide` then writes the slide's row of ``OUT/summary.csv`` and its HTML
report (also for slides finished by an earlier run; a failed slide gets its error row
only); :func:`record_run` writes ``OUT/report.html``. Every file is written to a
temporary name and renamed (:mod:`wsiflow.atomic`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsiflow._version import __version__
from wsiflow.aggregate import SlideSummary, summarize
from wsiflow.config import Pipeline
from wsiflow.errors import WsiflowError
from wsiflow.pipeline.plan import SlidePlan
from wsiflow.types import StorageOptions
from wsiflow.writers import geojson as geojson_writer
from wsiflow.writers import summary as summary_writer
from wsiflow.writers.geoparquet import write_geoparquet
from wsiflow.writers.record import SlideRecord, TileCounts
from wsiflow.writers.report import write_cohort_report, write_slide_report
from wsiflow.writers.zarr_store import CellStore

if TYPE_CHECKING:
    from wsiflow.models.bundle import ModelBundle

__all__ = [
    "StoreSummary",
    "finish_slide",
    "model_meta",
    "record_run",
    "record_slide",
    "summarize_store",
]


@dataclass(frozen=True)
class StoreSummary:
    """The summary of a slide's committed cells and the tiles that failed (any run)."""

    summary: SlideSummary
    failed_tiles: frozenset[int]
    n_cells: int
    # per region of interest (``--roi``): name, area, cells and their own summary; the slide's
    # summary above is their union
    rois: tuple[dict[str, Any], ...] = ()


def model_meta(bundles: Sequence[ModelBundle]) -> dict[str, dict[str, Any]]:
    """Per task: the bundle's name, sha256 and demo flag (store attributes, summary.json)."""
    return {
        b.task: {"name": b.name, "sha256": b.sha256, "demo": bool(b.card.get("demo", False))}
        for b in bundles
    }


def summarize_store(plan: SlidePlan, store: CellStore, pipeline: Pipeline) -> StoreSummary:
    """Counts and calls of the committed cells of done tiles; failed area from ``tiles/failed``."""
    if store.writable:
        store.flush()
    failed = np.flatnonzero(np.asarray(store.failed, bool))
    failed_set = frozenset(int(i) for i in failed)
    selected_area = sum(t.core.w * t.core.h for t in plan.tiles) or 1.0
    failed_area = sum(t.core.w * t.core.h for t in plan.tiles if t.id in failed_set)
    class_ids = store.read_column("class_id")  # one small column, not the polygons
    w, h = plan.identity["dimensions"]  # the grid's cores tile the whole slide
    unreadable = unreadable_tiles(store)
    lost = sum((b[2] - b[0]) * (b[3] - b[1]) for b in unreadable.values())
    counted = functools.partial(
        summarize,
        pipeline=pipeline,
        failed_tiles=len(failed_set),
        failed_area_fraction=failed_area / selected_area,
        tiles_total=len(plan.tiles),
        tissue_skipped_fraction=max(0.0, 1.0 - sum(t.core.w * t.core.h for t in plan.tiles) / (w * h)),
        unreadable_tiles=len(unreadable),
        unreadable_area_fraction=min(1.0, lost / selected_area),
        cells_cut_at_read_edge=sum(int(v) for v in (store.attrs.get("cut_cells") or {}).values()),
    )
    rois: list[dict[str, Any]] = []
    if plan.rois is not None:
        inside = plan.rois.inside(store.read_column("x"), store.read_column("y"))
        mpp = float(plan.identity.get("mpp") or 0.0)
        for name, geom, mask in zip(plan.rois.names, plan.rois.geoms, inside, strict=True):
            rois.append(
                {
                    "name": name,
                    "area_mm2": round(float(geom.area) * mpp * mpp / 1e6, 6),
                    "n_cells": int(mask.sum()),
                    "summary": counted(class_ids[mask]).to_dict(),
                }
            )
    return StoreSummary(counted(class_ids), failed_set, len(class_ids), tuple(rois))


def unreadable_tiles(store: CellStore) -> dict[str, list[float]]:
    """Corrupt source tiles of the file met so far (read as white): "level/col/row" → level-0
    box; the runner records them in the store's attributes as batches report them."""
    raw = store.attrs.get("unreadable") or {}
    return {str(k): [float(x) for x in v] for k, v in raw.items()}


def finish_slide(
    plan: SlidePlan,
    store: CellStore,
    out_dir: Path,
    pipeline: Pipeline,
    models: Mapping[str, Any],
    *,
    geoparquet: bool = False,
) -> StoreSummary:
    """Summary, GeoJSON, (GeoParquet,) ``summary.json``, then mark the store complete."""
    done = summarize_store(plan, store, pipeline)
    if pipeline.outputs.geojson:
        # streamed from the store in canonical id order, a chunk at a time (bounded memory)
        geojson_writer.write_geojson(
            out_dir / "cells.geojson.gz",
            store.iter_sorted(),
            pipeline.taxonomy,
            slide_id=str(plan.identity.get("uid") or out_dir.name),
            offset=tuple(plan.identity.get("qupath_offset") or (0, 0)),
        )
    if geoparquet or pipeline.outputs.geoparquet:
        cells = store.read_table().sorted()  # opt-in output: pyarrow writes one table
        write_geoparquet(out_dir / "cells.parquet", cells, pipeline.taxonomy)
        del cells
    record = SlideRecord(
        name=str(plan.identity.get("name") or ""),
        path=plan.path,
        output=str(out_dir),
        status=done.summary.status,
        error=done.summary.error,
        identity=plan.identity,
        pipeline=pipeline.name,
        models=models,
        tissue_fraction=plan.tissue_fraction,
        tiles=TileCounts(
            len(plan.grid), len(plan.tiles), tuple(sorted(done.failed_tiles)), unreadable_tiles(store)
        ),
        summary=done.summary,
        wsiflow_version=__version__,
        rois=done.rois,
    )
    summary_writer.write_summary_json(out_dir / "summary.json", record.to_json())
    store.finalize({"summary_status": done.summary.status})
    return done


def record_slide(
    out: Path,
    record: SlideRecord,
    *,
    out_dir: Path | None,
    slide_path: str,
    report: bool,
    note: Callable[[str], None],
    storage: StorageOptions | None = None,
) -> None:
    """The slide's row of ``OUT/summary.csv`` (rows of other slides stay) and, when
    ``out_dir`` holds results, its ``report.html`` (``storage``: fsspec options to read a
    slide at a URL for its pictures)."""
    summary_writer.update_summary_csv(out / "summary.csv", record.to_row(), key="output")
    if report and out_dir is not None:
        write = functools.partial(
            write_slide_report,
            out_dir,
            slide_path=slide_path,
            storage_options=storage.to_dict() if storage else None,
        )
        _report(write, slide_path, note)


def record_run(out: Path, note: Callable[[str], None]) -> None:
    """``OUT/report.html``: one row per slide of ``OUT/summary.csv``."""
    _report(functools.partial(write_cohort_report, out), str(out), note)


def _report(write: Callable[[], object], what: str, note: Callable[[str], None]) -> None:
    # A report that cannot be drawn costs a note, never the slide's results.
    try:
        write()
    except (WsiflowError, OSError, ValueError) as exc:
        note(f"{what}: HTML report not written ({_reason(exc)})")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

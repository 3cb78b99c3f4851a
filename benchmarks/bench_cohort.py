"""Cohort throughput (issue 16, item 2): N generated slides of mixed sizes vs one slide of the
same total area, on the same cluster with the same models, before and after slides overlap.

Per cluster (an embedded ``LocalCluster`` 2 workers × 1 thread, and a real ``dask scheduler``
+ 2 ``dask worker`` processes on 127.0.0.1 used through ``--scheduler``), after a warm-up
slide on that cluster:

* ``single``: one slide of the cohort's total area (the baseline every ratio divides by);
* ``sequential``: the cohort through ``RunOptions(overlap=False)``, the one-slide-at-a-time
  path (plan, compute, finish, record, next slide): the "before";
* ``overlap``: the cohort through the default path (slides overlap on the cluster): the "after".

Busy fraction: the batch tasks' compute time from Dask's task stream, divided by (worker
threads × the span from the run's first submit to its last task's end); ``busy_fraction_wall``
divides by the run's whole wall time instead (first plan to last report). Task times are
wall-clock, so on a shared machine they grow with its load; ``worker_cpu_s`` (the workers'
process CPU time over the run, ``time.process_time`` in each) and ``cells_per_worker_cpu_s``
do not, and ``client_cpu_s`` is the CPU time of this process (the client, and the embedded
cluster's scheduler).

``reads``: the tiles each run reads and the megapixels of their seg images (at ``seg_mpp``), as
the workers read them (clipped to the slide, :meth:`wsiflow.tiling.Tile.within`) and at the full
tile + halo size every read had before; ``seg_mpx_read_per_s`` beside ``cells_per_s`` says how
much of a ratio is the U-Net's work and how much the cells and the per-slide costs.

Then a **simulated larger cluster** (``--sim-workers``, default 4, 8, 16 ``dask worker``
processes on loopback): the same slides and the real runner, planning, finishing and
recording, but every batch task is replaced (in this script only, by patching the name the
runner submits) by one that sleeps ``--sim-tile-s`` per tile and returns no cells. Its busy
fraction shows the idle time at slide boundaries as workers grow, sequential vs overlap;
its finishing writes zero-cell outputs, so it understates the finishing cost of real slides.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import ROOT, SlideSpec, bench_pipeline, emit, log, machine, ratio, synth_slide
from e2e import warm_slide
from options import bench_parser

# (width, height) of each cohort slide at 0.25 µm/px; the pipeline's 512-µm tiles are 2048 px
FULL_SIZES = [(2000, 2000), (1500, 1500), (2500, 2500), (2000, 3000), (1500, 2000), (2200, 2200)]
QUICK_SIZES = [(1200, 1200), (1600, 1600), (1000, 1400)]
SIM_TILE_UM = 64.0  # simulated runs: 256-px tiles, so that 16 workers have tiles to share


def cohort_specs(sizes: list[tuple[int, int]]) -> tuple[list[SlideSpec], SlideSpec]:
    specs = [SlideSpec(w, h, seed=20 + i) for i, (w, h) in enumerate(sizes)]
    side = round(math.sqrt(sum(w * h for w, h in sizes)))
    return specs, SlideSpec(side, side, seed=19)


def timed_runner() -> type:
    """The real Runner, recording the wall-clock time of its first submit."""
    from wsiflow.execution.runner import Runner

    class TimedRunner(Runner):
        first_submit: float | None = None

        def _submit(self, plan: Any, batch: Any) -> Any:
            if self.first_submit is None:
                self.first_submit = time.time()
            return super()._submit(plan, batch)

    return TimedRunner


def _compute_spans(tasks: list[dict[str, Any]]) -> list[tuple[float, float]]:
    spans = []
    for t in tasks:
        if not str(t.get("key", "")).startswith("wsiflow-batch"):
            continue
        for ss in t.get("startstops", ()):
            if ss.get("action") == "compute":
                spans.append((float(ss["start"]), float(ss["stop"])))
    return spans


def run_config(
    client: Any, pipe: Any, refs: Any, bundles: Any, slides: list[Path], out: Path, overlap: bool,
    label: str,
) -> dict[str, Any]:
    """The real Runner over ``slides`` on ``client``; wall time, throughput, busy fraction."""
    from distributed import get_task_stream

    from wsiflow.execution.runner import RunOptions

    if out.exists():
        shutil.rmtree(out)
    runner = timed_runner()(client, pipe, refs, bundles, RunOptions(out=out, overlap=overlap))
    threads = sum(client.nthreads().values())
    load_before = os.getloadavg()
    cpu_before = client.run(time.process_time)
    with get_task_stream(client=client) as ts:
        t0 = time.perf_counter()
        c0 = time.process_time()
        results = runner.run([str(s) for s in slides])
        wall = time.perf_counter() - t0
        client_cpu = time.process_time() - c0
    cpu_after = client.run(time.process_time)
    worker_cpu = sum(cpu_after[w] - cpu_before[w] for w in cpu_after if w in cpu_before)
    bad = [r for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"{label}: {bad[0].path}: {bad[0].error}")
    spans = _compute_spans(list(ts.data))
    busy = sum(b - a for a, b in spans)
    span = max(b for _, b in spans) - float(runner.first_submit) if spans and runner.first_submit else None
    cells = sum(r.n_cells for r in results)
    tiles = sum(r.tiles_total for r in results)
    mpx = sum(_mpx(s) for s in slides)
    res = {
        "mode": label,
        "overlap": overlap,
        "slides": len(results),
        "cells": cells,
        "tiles": tiles,
        "tasks": len(spans),
        "worker_threads": threads,
        "wall_s": round(wall, 2),
        "cells_per_s": round(cells / wall, 2),
        "tiles_per_s": round(tiles / wall, 3),
        "mpx_per_s": round(mpx / wall, 3),
        "task_compute_s": round(busy, 2),
        "span_first_submit_to_last_task_s": round(span, 2) if span else None,
        "busy_fraction": round(busy / (threads * span), 3) if span else None,
        "busy_fraction_wall": round(busy / (threads * wall), 3),
        "idle_worker_s": round(threads * span - busy, 2) if span else None,
        "worker_cpu_s": round(worker_cpu, 2),
        "cells_per_worker_cpu_s": round(cells / worker_cpu, 2) if worker_cpu > 0 else None,
        "client_cpu_s": round(client_cpu, 2),
        "load_avg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    log(f"{label}: {res}")
    return res


_SIZES: dict[str, int] = {}


def _mpx(slide: Path) -> float:
    return _SIZES[str(slide)] / 1e6


def read_sizes(slides: list[Path], pipe: Any, seg_bundle: Any) -> dict[str, Any]:
    """Tiles and seg-image Mpx read for ``slides``: clipped to the slide as ``process_tile``
    reads them, and at the full tile + halo size (the reads before clipping)."""
    from wsiflow.pipeline.batch import edge_margin
    from wsiflow.pipeline.plan import plan_slide
    from wsiflow.segment import Segmenter

    margin, align = edge_margin(Segmenter(seg_bundle, pipe.segmenter), pipe)
    tiles, clipped, full = 0, 0, 0
    for s in slides:
        plan = plan_slide(str(s), pipe, None)
        for t in plan.tiles:
            c = t.within(plan.grid.width, plan.grid.height, margin, align)
            clipped += c.read_px[0] * c.read_px[1]
            full += t.read_px[0] * t.read_px[1]
        tiles += len(plan.tiles)
    return {
        "tiles": tiles,
        "seg_mpx_read": round(clipped / 1e6, 2),
        "seg_mpx_read_full_size": round(full / 1e6, 2),
        "edge_margin_px": margin,
        "align_px": align,
    }


def cluster_block(
    client: Any, pipe: Any, refs: Any, bundles: Any, cohort: list[Path], single: Path, warm: Path, out: Path
) -> dict[str, Any]:
    from wsiflow.execution.runner import Runner, RunOptions
    from wsiflow.execution.tasks import batch_task
    from wsiflow.execution.worker import SlideRef

    tw = time.perf_counter()
    client.run(batch_task, SlideRef(str(warm.resolve())), [], pipe, refs)  # every worker loads the models
    Runner(client, pipe, refs, bundles, RunOptions(out=out / "warm", overwrite=True)).run([str(warm)])
    block: dict[str, Any] = {"warmup_s": round(time.perf_counter() - tw, 2)}
    block["single"] = run_config(client, pipe, refs, bundles, [single], out / "single", True, "single")
    block["sequential"] = run_config(client, pipe, refs, bundles, cohort, out / "seq", False, "sequential")
    block["overlap"] = run_config(client, pipe, refs, bundles, cohort, out / "overlap", True, "overlap")
    reads = {"single": read_sizes([single], pipe, bundles[0]), "cohort": read_sizes(cohort, pipe, bundles[0])}
    block["reads"] = reads
    for mode, which in (("single", "single"), ("sequential", "cohort"), ("overlap", "cohort")):
        block[mode]["seg_mpx_read"] = reads[which]["seg_mpx_read"]
        block[mode]["seg_mpx_read_per_s"] = round(reads[which]["seg_mpx_read"] / block[mode]["wall_s"], 3)
    base = block["single"]
    keys = ("cells_per_s", "tiles_per_s", "mpx_per_s", "seg_mpx_read_per_s", "cells_per_worker_cpu_s")
    block["ratios_vs_single"] = {
        mode: {k: ratio(block[mode][k], base[k]) for k in keys} for mode in ("sequential", "overlap")
    }
    block["overlap_vs_sequential_wall"] = ratio(block["sequential"]["wall_s"], block["overlap"]["wall_s"])
    return block


def fixed_cost_task(tile_s: float) -> Callable[..., Any]:
    """The simulated task: ``tile_s`` of sleep per tile, no cells (defined in ``__main__``, so
    Dask ships it by value; the workers never load a model)."""

    def batch_task(slide_ref: Any, tiles: Any, pipeline: Any, models: Any, rois: Any = None) -> Any:
        from wsiflow.cells import CellTable
        from wsiflow.execution.tasks import BatchResult

        time.sleep(tile_s * len(tiles))
        return BatchResult(CellTable.empty(len(pipeline.taxonomy)))

    return batch_task


@contextmanager
def fixed_cost_tasks(tile_s: float) -> Iterator[None]:
    import wsiflow.execution.runner as runner_mod

    real = runner_mod.batch_task
    runner_mod.batch_task = fixed_cost_task(tile_s)  # type: ignore[assignment]
    try:
        yield
    finally:
        runner_mod.batch_task = real  # type: ignore[assignment]


def sim_pipeline(pipeline_path: Path, work: Path) -> Path:
    import yaml

    data = yaml.safe_load(pipeline_path.read_text(encoding="utf-8"))
    data["name"] = f"{data['name']}-sim"
    data["tiling"] = {**data["tiling"], "tile_um": SIM_TILE_UM, "batch_tiles": 1}
    out = work / "bench-cohort-sim.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return out


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--skip-external", action="store_true", help="embedded cluster only")
    ap.add_argument("--sim-only", action="store_true", help="only the simulated clusters")
    ap.add_argument("--sim-workers", default="4,8,16", help="simulated cluster sizes ('' skips them)")
    ap.add_argument("--sim-tile-s", type=float, default=0.5, help="simulated seconds per tile")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cohort.json")
    a = ap.parse_args()

    from wsiflow.config import load_pipeline
    from wsiflow.execution.cluster import ClusterOptions, connect
    from wsiflow.execution.loopback import loopback_cluster
    from wsiflow.execution.worker import resolve_models

    t_start = time.perf_counter()
    pipeline_path, minfo = bench_pipeline(a.work, a.models)
    specs, single_spec = cohort_specs(QUICK_SIZES if a.quick else FULL_SIZES)
    cohort, cinfo = zip(*(synth_slide(a.work, s) for s in specs), strict=True)
    single, sinfo = synth_slide(a.work, single_spec)
    for s, spec in [*zip(cohort, specs, strict=True), (single, single_spec)]:
        _SIZES[str(s)] = spec.width * spec.height
    warm = warm_slide(a.work)
    pipe = load_pipeline(pipeline_path)
    refs, bundles = resolve_models(pipe, "cpu")
    out = a.work / "out" / "cohort"
    result: dict[str, Any] = {
        "bench": "cohort (issue 16)",
        "machine": {**machine(), "load_avg_start": [round(x, 2) for x in os.getloadavg()]},
        "models": minfo,
        "data": "generated smears (wsiflow.synth), 0.25 µm/px, 1600 nucleated cells/mm²",
        "cohort_slides": list(cinfo),
        "cohort_mpx": round(sum(w * h for w, h in (QUICK_SIZES if a.quick else FULL_SIZES)) / 1e6, 2),
        "single_slide": sinfo,
        "baseline": "one slide of the same total area, same cluster, same models (the 'single' run)",
        "targets": {"overlap cells/s vs single": ">= 0.9", "busy_fraction (2 workers)": ">= 0.9"},
        "clusters": {},
    }
    cohort_l = list(cohort)
    if not a.sim_only:
        with connect(ClusterOptions(n_workers=2, threads_per_worker=1, device="cpu")) as session:
            result["clusters"]["embedded_2x1"] = cluster_block(
                session.client, pipe, refs, bundles, cohort_l, single, warm, out / "embedded"
            )
    if not (a.skip_external or a.sim_only):
        with (
            loopback_cluster(a.work / "logs" / "cohort-dask", n_workers=2, nthreads=1, timeout=120.0) as dp,
            connect(ClusterOptions(scheduler=dp.address)) as session,
        ):
            result["clusters"]["external_2x1"] = cluster_block(
                session.client, pipe, refs, bundles, cohort_l, single, warm, out / "external"
            )

    sim_sizes = [int(x) for x in a.sim_workers.split(",") if x.strip()]
    if sim_sizes:
        spipe_path = sim_pipeline(pipeline_path, a.work)
        spipe = load_pipeline(spipe_path)
        srefs, sbundles = resolve_models(spipe, "cpu")
        sim: dict[str, Any] = {
            "what": (
                "the real runner (planning, finishing, summary.csv, reports) on a real dask scheduler + "
                f"N dask worker processes (1 thread each) on loopback; every batch task replaced by a "
                f"sleep of {a.sim_tile_s} s per tile returning no cells (benchmark-only patch of the "
                "function the runner submits); finishing writes zero-cell outputs"
            ),
            "tile_s": a.sim_tile_s,
            "tile_um": SIM_TILE_UM,
            "batch_tiles": 1,
            "workers": {},
        }
        with fixed_cost_tasks(a.sim_tile_s):
            for n in sim_sizes:
                with (
                    loopback_cluster(a.work / "logs" / f"cohort-sim{n}", n_workers=n, nthreads=1,
                                     timeout=300.0) as dp,
                    connect(ClusterOptions(scheduler=dp.address)) as session,
                ):
                    c = session.client
                    row = {
                        mode: run_config(c, spipe, srefs, sbundles, cohort_l, out / f"sim{n}-{mode}", ov,
                                         f"sim {n} workers {mode}")
                        for mode, ov in (("sequential", False), ("overlap", True))
                    }
                    sim["workers"][str(n)] = row
        result["simulated"] = sim

    result["summary"] = {
        name: {
            "single_cells_per_s": blk["single"]["cells_per_s"],
            "sequential_cells_per_s": blk["sequential"]["cells_per_s"],
            "overlap_cells_per_s": blk["overlap"]["cells_per_s"],
            "sequential_vs_single": blk["ratios_vs_single"]["sequential"]["cells_per_s"],
            "overlap_vs_single": blk["ratios_vs_single"]["overlap"]["cells_per_s"],
            "busy_fraction_sequential": blk["sequential"]["busy_fraction"],
            "busy_fraction_overlap": blk["overlap"]["busy_fraction"],
        }
        for name, blk in result["clusters"].items()
    }
    if "simulated" in result:
        result["summary"]["simulated_busy_fraction"] = {
            n: {m: v[m]["busy_fraction"] for m in ("sequential", "overlap")}
            for n, v in result["simulated"]["workers"].items()
        }
    emb = result["clusters"].get("embedded_2x1")
    if emb is not None:
        ov = emb["ratios_vs_single"]["overlap"]["cells_per_s"]
        result["targets_met"] = {
            "overlap cells/s vs single >= 0.9 (embedded)": ov is not None and ov >= 0.9,
            "busy_fraction >= 0.9 (embedded, overlap)": (emb["overlap"]["busy_fraction"] or 0) >= 0.9,
        }
    result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    import json

    a.out.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    emit(result)


if __name__ == "__main__":
    main()

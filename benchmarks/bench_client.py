"""Client memory without the models (issue 16 item 5: B9's client peak on a big slide).

B9 (``bench_wholeslide.py``) takes ~19 min on a 40000² slide; this measures the client's
own steps in minutes, each in a fresh process, peak RSS (``VmHWM``) beside a small input in
the same invocation:

* **plan**: ``plan_slide`` (thumbnail, tissue mask, grid) of the small slide and of the big
  one;
* **finish**: ``finish_slide`` (summary, ``cells.geojson.gz``, ``summary.json``) then
  ``record_slide`` (``summary.csv`` row, ``report.html``) of a synthetic cell store of N cells
  (star-shaped polygons of 16-32 vertices, 8-class probabilities) spread over the big slide's
  tiles, for each N of ``--cells``;
* **runner**: the real runner (``run_slides``, embedded cluster of 2 workers × 1 thread, as
  ``wsiflow run``) on the small and the big slide with the batch task replaced (in this
  script's process only) by one returning ``--cells-per-tile`` synthetic cells per tile after
  ``--tile-s`` of sleep; the store checkpoints every ``--flush-s`` seconds so that a checkpoint
  holds about as many cells as in B9 (88 cells/s × 10 s); the client's peak by phase.

Slides: the small one is B9's (generated 4000², seed 5); the big one a ``--size``² mosaic of
a generated 2000² block (``mosaic_slide.py``), both cached in ``--work``. It measures the
installed ``wsiflow``: run it with another install's Python for a before/after.

    python benchmarks/bench_client.py --cells 1000,100000,1000000
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import SlideSpec, emit, log, machine, ratio, synth_slide
from options import bench_parser

SMALL = SlideSpec(4000, 4000, seed=5)  # B9's small slide
PHASES = ("plan", "finish", "record")


def _status(key: str) -> float:
    """A ``/proc/self/status`` figure in MB (VmRSS, VmHWM)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # VmHWM := VmRSS


def mosaic(work: Path, size: int) -> Path:
    path = work / f"mosaic_{size}_b2000.svs"
    if not path.is_file():
        log(f"generating {path.name} ...")
        script = Path(__file__).with_name("mosaic_slide.py")
        cmd = [
            sys.executable,
            str(script),
            str(path),
            "--block",
            "2000",
            "--size",
            str(size),
            "--density",
            "1600",
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return path


def child(*args: str) -> dict[str, Any]:
    """This script in a fresh process (``--child ...``); its last stdout line is JSON."""
    cmd = [sys.executable, __file__, "--child", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------------------ children


def synthetic_cells(tile: Any, m: int, k: int, seed: int) -> Any:
    from wsiflow.cells import CellTable, make_ids

    rng = np.random.default_rng(seed)
    c = tile.core
    cx, cy = rng.uniform(c.x, c.x + c.w, m), rng.uniform(c.y, c.y + c.h, m)
    nv = rng.integers(16, 33, m)
    offsets = np.zeros(m + 1, np.int64)
    np.cumsum(nv, out=offsets[1:])
    cell = np.repeat(np.arange(m), nv)
    ang = 2 * np.pi * (np.arange(int(offsets[-1])) - offsets[:-1][cell]) / nv[cell]
    r = rng.uniform(16, 40, m)
    rad = r[cell] * (1 + 0.05 * rng.standard_normal(len(cell)))
    xy = np.column_stack([cx[cell] + rad * np.cos(ang), cy[cell] + rad * np.sin(ang)]).astype(np.float32)
    probs = rng.dirichlet(np.ones(k), m).astype(np.float32)
    return CellTable(
        id=make_ids(tile.id, m),
        x=cx,
        y=cy,
        bbox=np.column_stack([cx - r, cy - r, cx + r, cy + r]),
        poly_offsets=offsets,
        poly_xy=xy,
        area_um2=(np.pi * r**2 * 0.0625).astype(np.float32),
        perimeter_um=(2 * np.pi * r * 0.25).astype(np.float32),
        circularity=rng.uniform(0.6, 1.0, m).astype(np.float32),
        seg_score=rng.uniform(0.5, 1.0, m).astype(np.float32),
        class_id=probs.argmax(1).astype(np.int16),
        probs=probs,
        tile=np.full(m, tile.id, np.int64),
    )


def child_plan(slide: str) -> dict[str, Any]:
    from wsiflow.config import load_pipeline
    from wsiflow.pipeline.plan import plan_slide

    pipeline = load_pipeline("mds")
    base = _status("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    plan = plan_slide(slide, pipeline, None)
    return {
        "slide": Path(slide).name,
        "tiles": len(plan.tiles),
        "s": round(time.perf_counter() - t0, 2),
        "rss_before_mb": round(base, 1),
        "peak_mb": round(_status("VmHWM"), 1),
    }


def child_build(slide: str, n: int, folder: str) -> dict[str, Any]:
    from wsiflow.config import load_pipeline
    from wsiflow.pipeline.plan import plan_slide
    from wsiflow.writers.zarr_store import CellStore

    pipeline = load_pipeline("mds")
    plan = plan_slide(slide, pipeline, None)
    out = Path(folder) / Path(slide).stem
    out.mkdir(parents=True, exist_ok=True)
    attrs = {
        "pipeline": pipeline.model_dump(mode="json"),
        "slide": plan.identity,
        "taxonomy": [c.model_dump(mode="json") for c in pipeline.taxonomy],
        "tiles_selected": [t.id for t in plan.tiles],
    }
    k = len(pipeline.taxonomy)
    store = CellStore.create(out / "cells.zarr", len(plan.grid), k, attrs, overwrite=True)
    per = np.full(len(plan.tiles), n // len(plan.tiles))
    per[: n - int(per.sum())] += 1
    for tile, m in zip(plan.tiles, per.tolist(), strict=True):
        store.append(synthetic_cells(tile, m, k, tile.id), [tile.id])
    store.flush()
    (Path(folder) / "plan.pkl").write_bytes(pickle.dumps(plan))
    return {"cells": n}


def child_finish(folder: str) -> dict[str, Any]:
    from wsiflow.config import load_pipeline
    from wsiflow.pipeline.finish import finish_slide, record_slide
    from wsiflow.writers.record import SlideRecord
    from wsiflow.writers.zarr_store import CellStore

    pipeline = load_pipeline("mds")
    plan = pickle.loads((Path(folder) / "plan.pkl").read_bytes())
    out = Path(folder) / Path(plan.path).stem
    for name in ("cells.geojson.gz", "summary.json", "report.html"):
        (out / name).unlink(missing_ok=True)
    res: dict[str, Any] = {"rss_before_mb": round(_status("VmRSS"), 1)}
    _reset_peak()
    t0 = time.perf_counter()
    done = finish_slide(plan, CellStore.open(out / "cells.zarr", mode="r+"), out, pipeline, {})
    res["finish"] = {"s": round(time.perf_counter() - t0, 2), "peak_mb": round(_status("VmHWM"), 1)}
    t0 = time.perf_counter()
    rec = SlideRecord.load(out / "summary.json")
    record_slide(Path(folder), rec, out_dir=out, slide_path=plan.path, report=True, note=log)
    res["record"] = {"s": round(time.perf_counter() - t0, 2), "peak_mb": round(_status("VmHWM"), 1)}
    res["cells"] = done.n_cells
    res["peak_mb"] = res["record"]["peak_mb"]
    return res


def child_runner(
    slide: str, folder: str, cells_per_tile: int, tile_s: float, flush_s: float
) -> dict[str, Any]:
    import wsiflow.execution.runner as runner_mod
    from wsiflow.config import load_pipeline
    from wsiflow.execution.cluster import ClusterOptions
    from wsiflow.execution.runner import RunOptions, run_slides

    phase = ["start"]
    peaks: dict[str, float] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            p = phase[0]
            peaks[p] = max(peaks.get(p, 0.0), _status("VmRSS"))
            time.sleep(0.02)

    def phased(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            phase[0] = name
            try:
                return fn(*a, **kw)
            finally:
                phase[0] = "dispatch" if name == "plan" else f"after {name}"

        return wrapper

    def batch_task(slide_ref: Any, tiles: Any, pipeline: Any, models: Any, rois: Any = None) -> Any:
        from wsiflow.cells import CellTable
        from wsiflow.execution.tasks import BatchResult

        time.sleep(tile_s * len(tiles))
        k = len(pipeline.taxonomy)
        return BatchResult(CellTable.concat([synthetic_cells(t, cells_per_tile, k, t.id) for t in tiles], k))

    runner_mod.batch_task = batch_task  # type: ignore[assignment]
    runner_mod.plan_slide = phased("plan", runner_mod.plan_slide)  # type: ignore[assignment]
    runner_mod.finish_slide = phased("finish", runner_mod.finish_slide)  # type: ignore[assignment]
    runner_mod.record_slide = phased("record", runner_mod.record_slide)  # type: ignore[assignment]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    phase[0] = "connect"
    res = run_slides(
        [slide],
        load_pipeline("mds"),
        RunOptions(out=Path(folder), overwrite=True, flush_seconds=flush_s),
        ClusterOptions(n_workers=2, threads_per_worker=1, device="cpu"),
    )
    wall = time.perf_counter() - t0
    time.sleep(0.1)
    stop.set()
    sampler.join()
    return {
        "slide": Path(slide).name,
        "cells": res[0].n_cells,
        "tiles": res[0].tiles_total,
        "wall_s": round(wall, 1),
        "peak_mb_by_phase": {p: round(v, 1) for p, v in peaks.items()},
        "peak_mb": round(max(peaks.values()), 1),
    }


CHILDREN = {"plan": child_plan, "build": child_build, "finish": child_finish, "runner": child_runner}


# ------------------------------------------------------------------------------ main


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, args = sys.argv[2], sys.argv[3:]
        fn: Any = CHILDREN[kind]
        if kind == "build":
            out = fn(args[0], int(args[1]), args[2])
        elif kind == "runner":
            out = fn(args[0], args[1], int(args[2]), float(args[3]), float(args[4]))
        else:
            out = fn(*args)
        print(json.dumps(out))
        return
    ap = bench_parser(__doc__, size=False)
    ap.add_argument("--size", type=int, default=None, help="side of the big mosaic slide (default 40000)")
    ap.add_argument("--cells", default=None, help="store sizes for the finishing step (default 1000,100000)")
    ap.add_argument("--cells-per-tile", type=int, default=254, help="runner: cells per tile (B9: 254)")
    ap.add_argument("--tile-s", type=float, default=0.05, help="runner: seconds of sleep per tile")
    ap.add_argument("--flush-s", type=float, default=0.2, help="runner: store checkpoint interval")
    ap.add_argument("--parts", default="plan,finish,runner", help="which measurements (comma-separated)")
    ap.add_argument(
        "--repeat", type=int, default=1, help="runner: runs of each slide (peaks vary run to run)"
    )
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = ap.parse_args()
    import wsiflow

    size = a.size or (12000 if a.quick else 40000)
    cells = [int(c) for c in (a.cells or ("1000,20000" if a.quick else "1000,100000")).split(",")]
    a.work.mkdir(parents=True, exist_ok=True)
    small, _ = synth_slide(a.work, SMALL)
    big = mosaic(a.work, size)
    result: dict[str, Any] = {
        "bench": "client memory without the models",
        "machine": machine(),
        "wsiflow": str(Path(wsiflow.__file__).parent),
        "slides": {"small": small.name, "big": big.name},
    }
    parts = set(a.parts.split(","))
    if "plan" in parts:
        result["plan"] = {"small": child("plan", str(small)), "big": child("plan", str(big))}
        result["plan"]["ratio"] = ratio(result["plan"]["big"]["peak_mb"], result["plan"]["small"]["peak_mb"])
        log(f"plan: {result['plan']}")
    if "finish" in parts:
        result["finish"] = measure_finish(a.work, big, cells)
    if "runner" in parts:
        result["runner"] = measure_runner(a, small, big)
    emit(result)
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def measure_finish(work: Path, big: Path, cells: list[int]) -> dict[str, Any]:
    finish: dict[str, Any] = {}
    for n in cells:
        folder = work / "client" / f"store_{n}"
        if not (folder / "plan.pkl").is_file():
            child("build", str(big), str(n), str(folder))
        finish[str(n)] = child("finish", str(folder))
        log(f"finish {n} cells: {finish[str(n)]}")
    base = finish[str(cells[0])]["peak_mb"]
    finish["ratio_vs_first"] = {str(n): ratio(finish[str(n)]["peak_mb"], base) for n in cells}
    return finish


def measure_runner(a: Any, small: Path, big: Path) -> dict[str, Any]:
    """Small and big slide alternately, ``--repeat`` times; the ratio of each pair."""
    run: dict[str, Any] = {"small": [], "big": []}
    args = [str(a.cells_per_tile), str(a.tile_s), str(a.flush_s)]
    for _ in range(max(1, a.repeat)):
        for label, slide in (("small", small), ("big", big)):
            run[label].append(child("runner", str(slide), str(a.work / "client" / f"run_{label}"), *args))
            log(f"runner {label}: {run[label][-1]}")
    run["ratios"] = [ratio(b["peak_mb"], s["peak_mb"]) for s, b in zip(run["small"], run["big"], strict=True)]
    run["ratio_of_max"] = ratio(
        max(r["peak_mb"] for r in run["big"]), max(r["peak_mb"] for r in run["small"])
    )
    return run


if __name__ == "__main__":
    main()

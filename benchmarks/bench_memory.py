"""B5 memory: peak RSS of the client and each worker for a slide and a 16× larger one.

``wsiflow run SLIDE -o OUT --workers 2 --threads-per-worker 1`` runs as a subprocess; a
psutil thread samples the RSS of its whole process tree every 50 ms and keeps each
process's peak. The CLI process is the client (the embedded scheduler lives in it too);
the worker processes are the grandchildren (LocalCluster: nanny → worker). The 16× slide
is 4× as wide and 4× as tall, same density. Target: peak(16×) / peak(1×) ≤ 1.2 for the
client and for the workers.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from common import (
    RssSampler,
    SlideSpec,
    bench_pipeline,
    emit,
    log,
    machine,
    ratio,
    synth_slide,
    wsiflow_run_cmd,
)
from options import bench_parser

from wsiflow.execution.loopback import process_env


def measure(slide: Path, pipeline_path: Path, out: Path, logdir: Path) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    logdir.mkdir(parents=True, exist_ok=True)
    cmd = wsiflow_run_cmd(slide, out, pipeline_path)
    t0 = time.perf_counter()
    with (logdir / f"{slide.stem}.log").open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=process_env(1))
        with RssSampler({"cli": proc.pid}) as sampler:
            rc = proc.wait()
    dt = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"wsiflow run failed ({rc}): {(logdir / f'{slide.stem}.log').read_text()[-1500:]}")
    procs = sorted(sampler.peaks.items(), key=lambda kv: (kv[1]["depth"], kv[0]))
    client = max((r["peak_rss"] for _, r in procs if r["depth"] == 0), default=0)
    depth = max((r["depth"] for _, r in procs), default=0)
    workers = sorted((r["peak_rss"] for _, r in procs if r["depth"] == depth and depth > 0), reverse=True)
    summary = Path(out) / slide.stem / "summary.json"
    cells = None
    if summary.is_file():
        import json

        cells = json.loads(summary.read_text()).get("summary", {}).get("n_cells")
    return {
        "slide": slide.name,
        "wall_s": round(dt, 1),
        "client_peak_mb": round(client / 2**20, 1),
        "worker_peaks_mb": [round(w / 2**20, 1) for w in workers],
        "cells": cells,
        "processes": [
            {
                "pid": pid,
                "depth": r["depth"],
                "peak_mb": round(r["peak_rss"] / 2**20, 1),
                "cmd": r["cmd"][-90:],
            }
            for pid, r in procs
        ],
    }


def main() -> None:
    ap = bench_parser(__doc__)
    a = ap.parse_args()
    pipeline_path, minfo = bench_pipeline(a.work, a.models)
    if a.quick:
        small, big = SlideSpec(1024, 1024, seed=7), SlideSpec(4096, 4096, seed=7)
    else:
        small, big = SlideSpec(4000, 4000, seed=5), SlideSpec(16000, 16000, seed=5)
    s_path, s_info = synth_slide(a.work, small)
    b_path, b_info = synth_slide(a.work, big)
    rs = measure(s_path, pipeline_path, a.work / "out" / "mem_small", a.work / "logs")
    log(f"B5 small: client {rs['client_peak_mb']} MB workers {rs['worker_peaks_mb']}")
    rb = measure(b_path, pipeline_path, a.work / "out" / "mem_big", a.work / "logs")
    log(f"B5 big: client {rb['client_peak_mb']} MB workers {rb['worker_peaks_mb']}")
    client_ratio = ratio(rb["client_peak_mb"], rs["client_peak_mb"])
    worker_ratio = ratio(max(rb["worker_peaks_mb"] or [0]), max(rs["worker_peaks_mb"] or [1]))
    worst = max(x for x in (client_ratio, worker_ratio) if x is not None)
    emit(
        {
            "bench": "B5 memory",
            "machine": machine(),
            "models": minfo,
            "slides": {"small": s_info, "big_16x": b_info},
            "small": rs,
            "big_16x": rb,
            "client_ratio": client_ratio,
            "worker_ratio": worker_ratio,
            "target": "<= 1.2",
            "met": worst <= 1.2,
        }
    )


if __name__ == "__main__":
    main()

"""B4 scaling: 1 vs 2 Dask workers on the 2 cores, and an external scheduler vs embedded.

Every configuration runs the real Runner on the same slide after a small warm-up slide on
the same cluster (models loaded, first-task costs paid), so the ratios compare steady work:

* embedded 1 worker × 1 thread, embedded 2 workers × 1 thread (target speed-up ≥ 1.8×),
  and (full run) embedded 1 worker × 2 threads (one process using both cores);
* a real ``dask scheduler`` + 2 ``dask worker`` processes (1 thread each) on 127.0.0.1,
  used through ``--scheduler`` (ClusterOptions.scheduler): target within 5 % of embedded 2×1.
"""

from __future__ import annotations

import argparse
from typing import Any

from common import (
    SlideSpec,
    add_common_args,
    bench_pipeline,
    emit,
    machine,
    pick_spec,
    ratio,
    synth_slide,
)
from e2e import run_on_cluster, warm_slide

from wsiflow.execution.loopback import loopback_cluster

QUICK = SlideSpec(4000, 4000, seed=1, density=400)
FULL = SlideSpec(8000, 8000, seed=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_common_args(ap)
    a = ap.parse_args()
    pipeline_path, minfo = bench_pipeline(a.work, a.models)
    spec = pick_spec(a, QUICK, FULL)
    slide, sinfo = synth_slide(a.work, spec)
    warm = None if a.quick else warm_slide(a.work)
    out = a.work / "out" / "scaling"
    runs: dict[str, Any] = {}
    # one tile per task, so that tiles (not batches of 4) are what the workers share
    kw: dict[str, Any] = {"warm": warm, "batch_tiles": 1}
    runs["embedded_2x1"] = run_on_cluster([slide], pipeline_path, out, 2, 1, **kw)
    runs["embedded_1x1"] = run_on_cluster([slide], pipeline_path, out, 1, 1, **kw)
    if not a.quick:
        runs["embedded_1x2"] = run_on_cluster([slide], pipeline_path, out, 1, 2, **kw)
    with loopback_cluster(a.work / "logs" / "dask", n_workers=2, nthreads=1, timeout=90.0) as dp:
        runs["external_2x1"] = run_on_cluster([slide], pipeline_path, out, scheduler=dp.address, **kw)
        runs["external_2x1"]["address"] = dp.address

    def sec(k: str) -> float:
        return float(runs[k]["slides"][0]["seconds"])

    speedup = ratio(sec("embedded_1x1"), sec("embedded_2x1"))
    ext = ratio(sec("external_2x1"), sec("embedded_2x1"))
    result: dict[str, Any] = {
        "bench": "B4 scaling",
        "machine": machine(),
        "models": minfo,
        "slide": sinfo,
        "runs": runs,
        "speedup_2_workers": speedup,
        "speedup_target": ">= 1.8",
        "speedup_met": speedup is not None and speedup >= 1.8,
        "external_vs_embedded_time": ext,
        "external_target": "within 5% (0.95-1.05)",
        "external_met": ext is not None and abs(ext - 1) <= 0.05,
    }
    if "embedded_1x2" in runs:
        result["speedup_1x2_vs_1x1"] = ratio(sec("embedded_1x1"), sec("embedded_1x2"))
        result["embedded_2x1_vs_1x2"] = ratio(sec("embedded_1x2"), sec("embedded_2x1"))
    emit(result)


if __name__ == "__main__":
    main()

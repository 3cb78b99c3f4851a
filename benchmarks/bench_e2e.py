"""B3 end to end: cells/s and tiles/s of the real runner vs the bare models on the same cells.

1. The real runner (``wsiflow.execution.runner.Runner`` on an embedded LocalCluster of
   2 worker processes × 1 thread, what ``wsiflow run --workers 2 --threads-per-worker 1``
   does) processes the slide; a small slide is run first on the same cluster so the timed
   run starts with models loaded (the cold first-slide time is reported too).
2. In the same run, the bare models are timed (bench_models: the best 2-core layout) and
   the model-only time for *this slide's* tiles and cells is
   ``tiles / unet_tiles_per_s + cells / inception_cells_per_s``.
3. efficiency = end-to-end cells/s ÷ bare-model cells/s (target ≥ 0.85).
4. A per-stage profile of ``process_batch`` (1 thread, as one worker) shows what the rest
   costs, with the cProfile top functions.
"""

from __future__ import annotations

from typing import Any

from bench_models import measure_layouts
from common import (
    SlideSpec,
    bench_pipeline,
    emit,
    log,
    machine,
    ratio,
    synth_slide,
)
from e2e import run_on_cluster, stage_profile, warm_slide
from options import bench_parser, pick_spec

QUICK = SlideSpec(4000, 4000, seed=1)
FULL = SlideSpec(16000, 16000, seed=2, density=2400)


def main() -> None:
    ap = bench_parser(__doc__)
    a = ap.parse_args()
    pipeline_path, minfo = bench_pipeline(a.work, a.models)
    spec = pick_spec(a, QUICK, FULL)
    slide, sinfo = synth_slide(a.work, spec)
    # quick: the slide has 4 tiles, so 1 tile per task (else one task, one busy worker);
    # full: the pipeline's batch_tiles, after a small warm-up slide
    warm = None if a.quick else warm_slide(a.work)
    run = run_on_cluster(
        [slide], pipeline_path, a.work / "out" / "e2e", 2, 1, warm=warm, batch_tiles=1 if a.quick else None
    )
    row = run["slides"][0]
    n_tiles, n_cells = (1, 128) if a.quick else (6, 768)
    # quick: 1 thread and 2 concurrent 1-thread processes (the layout of the run); full: also 1 × 2 threads
    bare = measure_layouts(pipeline_path, slide, n_tiles, n_cells, (1,) if a.quick else (1, 2))
    best = bare["best_any_layout"]
    model_s = row["tiles"] / best["unet_tiles_per_s"] + row["cells"] / best["inception_cells_per_s"]
    bare_cps = row["cells"] / model_s
    eff = ratio(row["cells_per_s"], bare_cps)
    # the same models at the run's own layout (2 one-thread processes together)
    same = bare.get("2proc_x1thr")
    eff_same = None
    if same:
        same_s = row["tiles"] / same["unet"]["tiles_per_s"] + row["cells"] / same["inception"]["cells_per_s"]
        eff_same = ratio(row["cells_per_s"], row["cells"] / same_s)
    log(f"B3 e2e {row['cells_per_s']} cells/s, bare {bare_cps:.1f} cells/s, efficiency {eff}")
    prof = stage_profile(slide, pipeline_path, 1 if a.quick else 4, a.work / "b3_process_batch.prof")
    result: dict[str, Any] = {
        "bench": "B3 end to end",
        "machine": machine(),
        "models": minfo,
        "slide": sinfo,
        "run": run,
        "e2e_cells_per_s": row["cells_per_s"],
        "e2e_tiles_per_s": row["tiles_per_s"],
        "bare_model_seconds_for_slide": round(model_s, 2),
        "bare_cells_per_s": round(bare_cps, 2),
        "bare_rates_best_layout": best,
        "bare_layouts": {
            k: {"unet": v["unet"], "inception": v["inception"], "tile_px": v.get("tile_px")}
            for k, v in bare.items()
            if k != "best_any_layout"
        },
        "efficiency": eff,
        "efficiency_same_layout_2x1": eff_same,
        "target": ">= 0.85",
        "met": eff is not None and eff >= 0.85,
        "enough_cells": row["cells"] >= 20000,
        "stage_profile_1_worker": prof,
    }
    emit(result)


if __name__ == "__main__":
    main()

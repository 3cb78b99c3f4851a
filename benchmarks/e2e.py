"""Running the real runner (``wsiflow.execution``) for the benchmarks, and a per-stage profile."""

from __future__ import annotations

import cProfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import SlideSpec, log, profile_top, synth_slide

WARM_SPEC = SlideSpec(1024, 1024, seed=7)


def run_on_cluster(
    slides: list[Path],
    pipeline_path: Path,
    out: Path,
    n_workers: int | None = None,
    threads: int | None = None,
    scheduler: str | None = None,
    warm: Path | None = None,
    batch_tiles: int | None = None,
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """Run ``slides`` with the real Runner; returns per-slide seconds, cells, tiles.

    Before the timed slides every worker loads the models (an empty batch through
    ``client.run``); ``warm``: a small slide is also run first on the same cluster (first-task
    costs paid; its time is reported apart). ``batch_tiles``: tiles per task (default: the
    pipeline's); small slides need 1 so that both workers get tasks. ``torch_threads``: torch's
    intra-op threads in every worker, when it should differ from the worker's task threads.
    """
    from wsiflow.config import load_pipeline
    from wsiflow.execution.cluster import ClusterOptions, connect
    from wsiflow.execution.runner import Runner, RunOptions
    from wsiflow.execution.worker import resolve_models

    pipe = load_pipeline(pipeline_path)
    refs, bundles = resolve_models(pipe, "cpu")
    t0 = time.perf_counter()
    opts = ClusterOptions(scheduler=scheduler, n_workers=n_workers, threads_per_worker=threads, device="cpu")
    res: dict[str, Any] = {
        "workers": n_workers,
        "threads_per_worker": threads,
        "scheduler": "external" if scheduler else "embedded",
    }
    with connect(opts) as session:
        res["connect_s"] = round(time.perf_counter() - t0, 2)
        res["cluster"] = session.description.split(" (")[-1].rstrip(")")
        runner = Runner(
            session.client, pipe, refs, bundles, RunOptions(out=out, overwrite=True, batch_tiles=batch_tiles)
        )
        from wsiflow.execution.tasks import batch_task
        from wsiflow.execution.worker import SlideRef

        if torch_threads is not None:
            import torch

            session.client.run(torch.set_num_threads, torch_threads)
            res["torch_threads"] = torch_threads

        tw = time.perf_counter()
        session.client.run(batch_task, SlideRef(str(Path(slides[0]).resolve())), [], pipe, refs)
        res["model_load_s"] = round(time.perf_counter() - tw, 2)
        res["batch_tiles"] = batch_tiles or pipe.tiling.batch_tiles
        if warm is not None:
            tw = time.perf_counter()
            runner.run([str(warm)])
            res["warmup_s"] = round(time.perf_counter() - tw, 2)
        rows = []
        for s in slides:
            r = runner.run([str(s)])[0]
            if not r.ok:
                raise RuntimeError(f"{s}: {r.error}")
            rows.append(
                {
                    "slide": Path(s).name,
                    "seconds": round(r.seconds, 2),
                    "cells": r.n_cells,
                    "tiles": r.tiles_total,
                    "cells_per_s": round(r.n_cells / r.seconds, 2),
                    "tiles_per_s": round(r.tiles_total / r.seconds, 3),
                }
            )
            log(f"run {res['scheduler']} {n_workers}x{threads}: {rows[-1]}")
        res["slides"] = rows
    res["total_s"] = round(time.perf_counter() - t0, 2)
    return res


def warm_slide(work: Path) -> Path:
    return synth_slide(work, WARM_SPEC)[0]


@contextmanager
def _patched(obj: Any, name: str, acc: dict[str, float], label: str):  # type: ignore[no-untyped-def]
    orig = getattr(obj, name)

    def wrapper(*args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig(*args, **kw)
        finally:
            acc[label] += time.perf_counter() - t

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        setattr(obj, name, orig)


def stage_profile(
    slide: Path, pipeline_path: Path, n_tiles: int, prof_path: Path, threads: int = 1
) -> dict[str, Any]:
    """``process_batch`` in this process (1 torch thread, like a 1-thread worker) on the
    first ``n_tiles`` tissue tiles: seconds per stage and a cProfile dump."""
    import torch

    import wsiflow.classify as C
    import wsiflow.crops as K
    import wsiflow.segment as S
    from wsiflow.config import load_pipeline
    from wsiflow.execution.worker import SlideRef, get_models, get_slide, resolve_models
    from wsiflow.pipeline.batch import process_batch
    from wsiflow.pipeline.plan import plan_slide
    from wsiflow.slide._base import Slide

    torch.set_num_threads(threads)
    pipe = load_pipeline(pipeline_path)
    refs, _ = resolve_models(pipe, "cpu")
    get_models(refs, pipe)
    plan = plan_slide(str(slide), pipe, None)
    mid = len(plan.tiles) // 2
    tiles = plan.tiles[max(0, mid - n_tiles // 2) :][:n_tiles]
    ref = SlideRef(str(slide))
    process_batch(get_slide(ref), tiles[:1], pipe, get_models(refs, pipe))  # warm caches
    acc: dict[str, float] = defaultdict(float)
    patches: list[tuple[Any, str, str]] = [
        (Slide, "read", "read (Slide.read, seg + cls)"),
        (S.Segmenter, "probability_maps", "U-Net (probability_maps)"),
        (S, "instances_from_probs", "post-processing (instances, polygons)"),
        (K, "crop_cells", "crops (crop_cells)"),
        (C.Classifier, "predict", "InceptionV3 (Classifier.predict)"),
    ]
    stack = [_patched(o, n, acc, lab) for o, n, lab in patches]
    for cm in stack:
        cm.__enter__()
    try:
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        table = process_batch(get_slide(ref), tiles, pipe, get_models(refs, pipe))
        prof.disable()
        total = time.perf_counter() - t0
    finally:
        for cm in reversed(stack):
            cm.__exit__(None, None, None)
    prof.dump_stats(str(prof_path))
    stages = {k: round(v, 3) for k, v in acc.items()}
    model = acc["U-Net (probability_maps)"] + acc["InceptionV3 (Classifier.predict)"]
    stages["other (ownership, ids, table ops)"] = round(total - sum(acc.values()), 3)
    return {
        "tiles": len(tiles),
        "cells": len(table),
        "threads": threads,
        "seconds": round(total, 3),
        "stages_s": stages,
        "stage_fraction": {k: round(v / total, 3) for k, v in stages.items()},
        "model_fraction": round(model / total, 3),
        "cprofile_top_tottime": profile_top(prof_path, 18),
    }

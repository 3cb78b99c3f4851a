"""B2 models alone: U-Net tiles/s and InceptionV3 cells/s at the pipeline's settings.

The models are loaded exactly as a worker loads them (``Segmenter`` / ``Classifier`` from the
benchmark pipeline's bundles: channels_last fp32, ``inference_mode``). Measured:

* ``unet``: ``Segmenter.probability_maps`` on one tile read box (``read_px`` at seg_mpp, the
  pipeline's tile size: normalisation, forward, sigmoid, copy back), and the bare forward;
* ``inception``: ``Classifier.predict`` on crops of ``input_px`` in the pipeline's batches;
* layouts: one process × 1 thread, one process × 2 threads, and two processes × 1 thread
  running at the same time (the sum of their rates: what two 1-thread Dask workers get);
* options (full run): contiguous vs channels_last, ``torch.jit.trace`` + ``freeze`` +
  ``optimize_for_inference`` (folds BatchNorm), CPU bf16 autocast, and ``torch.compile``
  (its warm-up against the time it saves on the B3 slide's cells).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    SlideSpec,
    bench_pipeline,
    emit,
    log,
    machine,
    ratio,
    synth_slide,
)
from options import bench_parser, pick_spec


def load_models(pipeline_path: Path) -> tuple[Any, Any, Any]:
    """(pipeline, Segmenter, Classifier) built as a worker builds them."""
    from wsiflow.config import load_pipeline
    from wsiflow.execution.worker import get_models, resolve_models

    pipe = load_pipeline(pipeline_path)
    refs, _ = resolve_models(pipe, "cpu")
    m = get_models(refs, pipe)
    return pipe, m.segmenter, m.classifier


def tile_rgb(slide_path: Path, pipe: Any) -> np.ndarray:
    """The read box of the first tissue tile, at seg_mpp (the U-Net's real input)."""
    from wsiflow.pipeline.plan import plan_slide
    from wsiflow.slide import open_slide

    plan = plan_slide(str(slide_path), pipe, None)
    t = plan.tiles[len(plan.tiles) // 2]
    with open_slide(str(slide_path)) as s:
        w, h = t.read_px
        return s.read(t.read.x, t.read.y, w, h, pipe.resolution.seg_mpp)


def crops_for(n: int, px: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, px, px, 3), dtype=np.uint8)


def time_unet(seg: Any, rgb: np.ndarray, mpp: float, n: int) -> dict[str, float]:
    import torch

    seg.probability_maps(rgb, mpp)  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        seg.probability_maps(rgb, mpp)
    dt = time.perf_counter() - t0
    x = torch.rand(1, 3, *rgb.shape[:2]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        t1 = time.perf_counter()
        for _ in range(n):
            seg.model(x)
        fwd = time.perf_counter() - t1
    return {"tiles_per_s": round(n / dt, 3), "forward_only_tiles_per_s": round(n / fwd, 3), "tiles": n}


def time_cls(cls: Any, crops: np.ndarray) -> dict[str, float]:
    cls.predict(crops[: cls.cfg.batch_size])  # warm-up
    t0 = time.perf_counter()
    cls.predict(crops)
    dt = time.perf_counter() - t0
    return {"cells_per_s": round(len(crops) / dt, 1), "cells": len(crops), "batch": cls.cfg.batch_size}


def _measure(
    pipeline_path: str, slide_path: str, threads: int, n_tiles: int, n_cells: int, barrier: Any = None
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    pipe, seg, cls = load_models(Path(pipeline_path))
    rgb = tile_rgb(Path(slide_path), pipe)
    crops = crops_for(n_cells, pipe.classifier.input_px)
    if barrier is not None:
        barrier.wait()
    u = time_unet(seg, rgb, pipe.resolution.seg_mpp, n_tiles)
    if barrier is not None:
        barrier.wait()
    c = time_cls(cls, crops)
    return {"threads": threads, "tile_px": list(rgb.shape[:2]), "unet": u, "inception": c}


_BARRIER: Any = None


def _init(barrier: Any) -> None:
    global _BARRIER
    _BARRIER = barrier


def _measure_in_pool(pipeline_path: str, slide_path: str, n_tiles: int, n_cells: int) -> dict[str, Any]:
    return _measure(pipeline_path, slide_path, 1, n_tiles, n_cells, _BARRIER)


def measure_layouts(
    pipeline_path: Path, slide_path: Path, n_tiles: int, n_cells: int, threads: tuple[int, ...] = (1, 2)
) -> dict[str, Any]:
    """1×1, 1×2 (this process) and 2×1 (two concurrent processes) rates."""
    out: dict[str, Any] = {}
    for t in threads:
        out[f"1proc_x{t}thr"] = _measure(str(pipeline_path), str(slide_path), t, n_tiles, n_cells)
        log(f"B2 1 proc x {t} thr: {out[f'1proc_x{t}thr']}")
    ctx = mp.get_context("spawn")
    with ctx.Manager() as mgr:
        barrier = mgr.Barrier(2)
        with ProcessPoolExecutor(2, mp_context=ctx, initializer=_init, initargs=(barrier,)) as ex:
            futs = [
                ex.submit(_measure_in_pool, str(pipeline_path), str(slide_path), n_tiles, n_cells)
                for _ in range(2)
            ]
            parts = [f.result() for f in futs]
    out["2proc_x1thr"] = {
        "unet": {"tiles_per_s": round(sum(p["unet"]["tiles_per_s"] for p in parts), 3)},
        "inception": {"cells_per_s": round(sum(p["inception"]["cells_per_s"] for p in parts), 1)},
        "per_process": parts,
    }
    log(f"B2 2 procs x 1 thr: {out['2proc_x1thr']['unet']} {out['2proc_x1thr']['inception']}")
    # the best the machine did with the models alone, whatever the layout (on a shared VM
    # the second core may be busy: then one process is the fastest)
    keys = [k for k in out if k.endswith("thr")]
    best_u = max(out[k]["unet"]["tiles_per_s"] for k in keys)
    best_c = max(out[k]["inception"]["cells_per_s"] for k in keys)
    out["best_any_layout"] = {"unet_tiles_per_s": best_u, "inception_cells_per_s": best_c}
    return out


def _rate(fn: Any, x: Any, n: int) -> float:
    import torch

    with torch.inference_mode():
        fn(x)
        t0 = time.perf_counter()
        for _ in range(n):
            fn(x)
        return n / (time.perf_counter() - t0)


def measure_options(
    pipeline_path: Path, slide_path: Path, n_tiles: int, n_cells: int, slide_cells: int, compile_: bool
) -> dict[str, Any]:
    """Forward rates of each model under CPU options (2 threads, one process)."""
    import copy

    import torch

    torch.set_num_threads(2)
    pipe, seg, cls = load_models(pipeline_path)
    rgb = tile_rgb(slide_path, pipe)
    bs = pipe.classifier.batch_size
    px = pipe.classifier.input_px
    xu = torch.rand(1, 3, *rgb.shape[:2])
    xc = torch.rand(bs, 3, px, px)
    n_batches = max(2, n_cells // bs)
    res: dict[str, Any] = {}
    for name, model, x, n, unit in (
        ("unet", seg.model, xu, n_tiles, 1),
        ("inception", cls.model, xc, n_batches, bs),
    ):
        r: dict[str, Any] = {}
        plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        r["contiguous_fp32"] = round(unit * _rate(plain, x, n), 2)
        xcl = x.contiguous(memory_format=torch.channels_last)
        r["channels_last_fp32"] = round(unit * _rate(model, xcl, n), 2)
        with torch.inference_mode():
            traced = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, xcl)))
        r["jit_freeze_channels_last"] = round(unit * _rate(traced, xcl, n), 2)

        def bf16(inp: Any, m: Any = model) -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return m(inp)

        r["bf16_autocast_channels_last"] = round(unit * _rate(bf16, xcl, n), 2)
        if compile_:
            t0 = time.perf_counter()
            comp = torch.compile(model)
            with torch.inference_mode():
                comp(xcl)
            warm = time.perf_counter() - t0
            rc = unit * _rate(comp, xcl, n)
            r["compile_channels_last"] = round(rc, 2)
            r["compile_warmup_s"] = round(warm, 1)
            base = r["channels_last_fp32"]
            if rc > base:
                r["compile_break_even_units"] = round(warm / (1 / base - 1 / rc))
            else:
                r["compile_break_even_units"] = None
        r["unit"] = "tiles/s" if name == "unet" else "cells/s"
        res[name] = r
        log(f"B2 options {name}: {r}")
    if compile_:
        be = res["inception"].get("compile_break_even_units")
        res["compile_pays_on_slide"] = bool(be is not None and be < slide_cells)
        res["slide_cells_for_compile_decision"] = slide_cells
    return res


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--no-options", action="store_true")
    ap.add_argument("--options-only", action="store_true", help="only the CPU options (incl. torch.compile)")
    a = ap.parse_args()
    pipeline_path, minfo = bench_pipeline(a.work, a.models)
    spec = pick_spec(a, SlideSpec(4000, 4000, seed=1), SlideSpec(12000, 12000, seed=1))
    slide_path, _ = synth_slide(a.work, spec)
    n_tiles, n_cells = (3, 256) if a.quick else (8, 1024)
    if a.options_only:
        opts = measure_options(pipeline_path, slide_path, 2, 256, 20000, compile_=True)
        emit({"bench": "B2 models (options)", "machine": machine(), "models": minfo, "options": opts})
        return
    layouts = measure_layouts(pipeline_path, slide_path, n_tiles, n_cells)
    result: dict[str, Any] = {
        "bench": "B2 models",
        "machine": machine(),
        "models": minfo,
        "layouts": layouts,
        "scaling_2proc_vs_1x1": {
            "unet": ratio(
                layouts["2proc_x1thr"]["unet"]["tiles_per_s"], layouts["1proc_x1thr"]["unet"]["tiles_per_s"]
            ),
            "inception": ratio(
                layouts["2proc_x1thr"]["inception"]["cells_per_s"],
                layouts["1proc_x1thr"]["inception"]["cells_per_s"],
            ),
        },
    }
    if not a.no_options:
        result["options"] = measure_options(
            pipeline_path, slide_path, max(2, n_tiles // 2), n_cells // 2, 20000, compile_=not a.quick
        )
    emit(result)


if __name__ == "__main__":
    main()

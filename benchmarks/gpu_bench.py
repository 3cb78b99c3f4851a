"""B8 GPU: B2 (models alone) and B3 (end to end) on CUDA with AMP; prints one JSON object.

Prepared for a CUDA machine with this repository and a Python that already has the
project's dependencies (torch with CUDA, tifffile, imagecodecs, openslide-bin, dask …);
it installs nothing and downloads nothing. Run from the repository root:

    python benchmarks/gpu_bench.py                 # full: B2 + a ~100k-cell slide end to end
    python benchmarks/gpu_bench.py --quick         # small slide (a few minutes)
    python benchmarks/gpu_bench.py --device cpu --quick --cells 2000   # dry run without a GPU

Targets (issue 7): InceptionV3 ≥ 20k cells/s at 128 px on an H100; a 100k-cell slide end
to end in < 30 s. The classifier is measured at 128 px whatever the pipeline's input_px
(reported too), fp16 autocast (what ``Classifier.predict`` does on CUDA), channels_last.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from common import ROOT, SlideSpec, bench_pipeline, emit, log, machine, synth_slide
from options import bench_parser


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def bench_models_gpu(pipeline_path: Path, device: str, n_cells: int, n_tiles: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from wsiflow.config import load_pipeline
    from wsiflow.models.bundle import ModelBundle
    from wsiflow.models.registry import build_model

    pipe = load_pipeline(pipeline_path)
    torch.backends.cudnn.benchmark = True
    seg_b = ModelBundle.load(pipe.segmenter.bundle)
    unet = seg_b.build(device).to(memory_format=torch.channels_last)
    side = round(
        pipe.tiling.tile_um / pipe.resolution.seg_mpp + 2 * pipe.tiling.halo_um / pipe.resolution.seg_mpp
    )
    res: dict[str, Any] = {"device": device, "tile_px": side}
    amp = torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16)
    for bs in (1, 4):
        x = torch.rand(bs, 3, side, side, device=device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), amp:
            unet(x)
            _sync(device)
            t0 = time.perf_counter()
            reps = max(1, n_tiles // bs)
            for _ in range(reps):
                unet(x)
            _sync(device)
            res[f"unet_tiles_per_s_batch{bs}"] = round(reps * bs / (time.perf_counter() - t0), 2)
    cls_card = ModelBundle.load(pipe.classifier.bundle).card
    k = int(cls_card["kwargs"]["num_classes"])
    for px in sorted({128, int(pipe.classifier.input_px)}):
        model = (
            build_model("inception_v3", {"num_classes": k})
            .to(device)
            .eval()
            .to(memory_format=torch.channels_last)
        )
        for bs in (64, 256, 512):
            crops = np.random.default_rng(0).integers(0, 256, (bs, px, px, 3), dtype=np.uint8)
            # uint8 host crops → device, normalise, AMP forward, softmax back (as Classifier.predict)
            pinned = torch.from_numpy(crops).pin_memory() if device == "cuda" else torch.from_numpy(crops)
            with torch.inference_mode():

                def step(p: Any = pinned, m: Any = model) -> Any:
                    b = p.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
                    b = b.contiguous(memory_format=torch.channels_last)
                    with amp:
                        out = m(b)
                    return torch.softmax(out.float(), 1).cpu()

                step()
                _sync(device)
                reps = max(1, n_cells // bs)
                t0 = time.perf_counter()
                for _ in range(reps):
                    step()
                _sync(device)
                res[f"inception_{px}px_cells_per_s_batch{bs}"] = round(
                    reps * bs / (time.perf_counter() - t0), 1
                )
        log(f"B8 models {px}px: {res}")
    res["pipeline"] = bench_pipeline_models(pipeline_path, device, n_cells, n_tiles)
    best128 = max(v for kk, v in res.items() if kk.startswith("inception_128px"))
    res["inception_128px_best_cells_per_s"] = best128
    res["target_cells_per_s"] = 20000
    res["met"] = best128 >= 20000
    return res


def bench_pipeline_models(pipeline_path: Path, device: str, n_cells: int, n_tiles: int) -> dict[str, Any]:
    """The models as the pipeline runs them: ``Segmenter.probability_maps_batch`` on uint8
    tiles of the pipeline's read size, ``tiling.batch_tiles`` per call, and
    ``Classifier.predict`` on uint8 crops of ``input_px`` (its ``batch_size``), both with
    the bundles' normalisation, host → device copies and results back on the host."""
    import numpy as np

    from wsiflow.classify import Classifier
    from wsiflow.config import load_pipeline
    from wsiflow.models.bundle import ModelBundle
    from wsiflow.segment import Segmenter

    pipe = load_pipeline(pipeline_path)
    seg = Segmenter(ModelBundle.load(pipe.segmenter.bundle), pipe.segmenter, device)
    cls = Classifier(ModelBundle.load(pipe.classifier.bundle), pipe.classifier, device)
    mpp = pipe.resolution.seg_mpp
    side = round((pipe.tiling.tile_um + 2 * pipe.tiling.halo_um) / mpp)
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(pipe.tiling.batch_tiles)]
    seg.probability_maps_batch(tiles, mpp)  # warm-up
    reps = max(1, n_tiles // len(tiles))
    t0 = time.perf_counter()
    for _ in range(reps):
        seg.probability_maps_batch(tiles, mpp)
    t_seg = time.perf_counter() - t0
    px = pipe.classifier.input_px
    crops = rng.integers(0, 256, (n_cells, px, px, 3), dtype=np.uint8)
    cls.predict(crops[: pipe.classifier.batch_size])  # warm-up
    t0 = time.perf_counter()
    cls.predict(crops)
    t_cls = time.perf_counter() - t0
    return {
        "unet_tile_px": side,
        "unet_tiles_per_call": len(tiles),
        "unet_max_batch": seg.max_batch,
        "unet_tiles_per_s": round(reps * len(tiles) / t_seg, 2),
        "inception_input_px": px,
        "inception_batch_size": pipe.classifier.batch_size,
        "inception_cells_per_s": round(n_cells / t_cls, 1),
    }


def bench_e2e_gpu(
    work: Path, pipeline_path: Path, spec: SlideSpec, device: str, threads: int
) -> dict[str, Any]:
    from e2e import warm_slide

    slide, sinfo = synth_slide(work, spec)
    warm = warm_slide(work)
    # one worker per GPU; its threads read tiles and post-process while the GPU works
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    run = run_on_cluster_device([slide], pipeline_path, work / "out" / "gpu", device, threads, warm)
    row = run["slides"][0]
    return {
        "slide": sinfo,
        "run": run,
        "seconds": row["seconds"],
        "cells": row["cells"],
        "cells_per_s": row["cells_per_s"],
        "target": "100k cells in < 30 s",
        "met": row["cells"] >= 100_000 and row["seconds"] < 30,
    }


def run_on_cluster_device(
    slides: list[Path], pipeline_path: Path, out: Path, device: str, threads: int, warm: Path
) -> dict[str, Any]:
    """Like e2e.run_on_cluster, with the device (ModelRefs.device) set."""
    from wsiflow.config import load_pipeline
    from wsiflow.execution.cluster import ClusterOptions, connect
    from wsiflow.execution.runner import Runner, RunOptions
    from wsiflow.execution.worker import resolve_models

    pipe = load_pipeline(pipeline_path)
    refs, bundles = resolve_models(pipe, device)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"device": device, "workers": 1, "threads_per_worker": threads}
    with connect(ClusterOptions(n_workers=1, threads_per_worker=threads, device=device)) as session:
        runner = Runner(session.client, pipe, refs, bundles, RunOptions(out=out, overwrite=True))
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
                    "slide": s.name,
                    "seconds": round(r.seconds, 2),
                    "cells": r.n_cells,
                    "tiles": r.tiles_total,
                    "cells_per_s": round(r.n_cells / r.seconds, 1),
                }
            )
            log(f"B8 e2e: {rows[-1]}")
        res["slides"] = rows
    res["total_s"] = round(time.perf_counter() - t0, 2)
    return res


def main() -> None:
    ap = bench_parser(__doc__, work=Path(os.environ.get("OUT", ROOT / ".bench")) / "gpu-work", size=False)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--cells", type=int, default=None, help="classifier cells to time (default 20k / 4k quick)"
    )
    ap.add_argument("--tiles", type=int, default=None, help="U-Net tiles to time (default 32 / 8 quick)")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--e2e-size", type=int, default=None, help="side of the e2e slide in px (default 44000)")
    ap.add_argument("--e2e-density", type=float, default=2400.0, help="cells per mm² (e2e slide)")
    a = ap.parse_args()
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        emit({"bench": "B8 GPU", "error": "no CUDA device visible", "machine": machine()})
        return
    info = machine()
    if a.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
    pipeline_path, minfo = bench_pipeline(a.work, a.models)
    n_cells = a.cells or (4096 if a.quick else 20480)
    result: dict[str, Any] = {"bench": "B8 GPU", "machine": info, "models": minfo}
    result["B2"] = bench_models_gpu(pipeline_path, a.device, n_cells, a.tiles or (8 if a.quick else 32))
    if not a.skip_e2e:
        # ~100k nucleated cells: 2400 cells/mm² × (usable part of) 44000² px at 0.25 µm/px
        side = a.e2e_size or (6000 if a.quick else 44000)
        spec = SlideSpec(side, side, seed=11, density=a.e2e_density)
        threads = max(1, (os.cpu_count() or 2))
        result["B3"] = bench_e2e_gpu(a.work, pipeline_path, spec, a.device, threads)
        pm, row = result["B2"]["pipeline"], result["B3"]["run"]["slides"][0]
        # the same models' bare time for this slide's tiles and cells, as the pipeline runs them
        model_s = row["tiles"] / pm["unet_tiles_per_s"] + row["cells"] / pm["inception_cells_per_s"]
        result["B3"]["bare_models_s"] = round(model_s, 2)
        result["B3"]["efficiency"] = round(model_s / row["seconds"], 3) if row["seconds"] else None
        result["B3"]["efficiency_target"] = ">= 0.85"
    emit(result)


if __name__ == "__main__":
    main()

"""B7 naive baseline: a straightforward single-process loop vs ``wsiflow run`` on the same slide.

The baseline is a competent single-process script: for every tissue tile, OpenSlide
``read_region`` at level 0 → PIL resize to seg µm/px → the same U-Net and the same
post-processing (``instances_from_probs``) → for every owned cell, ``read_region`` of its
crop → the tile's crops through the same InceptionV3 **in batches** of the pipeline's
``classifier.batch_size`` → a dict per cell → ``json.dump`` of the list. Same bundles, same
tiles (the runner's tissue selection), same normalisation, torch on both cores.
``--per-cell`` (``naive(..., batch_size=1)``) is the earlier, weaker baseline that ran
InceptionV3 on one cell at a time (the figures in the README before issue 17 used it).

Both sides run as fresh subprocesses and are timed wall-clock from start to exit:
``wsiflow run SLIDE -o OUT --pipeline P --workers 2 --threads-per-worker 1`` and
``python bench_naive.py --naive SLIDE P OUT``. Target: wsiflow ≥ 2× faster.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    PY,
    SlideSpec,
    bench_pipeline,
    emit,
    log,
    machine,
    ratio,
    run_cmd,
    synth_slide,
    wsiflow_run_cmd,
)
from options import bench_parser, pick_spec

from wsiflow.execution.loopback import process_env

QUICK = SlideSpec(4000, 4000, seed=1, density=400)
FULL = SlideSpec(8000, 8000, seed=3)


def naive(slide_path: str, pipeline_path: str, out_json: str, batch_size: int | None = None) -> int:
    """The baseline loop; returns the number of cells written. ``batch_size``: crops per
    InceptionV3 call (default: the pipeline's ``classifier.batch_size``; 1 = one cell at a time)."""
    import openslide
    import torch
    from PIL import Image

    from wsiflow.config import load_pipeline
    from wsiflow.models.bundle import ModelBundle
    from wsiflow.pipeline.plan import plan_slide
    from wsiflow.segment import instances_from_probs

    pipe = load_pipeline(pipeline_path)
    bs = max(1, batch_size or pipe.classifier.batch_size)
    seg_b = ModelBundle.load(pipe.segmenter.bundle)
    cls_b = ModelBundle.load(pipe.classifier.bundle)
    unet = seg_b.build("cpu")
    incep = cls_b.build("cpu")
    smean, sstd = torch.tensor(seg_b.mean).view(1, 3, 1, 1), torch.tensor(seg_b.std).view(1, 3, 1, 1)
    cmean, cstd = torch.tensor(cls_b.mean).view(1, 3, 1, 1), torch.tensor(cls_b.std).view(1, 3, 1, 1)
    has_nuc = len(seg_b.class_codes) > 1 and seg_b.class_codes[1] == "nucleus"
    plan = plan_slide(slide_path, pipe, None)
    osr = openslide.OpenSlide(slide_path)
    slide_mpp = float(osr.properties[openslide.PROPERTY_NAME_MPP_X])
    seg_mpp, cls_mpp = pipe.resolution.seg_mpp, pipe.resolution.cls_mpp
    px = pipe.classifier.input_px
    pad0 = pipe.classifier.crop.pad_um / slide_mpp  # level-0 px
    codes = pipe.class_codes
    cells: list[dict[str, Any]] = []
    with torch.inference_mode():
        for tile in plan.tiles:
            b = tile.read
            w0, h0 = round(b.w), round(b.h)
            region = osr.read_region((round(b.x), round(b.y)), 0, (w0, h0)).convert("RGB")
            w, h = tile.read_px
            rgb = np.asarray(region.resize((w, h), Image.Resampling.BOX))
            x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
            probs = torch.sigmoid(unet((x - smean) / sstd))[0].numpy()
            table, edge = instances_from_probs(
                probs[0], probs[1] if has_nuc else None, pipe.segmenter, (b.x, b.y), b.w / w, seg_mpp
            )
            c = tile.core
            owned: list[int] = []
            crops: list[np.ndarray] = []
            for i in range(len(table)):
                cx, cy = float(table.x[i]), float(table.y[i])
                if edge[i] or not (c.x <= cx < c.x1 and c.y <= cy < c.y1):
                    continue
                x0, y0, x1, y1 = table.bbox[i]
                side = max(x1 - x0, y1 - y0) + 2 * pad0
                left, top = (x0 + x1) / 2 - side / 2, (y0 + y1) / 2 - side / 2
                crop = osr.read_region((int(left), int(top)), 0, (math.ceil(side), math.ceil(side))).convert(
                    "RGB"
                )
                if abs(cls_mpp - slide_mpp) > 1e-6:
                    s = max(1, round(math.ceil(side) * slide_mpp / cls_mpp))
                    crop = crop.resize((s, s), Image.Resampling.BILINEAR)
                crops.append(np.asarray(crop.resize((px, px), Image.Resampling.BILINEAR)))
                owned.append(i)
            for start in range(0, len(owned), bs):
                t = torch.from_numpy(np.stack(crops[start : start + bs])).permute(0, 3, 1, 2).float() / 255
                probs_b = torch.softmax(incep((t - cmean) / cstd), dim=1).numpy()
                for i, p in zip(owned[start : start + bs], probs_b, strict=True):
                    k = int(p.argmax())
                    cells.append(
                        {
                            "x": float(table.x[i]),
                            "y": float(table.y[i]),
                            "polygon": table.polygon(i).tolist(),
                            "area_um2": float(table.area_um2[i]),
                            "class": codes[k],
                            "probs": {codes[j]: float(p[j]) for j in range(len(codes))},
                        }
                    )
    osr.close()
    with open(out_json, "w") as fh:
        json.dump({"cells": cells}, fh)
    return len(cells)


def main() -> int:
    ap = bench_parser(__doc__)
    ap.add_argument(
        "--naive", nargs=3, metavar=("SLIDE", "PIPELINE", "OUT_JSON"), help="run only the baseline loop"
    )
    ap.add_argument(
        "--per-cell", action="store_true", help="baseline classifies one cell per call (the old, weaker one)"
    )
    a = ap.parse_args()
    if a.naive:
        t0 = time.perf_counter()
        n = naive(*a.naive, batch_size=1 if a.per_cell else None)
        print(json.dumps({"cells": n, "seconds": round(time.perf_counter() - t0, 2)}))
        return 0
    pipeline_path, minfo = bench_pipeline(a.work, a.models)
    spec = pick_spec(a, QUICK, FULL)
    slide, sinfo = synth_slide(a.work, spec)
    out = a.work / "out" / "naive"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = process_env(1)
    t_ws, _, _ = run_cmd(wsiflow_run_cmd(slide, out / "wsiflow", pipeline_path), env=env)
    summ = json.loads((out / "wsiflow" / slide.stem / "summary.json").read_text())
    ws_cells = summ["summary"]["n_cells"]
    log(f"B7 wsiflow run: {t_ws:.1f} s, {ws_cells} cells")
    env2 = dict(env)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env2[k] = "2"
    t_nv, so, _ = run_cmd(
        [
            PY,
            str(Path(__file__).resolve()),
            "--naive",
            str(slide),
            str(pipeline_path),
            str(out / "naive.json"),
            *(["--per-cell"] if a.per_cell else []),
        ],
        env=env2,
    )
    nv = json.loads(so.strip().splitlines()[-1])
    log(f"B7 naive: {t_nv:.1f} s, {nv['cells']} cells")
    speed = ratio(t_nv, t_ws)
    emit(
        {
            "bench": "B7 naive baseline",
            "machine": machine(),
            "models": minfo,
            "slide": sinfo,
            "wsiflow_run_s": round(t_ws, 2),
            "wsiflow_cells": ws_cells,
            "naive_s": round(t_nv, 2),
            "naive_loop_s": nv["seconds"],
            "naive_cells": nv["cells"],
            "naive_classification": (
                "one cell per call" if a.per_cell else "batched (classifier.batch_size per call)"
            ),
            "speedup": speed,
            "target": ">= 2",
            "met": speed is not None and speed >= 2,
            "command_wsiflow": (
                "wsiflow run SLIDE -o OUT --pipeline P --workers 2 --threads-per-worker 1 --device cpu"
            ),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

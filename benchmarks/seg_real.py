"""Real-pixel segmenter figures (issue 14): one segmenter bundle on every real data set at once.

- SegPC-2021 marrow fields (``segpc-marrow``, partial masks: plasma cells only), held-out
  split: recall, one-to-one matches (IoU ≥ 0.5), detections on the letterbox band
  (``wsiflow.train.seg_partial``), at ``--segpc-mpp`` (0.25 µm/px).
- wbc-seg (expert masks, never trained on): pooled Dice per data set, at Dataset 1 0.18 µm/px
  (cell areas matched to PBC's; its red cells cannot be measured) and Dataset 2 0.1 (its red
  cells measure as PBC's: ``python benchmarks/wbc_mpp.py``; 0.077 before, from cell areas).
- BCCD test split (72 fields held out): WBC box recall and precision, and precision with the
  white cells BCCD left without a WBC box (``bccd_review.json``, drawn by ``bccd_review.py``)
  counted as white cells (``precision_reviewed``).
- PBC mosaic (``../shared/tools/composite_slide.py --per-class 44 --seed 0``, 352 fields)
  run through ``wsiflow run`` with the pipeline, scored by ``../shared/tools/match_truth.py
  --exclude platelet``: centre-cell recall, centre cells detected twice.

Post-processing: the ``--pipeline``'s segmenter settings (threshold, area limits, marker
distance), with its bundle replaced by BUNDLE. Prints one JSON object; ``--out`` also writes it.

    python benchmarks/seg_real.py marrow-seg --pipeline mds
    python benchmarks/seg_real.py smear-seg --pipeline pb-differential
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TOOLS = ROOT.parent / "shared" / "tools"
WBC_MPP = {"Dataset 1": 0.18, "Dataset 2": 0.1}


def print_result(res: dict[str, Any], out: Path | None) -> None:
    """The script's JSON result on stdout, and into ``out`` when given."""
    text = json.dumps(res, indent=1)
    print(text)
    if out:
        out.write_text(text + "\n", encoding="utf-8")


def run_slide(slide: Path, out: Path, pipeline: str | Path) -> None:
    """``wsiflow run`` of one slide as these figures are made: 1 worker × 1 thread, replacing OUT."""
    subprocess.run(
        [str(Path(sys.executable).with_name("wsiflow")), "run", str(slide), "-o", str(out), "--pipeline",
         str(pipeline), "--workers", "1", "--threads-per-worker", "1", "--no-progress", "--overwrite"],
        check=True,
        capture_output=True,
    )  # fmt: skip


def _mosaic(bundle_path: Path, pipeline: str, work: Path) -> dict[str, Any]:
    import yaml

    from wsiflow.config import shipped_pipelines

    work.mkdir(parents=True, exist_ok=True)
    slide = work / "pbc44.svs"
    if not slide.is_file():
        subprocess.run(
            [
                sys.executable,
                str(TOOLS / "composite_slide.py"),
                str(DATA / "pbc"),
                str(slide),
                "--per-class",
                "44",
                "--seed",
                "0",
            ],
            check=True,
            capture_output=True,
        )
    ref = shipped_pipelines().get(pipeline, Path(pipeline))
    data = yaml.safe_load(Path(ref).read_text(encoding="utf-8"))
    data["segmenter"]["bundle"] = str(bundle_path)
    data["segmenter"].pop("sha256", None)
    pipe = work / "pipeline.yaml"
    pipe.write_text(yaml.safe_dump(data), encoding="utf-8")
    out = work / "run"
    run_slide(slide, out, pipe)
    score = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "match_truth.py"),
            str(out / "pbc44" / "cells.geojson.gz"),
            str(slide.with_suffix(".truth.json")),
            "--exclude",
            "platelet",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    line = next(ln for ln in score.splitlines() if ln.startswith("{"))
    res: dict[str, Any] = json.loads(line)
    return {"slide": "composite_slide.py pbc --per-class 44 --seed 0", **res}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", help="segmenter bundle (shipped name or path)")
    ap.add_argument("--pipeline", default="mds", help="post-processing settings from this pipeline")
    ap.add_argument("--segpc-mpp", type=float, default=0.25)
    ap.add_argument("--split", default="test", help="SegPC split: test (held out) | tune | all")
    ap.add_argument("--skip", default="", help="comma-separated: segpc,wbc,bccd,mosaic")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsiflow-seg-real")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))

    import torch

    from wsiflow.config import load_pipeline
    from wsiflow.models.bundle import ModelBundle
    from wsiflow.segment import Segmenter
    from wsiflow.train.seg_eval import evaluate_bccd, evaluate_segmenter
    from wsiflow.train.seg_partial import evaluate_partial

    torch.set_num_threads(1)
    b = ModelBundle.load(a.bundle)
    cfg = load_pipeline(a.pipeline).segmenter.model_copy(
        update={"bundle": str(b.weights_path), "sha256": None}
    )
    seg = Segmenter(b, cfg)
    a.work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "bundle": b.name,
        "sha256": b.sha256,
        "pipeline": a.pipeline,
        "segmenter_settings": cfg.model_dump(exclude={"bundle", "sha256"}),
    }
    if "segpc" not in skip:
        p = evaluate_partial(seg, DATA / "segpc-marrow", a.segpc_mpp, a.split)
        res["segpc"] = {k: v for k, v in p.items() if k != "per_image"}
    if "wbc" not in skip:
        w = evaluate_segmenter(b, DATA / "wbc-seg", a.work / "wbc", mpp=WBC_MPP, cfg=cfg)
        res["wbc_seg"] = {
            k: {m: round(v[m], 4) for m in ("n_images", "dice", "iou", "dice_channel")}
            for k, v in w["datasets"].items()
        }
    if "bccd" not in skip:
        review = json.loads((Path(__file__).parent / "bccd_review.json").read_text(encoding="utf-8"))
        points: dict[str, list[list[float]]] = {}
        for cell in review["cells"]:
            points.setdefault(cell["image"], []).append(cell["xy"])
        c = evaluate_bccd(seg, DATA / "bccd", "test", review=points)
        res["bccd_test"] = {k: v for k, v in c.items() if k != "per_image"}
    if "mosaic" not in skip:
        res["pbc_mosaic"] = _mosaic(b.weights_path, a.pipeline, a.work / "mosaic")
    print_result(res, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

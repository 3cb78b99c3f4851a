"""The lab's loop end to end, on generated slides, with their truth playing the hematologist.

Runs the README's "Train wsiflow on your own slides" commands as a lab would (each a
``wsiflow`` subprocess), from a deliberately weak classifier:

1. a weak ``mds`` classifier: ``--weak-epochs`` epoch(s) on a few generated crops;
   ``wsiflow pipeline derive mds-demo --classifier weak.safetensors -o weak.yaml`` (the
   generated-cell segmenter: these are generated slides);
2. ``wsiflow run`` the harvest slides with it; ``wsiflow review`` picks ``--n`` cells;
3. the truth answers the review (:func:`wsiflow.synth.hematologist.answer_review`) as a
   QuPath export; ``wsiflow harvest``;
4. ``wsiflow train classifier cells/manifest.csv --init-from weak.safetensors``;
   ``wsiflow pipeline derive`` → ``lab.yaml``;
5. ``wsiflow run`` other generated slides (never harvested) with ``weak.yaml`` and with
   ``lab.yaml``; ``wsiflow compare`` each against its truth.

Prints JSON: class agreement (matched cells) and the mean absolute lineage-fraction error
before and after, per evaluation slide and pooled, plus the harvest and the card's lineage.
Data: generated slides only (``wsiflow synth``), not real pixels.

    python benchmarks/lab_loop.py WORKDIR [--harvest-slides 6] [--eval-slides 2] [--size 3000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LINEAGES = ("erythroid", "granulocytic", "megakaryocytic")


def wsiflow(*args: str) -> str:
    """Run one ``wsiflow`` command; its stdout (a failure raises with its stderr)."""
    r = subprocess.run([sys.executable, "-m", "wsiflow", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"wsiflow {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r.stdout


def _scores(results: Path, truths: dict[str, Path]) -> dict[str, Any]:
    per: dict[str, Any] = {}
    agree = matched = 0
    errs: list[float] = []
    for key, truth in truths.items():
        c = json.loads(wsiflow("compare", str(results / key), str(truth), "--json"))
        n = int(c["matched"])
        acc = float(c["classification_accuracy"])
        e = [
            abs(c["fractions"][lin]["error"]) for lin in LINEAGES if c["fractions"][lin]["error"] is not None
        ]
        per[key] = {
            "matched": n,
            "class_agreement": round(acc, 4),
            "lineage_fraction_mae": round(sum(e) / len(e), 4),
        }
        agree += round(acc * n)
        matched += n
        errs += e
    return {
        "per_slide": per,
        "class_agreement": round(agree / matched, 4) if matched else None,
        "lineage_fraction_mae": round(sum(errs) / len(errs), 4) if errs else None,
    }


def lab_loop(
    work: Path,
    harvest_slides: int = 6,
    eval_slides: int = 2,
    size: int = 3000,
    n_review: int = 300,
    epochs: int = 8,
    weak_epochs: int = 1,
    threads: int = 2,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    slides = work / "slides"
    truths_h: dict[str, Path] = {}
    truths_e: dict[str, Path] = {}
    for i in range(harvest_slides + eval_slides):
        key = f"h{i}" if i < harvest_slides else f"e{i - harvest_slides}"
        path = slides / f"{key}.svs"
        if not path.is_file():
            wsiflow("synth", str(path), "--size", f"{size}x{size}", "--seed", str(300 + i))
        (truths_h if key.startswith("h") else truths_e)[key] = path.with_name(f"{key}.truth.json")
    # 1. a deliberately weak starting classifier
    weak_data = work / "weak-data"
    if not weak_data.is_dir():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "wsiflow.synth.crops",
                "classifier",
                str(weak_data),
                "--seeds",
                "900",
                "--per-class",
                "12",
                "--input-px",
                "80",
                "--size",
                "3000",
            ],
            check=True,
            capture_output=True,
        )
    weak = work / "weak.safetensors"
    wsiflow(
        "train",
        "classifier",
        str(weak_data),
        "-o",
        str(weak),
        "--mpp",
        "0.25",
        "--input-px",
        "80",
        "--epochs",
        str(weak_epochs),
        "--taxonomy",
        "mds",
        "--threads",
        str(threads),
        "--seed",
        "0",
    )
    wsiflow("pipeline", "derive", "mds-demo", "--classifier", str(weak), "-o", str(work / "weak.yaml"))
    # 2. run and review
    res = work / "results"
    wsiflow(
        "run",
        *[str(slides / f"{k}.svs") for k in truths_h],
        "-o",
        str(res),
        "--pipeline",
        str(work / "weak.yaml"),
    )
    wsiflow("review", str(res), "-o", str(work / "review"), "--n", str(n_review), "--no-gallery")
    # 3. the truth labels the reviewed cells; harvest
    from wsiflow.synth.hematologist import answer_review

    answered = answer_review(work / "review", truths_h, work / "qupath-export")
    exports = sorted(str(p) for p in (work / "qupath-export").glob("*.geojson"))
    cells = work / "cells"
    wsiflow("harvest", str(res), "--labels", *exports, "-o", str(cells))
    # 4. train from the weak bundle on the harvest; pin it
    lab = work / "lab.safetensors"
    wsiflow(
        "train",
        "classifier",
        str(cells / "manifest.csv"),
        "-o",
        str(lab),
        "--mpp",
        "0.25",
        "--input-px",
        "80",
        "--epochs",
        str(epochs),
        "--taxonomy",
        "mds",
        "--threads",
        str(threads),
        "--init-from",
        str(weak),
        "--seed",
        "0",
    )
    wsiflow("pipeline", "derive", "mds-demo", "--classifier", str(lab), "-o", str(work / "lab.yaml"))
    # 5. other slides, before and after
    eval_paths = [str(slides / f"{k}.svs") for k in truths_e]
    wsiflow("run", *eval_paths, "-o", str(work / "eval-weak"), "--pipeline", str(work / "weak.yaml"))
    wsiflow("run", *eval_paths, "-o", str(work / "eval-lab"), "--pipeline", str(work / "lab.yaml"))
    card = json.loads(lab.with_suffix(".json").read_text())
    return {
        "data": "generated slides (wsiflow synth), not real pixels",
        "harvest_slides": harvest_slides,
        "eval_slides": eval_slides,
        "slide_px": size,
        "reviewed": n_review,
        "answered": answered,
        "harvested": card["training_data"]["harvest"]["n_cells"],
        "lab_card": {
            "trained_on": card["training_data"]["name"],
            "harvest_manifest_sha256": card["training_data"]["harvest"]["manifest_sha256"],
            "initialised_from": card["training"]["initialised_from"]["bundle"],
            "split_counts": card["split"]["counts"],
            "crop": card.get("crop"),
            "temperature": card["calibration"]["temperature"],
        },
        "before": _scores(work / "eval-weak", truths_e),
        "after": _scores(work / "eval-lab", truths_e),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--harvest-slides", type=int, default=6)
    ap.add_argument("--eval-slides", type=int, default=2)
    ap.add_argument("--size", type=int, default=3000)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--weak-epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    out = lab_loop(a.work, a.harvest_slides, a.eval_slides, a.size, a.n, a.epochs, a.weak_epochs, a.threads)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

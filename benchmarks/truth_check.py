"""Issue 5 check: ``wsiflow run`` on 5 generated slides with known truth.

Five slides (different seeds; lineage dysplasia fractions just above and just below the
WHO 10% threshold, and far from it) are generated with ``wsiflow.synth``, run together
through the real runner (embedded Dask cluster, Zarr, GeoJSON, summary) with the
pipeline's bundles, and compared with their truth (``wsiflow.synth.compare``).

Criteria per slide: cell recall and precision >= 0.95; no true cell detected twice;
for each lineage the true fraction inside the reported 95% interval; the threshold
call right wherever the interval does not straddle 10%. The blast % is reported next
to its truth (its interval is checked the same way).

    python benchmarks/truth_check.py [--size 5000x5000] [--work DIR] [--out result.json]

Prints one JSON object and a Markdown table; exit code 0 when every criterion holds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SLIDES: tuple[dict[str, Any], ...] = (
    {
        "seed": 101,
        "dysplasia": {"erythroid": 0.12, "granulocytic": 0.08, "megakaryocytic": 0.30},
        "blasts": 0.03,
    },
    {
        "seed": 102,
        "dysplasia": {"erythroid": 0.08, "granulocytic": 0.12, "megakaryocytic": 0.05},
        "blasts": 0.07,
    },
    {
        "seed": 103,
        "dysplasia": {"erythroid": 0.25, "granulocytic": 0.03, "megakaryocytic": 0.11},
        "blasts": 0.12,
    },
    {
        "seed": 104,
        "dysplasia": {"erythroid": 0.11, "granulocytic": 0.09, "megakaryocytic": 0.50},
        "blasts": 0.02,
    },
    {
        "seed": 105,
        "dysplasia": {"erythroid": 0.02, "granulocytic": 0.20, "megakaryocytic": 0.09},
        "blasts": 0.21,
    },
)
THRESHOLD = 0.10


def _lineage_checks(summary: dict[str, Any], truth: dict[str, Any]) -> list[dict[str, Any]]:
    by_lin = {d["lineage"]: d for d in summary.get("lineages", [])}
    rows = []
    for lin, t in truth["lineages"].items():
        d = by_lin.get(lin, {})
        lo, hi, frac = d.get("ci_low"), d.get("ci_high"), d.get("fraction")
        true_f = float(t["fraction"])
        inside = lo is not None and hi is not None and lo <= true_f <= hi
        straddles = lo is None or hi is None or (lo < THRESHOLD <= hi)
        call_ok = None if straddles else ((lo >= THRESHOLD) == (true_f >= THRESHOLD))
        rows.append(
            {
                "lineage": lin,
                "measured": frac,
                "ci": [lo, hi],
                "truth": round(true_f, 4),
                "truth_inside_ci": inside,
                "call": d.get("flag"),
                "call_right": call_ok,
                "cells": (d.get("normal", 0) + d.get("dysplastic", 0)) if d else 0,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="5000x5000", help="Each slide's size WIDTHxHEIGHT (level-0 px)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsiflow-truth-check")
    ap.add_argument("--pipeline", default="mds-demo")
    ap.add_argument("--out", type=Path, help="Also write the JSON here")
    a = ap.parse_args(argv)

    from wsiflow.cli._progress import BarReporter
    from wsiflow.config import load_pipeline
    from wsiflow.execution.cluster import ClusterOptions
    from wsiflow.execution.runner import RunOptions, run_slides
    from wsiflow.execution.worker import resolve_models
    from wsiflow.synth import SynthParams, synthesize
    from wsiflow.synth import compare as cmp

    w, h = (int(v) for v in a.size.lower().split("x"))
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths, truths = [], {}
    for spec in SLIDES:
        p = a.work / f"check-s{spec['seed']}.svs"
        params = SynthParams(
            width=w, height=h, mpp=0.25, seed=spec["seed"], dysplasia=spec["dysplasia"], blasts=spec["blasts"]
        )
        truths[p.stem] = synthesize(p, params).summary
        paths.append(str(p))
    t_synth = time.perf_counter() - t0

    pipe = load_pipeline(a.pipeline)
    refs, bundles = resolve_models(pipe, "auto")
    t1 = time.perf_counter()
    results = run_slides(
        paths,
        pipe,
        RunOptions(out=a.work / "run", overwrite=True),
        ClusterOptions(quiet=True),
        BarReporter(enabled=False),
        models=(refs, bundles),
    )
    t_run = time.perf_counter() - t1

    slides: list[dict[str, Any]] = []
    all_ok = True
    for res in results:
        stem = Path(res.path).stem
        if not res.ok or res.summary is None or res.out_dir is None:
            slides.append({"slide": stem, "error": str(res.error)})
            all_ok = False
            continue
        c = cmp.compare(cmp.load_truth(res.path), cmp.load_detections(res.out_dir))
        truth = truths[stem]
        summary = res.summary.to_dict()
        lin = _lineage_checks(summary, truth)
        b = summary.get("blast") or {}
        # the truth over the run's denominator (default: nucleated cells without megakaryocytes)
        counts = truth["counts"]
        no_mk = summary.get("denominator_rule") == "nucleated-without-megakaryocytes"
        den = sum(int(n) for code, n in counts.items() if not (no_mk and code in ("MN", "MD")))
        tb = counts["blast"] / den if den else float(truth["blasts"]["fraction"])
        blast: dict[str, Any] = {
            "measured": b.get("fraction"),
            "ci": [b.get("ci_low"), b.get("ci_high")],
            "truth": round(tb, 4),
            "truth_inside_ci": b.get("ci_low") is not None and b["ci_low"] <= tb <= b["ci_high"],
        }
        ok = (
            c.recall >= 0.95
            and c.precision >= 0.95
            and c.duplicates == 0
            and all(r["truth_inside_ci"] and r["call_right"] is not False for r in lin)
        )
        all_ok &= ok
        slides.append(
            {
                "slide": stem,
                "ok": ok,
                "n_true": c.n_true,
                "n_pred": c.n_pred,
                "recall": round(c.recall, 4),
                "precision": round(c.precision, 4),
                "duplicates": c.duplicates,
                "class_agreement": round(c.accuracy, 4),
                "lineages": lin,
                "blasts": blast,
            }
        )
    out = {
        "benchmark": "truth_check",
        "size": a.size,
        "pipeline": a.pipeline,
        "bundles": {b.task: f"{b.name} ({b.sha256[:12]})" for b in bundles},
        "seconds": {"synth": round(t_synth, 1), "run": round(t_run, 1)},
        "all_ok": all_ok,
        "slides": slides,
    }
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    head = "slide | recall | precision | twice | lineage | measured % | 95% CI % | truth % | inside | call"
    head += " | right"
    print(f"\n| {head} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in slides:
        for r in s.get("lineages", []):
            print(
                f"| {s['slide']} | {s['recall']:.3f} | {s['precision']:.3f} | {s['duplicates']} | "
                f"{r['lineage']} | "
                f"{pct(r['measured'])} | {pct(r['ci'][0])}–{pct(r['ci'][1])} | {pct(r['truth'])} | "
                f"{'yes' if r['truth_inside_ci'] else 'NO'} | {r['call']} | "
                f"{'-' if r['call_right'] is None else ('yes' if r['call_right'] else 'NO')} |"
            )
        if "blasts" in s:
            bl = s["blasts"]
            print(
                f"| {s['slide']} | | | | blasts | {pct(bl['measured'])} | "
                f"{pct(bl['ci'][0])}–{pct(bl['ci'][1])} | "
                f"{pct(bl['truth'])} | {'yes' if bl['truth_inside_ci'] else 'NO'} | | |"
            )
    print(f"\nall criteria met: {all_ok}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

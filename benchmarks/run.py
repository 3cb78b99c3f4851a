"""Run the wsiflow benchmarks B1-B7 and print JSON plus a Markdown table of ratios vs targets.

    python benchmarks/run.py --quick            # small inputs, < 5 min on 2 cores
    python benchmarks/run.py                    # full sizes (B3: >= 20k cells, B6: 1M cells)
    python benchmarks/run.py --only B1,B6       # a subset

Each benchmark runs in its own process (``bench_*.py``, which prints one JSON object);
generated slides and model stand-ins are cached in ``--work`` (default ``$TMPDIR/wsiflow-bench``).
Ratios compare measurements taken within the same run on the same machine.
B8 (GPU) is ``gpu_bench.py``, run separately on a CUDA machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import machine
from options import bench_parser, forward

HERE = Path(__file__).resolve().parent

BENCHES: dict[str, str] = {
    "B1": "bench_read.py",
    "B2": "bench_models.py",
    "B3": "bench_e2e.py",
    "B4": "bench_scaling.py",
    "B5": "bench_memory.py",
    "B6": "bench_write.py",
    "B7": "bench_naive.py",
}


def run_one(key: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / BENCHES[key]), *forward(args)]
    if args.quick and key == "B2":
        cmd.append("--no-options")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t0
    sys.stderr.write(p.stderr[-4000:] if p.returncode else "")
    if p.returncode != 0:
        return {
            "bench": key,
            "error": f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}",
            "wall_s": round(dt, 1),
        }
    try:
        res: dict[str, Any] = json.loads(p.stdout)
    except json.JSONDecodeError:
        return {"bench": key, "error": "no JSON on stdout", "wall_s": round(dt, 1)}
    res["wall_s"] = round(dt, 1)
    print(f"[run] {key} done in {dt:.0f} s", file=sys.stderr, flush=True)
    return res


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _met(v: Any) -> str:
    return "met" if v is True else ("NOT met" if v is False else "-")


def table(results: dict[str, dict[str, Any]]) -> str:
    rows: list[tuple[str, str, str, str, str]] = []
    r = results.get("B1")
    if r and "error" not in r:
        for s in r["slides"]:
            t, o = s["slide_tiffslide"], s["slide_openslide"]
            rows.append(
                (
                    f"B1 read {s['slide']}",
                    f"tiffslide {t['src_MPps']} MP/s, openslide {o['src_MPps']} MP/s, "
                    f"raw JPEG {s['raw']['src_MPps']} MP/s",
                    f"{_f(t['ratio_to_raw'])} (openslide {_f(o['ratio_to_raw'])})",
                    ">= 0.8",
                    _met(t["ratio_to_raw"] >= 0.8),
                )
            )
            pr = s.get("pipeline_read")
            if pr:
                rows.append(
                    (
                        f"B1 pipeline read {s['slide']}",
                        f"process_tile reads {pr['seconds']} s ({pr['tiles_read_once']} tiles decoded once), "
                        f"raw decode of each JPEG tile once {s['raw_decode_once']['seconds']} s",
                        _f(pr["ratio_to_raw_decode_once"]),
                        ">= 0.8",
                        _met((pr["ratio_to_raw_decode_once"] or 0) >= 0.8),
                    )
                )
    r = results.get("B2")
    b3 = results.get("B3")
    if r is None and b3 and "error" not in b3:  # quick: the bare-model figures B3 measured
        bl = b3["bare_layouts"]
        r = {
            "layouts": bl,
            "models": b3["models"],
            "scaling_2proc_vs_1x1": {
                m: round(bl["2proc_x1thr"][m][u] / bl["1proc_x1thr"][m][u], 3)
                for m, u in (("unet", "tiles_per_s"), ("inception", "cells_per_s"))
            },
        }
    if r and "error" not in r:
        L = r["layouts"]
        rows.append(
            (
                "B2 U-Net tiles/s",
                f"1x1 {L['1proc_x1thr']['unet']['tiles_per_s']}, "
                f"1x2 {L.get('1proc_x2thr', {}).get('unet', {}).get('tiles_per_s', '-')}, "
                f"2 procs x1 {L['2proc_x1thr']['unet']['tiles_per_s']} "
                f"(tile {L['1proc_x1thr'].get('tile_px')} px)",
                f"2procs/1x1 {_f(r['scaling_2proc_vs_1x1']['unet'])}",
                "-",
                "-",
            )
        )
        rows.append(
            (
                "B2 InceptionV3 cells/s",
                f"1x1 {L['1proc_x1thr']['inception']['cells_per_s']}, "
                f"1x2 {L.get('1proc_x2thr', {}).get('inception', {}).get('cells_per_s', '-')}, "
                f"2 procs x1 {L['2proc_x1thr']['inception']['cells_per_s']} ({r['models']['input_px']} px)",
                f"2procs/1x1 {_f(r['scaling_2proc_vs_1x1']['inception'])}",
                "-",
                "-",
            )
        )
        if "options" in r:
            for name in ("unet", "inception"):
                o = r["options"][name]
                opts = ", ".join(f"{k} {v}" for k, v in o.items() if k != "unit")
                rows.append((f"B2 options {name} ({o['unit']}, 2 thr)", opts, "-", "-", "-"))
    r = results.get("B3")
    if r and "error" not in r:
        rows.append(
            (
                f"B3 end to end ({r['run']['slides'][0]['cells']} cells, "
                f"{r['run']['slides'][0]['tiles']} tiles)",
                f"{r['e2e_cells_per_s']} cells/s, {r['e2e_tiles_per_s']} tiles/s; "
                f"bare models {r['bare_cells_per_s']} cells/s",
                f"efficiency {_f(r['efficiency'])} (vs the models at the run's 2x1 layout: "
                f"{_f(r.get('efficiency_same_layout_2x1'))})",
                ">= 0.85",
                _met(r["met"]),
            )
        )
        st = r["stage_profile_1_worker"]["stage_fraction"]
        rows.append(
            ("B3 stage shares (1 worker)", ", ".join(f"{k} {v:.0%}" for k, v in st.items()), "-", "-", "-")
        )
    r = results.get("B4")
    if r and "error" not in r:
        runs = r["runs"]
        desc = ", ".join(f"{k} {v['slides'][0]['seconds']} s" for k, v in runs.items())
        rows.append(
            (
                "B4 scaling 1 -> 2 workers",
                desc,
                f"{_f(r['speedup_2_workers'])}x",
                ">= 1.8x",
                _met(r["speedup_met"]),
            )
        )
        rows.append(
            (
                "B4 external scheduler + 2 dask workers",
                "; ".join(
                    f"external {p['external_2x1_s']} s vs embedded {p['embedded_2x1_s']} s"
                    for p in r.get("external_pairs", [])
                )
                + (" (median of the pairs' ratios)" if len(r.get("external_pairs", [])) > 1 else ""),
                f"{_f(r['external_vs_embedded_time'], 3)}",
                "0.95-1.05",
                _met(r["external_met"]),
            )
        )
    r = results.get("B5")
    if r and "error" not in r:
        s, b = r["small"], r["big_16x"]
        rows.append(
            (
                "B5 peak RSS, 16x slide / 1x",
                f"client {s['client_peak_mb']} -> {b['client_peak_mb']} MB; "
                f"workers {s['worker_peaks_mb']} -> {b['worker_peaks_mb']} MB",
                f"client {_f(r['client_ratio'])}, worker {_f(r['worker_ratio'])}",
                "<= 1.2",
                _met(r["met"]),
            )
        )
    r = results.get("B6")
    if r and "error" not in r:
        g, z = r["geojson"], r["zarr"]
        rows.append(
            (
                f"B6 GeoJSON {g['cells']} cells",
                f"wsiflow plain {g.get('wsiflow_plain_s')} s, .gz {g['wsiflow_s']} s "
                f"({g['wsiflow_cells_per_s']} cells/s); geopandas (plain) {g['geopandas_cells']} cells "
                f"{g['geopandas_s']} s ({g['geopandas_cells_per_s']} cells/s)",
                f"plain {_f(g['speedup'], 1)}x, .gz {_f(g.get('speedup_gz'), 1)}x "
                f"(CPU time: {_f(g.get('speedup_plain_cpu'), 1)}x, {_f(g.get('speedup_gz_cpu'), 1)}x)",
                ">= 10x",
                _met(r["met"]),
            )
        )
        rows.append(
            (
                f"B6 Zarr {z['cells']} cells",
                f"append {z['append_s']} s ({z['append_cells_per_s']} cells/s); "
                f"read_table+sort {z['read_table_sorted_s']} s, "
                f"{z['read_table_sorted_peak_mb']} MB",
                "-",
                "-",
                "-",
            )
        )
    r = results.get("B7")
    if r and "error" not in r:
        rows.append(
            (
                f"B7 naive loop vs wsiflow run ({r['wsiflow_cells']} cells)",
                f"naive {r['naive_s']} s, wsiflow {r['wsiflow_run_s']} s",
                f"{_f(r['speedup'])}x",
                ">= 2x",
                _met(r["met"]),
            )
        )
    for k, v in results.items():
        if "error" in v:
            rows.append((k, f"ERROR {v['error']}", "-", "-", "-"))
    head = "| benchmark | measured | ratio | target | verdict |\n|---|---|---|---|---|"
    return head + "\n" + "\n".join("| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows)


def main() -> None:
    ap = bench_parser(__doc__, size=False)
    ap.add_argument("--only", default="", help="comma-separated subset, e.g. B1,B6")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = ap.parse_args()
    # quick: B2's figures come from B3, which measures the bare models in the same run
    default = [k for k in BENCHES if not (a.quick and k == "B2")]
    keys = [k.strip().upper() for k in a.only.split(",") if k.strip()] or default
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for k in keys:
        print(f"[run] {k} {BENCHES[k]} ...", file=sys.stderr, flush=True)
        results[k] = run_one(k, a)
    total = time.perf_counter() - t0
    doc = {"quick": a.quick, "machine": machine(), "total_s": round(total, 1), "results": results}
    text = json.dumps(doc, indent=1)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    print()
    print(table(results))
    print(f"\ntotal {total:.0f} s ({'quick' if a.quick else 'full'})")


if __name__ == "__main__":
    main()

"""B9 whole-slide size: one generated slide the size of a 40x aspirate scan region, end to end.

``wsiflow run SLIDE -o OUT --workers 2 --threads-per-worker 1`` runs as a subprocess on a
generated slide (``wsiflow.synth``, 0.25 µm/px, the same density as B5) while a psutil thread
samples the RSS of its process tree (client = the CLI process, which also hosts the embedded
scheduler; workers = the deepest processes). Reported: wall time, cells/s, client and
worker peak RSS beside the same figures for a small slide run in the same invocation (the
B5 bound: ratio ≤ 1.2), the Zarr store and GeoJSON sizes per 100k cells, and the time the
QuPath outputs take to write: the GeoJSON (plain) written again from the finished store in
this process, timed alone (``write_geojson(store.iter_sorted())``, what the runner's
finishing step calls). Models: the shipped ``mds-demo`` bundles (the ones trained on
generated cells) unless ``--models standin``.

The small slide is 3 × 3 of the pipeline's tiles (6144² px for 512-µm tiles at 0.25 µm/px):
reads are clipped to the slide (:meth:`wsiflow.tiling.Tile.within`), so a slide of 2 × 2
tiles or fewer has only edge tiles, whose reads are smaller than an interior tile's; the
centre tile of 3 × 3 is read at full size, as every interior tile of the big slide, and a
worker's peak follows the largest read box, not the slide.

    python benchmarks/bench_wholeslide.py --size 40000x40000
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench_memory import measure
from common import SlideSpec, bench_pipeline, emit, log, machine, ratio, synth_slide, tree_bytes
from options import bench_parser


def _time_geojson(store_path: Path, work: Path, pipeline_path: Path) -> dict[str, Any]:
    """The finishing step's GeoJSON write (gzip, as the runner writes it), timed alone."""
    from wsiflow.config import load_pipeline
    from wsiflow.writers.geojson import write_geojson
    from wsiflow.writers.zarr_store import CellStore

    taxonomy = load_pipeline(pipeline_path).taxonomy
    store = CellStore.open(store_path)
    dest = work / "rewrite.geojson.gz"
    t0, cpu0 = time.perf_counter(), time.process_time()
    n = write_geojson(dest, store.iter_sorted(), taxonomy)
    out = {
        "cells": n,
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
        "bytes": dest.stat().st_size,
    }
    dest.unlink()
    return out


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the big slide's outputs")
    a = ap.parse_args()
    pipeline_path, minfo = bench_pipeline(a.work, a.models, base="mds-demo")
    if a.size:
        w, h = (int(v) for v in a.size.lower().split("x"))
    elif a.quick:
        w, h = 8000, 8000
    else:
        w, h = 40000, 40000
    from wsiflow.config import load_pipeline

    tile_px = round(load_pipeline(pipeline_path).tiling.tile_um / SlideSpec(1, 1).mpp)
    small, big = SlideSpec(3 * tile_px, 3 * tile_px, seed=5), SlideSpec(w, h, seed=9)
    t0 = time.perf_counter()
    b_path, b_info = synth_slide(a.work, big)
    b_info["generate_s"] = round(time.perf_counter() - t0, 1)
    s_path, s_info = synth_slide(a.work, small)
    rs = measure(s_path, pipeline_path, a.work / "out" / "ws_small", a.work / "logs")
    log(f"B9 small: {rs['wall_s']} s client {rs['client_peak_mb']} MB workers {rs['worker_peaks_mb']}")
    load_before = os.getloadavg()
    rb = measure(b_path, pipeline_path, a.work / "out" / "ws_big", a.work / "logs")
    load_after = os.getloadavg()
    log(f"B9 big: {rb['wall_s']} s, {rb['cells']} cells, client {rb['client_peak_mb']} MB")
    slide_out = a.work / "out" / "ws_big" / b_path.stem
    zarr_dir = next(slide_out.glob("*.zarr"))
    geojson = next(iter(sorted(slide_out.glob("*.geojson*"))))
    cells = int(rb["cells"] or 0)
    per100k = 1e5 / cells if cells else float("nan")
    zarr_bytes, geojson_bytes = tree_bytes(zarr_dir), tree_bytes(geojson)
    sizes = {
        "zarr_bytes": zarr_bytes,
        "geojson_bytes": geojson_bytes,
        "geojson_file": geojson.name,
        "zarr_mb_per_100k_cells": round(zarr_bytes * per100k / 1e6, 1),
        "geojson_mb_per_100k_cells": round(geojson_bytes * per100k / 1e6, 1),
    }
    gj = _time_geojson(zarr_dir, a.work, pipeline_path)
    gj["s_per_100k_cells"] = round(gj["wall_s"] * per100k, 2)
    client_ratio = ratio(rb["client_peak_mb"], rs["client_peak_mb"])
    worker_ratio = ratio(max(rb["worker_peaks_mb"] or [0]), max(rs["worker_peaks_mb"] or [1]))
    result = {
        "bench": "B9 whole-slide size",
        "machine": machine(),
        "load_avg_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "models": minfo,
        "slide": b_info,
        "small_slide": s_info,
        "wall_s": rb["wall_s"],
        "cells": cells,
        "cells_per_s": round(cells / rb["wall_s"], 1) if rb["wall_s"] else None,
        "megapixels_per_s": round(w * h / 1e6 / rb["wall_s"], 2) if rb["wall_s"] else None,
        "client_peak_mb": rb["client_peak_mb"],
        "worker_peaks_mb": rb["worker_peaks_mb"],
        "small": {k: rs[k] for k in ("wall_s", "cells", "client_peak_mb", "worker_peaks_mb")},
        "client_ratio_vs_small": client_ratio,
        "worker_ratio_vs_small": worker_ratio,
        "memory_target": "<= 1.2 (B5's bound)",
        "memory_met": max(x for x in (client_ratio, worker_ratio) if x is not None) <= 1.2,
        "sizes": sizes,
        "geojson_rewrite": gj,
    }
    emit(result)
    if a.out:
        a.out.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    if not a.keep:
        shutil.rmtree(a.work / "out" / "ws_big", ignore_errors=True)


if __name__ == "__main__":
    main()

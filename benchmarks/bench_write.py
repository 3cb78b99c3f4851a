"""B6 writing: QuPath GeoJSON of N cells (wsiflow) vs geopandas ``to_file(driver="GeoJSON")``,
and the Zarr cell store (append N cells in tile-sized pieces, read them back).

The cells are generated: star-shaped polygons of 16-32 vertices (what the segmenter
produces after simplification), 8-class probabilities, the mds taxonomy. Both writers get
the same polygons and the same properties (class name, 4 measurements, confidence and one
probability per class). wsiflow is timed writing plain GeoJSON (like geopandas, which writes
plain GeoJSON through pyogrio/GDAL: the like-with-like ratio, ``speedup``) and gzip (level 1,
what a run writes: ``speedup_gz``); only the write call is timed (the GeoDataFrame is built
before the clock starts). Wall and process-CPU ratios are both reported. N = 100k (quick) or 1M.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
from common import emit, log, machine, ratio, tree_bytes
from options import bench_parser


def make_cells(n: int, n_classes: int = 8, seed: int = 0, cells_per_tile: int = 1000) -> Any:
    from wsiflow.cells import CellTable, make_ids

    rng = np.random.default_rng(seed)
    nv = rng.integers(16, 33, n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(nv, out=offsets[1:])
    m = int(offsets[-1])
    cell = np.repeat(np.arange(n), nv)
    k = np.arange(m) - offsets[:-1][cell]
    ang = 2 * np.pi * k / nv[cell]
    side = int(np.ceil(np.sqrt(n)))
    cx = ((np.arange(n) % side) * 60.0 + 30).astype(np.float64)
    cy = ((np.arange(n) // side) * 60.0 + 30).astype(np.float64)
    r = rng.uniform(8, 24, n)
    rad = r[cell] * (1 + 0.1 * rng.standard_normal(m))
    xy = np.column_stack([cx[cell] + rad * np.cos(ang), cy[cell] + rad * np.sin(ang)]).astype(np.float32)
    probs = rng.dirichlet(np.ones(n_classes), n).astype(np.float32)
    tile = np.arange(n) // cells_per_tile
    ids = np.concatenate([make_ids(t, int((tile == t).sum())) for t in np.unique(tile)])
    area = (np.pi * r**2 * 0.0625).astype(np.float32)
    return CellTable(
        id=ids,
        x=cx,
        y=cy,
        bbox=np.column_stack([cx - r, cy - r, cx + r, cy + r]),
        poly_offsets=offsets,
        poly_xy=xy,
        area_um2=area,
        perimeter_um=(2 * np.pi * r * 0.25).astype(np.float32),
        circularity=rng.uniform(0.6, 1.0, n).astype(np.float32),
        seg_score=rng.uniform(0.5, 1.0, n).astype(np.float32),
        class_id=probs.argmax(1).astype(np.int16),
        probs=probs,
        tile=tile.astype(np.int64),
    )


def geodataframe(table: Any, taxonomy: Any) -> Any:
    import geopandas as gpd
    import shapely
    from shapely import GeometryType

    from wsiflow.writers.geojson import _closed_rings

    closed, offs = _closed_rings(table)
    ring_offsets = offs
    poly_offsets = np.arange(len(table) + 1, dtype=np.int64)
    geoms = shapely.from_ragged_array(
        GeometryType.POLYGON, closed.astype(np.float64), (ring_offsets, poly_offsets)
    )
    cols: dict[str, Any] = {
        "objectType": ["detection"] * len(table),
        "classification": np.array([c.name for c in taxonomy], dtype=object)[table.class_id],
        "area_um2": table.area_um2,
        "perimeter_um": table.perimeter_um,
        "circularity": table.circularity,
        "seg_score": table.seg_score,
        "confidence": table.probs.max(axis=1),
    }
    for j, c in enumerate(taxonomy):
        cols[f"P({c.code})"] = table.probs[:, j]
    return gpd.GeoDataFrame(cols, geometry=geoms)


def _timed(fn: Any) -> tuple[float, float]:
    """(wall s, CPU s of this process, all threads) of fn()."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def bench_geojson(table: Any, taxonomy: Any, tmp: Path, geopandas_n: int) -> dict[str, Any]:
    """wsiflow plain GeoJSON (like geopandas) and gzip (what a run writes) vs geopandas.

    Ratios are per cell; CPU-time ratios are given too (process CPU time, gzip threads
    included), which a machine shared with other work distorts much less than wall time.
    """
    from wsiflow.writers.geojson import write_geojson

    n = len(table)
    res: dict[str, Any] = {"cells": n}
    for kind, name in (("plain", "cells.geojson"), ("gz", "cells.geojson.gz")):
        out = tmp / name
        wall, cpu = _timed(lambda out=out: write_geojson(out, [table], taxonomy, slide_id="bench"))
        res[f"wsiflow_{kind}_s"] = round(wall, 2)
        res[f"wsiflow_{kind}_cpu_s"] = round(cpu, 2)
        res[f"wsiflow_{kind}_cells_per_s"] = round(n / wall)
        res[f"wsiflow_{kind}_mb"] = round(out.stat().st_size / 1e6, 1)
        log(f"B6 wsiflow geojson ({kind}) {n} cells: {wall:.2f} s wall, {cpu:.2f} s CPU")
        out.unlink()
    # the figures the summary table has always shown: the .gz a run writes
    res["wsiflow_s"] = res["wsiflow_gz_s"]
    res["wsiflow_cells_per_s"] = res["wsiflow_gz_cells_per_s"]
    res["wsiflow_mb_gz"] = res["wsiflow_gz_mb"]
    sub = table if geopandas_n >= n else table.take(np.arange(geopandas_n))
    gdf = geodataframe(sub, taxonomy)
    gout = tmp / "cells_gpd.geojson"
    wall, cpu = _timed(lambda: gdf.to_file(gout, driver="GeoJSON"))
    m = len(sub)
    res["geopandas_cells"] = m
    res["geopandas_s"] = round(wall, 2)
    res["geopandas_cpu_s"] = round(cpu, 2)
    res["geopandas_cells_per_s"] = round(m / wall)
    res["geopandas_mb"] = round(gout.stat().st_size / 1e6, 1)
    log(f"B6 geopandas {m} cells: {wall:.2f} s wall, {cpu:.2f} s CPU")
    for kind in ("plain", "gz"):
        res[f"speedup_{kind}"] = ratio(res[f"wsiflow_{kind}_cells_per_s"], res["geopandas_cells_per_s"], 1)
        ws_cpu = res[f"wsiflow_{kind}_cpu_s"]
        res[f"speedup_{kind}_cpu"] = ratio(n / ws_cpu, m / cpu, 1) if cpu and ws_cpu else None
    # like with like: geopandas writes plain GeoJSON
    res["speedup"] = res["speedup_plain"]
    return res


def bench_geoparquet(table: Any, taxonomy: Any, tmp: Path) -> dict[str, Any]:
    """wsiflow's GeoParquet writer (``--geoparquet``: shapely polygons, pyarrow) on the same
    cells, and reading it back with ``geopandas.read_parquet`` (how a cohort is analysed)."""
    import geopandas as gpd

    from wsiflow.writers.geoparquet import write_geoparquet

    n = len(table)
    out = tmp / "cells.parquet"
    wall, cpu = _timed(lambda: write_geoparquet(out, table, taxonomy))
    log(f"B6 wsiflow geoparquet {n} cells: {wall:.2f} s wall, {cpu:.2f} s CPU")
    t0 = time.perf_counter()
    back = gpd.read_parquet(out)
    t_read = time.perf_counter() - t0
    assert len(back) == n
    res = {
        "cells": n,
        "write_s": round(wall, 2),
        "write_cpu_s": round(cpu, 2),
        "write_cells_per_s": round(n / wall),
        "mb": round(out.stat().st_size / 1e6, 1),
        "read_parquet_s": round(t_read, 2),
    }
    out.unlink()
    return res


def bench_zarr(table: Any, tmp: Path, cells_per_append: int = 4000) -> dict[str, Any]:
    from wsiflow.writers.zarr_store import CellStore

    n_tiles = int(table.tile.max()) + 1
    path = tmp / "cells.zarr"
    t0 = time.perf_counter()
    store = CellStore.create(path, n_tiles=n_tiles, n_classes=table.n_classes, attrs={"bench": True})
    # batches of whole tiles, like the runner's results (4 tiles per task here)
    per = max(1, cells_per_append // max(1, len(table) // n_tiles))
    bounds = np.searchsorted(table.tile, np.arange(0, n_tiles + per, per))
    n_appends = 0
    for i in range(len(bounds) - 1):
        a, b = int(bounds[i]), int(bounds[i + 1])
        if a >= b:
            continue
        tiles = np.arange(i * per, min((i + 1) * per, n_tiles))
        store.append(table.take(np.arange(a, b)), tiles)
        n_appends += 1
    store.flush()
    store.finalize({})
    t_app = time.perf_counter() - t0
    size = tree_bytes(path)
    log(f"B6 zarr append {len(table)} cells: {t_app:.2f} s")
    ro = CellStore.open(path, mode="r")
    tracemalloc.start()
    t0 = time.perf_counter()
    back = ro.read_table().sorted()
    t_read = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(back) == len(table)
    return {
        "cells": len(table),
        "appends": n_appends,
        "append_s": round(t_app, 2),
        "append_cells_per_s": round(len(table) / t_app),
        "store_mb": round(size / 1e6, 1),
        "read_table_sorted_s": round(t_read, 2),
        "read_table_sorted_peak_mb": round(peak / 2**20, 1),
    }


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--cells", type=int, default=None)
    ap.add_argument("--geopandas-cells", type=int, default=None)
    a = ap.parse_args()
    from wsiflow.config import load_pipeline

    n = a.cells or (100_000 if a.quick else 1_000_000)
    gn = a.geopandas_cells or (50_000 if a.quick else n)
    taxonomy = load_pipeline("mds").taxonomy
    t0 = time.perf_counter()
    table = make_cells(n, len(taxonomy))
    log(f"B6 generated {n} cells in {time.perf_counter() - t0:.1f} s")
    tmp = Path(tempfile.mkdtemp(prefix="wsiflow-bench-", dir=a.work if a.work.exists() else None))
    try:
        gj = bench_geojson(table, taxonomy, tmp, gn)
        gp = bench_geoparquet(table, taxonomy, tmp)
        zr = bench_zarr(table, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    emit(
        {
            "bench": "B6 writing",
            "machine": machine(),
            "geojson": gj,
            "geoparquet": gp,
            "zarr": zr,
            "target": "GeoJSON >= 10x geopandas (plain vs plain; gzip reported too)",
            "met": gj["speedup"] is not None and gj["speedup"] >= 10,
        }
    )


if __name__ == "__main__":
    main()

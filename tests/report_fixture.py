"""A realistic ``wsiflow run`` output folder for report tests, built with the run's own writers.

A generated smear (``wsiflow.synth``) provides the slide and the true cell polygons; the
"calls" are the true classes with deterministic probabilities (most confident, some
borderline, a few wrong), written through CellStore, write_summary_json and
update_summary_csv exactly as ``wsiflow.execution.runner`` lays them out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson

from wsiflow.aggregate import summarize
from wsiflow.cells import CellTable, make_ids
from wsiflow.config import Pipeline
from wsiflow.tiling import TileGrid
from wsiflow.writers.summary import update_summary_csv, write_summary_json
from wsiflow.writers.zarr_store import CellStore

MODELS = {
    "segmenter": {"name": "demo-seg", "sha256": "a" * 64, "demo": True},
    "classifier": {"name": "mds-demo", "sha256": "0123456789abcdef" * 4, "demo": True},
}


def truth_cells(truth_geojson: Path, codes: tuple[str, ...]) -> tuple[list[np.ndarray], np.ndarray]:
    """Polygons (open rings, level-0 px) and class indices of a synth truth file."""
    doc = orjson.loads(truth_geojson.read_bytes())
    polys, cls = [], []
    for f in doc["features"]:
        ring = np.asarray(f["geometry"]["coordinates"][0], np.float32)[:-1]
        polys.append(ring)
        cls.append(codes.index(f["properties"]["code"]))
    return polys, np.asarray(cls, np.int64)


def fake_probs(cls: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Deterministic softmax-like rows: ~80% confident, ~15% borderline, ~5% called wrongly."""
    rng = np.random.default_rng(seed)
    n = len(cls)
    logits = rng.normal(0, 0.6, (n, k)).astype(np.float32)
    kind = rng.uniform(size=n)
    boost = np.where(kind < 0.80, 6.0, np.where(kind < 0.95, 1.2, -1.0)).astype(np.float32)
    logits[np.arange(n), cls] += boost
    wrong = kind >= 0.95
    alt = (cls + 1 + rng.integers(0, k - 1, n)) % k
    logits[np.flatnonzero(wrong), alt[wrong]] += 2.5
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def write_slide_result(
    out: Path,
    name: str,
    slide_path: Path,
    dims: tuple[int, int],
    mpp: float,
    pipeline: Pipeline,
    polys: list[np.ndarray],
    cls: np.ndarray,
    seed: int = 0,
) -> tuple[Path, dict[str, Any]]:
    """OUT/<name>/cells.zarr + summary.json and a row of OUT/summary.csv; returns (dir, summary)."""
    sdir = out / name
    sdir.mkdir(parents=True, exist_ok=True)
    k = len(pipeline.taxonomy)
    grid = TileGrid.from_pipeline(dims[0], dims[1], mpp, pipeline)
    counts = np.array([len(p) for p in polys], np.int64)
    offsets = np.zeros(len(polys) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    xy = np.concatenate(polys).astype(np.float32) if polys else np.zeros((0, 2), np.float32)
    cx = np.array([p[:, 0].mean() for p in polys]) if polys else np.zeros(0)
    cy = np.array([p[:, 1].mean() for p in polys]) if polys else np.zeros(0)
    bbox = np.array([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()] for p in polys]).reshape(
        -1, 4
    )
    tile = grid.owners(cx, cy)
    area = (
        np.array(
            [
                0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1)))
                for p in polys
            ],
            np.float32,
        )
        * mpp
        * mpp
    )
    table = CellTable(
        id=np.zeros(len(polys), np.int64),
        x=cx,
        y=cy,
        bbox=bbox,
        poly_offsets=offsets,
        poly_xy=xy,
        area_um2=area,
        perimeter_um=np.sqrt(area) * 3.6,
        circularity=np.full(len(polys), 0.85, np.float32),
        seg_score=np.full(len(polys), 0.9, np.float32),
        class_id=np.full(len(polys), -1, np.int16),
        probs=np.zeros((len(polys), 0), np.float32),
        tile=tile,
    ).with_classes(fake_probs(cls, k, seed))
    ids = np.zeros(len(table), np.int64)
    for t in np.unique(tile):
        m = np.flatnonzero(tile == t)
        ids[m] = make_ids(int(t), len(m))
    table = CellTable(**{**table.columns(), "id": ids})
    identity = {
        "path": str(slide_path.resolve()),
        "name": slide_path.name,
        "size_bytes": slide_path.stat().st_size,
        "dimensions": list(dims),
        "mpp": mpp,
        "mpp_override": None,
        "vendor": "aperio",
        "objective_power": 40.0,
        "backend": "openslide",
    }
    selected = sorted({int(t) for t in tile})
    attrs = {
        "pipeline": pipeline.model_dump(mode="json"),
        "models": MODELS,
        "slide": identity,
        "taxonomy": [c.model_dump(mode="json") for c in pipeline.taxonomy],
        "tiles_selected": selected,
    }
    store = CellStore.create(sdir / "cells.zarr", n_tiles=len(grid), n_classes=k, attrs=attrs)
    for t in selected:
        store.append(table.take(tile == t), [t])
    summary = summarize(table.class_id, pipeline, tiles_total=len(selected))
    doc = {
        "wsiflow_version": "test",
        "slide": identity,
        "pipeline": pipeline.name,
        "models": MODELS,
        "tissue_fraction": 0.8,
        "tiles": {"grid": len(grid), "selected": len(selected), "failed": []},
        "summary": summary.to_dict(),
    }
    write_summary_json(sdir / "summary.json", doc)
    store.finalize({"summary_status": summary.status})
    update_summary_csv(
        out / "summary.csv",
        {"slide": slide_path.name, "path": str(slide_path), "output": str(sdir), **summary.to_row()},
    )
    return sdir, summary.to_dict()


def add_error_row(out: Path, slide_path: str, reason: str) -> None:
    name = Path(slide_path).stem
    update_summary_csv(
        out / "summary.csv",
        {
            "slide": Path(slide_path).name,
            "path": slide_path,
            "output": str(out / name),
            "status": "error",
            "error": reason,
        },
    )

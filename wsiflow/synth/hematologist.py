"""The truth of generated slides playing the hematologist of ``wsiflow review``.

For each ``review/<slide>.geojson`` (the cells ``wsiflow review`` picked), every cell is
matched to the generated slide's true cell (centroid within half the true radius, one to
one, as ``wsiflow compare`` matches) and given the true class; a detection with no true
cell under it is marked ``Ignore*`` (QuPath's class for objects to leave out). The result
is written the way QuPath's "Export objects as GeoJSON" writes it — a plain list of
features with their ids — so ``wsiflow harvest`` reads it like a real export. For tests,
demos and benchmarks of the lab loop only: a real lab's labels come from its hematologists.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from wsiflow.errors import OutputError
from wsiflow.matching import GATE, match_centroids
from wsiflow.synth.compare import load_truth

__all__ = ["answer_review"]

IGNORE = "Ignore*"


def _centroid(geom: Mapping[str, Any]) -> tuple[float, float]:
    ring = np.asarray(geom["coordinates"][0], np.float64)[:-1]
    return float(ring[:, 0].mean()), float(ring[:, 1].mean())


def answer_review(review_dir: Path, truths: Mapping[str, Path], out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir/<slide>.geojson`` with the true class of every reviewed cell.

    ``truths`` maps a review file's slide key to its ``.truth.json`` (or ``.svs``) path.
    Returns per slide how many cells were labelled and how many ignored (no true cell).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {}
    for key, truth_path in sorted(truths.items()):
        src = Path(review_dir) / f"{key}.geojson"
        if not src.is_file():
            continue
        doc = orjson.loads(src.read_bytes())
        feats = doc["features"] if isinstance(doc, dict) else doc
        truth = load_truth(truth_path)
        if not feats:
            continue
        xy = np.array([_centroid(f["geometry"]) for f in feats])
        pairs = match_centroids(truth.x, truth.y, truth.radius, xy[:, 0], xy[:, 1], GATE)
        true_of = {int(d): truth.code[int(t)] for t, d in pairs}
        for i, f in enumerate(feats):
            code = true_of.get(i)
            f.setdefault("properties", {})["classification"] = {"name": code or IGNORE, "color": [0, 0, 0]}
        (out_dir / f"{key}.geojson").write_bytes(orjson.dumps(feats))
        stats[key] = {"cells": len(feats), "labelled": len(true_of), "ignored": len(feats) - len(true_of)}
    if not stats:
        raise OutputError(f"{review_dir}: no review GeoJSON for the slides given")
    return stats

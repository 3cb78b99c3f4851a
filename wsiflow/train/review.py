"""Cells worth a hematologist's time, for labelling in QuPath (``wsiflow review``).

Reads the slide folders of a ``wsiflow run`` output (their ``cells.zarr``), picks ``n``
cells across all slides and writes, per slide, ``<slide>.geojson`` (just those cells, as
the run's own GeoJSON writes them: the same UUIDs and classification, so QuPath shows the
current class and keeps the object ids on export), ``review.json`` (which cells of which
slide, how chosen, from which run) and ``gallery.html`` (the crops, to look the batch over
before labelling).

Strategies (``--strategy``):

* ``uncertain`` (default): cells are grouped by (slide, predicted class; unclassified
  cells form their own group) and taken round-robin over the groups, each group giving its
  least certain cell (smallest margin between the top two probabilities) next, so every
  predicted class of every slide is represented and the hardest cells come first.
* ``stratified``: the same round-robin, random order within each group.
* ``random``: a uniform sample of all cells.

``per_class`` caps how many cells one (slide, class) group gives. The choice is
deterministic for a given ``seed``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from wsiflow.atomic import atomic_write_bytes
from wsiflow.config import ClassDef, Pipeline, parse_pipeline
from wsiflow.errors import ConfigError, OutputError
from wsiflow.types import UNCLASSIFIED_NAME
from wsiflow.writers import figures
from wsiflow.writers.geojson import write_geojson
from wsiflow.writers.report import gallery_crop
from wsiflow.writers.report_cells import CellColumns, read_cell_columns
from wsiflow.writers.zarr_store import CellStore

__all__ = [
    "STRATEGIES",
    "ResultSlide",
    "find_result_slides",
    "margins",
    "select_cells",
    "uuid_seed",
    "write_review",
]

STRATEGIES = ("uncertain", "stratified", "random")
CELLS_NAME = "cells.zarr"
REVIEW_META = "review.json"


def uuid_seed(identity: dict[str, Any], slide_dir: Path) -> str:
    """The string the run seeded this slide's GeoJSON UUIDs with: the slide's own id
    (``Slide.identity()["uid"]``), or the output folder's name for runs that predate it."""
    return str(identity.get("uid") or slide_dir.name)


@dataclass(frozen=True)
class ResultSlide:
    """One slide folder of a run: its identity, pipeline and per-cell columns."""

    key: str  # the folder's name: the file stem used by review/<key>.geojson
    path: Path
    identity: dict[str, Any]
    pipeline: Pipeline
    attrs: dict[str, Any]
    cells: CellColumns

    @property
    def taxonomy(self) -> tuple[ClassDef, ...]:
        return self.pipeline.taxonomy

    @property
    def models(self) -> dict[str, Any]:
        m = self.attrs.get("models")
        return m if isinstance(m, dict) else {}


def _load_result_slide(sdir: Path) -> ResultSlide:
    attrs, cols = read_cell_columns(sdir / CELLS_NAME)
    raw = attrs.get("pipeline")
    if not isinstance(raw, dict):
        raise OutputError(f"{sdir / CELLS_NAME}: the run's pipeline is not stored with the cells")
    pipeline = parse_pipeline(raw, f"{sdir / CELLS_NAME} attributes")
    ident = attrs.get("slide")
    return ResultSlide(sdir.name, sdir, ident if isinstance(ident, dict) else {}, pipeline, attrs, cols)


def find_result_slides(results: Path) -> list[ResultSlide]:
    """The slide folders of a run output (``results/<slide>/cells.zarr``), sorted by name.

    ``results`` may also be one slide folder. A folder without cells is an error naming it.
    """
    results = Path(results)
    if (results / CELLS_NAME).is_dir():
        dirs = [results]
    elif results.is_dir():
        dirs = sorted(p for p in results.iterdir() if (p / CELLS_NAME).is_dir())
    else:
        raise ConfigError(str(results), "", "not a folder (give the output folder of `wsiflow run`)")
    if not dirs:
        raise ConfigError(str(results), "", f"no slide folders with {CELLS_NAME} here")
    return [_load_result_slide(d) for d in dirs]


def margins(probs: NDArray[np.floating]) -> NDArray[np.float32]:
    """Top-1 minus top-2 probability per row (1.0 for a single class; 0 rows → empty)."""
    p = np.asarray(probs, np.float32)
    if p.shape[0] == 0 or p.shape[1] < 2:
        return np.ones(p.shape[0], np.float32)
    part = np.partition(p, p.shape[1] - 2, axis=1)
    return (part[:, -1] - part[:, -2]).astype(np.float32)


def select_cells(
    slides: Sequence[ResultSlide],
    n: int,
    strategy: str = "uncertain",
    per_class: int | None = None,
    seed: int = 0,
) -> list[NDArray[np.int64]]:
    """Per slide, the indices (into its columns) of the chosen cells, in the order chosen."""
    if strategy not in STRATEGIES:
        raise ConfigError("review", "--strategy", f"must be one of {STRATEGIES}, got {strategy!r}")
    if n < 1:
        raise ConfigError("review", "--n", f"must be at least 1, got {n}")
    if per_class is not None and per_class < 1:
        raise ConfigError("review", "--per-class", f"must be at least 1, got {per_class}")
    rng = np.random.default_rng(seed)
    chosen: list[list[int]] = [[] for _ in slides]
    if strategy == "random":
        sizes = np.array([len(s.cells) for s in slides], np.int64)
        total = int(sizes.sum())
        picks = rng.choice(total, size=min(n, total), replace=False) if total else np.zeros(0, np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for g in np.sort(picks):
            si = int(np.searchsorted(starts, g, side="right") - 1)
            chosen[si].append(int(g - starts[si]))
        return [np.asarray(c, np.int64) for c in chosen]
    queues: list[tuple[int, NDArray[np.int64]]] = []  # (slide index, cell indices in pick order)
    for si, s in enumerate(slides):
        cid = np.asarray(s.cells.class_id, np.int64)
        m = margins(s.cells.probs)
        # unclassified cells (-1) first: they are the ones the pipeline refused to call
        for k in [-1, *range(len(s.taxonomy))]:
            members = np.flatnonzero(cid == k)
            if members.size == 0:
                continue
            if strategy == "uncertain":
                order = members[np.lexsort((members, m[members]))]
            else:
                order = members[rng.permutation(members.size)]
            if per_class is not None:
                order = order[:per_class]
            queues.append((si, order))
    depth = 0
    taken = 0
    while taken < n and any(depth < len(q) for _, q in queues):
        for si, q in queues:
            if depth < len(q) and taken < n:
                chosen[si].append(int(q[depth]))
                taken += 1
        depth += 1
    return [np.asarray(c, np.int64) for c in chosen]


def _open_slide(s: ResultSlide) -> Any | None:
    from wsiflow.slide import open_slide

    path = s.identity.get("path")
    if not path:
        return None
    try:
        return open_slide(str(path), mpp=s.identity.get("mpp_override"))
    except Exception:
        return None


def _class_label(taxonomy: Sequence[ClassDef], k: int) -> str:
    return taxonomy[k].name if 0 <= k < len(taxonomy) else UNCLASSIFIED_NAME


def write_review(
    results: Path,
    out: Path,
    n: int = 300,
    strategy: str = "uncertain",
    per_class: int | None = None,
    seed: int = 0,
    gallery: bool = True,
) -> dict[str, Any]:
    """Choose the cells and write ``out/<slide>.geojson``, ``review.json`` and ``gallery.html``."""
    slides = find_result_slides(results)
    picks = select_cells(slides, n, strategy, per_class, seed)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "results": str(Path(results).resolve()),
        "strategy": strategy,
        "n_requested": n,
        "per_class": per_class,
        "seed": seed,
        "slides": [],
    }
    cards: list[str] = []
    for s, idx in zip(slides, picks, strict=True):
        if idx.size == 0:
            continue
        store = CellStore.open(s.path / CELLS_NAME, mode="r")
        table = store.read_table()
        row_of = {int(i): r for r, i in enumerate(table.id)}
        ids = s.cells.id[idx]
        sub = table.take(np.array([row_of[int(i)] for i in ids], np.int64))
        write_geojson(out / f"{s.key}.geojson", [sub], s.taxonomy, slide_id=uuid_seed(s.identity, s.path))
        m = margins(s.cells.probs[idx])
        meta["slides"].append(
            {
                "key": s.key,
                "slide": s.identity.get("path"),
                "pipeline": s.pipeline.name,
                "models": s.models,
                "geojson": f"{s.key}.geojson",
                "cell_ids": [int(i) for i in ids],
            }
        )
        if gallery:
            cards.append(_gallery_section(s, idx, m))
    meta["n_selected"] = sum(len(x["cell_ids"]) for x in meta["slides"])
    atomic_write_bytes(out / REVIEW_META, orjson.dumps(meta, option=orjson.OPT_INDENT_2) + b"\n")
    if gallery:
        page = (
            "<!doctype html><meta charset='utf-8'><title>wsiflow review</title>"
            "<style>body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:4px;"
            "font-size:11px;width:120px;vertical-align:top}img{width:112px;height:112px}</style>"
            f"<h1>Cells for review ({meta['n_selected']}, strategy {html.escape(strategy)})</h1>"
            "<p>Research use only. Open each slide in QuPath with its <code>&lt;slide&gt;.geojson</code>, "
            "set the right class on every cell, then export the objects as GeoJSON for "
            "<code>wsiflow harvest</code>.</p>" + "".join(cards)
        )
        atomic_write_bytes(out / "gallery.html", page.encode("utf-8"))
    return meta


def _gallery_section(s: ResultSlide, idx: NDArray[np.int64], m: NDArray[np.float32]) -> str:
    slide = _open_slide(s)
    parts = [f"<h2>{html.escape(s.key)}</h2>"]
    if slide is None:
        parts.append("<p>(slide file not found: no crops)</p>")
    cls_mpp = s.pipeline.resolution.cls_mpp
    pad = s.pipeline.classifier.crop.pad_um
    rule = s.pipeline.classifier.crop.rule
    try:
        for i, margin in zip(idx, m, strict=True):
            k = int(s.cells.class_id[i])
            label = html.escape(_class_label(s.taxonomy, k))
            img = ""
            if slide is not None:
                crop = gallery_crop(slide, s.cells.bbox[i], cls_mpp, pad, rule)
                img = f"<img src='{figures.data_uri(figures.jpeg_bytes(crop, 88))}'>"
            parts.append(
                f"<figure>{img}<figcaption>#{int(s.cells.id[i])} {label}<br>"
                f"margin {float(margin):.2f}</figcaption></figure>"
            )
    finally:
        if slide is not None:
            slide.close()
    return "".join(parts)

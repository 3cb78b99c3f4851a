"""Labelled cells → training images (``wsiflow harvest``).

Labels come from QuPath (objects exported as GeoJSON: a FeatureCollection or a list of
features, each with its ``id`` — the UUID wsiflow wrote — and the class the hematologist
set in ``properties.classification.name``) or from a CSV ``id,label[,slide]`` (``id`` a
wsiflow cell id or UUID). Each labels file belongs to the slide folder whose name is its
stem (``review/<slide>.geojson`` → ``results/<slide>/``) unless a CSV names the slide.

Every labelled object is matched to its cell: by UUID, else by its centroid within
``radius_um`` of a cell centroid (the nearest); what does not match is reported. Class
names map to the pipeline's taxonomy by name or code (``--map old=new`` first);
QuPath's ``Ignore*`` and "not a cell"-style classes mark objects that are not cells: they
are counted and skipped. Any other label outside the taxonomy is refused with one line.

Each matched cell's crop is made exactly as inference made it: the tile's read box at the
pipeline's ``cls_mpp`` (:func:`wsiflow.classify.tile_crops`), the pipeline's crop rule, the
classifier's input size — so a classifier trained on the harvest sees what the pipeline
feeds it. Images go to ``OUT/images/<slide>/<cell id>.png``; ``OUT/manifest.csv`` holds
``path,label,group`` (group = slide: the split stays grouped by patient) and the source
ids. A later harvest into the same OUT appends; a cell labelled again keeps one row (the
newest label). ``OUT/harvest.json`` records the crop rule, which ``wsiflow train
classifier`` copies into the card (so ``wsiflow pipeline derive`` can pin it).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from PIL import Image

from wsiflow.atomic import atomic_write_bytes, read_csv_rows
from wsiflow.classify import tile_crops
from wsiflow.config import Pipeline
from wsiflow.errors import ConfigError
from wsiflow.tiling import TileGrid
from wsiflow.train.review import ResultSlide, find_result_slides, uuid_seed
from wsiflow.writers.geojson import cell_uuids

__all__ = ["HarvestReport", "LabelRecord", "harvest", "parse_maps", "read_labels"]

MANIFEST = "manifest.csv"
META = "harvest.json"
MANIFEST_COLUMNS = (
    "path",
    "label",
    "group",
    "slide",
    "cell_id",
    "uuid",
    "predicted",
    "labels_file",
    "harvested",
)
NOT_A_CELL = re.compile(r"^(ignore\*?|not ?a ?cell|no ?cell|artefact|artifact|debris)$", re.IGNORECASE)
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)


@dataclass(frozen=True)
class LabelRecord:
    """One labelled object: how to find its cell, and the label given."""

    source: str
    slide: str  # the slide folder's name
    label: str
    uuid: str | None = None
    cell_id: int | None = None
    xy: tuple[float, float] | None = None  # centroid, level-0 px


@dataclass
class HarvestReport:
    labelled: int = 0
    matched_uuid: int = 0
    matched_centroid: int = 0
    not_cells: int = 0
    unmatched: list[str] = field(default_factory=list)
    unlabelled: int = 0
    added: int = 0
    relabelled: int = 0
    unchanged: int = 0
    per_label: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "labelled": self.labelled,
            "matched_by_uuid": self.matched_uuid,
            "matched_by_centroid": self.matched_centroid,
            "not_cells": self.not_cells,
            "unmatched": len(self.unmatched),
            "unmatched_examples": self.unmatched[:10],
            "unlabelled_objects": self.unlabelled,
            "added": self.added,
            "relabelled": self.relabelled,
            "unchanged": self.unchanged,
            "per_label": dict(sorted(self.per_label.items())),
        }


def parse_maps(items: Sequence[str]) -> dict[str, str]:
    """``old=new`` pairs (``--map``) → dict; a bad one is a usage error naming it."""
    out: dict[str, str] = {}
    for item in items:
        old, eq, new = item.partition("=")
        if not eq or not old.strip() or not new.strip():
            raise ConfigError("harvest", "--map", f"expected OLD=NEW, got {item!r}")
        out[old.strip()] = new.strip()
    return out


def _centroid(geom: Any) -> tuple[float, float] | None:
    import shapely.geometry

    try:
        c = shapely.geometry.shape(geom).centroid
    except Exception:
        return None
    return (float(c.x), float(c.y)) if not c.is_empty else None


def read_labels(path: Path) -> tuple[list[LabelRecord], int]:
    """(labelled objects, objects without a class) of one QuPath GeoJSON export or CSV."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "", "labels file not found")
    if path.suffix.lower() == ".csv":
        return _read_csv(path), 0
    try:
        doc = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ConfigError(str(path), "", f"not GeoJSON or JSON ({exc})") from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        feats = doc.get("features")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        feats = [doc]
    else:
        feats = doc
    if not isinstance(feats, list):
        raise ConfigError(str(path), "", "expected a GeoJSON FeatureCollection or a list of features")
    slide = path.stem.removesuffix(".geojson")
    out: list[LabelRecord] = []
    unlabelled = 0
    for i, f in enumerate(feats):
        if not isinstance(f, dict):
            raise ConfigError(str(path), f"feature {i}", "is not a GeoJSON object")
        props = f.get("properties") if isinstance(f.get("properties"), dict) else {}
        assert isinstance(props, dict)
        if props.get("objectType") == "annotation":
            continue  # regions drawn by hand are not cells
        cls = props.get("classification")
        name = cls.get("name") if isinstance(cls, dict) else (cls if isinstance(cls, str) else None)
        if not name:
            unlabelled += 1
            continue
        fid = f.get("id")
        uid = str(fid) if isinstance(fid, str) and _UUID.match(fid) else None
        geom = f.get("geometry")
        out.append(
            LabelRecord(
                source=path.name,
                slide=slide,
                label=str(name),
                uuid=uid.lower() if uid else None,
                xy=_centroid(geom) if isinstance(geom, dict) else None,
            )
        )
    return out, unlabelled


def _read_csv(path: Path) -> list[LabelRecord]:
    rows, _ = read_csv_rows(path, {"id", "label"}, "a labels CSV needs columns id,label[,slide]")
    out: list[LabelRecord] = []
    for ln, r in enumerate(rows, start=2):
        ident, label = (r.get("id") or "").strip(), (r.get("label") or "").strip()
        if not ident or not label:
            raise ConfigError(str(path), f"line {ln}", "id and label are both required")
        slide = (r.get("slide") or "").strip() or path.stem
        if _UUID.match(ident):
            out.append(LabelRecord(path.name, slide, label, uuid=ident.lower()))
        elif ident.isdigit():
            out.append(LabelRecord(path.name, slide, label, cell_id=int(ident)))
        else:
            raise ConfigError(str(path), f"line {ln}", f"id {ident!r} is neither a cell id nor a UUID")
    return out


def _label_codes(pipeline: Pipeline, maps: Mapping[str, str]) -> dict[str, str]:
    """Lower-cased label text → taxonomy code (names, codes, then --map entries)."""
    table = {c.code.lower(): c.code for c in pipeline.taxonomy}
    table.update({c.name.lower(): c.code for c in pipeline.taxonomy})
    for old, new in maps.items():
        code = table.get(new.lower())
        if code is None:
            raise ConfigError(
                "harvest", "--map", f"{old}={new}: {new!r} is not a class of pipeline {pipeline.name!r}"
            )
        table[old.lower()] = code
    return table


def _match(
    slide: ResultSlide, recs: Sequence[LabelRecord], radius_um: float, rep: HarvestReport
) -> list[int]:
    """Column index of each record's cell (-1: unmatched)."""
    from scipy.spatial import cKDTree

    cols = slide.cells
    uuids = cell_uuids(uuid_seed(slide.identity, slide.path), cols.id)
    by_uuid = {u.decode(): i for i, u in enumerate(uuids)}
    by_id = {int(c): i for i, c in enumerate(cols.id)}
    mpp = float(slide.identity.get("mpp_override") or slide.identity.get("mpp") or 0.0)
    tree = cKDTree(np.column_stack([cols.x, cols.y])) if len(cols) else None
    radius_px = radius_um / mpp if mpp > 0 else 0.0
    out: list[int] = []
    for r in recs:
        idx = -1
        if r.uuid is not None and r.uuid in by_uuid:
            idx = by_uuid[r.uuid]
            rep.matched_uuid += 1
        elif r.cell_id is not None and r.cell_id in by_id:
            idx = by_id[r.cell_id]
            rep.matched_uuid += 1
        elif r.xy is not None and tree is not None and radius_px > 0:
            dist, j = tree.query(r.xy, distance_upper_bound=radius_px)
            if np.isfinite(dist):
                idx = int(j)
                rep.matched_centroid += 1
        if idx < 0:
            where = r.uuid or (f"cell {r.cell_id}" if r.cell_id is not None else f"centroid {r.xy}")
            rep.unmatched.append(f"{r.source}: {where}")
        out.append(idx)
    return out


def _read_manifest(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    rows, _ = read_csv_rows(
        path, {"path", "label", "group", "cell_id"}, "not a wsiflow harvest manifest (columns differ)"
    )
    return rows


def harvest(
    results: Path,
    labels: Sequence[Path],
    out: Path,
    maps: Mapping[str, str] | None = None,
    radius_um: float = 3.0,
) -> HarvestReport:
    """Match labels to cells, write their crops and the manifest (appending); see the module doc."""
    if not labels:
        raise ConfigError("harvest", "--labels", "give at least one labels file")
    slides = {s.key: s for s in find_result_slides(results)}
    rep = HarvestReport()
    per_slide: dict[str, list[LabelRecord]] = {}
    for lp in labels:
        recs, unlabelled = read_labels(lp)
        rep.unlabelled += unlabelled
        for r in recs:
            if r.slide not in slides:
                raise ConfigError(
                    str(lp),
                    "",
                    f"no slide folder {r.slide!r} in {results} (labels files are named <slide>.geojson)",
                )
            per_slide.setdefault(r.slide, []).append(r)
    pipelines = {s.pipeline.name for s in slides.values() if s.key in per_slide}
    crop_rules = {
        (s.pipeline.resolution.cls_mpp, s.pipeline.classifier.crop, s.pipeline.classifier.input_px)
        for s in slides.values()
        if s.key in per_slide
    }
    if len(crop_rules) > 1:
        raise ConfigError(
            str(results), "", "the labelled slides were run with different crop rules or input sizes"
        )
    manifest_path = out / MANIFEST
    rows = _read_manifest(manifest_path)
    key_of = {(r["group"], r["cell_id"]): i for i, r in enumerate(rows)}
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    out.mkdir(parents=True, exist_ok=True)
    for key, recs in sorted(per_slide.items()):
        s = slides[key]
        codes = _label_codes(s.pipeline, maps or {})
        rep.labelled += len(recs)
        wanted: dict[int, str] = {}  # column index → code; the last label of a cell wins
        for r, idx in zip(recs, _match(s, recs, radius_um, rep), strict=True):
            if NOT_A_CELL.match(r.label.strip()):
                rep.not_cells += 1
                continue
            code = codes.get(r.label.strip().lower())
            if code is None:
                known = ", ".join(c.name for c in s.taxonomy)
                raise ConfigError(
                    r.source,
                    "",
                    f"label {r.label!r} is not a class of pipeline {s.pipeline.name!r} ({known}); "
                    f"map it with --map '{r.label}=CODE'",
                )
            if idx >= 0:
                wanted[idx] = code
        if not wanted:
            continue
        _write_crops(s, wanted, out)
        uuids = cell_uuids(uuid_seed(s.identity, s.path), s.cells.id[list(wanted)])
        for (idx, code), uid in zip(wanted.items(), uuids, strict=True):
            cid = str(int(s.cells.id[idx]))
            k = int(s.cells.class_id[idx])
            row = {
                "path": f"images/{key}/{cid}.png",
                "label": code,
                "group": key,
                "slide": str(s.identity.get("path", "")),
                "cell_id": cid,
                "uuid": uid.decode(),
                "predicted": s.taxonomy[k].code if 0 <= k < len(s.taxonomy) else "",
                "labels_file": next(r.source for r in recs),
                "harvested": stamp,
            }
            rep.per_label[code] = rep.per_label.get(code, 0) + 1
            at = key_of.get((key, cid))
            if at is None:
                key_of[(key, cid)] = len(rows)
                rows.append(row)
                rep.added += 1
            elif rows[at]["label"] != code:
                rows[at] = row
                rep.relabelled += 1
            else:
                rep.unchanged += 1
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(manifest_path, buf.getvalue().encode("utf-8"))
    if crop_rules:
        cls_mpp, crop, input_px = next(iter(crop_rules))
        meta = _read_meta(out / META)
        meta["crop"] = {"rule": crop.rule, "pad_um": crop.pad_um, "cls_mpp": cls_mpp, "input_px": input_px}
        meta.setdefault("rounds", []).append(
            {
                "at": stamp,
                "results": str(Path(results).resolve()),
                "pipelines": sorted(pipelines),
                "labels": [str(p) for p in labels],
                **rep.to_dict(),
            }
        )
        meta["n_cells"] = len(rows)
        atomic_write_bytes(out / META, orjson.dumps(meta, option=orjson.OPT_INDENT_2) + b"\n")
    return rep


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"format": "wsiflow-harvest/1"}
    doc = orjson.loads(path.read_bytes())
    if not isinstance(doc, dict):
        raise ConfigError(str(path), "", "not a wsiflow harvest record")
    return doc


def _write_crops(s: ResultSlide, wanted: Mapping[int, str], out: Path) -> None:
    """Crops of the wanted cells, tile by tile, exactly as inference cut them."""
    from wsiflow.slide import open_slide

    ident = s.identity
    path = ident.get("path")
    if not path:
        raise ConfigError(str(s.path), "", "the run did not record the slide's path")
    slide = open_slide(str(path), mpp=ident.get("mpp_override"))
    try:
        dims = ident.get("dimensions")
        if dims and [int(v) for v in slide.dimensions] != [int(v) for v in dims]:
            raise ConfigError(str(path), "", "is not the slide this run analysed (size differs)")
        w, h = (int(v) for v in slide.dimensions)
        if slide.mpp is None:
            raise ConfigError(str(path), "", "has no µm/px and the run recorded no --mpp override")
        grid = TileGrid.from_pipeline(w, h, float(slide.mpp), s.pipeline)
        idx = np.fromiter(wanted, np.int64)
        tiles = np.asarray(read_tile_column(s), np.int64)[idx]
        folder = out / "images" / s.key
        folder.mkdir(parents=True, exist_ok=True)
        for t in np.unique(tiles):
            sel = idx[tiles == t]
            crops = tile_crops(slide, grid.tiles[int(t)].read, s.cells.bbox[sel], s.pipeline)
            for i, crop in zip(sel, crops, strict=True):
                buf = io.BytesIO()
                Image.fromarray(crop).save(buf, format="PNG")
                atomic_write_bytes(folder / f"{int(s.cells.id[i])}.png", buf.getvalue(), fsync=False)
    finally:
        slide.close()


def read_tile_column(s: ResultSlide) -> np.ndarray:
    """The tile of each cell in the slide's columns (same rows as ``s.cells``)."""
    from wsiflow.writers.zarr_store import CellStore

    tile = CellStore.open(s.path / "cells.zarr", mode="r").read_column("tile")
    if len(tile) != len(s.cells):
        raise ConfigError(str(s.path), "", "cell columns disagree (was the store changed during harvest?)")
    return tile

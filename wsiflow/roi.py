"""Regions of interest: where the hematologist would count (``wsiflow run --roi``).

Hematologists count in the well-spread zone near the particles, not in thick areas or the
feathered edge. They draw that zone in QuPath as annotations and export them as GeoJSON
(``objectType: annotation``, Polygon or MultiPolygon, level-0 px — the frame wsiflow's own
GeoJSON uses). :func:`load_rois` reads such an export (a FeatureCollection, a list of
features, or one feature) and checks it against the slide; :class:`Rois` answers the two
questions the run asks: which tiles meet a region (only those are read) and which cells'
centroids lie inside (only those count), per named region and for their union.

Every problem is one :class:`~wsiflow.errors.ConfigError` naming the file: not GeoJSON, no
polygon annotation, a self-intersecting polygon, a region outside the slide.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from numpy.typing import ArrayLike, NDArray

from wsiflow.errors import ConfigError
from wsiflow.tiling import Tile

__all__ = ["Rois", "load_rois", "roi_file_for"]


@dataclass(frozen=True)
class Rois:
    """Named polygon regions (shapely geometries, level-0 px) of one slide."""

    source: str
    names: tuple[str, ...]
    geoms: tuple[Any, ...]  # shapely Polygon / MultiPolygon

    @property
    def union(self) -> Any:
        import shapely

        return shapely.union_all(list(self.geoms))

    def tiles_meeting(self, tiles: Sequence[Tile]) -> list[Tile]:
        """The tiles whose core meets a region (a cell counted must have its centroid in a
        region and in its tile's core, so no other tile can own one)."""
        import shapely

        u = self.union
        shapely.prepare(u)
        boxes = shapely.box(
            [t.core.x for t in tiles],
            [t.core.y for t in tiles],
            [t.core.x1 for t in tiles],
            [t.core.y1 for t in tiles],
        )
        hit = shapely.intersects(u, boxes) if len(tiles) else np.zeros(0, bool)
        return [t for t, h in zip(tiles, np.atleast_1d(hit), strict=True) if h]

    def inside(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.bool_]:
        """(n_regions, n) — whether each centroid lies inside each region (boundary counts)."""
        import shapely

        xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
        out = np.zeros((len(self.geoms), xa.size), bool)
        for i, g in enumerate(self.geoms):
            shapely.prepare(g)
            out[i] = shapely.intersects_xy(g, xa, ya)
        return out

    def inside_any(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.bool_]:
        return np.asarray(self.inside(x, y).any(axis=0), bool)

    def to_json(self) -> list[dict[str, Any]]:
        import shapely

        return [
            {"name": n, "area_px": float(g.area), "geometry": orjson.loads(shapely.to_geojson(g))}
            for n, g in zip(self.names, self.geoms, strict=True)
        ]


def roi_file_for(roi: str | os.PathLike[str], slide_stem: str) -> Path | None:
    """``--roi`` is one file (every slide) or a folder of ``<slide-stem>.geojson`` (None when
    the folder has no file for this slide: that slide is analysed whole)."""
    p = Path(roi)
    if p.is_dir():
        cand = p / f"{slide_stem}.geojson"
        return cand if cand.is_file() else None
    if not p.is_file():
        raise ConfigError(str(p), "--roi", "file or folder not found")
    return p


def load_rois(path: str | os.PathLike[str], dimensions: tuple[int, int]) -> Rois:
    """Polygon annotations of a QuPath GeoJSON export, validated against the slide's size."""
    import shapely
    import shapely.geometry

    p = Path(path)
    src = str(p)
    try:
        doc = orjson.loads(p.read_bytes())
    except OSError as exc:
        raise ConfigError(src, "--roi", f"cannot read ({exc.strerror or exc})") from None
    except orjson.JSONDecodeError:
        raise ConfigError(src, "--roi", "not GeoJSON (invalid JSON)") from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        feats = doc.get("features")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        feats = [doc]
    elif isinstance(doc, dict) and doc.get("type") in ("Polygon", "MultiPolygon"):
        feats = [{"type": "Feature", "geometry": doc, "properties": {"objectType": "annotation"}}]
    else:
        feats = doc
    if not isinstance(feats, list):
        raise ConfigError(src, "--roi", "not GeoJSON (expected a FeatureCollection or a list of features)")
    names: list[str] = []
    geoms: list[Any] = []
    w, h = dimensions
    slide_box = shapely.box(0, 0, w, h)
    for i, f in enumerate(feats):
        if not isinstance(f, dict) or not isinstance(f.get("geometry"), dict):
            continue
        props = f.get("properties") if isinstance(f.get("properties"), dict) else {}
        assert isinstance(props, dict)
        if props.get("objectType", "annotation") != "annotation":
            continue  # detections/cells are not regions
        gtype = f["geometry"].get("type")
        if gtype not in ("Polygon", "MultiPolygon"):
            continue
        try:
            g = shapely.geometry.shape(f["geometry"])
        except Exception as exc:
            raise ConfigError(src, f"feature {i}", f"invalid {gtype} ({exc})") from None
        label = (
            props.get("name") or (props.get("classification") or {}).get("name") or f"ROI {len(geoms) + 1}"
        )
        if not g.is_valid:
            raise ConfigError(
                src, f"feature {i} ({label})", f"the polygon is not valid ({shapely.is_valid_reason(g)})"
            )
        if g.is_empty or g.area <= 0:
            raise ConfigError(src, f"feature {i} ({label})", "the polygon is empty")
        if not g.intersects(slide_box) or g.intersection(slide_box).area <= 0:
            x0, y0, x1, y1 = g.bounds
            raise ConfigError(
                src,
                f"feature {i} ({label})",
                f"lies outside the slide ({x0:.0f},{y0:.0f})–({x1:.0f},{y1:.0f} px vs {w}×{h} px)",
            )
        names.append(str(label))
        geoms.append(g)
    if not geoms:
        raise ConfigError(src, "--roi", "no Polygon/MultiPolygon annotation in it")
    seen: dict[str, int] = {}
    unique = []
    for n in names:  # QuPath allows repeated names; the summary needs distinct keys
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return Rois(src, tuple(unique), tuple(geoms))

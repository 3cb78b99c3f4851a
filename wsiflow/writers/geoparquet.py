"""Optional ``cells.parquet`` (GeoParquet via geopandas), written to a temp name and renamed.

One row per cell: the polygon (level-0 px, no CRS: slide pixel space), id, tile, class
code and name, area, perimeter, circularity, segmentation score and one probability
column per class. Built column-wise with shapely's vectorised constructors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsiflow.atomic import atomic_path
from wsiflow.cells import CellTable, closing_index
from wsiflow.config import ClassDef
from wsiflow.types import UNCLASSIFIED_NAME

__all__ = ["geoparquet_available", "write_geoparquet"]


def geoparquet_available() -> str | None:
    """None when GeoParquet can be written, else why not (geopandas needs pyarrow)."""
    from importlib.util import find_spec

    missing = [m for m in ("geopandas", "pyarrow") if find_spec(m) is None]
    return f"needs the {', '.join(missing)} package(s)" if missing else None


def write_geoparquet(path: Path, cells: CellTable, taxonomy: Sequence[ClassDef]) -> int:
    import geopandas as gpd
    import shapely

    n = len(cells)
    # closed rings: repeat each polygon's first vertex
    ring_counts = np.diff(cells.poly_offsets) + 1
    src, _ = closing_index(cells.poly_offsets)
    coords = np.asarray(cells.poly_xy[src], np.float64)
    ring_index = np.repeat(np.arange(n), ring_counts)
    rings = shapely.linearrings(coords, indices=ring_index) if n else np.zeros(0, object)
    polys = shapely.polygons(rings) if n else np.zeros(0, object)
    codes = np.array([c.code for c in taxonomy] + [""], dtype=object)
    names = np.array([c.name for c in taxonomy] + [UNCLASSIFIED_NAME], dtype=object)
    cid = cells.class_id.astype(np.int64)
    data: dict[str, object] = {
        "id": cells.id,
        "tile": cells.tile,
        "x": cells.x,
        "y": cells.y,
        "class": codes[cid],
        "class_name": names[cid],
        "area_um2": cells.area_um2,
        "perimeter_um": cells.perimeter_um,
        "circularity": cells.circularity,
        "seg_score": cells.seg_score,
    }
    for k, c in enumerate(taxonomy):
        data[f"p_{c.code}"] = cells.probs[:, k] if cells.probs.shape[1] > k else np.zeros(n, np.float32)
    frame = gpd.GeoDataFrame(data, geometry=gpd.GeoSeries(polys), crs=None)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return n

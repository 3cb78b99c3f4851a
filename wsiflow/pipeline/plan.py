"""Plan one slide on the client: what the workers will be asked to read (DESIGN §1, §3).

:func:`plan_slide` opens the slide, requires a trustworthy µm/px (the file's, or the
``--mpp`` override), builds the tile grid at ``seg_mpp`` (+ halo), drops background tiles
with the tissue mask of a thumbnail (:func:`wsiflow.tissue.slide_tissue_mask`), keeps only
the tiles that meet the slide's regions of interest when ``--roi`` gives some
(:mod:`wsiflow.roi`) and records the slide's identity (:meth:`wsiflow.slide.Slide.identity`).
Nothing is read at full resolution here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsiflow.config import Pipeline
from wsiflow.errors import MppError, SlideError
from wsiflow.roi import Rois, load_rois, roi_file_for
from wsiflow.slide import RUN_READER, open_slide
from wsiflow.tiling import Tile, TileGrid
from wsiflow.tissue import core_fractions, select_tiles, slide_tissue_mask
from wsiflow.types import StorageOptions
from wsiflow.writers.paths import slide_stem

__all__ = ["SlidePlan", "plan_slide", "slide_name"]


@dataclass(frozen=True)
class SlidePlan:
    identity: dict[str, Any]  # Slide.identity(): path (absolute, or the URL), size, mpp, …
    grid: TileGrid
    tiles: list[Tile]  # selected tiles: stained, and meeting a region of interest if any
    tissue_fraction: float
    rois: Rois | None = None  # where cells count (QuPath annotations), None: the whole slide
    stained: dict[int, float] = field(default_factory=dict)  # tile id → stained fraction of its core

    def work(self, tiles: list[Tile]) -> float:
        """What ``tiles`` cost to compute, estimated before any is read: the stained area of
        their cores in seg px (cells, and so classifier crops, lie where the stain is; a tile
        with no recorded fraction counts whole)."""
        return float(sum(self.stained.get(t.id, 1.0) * t.core_px[0] * t.core_px[1] for t in tiles))

    @property
    def path(self) -> str:
        """What workers open: the absolute path, or the URL as given."""
        return str(self.identity["path"])


def slide_name(path: str) -> str:
    """The last part of a path or URL (what tables and bars call the slide)."""
    base = path.rstrip("/").rsplit("/", 1)[-1]
    return base or path


def plan_slide(
    path: str,
    pipeline: Pipeline,
    mpp: float | None,
    backend: str = "auto",
    storage: StorageOptions | None = None,
    roi: Path | None = None,
) -> SlidePlan:
    """Open the slide, lay the grid, find tissue; ``storage``: fsspec options for a URL;
    ``roi`` is ``--roi``: one annotation file for every slide, or a folder of
    ``<slide-stem>.geojson`` (a slide without a file there is analysed whole)."""
    roi_file = roi_file_for(roi, slide_stem(path)) if roi is not None else None
    if "://" not in path:
        p = Path(path)
        if p.is_dir():
            raise SlideError(path, "is a directory, not a slide file")
    # the workers' reader preference: the identity names the reader that reads the pixels
    slide = open_slide(
        path,
        backend=backend,
        mpp=mpp,
        prefer=RUN_READER,
        storage_options=storage.to_dict() if storage else None,
    )
    try:
        if slide.mpp is None:
            note = f"{slide.mpp_note}; " if getattr(slide, "mpp_note", None) else ""
            raise MppError(path, f"{note}no trustworthy µm/px in the file; pass --mpp X to set it")
        w, h = (int(v) for v in slide.dimensions)
        if w <= 0 or h <= 0:
            raise SlideError(path, f"image has zero size ({w}×{h})")
        grid = TileGrid.from_pipeline(w, h, float(slide.mpp), pipeline)
        mask = slide_tissue_mask(slide, (w, h), float(slide.mpp), pipeline.tissue)
        fractions = core_fractions(grid, mask)
        tiles, fraction = select_tiles(grid, mask, pipeline.tissue.min_tile_fraction, fractions)
        rois = load_rois(roi_file, (w, h)) if roi_file is not None else None
        if rois is not None:
            tiles = rois.tiles_meeting(tiles)  # only these are read
        identity = slide.identity()
    finally:
        slide.close()
    stained = {t.id: float(fractions[t.id]) for t in tiles}
    return SlidePlan(identity, grid, tiles, fraction, rois, stained)

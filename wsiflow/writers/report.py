"""HTML reports a hematologist can read: one page per slide and one for the cohort.

``OUT/<slide>/report.html`` (:func:`write_slide_report`) shows the slide with its cells
drawn in class colours at two scales, the per-lineage dysplasia fractions (or the
differential count), the blast % on the WHO 2022 bands, counts per class, adequacy
warnings, slide metadata, the models and the pipeline, and galleries of example cells
per class (most confident and borderline calls, with Grad-CAM overlays when given).
``OUT/report.html`` (:func:`write_cohort_report`) has one sortable row per slide and the
errors with their reasons.

Everything is read from what a run left on disk (``summary.json``, ``cells.zarr``,
``summary.csv``), so ``wsiflow report OUT`` regenerates the pages without rerunning.
Pages are self-contained (images are base64 data URIs, styles and the few lines of
script inline): they open from disk with no network. Work is bounded whatever the slide
size: the cells are read as a few numpy columns (no polygons, no Python object per
cell); polygons are read only for the cells of the zoomed region, pixels only for a
thumbnail, that region and at most ``2 × per_kind`` cells per class.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from wsiflow._version import __version__
from wsiflow.aggregate import SlideSummary, band_labels, summarize
from wsiflow.atomic import atomic_write_bytes
from wsiflow.config import DENOMINATOR_RULES, ClassDef, Pipeline, load_pipeline, parse_pipeline
from wsiflow.crops import crop_cells
from wsiflow.errors import OutputError, WsiflowError
from wsiflow.writers import figures
from wsiflow.writers.record import SlideRecord, TileCounts
from wsiflow.writers.report_cells import (
    GALLERY_PER_KIND,
    CellColumns,
    densest_window,
    read_cell_columns,
    select_gallery,
)
from wsiflow.writers.report_cohort import find_slide_dirs, write_cohort_report
from wsiflow.writers.report_html import (
    CELLS_NAME,
    REPORT_NAME,
    SUMMARY_NAME,
    hex_color,
    now,
    num,
    pct,
    render,
)
from wsiflow.writers.zarr_store import CellStore

__all__ = [
    "GALLERY_PER_KIND",
    "REPORT_NAME",
    "find_slide_dirs",
    "gallery_cell_ids",
    "gallery_crop",
    "write_cohort_report",
    "write_slide_report",
]

log = logging.getLogger(__name__)

GRADCAM_DIR = "gradcam"
GALLERY_PX = 112
OVERVIEW_MAX_PX = 1800
ZOOM_PX = (1200, 760)
MAX_ZOOM_OUTLINES = 8000
_FALLBACK_COLORS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


# =========================================================================== cells


def gallery_cell_ids(slide_dir: str | os.PathLike[str], per_kind: int = GALLERY_PER_KIND) -> list[int]:
    """Ids of the cells the slide's report will show (e.g. to compute Grad-CAM for them)."""
    _, cols = read_cell_columns(Path(slide_dir) / CELLS_NAME)
    g = select_gallery(cols.class_id, cols.probs, cols.probs.shape[1], per_kind)
    return [int(i) for i in cols.id[g.all_indices()]]


# =========================================================================== loading


@dataclass
class _SlideData:
    slide_dir: Path
    record: SlideRecord  # summary.json, or what the store committed (record.summary is set)
    summary: SlideSummary
    pipeline: Pipeline | None
    attrs: dict[str, Any]
    partial: bool
    cells: CellColumns | None
    notes: list[str] = field(default_factory=list)

    @property
    def identity(self) -> dict[str, Any]:
        """The slide identity: the record's, else the store's."""
        ident = self.record.identity or self.attrs.get("slide")
        return dict(ident) if isinstance(ident, Mapping) else {}

    @property
    def models(self) -> Mapping[str, Any]:
        models = self.record.models or self.attrs.get("models")
        return models if isinstance(models, Mapping) else {}


def _load_slide(slide_dir: Path) -> _SlideData:
    sj, zp = slide_dir / SUMMARY_NAME, slide_dir / CELLS_NAME
    has_json, has_zarr = sj.is_file(), (zp / "zarr.json").is_file()
    if not has_json and not has_zarr:
        raise OutputError(f"{slide_dir}: no {SUMMARY_NAME} or {CELLS_NAME} here (not a wsiflow slide output)")
    attrs: dict[str, Any] = {}
    cells: CellColumns | None = None
    notes: list[str] = []
    pipeline: Pipeline | None = None
    if has_zarr:
        attrs, cells = read_cell_columns(zp)
        if isinstance(attrs.get("pipeline"), dict):
            try:
                pipeline = parse_pipeline(attrs["pipeline"], f"{zp} attributes")
            except WsiflowError as exc:
                notes.append(f"the pipeline stored with the cells could not be read ({exc})")
    partial = False
    if has_json:
        record = SlideRecord.load(sj)
    else:  # a run that did not finish: summarise what was committed
        if pipeline is None or cells is None:
            raise OutputError(f"{slide_dir}: no {SUMMARY_NAME} and no usable pipeline in {CELLS_NAME}")
        record = _record_from_store(zp, attrs, pipeline, cells)
        partial = not CellStore.is_complete(zp)
        if partial:
            notes.append("the run did not finish: these are the cells committed so far (partial result)")
    if pipeline is None and record.pipeline:
        with contextlib.suppress(WsiflowError):
            pipeline = load_pipeline(record.pipeline)
    if not has_zarr:
        notes.append(f"no {CELLS_NAME} in this folder: cell overlays and galleries are omitted")
    assert record.summary is not None  # SlideRecord.load refuses a file without one
    return _SlideData(slide_dir, record, record.summary, pipeline, attrs, partial, cells, notes)


def _record_from_store(
    zp: Path, attrs: Mapping[str, Any], pipeline: Pipeline, cells: CellColumns
) -> SlideRecord:
    """The record of a run without ``summary.json``, from the cells its store committed."""
    failed = np.asarray(CellStore.open(zp).failed, bool)
    selected = attrs.get("tiles_selected") or []
    summary = summarize(cells.class_id, pipeline, failed_tiles=int(failed.sum()), tiles_total=len(selected))
    ident = attrs.get("slide")
    ident = dict(ident) if isinstance(ident, Mapping) else {}
    models = attrs.get("models")
    version = attrs.get("wsiflow_version")
    return SlideRecord(
        name=str(ident.get("name") or ""),
        path=str(ident.get("path") or ""),
        output=str(zp.parent),
        status=summary.status,
        error=summary.error,
        identity=ident,
        pipeline=pipeline.name,
        models={str(k): dict(v) for k, v in models.items() if isinstance(v, Mapping)}
        if isinstance(models, Mapping)
        else {},
        tiles=TileCounts(len(failed), len(selected), tuple(int(i) for i in np.flatnonzero(failed))),
        summary=summary,
        wsiflow_version=str(version) if version is not None else None,
    )


def _taxonomy(data: _SlideData) -> list[ClassDef]:
    if data.pipeline is not None:
        return list(data.pipeline.taxonomy)
    tax = data.attrs.get("taxonomy")
    if isinstance(tax, list):
        with contextlib.suppress(Exception):
            return [ClassDef.model_validate(t) for t in tax]
    return [
        ClassDef(code=c.code, name=c.name or c.code, color=_FALLBACK_COLORS[i % len(_FALLBACK_COLORS)])
        for i, c in enumerate(data.summary.classes)
    ]


# =========================================================================== slide pixels


def _open_slide(
    data: _SlideData,
    slide_path: str | None,
    search: Sequence[Path],
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[Any, str | None]:
    """(slide or None, note). Looks in ``search`` folders for a slide moved since the run."""
    from wsiflow.slide import open_slide

    ident = data.identity
    recorded = str(slide_path or ident.get("path") or "")
    if not recorded:
        return None, "the slide's path is not recorded: thumbnail and cell galleries are omitted"
    candidates = [recorded]
    if slide_path is None and "://" not in recorded:
        name = Path(recorded).name
        candidates += [str(Path(d) / name) for d in search]
    mpp = ident.get("mpp_override") or ident.get("mpp")
    last = ""
    for cand in candidates:
        if "://" not in cand and not Path(cand).is_file():
            last = f"slide file not found at {cand}"
            continue
        try:
            slide = open_slide(cand, mpp=float(mpp) if mpp else None, storage_options=storage_options)
        except WsiflowError as exc:
            last = str(exc)
            continue
        dims = ident.get("dimensions")
        if dims and [int(v) for v in slide.dimensions] != [int(v) for v in dims]:
            slide.close()
            last = f"{cand} is not the slide of this run (size {slide.dimensions} ≠ {tuple(dims)})"
            continue
        if slide.mpp is None:
            slide.close()
            last = f"{cand} has no µm/px"
            continue
        return slide, None
    return None, f"{last}: thumbnail and cell galleries are omitted (the numbers come from the saved results)"


def _palette(taxonomy: Sequence[ClassDef]) -> NDArray[np.uint8]:
    if not taxonomy:
        return np.zeros((1, 3), np.uint8)
    return np.asarray([c.color for c in taxonomy], np.uint8)


def _roi_rings(attrs: Mapping[str, Any]) -> list[NDArray[np.float64]]:
    """Exterior rings (level-0 px) of the run's regions of interest (store attribute ``rois``)."""
    rings: list[NDArray[np.float64]] = []
    for r in attrs.get("rois") or []:
        geom = r.get("geometry") if isinstance(r, Mapping) else None
        if not isinstance(geom, Mapping):
            continue
        polys = [geom["coordinates"]] if geom.get("type") == "Polygon" else geom.get("coordinates", [])
        rings += [np.asarray(p[0], np.float64) for p in polys if p]
    return rings


def _overview(
    slide: Any,
    cells: CellColumns | None,
    palette: NDArray[np.uint8],
    zoom_box: tuple[float, ...] | None,
    rois: Sequence[NDArray[np.float64]] = (),
) -> tuple[bytes, bytes]:
    """(plain thumbnail JPEG, thumbnail with cells JPEG); the zoomed region is outlined, and
    the regions of interest (``--roi``) are drawn in blue."""
    thumb = slide.thumbnail(OVERVIEW_MAX_PX)
    W, H = slide.dimensions
    sx, sy = thumb.shape[1] / W, thumb.shape[0] / H
    drawn = thumb
    if cells is not None and len(cells):
        # a dot about the size of the median cell, at least 2 px across
        mpp = float(slide.mpp)
        diam_px = 2 * math.sqrt(float(np.median(cells.area_um2)) / math.pi) / mpp * sx if len(cells) else 4
        radius = int(np.clip(round(diam_px / 2), 1, 6))
        # dense slides: keep the stamped area near the image area (dots saturate anyway)
        fill = math.sqrt(1.5 * thumb.shape[0] * thumb.shape[1] / (math.pi * len(cells)))
        radius = max(1, min(radius, math.floor(fill)))
        drawn = figures.stamp_cells(thumb, cells.x * sx, cells.y * sy, cells.class_id, palette, radius)
    if zoom_box is not None or rois:
        img = Image.fromarray(drawn)
        draw = ImageDraw.Draw(img)
        for ring in rois:
            draw.line([(float(x) * sx, float(y) * sy) for x, y in ring], fill=(0, 90, 255), width=2)
        if zoom_box is not None:
            x0, y0, x1, y1 = zoom_box
            draw.rectangle((x0 * sx, y0 * sy, x1 * sx, y1 * sy), outline=(0, 0, 0), width=3)
        drawn = np.asarray(img)
    return figures.jpeg_bytes(thumb, 82), figures.jpeg_bytes(drawn, 85)


def _zoom(
    slide: Any, cells: CellColumns | None, palette: NDArray[np.uint8], zoom_mpp: float
) -> tuple[bytes, tuple[float, float, float, float], int]:
    """A region at ``zoom_mpp`` around the densest cells, with outlines; (JPEG, box, cells drawn)."""
    W, H = (int(v) for v in slide.dimensions)
    scale = slide.read_level0_scale(zoom_mpp)
    pw = min(ZOOM_PX[0], max(64, math.ceil(W / scale)))
    ph = min(ZOOM_PX[1], max(64, math.ceil(H / scale)))
    ww, wh = pw * scale, ph * scale
    xs = cells.x if cells is not None else np.zeros(0)
    ys = cells.y if cells is not None else np.zeros(0)
    x0, y0 = densest_window(xs, ys, (ww, wh), (W, H))
    region = slide.read(x0, y0, pw, ph, zoom_mpp)
    box = (x0, y0, x0 + ww, y0 + wh)
    n = 0
    if cells is not None and len(cells):
        b = cells.bbox
        inside = np.flatnonzero((b[:, 2] > x0) & (b[:, 0] < x0 + ww) & (b[:, 3] > y0) & (b[:, 1] < y0 + wh))
        inside = inside[:MAX_ZOOM_OUTLINES]
        polys = [(p - np.array([x0, y0], np.float32)) / np.float32(scale) for p in cells.polygons(inside)]
        width = 3
        region = figures.draw_outlines(region, polys, cells.class_id[inside], palette, width=width)
        n = len(inside)
    return figures.jpeg_bytes(region, 88), box, n


def gallery_crop(
    slide: Any, bbox: NDArray[np.float64], cls_mpp: float, pad_um: float, rule: str = "bbox-square"
) -> NDArray[np.uint8]:
    """The cell as the classifier saw it: its square by the pipeline's crop ``rule`` (the
    classifier's own :func:`~wsiflow.crops.crop_cells`), read at cls_mpp, resized."""
    scale = slide.read_level0_scale(cls_mpp)
    x0, y0, x1, y1 = (float(v) for v in bbox)
    side0 = max(x1 - x0, y1 - y0) + 2 * pad_um / float(slide.mpp)
    n = int(np.clip(round(side0 / scale), 8, 1024)) + 2
    ox, oy = (x0 + x1) / 2 - n * scale / 2, (y0 + y1) / 2 - n * scale / 2
    img = slide.read(ox, oy, n, n, cls_mpp)
    return crop_cells(img, (ox, oy), scale, np.asarray([bbox]), pad_um / cls_mpp, GALLERY_PX, rule)[0]


# =========================================================================== templates


# =========================================================================== slide report


def write_slide_report(
    slide_dir: str | os.PathLike[str],
    slide_path: str | None = None,
    explain_images: Mapping[int, bytes] | None = None,
    *,
    search: Sequence[str | os.PathLike[str]] = (),
    per_kind: int = GALLERY_PER_KIND,
    storage_options: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``slide_dir/report.html`` from the files there; returns its path.

    ``slide_path`` overrides the slide path recorded in the results (pixels are read from
    it for the thumbnail, the zoomed region and the gallery crops); when the slide cannot
    be opened the page is rendered without them and says why. ``explain_images`` maps a
    cell id to a PNG/JPEG (e.g. a Grad-CAM overlay); they are saved under
    ``slide_dir/gradcam/<id>.png`` so a later regeneration keeps them. ``search`` lists
    folders to look in for a slide moved since the run (by file name; its size must match).
    ``storage_options``: fsspec options (endpoint, credentials) for a slide at a URL.
    """
    sdir = Path(slide_dir)
    data = _load_slide(sdir)
    taxonomy = _taxonomy(data)
    palette = _palette(taxonomy)
    colors = {c.code: c.color for c in taxonomy}
    summary = data.summary
    summary_doc = summary.to_dict()  # what the template and the figures read
    ident = data.identity
    mode = summary.mode or (data.pipeline.mode if data.pipeline else "dysplasia")
    notes = list(data.notes)
    cams = _store_explain_images(sdir, explain_images)

    images: dict[str, Any] = {}
    slide, why = (None, None)
    if data.cells is not None:
        slide, why = _open_slide(data, slide_path, [Path(s) for s in search], storage_options)
    elif slide_path:
        slide, why = _open_slide(data, slide_path, [], storage_options)
    if why:
        notes.append(why)
    gallery_ctx: list[dict[str, Any]] = []
    try:
        if slide is not None:
            try:
                images = _slide_images(slide, data, palette)
            except WsiflowError as exc:  # e.g. a corrupt tile: the numbers still stand
                notes.append(f"reading the slide failed ({' '.join(str(exc).split())}): images are omitted")
                slide.close()
                slide = None
        gallery_ctx = _gallery_context(data, taxonomy, slide, cams, per_kind)
    finally:
        if slide is not None:
            slide.close()

    counts = summary.counts
    n_cells = summary.n_cells
    # the differential's percentages as summarised (denominator rule applied), else of all cells
    stat_frac = {c.code: c.fraction for c in summary.classes}
    class_rows = []
    for c in taxonomy:
        n = int(counts.get(c.code, 0))
        class_rows.append(
            {
                "code": c.code,
                "name": c.name,
                "color": hex_color(c.color),
                "count": n,
                "fraction": stat_frac[c.code] if c.code in stat_frac else (n / n_cells if n_cells else None),
                "lineage": c.lineage or "",
                "dysplastic": c.dysplastic,
                "blast": c.blast,
                "nucleated": c.nucleated,
                "bar": 100.0 * n / max(1, max((int(v) for v in counts.values()), default=1)),
            }
        )

    charts: dict[str, str] = {}
    conf = summary.confidence or 0.95
    lineages = summary_doc["lineages"]
    if mode == "dysplasia" and lineages:
        charts["lineages"] = figures.data_uri(
            figures.lineage_figure(lineages, summary.dysplasia_threshold or 0.1, conf)
        )
    if mode == "differential" and summary.classes:
        charts["differential"] = figures.data_uri(
            figures.differential_figure(summary_doc["classes"], colors, conf)
        )
    blast = summary.blast
    bands: tuple[float, ...] = tuple(data.pipeline.who.blast_bands) if data.pipeline else (0.05, 0.10, 0.20)
    if blast is not None:
        charts["blast"] = figures.data_uri(
            figures.blast_figure(blast.fraction, blast.ci_low, blast.ci_high, bands, band_labels(bands))
        )

    models = []
    for task, m in data.models.items():
        if isinstance(m, Mapping):
            models.append(
                {
                    "task": task,
                    "name": m.get("name", ""),
                    "sha256": m.get("sha256", ""),
                    "demo": bool(m.get("demo")),
                }
            )
    demo = any(m["demo"] for m in models)
    warnings = list(summary.notes)
    if demo:
        warnings.insert(
            0,
            "a demo model made these calls: the numbers show the software working, "
            "they are not for interpretation",
        )
    ctx = {
        "title": ident.get("name") or sdir.name,
        "slide_dir": sdir.name,
        "status": summary.status or "unknown",
        "error": summary.error,
        "partial": data.partial,
        "mode": mode,
        "summary": summary_doc,
        "rois": [dict(r) for r in data.record.rois],
        "lineages": lineages,
        "blast": summary_doc["blast"],
        "classes": class_rows,
        "charts": charts,
        "images": images,
        "gallery": gallery_ctx,
        "per_kind": per_kind,
        "warnings": warnings,
        "notes": notes,
        "models": models,
        "demo": demo,
        "metadata": _metadata_rows(ident, data.record),
        "pipeline": _pipeline_rows(data.pipeline, data.record),
        "pipeline_json": orjson.dumps(
            data.attrs.get("pipeline") or data.record.pipeline, option=orjson.OPT_INDENT_2
        ).decode(),
        "legend": [{"code": c.code, "name": c.name, "color": hex_color(c.color)} for c in taxonomy],
        "version": __version__,
        "run_version": data.record.wsiflow_version or data.attrs.get("wsiflow_version"),
        "generated": now(),
        "cohort_link": (sdir.parent / REPORT_NAME).is_file() or (sdir.parent / "summary.csv").is_file(),
    }
    target = sdir / REPORT_NAME
    atomic_write_bytes(target, render("slide.html.j2", **ctx))
    return target


def _slide_images(slide: Any, data: _SlideData, palette: NDArray[np.uint8]) -> dict[str, Any]:
    zoom_mpp = max(float(slide.mpp), data.pipeline.resolution.seg_mpp if data.pipeline else 0.5)
    zoom_jpg, box, n_drawn = _zoom(slide, data.cells, palette, zoom_mpp)
    plain, drawn = _overview(slide, data.cells, palette, box, _roi_rings(data.attrs))
    return {
        "thumbnail": figures.data_uri(plain),
        "overview": figures.data_uri(drawn),
        "zoom": figures.data_uri(zoom_jpg),
        "zoom_mpp": zoom_mpp,
        "zoom_box_um": [round(v * float(slide.mpp)) for v in box],
        "zoom_cells": n_drawn,
    }


def _store_explain_images(sdir: Path, explain: Mapping[int, bytes] | None) -> dict[int, str]:
    """Persist the given overlays, then return every stored one as id → data URI."""
    cam_dir = sdir / GRADCAM_DIR
    if explain:
        cam_dir.mkdir(exist_ok=True)
        for cid, img in explain.items():
            figures.data_uri(img)  # refuses anything that is not an image
            ext = "png" if img[:4] == b"\x89PNG" else "jpg"
            atomic_write_bytes(cam_dir / f"{int(cid)}.{ext}", img, fsync=False)
    out: dict[int, str] = {}
    if cam_dir.is_dir():
        for p in cam_dir.iterdir():
            m = re.fullmatch(r"(-?\d+)\.(png|jpg)", p.name)
            if m:
                with contextlib.suppress(OSError, ValueError):
                    out[int(m.group(1))] = figures.data_uri(p.read_bytes())
    return out


def _gallery_context(
    data: _SlideData, taxonomy: Sequence[ClassDef], slide: Any, cams: Mapping[int, str], per_kind: int
) -> list[dict[str, Any]]:
    cells = data.cells
    if cells is None or not len(cells) or not taxonomy:
        return []
    gal = select_gallery(cells.class_id, cells.probs, len(taxonomy), per_kind)
    cls_mpp = data.pipeline.resolution.cls_mpp if data.pipeline else 0.25
    pad_um = data.pipeline.classifier.crop.pad_um if data.pipeline else 1.0
    rule = data.pipeline.classifier.crop.rule if data.pipeline else "bbox-square"
    codes = [c.code for c in taxonomy]
    out = []
    for k, c in enumerate(taxonomy):
        kinds = []
        for label, idx in (("most confident", gal.top.get(k)), ("borderline", gal.borderline.get(k))):
            tiles = []
            for i in idx if idx is not None else np.zeros(0, np.int64):
                p = cells.probs[i]
                conf = float(p[k]) if p.size > k else 0.0
                other = np.argsort(-p)
                runner = int(other[0] if other[0] != k else other[1]) if p.size > 1 else k
                cid = int(cells.id[i])
                img = None
                if slide is not None:
                    try:
                        img = figures.data_uri(
                            figures.jpeg_bytes(gallery_crop(slide, cells.bbox[i], cls_mpp, pad_um, rule), 88)
                        )
                    except WsiflowError as exc:
                        log.debug("crop of cell %s failed: %s", cid, exc)
                tiles.append(
                    {
                        "id": cid,
                        "img": img,
                        "cam": cams.get(cid),
                        "conf": conf,
                        "runner": codes[runner] if p.size > 1 else "",
                        "runner_p": float(p[runner]) if p.size > 1 else 0.0,
                        "x": round(float(cells.x[i])),
                        "y": round(float(cells.y[i])),
                        "area": round(float(cells.area_um2[i]), 1),
                    }
                )
            kinds.append({"label": label, "tiles": tiles})
        n = int(np.count_nonzero(cells.class_id == k))
        out.append({"code": c.code, "name": c.name, "color": hex_color(c.color), "n": n, "kinds": kinds})
    return out


def _metadata_rows(ident: Mapping[str, Any], record: SlideRecord) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    dims = ident.get("dimensions")
    mpp = ident.get("mpp")
    rows.append(("File", str(ident.get("path", "–"))))
    if dims:
        size = f"{num(int(dims[0]))} × {num(int(dims[1]))} px"
        if mpp:
            size += f"  ({dims[0] * float(mpp) / 1000:.2f} × {dims[1] * float(mpp) / 1000:.2f} mm)"
        rows.append(("Level-0 size", size))
    if mpp:
        src = " (set with --mpp)" if ident.get("mpp_override") else " (from the file)"
        rows.append(("Resolution", f"{float(mpp):.4g} µm/px{src}"))
    for key, label in (
        ("vendor", "Vendor"),
        ("objective_power", "Objective power"),
        ("backend", "Read with"),
    ):
        if ident.get(key) not in (None, ""):
            rows.append((label, str(ident[key])))
    if ident.get("size_bytes"):
        rows.append(("File size", f"{int(ident['size_bytes']) / 1e6:.1f} MB"))
    if record.tissue_fraction is not None:
        rows.append(("Tissue (of tile grid)", pct(record.tissue_fraction)))
    tiles = record.tiles
    if tiles is not None:
        rows.append(("Tiles", f"{tiles.selected} analysed of {tiles.grid} ({len(tiles.failed)} failed)"))
    return rows


def _pipeline_rows(p: Pipeline | None, record: SlideRecord) -> list[tuple[str, str]]:
    if p is None:
        return [("Pipeline", record.pipeline or "–")]
    rule = p.counting.denominator
    return [
        ("Pipeline", f"{p.name} ({p.mode})"),
        (
            "Resolutions",
            f"segmentation {p.resolution.seg_mpp:g} µm/px, classification {p.resolution.cls_mpp:g} µm/px",
        ),
        ("Tiles", f"{p.tiling.tile_um:g} µm core + {p.tiling.halo_um:g} µm halo"),
        ("Cell size limits", f"{p.segmenter.min_area_um2:g}–{p.segmenter.max_area_um2:g} µm²"),
        (
            "Classifier input",
            f"{p.classifier.input_px} px, crop {p.classifier.crop.rule} + {p.classifier.crop.pad_um:g} µm",
        ),
        (
            "WHO settings",
            f"dysplasia ≥ {p.who.dysplasia_threshold * 100:g}% per lineage; blast bands "
            f"{', '.join(band_labels(p.who.blast_bands))}; {p.who.confidence * 100:g}% intervals",
        ),
        (
            "Adequacy",
            f"≥ {p.adequacy.min_cells} cells in the differential; a lineage call needs "
            + ", ".join(f"≥ {n} {lin}" for lin, n in p.adequacy.min_lineage_cells.items())
            + f", ≥ {p.adequacy.min_megakaryocytes} megakaryocytes",
        ),
        ("Differential denominator", f"{rule}: {DENOMINATOR_RULES[rule]}"),
    ]

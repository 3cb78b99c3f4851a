"""Regions of interest (``wsiflow run --roi``): QuPath annotations decide where cells count.

The fixture is a QuPath 0.4-style "Export objects as GeoJSON" of two annotations (and a
detection, which is not a region). Cells outside are never counted, tiles outside are never
read (a counting stand-in around the tile reader), each named region gets its summary and
the slide's summary is their union; bad ROI files give one line naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from standins import standin_pipeline, write_pipeline_yaml, write_smear

from wsiflow.config import load_pipeline
from wsiflow.errors import ConfigError
from wsiflow.execution.runner import Runner, RunOptions
from wsiflow.execution.worker import resolve_models
from wsiflow.roi import load_rois
from wsiflow.writers.zarr_store import CellStore

IDEAL = [[40, 30], [700, 60], [640, 500], [60, 430], [40, 30]]  # level-0 px of the 1024×768 smear
SMALL = [[800, 500], [990, 520], [900, 740], [800, 500]]


def qupath_export(path: Path, rings: dict[str, list[list[float]]]) -> Path:
    feats = [
        {
            "type": "Feature",
            "id": f"7e0c6a55-0000-4000-8000-00000000000{i}",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "annotation",
                "name": name,
                "classification": {"name": "Region*", "color": [0, 0, 180]},
                "isLocked": False,
            },
        }
        for i, (name, ring) in enumerate(rings.items())
    ]
    feats.append(  # a detection in the same export is not a region
        {
            "type": "Feature",
            "id": "7e0c6a55-0000-4000-8000-0000000000ff",
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [5, 5], [0, 0]]]},
            "properties": {"objectType": "detection"},
        }
    )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def test_bad_roi_files_give_one_line_each(tmp_path: Path) -> None:
    dims = (1024, 768)
    cases = {
        "notjson.geojson": ("{oops", "not GeoJSON"),
        "points.geojson": (
            json.dumps(
                {
                    "type": "FeatureCollection",
                    "features": [
                        {
                            "type": "Feature",
                            "geometry": {"type": "Point", "coordinates": [3, 4]},
                            "properties": {"objectType": "annotation"},
                        }
                    ],
                }
            ),
            "no Polygon/MultiPolygon annotation",
        ),
        "bowtie.geojson": (
            json.dumps(
                {
                    "type": "Feature",
                    "properties": {"objectType": "annotation", "name": "tie"},
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [[[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]],
                    },
                }
            ),
            "not valid .*Self-intersection",
        ),
        "outside.geojson": (
            json.dumps(
                {
                    "type": "Feature",
                    "properties": {"objectType": "annotation"},
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [[[2000, 2000], [2100, 2000], [2100, 2100], [2000, 2000]]],
                    },
                }
            ),
            "outside the slide",
        ),
    }
    for name, (text, why) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=why) as exc:
            load_rois(tmp_path / name, dims)
        assert str(tmp_path / name) in str(exc.value) and "\n" not in str(exc.value)
    rois = load_rois(qupath_export(tmp_path / "ok.geojson", {"Ideal zone": IDEAL, "B": SMALL}), dims)
    assert rois.names == ("Ideal zone", "B")
    assert rois.inside_any([100, 950, 1000], [100, 600, 50]).tolist() == [True, True, False]


@pytest.mark.slow
def test_cells_outside_never_count_and_tiles_outside_are_never_read(
    tmp_path: Path, standin_models, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import Client

    import wsiflow.pipeline.batch as batch

    smear, _ = write_smear(tmp_path / "smear.svs")
    pipe = load_pipeline(write_pipeline_yaml(tmp_path / "p.yaml", standin_pipeline(*standin_models)))
    refs, bundles = resolve_models(pipe, "cpu")
    roi = qupath_export(tmp_path / "smear.geojson", {"Ideal zone": IDEAL, "B": SMALL})
    read: list[int] = []
    real = batch.read_seg_image

    def counting(slide, tile, *args, **kwargs):  # the stand-in reader counts what is read
        read.append(tile.id)
        return real(slide, tile, *args, **kwargs)

    def run(out: Path, roi_path: Path | None):
        opts = RunOptions(out=out, batch_tiles=2, flush_seconds=0.0, report=True, roi=roi_path)
        with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
            [res] = Runner(client, pipe, refs, bundles, opts).run([str(smear)])
        assert res.ok, res.error
        return CellStore.open(out / "smear" / "cells.zarr").read_table().sorted()

    full = run(tmp_path / "full", None)
    monkeypatch.setattr(batch, "read_seg_image", counting)
    part = run(tmp_path / "roi", roi)
    rois = load_rois(roi, (1024, 768))
    inside = rois.inside(full.x, full.y)
    # exactly the cells of the whole-slide run whose centroid is in a region, nothing else
    assert 0 < len(part) < len(full)
    assert set(part.id.tolist()) == set(full.id[inside.any(axis=0)].tolist())
    assert rois.inside_any(part.x, part.y).all()
    # tiles that meet no region were never read
    import shapely

    union = rois.union
    from wsiflow.tiling import TileGrid

    grid = TileGrid.from_pipeline(1024, 768, 0.5, pipe)
    meets = {
        t.id
        for t in grid.tiles
        if shapely.intersects(union, shapely.box(t.core.x, t.core.y, t.core.x1, t.core.y1))
    }
    assert read and set(read) <= meets and len(meets) < len(grid)
    # per-region summaries; the slide's summary is their union
    doc = orjson.loads((tmp_path / "roi" / "smear" / "summary.json").read_bytes())
    assert [r["name"] for r in doc["rois"]] == ["Ideal zone", "B"]
    assert [r["n_cells"] for r in doc["rois"]] == inside.sum(axis=1).tolist()
    assert doc["summary"]["n_cells"] == len(part)
    assert doc["rois"][0]["area_mm2"] == pytest.approx(shapely.Polygon(IDEAL).area * 0.25 / 1e6, rel=1e-6)
    html = (tmp_path / "roi" / "smear" / "report.html").read_text()
    assert 'id="rois"' in html and "Ideal zone" in html
    # a changed region is not resumed silently
    (tmp_path / "other.geojson").write_text(roi.read_text().replace("[40, 30]", "[45, 30]"))
    opts = RunOptions(out=tmp_path / "roi", resume=True, report=False, roi=tmp_path / "other.geojson")
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        [res] = Runner(client, pipe, refs, bundles, opts).run([str(smear)])
    assert not res.ok and "regions of interest changed" in (res.error or "")

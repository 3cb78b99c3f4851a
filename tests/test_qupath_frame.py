"""Overlays land where QuPath draws (issue 15 §6), on a generated Leica SCN with bounds:
the store keeps the file's level-0 frame, the GeoJSON is written in QuPath's (minus the
bounds corner) and the offset is recorded; cell UUIDs come from the slide, not the folder."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest
from standins import match_centres, standin_pipeline, write_leica_scn, write_pipeline_yaml, write_smear

from wsiflow.config import load_pipeline
from wsiflow.execution.runner import Runner, RunOptions
from wsiflow.execution.worker import resolve_models
from wsiflow.slide._base import slide_uid
from wsiflow.writers.zarr_store import CellStore

pytestmark = pytest.mark.slow

OFFSET = (300, 200)


def test_geojson_is_in_the_qupath_frame_of_a_slide_with_bounds(tmp_path: Path, standin_models) -> None:
    from distributed import Client
    from PIL import Image

    smear, centres = write_smear(tmp_path / "smear.svs")
    from wsiflow.slide import open_slide

    with open_slide(smear) as s:
        image = s.read(0, 0, *s.dimensions, s.mpp)
    scn = write_leica_scn(tmp_path / "smear.scn", np.asarray(Image.fromarray(image)), offset_px=OFFSET)
    pipe_path = write_pipeline_yaml(tmp_path / "p.yaml", standin_pipeline(*standin_models))
    pipe = load_pipeline(pipe_path)
    refs, bundles = resolve_models(pipe, "cpu")
    # OpenSlide: TiffSlide reads the blank part of a Leica collection as black, not white
    opts = RunOptions(
        out=tmp_path / "out", backend="openslide", batch_tiles=2, flush_seconds=0.0, report=False
    )
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        [res] = Runner(client, pipe, refs, bundles, opts).run([str(scn)])
    assert res.ok, res.error
    out = tmp_path / "out" / "smear"
    doc = orjson.loads((out / "summary.json").read_bytes())
    assert doc["slide"]["qupath_offset"] == list(OFFSET) and doc["slide"]["dimensions"] == [1600, 1200]
    table = CellStore.open(out / "cells.zarr", mode="r").read_table().sorted()
    # the store: the file's level-0 frame (the smear's cells at centre + offset), each once
    found = match_centres(np.column_stack([table.x, table.y]), centres + np.array(OFFSET))
    assert found == [1] * len(centres)
    with gzip.open(out / "cells.geojson.gz") as fh:
        features = orjson.loads(fh.read())["features"]
    assert len(features) == len(table)
    for i, f in enumerate(features):  # QuPath's frame: minus the bounds corner
        ring = np.array(f["geometry"]["coordinates"][0])
        assert np.abs(ring[:-1] - (table.polygon(i) - np.array(OFFSET))).max() < 0.01
    # in QuPath's frame the cells are where they are in the main image itself
    qx = np.array([np.mean(f["geometry"]["coordinates"][0][:-1], axis=0) for f in features])
    assert match_centres(qx, centres, tol=3.0) == [1] * len(centres)


def test_uuid_seed_is_the_slide_not_its_name_or_folder(tmp_path: Path) -> None:
    smear, _ = write_smear(tmp_path / "a.svs")
    (tmp_path / "x").mkdir()
    copy = Path(shutil.copy(smear, tmp_path / "x" / "renamed.svs"))
    other, _ = write_smear(tmp_path / "x" / "a.svs", compression="jpeg")  # other bytes, same name

    def ident(p: Path) -> dict:
        return {"size_bytes": p.stat().st_size, "dimensions": [1024, 768]}

    assert slide_uid(str(smear), ident(smear)) == slide_uid(str(copy), ident(copy))  # same slide
    assert slide_uid(str(smear), ident(smear)) != slide_uid(
        str(other), ident(other)
    )  # same name, other slide

"""The lab's labelling loop: ``wsiflow review`` picks cells for QuPath, ``wsiflow harvest``
turns QuPath's export (or a CSV) into training crops and an appendable manifest."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from report_fixture import truth_cells, write_slide_result

from wsiflow.config import load_pipeline
from wsiflow.errors import ConfigError
from wsiflow.train.harvest import harvest, read_labels
from wsiflow.train.review import find_result_slides, margins, select_cells, uuid_seed, write_review
from wsiflow.writers.geojson import cell_uuids

SIZE = (3000, 2400)
MPP = 0.25


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run output of two generated slides whose 'calls' are the truth with noisy probabilities."""
    from wsiflow.synth import SynthParams, synthesize

    d = tmp_path_factory.mktemp("lab")
    pipe = load_pipeline("mds")
    out = d / "results"
    truth = {}
    for name, seed in (("a", 5), ("b", 6)):
        res = synthesize(d / f"{name}.svs", SynthParams(width=SIZE[0], height=SIZE[1], mpp=MPP, seed=seed))
        polys, cls = truth_cells(res.truth_geojson, pipe.class_codes)
        write_slide_result(out, name, res.slide, SIZE, MPP, pipe, polys, cls, seed)
        truth[name] = cls
    return {"dir": d, "out": out, "pipe": pipe, "truth": truth}


def _export_as_qupath(review_geojson: Path, dest: Path, relabel: dict[int, str] | None = None) -> Path:
    """What QuPath writes for 'Export objects as GeoJSON' of the imported cells, with the classes
    the hematologist set: the same feature ids, classification objects, a plain feature list."""
    feats = json.loads(review_geojson.read_text())["features"]
    for i, name in (relabel or {}).items():
        feats[i]["properties"]["classification"] = {"name": name, "color": [10, 20, 30]}
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(feats))
    return dest


def test_uncertain_picks_cover_every_slide_and_class_hardest_first(run) -> None:
    slides = find_result_slides(run["out"])
    picks = select_cells(slides, n=60, strategy="uncertain", seed=0)
    assert sum(len(p) for p in picks) == 60
    for s, idx in zip(slides, picks, strict=True):
        classes = set(s.cells.class_id[idx].tolist())
        assert classes == set(s.cells.class_id.tolist())  # every predicted class of every slide
        m = margins(s.cells.probs)
        for k in classes:  # within a class: the least certain cells, in order
            mine = idx[s.cells.class_id[idx] == k]
            others = np.setdiff1d(np.flatnonzero(s.cells.class_id == k), mine)
            assert list(m[mine]) == sorted(m[mine])
            if others.size:
                assert m[mine].max() <= m[others].min()
    capped = select_cells(slides, n=1000, strategy="stratified", per_class=2, seed=1)
    for s, idx in zip(slides, capped, strict=True):
        assert np.bincount(s.cells.class_id[idx]).max() <= 2
    assert [p.tolist() for p in select_cells(slides, 30, "random", seed=4)] == [
        p.tolist() for p in select_cells(slides, 30, "random", seed=4)
    ]
    with pytest.raises(ConfigError, match="strategy"):
        select_cells(slides, 10, "smart")


def test_review_writes_qupath_geojson_with_the_runs_uuids(run, tmp_path: Path) -> None:
    meta = write_review(run["out"], tmp_path / "rev", n=40, gallery=True)
    assert meta["n_selected"] == 40 and {s["key"] for s in meta["slides"]} == {"a", "b"}
    for s in meta["slides"]:
        doc = json.loads((tmp_path / "rev" / s["geojson"]).read_text())
        ids = [f["id"] for f in doc["features"]]
        seed = uuid_seed(find_result_slides(run["out"] / s["key"])[0].identity, run["out"] / s["key"])
        expect = {u.decode() for u in cell_uuids(seed, np.array(s["cell_ids"], np.int64))}
        assert set(ids) == expect and len(ids) == len(s["cell_ids"])
        assert all(f["properties"]["objectType"] == "detection" for f in doc["features"])
    page = (tmp_path / "rev" / "gallery.html").read_text()
    assert page.count("<img src='data:image/jpeg;base64,") == 40


def test_harvest_matches_labels_and_appends_without_duplicates(run, tmp_path: Path) -> None:
    rev = tmp_path / "rev"
    meta = write_review(run["out"], rev, n=24, strategy="stratified", seed=2, gallery=False)
    a_ids = next(s["cell_ids"] for s in meta["slides"] if s["key"] == "a")
    export = _export_as_qupath(
        rev / "a.geojson",
        tmp_path / "qupath" / "a.geojson",
        {0: "Blast", 1: "Ignore*", 2: "Erythroid (dysplastic)"},
    )
    cells = tmp_path / "cells"
    rep = harvest(run["out"], [export], cells)
    assert rep.matched_uuid == len(a_ids) and rep.not_cells == 1 and not rep.unmatched
    rows = list(csv.DictReader((cells / "manifest.csv").open()))
    assert len(rows) == len(a_ids) - 1 and {r["group"] for r in rows} == {"a"}
    by_id = {r["cell_id"]: r for r in rows}
    assert by_id[str(a_ids[0])]["label"] == "blast" and by_id[str(a_ids[2])]["label"] == "ED"
    assert str(a_ids[1]) not in by_id
    for r in rows:
        img = cells / r["path"]
        assert img.is_file()
        from PIL import Image

        assert Image.open(img).size == (run["pipe"].classifier.input_px,) * 2
    # second round: the same export again plus a CSV relabel of one cell → no duplicate rows
    (tmp_path / "b.csv").write_text(f"id,label\n{a_ids[0]},GD\n")
    (tmp_path / "b.csv").rename(tmp_path / "a.csv")
    rep2 = harvest(run["out"], [export, tmp_path / "a.csv"], cells)
    rows2 = list(csv.DictReader((cells / "manifest.csv").open()))
    assert len(rows2) == len(rows) and rep2.added == 0 and rep2.relabelled == 1
    assert {r["cell_id"]: r["label"] for r in rows2}[str(a_ids[0])] == "GD"
    hj = json.loads((cells / "harvest.json").read_text())
    assert hj["crop"]["input_px"] == run["pipe"].classifier.input_px and len(hj["rounds"]) == 2


def test_harvest_matches_by_centroid_and_refuses_unknown_labels(run, tmp_path: Path) -> None:
    rev = tmp_path / "rev"
    write_review(run["out"], rev, n=10, gallery=False)
    feats = json.loads((rev / "b.geojson").read_text())["features"]
    for f in feats:
        f["id"] = "drawn-in-qupath"  # objects without wsiflow's UUID: matched by centroid
    (tmp_path / "b.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    rep = harvest(run["out"], [tmp_path / "b.geojson"], tmp_path / "cells")
    assert rep.matched_centroid == len(feats) and rep.matched_uuid == 0
    feats[0]["properties"]["classification"] = {"name": "Plasma cell"}
    (tmp_path / "b.geojson").write_text(json.dumps(feats))
    with pytest.raises(ConfigError, match=r"'Plasma cell' is not a class.*--map"):
        harvest(run["out"], [tmp_path / "b.geojson"], tmp_path / "cells2")
    rep = harvest(run["out"], [tmp_path / "b.geojson"], tmp_path / "cells2", maps={"Plasma cell": "other"})
    assert rep.per_label.get("other", 0) >= 1
    (tmp_path / "zz.geojson").write_text(json.dumps(feats))
    with pytest.raises(ConfigError, match="no slide folder 'zz'"):
        harvest(run["out"], [tmp_path / "zz.geojson"], tmp_path / "cells3")
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(ConfigError, match="not GeoJSON"):
        read_labels(tmp_path / "bad.geojson")


def test_cli_harvest_bad_label_is_one_line(run, tmp_path: Path) -> None:
    rev = tmp_path / "rev"
    write_review(run["out"], rev, n=4, gallery=False)
    export = _export_as_qupath(rev / "a.geojson", tmp_path / "x" / "a.geojson", {0: "Unicorn"})
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsiflow",
            "harvest",
            str(run["out"]),
            "--labels",
            str(export),
            "-o",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Unicorn" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_harvested_crops_are_what_inference_classified(tmp_path: Path) -> None:
    """A real `wsiflow run` (demo models): the harvested crop of a cell, fed to the pipeline's
    classifier, gives exactly the probabilities the run stored for it."""
    from PIL import Image

    from wsiflow.classify import Classifier
    from wsiflow.models.bundle import ModelBundle
    from wsiflow.writers.zarr_store import CellStore

    def cli(*args: str) -> None:
        r = subprocess.run([sys.executable, "-m", "wsiflow", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    cli("synth", str(tmp_path / "s.svs"), "--size", "2000x1600", "--seed", "12")
    cli("run", str(tmp_path / "s.svs"), "-o", str(tmp_path / "res"), "--workers", "1", "--no-progress")
    cli("review", str(tmp_path / "res"), "-o", str(tmp_path / "rev"), "--n", "25", "--no-gallery")
    export = _export_as_qupath(tmp_path / "rev" / "s.geojson", tmp_path / "qp" / "s.geojson")
    cli("harvest", str(tmp_path / "res"), "--labels", str(export), "-o", str(tmp_path / "cells"))
    rows = list(csv.DictReader((tmp_path / "cells" / "manifest.csv").open()))
    assert len(rows) == 25
    pipe = load_pipeline("mds")
    clf = Classifier(ModelBundle.load(pipe.classifier.bundle, pipe.classifier.sha256), pipe.classifier)
    probs = clf.predict(np.stack([np.asarray(Image.open(tmp_path / "cells" / r["path"])) for r in rows]))
    store = CellStore.open(tmp_path / "res" / "s" / "cells.zarr")
    ids, stored = store.read_column("id"), store.read_column("probs")
    row_of = {int(i): k for k, i in enumerate(ids)}
    expect = np.stack([stored[row_of[int(r["cell_id"])]] for r in rows])
    np.testing.assert_array_equal(probs, expect)

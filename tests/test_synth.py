"""`wsiflow synth`: deterministic generated slides whose truth matches the request."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pytest

from wsiflow.errors import ConfigError
from wsiflow.synth import SyntheticSlide, SynthParams, synthesize, truth_paths
from wsiflow.synth.cells import CLASS_CODES, SUBTYPES, design_cell, render_cell, sample_subtype
from wsiflow.synth.compare import Detections, compare, load_truth
from wsiflow.synth.layout import class_counts_for

SMALL = {"width": 2048, "height": 2048, "mpp": 0.25}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "s.svs"
    params = SynthParams(
        width=2600,
        height=2300,
        mpp=0.25,
        seed=11,
        dysplasia={"erythroid": 0.2, "granulocytic": 0.1, "megakaryocytic": 0.4},
        blasts=0.1,
    )
    res = synthesize(out, params)
    return out, res.summary


def test_same_seed_same_truth_and_pixels() -> None:
    a = SyntheticSlide.generate(SynthParams(seed=3, **SMALL))
    b = SyntheticSlide.generate(SynthParams(seed=3, **SMALL))
    c = SyntheticSlide.generate(SynthParams(seed=4, **SMALL))
    assert a.truth_summary() == b.truth_summary()
    assert list(a.truth_features()) == list(b.truth_features())
    assert np.array_equal(a.region(500, 700, 300, 200), b.region(500, 700, 300, 200))
    assert not np.array_equal(a.layout.x, c.layout.x)


def test_pixels_do_not_depend_on_how_regions_are_cut() -> None:
    s = SyntheticSlide.generate(SynthParams(seed=5, **SMALL))
    whole = s.region(0, 0, 2048, 2048)
    s2 = SyntheticSlide.generate(SynthParams(seed=5, **SMALL))
    parts = np.concatenate(
        [
            np.concatenate([s2.region(x, y, 512, 512) for x in range(0, 2048, 512)], axis=1)
            for y in range(0, 2048, 512)
        ],
        axis=0,
    )
    assert np.array_equal(whole, parts)
    rows = np.concatenate([band for _, band in s2.tile_rows(256)], axis=0)
    assert np.array_equal(whole, rows)


def test_counts_follow_the_request_exactly() -> None:
    p = SynthParams(
        seed=0,
        dysplasia={"erythroid": 0.15, "granulocytic": 0.05, "megakaryocytic": 0.3},
        blasts=0.07,
        **SMALL,
    )
    counts = class_counts_for(1000, p)
    assert sum(counts.values()) == 1000
    assert counts["blast"] == 70
    e = counts["EN"] + counts["ED"]
    assert counts["ED"] == round(0.15 * e)
    g = counts["GN"] + counts["GD"]
    assert counts["GD"] == round(0.05 * g)


def test_truth_consistent_with_request(written: tuple[Path, dict]) -> None:
    _, s = written
    assert s["dropped"] == 0
    assert s["counts"] == s["requested_counts"]
    n = s["nucleated"]
    assert n == sum(s["counts"].values()) > 100
    assert abs(s["blasts"]["fraction"] - 0.1) <= 0.5 / n + 1e-9
    for lin, f in (("erythroid", 0.2), ("granulocytic", 0.1), ("megakaryocytic", 0.4)):
        v = s["lineages"][lin]
        assert v["total"] > 0
        assert abs(v["fraction"] - f) <= 0.5 / v["total"] + 1e-9
    assert s["touching"] > 0
    assert s["near_seams"] > 0  # cells cross the 512 µm tile seam at x or y = 2048


def test_truth_geojson_matches_summary(written: tuple[Path, dict]) -> None:
    out, s = written
    gj, js = truth_paths(out)
    assert orjson.loads(js.read_bytes()) == s
    data = orjson.loads(gj.read_bytes())
    feats = data["features"]
    assert len(feats) == s["nucleated"]
    got: dict[str, int] = {}
    for f in feats:
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 25
        p = f["properties"]
        assert len(p["classification"]["color"]) == 3
        got[p["code"]] = got.get(p["code"], 0) + 1
        xs = [v[0] for v in ring]
        assert min(xs) <= p["x"] <= max(xs)
    assert got == {k: v for k, v in s["counts"].items() if v}


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_both_backends_read_slide_with_mpp(written: tuple[Path, dict], backend: str) -> None:
    out, _ = written
    if backend == "openslide":
        import openslide

        sl = openslide.OpenSlide(str(out))
        mpp = float(sl.properties["openslide.mpp-x"])
        tile = np.asarray(sl.read_region((1000, 900), 0, (256, 256)).convert("RGB"))
    else:
        import tiffslide

        sl = tiffslide.TiffSlide(str(out))
        mpp = float(sl.properties["tiffslide.mpp-x"])
        tile = np.asarray(sl.read_region((1000, 900), 0, (256, 256)).convert("RGB"))
    assert sl.dimensions == (2600, 2300)
    assert mpp == pytest.approx(0.25)
    sl.close()
    ref = SyntheticSlide.generate(
        SynthParams(
            width=2600,
            height=2300,
            mpp=0.25,
            seed=11,
            dysplasia={"erythroid": 0.2, "granulocytic": 0.1, "megakaryocytic": 0.4},
            blasts=0.1,
        )
    ).region(1000, 900, 256, 256)
    # JPEG (quality 90, 4:2:0) keeps the picture
    assert np.abs(tile.astype(int) - ref.astype(int)).mean() < 4.0


def test_truth_compares_perfectly_with_itself(written: tuple[Path, dict]) -> None:
    out, _ = written
    t = load_truth(out)
    c = compare(t, Detections(t.x + 1.0, t.y - 1.0, t.code))
    assert c.precision == 1.0 and c.recall == 1.0 and c.duplicates == 0 and c.accuracy == 1.0
    for lin in ("erythroid", "granulocytic", "megakaryocytic"):
        assert c.fractions[lin]["error"] == 0.0


def test_every_subtype_renders_inside_its_outline() -> None:
    rng = np.random.default_rng(0)
    for code in CLASS_CODES:
        for sub, _ in SUBTYPES[code]:
            d = design_cell(code, sub, float(np.mean(sample_subtype(code, rng)[1])), 500.3, 400.7, 1, 0.25)
            d = design_cell(code, sub, 14.0 if code not in ("MN", "MD") else 50.0, 500.3, 400.7, 2, 0.25)
            p = render_cell(d)
            a = p.alpha
            area_px = float((a >= 0.5).sum())
            poly = d.polygon(256)
            x, y = poly[:, 0], poly[:, 1]
            shoelace = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))
            assert area_px == pytest.approx(shoelace, rel=0.05), (code, sub)
            # nothing drawn at the patch border (the patch holds the whole cell)
            assert a[0].max() == 0 and a[-1].max() == 0 and a[:, 0].max() == 0 and a[:, -1].max() == 0
            assert d.extent <= (14.0 if code not in ("MN", "MD") else 50.0) / 2 / 0.25 * 1.22 + 1.5


def test_bad_parameters_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="--dysplasia"):
        SynthParams(dysplasia={"erythroid": 1.5}).validate()
    with pytest.raises(ConfigError, match="--dysplasia"):
        SynthParams(dysplasia={"lymphoid": 0.1}).validate()
    with pytest.raises(ConfigError, match="--size"):
        SynthParams(width=10, height=10).validate()
    with pytest.raises(ConfigError, match="--blasts"):
        SynthParams(blasts=1.2).validate()


def test_cli_synth_and_compare(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wsiflow.cli.app import _register, app

    _register()
    out = tmp_path / "c.svs"
    r = CliRunner().invoke(app, ["synth", str(out), "--size", "1024x1024", "--seed", "2"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and (tmp_path / "c.truth.geojson").is_file()
    assert "nucleated cells" in r.output
    r = CliRunner().invoke(app, ["synth", str(out), "--size", "abc"])
    assert r.exit_code != 0


def test_polygon_area_is_area_um2(written: tuple[Path, dict]) -> None:
    out, _ = written
    t = load_truth(out)
    assert np.all(t.radius > 7.0 / 2 / 0.25 * 0.8)  # lymphocytes are the smallest (≥ 7.5 µm)
    assert math.isfinite(float(t.radius.max()))


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    """`wsiflow demo` end to end (embedded Dask cluster) with the stand-in bundles of the plumbing tests."""
    import sys

    from typer.testing import CliRunner

    sys.path.insert(0, str(Path(__file__).parent))
    from standins import make_standin_models, write_pipeline_yaml

    from wsiflow.cli.app import _register, app
    from wsiflow.config import load_pipeline

    seg, cls = make_standin_models(tmp_path)
    data = load_pipeline("mds").model_dump(mode="json")
    data["segmenter"] = {**data["segmenter"], "bundle": str(seg), "sha256": None}
    data["classifier"] = {**data["classifier"], "bundle": str(cls), "sha256": None, "input_px": 75}
    pipe = write_pipeline_yaml(tmp_path / "p.yaml", data)
    _register()
    out = tmp_path / "demo"
    r = CliRunner().invoke(
        app, ["demo", "-o", str(out), "--size", "1024x1024", "--pipeline", str(pipe), "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    assert "erythroid dysp." in r.output and "blasts" in r.output and "QuPath overlay" in r.output
    assert (out / "run" / "demo-marrow" / "cells.geojson.gz").is_file()
    assert (out / "demo-marrow.truth.json").is_file()

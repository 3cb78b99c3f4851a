"""Pipeline config: every shipped YAML loads; errors name the bad key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from wsiflow.config import load_pipeline, parse_pipeline, shipped_pipelines
from wsiflow.errors import ConfigError


@pytest.fixture
def mds_dict() -> dict[str, Any]:
    return yaml.safe_load(shipped_pipelines()["mds"].read_text())


def test_every_shipped_pipeline_loads() -> None:
    names = shipped_pipelines()
    assert "mds" in names
    for name in names:
        p = load_pipeline(name)
        assert p.name == name
        assert len(p.class_codes) == len(set(p.class_codes))


def test_mds_taxonomy_matches_the_seed() -> None:
    p = load_pipeline("mds")
    assert p.class_codes == ("EN", "GN", "MN", "ED", "GD", "MD", "blast", "other")
    assert p.lineages == ("erythroid", "granulocytic", "megakaryocytic")
    dys = {c.code for c in p.taxonomy if c.dysplastic}
    assert dys == {"ED", "GD", "MD"}
    assert [c.code for c in p.taxonomy if c.blast] == ["blast"]
    assert p.who.dysplasia_threshold == 0.10
    assert p.who.blast_bands == (0.05, 0.10, 0.20)
    assert p.adequacy.min_cells == 500 and p.adequacy.min_megakaryocytes == 30
    assert all(len(c.color) == 3 for c in p.taxonomy)


def test_pipeline_is_frozen() -> None:
    p = load_pipeline("mds")
    with pytest.raises(ValidationError):
        p.tiling.halo_um = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d["tiling"].update(halo_um=-1), "tiling.halo_um"),
        (lambda d: d["tiling"].update(halo_um=20), "tiling.halo_um"),  # below max_object/2
        (lambda d: d["resolution"].pop("seg_mpp"), "resolution.seg_mpp"),
        (lambda d: d["segmenter"].update(thresold=0.4), "segmenter.thresold"),
        (lambda d: d["taxonomy"][1].update(color=[0, 0, 300]), "taxonomy[GN].color"),
        (lambda d: d["classifier"].update(input_px=32), "classifier.input_px"),
        (lambda d: d["who"].update(blast_bands=[0.2, 0.1]), "who.blast_bands"),
        (lambda d: d["segmenter"].update(sha256="not-a-hash"), "segmenter.sha256"),
    ],
)
def test_errors_name_the_bad_key(mds_dict: dict[str, Any], mutate: Any, key: str) -> None:
    data = copy.deepcopy(mds_dict)
    mutate(data)
    with pytest.raises(ConfigError) as err:
        parse_pipeline(data, "mds.yaml")
    assert str(err.value).startswith(f"mds.yaml: {key}:"), str(err.value)


def test_duplicate_class_codes_refused(mds_dict: dict[str, Any]) -> None:
    data = copy.deepcopy(mds_dict)
    data["taxonomy"][1]["code"] = "EN"
    with pytest.raises(ConfigError, match="duplicate class codes"):
        parse_pipeline(data, "x.yaml")


def test_bad_yaml_and_unknown_names(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_pipeline(bad)
    with pytest.raises(ConfigError, match="unknown pipeline"):
        load_pipeline("no-such-pipeline")
    with pytest.raises(ConfigError, match="file not found"):
        load_pipeline(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_pipeline(listy)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_pipeline(evil)


def test_errors_survive_pickling() -> None:
    # Dask returns exceptions from workers by pickling them.
    import pickle

    from wsiflow.errors import MppError, SlideError, SlideNotFound

    for err in (
        ConfigError("mds.yaml", "tiling.halo_um", "too small"),
        SlideError("/a b/c.svs", "cannot read\n tile"),
        SlideNotFound("/x.svs", "no such file"),
        MppError("/y.svs", "no µm/px"),
    ):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)

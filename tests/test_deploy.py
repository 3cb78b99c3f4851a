"""``wsiflow pipeline derive|show``: a pipeline pinned to a new classifier, checked and round-tripped."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wsiflow.config import load_pipeline
from wsiflow.errors import BundleIntegrityError, ModelError
from wsiflow.models.bundle import ModelBundle, update_card
from wsiflow.train.deploy import derive_pipeline


@pytest.fixture()
def pbc8_copy(tmp_path: Path) -> Path:
    b = ModelBundle.load("pbc8")
    for f in (b.weights_path, b.card_path):
        shutil.copy(f, tmp_path / f"lab-{f.name}")
    return tmp_path / "lab-pbc8.safetensors"


def test_derive_pins_the_bundle_and_takes_the_crop_from_its_card(tmp_path: Path, pbc8_copy: Path) -> None:
    b = update_card(
        ModelBundle.load(pbc8_copy), {"crop": {"rule": "bbox-square", "pad_um": 7.5, "cls_mpp": 0.3}}
    )
    out = tmp_path / "cfg" / "my-pb.yaml"
    pipe = derive_pipeline("pb-differential", pbc8_copy, out)
    base = load_pipeline("pb-differential")
    assert pipe.name == "my-pb" and pipe.taxonomy == base.taxonomy and pipe.segmenter == base.segmenter
    assert pipe.classifier.sha256 == b.sha256 and Path(pipe.classifier.bundle) == pbc8_copy.resolve()
    assert pipe.classifier.crop.pad_um == 7.5 and pipe.resolution.cls_mpp == 0.3
    assert load_pipeline(out) == pipe
    assert "sha256 " + b.sha256 in out.read_text()
    # the pin holds: another file in its place is refused when the pipeline's models load
    pbc8_copy.write_bytes(pbc8_copy.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BundleIntegrityError):
        ModelBundle.load(pipe.classifier.bundle, pipe.classifier.sha256)


def test_derive_refuses_a_classifier_of_another_taxonomy(tmp_path: Path, pbc8_copy: Path) -> None:
    with pytest.raises(ModelError, match="must match"):
        derive_pipeline("mds", pbc8_copy, tmp_path / "x.yaml")
    assert not (tmp_path / "x.yaml").exists()


def test_pipeline_show_prints_defaults_and_verified_models(repo_root: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "wsiflow", "pipeline", "show", "pb-differential"],
        capture_output=True,
        text=True,
        cwd=repo_root,
    )
    assert r.returncode == 0, r.stderr
    body = yaml.safe_load(r.stdout)
    assert body["classifier"]["bundle"] == "pbc8" and "min_confidence" in body["classifier"]
    assert "classifier: pbc8" in r.stdout and "temperature" in r.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "wsiflow", "pipeline", "show", "nope"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown pipeline" in bad.stderr

"""Model bundles: safetensors + card round trip, integrity pins, pickle refusal, taxonomy match."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from standins import tiny_classifier_card

from wsiflow.config import load_pipeline
from wsiflow.errors import BundleIntegrityError, ModelError
from wsiflow.models.bundle import ModelBundle, check_taxonomy, resolve_bundle, save_bundle
from wsiflow.models.inception import build_inception_v3
from wsiflow.models.registry import build_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_inception_v3(3)
    # Make BN statistics non-trivial so a broken buffer round trip would show.
    m.train()
    with torch.no_grad():
        m(torch.rand(4, 3, 80, 80))
    return m.eval()


def test_round_trip_identical_outputs(model: torch.nn.Module, tmp_path: Path) -> None:
    bundle = save_bundle(model, tiny_classifier_card(["a", "b", "c"]), tmp_path / "tiny.safetensors")
    assert (tmp_path / "tiny.json").is_file()
    card = json.loads((tmp_path / "tiny.json").read_text())
    assert card["format"] == "wsiflow-bundle/1" and card["sha256"] == bundle.sha256
    loaded = ModelBundle.load(tmp_path / "tiny.json")  # either file names the bundle
    rebuilt = loaded.build("cpu")
    assert not rebuilt.training
    x = torch.rand(2, 3, 80, 80)
    with torch.inference_mode():
        assert torch.equal(model(x), rebuilt(x))
    assert loaded.class_codes == ("a", "b", "c") and loaded.input_px == 80


def test_fp16_storage_loads_as_float32(model: torch.nn.Module, tmp_path: Path) -> None:
    full = save_bundle(model, tiny_classifier_card(["a", "b", "c"]), tmp_path / "full.safetensors")
    half = save_bundle(model, tiny_classifier_card(["a", "b", "c"]), tmp_path / "half.safetensors", fp16=True)
    assert half.weights_path.stat().st_size < 0.6 * full.weights_path.stat().st_size
    assert all(t.dtype != torch.float16 for t in half.state_dict().values())
    x = torch.rand(2, 3, 80, 80)
    with torch.inference_mode():
        a, b = full.build()(x).softmax(1), half.build()(x).softmax(1)
    assert torch.allclose(a, b, atol=2e-2)


def test_sha256_pin_mismatch_refused(model: torch.nn.Module, tmp_path: Path) -> None:
    bundle = save_bundle(model, tiny_classifier_card(["a", "b", "c"]), tmp_path / "tiny.safetensors")
    ModelBundle.load(bundle.weights_path, expected_sha256=bundle.sha256)  # the right pin loads
    with pytest.raises(BundleIntegrityError, match="does not match the pinned"):
        ModelBundle.load(bundle.weights_path, expected_sha256="0" * 64)


def test_changed_weights_refused(model: torch.nn.Module, tmp_path: Path) -> None:
    bundle = save_bundle(model, tiny_classifier_card(["a", "b", "c"]), tmp_path / "tiny.safetensors")
    card = json.loads(bundle.card_path.read_text())
    card["sha256"] = "f" * 64
    bundle.card_path.write_text(json.dumps(card))
    with pytest.raises(BundleIntegrityError, match="does not match its card"):
        ModelBundle.load(bundle.weights_path)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_pickle_suffix_refused(tmp_path: Path, suffix: str, model: torch.nn.Module) -> None:
    path = tmp_path / f"weights{suffix}"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelError, match="pickle"):
        ModelBundle.load(path)


def test_pickle_disguised_as_safetensors_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"a": 1}))
    card = {**tiny_classifier_card(["a", "b"]), "sha256": "0" * 64, "format": "x"}
    (tmp_path / "evil.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="pickle"):
        resolve_bundle(path)
    with pytest.raises(ModelError, match="pickle"):
        save_bundle(torch.nn.Linear(1, 1), tiny_classifier_card(["a", "b"]), tmp_path / "out.pt")


def test_unknown_name_and_bad_card(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown model bundle"):
        ModelBundle.load("no-such-bundle")
    (tmp_path / "x.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ModelError, match="invalid JSON"):
        ModelBundle.load(tmp_path / "x.safetensors")
    with pytest.raises(ModelError, match="unknown architecture"):
        build_model("resnet", {})


def test_taxonomy_mismatch_refused() -> None:
    pipe = load_pipeline("mds")
    good = tiny_classifier_card(list(pipe.class_codes))
    check_taxonomy(good, pipe)
    swapped = copy.deepcopy(good)
    swapped["classes"][0], swapped["classes"][1] = swapped["classes"][1], swapped["classes"][0]
    with pytest.raises(ModelError, match="must match"):
        check_taxonomy(swapped, pipe)
    with pytest.raises(ModelError, match="must match"):
        check_taxonomy(tiny_classifier_card(["a", "b", "c"]), pipe)


def test_shipped_pbc8_verifies() -> None:
    weights = Path(__file__).resolve().parents[1] / "wsiflow" / "weights" / "pbc8.safetensors"
    assert weights.is_file()  # shipped: a missing bundle is a failure, not a skip
    b = ModelBundle.load("pbc8")
    assert b.task == "classifier" and len(b.class_codes) == 8
    assert b.weights_path.stat().st_size < 60e6


def test_header_length_starting_with_0x80_is_still_safetensors(tmp_path: Path) -> None:
    # A safetensors header of e.g. 128 or 9600 bytes starts with byte 0x80, like a pickle.
    import numpy as np
    from safetensors.numpy import save

    for pad in range(64):
        data = save({"w": np.zeros(3, np.float32)}, metadata={"pad": "x" * pad})
        if data[0] == 0x80:
            break
    else:
        pytest.fail("no header length with low byte 0x80 found")
    weights = tmp_path / "b.safetensors"
    weights.write_bytes(data)
    (tmp_path / "b.json").write_text("{}")
    assert resolve_bundle(weights) == (weights, tmp_path / "b.json")
    # garbage that is neither pickle nor safetensors is refused too
    weights.write_bytes(b"\x00" * 32)
    with pytest.raises(ModelError, match="not a safetensors file"):
        resolve_bundle(weights)


SHIPPED_CARDS = sorted((Path(__file__).resolve().parents[1] / "wsiflow" / "weights").glob("*.json"))


@pytest.mark.parametrize("path", SHIPPED_CARDS, ids=lambda p: p.stem)
def test_every_shipped_card_validates_and_round_trips(path: Path) -> None:
    from wsiflow.models.card import ModelCard

    card = ModelCard.load(path)
    assert json.loads(card.to_json()) == json.loads(path.read_text())
    assert card.to_json() == path.read_bytes()  # written back, a card keeps its layout too
    assert card.name == path.stem and card.task in ("classifier", "segmenter") and card.mpp > 0


def test_shipped_cards_are_all_there() -> None:
    names = {p.stem for p in SHIPPED_CARDS}
    assert {"demo-seg", "marrow-seg", "mds-demo", "pbc8", "smear-seg"} <= names


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sha256": None}, "card lacks sha256"),
        ({"mpp": None, "task": None}, "card lacks task, mpp"),
        ({"mpp": "0.25"}, "card field mpp: Input should be a valid number (got '0.25')"),
        ({"input_px": 80.5}, "card field input_px: Input should be a valid integer"),
        ({"task": "detector"}, "card field task: Input should be 'classifier' or 'segmenter'"),
        ({"classes": [{"name": "no code"}]}, "card lacks classes.0.code"),
        ({"normalization": {"mean": [0.5], "std": [1, 1, 1]}}, "card field normalization.mean: List should"),
        ({"format": "wsiflow-bundle/0"}, "card field format: Input should be 'wsiflow-bundle/1'"),
    ],
)
def test_a_bad_card_is_one_line_naming_the_file(
    tmp_path: Path, model: torch.nn.Module, change: dict[str, Any], message: str
) -> None:
    bundle = save_bundle(model, tiny_classifier_card(["a", "b", "c"]), tmp_path / "tiny.safetensors")
    doc = json.loads(bundle.card_path.read_text())
    for key, value in change.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    bundle.card_path.write_text(json.dumps(doc))
    with pytest.raises(ModelError) as err:
        ModelBundle.load(bundle.weights_path)
    text = str(err.value)
    assert text.startswith(f"{bundle.card_path}: {message}") and "\n" not in text

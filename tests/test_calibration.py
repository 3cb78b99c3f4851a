"""Temperature scaling: the fit recovers a known temperature, ECE is the binned gap, the
card carries T without touching the weights, and the pipeline's Classifier applies it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from standins import tiny_classifier_card

from wsiflow.classify import Classifier
from wsiflow.config import ClassifierSpec
from wsiflow.errors import ConfigError, ModelError
from wsiflow.models.bundle import ModelBundle, save_bundle, update_card
from wsiflow.models.inception import build_inception_v3
from wsiflow.train import calibration as C
from wsiflow.train.evaluate import calibrate_classifier


def _tempered_sample(
    t_true: float, n: int = 20000, k: int = 5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(n, k))
    p = C.scaled_probs(logits, t_true)
    labels = np.array([rng.choice(k, p=row) for row in p])
    return logits, labels


@pytest.mark.parametrize("t_true", [0.6, 1.0, 2.5])
def test_fit_recovers_the_temperature_that_generated_the_labels(t_true: float) -> None:
    logits, labels = _tempered_sample(t_true)
    t = C.fit_temperature(logits, labels)
    assert t == pytest.approx(t_true, rel=0.06)
    # the fitted T is the NLL minimum and never changes a prediction
    assert C.nll(logits, labels, t) <= min(C.nll(logits, labels, t * 1.2), C.nll(logits, labels, t / 1.2))
    assert (C.scaled_probs(logits, t).argmax(1) == logits.argmax(1)).all()


def test_log_probs_are_logits_up_to_a_constant() -> None:
    logits, _ = _tempered_sample(1.0, n=50)
    probs = C.scaled_probs(logits, 1.0)
    expect = C.scaled_probs(logits, 0.7)
    np.testing.assert_allclose(C.scaled_probs(C.log_probs(probs), 0.7), expect, atol=1e-9)


def test_ece_is_the_count_weighted_gap_per_bin() -> None:
    # 10 cells at confidence 0.95 of which 5 right (gap 0.45), 10 at 0.55 all right (gap 0.45),
    # 20 at 0.75 with 15 right (gap 0): ECE = (10*0.45 + 10*0.45 + 0) / 40 = 0.225
    def rows(conf: float, n: int) -> np.ndarray:
        return np.tile([conf, 1 - conf], (n, 1))

    probs = np.vstack([rows(0.95, 10), rows(0.55, 10), rows(0.75, 20)])
    labels = np.array([0] * 5 + [1] * 5 + [0] * 10 + [0] * 15 + [1] * 5)
    rel = C.reliability(probs, labels)
    assert rel.count.sum() == 40 and (rel.count > 0).sum() == 3
    assert C.expected_calibration_error(probs, labels) == pytest.approx(0.225)
    assert C.expected_calibration_error(rows(0.8, 10), np.array([0] * 8 + [1] * 2)) == pytest.approx(0.0)


def test_temperature_in_card_is_applied_by_the_pipeline_classifier(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_inception_v3(3)
    # A random net with default BN statistics saturates its softmax: set the statistics from
    # inputs like the normalised crops (cumulative average) so the logits are moderate.
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 80, 80) * 4 - 2)
    model.eval()
    bundle = save_bundle(model, tiny_classifier_card(["a", "b", "c"]), tmp_path / "tiny.safetensors")
    assert bundle.temperature == 1.0
    cfg = ClassifierSpec(bundle=str(bundle.weights_path), input_px=80)
    crops = np.random.default_rng(1).integers(0, 255, (6, 80, 80, 3), dtype=np.uint8)
    raw = Classifier(bundle, cfg).predict(crops)
    cal = update_card(bundle, {"calibration": {"temperature": 0.5}})
    assert cal.sha256 == bundle.sha256 and cal.temperature == 0.5  # weights (and pins) unchanged
    tempered = Classifier(cal, cfg).predict(crops)
    np.testing.assert_allclose(tempered, C.scaled_probs(C.log_probs(raw), 0.5), atol=1e-5)
    assert (tempered.max(1) >= raw.max(1) - 1e-6).all() and not np.allclose(tempered, raw)
    with pytest.raises(ModelError, match="cannot be changed"):
        update_card(bundle, {"sha256": "0" * 64})
    bad = update_card(bundle, {"calibration": {"temperature": -1}})
    with pytest.raises(ModelError, match="temperature"):
        _ = bad.temperature


def test_calibrate_refuses_the_test_split(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="test split"):
        calibrate_classifier("pbc8", tmp_path, split="test")


@pytest.mark.shared_data
@pytest.mark.slow
def test_pbc8_card_temperature_reproduces_on_its_validation_split(tmp_path: Path, shared_data: Path) -> None:
    import shutil

    shipped = ModelBundle.load("pbc8")
    for f in (shipped.weights_path, shipped.card_path):
        shutil.copy(f, tmp_path / f.name)
    refit, block = calibrate_classifier(tmp_path / "pbc8.safetensors", shared_data / "pbc", threads=2)
    assert refit.sha256 == shipped.sha256
    assert block["temperature"] == pytest.approx(shipped.temperature, abs=2e-3)
    assert block["ece_calibrated"] < block["ece_raw"]


def test_min_confidence_sends_uncertain_cells_to_unclassified() -> None:
    from wsiflow.aggregate import summarize
    from wsiflow.cells import CellTable
    from wsiflow.config import load_pipeline

    probs = np.array([[0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.34, 0.33, 0.33]], np.float32)
    t = CellTable.empty(3)
    n = len(probs)
    cols = t.columns()
    for name, arr in cols.items():
        if name in ("poly_offsets",):
            cols[name] = np.zeros(n + 1, arr.dtype)
        elif name == "probs":
            cols[name] = np.zeros((n, 3), arr.dtype)
        elif name != "poly_xy":
            cols[name] = np.zeros((n, *arr.shape[1:]), arr.dtype)
    cols["id"] = np.arange(n, dtype=np.int64)
    table = CellTable(**cols).with_classes(probs, min_confidence=0.6)
    assert table.class_id.tolist() == [0, -1, 1, -1]
    assert CellTable(**cols).with_classes(probs).class_id.tolist() == [0, 0, 1, 0]
    # the unclassified cells are counted apart and left out of every fraction
    mds = load_pipeline("mds")
    s = summarize(np.array([0, 0, 3, -1, -1]), mds)
    assert s.n_unclassified == 2 and s.n_cells == 3


def test_min_confidence_is_validated() -> None:
    from pydantic import ValidationError

    ClassifierSpec(bundle="pbc8", input_px=112, min_confidence=0.5)
    with pytest.raises(ValidationError):
        ClassifierSpec(bundle="pbc8", input_px=112, min_confidence=1.5)

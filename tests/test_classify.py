"""Cell crops (bbox-square rule) and the Classifier wrapper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsiflow.classify import Classifier
from wsiflow.config import Classifier as ClassifierConfig
from wsiflow.crops import crop_cells
from wsiflow.errors import ModelError
from wsiflow.models.bundle import save_bundle
from wsiflow.models.inception import build_inception_v3


def _image() -> np.ndarray:
    yy, xx = np.mgrid[0:100, 0:120]
    return np.stack([xx * 2, yy * 2, (xx + yy) % 256], -1).astype(np.uint8)


def test_square_crop_in_level0_coordinates() -> None:
    img = _image()
    origin, scale = (1000.0, 2000.0), 2.0  # image px (x, y) ↔ level-0 (1000 + 2x, 2000 + 2y)
    bbox = np.array(
        [[1000 + 2 * 40, 2000 + 2 * 30, 1000 + 2 * 60, 2000 + 2 * 50]]
    )  # image box 40..60, 30..50
    crops = crop_cells(img, origin, scale, bbox, pad_px=0, out_px=20)
    assert crops.shape == (1, 20, 20, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops[0], img[30:50, 40:60])
    padded = crop_cells(img, origin, scale, bbox, pad_px=5, out_px=30)
    np.testing.assert_array_equal(padded[0], img[25:55, 35:65])


def test_non_square_box_is_squared_around_its_centre() -> None:
    img = _image()
    bbox = np.array([[40, 30, 60, 40]])  # 20 wide, 10 high, centre (50, 35)
    crop = crop_cells(img, (0.0, 0.0), 1.0, bbox, pad_px=0, out_px=20)[0]
    np.testing.assert_array_equal(crop, img[25:45, 40:60])


def test_outside_the_image_is_zero_padded() -> None:
    img = _image()
    bbox = np.array([[-10, -10, 10, 10], [110, 90, 130, 110]])
    crops = crop_cells(img, (0.0, 0.0), 1.0, bbox, pad_px=0, out_px=20)
    assert (crops[0, :10, :, :] == 0).all() and (crops[0, :, :10, :] == 0).all()
    np.testing.assert_array_equal(crops[0, 10:, 10:], img[:10, :10])
    assert (crops[1, 10:, :, :] == 0).all() and (crops[1, :, 10:, :] == 0).all()
    np.testing.assert_array_equal(crops[1, :10, :10], img[90:100, 110:120])


def test_resize_and_empty() -> None:
    img = _image()
    crops = crop_cells(img, (0.0, 0.0), 1.0, np.array([[10, 10, 50, 50]]), pad_px=0, out_px=80)
    assert crops.shape == (1, 80, 80, 3)
    assert crop_cells(img, (0.0, 0.0), 1.0, np.zeros((0, 4)), 0, 80).shape == (0, 80, 80, 3)


def test_classifier_predict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    card = {
        "name": "t",
        "task": "classifier",
        "architecture": "inception_v3",
        "kwargs": {"num_classes": 3, "aux_logits": False, "dropout": 0.5},
        "classes": [{"code": c} for c in "xyz"],
        "input_px": 80,
        "mpp": 0.4,
        "normalization": {"mean": [0.5] * 3, "std": [0.2] * 3},
        "training_data": {},
        "metrics": {},
        "split_seed": 0,
        "demo": True,
    }
    from wsiflow.models.bundle import ModelBundle

    bundle = save_bundle(build_inception_v3(3), card, tmp_path / "t.safetensors")
    clf = Classifier(
        ModelBundle.load(bundle.weights_path), ClassifierConfig(bundle="t", input_px=80, batch_size=3)
    )
    crops = np.random.default_rng(0).integers(0, 255, (7, 80, 80, 3), dtype=np.uint8)
    probs = clf.predict(crops)
    assert probs.shape == (7, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(clf.predict(crops[:2]), probs[:2], atol=1e-5)  # batching does not matter
    assert clf.predict(crops[:0]).shape == (0, 3)
    with pytest.raises(ModelError, match="trained at 80 px"):
        Classifier(bundle, ClassifierConfig(bundle="t", input_px=96))


def test_tta_is_rotation_invariant() -> None:
    from wsiflow.classify import predict_probs

    torch.manual_seed(1)
    model = build_inception_v3(3).eval()
    img = np.random.default_rng(2).integers(0, 255, (2, 80, 80, 3), dtype=np.uint8)
    turned = np.ascontiguousarray(np.rot90(img, 1, axes=(1, 2))[:, :, ::-1])  # rotate + mirror
    a = predict_probs(model, img, [0.5] * 3, [0.2] * 3, tta=True)
    b = predict_probs(model, turned, [0.5] * 3, [0.2] * 3, tta=True)
    np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-5)

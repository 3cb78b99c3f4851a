"""Cell crops (bbox-square rule) and the Classifier wrapper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsiflow.classify import Classifier
from wsiflow.config import ClassifierSpec
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


def test_bbox_zero_pad_is_the_box_on_black() -> None:
    """The seed's rule: the (padded) bounding box centred on a black square, no neighbours."""
    img = _image()
    bbox = np.array([[40, 30, 60, 40]])  # 20 wide, 10 high, centre (50, 35)
    crop = crop_cells(img, (0.0, 0.0), 1.0, bbox, pad_px=0, out_px=20, rule="bbox-zero-pad")[0]
    np.testing.assert_array_equal(crop[5:15], img[30:40, 40:60])  # the box, centred
    assert (crop[:5] == 0).all() and (crop[15:] == 0).all()  # black, not the rows around it
    square = crop_cells(img, (0.0, 0.0), 1.0, bbox, pad_px=0, out_px=20)[0]
    assert not (square[:5] == 0).all()  # bbox-square keeps the neighbouring rows
    padded = crop_cells(img, (0.0, 0.0), 1.0, bbox, pad_px=2, out_px=24, rule="bbox-zero-pad")[0]
    np.testing.assert_array_equal(padded[5:19], img[28:42, 38:62])
    assert (padded[:5] == 0).all() and (padded[19:] == 0).all()
    with pytest.raises(ValueError, match="unknown crop rule"):
        crop_cells(img, (0.0, 0.0), 1.0, bbox, 0, 20, rule="stretch")


def test_the_pipeline_config_takes_both_crop_rules() -> None:
    from wsiflow.config import Crop

    assert Crop().rule == "bbox-square"
    assert Crop(rule="bbox-zero-pad", pad_um=0).rule == "bbox-zero-pad"


def test_training_images_are_squared_not_stretched(tmp_path: Path) -> None:
    """train/data.py used to stretch a non-square field to a square; now it is centred on
    black, the square a crop rule makes, then resized."""
    from PIL import Image

    from wsiflow.train.data import load_image

    field = np.full((40, 80, 3), 200, np.uint8)
    field[:, :40] = (10, 20, 30)
    Image.fromarray(field).save(tmp_path / "f.png")
    got = load_image(tmp_path / "f.png", 80)
    assert got.shape == (80, 80, 3)
    assert (got[:18] == 0).all() and (got[62:] == 0).all()  # black above and below the 40-px field
    assert np.abs(got[25:55, 5:35].astype(int) - (10, 20, 30)).max() <= 1
    assert np.abs(got[25:55, 45:75].astype(int) - 200).max() <= 1


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
        ModelBundle.load(bundle.weights_path), ClassifierSpec(bundle="t", input_px=80, batch_size=3)
    )
    crops = np.random.default_rng(0).integers(0, 255, (7, 80, 80, 3), dtype=np.uint8)
    probs = clf.predict(crops)
    assert probs.shape == (7, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(clf.predict(crops[:2]), probs[:2], atol=1e-5)  # batching does not matter
    assert clf.predict(crops[:0]).shape == (0, 3)
    with pytest.raises(ModelError, match="trained at 80 px"):
        Classifier(bundle, ClassifierSpec(bundle="t", input_px=96))


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


def test_training_crops_are_made_as_the_pipeline_makes_them(tmp_path: Path, standin_models) -> None:
    """FieldCropper: the pipeline's segmenter finds the field's centre cell, its crop rule
    crops it (bbox-zero-pad here: an elongated cell gets black bands, no neighbours);
    load_images uses those crops, and a field without a cell stays whole."""
    from PIL import Image
    from standins import BACKGROUND, NUCLEUS, standin_pipeline

    from wsiflow.config import parse_pipeline
    from wsiflow.train.data import load_images
    from wsiflow.train.field_crops import FieldCropper

    data = standin_pipeline(*standin_models)
    data["classifier"]["crop"] = {"rule": "bbox-zero-pad", "pad_um": 0.0}
    pipe = parse_pipeline(data)
    yy, xx = np.mgrid[0:120, 0:120]
    field = np.empty((120, 120, 3), np.uint8)
    field[:] = BACKGROUND
    field[((xx + 0.5 - 60) / 16) ** 2 + ((yy + 0.5 - 60) / 7) ** 2 <= 1] = NUCLEUS  # 32 × 14 px, centred
    field[(xx + 0.5 - 12) ** 2 + (yy + 0.5 - 12) ** 2 <= 64] = (30, 160, 40)  # a neighbour in a corner
    crop = FieldCropper(pipe, field_mpp=0.5, input_px=75)
    out = crop(field)
    assert out is not None and out.shape == (75, 75, 3)
    assert (out[:15] == 0).all() and (out[-15:] == 0).all()  # black above and below the wide box
    assert np.abs(out[37, 37].astype(int) - NUCLEUS).max() <= 10  # the centre cell, not the corner one
    assert crop(np.full((120, 120, 3), BACKGROUND, np.uint8)) is None and crop.missed == 1
    Image.fromarray(field).save(tmp_path / "a.png")
    Image.fromarray(np.full((120, 120, 3), BACKGROUND, np.uint8)).save(tmp_path / "empty.png")
    imgs = load_images([tmp_path / "a.png", tmp_path / "empty.png"], 75, cropper=crop)
    assert np.array_equal(imgs[0], out)
    assert (imgs[1] == BACKGROUND).all()  # no cell: the whole field
    assert "bbox-zero-pad" in crop.describe() and "2 of 4 field(s) without a detected cell" in crop.describe()

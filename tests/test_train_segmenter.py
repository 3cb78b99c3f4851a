"""Segmenter training: mask reading conventions, and a smoke run on generated masks that learns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsiflow.errors import ConfigError
from wsiflow.models.bundle import ModelBundle
from wsiflow.train.seg_data import SegDataError, find_pairs, read_mask, write_generated
from wsiflow.train.segmenter import TrainSegmenterConfig, dice_bce_loss, dice_iou, train_segmenter


def test_mask_conventions(tmp_path: Path) -> None:
    m = np.zeros((10, 10), np.uint8)
    m[2:8, 2:8] = 128
    m[4:6, 4:6] = 255
    Image.fromarray(m).save(tmp_path / "three.png")
    cell, nuc = read_mask(tmp_path / "three.png")
    assert cell.sum() == 36 and nuc is not None and nuc.sum() == 4
    b = np.where(m > 0, 255, 0).astype(np.uint8)
    Image.fromarray(b).save(tmp_path / "binary.png")
    cell, nuc = read_mask(tmp_path / "binary.png")
    assert cell.sum() == 36 and nuc is None  # a two-level mask says nothing about nuclei


def test_pairs_missing_mask(tmp_path: Path) -> None:
    write_generated(tmp_path, 3, size=32)
    (tmp_path / "masks" / "gen_00001.png").unlink()
    with pytest.raises(SegDataError, match="no mask"):
        find_pairs(tmp_path / "images", tmp_path / "masks")


def test_dice_iou_values() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 px
    b[1:3] = True  # 8 px, 4 shared
    assert dice_iou(a, b) == pytest.approx((0.5, 1 / 3))
    assert dice_iou(a & False, b & False) == (1.0, 1.0)


def test_training_smoke_reduces_loss(tmp_path: Path) -> None:
    write_generated(tmp_path / "data", 40, size=48, seed=1)
    events: list[tuple[str, dict]] = []
    cfg = TrainSegmenterConfig(
        images=tmp_path / "data" / "images",
        masks=tmp_path / "data" / "masks",
        out=tmp_path / "seg.safetensors",
        mpp=0.5,
        depth=2,
        width=6,
        crop=32,
        batch_size=8,
        epochs=6,
        lr=1e-2,
        schedule="constant",
        val_fraction=0.2,
        threads=1,
        device="cpu",
    )
    bundle = train_segmenter(cfg, lambda e, i: events.append((e, i)))
    epochs = [i for e, i in events if e == "epoch"]
    assert len(epochs) == 6
    assert epochs[-1]["train_loss"] < 0.7 * epochs[0]["train_loss"]
    assert max(e["val_dice"] for e in epochs) > 0.6
    loaded = ModelBundle.load(bundle.weights_path)
    assert loaded.task == "segmenter" and loaded.class_codes == ("cell", "nucleus")
    assert loaded.card["kwargs"]["out_ch"] == 2 and loaded.mpp == 0.5
    split = json.loads((tmp_path / "seg.safetensors.train" / "split.json").read_text())
    assert len(split["val"]) == 8 and not set(split["val"]) & set(split["train"])
    # resuming a finished run trains no further epoch and gives the same best epoch
    events.clear()
    train_segmenter(cfg, lambda e, i: events.append((e, i)))
    assert any(e == "resume" for e, _ in events) and not any(e == "epoch" for e, _ in events)


def _tiny(tmp_path: Path) -> dict[str, object]:
    """A one-epoch, two-level U-Net on the generated fields in ``tmp_path/data``."""
    return dict(
        images=tmp_path / "data" / "images",
        masks=tmp_path / "data" / "masks",
        mpp=0.5,
        depth=2,
        width=4,
        crop=32,
        batch_size=4,
        epochs=1,
        val_fraction=0.25,
        threads=1,
        device="cpu",
    )


def test_unlabelled_pixels_carry_no_loss() -> None:
    logits = torch.randn(2, 1, 16, 16)
    target = (torch.rand(2, 1, 16, 16) > 0.5).float()
    known = torch.ones(2, 1, 16, 16)
    known[:, :, :, 8:] = 0
    base = dice_bce_loss(logits, target, None, known)
    changed = logits.clone()
    changed[:, :, :, 8:] = 50.0  # confident nonsense where nobody annotated
    assert float(dice_bce_loss(changed, target, None, known)) == pytest.approx(float(base), rel=1e-6)
    assert float(dice_bce_loss(changed, target)) != pytest.approx(float(dice_bce_loss(logits, target)))
    # all known: the same loss as without the map
    assert float(dice_bce_loss(logits, target, None, torch.ones_like(known))) == pytest.approx(
        float(dice_bce_loss(logits, target)), rel=1e-5
    )


def test_partial_masks_train_and_bad_unlabelled_mask_is_one_line(tmp_path: Path) -> None:
    write_generated(tmp_path / "data", 12, size=40, seed=3)
    unl = tmp_path / "unlabelled"
    unl.mkdir()
    for p in sorted((tmp_path / "data" / "masks").iterdir())[:6]:
        m = np.zeros((40, 40), np.uint8)
        m[:, 20:] = 255  # right half of these fields not annotated
        Image.fromarray(m).save(unl / p.name)
    base = {**_tiny(tmp_path), "unlabelled": unl}
    b = train_segmenter(TrainSegmenterConfig(out=tmp_path / "p.safetensors", **base))  # type: ignore[arg-type]
    assert "unlabelled pixels left out" in b.card["training"]["loss"]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(unl / sorted(unl.iterdir())[0].name)
    bad = r"unlabelled mask is \(10, 10\) px but the image is \(40, 40\) px"
    with pytest.raises(SegDataError, match=bad):
        train_segmenter(TrainSegmenterConfig(out=tmp_path / "q.safetensors", resume=False, **base))  # type: ignore[arg-type]


def test_init_starts_from_a_bundle(tmp_path: Path) -> None:
    write_generated(tmp_path / "data", 12, size=40, seed=2)
    base = _tiny(tmp_path)
    first = train_segmenter(TrainSegmenterConfig(out=tmp_path / "a.safetensors", **base))  # type: ignore[arg-type]
    # zero learning rate: the fine-tuned bundle keeps the initial weights and normalisation
    tuned = train_segmenter(
        TrainSegmenterConfig(
            out=tmp_path / "b.safetensors",
            init_from=str(first.weights_path),
            lr=0.0,
            weight_decay=0.0,
            **base,
        )  # type: ignore[arg-type]
    )
    assert tuned.card["training"]["initialised_from"] == {
        "bundle": "a",
        "sha256": first.sha256,
        "initialised_from": None,
    }
    assert tuned.mean == first.mean and tuned.std == first.std
    wa = first.build("cpu").state_dict()
    wb = tuned.build("cpu").state_dict()
    conv = [k for k in wa if k.endswith("weight") and wa[k].ndim == 4]
    assert conv and all(bool((wa[k] == wb[k]).all()) for k in conv)
    with pytest.raises(ConfigError, match="init_from"):
        train_segmenter(
            TrainSegmenterConfig(
                out=tmp_path / "c.safetensors", init_from=str(first.weights_path), **{**base, "width": 6}
            )  # type: ignore[arg-type]
        )

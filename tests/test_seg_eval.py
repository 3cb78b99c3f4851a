"""Segmenter evaluation: pooled Dice/IoU and BCCD-style box recall/precision on known inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsiflow.config import SegmenterSpec
from wsiflow.segment import instances_from_probs
from wsiflow.train.seg_eval import _pool, evaluate_bccd, evaluate_masks


class FakeSeg:
    """Predicts a fixed disc (centre 20,20, r 8) whatever the image."""

    cfg = SegmenterSpec(bundle="x", min_area_um2=1, max_area_um2=1e6)
    mpp = 0.5

    def probabilities(self, rgb: np.ndarray, mpp: float | None = None) -> np.ndarray:
        yy, xx = np.indices(rgb.shape[:2])
        return (((xx - 20) ** 2 + (yy - 20) ** 2) <= 64).astype(np.float32)

    def probability_maps(self, rgb: np.ndarray, mpp: float | None = None) -> tuple[np.ndarray, None]:
        return self.probabilities(rgb, mpp), None

    def segment(self, rgb, origin_xy, scale, mpp):
        return instances_from_probs(self.probabilities(rgb), None, self.cfg, origin_xy, scale, mpp, rgb=rgb)


def _field(h: int, w: int) -> np.ndarray:
    """A dark noisy field: image content the fake segmenter ignores, but not plain (a plain
    image is all padding, where no cell is built)."""
    return np.random.default_rng(0).integers(0, 60, (h, w, 3)).astype(np.uint8)


def test_masks_dice_pooled(tmp_path: Path) -> None:
    yy, xx = np.indices((40, 40))
    disc = ((xx - 20) ** 2 + (yy - 20) ** 2) <= 64
    half = disc & (xx < 20)
    for name, m in [("a", disc), ("b", half)]:
        Image.fromarray(_field(40, 40)).save(tmp_path / f"{name}.bmp")
        Image.fromarray(np.where(m, 255, 0).astype(np.uint8)).save(tmp_path / f"{name}.png")
    pairs = [(tmp_path / "a.bmp", tmp_path / "a.png"), (tmp_path / "b.bmp", tmp_path / "b.png")]
    rows = evaluate_masks(FakeSeg(), pairs, 0.5)  # type: ignore[arg-type]
    nd, nh = int(disc.sum()), int(half.sum())
    # the cell channel thresholded: exactly the disc
    assert rows[0]["dice_channel"] == pytest.approx(1.0)
    assert rows[1]["dice_channel"] == pytest.approx(2 * nh / (nd + nh))
    # the output cells: the disc's outline (simplified polygon) drawn back
    assert rows[0]["dice"] == pytest.approx(1.0, abs=0.03)
    assert rows[1]["dice"] == pytest.approx(2 * nh / (nd + nh), abs=0.03)
    pooled = _pool(rows)
    assert pooled["dice_channel"] == pytest.approx(2 * (nd + nh) / (2 * nd + nd + nh))
    assert pooled["iou_channel"] == pytest.approx((nd + nh) / (2 * nd))
    assert pooled["dice"] == pytest.approx(pooled["dice_channel"], abs=0.03)


def test_masks_dice_scores_the_output_cells_not_the_channel(tmp_path: Path) -> None:
    # the cell channel sees only the dark nucleus (r 6); the pale blue cytoplasm around it
    # (r 10) is in the expert mask. With cytoplasm growth the output cells reach it, so their
    # Dice rises while the channel's stays
    from wsiflow.config import Cytoplasm

    yy, xx = np.indices((40, 40))
    r2 = (xx - 20) ** 2 + (yy - 20) ** 2
    rgb = np.empty((40, 40, 3), np.uint8)
    rgb[:] = (230, 226, 236)
    rgb[r2 <= 100] = (185, 195, 228)
    rgb[r2 <= 36] = (90, 60, 140)
    Image.fromarray(rgb).save(tmp_path / "c.bmp")
    Image.fromarray(np.where(r2 <= 100, 255, 0).astype(np.uint8)).save(tmp_path / "c.png")

    class NucleusOnly(FakeSeg):
        cfg = SegmenterSpec(bundle="x", min_area_um2=1, max_area_um2=1e6, cytoplasm=Cytoplasm(max_um=3.0))

        def probabilities(self, rgb: np.ndarray, mpp: float | None = None) -> np.ndarray:
            return (r2 <= 36).astype(np.float32)

    row = evaluate_masks(NucleusOnly(), [(tmp_path / "c.bmp", tmp_path / "c.png")], 0.5)[0]  # type: ignore[arg-type]
    assert row["dice_channel"] == pytest.approx(2 * 113 / (113 + 317), abs=0.03)
    assert row["dice"] > 0.95


def test_bccd_recall_precision(tmp_path: Path) -> None:
    root = tmp_path / "bccd"
    for d in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / d).mkdir(parents=True)
    (root / "ImageSets/Main/test.txt").write_text("im1\nim2\n")
    boxes = {
        "im1": [("WBC", (10, 10, 30, 30))],
        "im2": [("WBC", (50, 50, 70, 70)), ("Platelets", (12, 12, 28, 28))],
    }
    for stem, objs in boxes.items():
        Image.fromarray(_field(80, 80)).save(root / "JPEGImages" / f"{stem}.jpg")
        xml = "".join(
            f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
            f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for n, b in objs
        )
        (root / "Annotations" / f"{stem}.xml").write_text(f"<annotation>{xml}</annotation>")
    res = evaluate_bccd(FakeSeg(), root, "test", 0.5)  # type: ignore[arg-type]
    # the fake detection at (20, 20) hits im1's WBC box, and misses im2's (it sits in a platelet box)
    assert res["wbc_boxes"] == 3 - 1 and res["detections"] == 2
    assert res["recall"] == pytest.approx(0.5) and res["precision"] == pytest.approx(0.5)
    assert res["false_detections_in_platelet_boxes"] == 1


def test_bccd_reviewed_points_and_detections_pair_one_to_one(tmp_path: Path) -> None:
    root = tmp_path / "bccd"
    for d in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / d).mkdir(parents=True)
    (root / "ImageSets/Main/test.txt").write_text("im1\n")
    Image.fromarray(_field(80, 80)).save(root / "JPEGImages" / "im1.jpg")
    (root / "Annotations" / "im1.xml").write_text("<annotation></annotation>")  # no WBC boxed
    plain = evaluate_bccd(FakeSeg(), root, "test", 0.5)  # type: ignore[arg-type]
    assert plain["precision"] == 0.0 and "precision_reviewed" not in plain
    [row] = plain["per_image"]
    [(x, y)] = row["unmatched_xy"]
    far = evaluate_bccd(FakeSeg(), root, "test", 0.5, {"im1": [(x + 50, y)]})  # type: ignore[arg-type]
    assert far["precision_reviewed"] == 0.0 and far["reviewed_unboxed_wbc"] == 0
    near = evaluate_bccd(FakeSeg(), root, "test", 0.5, {"im1": [(x + 5, y), (x - 5, y)]})  # type: ignore[arg-type]
    # two reviewed points on one detection: it counts once
    assert near["reviewed_unboxed_wbc"] == 1 and near["precision_reviewed"] == 1.0
    assert near["precision"] == 0.0

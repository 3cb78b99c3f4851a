"""Partial-mask segmenter evaluation (SegPC layout): matching rules, letterbox band, fixed split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsiflow.config import SegmenterSpec
from wsiflow.segment import instances_from_probs
from wsiflow.train.seg_partial import (
    band_rows,
    evaluate_partial,
    nuclei_in_masks,
    partial_split,
    rasterise,
    score_field,
    truth_cells,
)


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.indices(shape)
    return ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r


def test_band_rows() -> None:
    rgb = np.full((100, 80, 3), 200, np.uint8)
    rgb[20:90] = np.random.default_rng(0).integers(0, 255, (70, 80, 3))
    assert band_rows(rgb) == (20, 10)
    assert band_rows(np.random.default_rng(1).integers(0, 255, (30, 30, 3)).astype(np.uint8)) == (0, 0)


def test_truth_cells_drop_specks_and_fill_holes() -> None:
    m = _disc((60, 60), 30, 30, 10)
    m[30, 30] = False  # a hole
    m[2, 2] = True  # a JPEG speck (0.25 µm²)
    lab = truth_cells(m, 0.5)
    assert lab.max() == 1 and lab[30, 30] == 1 and lab[2, 2] == 0


def test_score_field_found_one_to_one_merged_band() -> None:
    shape = (100, 100)
    truth = np.zeros(shape, np.int32)
    truth[_disc(shape, 50, 20, 8)] = 1  # matched well by one detection
    truth[_disc(shape, 50, 50, 8)] = 2  # split into two detections: found, not one to one
    truth[_disc(shape, 50, 80, 8)] = 3  # missed
    det = np.zeros(shape, np.int32)
    det[_disc(shape, 50, 20, 8)] = 1
    det[_disc(shape, 50, 50, 8) & (np.indices(shape)[1] < 50)] = 2
    det[_disc(shape, 50, 50, 8) & (np.indices(shape)[1] >= 50)] = 3
    det[_disc(shape, 4, 50, 3)] = 4  # on the band (rows 0-9)
    cent = np.array([[20.5, 50.5], [46.0, 50.5], [54.0, 50.5], [50.5, 4.5]])
    s = score_field(det, cent, truth, (10, 0), 0.5)
    assert (s.masked, s.found, s.one_to_one) == (3, 2, 1)
    assert s.band_detections == 1 and s.unmatched == 0 and s.detections == 4
    # one detection merging two masked cells has IoU < 0.5 with each: found twice, never one to one
    merged = np.zeros(shape, np.int32)
    merged[(truth == 1) | (truth == 2) | (_disc(shape, 50, 35, 6))] = 1
    s2 = score_field(merged, np.array([[35.0, 50.0]]), truth, (0, 0), 0.5)
    assert s2.found == 0 or s2.one_to_one == 0


def test_rasterise_matches_instances() -> None:
    prob = _disc((64, 64), 30, 30, 12).astype(np.float32)
    cfg = SegmenterSpec(bundle="x", min_area_um2=1, max_area_um2=1e6, simplify_um=0)
    table, _ = instances_from_probs(prob, None, cfg, (0.0, 0.0), 1.0, 0.5)
    det = rasterise(table.poly_offsets, table.poly_xy, (64, 64))
    inter = ((det == 1) & (prob > 0.5)).sum()
    assert inter / ((det == 1) | (prob > 0.5)).sum() > 0.9


def test_split_fixed_and_half() -> None:
    names = [f"{i}" for i in range(11)]
    a = partial_split(names)
    assert a == partial_split(list(reversed(names)))  # order-independent
    assert sum(v == "test" for v in a.values()) == 6
    assert partial_split(names, seed=1) != a


class FakeSeg:
    """Finds one disc (centre 40,40, r 10 at the field's px) whatever the image."""

    cfg = SegmenterSpec(bundle="x", min_area_um2=1, max_area_um2=1e6, simplify_um=0)
    mpp = 0.5

    def segment(self, rgb, origin_xy, scale, mpp):  # type: ignore[no-untyped-def]
        h, w = rgb.shape[:2]
        prob = _disc((h, w), 40 / scale, 40 / scale, 10 / scale).astype(np.float32)
        return instances_from_probs(prob, None, self.cfg, origin_xy, scale, mpp)


def test_nuclei_in_masks_counts_dark_nuclei_per_mask() -> None:
    # at 0.5 µm/px: mask 1 holds two purple nuclei (two touching cells in one mask), mask 2
    # one, mask 3 only pale cytoplasm; a purple speck (2 µm²) in mask 2 is below MIN_NUCLEUS_UM2
    shape = (60, 120)
    rgb = np.empty((*shape, 3), np.uint8)
    rgb[:] = (230, 226, 236)
    truth = np.zeros(shape, np.int32)
    for k, cx in enumerate((20, 60, 100), start=1):
        cell = _disc(shape, 30, cx, 16)
        truth[cell] = k
        rgb[cell] = (185, 195, 228)
    for cy, cx, r in ((30, 12, 6), (30, 28, 6), (30, 60, 7), (18, 66, 1.2)):
        rgb[_disc(shape, cy, cx, r)] = (90, 60, 140)
    assert nuclei_in_masks(rgb, truth, 0.5).tolist() == [2, 1, 0]
    assert nuclei_in_masks(rgb, np.zeros(shape, np.int32), 0.5).tolist() == []


def test_evaluate_partial_layout(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(4):
        rgb = np.full((100, 100, 3), 210, np.uint8)
        rgb[10:90] = np.random.default_rng(i).integers(60, 180, (80, 100, 3))
        mask = np.zeros((100, 100), np.uint8)
        mask[_disc((100, 100), 40, 40, 10)] = 255
        mask[_disc((100, 100), 70, 75, 8)] = 255  # never detected
        # two cells joined in one mask by a thin bridge (a merged suspect), never detected
        mask[_disc((100, 100), 15, 70, 6) | _disc((100, 100), 33, 70, 6)] = 255
        mask[15:33, 69:71] = 255
        Image.fromarray(rgb).save(tmp_path / "images" / f"{i}.jpg")
        Image.fromarray(mask).save(tmp_path / "masks" / f"{i}.jpg")
    res = evaluate_partial(FakeSeg(), tmp_path, 0.5, "all")  # type: ignore[arg-type]
    assert res["n_images"] == 4 and res["masked_cells"] == 12 and res["merged_suspects"] == 4
    assert res["recall"] == pytest.approx(1 / 3) and res["one_to_one"] == pytest.approx(1 / 3)
    assert res["one_to_one_single_masks"] == pytest.approx(0.5)  # the merged masks left out
    assert res["band_detections"] == 0
    test = evaluate_partial(FakeSeg(), tmp_path, 0.5, "test")  # type: ignore[arg-type]
    tune = evaluate_partial(FakeSeg(), tmp_path, 0.5, "tune")  # type: ignore[arg-type]
    assert test["n_images"] + tune["n_images"] == 4 and test["n_images"] == 2

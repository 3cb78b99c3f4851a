"""The segmenter's border context (issue 15 §1): measured, stored in the cards, and the
pipelines' halos checked against it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from wsiflow.config import load_pipeline, parse_pipeline, shipped_pipelines
from wsiflow.errors import ConfigError
from wsiflow.models.bundle import ModelBundle, check_halo
from wsiflow.train.seg_context import context_profile

WEIGHTS = Path(__file__).resolve().parents[1] / "wsiflow" / "weights"


def _image(n: int = 160) -> np.ndarray:
    return (np.random.default_rng(0).random((n, n, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("k", [0, 5, 12])
def test_context_of_a_known_filter_is_its_radius(k: int) -> None:
    """A (2k+1)² mean filter sees k px past any pixel: cutting changes nothing farther."""

    def maps(rgb: np.ndarray) -> tuple[np.ndarray, None]:
        grey = rgb.astype(np.float32).mean(axis=2) / 255
        return (ndi.uniform_filter(grey, size=2 * k + 1, mode="nearest") if k else grey), None

    prof = context_profile(maps, _image(), mpp=0.5, tol=1e-6)
    assert prof.context_px == k and prof.context_um == k * 0.5
    if k:
        assert prof.at(0) > 1e-3 and prof.at(k) < 1e-6


def test_shipped_segmenters_carry_their_measured_context() -> None:
    for name in ("demo-seg", "smear-seg"):
        card = json.loads((WEIGHTS / f"{name}.json").read_text())
        assert card["task"] == "segmenter" and card["context_um"] > 0 and card["context_tol"] == 1e-3
        assert "python -m wsiflow.train.seg_context" in card["context_measured"]


def test_every_shipped_pipeline_halo_covers_half_an_object_plus_the_context() -> None:
    for name in shipped_pipelines():
        p = load_pipeline(name)
        card = ModelBundle.load(p.segmenter.bundle, p.segmenter.sha256).card
        if card.get("context_um") is None:
            pytest.fail(f"{name}: segmenter {card['name']!r} has no measured context_um in its card")
        check_halo(card, p)  # raises when too small or off the pooling grid
        assert p.tiling.halo_um >= p.tiling.max_object_um / 2 + card["context_um"]


def test_a_halo_without_the_context_is_refused() -> None:
    data = load_pipeline("mds").model_dump()
    card = ModelBundle.load("demo-seg").card
    data["tiling"]["halo_um"] = 64.0  # > 100 / 2, so the pipeline alone validates (mds's old halo)
    with pytest.raises(ConfigError, match=r"tiling\.halo_um: 64 µm is less than max_object_um / 2"):
        check_halo(card, parse_pipeline(data))
    data["tiling"]["halo_um"] = 100.0  # enough, but 200 px is not a multiple of 16
    with pytest.raises(ConfigError, match=r"tiling\.halo_um: 100 µm is 200 px .* multiple of 16 px"):
        check_halo(card, parse_pipeline(data))


@pytest.mark.slow
def test_demo_seg_context_is_what_its_card_says() -> None:
    """Re-measure demo-seg on a generated smear: within 8 µm of the stored value."""
    from wsiflow.config import SegmenterSpec
    from wsiflow.segment import Segmenter
    from wsiflow.synth import SynthParams
    from wsiflow.synth.slide import SyntheticSlide

    slide = SyntheticSlide.generate(SynthParams(width=480, height=480, mpp=0.5, seed=3, cells_per_mm2=4000))
    seg = Segmenter("demo-seg", SegmenterSpec(bundle="demo-seg"))
    prof = context_profile(seg.probability_maps, slide.region(0, 0, 480, 480), seg.mpp, cuts=(0.5,), align=16)
    stored = seg.bundle.card["context_um"]
    assert abs(prof.context_um - stored) <= 8.0, (prof.context_um, stored)

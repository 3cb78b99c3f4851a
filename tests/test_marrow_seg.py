"""The real-pixel marrow segmenter: `mds` uses it, the demo keeps its own pipeline, and on real
marrow fields (SegPC, held-out split; skipped without ../shared/data) it finds the plasma cells
and nothing on the letterbox band."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from wsiflow.config import load_pipeline
from wsiflow.models.bundle import ModelBundle

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SEGPC = DATA / "segpc-marrow"


def test_mds_segments_with_the_real_pixel_bundle() -> None:
    pipe = load_pipeline("mds")
    b = ModelBundle.load(pipe.segmenter.bundle, pipe.segmenter.sha256)
    assert b.name == "marrow-seg" and not b.card.get("demo", False)
    assert b.mpp == pipe.resolution.seg_mpp
    # shipped weights carry no non-commercial terms: SegPC was used for evaluation only
    data = b.card["training_data"]
    assert "segpc" not in data["name"].lower() and "segpc" not in data["description"].lower()
    assert "(CC BY-NC-SA 4.0) NOT trained on" in data["licence"]


def test_demo_keeps_the_generated_cell_models() -> None:
    from wsiflow.cli.demo import demo

    default = inspect.signature(demo).parameters["pipeline"].default
    assert getattr(default, "default", default) == "mds-demo"
    demo_pipe = load_pipeline("mds-demo")
    assert demo_pipe.segmenter.bundle == "demo-seg" and demo_pipe.classifier.bundle == "mds-demo"
    assert ModelBundle.load("demo-seg", demo_pipe.segmenter.sha256).card["demo"] is True
    # the same taxonomy, WHO rules and tiling as mds: only the segmenter differs
    mds = load_pipeline("mds")
    assert demo_pipe.taxonomy == mds.taxonomy and demo_pipe.who == mds.who
    assert demo_pipe.classifier == mds.classifier


def _fields(dst: Path, names: list[str]) -> Path:
    for sub in ("images", "masks"):
        (dst / sub).mkdir(parents=True)
        for n in names:
            (dst / sub / f"{n}.jpg").symlink_to(SEGPC / sub / f"{n}.jpg")
    return dst


@pytest.mark.skipif(not SEGPC.is_dir(), reason="../shared/data/segpc-marrow not present")
def test_marrow_seg_on_held_out_segpc_fields(tmp_path: Path) -> None:
    import torch

    from wsiflow.segment import Segmenter
    from wsiflow.train.seg_partial import evaluate_partial, partial_split

    torch.set_num_threads(1)
    names = sorted(p.stem for p in (SEGPC / "images").iterdir())
    held = [n for n in names if partial_split(names)[n] == "test"]
    pipe = load_pipeline("mds")
    seg = Segmenter(ModelBundle.load(pipe.segmenter.bundle, pipe.segmenter.sha256), pipe.segmenter)
    res = evaluate_partial(seg, _fields(tmp_path / "a", held[:12]), 0.175, "all")
    assert res["n_images"] == 12 and res["masked_cells"] > 30
    assert res["recall"] >= 0.85
    assert res["band_detections"] == 0
    # the cytoplasm growth reaches the plasma cells' pale cytoplasm: more of them matched with
    # IoU >= 0.5 than by the cell channel's outlines alone (same weights), on 24 other fields
    assert pipe.segmenter.cytoplasm is not None
    plain = Segmenter(seg.bundle, pipe.segmenter.model_copy(update={"cytoplasm": None}))
    more = _fields(tmp_path / "b", held[12:36])
    grown, res0 = evaluate_partial(seg, more, 0.175, "all"), evaluate_partial(plain, more, 0.175, "all")
    assert grown["one_to_one"] >= res0["one_to_one"] + 0.05
    assert grown["median_best_iou"] >= res0["median_best_iou"] + 0.04


@pytest.mark.skipif(not SEGPC.is_dir(), reason="../shared/data/segpc-marrow not present")
def test_a_cell_cut_by_the_letterbox_is_not_a_detection_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Field 1864 (held out): a plasma cell cut by the band's edge. The U-Net's context carries
    its outline onto the plain band, and its centroid with it; the plain-border trim keeps only
    the cell's visible part."""
    import numpy as np
    import torch

    from wsiflow import segment
    from wsiflow.segment import Segmenter
    from wsiflow.train.seg_partial import evaluate_partial

    torch.set_num_threads(1)
    pipe = load_pipeline("mds")
    seg = Segmenter(ModelBundle.load(pipe.segmenter.bundle, pipe.segmenter.sha256), pipe.segmenter)
    field = _fields(tmp_path / "f", ["1864"])
    trimmed = evaluate_partial(seg, field, 0.175, "all")
    assert trimmed["band_detections"] == 0 and trimmed["recall"] == 1.0
    monkeypatch.setattr(segment, "plain_border", lambda rgb: np.zeros(rgb.shape[:2], bool))
    assert evaluate_partial(seg, field, 0.175, "all")["band_detections"] == 1

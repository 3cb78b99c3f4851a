"""Labelled training data from generated slides, for the demo bundles.

* :func:`classifier_dataset` — one folder per class of cell crops made exactly as the
  pipeline makes them: the slide region at ``cls_mpp`` after a JPEG round trip (the slide's
  tiles are JPEG), the cell's bounding box (from its true outline, each side jittered by up
  to ``jitter_um`` as a segmenter would), then :func:`wsiflow.crops.crop_cells` with the
  pipeline's rule (pad, square, zero-pad, resize to ``input_px``).
* :func:`segmenter_dataset` — ``images/`` and ``masks/`` tiles at ``seg_mpp`` (masks 0/255:
  nucleus ∪ cytoplasm, with a one-pixel gap where two cells touch, so a U-Net learns to keep
  touching cells apart).

Run ``python -m wsiflow.synth.crops --help``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from wsiflow.atomic import atomic_path, atomic_write_bytes
from wsiflow.synth.cells import CLASS_CODES
from wsiflow.synth.layout import SynthParams
from wsiflow.synth.slide import SyntheticSlide


def jpeg_roundtrip(rgb: NDArray[np.uint8], quality: int = 90) -> NDArray[np.uint8]:
    import imagecodecs

    return np.asarray(imagecodecs.jpeg_decode(imagecodecs.jpeg_encode(rgb, level=quality)), np.uint8)


def _save_png(path: Path, img: NDArray[np.uint8]) -> None:
    with atomic_path(path, fsync=False) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def balanced_params(seed: int, per_class: int, size: int = 6000, mpp: float = 0.25) -> SynthParams:
    return SynthParams(
        width=size, height=size, mpp=mpp, seed=seed, class_counts=dict.fromkeys(CLASS_CODES, per_class)
    )


def classifier_dataset(
    out: str | os.PathLike[str],
    seeds: Sequence[int],
    per_class: int,
    input_px: int = 128,
    pad_um: float = 1.0,
    cls_mpp: float = 0.25,
    jitter_um: float = 1.0,
    size: int = 6000,
    crop_rule: str = "bbox-square",
) -> dict[str, int]:
    """Write ``out/<class>/s<seed>_<cell>.png`` crops (by the pipeline's ``crop_rule``, so
    the classifier learns from what inference feeds it); returns counts per class."""
    from wsiflow.crops import crop_cells

    root = Path(out)
    for c in CLASS_CODES:
        (root / c).mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(CLASS_CODES, 0)
    for seed in seeds:
        slide = SyntheticSlide.generate(balanced_params(seed, per_class, size, cls_mpp))
        img = jpeg_roundtrip(slide.region(0, 0, *slide.size))
        rng = np.random.default_rng(seed + 1_000_003)
        lay = slide.layout
        boxes = np.zeros((len(lay), 4))
        for i in range(len(lay)):
            poly = lay.design(i).polygon()
            boxes[i] = [poly[:, 0].min(), poly[:, 1].min(), poly[:, 0].max(), poly[:, 1].max()]
        boxes += rng.uniform(-jitter_um, jitter_um, boxes.shape) / cls_mpp
        crops = crop_cells(img, (0.0, 0.0), 1.0, boxes, pad_um / cls_mpp, input_px, crop_rule)
        for i, crop in enumerate(crops):
            code = CLASS_CODES[int(lay.class_idx[i])]
            _save_png(root / code / f"s{seed}_{i:05d}.png", crop)
            counts[code] += 1
    return counts


def instance_mask(labels: NDArray[np.int32]) -> NDArray[np.bool_]:
    """Cells as foreground, with a one-pixel gap wherever two different cells touch."""
    fg = labels > 0
    edge = np.zeros_like(fg)
    for a, b in ((labels[1:], labels[:-1]), (labels[:, 1:], labels[:, :-1])):
        touch = (a != b) & (a > 0) & (b > 0)
        if a.shape[0] != labels.shape[0]:
            edge[1:] |= touch
        else:
            edge[:, 1:] |= touch
    return fg & ~edge


def _reduce(img: NDArray[np.floating] | NDArray[np.integer], f: int) -> NDArray[np.float32]:
    h, w = img.shape[0] // f * f, img.shape[1] // f * f
    x = img[:h, :w].astype(np.float32)
    return x.reshape(h // f, f, w // f, f, *x.shape[2:]).mean(axis=(1, 3))


def segmenter_dataset(
    out: str | os.PathLike[str],
    seeds: Sequence[int],
    tiles_per_slide: int,
    tile_px: int = 384,
    seg_mpp: float = 0.5,
    slide_mpp: float = 0.25,
    size: int = 8000,
    sparse_keep: float = 0.5,
) -> int:
    """Write ``out/images/*.png`` and ``out/masks/*.png`` tiles at ``seg_mpp``; returns the count.

    ``sparse_keep``: probability of keeping a tile centred where the smear density is < 0.2.
    """
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    f = round(seg_mpp / slide_mpp)
    side = tile_px * f
    n = 0
    for seed in seeds:
        params = SynthParams(
            width=size,
            height=size,
            mpp=slide_mpp,
            seed=seed,
            lineage_mix={"erythroid": 0.3, "granulocytic": 0.4, "megakaryocytic": 0.12, "other": 0.18},
        )
        slide = SyntheticSlide.generate(params)
        rng = np.random.default_rng(seed + 77)
        made, tries = 0, 0
        while made < tiles_per_slide and tries < tiles_per_slide * 50:
            tries += 1
            x0, y0 = int(rng.integers(0, size - side)), int(rng.integers(0, size - side))
            # sparse smear (isolated red cells, no nucleated cells) kept half the time: a segmenter
            # that rarely sees it calls isolated red cells nucleated cells there
            if slide.density.at1(x0 + side / 2, y0 + side / 2) < 0.2 and rng.random() > sparse_keep:
                continue
            rgb = jpeg_roundtrip(slide.region(x0, y0, side, side))
            mask = instance_mask(slide.labels(x0, y0, side, side))
            img = np.clip(_reduce(rgb, f) + 0.5, 0, 255).astype(np.uint8)
            m = (_reduce(mask.astype(np.uint8), f) >= 0.5).astype(np.uint8) * 255
            name = f"s{seed}_{made:03d}.png"
            _save_png(root / "images" / name, img)
            _save_png(root / "masks" / name, m)
            made += 1
            n += 1
    return n


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m wsiflow.synth.crops", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("classifier", help="folder-per-class crops")
    c.add_argument("out")
    c.add_argument("--seeds", default="1000-1003", help="A-B or a comma list")
    c.add_argument("--per-class", type=int, default=80)
    c.add_argument("--input-px", type=int, default=128)
    c.add_argument("--size", type=int, default=6000)
    s = sub.add_parser("segmenter", help="images/ + masks/ tiles at seg_mpp")
    s.add_argument("out")
    s.add_argument("--seeds", default="2000-2005")
    s.add_argument("--tiles", type=int, default=12)
    s.add_argument("--tile-px", type=int, default=384)
    i = sub.add_parser("install", help="copy a trained bundle into wsiflow/weights as a demo bundle")
    i.add_argument("src", help="NAME.safetensors written by wsiflow train")
    i.add_argument("name", help="bundle name, e.g. mds-demo or demo-seg")
    i.add_argument("--weights-dir", default=str(Path(__file__).resolve().parents[1] / "weights"))
    a = ap.parse_args(argv)

    def seeds(text: str) -> list[int]:
        if "-" in text:
            lo, hi = text.split("-")
            return list(range(int(lo), int(hi) + 1))
        return [int(v) for v in text.split(",")]

    if a.what == "classifier":
        print(classifier_dataset(a.out, seeds(a.seeds), a.per_class, a.input_px, size=a.size))
    elif a.what == "install":
        print(install_demo_bundle(a.src, a.name, a.weights_dir))
    else:
        print(segmenter_dataset(a.out, seeds(a.seeds), a.tiles, a.tile_px))



DEMO_NOTE = "demo: trained on generated cells, not for real slides"


def install_demo_bundle(src: str | os.PathLike[str], name: str, weights_dir: str | os.PathLike[str]) -> Path:
    """Copy a bundle trained on generated data to ``weights_dir/<name>`` and mark its card as a demo.

    The weights are copied unchanged (the card's sha256 stays valid); the card gets
    ``"demo": true``, the bundle name and the plain warning :data:`DEMO_NOTE`.
    """
    import shutil

    from wsiflow.models.card import ModelCard

    s = Path(src).with_suffix(".safetensors")
    card = ModelCard.load(s.with_suffix(".json"))
    dst_dir = Path(weights_dir)
    dst = dst_dir / f"{name}.safetensors"
    with atomic_path(dst, fsync=False) as tmp:
        shutil.copyfile(s, tmp)
    notes = card.notes or ""
    td = dict(card.training_data or {})
    if DEMO_NOTE not in str(td.get("description", "")):
        td["description"] = f"{DEMO_NOTE}. {td.get('description', '')}".strip()
    changes = {
        "name": name,
        "demo": True,
        "notes": DEMO_NOTE + ("" if DEMO_NOTE in notes else (". " + notes if notes else "")),
        "training_data": td,
    }
    js = dst.with_suffix(".json")
    atomic_write_bytes(js, ModelCard.parse(card.to_dict() | changes, js).to_json(), fsync=False)
    return dst


if __name__ == "__main__":
    main()

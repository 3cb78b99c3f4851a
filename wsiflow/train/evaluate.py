"""Evaluate a classifier bundle on labelled images (``wsiflow evaluate``).

The split saved in the card (seed + sha256 of the test file list) is reproduced from
DATA, so ``split="test"`` scores exactly the images training never saw; if DATA is not
the data set the bundle was trained on, the digest differs and the evaluation is refused
rather than silently scoring a different split. ``split="all"`` scores every image.

Probabilities are tempered by the card's ``calibration.temperature`` (as the pipeline
applies it); the report gives the expected calibration error of the raw and the tempered
probabilities and a reliability diagram. :func:`calibrate_classifier` fits that
temperature on the card's validation split (weights untouched, so pins stay valid).
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from wsiflow.atomic import atomic_write_bytes
from wsiflow.classify import predict_probs
from wsiflow.errors import ConfigError, ModelError
from wsiflow.models.bundle import ModelBundle, update_card
from wsiflow.train import calibration as C
from wsiflow.train import data as D
from wsiflow.train.common import pick_device, set_threads
from wsiflow.train.metrics import ClassificationReport, classification_report, write_report

SPLIT_CHOICES = ("test", "val", "train", "all")


def select_split(bundle: ModelBundle, samples: D.Samples, split: str) -> np.ndarray:
    """Indices of ``split`` as saved in the bundle card, verified against its digest."""
    if split not in SPLIT_CHOICES:
        raise ConfigError("evaluate", "--split", f"must be one of {SPLIT_CHOICES}, got {split!r}")
    if split == "all":
        return np.arange(len(samples))
    saved = bundle.card.get("split")
    if not isinstance(saved, dict) or "split_seed" not in bundle.card:
        raise ModelError(f"{bundle.card_path}: the card records no split; use --split all")
    if isinstance(saved.get("test_digests"), list) and isinstance(saved.get("val_digests"), list):
        found = D.content_digests(samples.paths)
        if hashlib.sha256("\n".join(sorted(found)).encode()).hexdigest() != saved.get("data_sha256"):
            raise ConfigError(
                str(samples.root),
                "--split",
                f"these images do not reproduce the {bundle.name!r} training split (not the data set "
                "it was trained on: content sha256 differs); evaluate on that data set, or use --split all",
            )
        digests = np.array(found, dtype=object)
        test = np.flatnonzero(np.isin(digests, saved["test_digests"]))
        val = np.flatnonzero(np.isin(digests, saved["val_digests"]))
        rest = np.setdiff1d(np.arange(len(samples)), np.union1d(test, val))
        parts = {"test": test, "val": val, "train": rest}
    else:  # older cards: the split is reproduced from its seed
        parts = D.split_indices(samples.labels, int(bundle.card["split_seed"]), samples.groups)
    rel = samples.relpaths()
    digest = D.split_digest([rel[i] for i in parts["test"]])
    if digest != saved.get("test_sha256"):
        raise ConfigError(
            str(samples.root),
            "--split",
            f"these images do not reproduce the {bundle.name!r} training split (test-list sha256 differs); "
            "evaluate on the data set it was trained on, or use --split all",
        )
    return parts[split]


def _load_classifier(bundle_ref: str | Path, threads: int | None) -> ModelBundle:
    bundle = ModelBundle.load(bundle_ref)
    if bundle.task != "classifier":
        raise ModelError(f"{bundle.weights_path}: not a classifier bundle (task {bundle.task!r})")
    if bundle.input_px is None:
        raise ModelError(f"{bundle.card_path}: a classifier card needs input_px")
    set_threads(threads)
    return bundle


def _split_of(
    bundle_ref: str | Path, data: Path, split: str, threads: int | None
) -> tuple[ModelBundle, D.Samples]:
    """The classifier bundle and the images of ``split`` of DATA (verified against its card)."""
    bundle = _load_classifier(bundle_ref, threads)
    samples = D.discover(data, bundle.class_codes)
    idx = select_split(bundle, samples, split)
    if len(idx) == 0:
        raise ConfigError(str(data), "--split", f"split {split!r} is empty")
    return bundle, samples.subset(idx)


def _raw_probs(
    bundle: ModelBundle, sub: D.Samples, device: str, batch_size: int, tta: bool
) -> np.ndarray:
    """Untempered softmax probabilities of the images of ``sub``."""
    import torch

    assert bundle.input_px is not None
    dev = pick_device(device)
    images = np.stack([D.load_image(p, bundle.input_px) for p in sub.paths])
    model = bundle.build(dev).to(memory_format=torch.channels_last)
    return predict_probs(model, images, bundle.mean, bundle.std, dev, batch_size, tta=tta)


def evaluate_classifier(
    bundle_ref: str | Path,
    data: Path,
    out_dir: Path,
    split: str = "test",
    device: str = "auto",
    batch_size: int = 64,
    threads: int | None = None,
    tta: bool = False,
) -> ClassificationReport:
    """Score ``split`` of DATA with the bundle; write the report files into ``out_dir``."""
    bundle, sub = _split_of(bundle_ref, data, split, threads)
    raw = _raw_probs(bundle, sub, device, batch_size, tta)
    cal, curves, probs = C.calibration_summary(raw, sub.labels, bundle.temperature)
    report = classification_report(sub.labels, probs, bundle.class_codes)
    extra: dict[str, Any] = {
        "bundle": bundle.name,
        "bundle_sha256": bundle.sha256,
        "data": str(data),
        "split": split,
        "split_seed": bundle.card.get("split_seed"),
        "tta": "8 flips/rotations averaged" if tta else "none",
        "calibration": cal,
    }
    title = f"{bundle.name} on {Path(data).name} ({split} split, n = {len(sub)}{', TTA x8' if tta else ''})"
    paths = write_report(report, out_dir, extra, title)
    md = paths["markdown"].read_text(encoding="utf-8")
    md += (
        f"\n## Calibration ({C.N_BINS}-bin expected calibration error of the top class)\n\n"
        f"| probabilities | ECE | NLL |\n|---|---:|---:|\n"
        f"| raw (T = 1) | {cal['ece_raw']:.4f} | {cal['nll_raw']:.4f} |\n"
        f"| tempered (T = {cal['temperature']}, from the card) | {cal['ece_calibrated']:.4f} | "
        f"{cal['nll_calibrated']:.4f} |\n\nReliability diagram: `reliability.png`. "
        "The metrics above use the tempered probabilities (what the pipeline reports).\n"
    )
    atomic_write_bytes(paths["markdown"], md.encode())
    atomic_write_bytes(out_dir / "reliability.png", C.plot_reliability(curves, title))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "true", "predicted", *(f"p_{c}" for c in bundle.class_codes)])
    rel = sub.relpaths()
    for i in range(len(sub)):
        w.writerow(
            [
                rel[i],
                bundle.class_codes[sub.labels[i]],
                bundle.class_codes[int(probs[i].argmax())],
                *(f"{v:.5f}" for v in probs[i]),
            ]
        )
    atomic_write_bytes(out_dir / "predictions.csv", buf.getvalue().encode(), fsync=False, mkdir=True)
    return report


def calibrate_classifier(
    bundle_ref: str | Path,
    data: Path,
    split: str = "val",
    device: str = "auto",
    batch_size: int = 64,
    threads: int | None = None,
) -> tuple[ModelBundle, dict[str, Any]]:
    """Fit the softmax temperature on ``split`` (the card's validation split by default) and
    write it into the card (``calibration``); the weights are not touched."""
    if split == "test":
        raise ConfigError("calibrate", "--split", "the test split is for evaluation only; fit on val")
    bundle, sub = _split_of(bundle_ref, data, split, threads)
    raw = _raw_probs(bundle, sub, device, batch_size, tta=False)
    t = C.fit_temperature(C.log_probs(raw), sub.labels)
    block, _, _ = C.calibration_summary(raw, sub.labels, t)
    block = {
        **block,
        "fitted_on": f"{split} split of {Path(data).name} (n = {len(sub)}), no TTA",
        "method": "temperature scaling (minimum NLL, bounded search over log T)",
    }
    return update_card(bundle, {"calibration": block}), block

"""Evaluate a classifier bundle on labelled images (``wsiflow evaluate``).

The split saved in the card (seed + sha256 of the test file list) is reproduced from
DATA, so ``split="test"`` scores exactly the images training never saw; if DATA is not
the data set the bundle was trained on, the digest differs and the evaluation is refused
rather than silently scoring a different split. ``split="all"`` scores every image.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from wsiflow.atomic import atomic_write_bytes
from wsiflow.classify import predict_probs
from wsiflow.errors import ConfigError, ModelError
from wsiflow.models.bundle import ModelBundle
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
    bundle = ModelBundle.load(bundle_ref)
    if bundle.task != "classifier":
        raise ModelError(f"{bundle.weights_path}: not a classifier bundle (task {bundle.task!r})")
    if bundle.input_px is None:
        raise ModelError(f"{bundle.card_path}: a classifier card needs input_px")
    set_threads(threads)
    dev = pick_device(device)
    samples = D.discover(data, bundle.class_codes)
    idx = select_split(bundle, samples, split)
    if len(idx) == 0:
        raise ConfigError(str(data), "--split", f"split {split!r} is empty")
    sub = samples.subset(idx)
    images = np.stack([D.load_image(p, bundle.input_px) for p in sub.paths])
    import torch

    model = bundle.build(dev).to(memory_format=torch.channels_last)
    probs = predict_probs(model, images, bundle.mean, bundle.std, dev, batch_size, tta=tta)
    report = classification_report(sub.labels, probs, bundle.class_codes)
    extra: dict[str, Any] = {
        "bundle": bundle.name,
        "bundle_sha256": bundle.sha256,
        "data": str(data),
        "split": split,
        "split_seed": bundle.card.get("split_seed"),
        "tta": "8 flips/rotations averaged" if tta else "none",
    }
    title = f"{bundle.name} on {Path(data).name} ({split} split, n = {len(idx)}{', TTA x8' if tta else ''})"
    write_report(report, out_dir, extra, title)
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

"""Cell crops → class probabilities with a classifier bundle.

The crops come from :func:`wsiflow.crops.crop_cells` (``classifier.crop.rule``,
torch-free). :class:`Classifier` runs the bundle's network on such crops in batches
(channels_last, ``torch.inference_mode``, autocast on CUDA only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from wsiflow.errors import ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from wsiflow.config import ClassifierSpec, Pipeline
    from wsiflow.models.bundle import ModelBundle
    from wsiflow.slide import Slide
    from wsiflow.types import Box

__all__ = ["Classifier", "predict_probs", "tile_crops"]


def tile_crops(slide: Slide, read_box: Box, bboxes: np.ndarray, pipeline: Pipeline) -> np.ndarray:
    """The classifier's crops of cells found in a tile, exactly as inference cuts them: the
    tile's read box at ``cls_mpp`` (the read :mod:`wsiflow.pipeline.batch` makes), then
    :func:`wsiflow.crops.crop_cells` with the pipeline's rule, pad and input size. Used by
    ``wsiflow harvest`` for training images."""
    from wsiflow.crops import crop_cells

    cls_mpp = pipeline.resolution.cls_mpp
    cw, ch = slide.read_size(read_box.w, read_box.h, cls_mpp)
    image = slide.read(read_box.x, read_box.y, cw, ch, cls_mpp)
    return crop_cells(
        image,
        (read_box.x, read_box.y),
        read_box.w / cw,
        bboxes,
        pipeline.classifier.crop.pad_um / cls_mpp,
        pipeline.classifier.input_px,
        pipeline.classifier.crop.rule,
    )


def predict_probs(
    model: nn.Module,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    tta: bool = False,
    temperature: float = 1.0,
) -> np.ndarray:
    """Softmax probabilities float32 (n, K) for uint8 (n, h, w, 3) images.

    ``temperature``: softmax(logits / T), the bundle card's ``calibration.temperature``
    (:mod:`wsiflow.train.calibration`); 1.0 gives the network's raw probabilities.

    ``tta``: average the probabilities over the 8 flips/90° rotations of each image (8× the
    compute; cells have no orientation, so this is a legitimate test-time augmentation).
    """
    import torch

    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    dev = torch.device(device)
    m = torch.tensor(list(mean), dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    chunks: list[np.ndarray] = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            if dev.type == "cuda":  # pinned host memory: the copy does not block the host
                batch = batch.pin_memory().to(dev, non_blocking=True)
            else:
                batch = batch.to(dev)
            x = ((batch.permute(0, 3, 1, 2).float() / 255.0 - m) / s).contiguous(
                memory_format=torch.channels_last
            )
            views = [x]
            if tta:
                views = [torch.rot90(v, k, dims=(2, 3)) for v in (x, x.flip(3)) for k in range(4)]
            acc = None
            for v in views:
                with torch.autocast(device_type="cuda", enabled=dev.type == "cuda"):
                    logits = model(v.contiguous(memory_format=torch.channels_last))
                p = torch.softmax(logits.float() / temperature, dim=1)
                acc = p if acc is None else acc + p
            assert acc is not None
            chunks.append((acc / len(views)).cpu().numpy().astype(np.float32))
    if not chunks:
        fc = getattr(model, "fc", None)
        k = int(fc.out_features) if isinstance(fc, torch.nn.Linear) else 0
        return np.zeros((0, k), dtype=np.float32)
    return np.concatenate(chunks)


class Classifier:
    """A loaded classifier bundle, ready to score crops made by :func:`wsiflow.crops.crop_cells`."""

    def __init__(self, bundle: ModelBundle, cfg: ClassifierSpec, device: str = "cpu") -> None:
        import torch

        if bundle.task != "classifier":
            raise ModelError(
                f"{bundle.weights_path}: a classifier bundle is needed, this one is a {bundle.task}"
            )
        if bundle.input_px is not None and bundle.input_px != cfg.input_px:
            raise ModelError(
                f"{bundle.weights_path}: the bundle was trained at {bundle.input_px} px but the pipeline "
                f"sets classifier.input_px = {cfg.input_px}"
            )
        self.bundle = bundle
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = bundle.build(self.device).to(memory_format=torch.channels_last)
        self.classes = bundle.class_codes

    def predict(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (n, input_px, input_px, 3) crops → float32 (n, K) softmax probabilities,
        tempered by the card's calibration temperature (1.0 when the card has none)."""
        if crops.ndim != 4 or crops.shape[1:] != (self.cfg.input_px, self.cfg.input_px, 3):
            raise ValueError(
                f"crops must be (n, {self.cfg.input_px}, {self.cfg.input_px}, 3), got {crops.shape}"
            )
        if len(crops) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return predict_probs(
            self.model,
            crops,
            self.bundle.mean,
            self.bundle.std,
            self.device,
            self.cfg.batch_size,
            temperature=self.bundle.temperature,
        )

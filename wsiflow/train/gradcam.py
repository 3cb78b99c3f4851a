"""Grad-CAM (Selvaraju et al. 2017) for classifier bundles: which pixels drove a call.

The class score's gradient is averaged over each channel of a chosen layer's output; the
weighted, rectified sum of those channels is the heat map, upsampled to the crop. For
InceptionV3 the default layer is ``Mixed_6e`` (17×17 at 299 px, 5×5 at 112 px): at small
inputs the last block (``Mixed_7c``) is only 1–2 px wide, too coarse to tell nucleus from
cytoplasm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from wsiflow.errors import ModelError

DEFAULT_LAYER = "Mixed_6e"


@dataclass(frozen=True)
class CamResult:
    heatmap: np.ndarray
    """float32 (h, w) in [0, 1]."""
    target: int
    probs: np.ndarray


def _layer(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        some = [n for n in modules if n and "." not in n]
        raise ModelError(f"no layer {name!r} in the model (top-level layers: {', '.join(some)})")
    return modules[name]


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def grad_cam(
    model: nn.Module,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    layer: str = DEFAULT_LAYER,
    targets: Sequence[int] | None = None,
) -> list[CamResult]:
    """Heat maps for uint8 (n, h, w, 3) images; target = predicted class unless given.

    Runs where the model is (the images are moved to its parameters' device, CPU or CUDA,
    in float32: no autocast, the gradients need the precision); results are NumPy on the CPU.
    """
    model.eval()
    dev = _device_of(model)
    acts: list[torch.Tensor] = []
    handle = _layer(model, layer).register_forward_hook(lambda _m, _i, out: acts.append(out))
    try:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(dev).permute(0, 3, 1, 2).float() / 255.0
        m = torch.tensor(list(mean), dtype=torch.float32, device=dev).view(1, 3, 1, 1)
        s = torch.tensor(list(std), dtype=torch.float32, device=dev).view(1, 3, 1, 1)
        x = ((x - m) / s).requires_grad_(False)
        with torch.enable_grad():
            logits = model(x)
            a = acts[-1]
            probs = torch.softmax(logits.detach().float(), 1).cpu().numpy()
            tgt = [int(t) for t in targets] if targets is not None else probs.argmax(1).tolist()
            score = logits[torch.arange(len(tgt), device=dev), torch.tensor(tgt, device=dev)].sum()
            (grad,) = torch.autograd.grad(score, a)
    finally:
        handle.remove()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * a.detach()).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=images.shape[1:3], mode="bilinear", align_corners=False)[
        :, 0
    ].cpu()
    out = []
    for i in range(len(images)):
        c = cam[i].numpy()
        c = (c - c.min()) / (c.max() - c.min()) if c.max() > c.min() else np.zeros_like(c)
        out.append(CamResult(heatmap=c.astype(np.float32), target=tgt[i], probs=probs[i]))
    return out


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The crop with a jet-coloured heat map blended over it → uint8 (h, w, 3)."""
    from matplotlib import colormaps

    colour = colormaps["jet"](heatmap)[..., :3] * 255.0
    return np.clip(image.astype(np.float32) * (1 - alpha) + colour * alpha, 0, 255).astype(np.uint8)

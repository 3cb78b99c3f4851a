"""Architecture name + kwargs (from a bundle card) → an untrained ``nn.Module``."""

from __future__ import annotations

from typing import Any

from torch import nn

from wsiflow.errors import ModelError

ARCHITECTURES = ("inception_v3", "unet")


def build_model(architecture: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build ``architecture`` with ``kwargs``; unknown names or bad kwargs → ModelError."""
    kw = dict(kwargs or {})
    try:
        if architecture == "inception_v3":
            from wsiflow.models.inception import build_inception_v3

            kw.setdefault("init_weights", False)  # weights are loaded next; skip the slow init
            return build_inception_v3(**kw)
        if architecture == "unet":
            from wsiflow.models.unet import UNet

            module: nn.Module = UNet(**kw)
            return module
    except TypeError as exc:
        raise ModelError(f"architecture {architecture!r}: bad kwargs {kw} ({exc})") from None
    raise ModelError(f"unknown architecture {architecture!r} (known: {', '.join(ARCHITECTURES)})")

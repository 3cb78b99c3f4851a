"""Where torch runs: device resolution and intra-op threads (torch lives in this layer).

The execution layer calls these on the client (how many GPUs for the cluster layout) and
on each worker (``auto`` → ``cuda`` or ``cpu``; torch threads = the worker's threads),
so it never imports torch itself.
"""

from __future__ import annotations

import os

from wsiflow.errors import ModelError

__all__ = ["cuda_device_count", "resolve_device", "set_torch_threads"]


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when this process sees a CUDA device, else ``cpu``; ``cuda``
    without one is a :class:`ModelError`."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was requested but this worker has no CUDA device")
    return device


def cuda_device_count() -> int:
    """Visible CUDA devices, without importing torch when ``CUDA_VISIBLE_DEVICES`` hides them all."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - torch broken
        return 0


def set_torch_threads(n: int) -> None:
    """torch's intra-op thread count for this process (at least 1)."""
    import torch

    torch.set_num_threads(max(1, n))

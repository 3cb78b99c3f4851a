"""Training utilities shared by the classifier and segmenter loops.

Device choice, thread count, seeding, learning-rate schedules and resumable checkpoints.
Checkpoints are a ``<stem>.ckpt.safetensors`` file (model weights and optimizer tensors)
plus a ``<stem>.ckpt.json`` file (epoch, step, history, optimizer hyper-parameters): never
pickle, so a checkpoint from elsewhere cannot execute code when resumed.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from safetensors.torch import load_file, save_file

from wsiflow.atomic import atomic_path, atomic_write_bytes
from wsiflow.errors import ModelError

__all__ = [
    "checkpoint_paths",
    "cpu_autocast_dtype",
    "load_checkpoint",
    "lr_at",
    "pick_device",
    "save_checkpoint",
    "seed_everything",
    "set_threads",
    "state_dict_tensors",
]


def pick_device(requested: str | None = None) -> torch.device:
    """``"auto"``/None → CUDA when present, else CPU; otherwise the named device."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {requested!r} requested but CUDA is not available")
    return dev


def set_threads(n: int | None) -> int:
    """Set torch intra-op threads (None → all CPUs this process may use). Returns the count."""
    if n is None or n <= 0:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def cpu_autocast_dtype() -> torch.dtype | None:
    """bfloat16 when this CPU has native bf16 matrix units (AMX / AVX512-BF16), else None."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return None
    return torch.bfloat16 if ("amx_bf16" in flags or "avx512_bf16" in flags) else None


def lr_at(step: int, total_steps: int, base_lr: float, schedule: str, warmup_frac: float = 0.1) -> float:
    """Learning rate at ``step`` (0-based) — a pure function, so resuming needs no scheduler state.

    ``constant``: base_lr. ``cosine``: cosine decay to 1% of base_lr. ``onecycle``: linear warm-up
    from base_lr/25 over ``warmup_frac`` of the steps, then cosine decay to base_lr/1e4.
    """
    if schedule == "constant" or total_steps <= 1:
        return base_lr
    t = min(max(step / (total_steps - 1), 0.0), 1.0)
    if schedule == "cosine":
        return base_lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))
    if schedule == "onecycle":
        if t < warmup_frac:
            start = base_lr / 25
            return start + (base_lr - start) * (t / warmup_frac)
        u = (t - warmup_frac) / (1 - warmup_frac)
        end = base_lr / 1e4
        return end + (base_lr - end) * 0.5 * (1 + math.cos(math.pi * u))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def state_dict_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU, contiguous copy of a module's state dict (safetensors needs both)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def checkpoint_paths(stem: Path) -> tuple[Path, Path]:
    return stem.with_name(stem.name + ".ckpt.safetensors"), stem.with_name(stem.name + ".ckpt.json")


def save_checkpoint(
    stem: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
) -> None:
    """Write ``<stem>.ckpt.safetensors`` + ``<stem>.ckpt.json`` atomically (tensors first)."""
    tensors = {f"model/{k}": v for k, v in state_dict_tensors(model).items()}
    opt_meta: dict[str, Any] | None = None
    if optimizer is not None:
        osd = optimizer.state_dict()
        for idx, pstate in osd["state"].items():
            for key, val in pstate.items():
                if isinstance(val, torch.Tensor):
                    tensors[f"opt/{idx}/{key}"] = val.detach().to("cpu").contiguous().clone()
        groups = [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]
        ]
        opt_meta = {"param_groups": groups}
    st_path, js_path = checkpoint_paths(stem)
    with atomic_path(st_path, fsync=False, mkdir=True) as tmp:
        save_file(tensors, str(tmp))
    payload = {"format": "wsiflow-checkpoint/1", "optimizer": opt_meta, "state": state}
    atomic_write_bytes(
        js_path,
        orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY),
        fsync=False,
        mkdir=True,
    )


def load_checkpoint(
    stem: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any] | None:
    """Restore a checkpoint written by :func:`save_checkpoint`; None when there is none."""
    st_path, js_path = checkpoint_paths(stem)
    if not (st_path.is_file() and js_path.is_file()):
        return None
    try:
        payload = orjson.loads(js_path.read_bytes())
        tensors = load_file(str(st_path))
    except Exception as exc:  # corrupt or truncated checkpoint
        raise ModelError(f"{st_path}: cannot read checkpoint ({exc})") from None
    if payload.get("format") != "wsiflow-checkpoint/1":
        raise ModelError(f"{js_path}: not a wsiflow checkpoint")
    model_sd = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        model.load_state_dict(model_sd, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"{st_path}: checkpoint does not fit this model ({str(exc).splitlines()[0]})"
        ) from None
    meta = payload.get("optimizer")
    if optimizer is not None and meta is not None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, val in tensors.items():
            if key.startswith("opt/"):
                _, idx, name = key.split("/", 2)
                state.setdefault(int(idx), {})[name] = val
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    out = payload.get("state")
    return dict(out) if isinstance(out, dict) else {}

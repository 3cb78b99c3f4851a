"""``wsiflow train segmenter``: a U-Net on image/mask pairs (Dice + BCE loss).

Images and masks are matched by file stem (see :mod:`wsiflow.train.seg_data` for the
mask convention). Channel 0 of the network is "cell" (nucleus ∪ cytoplasm); when any
mask marks nuclei (three-level 0/128/255 masks) a second "nucleus" channel is trained,
its loss counted only on images whose mask says where the nucleus is.

Partial annotation: with ``unlabelled`` (a folder of masks with the same file stems, ``>0``
= pixels nobody annotated), those pixels are left out of the loss and of validation, so a
field whose masks mark only some cells (a lab's partial labels, the SegPC layout) teaches
"these are cells" and "this is background" without teaching "the unmarked cells are
background". Images without such a file are fully annotated.

The split (validation fraction, seed) is saved in the work folder and the card; every
epoch writes a resumable checkpoint (safetensors + JSON, never pickle); the epoch with
the best validation Dice becomes the bundle. Validation reports Dice and IoU of the cell
channel, pooled over all validation pixels and averaged per image.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from wsiflow.errors import ConfigError
from wsiflow.models.bundle import ModelBundle, save_bundle
from wsiflow.models.card import CardClass, CardContent, Normalization
from wsiflow.models.unet import UNet
from wsiflow.train import common
from wsiflow.train.seg_data import (
    IMAGE_SUFFIXES,
    SegDataError,
    SegPair,
    find_pairs,
    load_pair,
    read_mask,
    resample_pair,
)

ProgressFn = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class TrainSegmenterConfig:
    images: Path
    masks: Path
    out: Path
    mpp: float
    """µm per pixel of the images as stored."""
    target_mpp: float | None = None
    """µm per pixel the network works at (the card's ``mpp``); images are resampled to it."""
    work_dir: Path | None = None
    name: str | None = None
    depth: int = 4
    width: int = 8
    nucleus: bool | None = None
    """Train a nucleus channel (None: when any mask marks nuclei)."""
    crop: int = 64
    batch_size: int = 16
    epochs: int = 30
    lr: float = 2e-3
    schedule: str = "onecycle"
    weight_decay: float = 1e-4
    val_fraction: float = 0.1
    patience: int = 10
    repeat: dict[str, int] = field(default_factory=dict)
    """Name prefix → how many times such images appear per epoch (oversampling)."""
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    fp16_storage: bool = False
    resume: bool = True
    max_minutes: float | None = None
    """Wall-time budget for training: the learning-rate schedule follows whichever of steps
    or elapsed time is further along, and training stops when the budget is spent."""
    epoch_size: int | None = None
    """Training crops per epoch (default: every training image once, with ``repeat``)."""
    init_from: str | None = None
    """Segmenter bundle (shipped name or path) whose weights and input normalisation start the
    training (fine-tuning); its architecture must match ``depth``/``width`` and the channels."""
    unlabelled: Path | None = None
    """Folder of masks (same stems as ``images``): ``>0`` marks pixels left out of the loss."""
    training_data: dict[str, Any] = field(default_factory=dict)
    extra_card: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


@dataclass
class _Sample:
    name: str
    rgb: NDArray[np.uint8]
    target: NDArray[np.float32]  # (3, H, W): cell, nucleus, known (1 = annotated pixel)
    has_nucleus: bool


def _load(cfg: TrainSegmenterConfig) -> list[_Sample]:
    work_mpp = cfg.target_mpp or cfg.mpp
    out: list[_Sample] = []
    unknown = _unlabelled(cfg.unlabelled) if cfg.unlabelled is not None else {}
    for img_path, mask_path in find_pairs(cfg.images, cfg.masks):
        pair: SegPair = load_pair(img_path, mask_path)
        nuc = pair.nucleus if pair.nucleus is not None else np.zeros_like(pair.cell)
        known = np.ones_like(pair.cell)
        if img_path.stem in unknown:
            skip, _ = read_mask(unknown[img_path.stem])
            if skip.shape != known.shape:
                raise SegDataError(
                    f"{unknown[img_path.stem]}: unlabelled mask is {skip.shape[::-1]} px "
                    f"but the image is {known.shape[::-1]} px"
                )
            known = ~skip | pair.cell  # annotated cells stay supervised
        rgb, (cell, nuc, known) = pair.rgb, (pair.cell, nuc, known)
        if abs(work_mpp - cfg.mpp) > 1e-6:
            rgb, (cell, nuc, known) = resample_pair(rgb, (cell, nuc, known), cfg.mpp, work_mpp)
        target = np.stack([cell, nuc, known]).astype(np.float32)
        out.append(_Sample(pair.name, rgb, target, pair.nucleus is not None))
    return out


def _unlabelled(folder: Path) -> dict[str, Path]:
    """Stem → unlabelled-pixel mask file in ``folder``."""
    if not folder.is_dir():
        raise SegDataError(f"{folder}: not a folder of unlabelled-pixel masks")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def _split(names: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    n_val = max(1, round(len(names) * fraction)) if len(names) > 1 and fraction > 0 else 0
    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return train, val


def _crop(s: _Sample, size: int, rng: np.random.Generator) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    img, tgt = s.rgb, s.target
    h, w = img.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        if ph < h and pw < w:
            img = np.pad(img, (*pads, (0, 0)), mode="reflect")
            tgt = np.pad(tgt, ((0, 0), *pads), mode="reflect")
        else:
            img = np.pad(img, (*pads, (0, 0)), mode="edge")
            tgt = np.pad(tgt, ((0, 0), *pads), mode="edge")
        h, w = img.shape[:2]
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    img, tgt = img[y : y + size, x : x + size], tgt[:, y : y + size, x : x + size]
    k = int(rng.integers(0, 4))
    img, tgt = np.rot90(img, k, axes=(0, 1)), np.rot90(tgt, k, axes=(1, 2))
    if rng.random() < 0.5:
        img, tgt = img[:, ::-1], tgt[:, :, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(tgt)


def _colour_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x in [0, 1], (N, 3, H, W): per-image channel gains, brightness, contrast, gamma."""
    n = x.shape[0]
    gains = 1 + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.16
    bright = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.12
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.3
    gamma = torch.exp((torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.4)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x.clamp(1e-4, 1) ** gamma) * gains
    x = (x - mean) * contrast + mean + bright
    return x.clamp(0, 1)


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    known: torch.Tensor | None = None,
) -> torch.Tensor:
    """BCE + (1 − soft Dice) per channel, averaged; ``weight`` (N, C) masks images per channel,
    ``known`` (N, 1, H, W) pixels (0 = unlabelled: no loss there)."""
    if weight is None:
        weight = torch.ones(logits.shape[:2], device=logits.device)
    if known is None:
        known = torch.ones_like(logits[:, :1])
    bce_px = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    bce = (bce_px * known).sum(dim=(2, 3)) / known.sum(dim=(2, 3)).clamp_min(1)  # (N, C)
    w_px = weight[..., None, None] * known
    inter = (p * target * w_px).sum(dim=(0, 2, 3))
    denom = ((p + target) * w_px).sum(dim=(0, 2, 3))
    dice = (2 * inter + 1) / (denom + 1)  # (C,)
    wsum = weight.sum(dim=0).clamp_min(1e-6)
    bce_c = (bce * weight).sum(dim=0) / wsum
    has = (weight.sum(dim=0) > 0).float()
    return ((bce_c + (1 - dice)) * has).sum() / has.sum().clamp_min(1)


def dice_iou(pred: NDArray[np.bool_], truth: NDArray[np.bool_]) -> tuple[float, float]:
    """Dice and IoU of two boolean masks (both empty → 1.0, 1.0)."""
    inter = float(np.logical_and(pred, truth).sum())
    a, b = float(pred.sum()), float(truth.sum())
    if a + b == 0:
        return 1.0, 1.0
    return 2 * inter / (a + b), inter / (a + b - inter)


@torch.inference_mode()
def _validate(
    model: torch.nn.Module,
    samples: list[_Sample],
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    n_out: int,
) -> dict[str, float]:
    model.eval()
    inter = total = union_sum = 0.0
    dices, ious, losses = [], [], []
    for s in samples:
        x = torch.from_numpy(s.rgb).permute(2, 0, 1)[None].float().div(255).to(device)
        logits = model(_normalise(x, mean, std))
        tgt = torch.from_numpy(s.target[:n_out])[None].to(device)
        w = torch.tensor([[1.0] + [float(s.has_nucleus)] * (n_out - 1)], device=device)
        known_np = s.target[2] > 0.5
        known = torch.from_numpy(s.target[2:3])[None].to(device)
        losses.append(float(dice_bce_loss(logits, tgt, w, known)))
        pred = (logits[0, 0] > 0).cpu().numpy() & known_np
        truth = (s.target[0] > 0.5) & known_np
        d, i = dice_iou(pred, truth)
        if truth.any() or pred.any():
            dices.append(d)
            ious.append(i)
        it = float(np.logical_and(pred, truth).sum())
        inter += it
        total += float(pred.sum() + truth.sum())
        union_sum += float(pred.sum() + truth.sum()) - it
    return {
        "val_loss": float(np.mean(losses)) if losses else math.nan,
        "val_dice": 2 * inter / total if total else 1.0,
        "val_iou": inter / union_sum if union_sum else 1.0,
        "val_dice_per_image": float(np.mean(dices)) if dices else 1.0,
        "val_iou_per_image": float(np.mean(ious)) if ious else 1.0,
    }


def train_segmenter(cfg: TrainSegmenterConfig, progress: ProgressFn | None = None) -> ModelBundle:
    """Train a U-Net segmenter and write ``cfg.out`` (.safetensors + .json)."""
    emit: ProgressFn = progress or (lambda _e, _i: None)
    if cfg.crop < 16:
        raise ConfigError("train segmenter", "--crop", "must be at least 16 px")
    threads = common.set_threads(cfg.threads)
    device = common.pick_device(cfg.device)
    common.seed_everything(cfg.seed)
    samples = _load(cfg)
    n_out = 2 if (cfg.nucleus if cfg.nucleus is not None else any(s.has_nucleus for s in samples)) else 1
    work_dir = cfg.work_dir or cfg.out.with_name(cfg.out.name + ".train")
    work_dir.mkdir(parents=True, exist_ok=True)
    split_path = work_dir / "split.json"
    names = [s.name for s in samples]
    train_idx, val_idx = _split(names, cfg.val_fraction, cfg.seed)
    split_path.write_text(
        json.dumps(
            {
                "seed": cfg.seed,
                "val_fraction": cfg.val_fraction,
                "train": [names[i] for i in train_idx],
                "val": [names[i] for i in val_idx],
            },
            indent=1,
        )
    )
    train_s = [samples[i] for i in train_idx]
    val_s = [samples[i] for i in val_idx]
    epoch_list: list[int] = []
    for i, s in enumerate(train_s):
        reps = max((r for p, r in cfg.repeat.items() if s.name.startswith(p)), default=1)
        epoch_list.extend([i] * reps)
    init = ModelBundle.load(cfg.init_from) if cfg.init_from else None
    if init is not None:
        mean_np, std_np = np.asarray(init.mean, np.float64), np.asarray(init.std, np.float64)
    else:
        pix = np.concatenate([s.rgb.reshape(-1, 3) for s in train_s]).astype(np.float64) / 255
        mean_np, std_np = pix.mean(axis=0), pix.std(axis=0) + 1e-6
    mean = torch.tensor(mean_np, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    std = torch.tensor(std_np, dtype=torch.float32).view(1, 3, 1, 1).to(device)

    model = UNet(in_ch=3, out_ch=n_out, depth=cfg.depth, width=cfg.width)
    if init is not None:
        want = {"in_ch": 3, "out_ch": n_out, "depth": cfg.depth, "width": cfg.width}
        if init.task != "segmenter" or {k: init.model_card.kwargs.get(k) for k in want} != want:
            raise ConfigError(
                str(init.weights_path), "init_from", f"{init.name} is not a U-Net segmenter like {want}"
            )
        model.load_state_dict(init.build("cpu").state_dict())
    model = model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if cfg.weight_decay > 0:
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = max(1, (cfg.epoch_size or len(epoch_list)) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    stem = work_dir / "last"
    state: dict[str, Any] = {"epoch": 0, "history": [], "best": None, "best_epoch": 0, "train_s": 0.0}
    if cfg.resume:
        got = common.load_checkpoint(stem, model, opt)
        if got:
            state.update(got)
            emit("resume", {"epoch": state["epoch"]})
    emit(
        "start",
        {
            "n": len(samples),
            "train": len(train_s),
            "val": len(val_s),
            "channels": n_out,
            "device": str(device),
            "threads": threads,
            "work_dir": str(work_dir),
            "steps_per_epoch": steps_per_epoch,
        },
    )
    rng = np.random.default_rng(cfg.seed + 1000 * int(state["epoch"]))
    gen = torch.Generator().manual_seed(cfg.seed + int(state["epoch"]))
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes is not None else None
    out_of_time = False
    best_stem = work_dir / "best"
    stale = 0
    for epoch in range(int(state["epoch"]) + 1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        need = steps_per_epoch * cfg.batch_size
        order = np.concatenate([rng.permutation(epoch_list) for _ in range(-(-need // len(epoch_list)))])
        run_loss = 0.0
        done = 0
        for b in range(steps_per_epoch):
            step = (epoch - 1) * steps_per_epoch + b
            frac = step / max(1, total_steps - 1)
            if budget_s is not None:
                elapsed = float(state["train_s"]) + time.perf_counter() - t0
                if elapsed >= budget_s:
                    out_of_time = True
                    break
                frac = max(frac, elapsed / budget_s)
            for g in opt.param_groups:
                g["lr"] = common.lr_at(round(frac * (total_steps - 1)), total_steps, cfg.lr, cfg.schedule)
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            crops = [_crop(train_s[i], cfg.crop, rng) for i in idx]
            x = torch.from_numpy(np.stack([c[0] for c in crops])).permute(0, 3, 1, 2).float().div(255)
            y = torch.from_numpy(np.stack([np.concatenate([c[1][:n_out], c[1][2:3]]) for c in crops]))
            if rng.random() < 0.5:  # scale augmentation (±25%), whole batch
                f = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
                size = max(16, round(cfg.crop * f))
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=f < 1)
                y = (F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False) > 0.5).float()
            x = _colour_jitter(x, gen)
            w = torch.tensor([[1.0] + [float(train_s[i].has_nucleus)] * (n_out - 1) for i in idx])
            x, y, w = x.to(device), y.to(device), w.to(device)
            y, known = y[:, :n_out], y[:, n_out:]
            logits = model(_normalise(x, mean, std))
            loss = dice_bce_loss(logits, y, w, known)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += float(loss.detach())
            done += 1
            emit(
                "batch",
                {"epoch": epoch, "batch": b + 1, "batches": steps_per_epoch, "loss": run_loss / (b + 1)},
            )
        train_s_time = time.perf_counter() - t0
        metrics = _validate(model, val_s, mean, std, device, n_out)
        record = {
            "epoch": epoch,
            "train_loss": run_loss / max(done, 1),
            "steps": done,
            **metrics,
            "lr": opt.param_groups[0]["lr"],
            "epoch_s": train_s_time,
            "images_per_s": done * cfg.batch_size / max(train_s_time, 1e-9),
        }
        state["history"].append(record)
        state["epoch"] = epoch
        state["train_s"] = float(state["train_s"]) + train_s_time
        if state["best"] is None or metrics["val_dice"] > state["best"]["val_dice"]:
            state["best"], state["best_epoch"] = dict(record), epoch
            common.save_checkpoint(best_stem, model, None, {"epoch": epoch})
            stale = 0
        else:
            stale += 1
        common.save_checkpoint(stem, model, opt, state)
        emit("epoch", {**record, "best_epoch": state["best_epoch"]})
        if stale >= cfg.patience:
            break
        if out_of_time or (budget_s is not None and float(state["train_s"]) >= budget_s):
            emit("timeout", {"epoch": epoch})
            break

    if state["best"] is not None:
        common.load_checkpoint(best_stem, model, None)
    model = model.to("cpu").eval().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    classes = [CardClass(code="cell", name="Nucleated cell (nucleus ∪ cytoplasm)", color=[0, 200, 0])]
    if n_out == 2:
        classes.append(CardClass(code="nucleus", name="Nucleus", color=[255, 255, 0]))
    history = state["history"]
    ep_s = [h["epoch_s"] for h in history] or [0.0]
    validation = {k: v for k, v in (state["best"] or {}).items() if k.startswith("val_")}
    card = CardContent(
        name=cfg.name or cfg.out.stem,
        task="segmenter",
        architecture="unet",
        kwargs={"in_ch": 3, "out_ch": n_out, "depth": cfg.depth, "width": cfg.width},
        classes=classes,
        input_px=None,
        mpp=float(cfg.target_mpp or cfg.mpp),
        normalization=Normalization(mean=[float(v) for v in mean_np], std=[float(v) for v in std_np]),
        training_data={"n_images": len(samples), **cfg.training_data},
        metrics={
            "best_epoch": state["best_epoch"],
            "validation": validation,
            "epochs_run": len(history),
            "train_seconds": round(float(state["train_s"]), 1),
            "seconds_per_epoch": round(float(np.median(ep_s)), 1),
            "images_per_s": round(float(np.median([h["images_per_s"] for h in history] or [0.0])), 1),
            "device": str(device),
            "threads": threads,
        },
        split_seed=cfg.seed,
        split={"val_fraction": cfg.val_fraction, "n_train": len(train_s), "n_val": len(val_s)},
        training={
            "loss": "BCE + soft Dice per channel (nucleus channel only on images with nucleus masks"
            + ("; unlabelled pixels left out" if cfg.unlabelled is not None else "")
            + ")",
            "optimizer": "AdamW" if cfg.weight_decay > 0 else "Adam",
            "lr": cfg.lr,
            "schedule": cfg.schedule,
            "batch_size": cfg.batch_size,
            "crop": cfg.crop,
            "epochs": cfg.epochs,
            "repeat": cfg.repeat,
            "augmentation": "random crops, 90° rotations, flips, ±25% scale, "
            "channel gains/brightness/contrast/gamma",
            **(
                {
                    "initialised_from": {
                        "bundle": init.name,
                        "sha256": init.sha256,
                        # the source's own warm start, so a multi-stage bundle keeps its lineage
                        "initialised_from": init.card.get("training", {}).get("initialised_from"),
                    }
                }
                if init is not None
                else {}
            ),
        },
        demo=False,
        notes=cfg.notes,
        **cfg.extra_card,
    )
    bundle = save_bundle(model, card, cfg.out, fp16=cfg.fp16_storage)
    emit("end", {"bundle": str(bundle.weights_path), "metrics": validation})
    return bundle

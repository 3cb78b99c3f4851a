"""``wsiflow train classifier``: InceptionV3 from scratch on labelled cell images.

Defaults follow the seed paper (Adam, lr 1e-4, batch 32, up to 200 epochs, split
80/10/10) with early stopping on validation loss, class-weighted loss (or balanced
sampling), smear augmentation (flips, 90° rotations, small scale/shift, colour/stain
jitter), bf16 autocast on CPUs with bf16 matrix units, CUDA when present. Every epoch
writes a resumable checkpoint (safetensors + JSON); the best epoch (lowest validation
loss) is kept separately and becomes the bundle.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from PIL import Image

from wsiflow.classify import predict_probs
from wsiflow.errors import ConfigError
from wsiflow.models.bundle import ModelBundle, save_bundle
from wsiflow.models.card import Calibration, CardClass, CardContent, Normalization
from wsiflow.models.inception import build_inception_v3, check_input_px
from wsiflow.train import common
from wsiflow.train import data as D
from wsiflow.train.calibration import calibration_summary, fit_temperature, log_probs

DEFAULT_COLORS = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
)


@dataclass(frozen=True)
class TrainClassifierConfig:
    data: Path
    out: Path
    mpp: float
    """µm per pixel of the training images as stored (before resizing)."""
    work_dir: Path | None = None
    name: str | None = None
    input_px: int = 96
    batch_size: int = 32
    epochs: int = 200
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "constant"
    patience: int = 20
    balance: str = "weights"
    label_smoothing: float = 0.0
    dropout: float = 0.5
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    bf16: bool | None = None
    fp16_storage: bool = False
    resume: bool = True
    max_minutes: float | None = None
    classes_meta: tuple[dict[str, Any], ...] | None = None
    training_data: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    init_from: Path | None = None
    """Warm start: a classifier bundle with the same classes and the same test split whose weights
    start training (new optimiser and schedule). Ignored when a checkpoint is resumed."""
    crop_pipeline: str | None = None
    """A pipeline (name or YAML): build each training crop as it does (its segmenter finds the
    field's centre cell, its crop rule at its cls_mpp), instead of using the whole field."""
    bn_recalibrate: bool = True
    """After training: recompute BatchNorm statistics on the un-augmented training images;
    kept only if the validation loss improves (the test split is never consulted)."""


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_acc: float
    val_macro_f1: float
    lr: float
    wall_s: float
    cpu_s: float
    images_per_s: float


ProgressFn = Callable[[str, dict[str, Any]], None]
"""Called as ``progress(event, info)``: events "start", "batch", "epoch", "end"."""


def _class_entries(classes: tuple[str, ...], meta: tuple[dict[str, Any], ...] | None) -> list[CardClass]:
    by_code = {str(m["code"]): m for m in (meta or ())}
    out = []
    for i, code in enumerate(classes):
        m = by_code.get(code, {})
        color = m.get("color", DEFAULT_COLORS[i % len(DEFAULT_COLORS)])
        entry: dict[str, Any] = {
            "code": code,
            "name": str(m.get("name", code.replace("_", " ").capitalize())),
            "lineage": m.get("lineage"),
            "dysplastic": bool(m.get("dysplastic", False)),
            "blast": bool(m.get("blast", False)),
            "color": [int(c) for c in color],
        }
        if "nucleated" in m:
            entry["nucleated"] = bool(m["nucleated"])
        out.append(CardClass.model_validate(entry))
    return out


def _evaluate(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    mean: list[float],
    std: list[float],
    device: torch.device,
    weights: torch.Tensor | None,
) -> tuple[float, float, float, np.ndarray]:
    """(loss, accuracy, macro F1, probs) in fp32 eval mode."""
    from sklearn.metrics import f1_score

    probs = predict_probs(model, images, mean, std, device, batch_size=64)
    p = torch.from_numpy(probs).clamp_min(1e-7).log()
    loss = float(torch.nn.functional.nll_loss(p, torch.from_numpy(labels), weight=weights).item())
    pred = probs.argmax(1)
    acc = float((pred == labels).mean())
    f1 = float(f1_score(labels, pred, average="macro", labels=np.arange(probs.shape[1]), zero_division=0))
    return loss, acc, f1, probs


def recalibrate_bn(
    model: torch.nn.Module,
    images: np.ndarray,
    mean: list[float],
    std: list[float],
    device: torch.device,
    autocast: bool,
    batch_size: int = 64,
) -> None:
    """Recompute every BatchNorm's running mean/var as a plain average over ``images``
    (no augmentation), replacing the exponential averages accumulated while the weights
    were still moving."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = D.normalize(D.to_float(images[start : start + batch_size], device), mean, std)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                    model(x)
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.eval()


def _init_source(
    ref: Path, classes: tuple[str, ...], data_name: str, data_sha: str
) -> tuple[ModelBundle, dict[str, Any], frozenset[str] | None]:
    """The ``--init-from`` bundle, checked; its description for the card; the content digests
    of the images it was trained on (None when its card predates that record).

    Refused: other classes; the same images split another way (a second split of one data
    set would put the source's training images into this test split); for an older card
    without an image record, a data set of the same name. Accepted: other data (the demo's
    generated cells, last round's harvest inside this round's manifest): the caller keeps
    the test split disjoint from every image the source saw.
    """
    src = ModelBundle.load(ref)
    where = str(src.weights_path)
    if src.task != "classifier" or src.card.get("architecture") != "inception_v3":
        raise ConfigError(where, "init_from", "not an inception_v3 classifier bundle")
    if src.class_codes != tuple(classes):
        raise ConfigError(
            where, "init_from", f"classes {list(src.class_codes)} differ from the data's {list(classes)}"
        )
    split = src.card.get("split", {})
    seen_list = split.get("seen")
    seen = frozenset(str(d) for d in seen_list) if isinstance(seen_list, list) else None
    same_data = split.get("data_sha256") == data_sha if seen is not None else (
        src.card.get("training_data", {}).get("name") == data_name
    )
    prev = src.card.get("training", {})
    note = {
        "bundle": src.name,
        "sha256": src.sha256,
        "trained_on": src.card.get("training_data", {}).get("name"),
        "epochs_run": prev.get("epochs_run"),
        "best_epoch": prev.get("best_epoch"),
        "metrics": src.card.get("metrics"),
        # the source's own warm start, so a multi-stage bundle keeps its whole lineage
        "initialised_from": prev.get("initialised_from"),
    }
    return src, note, (None if same_data else (seen if seen is not None else frozenset()))


def _harvest_record(data: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """For a ``wsiflow harvest`` manifest: what the card says of the harvest, and the crop rule
    its images were cut with (so ``wsiflow pipeline derive`` can pin it)."""
    meta_path = Path(data).parent / "harvest.json"
    if Path(data).suffix.lower() != ".csv" or not meta_path.is_file():
        return {}, None
    import orjson

    meta = orjson.loads(meta_path.read_bytes())
    rounds = meta.get("rounds") or []
    note = {
        "harvest": {
            "manifest": str(Path(data).resolve()),
            "manifest_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(),
            "n_cells": meta.get("n_cells"),
            "rounds": [
                {k: r.get(k) for k in ("at", "results", "pipelines", "added", "relabelled")} for r in rounds
            ],
            "labels": "set by the lab's hematologists in QuPath, harvested with `wsiflow harvest`",
        }
    }
    crop = meta.get("crop")
    return note, crop if isinstance(crop, dict) else None


def _warm_start(model: torch.nn.Module, src: ModelBundle) -> None:
    try:
        model.load_state_dict(src.state_dict(), strict=True)
    except RuntimeError as exc:
        raise ConfigError(
            str(src.weights_path), "init_from", f"weights do not fit ({str(exc).splitlines()[0]})"
        ) from None


def train_classifier(cfg: TrainClassifierConfig, progress: ProgressFn | None = None) -> ModelBundle:
    """Train, keep the best epoch by validation loss, write the bundle; return it loaded."""
    emit = progress or (lambda _e, _i: None)
    check_input_px(cfg.input_px)
    for key, val, ok in (
        ("schedule", cfg.schedule, ("constant", "cosine", "onecycle")),
        ("balance", cfg.balance, ("weights", "sampler", "none")),
    ):
        if val not in ok:
            raise ConfigError("train classifier", key, f"must be one of {ok}, got {val!r}")
    if cfg.mpp <= 0 or cfg.mpp > 10:
        raise ConfigError("train classifier", "mpp", f"must be within (0, 10] µm/px, got {cfg.mpp}")
    name = cfg.name or cfg.out.with_suffix("").name
    work = cfg.work_dir or cfg.out.parent / f"{name}.train"
    work.mkdir(parents=True, exist_ok=True)
    threads = common.set_threads(cfg.threads)
    device = common.pick_device(cfg.device)
    common.seed_everything(cfg.seed)
    use_bf16 = device.type == "cpu" and (
        cfg.bf16 if cfg.bf16 is not None else common.cpu_autocast_dtype() is not None
    )

    samples = D.discover(cfg.data, [str(m["code"]) for m in cfg.classes_meta] if cfg.classes_meta else None)
    rel = samples.relpaths()
    digests = D.content_digests(samples.paths)
    data_sha = hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
    data_name = str(cfg.training_data.get("name", cfg.data.name))
    split = D.split_indices(samples.labels, cfg.seed, samples.groups)
    init_src: tuple[ModelBundle, dict[str, Any]] | None = None
    n_seen_here = 0
    if cfg.init_from is not None:  # checked (and described in the card) on a resume too
        src, init_note_src, src_seen = _init_source(cfg.init_from, samples.classes, data_name, data_sha)
        same_split = src.card.get("split", {}).get("test_sha256") == D.split_digest(
            [rel[i] for i in split["test"]]
        )
        if not same_split:
            if src_seen is None:
                raise ConfigError(
                    str(src.weights_path),
                    "init_from",
                    "trained on a different split of the same data (its test images would be trained on)",
                )
            forbid = np.array([d in src_seen for d in digests], bool)
            n_seen_here = int(forbid.sum())
            split = D.split_disjoint(samples.labels, cfg.seed, samples.groups, forbid)
            init_note_src = {
                **init_note_src,
                "test_split": f"kept disjoint from the source's training images ({n_seen_here} of them here)",
            }
        init_src = (src, init_note_src)
    with Image.open(samples.paths[0]) as im0:
        src_w, src_h = im0.size
    emit(
        "start",
        {
            "n": len(samples),
            "classes": samples.classes,
            "device": str(device),
            "threads": threads,
            "bf16": use_bf16,
            "work_dir": str(work),
        },
    )
    cropper = None
    if cfg.crop_pipeline is not None:
        from wsiflow.config import load_pipeline
        from wsiflow.train.field_crops import FieldCropper

        crop_pipe = load_pipeline(cfg.crop_pipeline)
        cropper = FieldCropper(crop_pipe, cfg.mpp, cfg.input_px, "cpu")
        key = orjson.dumps(crop_pipe.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS).decode()
        images = D.load_images(samples.paths, cfg.input_px, work / "cache", cropper, key)
    else:
        images = D.load_images(samples.paths, cfg.input_px, cache_dir=work / "cache")
    labels = samples.labels
    tr, va, te = split["train"], split["val"], split["test"]
    if len(va) == 0 or len(tr) == 0:
        raise ConfigError(str(cfg.data), "", "too few images to split into train/val/test")
    mean, std = D.channel_stats(images[tr])
    k = len(samples.classes)
    counts = np.bincount(labels[tr], minlength=k).astype(np.float64)
    inv = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / k, 0.0)
    class_w = torch.tensor(inv, dtype=torch.float32) if cfg.balance == "weights" else None

    model = build_inception_v3(k, aux_logits=False, dropout=cfg.dropout, init_weights=True)
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = (
        torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.weight_decay > 0
        else torch.optim.Adam(model.parameters(), lr=cfg.lr)
    )
    steps_per_epoch = max(1, len(tr) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    last, best = work / "last", work / "best"
    state: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "best_val_loss": math.inf,
        "best_epoch": 0,
        "history": [],
        "stopped": None,
    }
    if cfg.resume:
        loaded = common.load_checkpoint(last, model, opt)
        if loaded is not None:
            if loaded.get("split_test_sha256") != D.split_digest([rel[i] for i in te]):
                raise ConfigError(
                    str(work), "", "the checkpoint was trained on a different data split; use --no-resume"
                )
            state.update(loaded)
            emit("resume", {"epoch": state["epoch"]})
    init_note = None
    if init_src is not None:
        src, init_note = init_src
        if int(state["epoch"]) == 0:
            _warm_start(model, src)
            emit("init", init_note)
    loss_w = class_w.to(device) if class_w is not None else None
    criterion = torch.nn.CrossEntropyLoss(weight=loss_w, label_smoothing=cfg.label_smoothing)
    t_start = time.monotonic()
    wall_budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf

    while state["epoch"] < cfg.epochs and state["stopped"] is None:
        epoch = int(state["epoch"]) + 1
        rng = np.random.default_rng([cfg.seed, epoch])
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        if cfg.balance == "sampler":
            p = (1.0 / counts[labels[tr]]) / (1.0 / counts[labels[tr]]).sum()
            order = rng.choice(tr, size=len(tr), replace=True, p=p)
        else:
            order = rng.permutation(tr)
        model.train()
        w0, c0 = time.perf_counter(), time.process_time()
        run_loss, seen = 0.0, 0
        for b in range(steps_per_epoch):
            idx = np.sort(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
            lr = common.lr_at(int(state["step"]), total_steps, cfg.lr, cfg.schedule)
            for g in opt.param_groups:
                g["lr"] = lr
            x = D.normalize(D.augment(D.to_float(images[idx], device), gen), mean, std)
            y = torch.from_numpy(labels[idx]).to(device)
            with torch.autocast(
                device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16 or device.type == "cuda"
            ):
                logits = model(x)
            loss = criterion(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["step"] = int(state["step"]) + 1
            run_loss += float(loss.item()) * len(idx)
            seen += len(idx)
            emit(
                "batch", {"epoch": epoch, "batch": b + 1, "batches": steps_per_epoch, "loss": run_loss / seen}
            )
        train_wall, train_cpu = time.perf_counter() - w0, time.process_time() - c0
        v_loss, v_acc, v_f1, _ = _evaluate(model, images[va], labels[va], mean, std, device, class_w)
        rec = EpochRecord(
            epoch,
            run_loss / max(seen, 1),
            v_loss,
            v_acc,
            v_f1,
            lr,
            round(train_wall, 2),
            round(train_cpu, 2),
            round(seen / train_wall, 2),
        )
        state["history"] = [*state["history"], asdict(rec)]
        state["epoch"] = epoch
        if v_loss < state["best_val_loss"]:
            state["best_val_loss"], state["best_epoch"] = v_loss, epoch
            common.save_checkpoint(best, model, None, {"epoch": epoch, "val_loss": v_loss})
        if epoch - int(state["best_epoch"]) >= cfg.patience:
            state["stopped"] = f"early stopping: no better validation loss for {cfg.patience} epochs"
        elif time.monotonic() - t_start > wall_budget and epoch < cfg.epochs:
            state["stopped"] = f"wall-clock budget of {cfg.max_minutes} min reached"
        state["split_test_sha256"] = D.split_digest([rel[i] for i in te])
        common.save_checkpoint(last, model, opt, state)
        emit("epoch", {**asdict(rec), "best_epoch": state["best_epoch"]})

    if common.load_checkpoint(best, model) is None:
        raise ConfigError(str(work), "", "no finished epoch to ship")
    bn_note: dict[str, Any] = {"applied": False}
    if cfg.bn_recalibrate:
        emit("recalibrate", {"n": len(tr)})
        before = _evaluate(model, images[va], labels[va], mean, std, device, class_w)[0]
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        recalibrate_bn(model, images[tr], mean, std, device, use_bf16 or device.type == "cuda")
        after = _evaluate(model, images[va], labels[va], mean, std, device, class_w)[0]
        bn_note = {
            "val_loss_before": round(before, 4),
            "val_loss_after": round(after, 4),
            "applied": after < before,
        }
        if after >= before:
            model.load_state_dict(saved)
    emit("calibrate", {"n": len(va)})
    val_probs = _evaluate(model, images[va], labels[va], mean, std, device, None)[3]
    temperature = fit_temperature(log_probs(val_probs), labels[va])
    calibration, _, _ = calibration_summary(val_probs, labels[va], temperature)
    calibration = {
        **calibration,
        "fitted_on": f"validation split (n = {len(va)}), no TTA",
        "method": "temperature scaling (minimum NLL, bounded search over log T)",
    }
    metrics: dict[str, Any] = {}
    for split_name, ids in (("val", va), ("test", te)):
        if len(ids):
            loss_s, acc_s, f1_s, _ = _evaluate(model, images[ids], labels[ids], mean, std, device, None)
            metrics[split_name] = {
                "n": len(ids),
                "accuracy": round(acc_s, 4),
                "macro_f1": round(f1_s, 4),
                "loss": round(loss_s, 4),
            }
    hist = state["history"]
    cpu_per_epoch = float(np.median([h["cpu_s"] for h in hist])) if hist else None
    wall_per_epoch = float(np.median([h["wall_s"] for h in hist])) if hist else None
    ips = float(np.median([h["images_per_s"] for h in hist])) if hist else None
    input_mpp = cfg.mpp * max(src_w, src_h) / cfg.input_px
    harvest_note, crop = _harvest_record(cfg.data)
    if cropper is not None:  # crops at the pipeline's cls_mpp, bbox (+ pad) resized to input_px
        input_mpp = cropper.pipeline.resolution.cls_mpp
    crop_entry: dict[str, Any] = {"crop": crop} if crop else {}  # only a harvest has a crop rule
    card = CardContent(
        name=name,
        task="classifier",
        architecture="inception_v3",
        kwargs={"num_classes": k, "aux_logits": False, "dropout": cfg.dropout},
        classes=_class_entries(samples.classes, cfg.classes_meta),
        input_px=cfg.input_px,
        mpp=round(input_mpp, 4),
        source_mpp=cfg.mpp,
        preprocessing=(cropper.describe() + "; RGB/255 then (x - mean) / std")
        if cropper is not None
        else (
            f"whole {src_w}x{src_h} image centred on a black {max(src_w, src_h)}-px square (not stretched), "
            f"resized (bilinear, antialiased) to {cfg.input_px}x{cfg.input_px}; "
            "RGB/255 then (x - mean) / std"
        ),
        normalization=Normalization(mean=[round(v, 5) for v in mean], std=[round(v, 5) for v in std]),
        training_data={"name": data_name, **cfg.training_data, **harvest_note},
        metrics=metrics,
        calibration=Calibration.model_validate(calibration),
        **crop_entry,
        split_seed=cfg.seed,
        split={
            "method": "stratified-group" if samples.groups is not None else "stratified",
            "fractions": [0.8, 0.1, 0.1],
            "counts": {"train": len(tr), "val": len(va), "test": len(te)},
            "test_sha256": D.split_digest([rel[i] for i in te]),
            "data_sha256": data_sha,
            # content digests of the training + validation images: a later warm start from
            # this bundle keeps its test split disjoint from them
            "seen": sorted({digests[i] for i in np.concatenate([tr, va])}),
            # which images are val / test, by content: `wsiflow evaluate` and `calibrate`
            # find them again even when the split was made disjoint from a warm-start source
            "val_digests": sorted({digests[i] for i in va}),
            "test_digests": sorted({digests[i] for i in te}),
        },
        training={
            "optimizer": "AdamW" if cfg.weight_decay > 0 else "Adam",
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "schedule": cfg.schedule,
            "batch_size": cfg.batch_size,
            "max_epochs": cfg.epochs,
            "epochs_run": int(state["epoch"]),
            "best_epoch": int(state["best_epoch"]),
            "stopped": state["stopped"] or "reached max epochs",
            "patience": cfg.patience,
            "balance": cfg.balance,
            "label_smoothing": cfg.label_smoothing,
            "augmentation": "flips, 90-degree rotations, scale +-8%, shift +-6%, colour/stain jitter +-8%",
            "precision": "bf16 autocast" if use_bf16 or device.type == "cuda" else "fp32",
            "device": str(device),
            "threads": threads,
            "cpu_s_per_epoch_median": cpu_per_epoch,
            "wall_s_per_epoch_median": wall_per_epoch,
            "train_images_per_s_median": ips,
            "history": hist,
            "bn_recalibration": bn_note,
            "initialised_from": init_note,
            "notes": cfg.notes,
        },
        demo=False,
    )
    bundle = save_bundle(model, card, cfg.out, fp16=cfg.fp16_storage)
    emit("end", {"bundle": str(bundle.weights_path), "metrics": metrics})
    return bundle

"""``wsiflow train``: the ``classifier`` command (the ``segmenter`` command lives here too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from wsiflow.cli._app import app
from wsiflow.cli._progress import EpochBar

train_app = typer.Typer(help="Train a classifier or segmenter bundle.", no_args_is_help=True)
app.add_typer(train_app, name="train")


def _announce(event: str, info: dict[str, Any]) -> bool:
    """The events both trainers report alike; True when ``event`` was one of them."""
    if event == "recalibrate":
        typer.echo(f"recomputing BatchNorm statistics on {info['n']} training images", err=True)
    elif event == "resume":
        typer.echo(f"resuming after epoch {info['epoch']}", err=True)
    elif event == "end":
        typer.echo(f"wrote {info['bundle']}: {info['metrics']}")
    else:
        return False
    return True


def _taxonomy(path: Path | None) -> tuple[dict[str, Any], ...] | None:
    """Class metadata from a pipeline name/YAML (its taxonomy) or a JSON list of classes."""
    if path is None:
        return None
    if path.suffix.lower() == ".json":
        import orjson

        from wsiflow.errors import ConfigError

        try:
            data = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise ConfigError(str(path), "", f"cannot read class list ({exc})") from None
        if not isinstance(data, list) or not all(isinstance(c, dict) and "code" in c for c in data):
            raise ConfigError(str(path), "", "expected a JSON list of {code, name, lineage, ...} objects")
        return tuple(data)
    from wsiflow.config import load_pipeline

    pipe = load_pipeline(str(path) if path.suffix else path.name)
    return tuple(c.model_dump() for c in pipe.taxonomy)


@train_app.command("classifier")
def classifier(
    data: Path = typer.Argument(
        ..., help="Folder with one sub-folder per class, or a CSV manifest path,label[,group]."
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Bundle to write: NAME.safetensors (+ NAME.json)."),
    mpp: float = typer.Option(..., "--mpp", help="µm per pixel of the training images as stored."),
    crops_from_pipeline: str | None = typer.Option(
        None,
        "--crops-from-pipeline",
        help="Crop each field as this pipeline does (segmenter, crop rule, cls_mpp), not use it whole.",
    ),
    input_px: int = typer.Option(96, "--input-px", help="Network input size (>= 75; the paper used 64)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    epochs: int = typer.Option(200, "--epochs", help="Maximum epochs (early stopping on validation loss)."),
    lr: float = typer.Option(1e-4, "--lr", help="Adam learning rate (peak rate for onecycle)."),
    schedule: str = typer.Option("constant", "--schedule", help="constant | cosine | onecycle"),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="> 0 switches Adam to AdamW."),
    patience: int = typer.Option(20, "--patience", help="Early-stopping patience in epochs."),
    balance: str = typer.Option(
        "weights", "--balance", help="weights (class-weighted loss) | sampler | none"
    ),
    label_smoothing: float = typer.Option(0.0, "--label-smoothing"),
    seed: int = typer.Option(0, "--seed", help="Split and training seed (saved in the card)."),
    taxonomy: Path | None = typer.Option(
        None, "--taxonomy", help="Pipeline name/YAML or JSON class list: class order, names, colours."
    ),
    work_dir: Path | None = typer.Option(
        None, "--work-dir", help="Checkpoints and image cache (default OUT.train/)."
    ),
    threads: int | None = typer.Option(None, "--threads", help="Torch CPU threads (default: all)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    bf16: bool | None = typer.Option(
        None, "--bf16/--no-bf16", help="bf16 autocast on CPU (default: if supported)."
    ),
    fp16_storage: bool = typer.Option(False, "--fp16", help="Store weights as float16 (loaded as float32)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the last checkpoint."),
    max_minutes: float | None = typer.Option(
        None, "--max-minutes", help="Stop after this wall time; ship best."
    ),
    data_name: str | None = typer.Option(None, "--data-name", help="Training data name for the card."),
    data_licence: str = typer.Option("unknown", "--data-licence", help="Training data licence for the card."),
    data_description: str = typer.Option("", "--data-description"),
    notes: str = typer.Option("", "--notes", help="Free text stored in the card."),
    bn_recalibrate: bool = typer.Option(
        True,
        "--bn-recalibrate/--no-bn-recalibrate",
        help="Recompute BatchNorm stats at the end (kept if val improves).",
    ),
    init_from: Path | None = typer.Option(
        None,
        "--init-from",
        help="Warm start from a classifier bundle trained on the same classes and split.",
    ),
) -> None:
    """Train an InceptionV3 cell classifier (from scratch, or --init-from a bundle) and write a bundle."""

    from wsiflow.train.classifier import TrainClassifierConfig, train_classifier

    bar = EpochBar("val_acc")

    def progress(event: str, info: dict[str, Any]) -> None:
        if _announce(event, info):
            return
        if event == "start":
            typer.echo(
                f"{info['n']} images, classes {list(info['classes'])}; device {info['device']}, "
                f"{info['threads']} threads, bf16 {info['bf16']}; work dir {info['work_dir']}",
                err=True,
            )
        elif event == "init":
            typer.echo(f"initialised from {info['bundle']} (sha256 {info['sha256'][:12]}…)", err=True)
        elif event == "batch":
            bar.batch(info)
        elif event == "epoch":
            bar.epoch_done(info["val_acc"])
            typer.echo(
                f"epoch {info['epoch']}: loss {info['train_loss']:.4f} val_loss {info['val_loss']:.4f} "
                f"val_acc {info['val_acc']:.4f} val_f1 {info['val_macro_f1']:.4f} lr {info['lr']:.2e} "
                f"{info['wall_s']:.0f}s wall {info['cpu_s']:.0f}s cpu {info['images_per_s']:.1f} img/s "
                f"(best {info['best_epoch']})",
                err=True,
            )

    cfg = TrainClassifierConfig(
        data=data,
        out=out,
        mpp=mpp,
        crop_pipeline=crops_from_pipeline,
        work_dir=work_dir,
        input_px=input_px,
        batch_size=batch_size,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        patience=patience,
        balance=balance,
        label_smoothing=label_smoothing,
        seed=seed,
        threads=threads,
        device=device,
        bf16=bf16,
        fp16_storage=fp16_storage,
        resume=resume,
        max_minutes=max_minutes,
        classes_meta=_taxonomy(taxonomy),
        training_data={
            "name": data_name or data.name,
            "licence": data_licence,
            "description": data_description,
        },
        notes=notes,
        bn_recalibrate=bn_recalibrate,
        init_from=init_from,
    )
    train_classifier(cfg, progress)


@train_app.command("segmenter")
def segmenter(
    images: Path = typer.Argument(..., help="Folder of images (PNG/JPEG/BMP/TIFF)."),
    masks: Path = typer.Argument(
        ...,
        help="Folder of masks with the same file stems: 0 background, >0 cell "
        "(0/128/255 = background/cytoplasm/nucleus also gives a nucleus channel).",
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Bundle to write: NAME.safetensors (+ NAME.json)."),
    mpp: float = typer.Option(..., "--mpp", help="µm per pixel of the images as stored."),
    unlabelled: Path | None = typer.Option(
        None,
        "--unlabelled",
        help="Folder of masks with the same stems marking (>0) pixels nobody annotated: left out of "
        "the loss (fields where only some cells are masked).",
    ),
    target_mpp: float | None = typer.Option(
        None, "--target-mpp", help="µm/px the network works at (default --mpp)."
    ),
    depth: int = typer.Option(4, "--depth"),
    width: int = typer.Option(8, "--width", help="Channels of the first U-Net level (doubled per level)."),
    crop: int = typer.Option(64, "--crop", help="Training crop size in px."),
    batch_size: int = typer.Option(16, "--batch-size"),
    epochs: int = typer.Option(30, "--epochs"),
    lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate."),
    schedule: str = typer.Option("onecycle", "--schedule", help="constant | cosine | onecycle"),
    val_fraction: float = typer.Option(0.1, "--val-fraction"),
    patience: int = typer.Option(10, "--patience", help="Stop after N epochs without a better val Dice."),
    repeat: list[str] = typer.Option(
        [], "--repeat", help="PREFIX=N: images whose name starts with PREFIX appear N× per epoch."
    ),
    seed: int = typer.Option(0, "--seed", help="Split and training seed (saved in the card)."),
    work_dir: Path | None = typer.Option(None, "--work-dir", help="Checkpoints, split (default OUT.train/)."),
    threads: int | None = typer.Option(None, "--threads", help="Torch CPU threads (default: all)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    fp16_storage: bool = typer.Option(False, "--fp16", help="Store weights as float16."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the last checkpoint."),
    max_minutes: float | None = typer.Option(
        None, "--max-minutes", help="Training time budget: the LR schedule follows it; stops when spent."
    ),
    epoch_size: int | None = typer.Option(None, "--epoch-size", help="Training crops per epoch."),
    init_from: str | None = typer.Option(
        None, "--init-from", help="Warm start from a segmenter bundle (its weights and input normalisation)."
    ),
    data_name: str | None = typer.Option(None, "--data-name"),
    data_licence: str = typer.Option("unknown", "--data-licence"),
    data_description: str = typer.Option("", "--data-description"),
    notes: str = typer.Option("", "--notes"),
) -> None:
    """Train a U-Net nucleated-cell segmenter (Dice + BCE) and write a bundle."""

    from wsiflow.errors import ConfigError
    from wsiflow.train.segmenter import TrainSegmenterConfig, train_segmenter

    reps: dict[str, int] = {}
    for item in repeat:
        prefix, _, n = item.rpartition("=")
        if not prefix or not n.isdigit():
            raise ConfigError("train segmenter", "--repeat", f"expected PREFIX=N, got {item!r}")
        reps[prefix] = int(n)
    bar = EpochBar("val_dice")

    def progress(event: str, info: dict[str, Any]) -> None:
        if _announce(event, info):
            return
        if event == "start":
            typer.echo(
                f"{info['n']} images ({info['train']} train / {info['val']} val), {info['channels']} output "
                f"channel(s); device {info['device']}, {info['threads']} threads; "
                f"work dir {info['work_dir']}",
                err=True,
            )
        elif event == "batch":
            bar.batch(info)
        elif event == "epoch":
            bar.epoch_done(info["val_dice"])
            typer.echo(
                f"epoch {info['epoch']}: loss {info['train_loss']:.4f} val_loss {info['val_loss']:.4f} "
                f"val_dice {info['val_dice']:.4f} val_iou {info['val_iou']:.4f} lr {info['lr']:.2e} "
                f"{info['epoch_s']:.0f}s {info['images_per_s']:.1f} img/s (best {info['best_epoch']})",
                err=True,
            )
        elif event == "timeout":
            typer.echo(f"--max-minutes reached after epoch {info['epoch']}", err=True)

    cfg = TrainSegmenterConfig(
        images=images,
        masks=masks,
        out=out,
        mpp=mpp,
        target_mpp=target_mpp,
        work_dir=work_dir,
        depth=depth,
        width=width,
        crop=crop,
        batch_size=batch_size,
        epochs=epochs,
        lr=lr,
        schedule=schedule,
        val_fraction=val_fraction,
        patience=patience,
        repeat=reps,
        seed=seed,
        threads=threads,
        device=device,
        fp16_storage=fp16_storage,
        resume=resume,
        max_minutes=max_minutes,
        epoch_size=epoch_size,
        training_data={
            "name": data_name or images.name,
            "licence": data_licence,
            "description": data_description,
        },
        notes=notes,
        init_from=init_from,
        unlabelled=unlabelled,
    )
    train_segmenter(cfg, progress)

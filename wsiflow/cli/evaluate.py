"""``wsiflow evaluate BUNDLE DATA -o DIR``: Table 3/4 metrics and ROC curves (or Dice/IoU)."""

from __future__ import annotations

from pathlib import Path

import typer

from wsiflow.cli._app import app


@app.command()
def evaluate(
    bundle: str = typer.Argument(..., help="Bundle name (shipped) or path to NAME.safetensors."),
    data: Path = typer.Argument(
        ..., help="Labelled images: class folders / CSV (classifier); masks or BCCD (segmenter)."
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder for the report files."),
    split: str = typer.Option(
        "test",
        "--split",
        help="test | val | train: the split saved in the card (verified); all: every image.",
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    batch_size: int = typer.Option(64, "--batch-size"),
    threads: int | None = typer.Option(None, "--threads", help="Torch CPU threads (default: all)."),
    mpp: float | None = typer.Option(None, "--mpp", help="Segmenter only: µm/px of the images."),
    tta: bool = typer.Option(False, "--tta", help="Classifier: average 8 flips/rotations (8x compute)."),
    partial: bool = typer.Option(
        False,
        "--partial-masks",
        help="Segmenter: masks mark only some cells (SegPC layout): recall, one-to-one matches, "
        "letterbox-band detections; --split test (held out) | tune | all.",
    ),
    pipeline: str | None = typer.Option(
        None, "--pipeline", help="Segmenter: post-processing settings of this pipeline (name or YAML)."
    ),
) -> None:
    """Evaluate a classifier (per-class Table 3, confusion matrix, ROC PNG) or a segmenter (Dice/IoU)."""
    from wsiflow.models.bundle import ModelBundle

    b = ModelBundle.load(bundle)
    if b.task == "segmenter":
        from wsiflow.train.common import pick_device, set_threads
        from wsiflow.train.seg_eval import evaluate_segmenter

        cfg = None
        if pipeline is not None:
            from wsiflow.config import load_pipeline

            cfg = load_pipeline(pipeline).segmenter.model_copy(
                update={"bundle": str(b.weights_path), "sha256": None}
            )
        set_threads(threads)
        result = evaluate_segmenter(
            b, data, out, mpp=mpp, cfg=cfg, split=split, device=str(pick_device(device)), partial=partial
        )
        summary = out / "summary.md"
        typer.echo(summary.read_text(encoding="utf-8") if summary.is_file() else str(result))
        return
    from wsiflow.train.evaluate import evaluate_classifier

    report = evaluate_classifier(
        b.weights_path, data, out, split=split, device=device, batch_size=batch_size, threads=threads, tta=tta
    )
    typer.echo((out / "report.md").read_text(encoding="utf-8"))
    typer.echo(f"accuracy {report.accuracy:.4f}  macro F1 {report.macro_f1}  → {out}", err=True)


@app.command()
def calibrate(
    bundle: str = typer.Argument(..., help="Classifier bundle name (shipped) or path to NAME.safetensors."),
    data: Path = typer.Argument(..., help="The labelled images it was trained on (its split is verified)."),
    split: str = typer.Option("val", "--split", help="val (default) | train | all; never test."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    batch_size: int = typer.Option(64, "--batch-size"),
    threads: int | None = typer.Option(None, "--threads", help="Torch CPU threads (default: all)."),
) -> None:
    """Fit the softmax temperature on the bundle's validation split and store it in its card.

    The weights are not touched (their sha256, which pipelines pin, stays the same); the
    pipeline applies the temperature to every cell, and `wsiflow evaluate` reports the
    expected calibration error before and after.
    """
    from wsiflow.train.evaluate import calibrate_classifier

    b, block = calibrate_classifier(
        bundle, data, split=split, device=device, batch_size=batch_size, threads=threads
    )
    typer.echo(
        f"{b.name}: temperature {block['temperature']} fitted on {block['fitted_on']}; "
        f"ECE {block['ece_raw']} -> {block['ece_calibrated']}, NLL {block['nll_raw']} -> "
        f"{block['nll_calibrated']} (card {b.card_path})"
    )

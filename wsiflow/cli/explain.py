"""``wsiflow explain BUNDLE IMAGES -o DIR``: Grad-CAM heat maps over cell crops."""

from __future__ import annotations

from pathlib import Path

import typer

from wsiflow.cli._app import app

_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


def _expand(items: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in items:
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in _SUFFIXES and q.is_file())
        else:
            out.append(p)
    return out


@app.command()
def explain(
    bundle: str = typer.Argument(..., help="Classifier bundle name or path to NAME.safetensors."),
    images: list[Path] = typer.Argument(..., help="Cell images or folders of them.", show_default=False),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder for the PNGs."),
    layer: str = typer.Option("Mixed_6e", "--layer", help="Layer whose activations are weighted."),
    target: str | None = typer.Option(
        None, "--target", help="Class code to explain (default: the prediction)."
    ),
    limit: int = typer.Option(200, "--limit", help="At most this many images."),
) -> None:
    """Write, per image, the crop beside its Grad-CAM overlay (PNG), and explain.csv."""
    import csv
    import io

    import numpy as np
    from PIL import Image

    from wsiflow.atomic import atomic_write_bytes
    from wsiflow.errors import ConfigError, ModelError
    from wsiflow.models.bundle import ModelBundle
    from wsiflow.train.data import load_image
    from wsiflow.train.gradcam import grad_cam, overlay

    b = ModelBundle.load(bundle)
    if b.task != "classifier" or b.input_px is None:
        raise ModelError(f"{b.weights_path}: Grad-CAM needs a classifier bundle")
    codes = b.class_codes
    if target is not None and target not in codes:
        raise ConfigError("explain", "--target", f"{target!r} is not one of {list(codes)}")
    paths = _expand(images)[:limit]
    if not paths:
        raise ConfigError("explain", "IMAGES", "no images found")
    model = b.build("cpu")
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "png", "explained", "predicted", "p_predicted"])
    for start in range(0, len(paths), 16):
        chunk = paths[start : start + 16]
        arr = np.stack([load_image(p, b.input_px) for p in chunk])
        tgts = [codes.index(target)] * len(chunk) if target is not None else None
        cams = grad_cam(model, arr, b.mean, b.std, layer, tgts)
        for j, (p, img, res) in enumerate(zip(chunk, arr, cams, strict=True)):
            pred = int(res.probs.argmax())
            panel = np.concatenate(
                [img, np.full((img.shape[0], 4, 3), 255, np.uint8), overlay(img, res.heatmap)], 1
            )
            panel = np.asarray(Image.fromarray(panel).resize((panel.shape[1] * 2, panel.shape[0] * 2)))
            name = f"{start + j:04d}_{p.stem}_{codes[res.target]}.png"
            png = io.BytesIO()
            Image.fromarray(panel).save(png, format="PNG")
            atomic_write_bytes(out / name, png.getvalue(), fsync=False)
            w.writerow([str(p), name, codes[res.target], codes[pred], f"{res.probs[pred]:.4f}"])
    atomic_write_bytes(out / "explain.csv", buf.getvalue().encode())
    typer.echo(f"wrote {len(paths)} Grad-CAM panels (crop | overlay, layer {layer}) to {out}")

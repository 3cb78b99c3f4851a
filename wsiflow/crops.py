"""The crop rule (``bbox-square``, the paper's): torch-free, one place for every user.

:func:`square_box` pads a cell's bounding box by ``pad_px`` on every side and takes the
integer square around its centre; :func:`crop_cells` cuts those squares out of an image
read at the classifier's µm/px, zero-pads whatever falls outside it and resizes them to
the network input. The classifier (:mod:`wsiflow.pipeline.batch`), the generated training
crops (:mod:`wsiflow.synth.crops`) and the report's gallery (:mod:`wsiflow.writers.report`)
all use this rule, so a gallery shows the cell as the classifier saw it.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = ["crop_cells", "square_box"]


def square_box(bbox_img: np.ndarray, pad_px: float) -> tuple[int, int, int]:
    """(x0, y0, x1, y1) in image px → integer square (left, top, side) around its centre."""
    x0, y0, x1, y1 = (float(v) for v in bbox_img)
    side = max(x1 - x0, y1 - y0) + 2 * pad_px
    side_i = max(1, math.ceil(side))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return math.floor(cx - side_i / 2 + 0.5), math.floor(cy - side_i / 2 + 0.5), side_i


def crop_cells(
    image: np.ndarray,
    origin_xy: tuple[float, float],
    scale: float,
    bboxes: np.ndarray,
    pad_px: float,
    out_px: int,
) -> np.ndarray:
    """Square, zero-padded crops of each cell, resized to ``out_px`` → uint8 (n, out_px, out_px, 3).

    ``image`` is RGB read at the classifier's µm/px, its top-left at level-0 ``origin_xy``;
    ``scale`` is level-0 px per image px; ``bboxes`` are level-0 (x0, y0, x1, y1);
    ``pad_px`` is the margin added on every side, in image px.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (h, w, 3) RGB, got shape {image.shape}")
    if scale <= 0:
        raise ValueError("scale must be positive")
    boxes = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    out = np.zeros((len(boxes), out_px, out_px, 3), dtype=np.uint8)
    h, w = image.shape[:2]
    ox, oy = origin_xy
    for i, b in enumerate(boxes):
        img_box = np.array(
            [(b[0] - ox) / scale, (b[1] - oy) / scale, (b[2] - ox) / scale, (b[3] - oy) / scale]
        )
        left, top, side = square_box(img_box, pad_px)
        canvas = np.zeros((side, side, 3), dtype=np.uint8)
        sx0, sy0 = max(left, 0), max(top, 0)
        sx1, sy1 = min(left + side, w), min(top + side, h)
        if sx1 > sx0 and sy1 > sy0:
            canvas[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = image[sy0:sy1, sx0:sx1]
        if side == out_px:
            out[i] = canvas
        else:
            out[i] = np.asarray(Image.fromarray(canvas).resize((out_px, out_px), Image.Resampling.BILINEAR))
    return out

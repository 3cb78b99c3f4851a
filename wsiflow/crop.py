"""Cell crops for the classifier: pure numpy/PIL (no torch, so the report draws its gallery
with the same code). :func:`crop_cells`, with two crop rules (``classifier.crop.rule``):

* ``bbox-square`` (wsiflow's default): the cell's bounding box plus ``pad_um`` on every
  side, made square around its centre *with the neighbouring pixels* (context), black only
  where the square leaves the image, resized to the network input;
* ``bbox-zero-pad`` (the seed's published code, Lee et al. 2022): the bounding box (plus
  ``pad_um``; 0 gives the seed's crop exactly) centred on a black square, so nothing
  around the cell is seen, resized to the network input.

Neither is a stretch: a non-square box is never resized to a square.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = ["CROP_RULES", "crop_cells", "square_box"]

CROP_RULES = ("bbox-square", "bbox-zero-pad")


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
    rule: str = "bbox-square",
) -> np.ndarray:
    """Square crops of each cell by ``rule``, resized to ``out_px`` → uint8 (n, out_px, out_px, 3).

    ``image`` is RGB read at the classifier's µm/px, its top-left at level-0 ``origin_xy``;
    ``scale`` is level-0 px per image px; ``bboxes`` are level-0 (x0, y0, x1, y1);
    ``pad_px`` is the margin added on every side, in image px.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (h, w, 3) RGB, got shape {image.shape}")
    if scale <= 0:
        raise ValueError("scale must be positive")
    if rule not in CROP_RULES:
        raise ValueError(f"unknown crop rule {rule!r} (known: {', '.join(CROP_RULES)})")
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
        if rule == "bbox-square":  # the square's own pixels: the cell and its neighbourhood
            sx0, sy0, sx1, sy1 = left, top, left + side, top + side
        else:  # bbox-zero-pad: only the (padded) bounding box, centred on black
            sx0 = math.floor(img_box[0] - pad_px + 0.5)
            sy0 = math.floor(img_box[1] - pad_px + 0.5)
            sx1 = max(sx0 + 1, math.floor(img_box[2] + pad_px + 0.5))
            sy1 = max(sy0 + 1, math.floor(img_box[3] + pad_px + 0.5))
            sx0, sy0 = max(sx0, left), max(sy0, top)
            sx1, sy1 = min(sx1, left + side), min(sy1, top + side)
        sx0, sy0 = max(sx0, 0), max(sy0, 0)
        sx1, sy1 = min(sx1, w), min(sy1, h)
        if sx1 > sx0 and sy1 > sy0:
            canvas[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = image[sy0:sy1, sx0:sx1]
        if side == out_px:
            out[i] = canvas
        else:
            out[i] = np.asarray(Image.fromarray(canvas).resize((out_px, out_px), Image.Resampling.BILINEAR))
    return out

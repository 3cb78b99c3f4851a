"""Training crops made the way inference makes them: segment each single-cell field image
with the pipeline's segmenter, take the cell nearest the field's centre, crop it at the
pipeline's ``cls_mpp`` by its crop rule (:func:`wsiflow.crops.crop_cells`) to ``input_px``.

So a classifier learns from exactly what the pipeline will feed it, not from whole fields
(pbc8 learned from whole 36 µm fields resized, which the pipeline never shows it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from wsiflow.config import Pipeline
from wsiflow.crops import crop_cells

__all__ = ["FieldCropper"]


def _resize(rgb: NDArray[np.uint8], factor: float) -> NDArray[np.uint8]:
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    if size == (w, h):
        return rgb
    resample = Image.Resampling.BOX if factor < 1 else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(rgb).resize(size, resample))


class FieldCropper:
    """``crop(field_rgb) -> (input_px, input_px, 3) uint8 | None`` (None: no cell found)."""

    def __init__(self, pipeline: Pipeline, field_mpp: float, input_px: int, device: str = "cpu") -> None:
        from wsiflow.segment import Segmenter

        self.pipeline = pipeline
        self.field_mpp = float(field_mpp)
        self.input_px = int(input_px)
        self.segmenter = Segmenter(pipeline.segmenter.bundle, pipeline.segmenter, device)
        self.found = 0
        self.missed = 0

    def __call__(self, field: NDArray[np.uint8]) -> NDArray[np.uint8] | None:
        seg_mpp = self.pipeline.resolution.seg_mpp
        cls_mpp = self.pipeline.resolution.cls_mpp
        f = self.field_mpp / seg_mpp  # seg px per field px
        seg_img = np.require(_resize(field, f), requirements=["C", "W"])  # torch wants it writeable
        # coordinates in field px: origin (0, 0), 1/f field px per seg px
        cells, _ = self.segmenter.segment(seg_img, (0.0, 0.0), 1.0 / f, seg_mpp)
        if len(cells) == 0:
            self.missed += 1
            return None
        h, w = field.shape[:2]
        i = int(np.argmin(np.hypot(cells.x - w / 2, cells.y - h / 2)))
        g = self.field_mpp / cls_mpp  # cls px per field px
        crop = self.pipeline.classifier.crop
        out = crop_cells(
            _resize(field, g),
            (0.0, 0.0),
            1.0 / g,
            cells.bbox[i : i + 1],
            crop.pad_um / cls_mpp,
            self.input_px,
            crop.rule,
        )[0]
        self.found += 1
        return out

    def describe(self) -> str:
        p = self.pipeline
        r, crop = p.resolution, p.classifier.crop
        n = self.found + self.missed
        tail = (
            f"{self.missed} of {n} field(s) without a detected cell used whole, squared on black"
            if n
            else "crops read from the work folder's cache"
        )
        return (
            f"cells found by {p.segmenter.bundle} (pipeline {p.name!r}) on each field at {r.seg_mpp:g} µm/px;"
            " "
            "the one nearest the centre "
            f"cropped by {crop.rule} + {crop.pad_um:g} µm at {r.cls_mpp:g} µm/px "
            f"to {self.input_px} px (as the pipeline crops); {tail}"
        )


CropFn = Callable[[NDArray[np.uint8]], NDArray[np.uint8] | None]

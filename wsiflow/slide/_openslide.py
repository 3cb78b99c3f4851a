"""OpenSlide backend (Aperio, DICOM, Hamamatsu, MIRAX, generic tiled TIFF, …)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from wsiflow.slide._base import _raw_float


class OpenSlideBackend:
    """Reads one level's integer pixel grid through ``openslide.OpenSlide``.

    OpenSlide addresses regions in level-0 integers and maps them to ``x0 / downsample`` on
    the level, resampling when that is fractional (non-integer downsamples). We ask for the
    level-0 integer nearest the wanted level pixel and report the level coordinate actually
    sampled, so the caller's geometry stays exact to well under a level-0 pixel.
    """

    name = "openslide"

    def __init__(self, path: str) -> None:
        import openslide

        self._path = path
        # OpenSlide(), not open_slide(): the latter silently falls back to PIL for any image
        self._osr = openslide.OpenSlide(path)
        osr = self._osr
        self.properties: dict[str, str] = {str(k): str(v) for k, v in osr.properties.items()}
        vendor = self.properties.get("openslide.vendor")
        self.format: str = vendor or "unknown"
        self.vendor: str | None = None if vendor in (None, "generic-tiff") else vendor
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(osr.level_dimensions)
        self._ds: tuple[float, ...] = tuple(osr.level_downsamples)
        self.associated_images: tuple[str, ...] = tuple(osr.associated_images.keys())
        if self.format == "generic-tiff":
            self._check_generic_tiff(path)
        self.mpp_xy: tuple[object, object] = (
            self.properties.get("openslide.mpp-x"),
            self.properties.get("openslide.mpp-y"),
        )
        self.objective_power = _raw_float(self.properties.get("openslide.objective-power"))

    def _check_generic_tiff(self, path: str) -> None:
        """OpenSlide's generic reader converts anything libtiff reads to RGBA (16-bit,
        fluorescence channels, stacks); refuse those as TiffSlide does."""
        import tifffile

        from wsiflow.slide._tiffslide import check_series

        try:
            with tifffile.TiffFile(path) as tf:
                check_series(path, tf.series[0])
        except BaseException:
            self._osr.close()
            raise

    def read_level(
        self, level: int, x: int, y: int, w: int, h: int
    ) -> tuple[NDArray[np.uint8], float, float]:
        ds = self._ds[level]
        x0, y0 = round(x * ds), round(y * ds)
        img = self._osr.read_region((x0, y0), level, (w, h))
        return np.asarray(img), x0 / ds, y0 / ds

    def tile_size(self, level: int) -> tuple[int, int] | None:
        tw = self.properties.get(f"openslide.level[{level}].tile-width")
        th = self.properties.get(f"openslide.level[{level}].tile-height")
        try:
            return (int(tw), int(th)) if tw and th else None
        except ValueError:
            return None

    def recover(self) -> None:
        """OpenSlide latches the first read error on the handle; reopen it."""
        import openslide

        try:
            self._osr.close()
        finally:
            self._osr = openslide.OpenSlide(self._path)

    def close(self) -> None:
        self._osr.close()

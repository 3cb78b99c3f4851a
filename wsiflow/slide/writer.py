"""Write pyramidal tiled TIFFs that both OpenSlide and TiffSlide read (tests, ``wsiflow synth``).

Streaming: level 0 is written tile by tile from either an in-memory array or a callable
``region(x, y, w, h) -> uint8 (h, w, 3)``, so a 50k × 50k slide never sits in memory. While
level 0 streams, a box-reduced copy (by the largest power of two ≤ the first downsample) is
kept in a temporary memory-mapped file next to the output; the lower levels and the thumbnail
are resampled from it with an exact float box per tile (no seams).

``aperio=True`` writes the Aperio SVS layout (baseline, strip thumbnail, reduced levels) with
an ``Aperio Image Library`` description carrying ``MPP`` and ``AppMag``. ``aperio=False``
writes a generic tiled TIFF (levels as reduced-resolution pages); with ``mpp`` it also writes
centimetre resolution tags, which OpenSlide's generic-tiff reader turns into ``mpp``.
JPEG tiles are YCbCr 4:2:0, as scanners write them.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from wsiflow.atomic import atomic_path

RegionFn: TypeAlias = Callable[[int, int, int, int], NDArray[np.uint8]]

_APERIO_HEADER = "Aperio Image Library v12.0.15"
_THUMB_MAX = 1024


def default_downsamples(size: tuple[int, int], tile: int = 256, factor: int = 4) -> tuple[float, ...]:
    """1, 4, 16, … while the level is still at least one tile across on its short side."""
    ds = [1.0]
    while min(size) / (ds[-1] * factor) >= tile:
        ds.append(ds[-1] * factor)
    return tuple(ds)


def level_size(size: tuple[int, int], downsample: float) -> tuple[int, int]:
    """Level dimensions for a downsample (rounded, at least 1 px)."""
    return max(1, round(size[0] / downsample)), max(1, round(size[1] / downsample))


def write_pyramid_tiff(
    path: str | os.PathLike[str],
    tiles_or_array: NDArray[np.uint8] | RegionFn,
    size: tuple[int, int] | None = None,
    mpp: float | None = None,
    tile: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    aperio: bool = True,
    app_mag: float | None = None,
    downsamples: Sequence[float] | None = None,
    bigtiff: bool | None = None,
) -> Path:
    """Write a pyramidal tiled RGB TIFF atomically (temp name, then rename) and return its path.

    ``tiles_or_array``: a uint8 (H, W, 3) array, or a callable returning the level-0 RGB region
    ``(x, y, w, h)`` (``size`` then required). ``downsamples`` (first 1) may be non-integer.
    ``compression``: "jpeg" (YCbCr 4:2:0, ``quality``), "jpeg2000" (Aperio 33005, RGB J2K
    tiles, ``quality`` as the codec level), "zlib"/"deflate" (lossless), "lzw", "zstd" or "none".
    """
    out = Path(path)
    region, (width, height) = _as_region(tiles_or_array, size)
    if tile % 16:
        raise ValueError("tile must be a multiple of 16")
    ds_list = tuple(float(d) for d in (downsamples or default_downsamples((width, height), tile)))
    if ds_list[0] != 1.0 or any(b <= a for a, b in itertools.pairwise(ds_list)):
        raise ValueError("downsamples must start at 1 and increase")
    lower = ds_list[1:]
    reduce = _base_reduce(min(lower)) if lower else 1
    reduce = reduce if tile % reduce == 0 else 1
    if bigtiff is None:
        bigtiff = width * height * 3 > 2**31

    import tifffile

    codec = _codec(compression, quality)
    # Aperio JPEG 2000 slides keep a JPEG strip thumbnail (readers refuse J2K strips there)
    thumb_codec = _codec("jpeg", quality) if compression.lower() == "jpeg2000" else codec
    with atomic_path(out, fsync=False) as tmp:
        tmp_name = str(tmp)
        mm_path = tmp_name + ".reduced"
        try:
            rw, rh = math.ceil(width / reduce), math.ceil(height / reduce)
            reduced: np.memmap[Any, np.dtype[np.uint8]] = np.lib.format.open_memmap(
                mm_path, mode="w+", dtype=np.uint8, shape=(rh, rw, 3)
            )
            with tifffile.TiffWriter(tmp_name, bigtiff=bigtiff) as tif:
                desc0 = _aperio_desc(width, height, tile, quality, mpp, app_mag) if aperio else None
                tif.write(
                    _level0_tiles(region, width, height, tile, reduced, reduce),
                    shape=(height, width, 3),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    description=desc0,
                    **codec,
                    **_resolution(mpp, aperio),
                )
                reduced.flush()
                if aperio:
                    tw, th = _thumb_size(width, height)
                    full_box = (0.0, 0.0, width / reduce, height / reduce)
                    thumb = _resample(reduced, (rw, rh), full_box, (tw, th))
                    tif.write(
                        thumb,
                        description=f"{_APERIO_HEADER} \r\n{width}x{height} -> {tw}x{th} - |",
                        rowsperstrip=16,
                        **thumb_codec,
                    )
                for ds in lower:
                    lw, lh = level_size((width, height), ds)
                    desc = f"{_APERIO_HEADER} \r\n{width}x{height} -> {lw}x{lh} - |" if aperio else None
                    tif.write(
                        _level_tiles(reduced, (width / lw / reduce, height / lh / reduce), (lw, lh), tile),
                        shape=(lh, lw, 3),
                        dtype=np.uint8,
                        tile=(tile, tile),
                        description=desc,
                        subfiletype=0 if aperio else 1,
                        **codec,
                        **_resolution(mpp * width / lw if mpp else None, aperio),
                    )
            del reduced
        finally:
            if os.path.exists(mm_path):
                os.unlink(mm_path)
    return out


def _as_region(
    src: NDArray[np.uint8] | RegionFn, size: tuple[int, int] | None
) -> tuple[RegionFn, tuple[int, int]]:
    if callable(src):
        if size is None:
            raise ValueError("size=(width, height) is required with a region callable")
        return src, (int(size[0]), int(size[1]))
    arr = np.asarray(src)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) array, got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    if size is not None and tuple(size) != (w, h):
        raise ValueError(f"size {size} does not match the array ({w}, {h})")

    def region(x: int, y: int, rw: int, rh: int) -> NDArray[np.uint8]:
        return arr[y : y + rh, x : x + rw]

    return region, (w, h)


def _base_reduce(first_downsample: float) -> int:
    r = 1
    while r * 2 <= first_downsample + 1e-9:
        r *= 2
    return r


def _codec(compression: str, quality: int) -> dict[str, Any]:
    c = compression.lower()
    if c == "jpeg":
        return {
            "metadata": None,
            "compression": "jpeg",
            "compressionargs": {"level": quality},
            "photometric": "rgb",  # input colour space; tifffile stores YCbCr 4:2:0
            "subsampling": (2, 2),
        }
    if c in ("zlib", "deflate"):
        return {"compression": "zlib", "photometric": "rgb", "metadata": None}
    if c == "jpeg2000":  # Aperio 33005: a J2K codestream per tile, RGB
        return {"compression": 33005, "compressionargs": {"level": quality}, "photometric": "rgb",
                "metadata": None}
    if c in ("lzw", "zstd"):
        return {"compression": c, "photometric": "rgb", "metadata": None}
    if c == "none":
        return {"compression": None, "photometric": "rgb", "metadata": None}
    raise ValueError(f"unknown compression {compression!r}")


def _resolution(mpp: float | None, aperio: bool) -> dict[str, Any]:
    if mpp is None or aperio:
        return {"resolution": None}
    px_per_cm = 1e4 / mpp
    return {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}


def _aperio_desc(w: int, h: int, tile: int, quality: int, mpp: float | None, app_mag: float | None) -> str:
    parts = [f"{_APERIO_HEADER} \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q={quality}"]
    if app_mag is not None:
        parts.append(f"AppMag = {app_mag:g}")
    if mpp is not None:
        parts.append(f"MPP = {mpp:.6g}")
    return "|".join(parts)


def _thumb_size(w: int, h: int) -> tuple[int, int]:
    s = min(1.0, _THUMB_MAX / max(w, h))
    return max(1, round(w * s)), max(1, round(h * s))


def _level0_tiles(
    region: RegionFn,
    width: int,
    height: int,
    tile: int,
    reduced: NDArray[np.uint8],
    reduce: int,
) -> Iterator[NDArray[np.uint8]]:
    for ty in range(0, height, tile):
        th = min(tile, height - ty)
        for tx in range(0, width, tile):
            tw = min(tile, width - tx)
            data = np.asarray(region(tx, ty, tw, th), dtype=np.uint8)
            if data.shape != (th, tw, 3):
                raise ValueError(f"region({tx}, {ty}, {tw}, {th}) returned shape {data.shape}")
            r0, c0 = ty // reduce, tx // reduce
            small = _box_reduce(data, reduce)
            reduced[r0 : r0 + small.shape[0], c0 : c0 + small.shape[1]] = small
            if (th, tw) != (tile, tile):
                full = np.full((tile, tile, 3), 255, np.uint8)
                full[:th, :tw] = data
                data = full
            yield np.ascontiguousarray(data)


def _box_reduce(data: NDArray[np.uint8], r: int) -> NDArray[np.uint8]:
    if r == 1:
        return data
    h, w = data.shape[:2]
    ph, pw = -h % r, -w % r
    if ph or pw:
        data = np.pad(data, ((0, ph), (0, pw), (0, 0)), mode="edge")
    hh, ww = data.shape[0] // r, data.shape[1] // r
    acc = data.reshape(hh, r, ww, r, 3).astype(np.uint32).sum(axis=(1, 3))
    return ((acc + (r * r) // 2) // (r * r)).astype(np.uint8)


def _resample(
    src: NDArray[np.uint8],
    src_size: tuple[int, int],
    box: tuple[float, float, float, float],
    out: tuple[int, int],
) -> NDArray[np.uint8]:
    """Resample the float box ``(x0, y0, x1, y1)`` of ``src`` to ``out`` (w, h) with a box filter."""
    sw, sh = src_size
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(sw, math.ceil(box[2])), min(sh, math.ceil(box[3]))
    crop = np.ascontiguousarray(src[y0:y1, x0:x1])
    img = Image.fromarray(crop)
    rel = (box[0] - x0, box[1] - y0, min(box[2], sw) - x0, min(box[3], sh) - y0)
    return np.asarray(img.resize(out, Image.Resampling.BOX, box=rel))


def _level_tiles(
    reduced: NDArray[np.uint8],
    scale: tuple[float, float],
    level: tuple[int, int],
    tile: int,
) -> Iterator[NDArray[np.uint8]]:
    """Tiles of one level; ``scale`` = reduced-array px per level px on each axis."""
    reduced_size = (reduced.shape[1], reduced.shape[0])
    lw, lh = level
    sx, sy = scale
    for ty in range(0, lh, tile):
        th = min(tile, lh - ty)
        for tx in range(0, lw, tile):
            tw = min(tile, lw - tx)
            data = _resample(
                reduced, reduced_size, (tx * sx, ty * sy, (tx + tw) * sx, (ty + th) * sy), (tw, th)
            )
            full = np.full((tile, tile, 3), 255, np.uint8)
            full[:th, :tw] = data
            yield full

"""The Slide: typed metadata and µm/px-addressed reads over one backend (OpenSlide or TiffSlide).

A backend only reads in-bounds rectangles of one pyramid level in that level's integer
pixel grid (:class:`Backend`). Everything else (choosing the level, level coordinates,
padding, alpha, resizing, error wrapping) happens here, once, so both backends behave alike.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import orjson
from numpy.typing import NDArray
from PIL import Image

from wsiflow.errors import MppError, SlideError, SlideNotFound

MPP_MAX = 10.0
"""µm/px above this is not a brightfield scan (generic TIFF resolution tags give ~350)."""

LEVEL_TOLERANCE = 0.01
"""A level up to 1 % coarser than the target still counts as "at the target" (rounding in
level sizes makes e.g. 4.0004 out of an intended 4)."""

THUMBNAIL_CHUNK_PX = 1024
"""Side (level pixels) of one backend read while drawing a thumbnail (~3 MB of RGB)."""

_TYPE_IN_REASON = (KeyError, IndexError, ZeroDivisionError, NotImplementedError, AttributeError, TypeError)


class Backend(Protocol):
    """What a backend provides. Level coordinates are integers inside the level."""

    name: str
    format: str
    vendor: str | None
    level_dimensions: tuple[tuple[int, int], ...]
    properties: dict[str, str]
    associated_images: tuple[str, ...]
    mpp_xy: tuple[object, object]  # raw property values (str or float)
    objective_power: float | None

    def read_level(
        self, level: int, x: int, y: int, w: int, h: int
    ) -> tuple[NDArray[np.uint8], float, float]:
        """Pixels (h, w, C) of the level rectangle, C in 1..4, and the level coordinate of
        pixel [0, 0] actually sampled (equal to (x, y) unless the library resamples)."""
        ...

    def recover(self) -> None:
        """Make the handle usable again after a failed read (OpenSlide latches errors)."""
        ...

    def tile_size(self, level: int) -> tuple[int, int] | None:
        """The level's source tile (width, height) in level pixels, None if not tiled/known."""
        ...

    def close(self) -> None: ...


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """One short line describing a library exception."""
    msg = " ".join(str(exc).split())
    if isinstance(exc, KeyError) and msg.startswith("'"):
        msg = msg.strip("'")
    if not msg or isinstance(exc, _TYPE_IN_REASON):
        msg = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def parse_mpp(value: object) -> float | None:
    """A float µm/px from a property value, or None when missing, unparsable or implausible."""
    if value is None or value == "":
        return None
    try:
        mpp = float(str(value))
    except ValueError:
        return None
    if not math.isfinite(mpp) or mpp <= 0 or mpp > MPP_MAX:
        return None
    return mpp


def _raw_float(value: object) -> float | None:
    try:
        f = float(str(value))
    except ValueError:
        return None
    return f if math.isfinite(f) else None


def to_rgb(arr: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """(h, w, C) with C in 1..4 (grey, grey+alpha, RGB, RGBA) → RGB, alpha composited onto white."""
    if arr.ndim == 2:
        arr = arr[..., None]
    c = arr.shape[2]
    if c in (2, 4):
        alpha = arr[..., c - 1 :]
        color = arr[..., : c - 1]
        if alpha.size and int(alpha.min()) < 255:
            a = alpha.astype(np.uint16)
            color = ((color.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
        arr = color
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)



def slide_uid(path: str, identity: Mapping[str, Any], head_bytes: int = 1 << 20) -> str:
    """A short hex id of the slide itself (what seeds its cells' UUIDs): a hash of its size,
    dimensions and first MiB (local files; a URL's path stands in), so the same slide gets
    the same UUIDs in any output folder and under any name, and two slides never share them."""
    h = hashlib.sha256()
    h.update(orjson.dumps([identity.get("size_bytes"), identity.get("dimensions")]))
    if _is_url(path):
        h.update(path.encode("utf-8"))
    else:
        try:
            with open(path, "rb") as fh:
                h.update(fh.read(head_bytes))
        except OSError:
            h.update(str(Path(path).resolve()).encode("utf-8"))
    return h.hexdigest()[:32]


class Slide:
    """One open slide. Use :func:`open_slide`; close it (or use ``with``)."""

    def __init__(self, path: str, backend: Backend, mpp: float | None = None) -> None:
        self.path = path
        self._b = backend
        self.backend: str = backend.name
        self.format: str = backend.format
        self.vendor: str | None = backend.vendor
        self.properties: dict[str, str] = dict(backend.properties)
        self.associated_images: tuple[str, ...] = tuple(backend.associated_images)
        self.objective_power: float | None = backend.objective_power
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in backend.level_dimensions
        )
        if not self.level_dimensions or min(min(d) for d in self.level_dimensions) <= 0:
            raise SlideError(path, "image has zero width or height")
        self.dimensions: tuple[int, int] = self.level_dimensions[0]
        self.level_count: int = len(self.level_dimensions)
        w0, h0 = self.dimensions
        # level-0 px per level px, per axis (what the coordinates use) and averaged (as OpenSlide)
        self._scale_xy = tuple((w0 / w, h0 / h) for w, h in self.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple((sx + sy) / 2 for sx, sy in self._scale_xy)
        self.bounds_offset: tuple[int, int] = self._bounds(backend.name)
        self.mpp_note: str | None = None
        # source tiles that could not be decoded, read as white: (level, col, row) → their
        # level-0 box (x0, y0, x1, y1). Callers may clear it (e.g. per batch of grid tiles).
        self.unreadable: dict[tuple[int, int, int], tuple[float, float, float, float]] = {}
        self.mpp: float | None
        self.mpp_source: str | None
        if mpp is not None:
            if parse_mpp(mpp) is None:
                raise MppError(path, f"--mpp {mpp} is not plausible (must be > 0 and ≤ {MPP_MAX:g} µm/px)")
            self.mpp, self.mpp_source = float(mpp), "override"
        else:
            self.mpp, self.mpp_source = self._metadata_mpp(backend.mpp_xy)

    def _bounds(self, prefix: str) -> tuple[int, int]:
        """Level-0 (x, y) of the scanned region's corner where the file has bounds
        (``openslide.bounds-x/y``: MIRAX, Leica SCN, Ventana, …), else (0, 0).

        QuPath's OpenSlide server crops the image to these bounds, so a point at level-0
        (x, y) here is drawn by QuPath at (x − bounds-x, y − bounds-y)."""
        out = []
        for axis in ("x", "y"):
            raw = self.properties.get(f"{prefix}.bounds-{axis}")
            try:
                out.append(int(float(raw)) if raw not in (None, "", "None") else 0)
            except ValueError:
                out.append(0)
        return out[0], out[1]

    def _metadata_mpp(self, xy: tuple[object, object]) -> tuple[float | None, str | None]:
        raw = [v for v in (_raw_float(xy[0]), _raw_float(xy[1])) if v is not None]
        good = [v for v in (parse_mpp(xy[0]), parse_mpp(xy[1])) if v is not None]
        if good and len(good) == len(raw):
            return sum(good) / len(good), "metadata"
        if raw:
            self.mpp_note = f"implausible µm/px {raw[0]:.4g} in the metadata ignored"
        return None, None

    # --- identity ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The file name (last part of the path or URL)."""
        base = self.path.rstrip("/").rsplit("/", 1)[-1]
        return base or self.path

    def identity(self) -> dict[str, Any]:
        """What the cell store and ``summary.json`` record about this slide: absolute path
        (a URL as given), name, file size, level-0 dimensions, µm/px and whether it was
        overridden, vendor, objective power and the backend that opened this handle."""
        url = _is_url(self.path)
        size: int | None = None
        if not url:
            try:
                size = Path(self.path).stat().st_size
            except OSError:
                size = None
        w, h = (int(v) for v in self.dimensions)
        ident: dict[str, Any] = {
            "path": self.path if url else str(Path(self.path).resolve()),
            "name": self.name,
            "size_bytes": size,
            "dimensions": [w, h],
            "mpp": None if self.mpp is None else float(self.mpp),
            "mpp_override": self.mpp if self.mpp_source == "override" else None,
            "vendor": self.vendor,
            "objective_power": self.objective_power,
            "backend": self.backend,
            # QuPath's frame: level-0 minus the file's bounds corner (GeoJSON is written in it)
            "qupath_offset": list(self.bounds_offset),
        }
        ident["uid"] = slide_uid(self.path, ident)
        return ident

    # --- geometry ---------------------------------------------------------------------------

    def best_level(self, scale: float) -> int:
        """The coarsest level whose downsample is ≤ ``scale`` (level-0 px per output px)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= scale * (1 + LEVEL_TOLERANCE):
                best = i if ds >= self.level_downsamples[best] else best
        return best

    def read_level0_scale(self, mpp: float) -> float:
        """Level-0 px per output px when reading at ``mpp`` µm/px."""
        if self.mpp is None:
            raise MppError(
                self.path,
                self.mpp_note + "; pass --mpp"
                if self.mpp_note
                else "no µm/px in the slide metadata; pass --mpp",
            )
        if not mpp > 0:
            raise ValueError(f"mpp must be > 0, got {mpp}")
        return mpp / self.mpp

    # --- reads ------------------------------------------------------------------------------

    def read_size(self, w: float, h: float, mpp: float) -> tuple[int, int]:
        """Output pixels covering a level-0 box of ``w`` × ``h`` px read at ``mpp`` µm/px."""
        scale = self.read_level0_scale(mpp)
        return max(1, round(w / scale)), max(1, round(h / scale))

    def read_both(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        seg_px: tuple[int, int],
        seg_mpp: float,
        cls_mpp: float,
    ) -> tuple[NDArray[np.uint8], NDArray[np.uint8] | None, tuple[int, int]]:
        """The level-0 box (x, y, w, h) at ``seg_mpp`` as ``seg_px`` pixels, and at ``cls_mpp``
        when both come from one decode: (seg image, cls image or None, cls image (w, h)).

        The box is decoded once when both reads come from level 0, the cls read is level-0
        pixels as they are (cls µm/px = the slide's, box on whole pixels) and the seg read an
        integer k× of it on the same grid: the seg image is then the cls image's k×k mean with
        PIL's rounding, which is what :meth:`read` gives at ``seg_mpp`` (its aligned integer
        factor rule). Otherwise (e.g. a 0.5 µm/px slide read at 0.25 µm/px) the cls image is
        None: read it at ``cls_mpp`` when it is needed.
        """
        cls_px = self.read_size(w, h, cls_mpp)
        if not self._one_decode((x, y, w, h), seg_px, cls_px, cls_mpp):
            return self.read(x, y, seg_px[0], seg_px[1], seg_mpp), None, cls_px
        cls = self.read(x, y, cls_px[0], cls_px[1], cls_mpp)
        k = cls_px[0] // seg_px[0]
        seg = cls if k == 1 else np.asarray(Image.fromarray(cls).reduce(k))
        return seg, cls, cls_px

    def _one_decode(
        self,
        box: tuple[float, float, float, float],
        seg_px: tuple[int, int],
        cls_px: tuple[int, int],
        cls_mpp: float,
    ) -> bool:
        """Whether the seg read of the level-0 ``box`` (x, y, w, h) is exactly the k×k
        reduction of its cls read."""
        x, y, w, h = box
        (sw, sh), (cw, ch) = seg_px, cls_px
        k = cw // sw
        return (
            abs(self.read_level0_scale(cls_mpp) - 1.0) < 1e-9
            and k >= 1
            and (cw, ch) == (k * sw, k * sh)
            and abs(w - cw) < 1e-6
            and abs(h - ch) < 1e-6
            and float(x).is_integer()
            and float(y).is_integer()
            and self.best_level(w / sw) == 0
        )

    def read(self, x: float, y: float, w: int, h: int, mpp: float) -> NDArray[np.uint8]:
        """RGB uint8 (h, w, 3) at ``mpp`` µm/px whose top-left is level-0 (x, y); white outside."""
        return self.read_scaled(x, y, w, h, self.read_level0_scale(mpp))

    def read_scaled(self, x: float, y: float, w: int, h: int, scale: float) -> NDArray[np.uint8]:
        """Like :meth:`read` with ``scale`` = level-0 px per output px (needs no mpp)."""
        w, h = int(w), int(h)
        if w <= 0 or h <= 0 or not scale > 0:
            raise ValueError(f"bad read size {w}x{h} at scale {scale}")
        level = self.best_level(scale)
        lw, lh = self.level_dimensions[level]
        sx, sy = self._scale_xy[level]
        fx0, fy0 = x / sx, y / sy
        fx1, fy1 = (x + w * scale) / sx, (y + h * scale) / sy
        eps = 1e-6
        ix0, iy0 = math.floor(fx0 + eps), math.floor(fy0 + eps)
        ix1, iy1 = max(ix0 + 1, math.ceil(fx1 - eps)), max(iy0 + 1, math.ceil(fy1 - eps))
        cx0, cy0, cx1, cy1 = max(ix0, 0), max(iy0, 0), min(ix1, lw), min(iy1, lh)
        cw, ch = ix1 - ix0, iy1 - iy0
        dx = dy = 0.0
        if cx1 <= cx0 or cy1 <= cy0:
            return np.full((h, w, 3), 255, np.uint8)
        pix, ox, oy = self._read_level(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
        dx, dy = ox - cx0, oy - cy0
        if (cx0, cy0, cx1, cy1) == (ix0, iy0, ix1, iy1):
            canvas = pix
        else:
            canvas = _white_margins(pix, cy0 - iy0, iy1 - cy1, cx0 - ix0, ix1 - cx1)
        bx0, by0 = fx0 - ix0 - dx, fy0 - iy0 - dy
        bx1, by1 = fx1 - ix0 - dx, fy1 - iy0 - dy
        if (cw, ch) == (w, h) and max(abs(bx0), abs(by0), abs(bx1 - w), abs(by1 - h)) < 1e-3:
            return canvas  # exact pixels: native resolution, integer-aligned
        box = (
            min(max(bx0, 0.0), cw),
            min(max(by0, 0.0), ch),
            min(max(bx1, 0.0), cw),
            min(max(by1, 0.0), ch),
        )
        k = round((bx1 - bx0) / w)
        if (
            k >= 2
            and _near_int(bx0)
            and _near_int(by0)
            and abs(bx1 - bx0 - k * w) < 1e-6
            and abs(by1 - by0 - k * h) < 1e-6
        ):
            # integer factor on an aligned grid (e.g. 0.25 → 0.5 µm/px): k×k mean, ~3× faster
            x0, y0 = round(bx0), round(by0)
            if 0 <= x0 and 0 <= y0 and x0 + k * w <= cw and y0 + k * h <= ch:
                img = Image.fromarray(canvas)
                return np.asarray(img.reduce(k, box=(x0, y0, x0 + k * w, y0 + k * h)))
        down = (bx1 - bx0) >= w * (1 - 1e-9)
        resample = Image.Resampling.BOX if down else Image.Resampling.BILINEAR
        out = Image.fromarray(canvas).resize((w, h), resample, box=box)
        return np.asarray(out)

    def _read_level(
        self, level: int, x: int, y: int, w: int, h: int
    ) -> tuple[NDArray[np.uint8], float, float]:
        try:
            pix, ox, oy = self._b.read_level(level, x, y, w, h)
            rgb = to_rgb(pix)
        except SlideError:
            raise
        except Exception as exc:
            self._recover()
            around = self._read_around(level, x, y, w, h)
            if around is None:
                raise SlideError(
                    self.path,
                    f"cannot read level {level} pixels at ({x}, {y}) size {w}x{h}: {short_reason(exc)}",
                ) from exc
            rgb, ox, oy = around
        if rgb.shape[:2] != (h, w):
            raise SlideError(
                self.path, f"backend returned {rgb.shape[:2]} for a {h}x{w} read at level {level}"
            )
        return rgb, ox, oy

    def _recover(self) -> None:
        try:
            self._b.recover()
        except Exception:
            pass

    def _read_around(
        self, level: int, x: int, y: int, w: int, h: int
    ) -> tuple[NDArray[np.uint8], float, float] | None:
        """The rectangle read one source tile at a time after a failed read: tiles that
        cannot be decoded are white and recorded in :attr:`unreadable`, so a corrupt tile
        costs only its own area. None (the read fails) when the level is not tiled, or when
        more than half of the tiles fail: that is a broken file (e.g. truncated), not a tile."""
        size = getattr(self._b, "tile_size", lambda _level: None)(level)
        if not size or size[0] <= 0 or size[1] <= 0:
            return None
        tw, th = size
        c0, c1, r0, r1 = x // tw, (x + w - 1) // tw, y // th, (y + h - 1) // th
        if c0 == c1 and r0 == r1:
            return None  # one source tile: it is the one that failed
        out = np.full((h, w, 3), 255, np.uint8)
        sx, sy = self._scale_xy[level]
        read_any = False
        bad: list[tuple[int, int, int]] = []
        for r in range(r0, r1 + 1):
            for c in range(c0, c1 + 1):
                px0, py0 = max(x, c * tw), max(y, r * th)
                px1, py1 = min(x + w, (c + 1) * tw), min(y + h, (r + 1) * th)
                try:
                    pix, _, _ = self._b.read_level(level, px0, py0, px1 - px0, py1 - py0)
                    rgb = to_rgb(pix)
                    if rgb.shape[:2] != (py1 - py0, px1 - px0):
                        raise ValueError("short read")
                except Exception:
                    self._recover()
                    bad.append((level, c, r))
                    lw, lh = self.level_dimensions[level]
                    self.unreadable[(level, c, r)] = (
                        c * tw * sx,
                        r * th * sy,
                        min((c + 1) * tw, lw) * sx,
                        min((r + 1) * th, lh) * sy,
                    )
                    continue
                out[py0 - y : py1 - y, px0 - x : px1 - x] = rgb
                read_any = True
        n_tiles = (c1 - c0 + 1) * (r1 - r0 + 1)
        if not read_any or 2 * len(bad) > n_tiles:
            for key in bad:
                self.unreadable.pop(key, None)
            return None
        return out, float(x), float(y)

    def thumbnail(self, max_px: int = 1024) -> NDArray[np.uint8]:
        """The whole slide as RGB, longest side ``max_px`` (never upsampled); read in chunks."""
        w0, h0 = self.dimensions
        scale = max(1.0, max(w0, h0) / max_px)
        tw, th = max(1, round(w0 / scale)), max(1, round(h0 / scale))
        sx, sy = w0 / tw, h0 / th
        level = self.best_level(min(sx, sy))
        # keep each backend read to about THUMBNAIL_CHUNK_PX² level pixels: memory stays
        # bounded by the output, whatever the slide size
        ratio = max(1.0, min(sx, sy) / self.level_downsamples[level])
        step = max(64, int(THUMBNAIL_CHUNK_PX / ratio))
        out = np.empty((th, tw, 3), np.uint8)
        for oy in range(0, th, step):
            for ox in range(0, tw, step):
                cw, ch = min(step, tw - ox), min(step, th - oy)
                out[oy : oy + ch, ox : ox + cw] = self._read_box(ox * sx, oy * sy, cw, ch, sx, sy)
        return out

    def _read_box(self, x: float, y: float, w: int, h: int, sx: float, sy: float) -> NDArray[np.uint8]:
        if abs(sx - sy) < 1e-9:
            return self.read_scaled(x, y, w, h, sx)
        # anisotropic thumbnail cell (rounding): read at the finer scale, then fit
        s = min(sx, sy)
        big = self.read_scaled(x, y, math.ceil(w * sx / s), math.ceil(h * sy / s), s)
        return np.asarray(Image.fromarray(big).resize((w, h), Image.Resampling.BOX))

    # --- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        self._b.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({self.path!r}, backend={self.backend!r}, format={self.format!r}, "
            f"dimensions={self.dimensions}, levels={self.level_count}, mpp={self.mpp})"
        )


# --- opening ---------------------------------------------------------------------------------

_MAGIC: Mapping[bytes, str] = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"BM": "a BMP image",
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive",
}


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _sniff(path: str, openslide_tried: bool = True) -> str | None:
    """What a file that no backend opens looks like, for the message (a DICOM file's message
    depends on whether OpenSlide, the backend that reads DICOM, was asked)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return None
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            return f"{what}, not a whole-slide image"
    if head[128:132] == b"DICM":
        if not openslide_tried:
            return "a DICOM file, which TiffSlide cannot read (OpenSlide reads DICOM whole-slide images)"
        return "a DICOM file, but not a whole-slide image OpenSlide can read"
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "a text file, not a whole-slide image"
    return None


def _check_local(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise SlideNotFound(path, "no such file")
    if p.is_dir():
        raise SlideError(path, "is a directory, not a slide file")
    if not os.access(p, os.R_OK):
        raise SlideError(path, "permission denied")
    if p.stat().st_size == 0:
        raise SlideError(path, "empty file (0 bytes)")


# The reader a run tries first (``backend="auto"``): the workers read the pixels with it and
# the client plans with it, so ``Slide.identity()`` names the reader that reads the pixels.
# TiffSlide decodes JPEG tiles ~2.7× faster than OpenSlide here (benchmarks B1); OpenSlide
# still opens what TiffSlide cannot read.
RUN_READER = "tiffslide"


def open_slide(
    path_or_url: str | os.PathLike[str],
    backend: str = "auto",
    mpp: float | None = None,
    prefer: str = "openslide",
    storage_options: Mapping[str, Any] | None = None,
) -> Slide:
    """Open a slide. ``backend``: "auto" (``prefer`` first, then the other), "openslide" or
    "tiffslide"; URLs with a scheme (fsspec) always use TiffSlide, with ``storage_options``
    (credentials, endpoint) when given. ``mpp`` overrides the metadata. Every failure raises
    :class:`SlideError` with a one-line reason."""
    path = os.fspath(path_or_url)
    if path.startswith("file://"):
        path = path[len("file://") :]
    if backend not in ("auto", "openslide", "tiffslide"):
        raise ValueError(f"backend must be auto, openslide or tiffslide, not {backend!r}")
    if prefer not in ("openslide", "tiffslide"):
        raise ValueError(f"prefer must be openslide or tiffslide, not {prefer!r}")
    url = _is_url(path)
    if url:
        if backend == "openslide":
            raise SlideError(path, "OpenSlide cannot read URLs; use backend tiffslide")
        order = ["tiffslide"]
        _check_remote(path, storage_options)
    else:
        _check_local(path)
        if backend == "auto":
            order = [prefer, "tiffslide" if prefer == "openslide" else "openslide"]
        else:
            order = [backend]
    failures: list[tuple[str, BaseException]] = []
    for name in order:
        try:
            b = _make_backend(name, path, storage_options if url else None)
        except Exception as exc:
            failures.append((name, exc))
            continue
        return Slide(path, b, mpp=mpp)
    raise SlideError(path, _open_reason(path, failures, url))


def _check_remote(url: str, storage_options: Mapping[str, Any] | None) -> None:
    """The object behind ``url`` exists and is a readable file (fsspec ``info``); else one
    line, like a local file's. The reason never carries the storage options."""
    try:
        import fsspec

        fs, where = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        info = fs.info(where)
    except FileNotFoundError:
        if any(c in url for c in "*?["):  # a glob the runner could not expand
            raise SlideNotFound(url, "no remote file matches (or it cannot be listed)") from None
        raise SlideNotFound(url, "no such file (remote)") from None
    except Exception as exc:
        raise SlideError(url, f"cannot read remotely: {short_reason(exc)}") from None
    if info.get("type") == "directory":
        raise SlideError(url, "is a directory, not a slide file")
    if int(info.get("size") or 0) == 0:
        raise SlideError(url, "empty file (0 bytes)")


def _make_backend(name: str, path: str, storage_options: Mapping[str, Any] | None = None) -> Backend:
    if name == "openslide":
        from wsiflow.slide._openslide import OpenSlideBackend

        return OpenSlideBackend(path)
    from wsiflow.slide._tiffslide import TiffSlideBackend

    return TiffSlideBackend(path, storage_options)


def _open_reason(path: str, failures: list[tuple[str, BaseException]], url: bool) -> str:
    """The most specific reason among the backends' failures."""
    for _, exc in failures:  # our own checks (e.g. "not a brightfield RGB slide") first
        if isinstance(exc, SlideError):
            return exc.reason
    if not url:
        zero = _tiff_zero_size(path)  # the libraries say "Invalid TIFF" or divide by zero
        if zero:
            return zero
    specific = [(n, e) for n, e in failures if not _is_generic_refusal(e)]
    if specific:
        name, exc = specific[0]
        label = "OpenSlide" if name == "openslide" else "TiffSlide"
        return f"cannot open ({label}): {short_reason(exc)}"
    if url and failures:
        return f"cannot open: {short_reason(failures[0][1])}"
    sniffed = _sniff(path, openslide_tried=any(n == "openslide" for n, _ in failures))
    if sniffed:
        return sniffed
    if len(failures) == 1:
        only = "OpenSlide" if failures[0][0] == "openslide" else "TiffSlide"
        return f"not a slide format {only} can read"
    return "not a slide format OpenSlide or TiffSlide can read"


def _tiff_zero_size(path: str, max_pages: int = 64) -> str | None:
    """A reason if a TIFF page declares zero width or height, else None (also for non-TIFFs)."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            for i, page in enumerate(tf.pages):
                if i >= max_pages:
                    break
                w, h = getattr(page, "imagewidth", None), getattr(page, "imagelength", None)
                if w == 0 or h == 0:
                    where = "" if i == 0 else f" in TIFF page {i}"
                    return f"image has zero width or height ({w}×{h} px{where})"
    except Exception:
        return None
    return None


def _is_generic_refusal(exc: BaseException) -> bool:
    """Answers meaning "not my format", as opposed to a specific problem with a file in the format."""
    name = type(exc).__name__
    msg = str(exc).lower()
    if name == "OpenSlideUnsupportedFormatError":
        return True
    if name == "TiffFileError" and "not a tiff file" in msg:
        return True
    return False


def _near_int(v: float) -> bool:
    return abs(v - round(v)) < 1e-6


def _white_margins(pix: NDArray[np.uint8], top: int, bottom: int, left: int, right: int) -> NDArray[np.uint8]:
    """``pix`` inside white margins, each output pixel written once (a 255-filled canvas
    overwritten by ``pix`` wrote the interior twice: ~8 ms per 2560² tile at the slide's edge)."""
    h, w = pix.shape[:2]
    out = np.empty((top + h + bottom, left + w + right, 3), np.uint8)
    out[:top] = 255
    out[top + h :] = 255
    out[top : top + h, :left] = 255
    out[top : top + h, left + w :] = 255
    out[top : top + h, left : left + w] = pix
    return out

"""Pictures for the HTML report, as encoded image bytes (PNG / JPEG).

* Charts (matplotlib, drawn on an Agg canvas created per figure: no pyplot, no global
  backend switch): per-lineage dysplasia fractions with their interval and the WHO
  threshold line, the blast % on the WHO 2022 bands, a differential count.
* Cell overlays (numpy / PIL): every cell of a slide stamped as a dot in its class colour
  on a thumbnail (vectorised, so a million cells cost a few array writes, never a Python
  object per cell), and cell outlines drawn on a higher-resolution region.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import NDArray
from PIL import Image, ImageDraw

__all__ = [
    "FLAG_COLORS",
    "blast_figure",
    "data_uri",
    "differential_figure",
    "draw_outlines",
    "jpeg_bytes",
    "lineage_figure",
    "png_bytes",
    "stamp_cells",
]

FLAG_COLORS = {
    "met": "#c0392b",
    "uncertain": "#e69f00",
    "not met": "#3d7ab8",
    "insufficient": "#b0b0b0",
}
BAND_COLORS = ("#cfe8cf", "#fbe7a1", "#f8c58c", "#ef9a9a", "#e57373", "#d32f2f")
_DPI = 110


# --------------------------------------------------------------------------- encoding


def png_bytes(image: NDArray[np.uint8]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def jpeg_bytes(image: NDArray[np.uint8], quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    """``data:`` URI for PNG or JPEG bytes (the type is read from the magic number)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        mime = "image/png"
    elif data[:3] == b"\xff\xd8\xff":
        mime = "image/jpeg"
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        mime = "image/gif"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    else:
        raise ValueError("not a PNG, JPEG, GIF or WebP image")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _fig_png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb[:3]))


def _style(ax: Any) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=9)


# --------------------------------------------------------------------------- charts


def lineage_figure(lineages: Sequence[dict[str, Any]], threshold: float, confidence: float) -> bytes:
    """Horizontal bars: dysplastic fraction per lineage, its interval, the threshold line.

    ``lineages`` are SlideSummary lineage dicts (lineage, fraction, ci_low, ci_high, flag,
    dysplastic, total); a lineage without a fraction is drawn as an empty row marked
    "no cells".
    """
    n = max(1, len(lineages))
    height = 0.55 * n + 0.85
    fig = Figure(figsize=(6.4, height))
    ax = fig.add_axes((0.2, 0.62 / height, 0.76, 1 - 0.85 / height))
    hi_all = [float(d["ci_high"]) for d in lineages if d.get("ci_high") is not None]
    xmax = max(30.0, min(100.0, 10 * np.ceil((max(hi_all, default=0) * 100 + 3) / 10)))
    ys = np.arange(len(lineages))[::-1]
    for y, d in zip(ys, lineages, strict=True):
        flag = str(d.get("flag", ""))
        color = FLAG_COLORS.get(flag, "#888888")
        frac = d.get("fraction")
        label = str(d["lineage"]).capitalize()
        ax.text(-0.02, y, label, transform=ax.get_yaxis_transform(), va="center", ha="right", fontsize=10)
        if frac is None:
            ax.text(0.5, y, "no cells", va="center", fontsize=9, color="#666666")
            continue
        f, lo, hi = float(frac) * 100, float(d["ci_low"]) * 100, float(d["ci_high"]) * 100
        ax.barh(
            y,
            f,
            height=0.55,
            color=color,
            alpha=0.9 if flag != "insufficient" else 0.5,
            hatch="//" if flag == "insufficient" else None,
            edgecolor="white",
        )
        ax.errorbar(f, y, xerr=[[f - lo], [hi - f]], fmt="none", ecolor="#222222", capsize=4, lw=1.3)
        ax.text(hi + xmax * 0.015, y, f"{f:.1f}%", va="center", fontsize=9, color="#222222")
    t = threshold * 100
    ax.axvline(t, color="#222222", ls="--", lw=1.1)
    ax.text(t, len(lineages) - 0.45, f" WHO {t:g}%", fontsize=8, va="bottom", ha="left")
    ax.set_xlim(0, xmax * 1.1)  # room for the value labels
    ax.set_xticks(np.arange(0, xmax + 1e-9, 5 if xmax <= 30 else 10 if xmax <= 60 else 20))
    ax.set_ylim(-0.6, len(lineages) - 0.4)
    ax.set_yticks([])
    ax.set_xlabel(f"dysplastic cells, % of lineage (bar: {confidence * 100:g}% Wilson interval)", fontsize=9)
    _style(ax)
    return _fig_png(fig)


def blast_figure(
    fraction: float | None,
    ci_low: float | None,
    ci_high: float | None,
    bands: Sequence[float],
    labels: Sequence[str],
) -> bytes:
    """The WHO 2022 blast bands as coloured segments, the slide's blast % and interval on them."""
    edges = [0.0, *(b * 100 for b in bands)]
    top = max(30.0, edges[-1] * 1.5)
    if ci_high is not None:
        top = max(top, min(100.0, 10 * np.ceil((ci_high * 100 + 3) / 10)))
    edges.append(top)
    fig = Figure(figsize=(6.4, 1.45))
    ax = fig.add_axes((0.04, 0.42, 0.92, 0.36))
    for i in range(len(edges) - 1):
        ax.axvspan(edges[i], edges[i + 1], color=BAND_COLORS[min(i, len(BAND_COLORS) - 1)], lw=0)
        ax.text(
            (edges[i] + edges[i + 1]) / 2,
            1.08,
            labels[i] if i < len(labels) else "",
            ha="center",
            va="bottom",
            fontsize=8.5,
            transform=ax.get_xaxis_transform(),
        )
        if i:
            ax.axvline(edges[i], color="white", lw=1.5)
    if fraction is not None and ci_low is not None and ci_high is not None:
        f = fraction * 100
        ax.plot([ci_low * 100, ci_high * 100], [0.5, 0.5], color="#222222", lw=2.2, solid_capstyle="butt")
        for v in (ci_low * 100, ci_high * 100):
            ax.plot([v, v], [0.3, 0.7], color="#222222", lw=1.5)
        ax.plot([f], [0.5], marker="D", ms=9, color="#b0006e", mec="white", mew=1.2)
    else:
        ax.text(top / 2, 0.5, "no nucleated cells", ha="center", va="center", fontsize=9)
    ax.set_xlim(0, top)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("blasts, % of nucleated cells (◆ estimate, bar: interval)", fontsize=9)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=9)
    return _fig_png(fig)


def differential_figure(
    classes: Sequence[dict[str, Any]], colors: Mapping[str, Sequence[int]], confidence: float
) -> bytes:
    """Horizontal bars: % of each class among classified cells with its interval."""
    n = max(1, len(classes))
    fig = Figure(figsize=(7.6, 0.36 * n + 0.9))
    ax = fig.add_axes((0.27, 0.8 / (0.36 * n + 0.9), 0.5, 1 - 1.0 / (0.36 * n + 0.9)))
    hi_all = [float(c["ci_high"]) for c in classes if c.get("ci_high") is not None]
    xmax = max(10.0, min(100.0, 10 * np.ceil((max(hi_all, default=0) * 100 + 3) / 10)))
    ys = np.arange(len(classes))[::-1]
    for y, c in zip(ys, classes, strict=True):
        col = _hex(colors.get(str(c["code"]), (128, 128, 128)))
        ax.text(
            -0.02, y, str(c["name"]), transform=ax.get_yaxis_transform(), va="center", ha="right", fontsize=9
        )
        if c.get("fraction") is None:
            continue
        f, lo, hi = float(c["fraction"]) * 100, float(c["ci_low"]) * 100, float(c["ci_high"]) * 100
        ax.barh(y, f, height=0.62, color=col, edgecolor="white")
        ax.errorbar(f, y, xerr=[[f - lo], [hi - f]], fmt="none", ecolor="#222222", capsize=3, lw=1.1)
        ax.text(
            1.02,
            y,
            f"{f:.1f}% ({lo:.1f}–{hi:.1f})  n={c['count']}",
            transform=ax.get_yaxis_transform(),
            va="center",
            fontsize=8.5,
        )
    ax.set_xlim(0, xmax * 1.1)
    ax.set_ylim(-0.6, len(classes) - 0.4)
    ax.set_yticks([])
    ax.set_xlabel(f"% of classified cells ({confidence * 100:g}% Wilson interval)", fontsize=9)
    _style(ax)
    return _fig_png(fig)


# --------------------------------------------------------------------------- overlays


_STAMP_BLOCK = 1 << 16  # cells per fancy-index write of stamp_cells


def _disc_offsets(radius: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    r = max(0, int(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = xx * xx + yy * yy <= r * r + r  # a little fuller than the exact disc
    return yy[keep].astype(np.int64), xx[keep].astype(np.int64)


def stamp_cells(
    image: NDArray[np.uint8],
    x: NDArray[np.floating],
    y: NDArray[np.floating],
    class_id: NDArray[np.integer],
    palette: NDArray[np.uint8],
    radius: int = 2,
) -> NDArray[np.uint8]:
    """A copy of ``image`` with a dot per cell (class colour, dark rim); x, y in image px.

    Vectorised: one fancy-index write per disc offset, whatever the number of cells.
    ``palette`` is (K, 3); cells with class -1 (unclassified) are drawn black.
    """
    out = np.array(image, np.uint8, copy=True)
    h, w = out.shape[:2]
    if len(x) == 0:
        return out
    # int32 centres, clipped to just beyond the farthest offset (such a dot draws nothing
    # either way); the writes go offset by offset, a block of cells at a time, in cell order
    # (the same image as one write per offset, with temporaries of one block)
    reach = max(0, int(radius)) + 2
    cx = np.clip(np.rint(np.asarray(x, np.float64)), -reach, w + reach).astype(np.int32)
    cy = np.clip(np.rint(np.asarray(y, np.float64)), -reach, h + reach).astype(np.int32)
    cid = np.asarray(class_id)
    pal = np.vstack([np.asarray(palette, np.uint8).reshape(-1, 3), np.zeros((1, 3), np.uint8)])
    colors = pal[np.where(cid >= 0, cid, len(pal) - 1)]
    rim = (colors.astype(np.uint16) * 2 // 5).astype(np.uint8)
    for r, cols in ((radius + 1, rim), (radius, colors)):
        dy, dx = _disc_offsets(r)
        for oy, ox in zip(dy, dx, strict=True):
            for a in range(0, len(cx), _STAMP_BLOCK):
                px, py = cx[a : a + _STAMP_BLOCK] + int(ox), cy[a : a + _STAMP_BLOCK] + int(oy)
                ok = (px >= 0) & (px < w) & (py >= 0) & (py < h)
                out[py[ok], px[ok]] = cols[a : a + _STAMP_BLOCK][ok]
    return out


def draw_outlines(
    image: NDArray[np.uint8],
    polygons: Sequence[NDArray[np.floating]],
    class_id: NDArray[np.integer],
    palette: NDArray[np.uint8],
    width: int = 2,
) -> NDArray[np.uint8]:
    """A copy of ``image`` with each polygon (image px) outlined in its class colour."""
    img = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    draw = ImageDraw.Draw(img)
    pal = np.asarray(palette, np.uint8).reshape(-1, 3)
    for poly, k in zip(polygons, np.asarray(class_id, np.int64), strict=True):
        if len(poly) < 2:
            continue
        color = tuple(int(c) for c in pal[k]) if 0 <= k < len(pal) else (0, 0, 0)
        ring = np.asarray(poly, np.float64)
        flat = np.concatenate([ring, ring[:1]]).ravel().tolist()  # closed: back to the first vertex
        draw.line(flat, fill=color, width=width, joint="curve")
    return np.asarray(img)

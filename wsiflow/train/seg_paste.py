"""Copy-paste training fields for a marrow segmenter, built from real pixels only.

Real bone-marrow aspirate fields are crowded: nucleated cells touch and overlap each other
and the red cells, under a Jenner-Giemsa / May-Grünwald-Giemsa stain that is bluer and
purpler than the peripheral-blood fields with masks (PBC, BCCD). Each field written here is

1. a *background* mosaic of real prepared fields (PBC single-cell images, BCCD smear fields;
   the folder :func:`wsiflow.train.seg_data.prepare_seg_data` writes), laid edge to edge
   with random offsets, flips and 90° turns, keeping their masks;
2. with real nucleated cells (PBC cells, cut out by their classical mask, feathered by
   ``FEATHER_PX``) pasted on top at random scale (``scale``, 1–2×: marrow precursors and
   plasma cells are larger than blood leucocytes), flipped / turned, half of them with the
   cytoplasm recoloured (``recolour_cytoplasm``: deep blue to pale grey-blue, as plasma
   cells and blasts show), about a third given more cytoplasm round an eccentric nucleus
   (``abundant_cytoplasm``), half of them touching or overlapping a cell already there; a pasted cell
   hides what it covers, in the image and in the masks (an occluded cell keeps only its
   visible part);
3. with a one-pixel gap in the cell mask wherever two cells touch (so the cell channel
   separates them; the nucleus channel gives the watershed its markers);
4. stain-shifted as a whole (``stain_shift``: optical-density channel mixing and scaling,
   then the background mapped to a colour drawn from beige smear to lavender marrow);
5. sometimes letterboxed: flat bands (``BAND_P``) of background-like colour at the top
   and/or bottom with empty masks, the way scanned fields are padded.

Masks use the 0/128/255 convention (background / cytoplasm / nucleus).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage as ndi
from skimage import transform

from wsiflow.atomic import atomic_path
from wsiflow.train.seg_data import SegDataError, encode_mask, find_pairs, load_pair

FEATHER_PX = 1.0
BAND_P = 0.25
LICENCES = {
    "pbc": "CC BY 4.0 (Acevedo et al., Data in Brief 2020)",
    "bccd": "MIT (Shenggan/BCCD_Dataset)",
}


@dataclass(frozen=True)
class Sprite:
    """One real cell cut out of a prepared field: pixels, cell and nucleus masks (same box)."""

    name: str
    rgb: NDArray[np.uint8]
    cell: NDArray[np.bool_]
    nucleus: NDArray[np.bool_]


@dataclass(frozen=True)
class Field:
    name: str
    rgb: NDArray[np.uint8]
    labels: NDArray[np.int32]  # instances (connected components of the cell mask)
    nucleus: NDArray[np.bool_]


def load_fields(prepared: Path, prefixes: tuple[str, ...] = ("pbc_", "bccd_")) -> list[Field]:
    """The prepared fields (``images/`` + ``masks/``) whose names start with one of ``prefixes``."""
    out = []
    for img, msk in find_pairs(prepared / "images", prepared / "masks"):
        if not img.stem.startswith(prefixes):
            continue
        p = load_pair(img, msk)
        lab, _ = ndi.label(p.cell)
        nuc = p.nucleus if p.nucleus is not None else np.zeros_like(p.cell)
        out.append(Field(p.name, p.rgb, lab.astype(np.int32), nuc & p.cell))
    if not out:
        raise SegDataError(f"{prepared}: no prepared fields named {' or '.join(prefixes)}*")
    return out


def sprites_from(fields: list[Field], min_px: int = 200) -> list[Sprite]:
    """The largest cell of each PBC field with a nucleus, cropped to its box (+2 px)."""
    out = []
    for f in fields:
        if not f.name.startswith("pbc_") or f.labels.max() == 0:
            continue
        counts = np.bincount(f.labels.ravel())
        counts[0] = 0
        k = int(np.argmax(counts))
        if counts[k] < min_px:
            continue
        cell = f.labels == k
        if not (f.nucleus & cell).any():
            continue
        sl = ndi.find_objects(cell.astype(np.int32))[0]
        ys = slice(max(0, sl[0].start - 2), sl[0].stop + 2)
        xs = slice(max(0, sl[1].start - 2), sl[1].stop + 2)
        out.append(
            Sprite(f.name, f.rgb[ys, xs].copy(), cell[ys, xs].copy(), (f.nucleus & cell)[ys, xs].copy())
        )
    return out


def _orient(a: NDArray[Any], k: int, flip: bool) -> NDArray[Any]:
    a = np.rot90(a, k, axes=(0, 1))
    return np.ascontiguousarray(a[:, ::-1] if flip else a)


def _background(
    fields: list[Field], size: int, rng: np.random.Generator, tile: int = 128
) -> tuple[NDArray[np.float32], NDArray[np.int32], NDArray[np.bool_]]:
    """A mosaic of ``tile``-px random crops of the fields, edge to edge from a random offset."""
    n = -(-size // tile) + 1
    rgb = np.zeros((n * tile, n * tile, 3), np.float32)
    labels = np.zeros((n * tile, n * tile), np.int32)
    nuc = np.zeros((n * tile, n * tile), bool)
    n_lab = 0
    for i in range(n):
        for j in range(n):
            f = fields[int(rng.integers(len(fields)))]
            k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
            im, lab, nu = _orient(f.rgb, k, flip), _orient(f.labels, k, flip), _orient(f.nucleus, k, flip)
            h, w = lab.shape
            y = int(rng.integers(0, max(1, h - tile + 1)))
            x = int(rng.integers(0, max(1, w - tile + 1)))
            im, lab, nu = (
                im[y : y + tile, x : x + tile],
                lab[y : y + tile, x : x + tile],
                nu[y : y + tile, x : x + tile],
            )
            th, tw = lab.shape
            ys, xs = slice(i * tile, i * tile + th), slice(j * tile, j * tile + tw)
            rgb[ys, xs] = im
            labels[ys, xs] = np.where(lab > 0, lab + n_lab, 0)
            nuc[ys, xs] = nu
            n_lab += int(lab.max())
    oy, ox = int(rng.integers(0, tile)), int(rng.integers(0, tile))
    win = (slice(oy, oy + size), slice(ox, ox + size))
    return rgb[win].copy(), _relabel(labels[win]), nuc[win].copy()


def _relabel(labels: NDArray[np.int32]) -> NDArray[np.int32]:
    """Connected pieces as separate instances (a cell cut by a tile edge or hidden in part)."""
    out = np.zeros_like(labels)
    n = 0
    for sl_i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        comp, k = ndi.label(labels[sl] == sl_i)
        out[sl][comp > 0] = comp[comp > 0] + n
        n += k
    return out


def _paste(
    rgb: NDArray[np.float32],
    labels: NDArray[np.int32],
    nuc: NDArray[np.bool_],
    sp: Sprite,
    scale: float,
    rng: np.random.Generator,
    touch_p: float,
    recolour_p: float = 0.0,
    abundant_p: float = 0.0,
) -> None:
    k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
    im, cell, nu = _orient(sp.rgb, k, flip), _orient(sp.cell, k, flip), _orient(sp.nucleus, k, flip)
    if abs(scale - 1) > 0.02:
        shape = (max(4, round(cell.shape[0] * scale)), max(4, round(cell.shape[1] * scale)))
        im = transform.resize(
            im.astype(np.float32), shape, order=1, preserve_range=True, anti_aliasing=scale < 1
        )
        cell = transform.resize(cell.astype(np.float32), shape, order=1) >= 0.5
        nu = (transform.resize(nu.astype(np.float32), shape, order=1) >= 0.5) & cell
    im = im.astype(np.float32)
    if rng.random() < abundant_p:
        im, cell, nu = abundant_cytoplasm(im, cell, nu, rng)
        scale = max(0.8, scale / 1.5)  # already enlarged
    if rng.random() < recolour_p:
        im = recolour_cytoplasm(im, cell & ~nu, rng)
    h, w = cell.shape
    size = labels.shape[0]
    r_new = np.sqrt(cell.sum() / np.pi)
    if labels.max() > 0 and rng.random() < touch_p:
        # next to a cell already there: centre distance = sum of radii × (0.75..1.0)
        ids = np.unique(labels[labels > 0])
        tgt = labels == int(rng.choice(ids))
        cy, cx = np.argwhere(tgt).mean(axis=0)
        r_old = np.sqrt(tgt.sum() / np.pi)
        ang = rng.uniform(0, 2 * np.pi)
        d = (r_old + r_new) * rng.uniform(0.75, 1.0)
        cy, cx = cy + d * np.sin(ang), cx + d * np.cos(ang)
    else:
        cy, cx = rng.uniform(0, size), rng.uniform(0, size)
    y, x = round(cy - h / 2), round(cx - w / 2)
    y0, x0, y1, x1 = max(0, y), max(0, x), min(size, y + h), min(size, x + w)
    if y1 <= y0 or x1 <= x0:
        return
    sy, sx = slice(y0 - y, y1 - y), slice(x0 - x, x1 - x)
    alpha = np.clip(ndi.gaussian_filter(cell.astype(np.float32), FEATHER_PX), 0, 1)[sy, sx]
    alpha = np.where(cell[sy, sx], np.maximum(alpha, 0.5), alpha)[..., None]
    rgb[y0:y1, x0:x1] = alpha * im[sy, sx] + (1 - alpha) * rgb[y0:y1, x0:x1]
    c = cell[sy, sx]
    reg = labels[y0:y1, x0:x1]
    reg[c] = labels.max() + 1
    nreg = nuc[y0:y1, x0:x1]
    nreg[c] = nu[sy, sx][c]


BASOPHILIC = np.array([85.0, 105.0, 195.0])  # deep blue cytoplasm (plasma cells, blasts)
PALE = np.array([178.0, 176.0, 205.0])  # pale grey-blue cytoplasm


def abundant_cytoplasm(
    im: NDArray[np.float32],
    cell: NDArray[np.bool_],
    nu: NDArray[np.bool_],
    rng: np.random.Generator,
    grow: tuple[float, float] = (1.3, 1.8),
) -> tuple[NDArray[np.float32], NDArray[np.bool_], NDArray[np.bool_]]:
    """A cell with more cytoplasm and an eccentric nucleus (as plasma cells and myelocytes have):
    the cell is enlarged by ``grow``, its enlarged nucleus filled with cytoplasm pixels drawn
    from the enlarged cytoplasm, and the original-size nucleus (its own pixels) put back off
    centre, inside the cell."""
    cyto = cell & ~nu
    if cyto.sum() < 20 or not nu.any():
        return im, cell, nu
    f = float(rng.uniform(*grow))
    shape = (round(cell.shape[0] * f) + 4, round(cell.shape[1] * f) + 4)
    inner = (shape[0] - 4, shape[1] - 4)
    big = np.zeros((*shape, 3), np.float32)
    big[2:-2, 2:-2] = transform.resize(im, inner, order=1, preserve_range=True)
    bcell = np.zeros(shape, bool)
    bcell[2:-2, 2:-2] = transform.resize(cell.astype(np.float32), inner, order=1) >= 0.5
    bnuc = np.zeros(shape, bool)
    bnuc[2:-2, 2:-2] = transform.resize(nu.astype(np.float32), inner, order=1) >= 0.5
    bcyto = bcell & ~bnuc
    if bcyto.sum() < 20:
        return im, cell, nu
    pool = big[bcyto]
    fill = ndi.binary_dilation(bnuc, iterations=1) & bcell
    big[fill] = pool[rng.integers(0, len(pool), int(fill.sum()))]
    big = np.where(fill[..., None], ndi.gaussian_filter(big, (1.0, 1.0, 0)), big)
    # the original nucleus, moved off centre while it stays inside the enlarged cell
    ys, xs = np.nonzero(nu)
    ny0, nx0 = ys.min(), xs.min()
    patch = nu[ny0 : ys.max() + 1, nx0 : xs.max() + 1]
    pix = im[ny0 : ys.max() + 1, nx0 : xs.max() + 1]
    cy, cx = np.argwhere(bcell).mean(axis=0)
    ph, pw = patch.shape
    ang = rng.uniform(0, 2 * np.pi)
    inside = ndi.binary_erosion(bcell, iterations=2)
    for d in np.linspace(0.6, 0.0, 7) * (f - 1) * np.sqrt(cell.sum() / np.pi):
        y0 = round(cy + d * np.sin(ang) - ph / 2)
        x0 = round(cx + d * np.cos(ang) - pw / 2)
        if y0 < 0 or x0 < 0 or y0 + ph > shape[0] or x0 + pw > shape[1]:
            continue
        if inside[y0 : y0 + ph, x0 : x0 + pw][patch].all():
            region = big[y0 : y0 + ph, x0 : x0 + pw]
            region[patch] = pix[patch]
            newnuc = np.zeros(shape, bool)
            newnuc[y0 : y0 + ph, x0 : x0 + pw] = patch
            return big, bcell, newnuc
    return im, cell, nu


def recolour_cytoplasm(
    im: NDArray[np.float32], cyto: NDArray[np.bool_], rng: np.random.Generator
) -> NDArray[np.float32]:
    """Cytoplasm pixels pulled toward a colour between deep blue and pale lilac, texture kept:
    each pixel is multiplied by ``(colour / mean cytoplasm colour) ** a``, ``a`` in 0.4–0.9."""
    if cyto.sum() < 10:
        return im
    colour = BASOPHILIC + rng.uniform(0, 1) * (PALE - BASOPHILIC)
    gain = (colour / (im[cyto].mean(axis=0) + 1)) ** rng.uniform(0.4, 0.9)
    out = im.copy()
    out[cyto] = np.clip(im[cyto] * gain, 0, 255)
    return out


def _touch_gaps(labels: NDArray[np.int32]) -> NDArray[np.bool_]:
    """Pixels of a cell with a 4-neighbour belonging to a different cell."""
    gap = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        a = labels
        b = np.roll(labels, 1, axis=axis)
        diff = (a > 0) & (b > 0) & (a != b)
        if axis == 0:
            diff[0] = False
        else:
            diff[:, 0] = False
        gap |= diff
    return gap


def stain_shift(
    rgb: NDArray[np.float32], rng: np.random.Generator, lavender_p: float = 0.6
) -> NDArray[np.float32]:
    """Random stain change: OD channel mixing/scaling, then the background mapped to a drawn colour.

    Optical density OD = −log((I + 1) / 256) is mixed by ``I + N(0, 0.06)`` and scaled per
    channel (R ×0.9–1.35, G ×0.85–1.25, B ×0.8–1.1: more red/green absorption reads bluer /
    purpler, as Jenner-Giemsa marrow does). The background (90th-percentile brightness) is then
    mapped by channel gains to lavender (B > R > G, as in marrow smears) with ``lavender_p``,
    otherwise kept within ±5%.
    """
    od = -np.log((rgb + 1) / 256)
    m = np.eye(3) + rng.normal(0, 0.06, (3, 3))
    od = od @ m.T.astype(np.float32)
    od *= np.array([rng.uniform(0.9, 1.35), rng.uniform(0.85, 1.25), rng.uniform(0.8, 1.1)], np.float32)
    out = 256 * np.exp(-np.clip(od, 0, 6)) - 1
    flat = out.reshape(-1, 3)
    bright = flat.sum(axis=1)
    bg = flat[bright >= np.percentile(bright, 90)].mean(axis=0) + 1
    if rng.random() < lavender_p:
        r = rng.uniform(170, 225)
        target = np.array([r, r - rng.uniform(0, 18), r + rng.uniform(3, 22)])
    else:
        target = bg * rng.uniform(0.95, 1.05, 3)
    out = out * (np.clip(target, 60, 255) / bg)
    return np.clip(out, 0, 255).astype(np.float32)


def _letterbox(
    rgb: NDArray[np.float32], labels: NDArray[np.int32], nuc: NDArray[np.bool_], rng: np.random.Generator
) -> None:
    size = labels.shape[0]
    flat = rgb.reshape(-1, 3)
    bright = flat.sum(axis=1)
    colour = flat[bright >= np.percentile(bright, 80)].mean(axis=0) * rng.uniform(0.96, 1.04, 3)
    for side in ("top", "bottom"):
        if rng.random() < 0.75:
            hgt = int(rng.integers(size // 16, size // 3))
            rows = slice(0, hgt) if side == "top" else slice(size - hgt, size)
            rgb[rows] = colour + rng.normal(0, 1.5, rgb[rows].shape)
            labels[rows] = 0
            nuc[rows] = False


def paste_field(
    fields: list[Field],
    sprites: list[Sprite],
    size: int,
    rng: np.random.Generator,
    n_paste: tuple[int, int] = (3, 12),
    scale: tuple[float, float] = (1.0, 2.0),
    touch_p: float = 0.5,
    recolour_p: float = 0.5,
    abundant_p: float = 0.35,
) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """One copy-paste field: (rgb uint8, mask 0/128/255). See the module docstring."""
    rgb, labels, nuc = _background(fields, size, rng)
    for _ in range(int(rng.integers(n_paste[0], n_paste[1] + 1))):
        sp = sprites[int(rng.integers(len(sprites)))]
        f = float(np.exp(rng.uniform(*np.log(scale))))
        _paste(rgb, labels, nuc, sp, f, rng, touch_p, recolour_p, abundant_p)
    labels = _relabel(labels)
    rgb = stain_shift(rgb, rng)
    if rng.random() < BAND_P:
        _letterbox(rgb, labels, nuc, rng)
    cell = (labels > 0) & ~_touch_gaps(labels)
    img = np.clip(rgb + rng.normal(0, 1.5, rgb.shape) + 0.5, 0, 255).astype(np.uint8)
    return img, encode_mask(cell, nuc & cell)


def write_paste_set(
    prepared: Path,
    out: Path,
    n: int,
    size: int = 320,
    seed: int = 0,
    mpp: float = 0.25,
) -> dict[str, Any]:
    """Write ``n`` fields ``paste_NNNNN.png`` to ``out/images`` + ``out/masks`` and ``out/paste.json``."""
    fields = load_fields(prepared)
    sprites = sprites_from(fields)
    if not sprites:
        raise SegDataError(f"{prepared}: no PBC cells with a nucleus to paste")
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, mask = paste_field(fields, sprites, size, rng)
        for sub, arr in (("images", img), ("masks", mask)):
            with atomic_path(out / sub / f"paste_{i:05d}.png", suffix=".tmp.png", fsync=False) as tmp:
                Image.fromarray(arr).save(tmp)
    info = {
        "n": n,
        "size_px": size,
        "mpp": mpp,
        "seed": seed,
        "prepared": str(prepared),
        "n_background_fields": len(fields),
        "n_sprites": len(sprites),
        "sources": sorted({f.name.split("_", 1)[0] for f in fields}),
        "licences": LICENCES,
        "method": (__doc__ or "").strip(),
    }
    (out / "paste.json").write_text(json.dumps(info, indent=1))
    return info

"""Segmentation training data: reading image/mask pairs and building masks by a classical method.

Mask files (PNG/BMP/TIFF, single channel, same name stem as the image):
``0`` background, ``>0`` cell. When a mask uses the three-level convention of the
wbc-seg data set (``128`` cytoplasm, ``255`` nucleus) the nucleus is known as well
(cell = nucleus ∪ cytoplasm); a two-valued mask gives the cell only.

Real expert masks exist for few smear images, so :func:`prepare_seg_data` derives masks for
PBC single-cell images (CC BY 4.0) and BCCD smear fields (MIT) by the classical method
documented in :func:`classical_masks` / :func:`bccd_masks`, and writes them resampled to the
segmenter's µm/px, ready for ``wsiflow train segmenter IMAGES MASKS``.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage as ndi
from skimage import draw, filters, measure, morphology, transform

from wsiflow.atomic import atomic_path
from wsiflow.errors import WsiflowError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NUCLEUS_VALUE = 255
CYTOPLASM_VALUE = 128

PBC_MPP = 0.1  # CellaVision DM96 fields; red cells ~75 px across ≈ 7.5 µm
BCCD_MPP = 0.072  # median BCCD RBC box 104 px ≈ 7.5 µm

MASK_METHOD = (
    "Classical masks. PBC (0.1 µm/px, worked at 0.2 µm/px after a Gaussian blur of 0.4 µm): "
    "nucleus = pixels with G < 0.55·B and G < 120 (dark purple), holes filled, components "
    "≥ 12 µm² (smaller purple objects are platelets); cell candidate = pixels darker than the "
    "background (1 − (R+G+B)/background > 0.06) that are not red-cell coloured (R/G more than "
    "0.12 above the background's with B/G less than 0.25 above it) or very dark (> 0.3), "
    "closed, filled and limited to 4.5 µm around a nucleus; per nucleus, a disc is grown from "
    "the cell's centroid while ≥ 80% of each ring is candidate (red-cell crescents stop it), "
    "recentred once, and the cell = candidate ∩ disc connected to the nucleus, opened (0.5 µm). "
    "Platelet-class images get empty masks. BCCD (0.072 µm/px from red-cell boxes): cell = the "
    "ellipse inscribed in each WBC box ∩ non-background, filled; nucleus = purple pixels "
    "(B − R > 25, G < 0.8·B) inside it; everything outside WBC boxes is background."
)


@dataclass(frozen=True)
class SegPair:
    """One training image with its masks (bool), at the file's own resolution."""

    name: str
    rgb: NDArray[np.uint8]
    cell: NDArray[np.bool_]
    nucleus: NDArray[np.bool_] | None  # None: the mask does not say where the nucleus is


class SegDataError(WsiflowError, ValueError):
    """Bad segmentation training data (missing mask, size mismatch, unreadable file)."""


def read_rgb(path: Path) -> NDArray[np.uint8]:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError) as exc:
        raise SegDataError(f"{path}: cannot read image ({exc})") from None


def read_mask(path: Path) -> tuple[NDArray[np.bool_], NDArray[np.bool_] | None]:
    """(cell, nucleus or None) from a mask file; see the module docstring for the convention."""
    try:
        with Image.open(path) as im:
            m = np.asarray(im.convert("L") if im.mode not in ("L", "I", "I;16", "P") else im)
    except (OSError, ValueError) as exc:
        raise SegDataError(f"{path}: cannot read mask ({exc})") from None
    if m.ndim == 3:
        m = m[..., 0]
    values = np.unique(m)
    cell = m > 0
    three_level = bool(np.isin(values, (0, CYTOPLASM_VALUE, NUCLEUS_VALUE)).all() and (values == 128).any())
    return cell, (m == NUCLEUS_VALUE) if three_level else None


def find_pairs(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    """Image files in ``images`` matched by stem to mask files in ``masks``."""
    if not images.is_dir():
        raise SegDataError(f"{images}: not a folder of images")
    if not masks.is_dir():
        raise SegDataError(f"{masks}: not a folder of masks")
    same = images.resolve() == masks.resolve()  # wbc-seg layout: NNN.bmp image + NNN.png mask
    by_stem: dict[str, Path] = {}
    for p in sorted(masks.iterdir()):
        if (p.suffix.lower() == ".png") if same else (p.suffix.lower() in IMAGE_SUFFIXES):
            by_stem.setdefault(p.stem, p)
    pairs = []
    missing = []
    for p in sorted(images.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES or (same and p.suffix.lower() == ".png"):
            continue
        m = by_stem.get(p.stem)
        if m is None:
            missing.append(p.name)
        else:
            pairs.append((p, m))
    if missing:
        raise SegDataError(f"{masks}: no mask for {len(missing)} image(s), e.g. {missing[0]}")
    if not pairs:
        raise SegDataError(f"{images}: no images found")
    return pairs


def load_pair(image: Path, mask: Path) -> SegPair:
    rgb = read_rgb(image)
    cell, nucleus = read_mask(mask)
    if cell.shape != rgb.shape[:2]:
        raise SegDataError(f"{mask}: mask is {cell.shape[::-1]} px but the image is {rgb.shape[1::-1]} px")
    return SegPair(image.stem, rgb, cell, nucleus)


def _disk(r: float) -> NDArray[np.uint8]:
    return morphology.disk(max(1, round(r)))


def _nuclei(sm: NDArray[np.float32], mpp: float, min_area_um2: float = 12.0) -> NDArray[np.bool_]:
    g, b = sm[..., 1], sm[..., 2]
    nuc = (g < 0.55 * b) & (g < 120)
    nuc = ndi.binary_fill_holes(ndi.binary_closing(nuc, _disk(0.4 / mpp)))
    lab = measure.label(nuc)
    areas = np.bincount(lab.ravel()) * mpp * mpp
    keep = np.flatnonzero(areas >= min_area_um2)
    return np.isin(lab, keep[keep > 0])


def classical_masks(rgb: NDArray[np.uint8], mpp: float) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """(cell, nucleus) masks of the nucleated cells in a Romanowsky-stained image (see MASK_METHOD).

    Tuned on PBC (CellaVision) fields at 0.2 µm/px; ``mpp`` scales every distance.
    """
    sm = filters.gaussian(rgb.astype(np.float32), sigma=0.4 / mpp, channel_axis=-1, preserve_range=True)
    nuc = _nuclei(sm, mpp)
    if not nuc.any():
        return nuc.copy(), nuc
    r, g, b = sm[..., 0] + 1, sm[..., 1] + 1, sm[..., 2] + 1
    bgpx = np.percentile(sm.reshape(-1, 3), 95, axis=0) + 1
    dark = 1 - (r + g + b) / bgpx.sum()
    rg = r / g - bgpx[0] / bgpx[1]
    bgr = b / g - bgpx[2] / bgpx[1]
    rbc = (rg > 0.12) & (bgr < 0.25)
    reach = ndi.binary_dilation(nuc, _disk(4.5 / mpp))
    cand = ((dark > 0.06) & ~rbc) | nuc | (dark > 0.3)
    cand = ndi.binary_fill_holes(ndi.binary_closing(cand, _disk(0.4 / mpp))) & reach
    cand = ndi.binary_opening(cand, _disk(0.5 / mpp)) | nuc
    nl = measure.label(nuc)
    cell = np.zeros_like(nuc)
    yy, xx = np.indices(nuc.shape)
    for region in measure.regionprops(nl):
        own_nuc = nl == region.label
        cy, cx = region.centroid
        nrad = float(np.sqrt(region.area / np.pi))
        rstar = 0
        rr = np.hypot(yy - cy, xx - cx)
        for it in range(2):
            rr = np.hypot(yy - cy, xx - cx)
            rmax = int(min(9 / mpp, rr.max()))
            ring = np.minimum(rr.astype(np.int64), rmax + 1).ravel()
            cov = np.bincount(ring, weights=cand.ravel(), minlength=rmax + 2)[: rmax + 1]
            tot = np.bincount(ring, minlength=rmax + 2)[: rmax + 1]
            ok = cov / np.maximum(tot, 1) >= 0.8
            rstar = 0
            while rstar + 1 <= rmax and ok[rstar + 1]:
                rstar += 1
            if it == 0:
                rstar = max(rstar, int(nrad))
                grow = ((rr <= rstar + 1.5 / mpp) & cand) | own_nuc
                lab = measure.label(grow)
                keep = np.unique(lab[own_nuc])
                cy, cx = np.argwhere(np.isin(lab, keep[keep > 0])).mean(axis=0)
        lab = measure.label(((rr <= rstar + 0.5) & cand) | own_nuc)
        keep = np.unique(lab[own_nuc])
        cell |= np.isin(lab, keep[keep > 0])
    cell = ndi.binary_fill_holes(ndi.binary_opening(cell, _disk(0.5 / mpp)) | nuc)
    return cell, nuc


def voc_boxes(xml_path: Path, name: str = "WBC") -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1) of objects called ``name`` in a Pascal VOC annotation."""
    out = []
    for obj in ET.parse(xml_path).getroot().findall("object"):
        if (obj.findtext("name") or "").strip() != name:
            continue
        bb = obj.find("bndbox")
        if bb is None:
            continue
        vals = [round(float(bb.findtext(k) or 0)) for k in ("xmin", "ymin", "xmax", "ymax")]
        out.append((vals[0], vals[1], vals[2], vals[3]))
    return out


def bccd_masks(
    rgb: NDArray[np.uint8], boxes: list[tuple[int, int, int, int]], mpp: float = BCCD_MPP
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """(cell, nucleus) for a BCCD field: ellipse inscribed in each WBC box ∩ non-background."""
    h, w = rgb.shape[:2]
    sm = filters.gaussian(rgb.astype(np.float32), sigma=0.3 / mpp, channel_axis=-1, preserve_range=True)
    bgpx = np.percentile(sm.reshape(-1, 3), 97, axis=0) + 1
    dark = 1 - (sm.sum(-1) + 3) / bgpx.sum()
    r, g, b = sm[..., 0], sm[..., 1], sm[..., 2]
    purple = ((b - r) > 25) & (g < 0.8 * b)
    cell = np.zeros((h, w), bool)
    nucleus = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        ell = np.zeros((h, w), bool)
        rr, cc = draw.ellipse(
            (y0 + y1) / 2, (x0 + x1) / 2, max(1, (y1 - y0) / 2), max(1, (x1 - x0) / 2), shape=(h, w)
        )
        ell[rr, cc] = True
        c = ndi.binary_fill_holes(ndi.binary_closing(ell & (dark > 0.04), _disk(0.5 / mpp))) & ell
        c = ndi.binary_opening(c, _disk(0.5 / mpp))
        lab = measure.label(c)
        if lab.max() > 0:
            c = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
        cell |= c
        nucleus |= ndi.binary_opening(purple & c, _disk(0.3 / mpp))
    return cell, nucleus


def resample_pair(
    rgb: NDArray[np.uint8],
    masks: tuple[NDArray[np.bool_], ...],
    src_mpp: float,
    dst_mpp: float,
) -> tuple[NDArray[np.uint8], tuple[NDArray[np.bool_], ...]]:
    """Resize an image (anti-aliased) and its masks (area fraction ≥ 0.5) from src to dst µm/px."""
    h, w = rgb.shape[:2]
    f = src_mpp / dst_mpp
    shape = (max(1, round(h * f)), max(1, round(w * f)))
    img = transform.resize(rgb, shape, order=1, anti_aliasing=f < 1, preserve_range=True)
    out = tuple(
        transform.resize(m.astype(np.float32), shape, order=1, anti_aliasing=f < 1) >= 0.5 for m in masks
    )
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), out


def encode_mask(cell: NDArray[np.bool_], nucleus: NDArray[np.bool_] | None) -> NDArray[np.uint8]:
    m = np.where(cell, CYTOPLASM_VALUE, 0).astype(np.uint8)
    if nucleus is not None:
        m[nucleus & cell] = NUCLEUS_VALUE
    return m


def _save_png(path: Path, arr: NDArray[np.uint8]) -> None:
    with atomic_path(path, suffix=".tmp.png", fsync=False) as tmp:
        Image.fromarray(arr).save(tmp)


def iter_pbc(root: Path) -> Iterator[tuple[str, str, Path]]:
    """(class, name, path) of the PBC single-cell images under ``root/<class>/*.jpg``."""
    for cdir in sorted(p for p in root.iterdir() if p.is_dir()):
        for p in sorted(cdir.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                yield cdir.name, f"pbc_{cdir.name}_{p.stem}", p


def prepare_seg_data(
    out: Path,
    pbc: Path | None,
    bccd: Path | None,
    dst_mpp: float = 0.5,
    bccd_split: str = "trainval",
    limit_per_class: int | None = None,
    classes: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Write ``out/images/*.png`` + ``out/masks/*.png`` (0/128/255) at ``dst_mpp`` and a manifest.

    PBC masks come from :func:`classical_masks` (platelet images: empty masks); BCCD fields
    (only the images listed in ``ImageSets/Main/<bccd_split>.txt``) from :func:`bccd_masks`.
    """
    img_dir, mask_dir = out / "images", out / "masks"
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    items: list[dict[str, Any]] = []
    work_mpp = 0.2
    if pbc is not None:
        counts: dict[str, int] = {}
        for cls, name, path in iter_pbc(pbc):
            if classes is not None and cls not in classes:
                continue
            if limit_per_class is not None and counts.get(cls, 0) >= limit_per_class:
                continue
            counts[cls] = counts.get(cls, 0) + 1
            rgb = read_rgb(path)
            small, _ = resample_pair(rgb, (), PBC_MPP, work_mpp)
            if cls == "platelet":
                cell = nuc = np.zeros(small.shape[:2], bool)
            else:
                cell, nuc = classical_masks(small, work_mpp)
            img, (cell, nuc) = resample_pair(small, (cell, nuc), work_mpp, dst_mpp)
            _save_png(img_dir / f"{name}.png", img)
            _save_png(mask_dir / f"{name}.png", encode_mask(cell, nuc))
            items.append({"name": name, "source": "pbc", "class": cls, "file": str(path)})
    if bccd is not None:
        ids = (bccd / "ImageSets" / "Main" / f"{bccd_split}.txt").read_text().split()
        for stem in ids:
            path = bccd / "JPEGImages" / f"{stem}.jpg"
            rgb = read_rgb(path)
            cell, nuc = bccd_masks(rgb, voc_boxes(bccd / "Annotations" / f"{stem}.xml"))
            img, (cell, nuc) = resample_pair(rgb, (cell, nuc), BCCD_MPP, dst_mpp)
            name = f"bccd_{stem}"
            _save_png(img_dir / f"{name}.png", img)
            _save_png(mask_dir / f"{name}.png", encode_mask(cell, nuc))
            items.append({"name": name, "source": "bccd", "class": "field", "file": str(path)})
    manifest = {
        "mpp": dst_mpp,
        "method": MASK_METHOD,
        "sources": {
            "pbc": {
                "root": str(pbc),
                "mpp": PBC_MPP,
                "licence": "CC BY 4.0 (Acevedo et al., Data in Brief 2020)",
            },
            "bccd": {
                "root": str(bccd),
                "mpp": BCCD_MPP,
                "split": bccd_split,
                "licence": "MIT (Shenggan/BCCD_Dataset)",
            },
        },
        "items": items,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def generated_field(
    size: int, rng: np.random.Generator, n_cells: int = 2, n_rbc: int = 6
) -> tuple[NDArray[np.uint8], NDArray[np.bool_], NDArray[np.bool_]]:
    """A crude generated smear field at ~0.5 µm/px: (rgb, cell, nucleus).

    Beige background, pink red-cell discs (not cells), lilac nucleated cells with a dark
    purple nucleus. For smoke tests and as optional extra negatives/positives.
    """
    yy, xx = np.indices((size, size))
    img = np.empty((size, size, 3), np.float32)
    img[:] = (245, 225, 200)
    cell = np.zeros((size, size), bool)
    nucleus = np.zeros((size, size), bool)
    for _ in range(n_rbc):
        cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(6, 8)
        d = np.hypot(xx - cx, yy - cy) <= r
        img[d] = (215, 160, 160)
    for _ in range(n_cells):
        cx, cy, r = rng.uniform(8, size - 8), rng.uniform(8, size - 8), rng.uniform(9, 13)
        d = np.hypot(xx - cx, yy - cy) <= r
        n = np.hypot(xx - cx - rng.uniform(-2, 2), yy - cy - rng.uniform(-2, 2)) <= r * rng.uniform(0.45, 0.7)
        img[d] = (215, 190, 215)
        img[n] = (95, 45, 135)
        cell |= d
        nucleus |= n
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), cell, nucleus & cell


def write_generated(out: Path, n: int, size: int = 96, seed: int = 0) -> None:
    """Write ``n`` generated fields to ``out/images`` and ``out/masks`` (0/128/255)."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb, cell, nuc = generated_field(size, rng, n_cells=int(rng.integers(0, 4)))
        _save_png(out / "images" / f"gen_{i:05d}.png", rgb)
        _save_png(out / "masks" / f"gen_{i:05d}.png", encode_mask(cell, nuc))

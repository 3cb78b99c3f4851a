"""Classifier training data: discovery, seeded splits, a decoded-image cache, augmentation.

DATA is either a folder with one sub-folder of images per class (the layout of the PBC
and the seed's data sets) or a CSV manifest with columns ``path,label[,group]`` (paths
relative to the CSV). The split is stratified 80/10/10 with a seed; when groups
(patients, slides) are given it is also group-aware, so a group never straddles splits.
Images are decoded once, resized to the network input, and cached as one uint8 array.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from wsiflow.atomic import read_csv_rows
from wsiflow.errors import ConfigError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Samples:
    """Image paths with integer labels into ``classes`` (sorted), optional groups."""

    root: Path
    paths: tuple[Path, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    groups: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def relpaths(self) -> list[str]:
        out = []
        for p in self.paths:
            try:
                out.append(p.relative_to(self.root).as_posix())
            except ValueError:
                out.append(p.as_posix())
        return out

    def subset(self, idx: np.ndarray) -> Samples:
        return Samples(
            root=self.root,
            paths=tuple(self.paths[i] for i in idx),
            labels=self.labels[idx],
            classes=self.classes,
            groups=tuple(self.groups[i] for i in idx) if self.groups is not None else None,
        )


def discover(data: str | Path, classes: Sequence[str] | None = None) -> Samples:
    """Folder-per-class directory or CSV manifest → :class:`Samples` (deterministic order).

    ``classes`` fixes the class order (e.g. a pipeline's taxonomy); by default the
    sorted class names found.
    """
    root = Path(data)
    if root.is_dir():
        found: dict[str, list[Path]] = {}
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            imgs = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if imgs:
                found[sub.name] = imgs
        if len(found) < 2:
            raise ConfigError(
                str(root), "", "expected one sub-folder of images per class (found fewer than 2)"
            )
        names = list(classes) if classes is not None else sorted(found)
        unknown = sorted(set(found) - set(names))
        if unknown:
            raise ConfigError(str(root), "", f"folders {unknown} are not among the classes {names}")
        paths: list[Path] = []
        labels: list[int] = []
        for ci, name in enumerate(names):
            for p in found.get(name, []):
                paths.append(p)
                labels.append(ci)
        return Samples(root, tuple(paths), np.asarray(labels, dtype=np.int64), tuple(names))
    if root.is_file() and root.suffix.lower() == ".csv":
        return _discover_csv(root, classes)
    raise ConfigError(str(root), "", "not a folder of class sub-folders nor a .csv manifest")


def _discover_csv(path: Path, classes: Sequence[str] | None) -> Samples:
    rows, cols = read_csv_rows(path, {"path", "label"}, "the manifest needs columns path,label[,group]")
    if not rows:
        raise ConfigError(str(path), "", "the manifest is empty")
    names = list(classes) if classes is not None else sorted({r["label"] for r in rows})
    index = {n: i for i, n in enumerate(names)}
    paths, labels, groups = [], [], []
    for ln, r in enumerate(rows, start=2):
        if r["label"] not in index:
            raise ConfigError(str(path), f"line {ln}", f"label {r['label']!r} is not among {names}")
        p = Path(r["path"])
        paths.append(p if p.is_absolute() else path.parent / p)
        labels.append(index[r["label"]])
        groups.append(r.get("group") or "")
    has_groups = "group" in cols and any(groups)
    return Samples(
        path.parent,
        tuple(paths),
        np.asarray(labels, dtype=np.int64),
        tuple(names),
        tuple(groups) if has_groups else None,
    )


def split_indices(
    labels: np.ndarray,
    seed: int,
    groups: Sequence[str] | None = None,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict[str, np.ndarray]:
    """Stratified train/val/test indices (sorted). Group-aware when ``groups`` is given."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    n = len(labels)
    idx = np.arange(n)
    f_train, f_val, f_test = fractions
    if abs(f_train + f_val + f_test - 1) > 1e-6 or min(fractions) <= 0:
        raise ConfigError("", "split", f"fractions must be positive and sum to 1, got {fractions}")
    if groups is not None:
        n_groups = len(set(groups))
        if n_groups < 3:
            raise ConfigError(
                "", "split", f"a group-aware split needs at least 3 groups (slides/patients), got {n_groups}"
            )
        # one group per fold when there are fewer groups than the fractions ask for
        k = min(max(2, round(1 / min(f_val, f_test))), n_groups)
        folds = list(
            StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(idx, labels, groups)
        )
        test = folds[0][1]
        val = folds[1][1]
        train = np.setdiff1d(idx, np.concatenate([test, val]))
        return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    counts = np.bincount(labels)
    n_classes = int((counts > 0).sum())
    # stratified when every class can give each part a member (sklearn refuses otherwise)
    smallest_part = min(math.ceil(f_test * n), math.ceil(f_val * n))
    stratified = counts[counts > 0].min() >= 3 and smallest_part >= n_classes
    strat = labels if stratified else None
    rest, test = train_test_split(idx, test_size=f_test, random_state=seed, stratify=strat)
    strat_rest = labels[rest] if strat is not None else None
    train, val = train_test_split(
        rest, test_size=f_val / (f_train + f_val), random_state=seed, stratify=strat_rest
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def split_disjoint(
    labels: np.ndarray, seed: int, groups: Sequence[str] | None, forbid: np.ndarray
) -> dict[str, np.ndarray]:
    """Like :func:`split_indices`, but no ``forbid`` item (nor any item of a group holding one)
    lands in test: e.g. the images a warm-start bundle was trained on. Test is drawn from the
    eligible items with the usual fractions; val and train from all the rest."""
    forbid = np.asarray(forbid, bool)
    if not forbid.any():
        return split_indices(labels, seed, groups)
    n = len(labels)
    if groups is not None:
        g = np.asarray(groups, dtype=object)
        bad_groups = set(g[forbid].tolist())
        forbid = np.array([x in bad_groups for x in g], bool)
    elig = np.flatnonzero(~forbid)
    sub_groups = [groups[int(i)] for i in elig] if groups is not None else None
    if elig.size < 3 or (sub_groups is not None and len(set(sub_groups)) < 3):
        raise ConfigError(
            "",
            "split",
            f"only {elig.size} image(s) in {len(set(sub_groups or []))} group(s) were never seen by the "
            "warm-start bundle: too few for a held-out test split (add cells from new slides)",
        )
    test = elig[split_indices(labels[elig], seed, sub_groups)["test"]]
    rest = np.setdiff1d(np.arange(n), test)
    rest_groups = [groups[int(i)] for i in rest] if groups is not None else None
    val = rest[split_indices(labels[rest], seed, rest_groups)["val"]]
    train = np.setdiff1d(rest, val)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def content_digests(paths: Sequence[Path]) -> list[str]:
    """A short sha256 (16 hex) of each file's bytes: which images a bundle saw, whatever
    their paths (recorded in the card; a warm start keeps its test split disjoint from them)."""
    out = []
    for p in paths:
        try:
            out.append(hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16])
        except OSError as exc:
            raise ConfigError(str(p), "", f"cannot read image ({exc})") from None
    return out


def split_digest(relpaths: Sequence[str]) -> str:
    """sha256 over the sorted relative paths of one split (recorded in the card)."""
    return hashlib.sha256("\n".join(sorted(relpaths)).encode()).hexdigest()


def square_pad(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` centred on a black square of side max(h, w) (the crop rules' square, as
    :func:`wsiflow.classify.crop_cells` builds it for a box covering the whole image)."""
    h, w = rgb.shape[:2]
    if h == w:
        return rgb
    side = max(h, w)
    out = np.zeros((side, side, 3), np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = rgb
    return out


def _decode(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise ConfigError(str(path), "", f"cannot read image ({exc})") from None


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode one image, RGB, as ``size``×``size`` uint8: the whole field centred on a black
    square (never stretched: a crop at inference is a square around the cell, not a
    stretched rectangle), then resized (bilinear, antialiased)."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced scale, faster
            sq = Image.fromarray(square_pad(np.asarray(im.convert("RGB"), dtype=np.uint8)))
            rgb = sq.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise ConfigError(str(path), "", f"cannot read image ({exc})") from None


def load_images(
    paths: Sequence[Path],
    size: int,
    cache_dir: Path | None = None,
    cropper: Callable[[np.ndarray], np.ndarray | None] | None = None,
    cropper_key: str = "",
) -> np.ndarray:
    """All images as one (n, size, size, 3) uint8 array, cached on disk when ``cache_dir``.

    ``cropper`` (e.g. :class:`wsiflow.train.field_crops.FieldCropper`) turns each decoded
    field into the crop the pipeline would make (None: keep the whole field, squared)."""
    tag = f"|{size}|v2-square|{cropper_key}"
    key = hashlib.sha256(("\n".join(str(p) for p in paths) + tag).encode()).hexdigest()[:16]
    cache = cache_dir / f"images-{size}px-{key}.npy" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        arr = np.load(cache, mmap_mode=None)
        if arr.shape == (len(paths), size, size, 3):
            return arr
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        crop = cropper(_decode(p)) if cropper is not None else None
        out[i] = crop if crop is not None else load_image(p, size)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npy")
        np.save(tmp, out)
        tmp.replace(cache)
    return out


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units (the card's normalisation)."""
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    return [float(v) for v in x.mean(0)], [float(v) for v in x.std(0)]


def to_float(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (n,h,w,3) → float (n,3,h,w) in [0, 1] on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel, returned channels_last."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, gen: torch.Generator, jitter: float = 0.08) -> torch.Tensor:
    """Smear-suited augmentation of a float batch in [0, 1], shape (n,3,h,w).

    Random horizontal flip and 90° rotation (cells have no orientation), a small random
    scale/shift (±8 % / ±6 %, reflection padded), and colour / stain jitter: per-channel
    gain, brightness, contrast and saturation of about ±``jitter``.
    """
    n = x.shape[0]
    dev = x.device

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return (torch.rand(shape or (n,), generator=gen) * (hi - lo) + lo).to(dev)

    # Geometry: one affine grid per sample (flip · rot90 · scale · shift).
    k = torch.randint(0, 4, (n,), generator=gen)
    flip = (torch.rand(n, generator=gen) < 0.5).float() * 2 - 1
    ang = k.float() * (torch.pi / 2)
    scale = u(0.92, 1.08).cpu()
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin
    theta[:, 1, 0] = sin * flip
    theta[:, 1, 1] = cos
    theta[:, :, 2] = (torch.rand(n, 2, generator=gen) - 0.5) * 0.12
    grid = torch.nn.functional.affine_grid(theta.to(dev), list(x.shape), align_corners=False)
    x = torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    # Colour / stain jitter.
    gain = u(1 - jitter, 1 + jitter, n, 3).view(n, 3, 1, 1)
    x = x * gain + u(-jitter / 2, jitter / 2).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(1 - jitter, 1 + jitter).view(n, 1, 1, 1) + mean
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * u(1 - 1.5 * jitter, 1 + 1.5 * jitter).view(n, 1, 1, 1) + gray
    return x.clamp_(0.0, 1.0)

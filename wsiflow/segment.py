"""U-Net probability map → nucleated-cell instances → polygons in level-0 pixels.

Coordinates: pixel ``(row i, col j)`` of the segmentation image covers level-0
``[origin_x + j·scale, origin_x + (j+1)·scale)`` horizontally (likewise vertically), so its
centre is at ``origin + (index + 0.5)·scale``. Centroids and polygon vertices use pixel
centres; bounding boxes use pixel edges (``x1``/``y1`` exclusive).

Instances: threshold the cell probability, fill holes, drop specks; touching cells are split
by a marker watershed on the distance transform. Markers are the predicted nuclei when the
bundle has a nucleus channel (nucleus components closer than ``min_distance_um`` are
merged, so a lobed neutrophil nucleus stays one cell, unless with ``nucleus_split_um2`` two of
them are each nucleus-sized: two pressed cells), otherwise peaks of the distance
transform at least ``min_distance_um`` apart; any cell region left without a marker keeps
its own label. With ``merge_solidity``, touching instances whose union is that convex are
merged back into one (two lobes far apart split a round cell along a straight line; two
touching cells meet at a waist, so their union is less convex). Polygons come from the
label mask (marching squares on each cell's lightly blurred crop), simplified with shapely
by ``simplify_um``. With ``cytoplasm`` (and the RGB image), each instance then grows into the
pale blue cytoplasm beside it that the cell channel missed (:func:`grow_cytoplasm`).
Given a whole image (not a tile), no instance covers its plain border (:func:`plain_border`:
a letterbox band): the maps are zeroed there first, so a cell cut by the band keeps its
visible part and its centroid stays on the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import shapely
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from scipy import ndimage as ndi
from shapely import Polygon
from skimage.feature import peak_local_max
from skimage.measure import find_contours
from skimage.morphology import convex_hull_image, disk, remove_small_objects
from skimage.segmentation import watershed

from wsiflow.cells import CellTable
from wsiflow.config import Cytoplasm, SegmenterSpec
from wsiflow.errors import ModelError
from wsiflow.models.bundle import ModelBundle
from wsiflow.tiling import Tile

if TYPE_CHECKING:
    import os

__all__ = [
    "Segmenter",
    "cell_mask",
    "grow_cytoplasm",
    "instances_from_probs",
    "plain_border",
    "plain_runs",
    "polygons_from_labels",
]

CONTOUR_SIGMA = 0.7  # px
MPP_TOLERANCE = 0.1  # relative µm/px mismatch above which the input is resampled to the card's
PLAIN_STD = 3.0  # grey levels: a border row/column varying less than this along its length is padding


class Segmenter:
    """A loaded U-Net segmenter bundle plus the pipeline's post-processing settings."""

    def __init__(
        self,
        bundle: ModelBundle | str | os.PathLike[str],
        cfg: SegmenterSpec,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(bundle, ModelBundle):
            bundle = ModelBundle.load(bundle, cfg.sha256)
        if bundle.task != "segmenter":
            raise ModelError(
                f"{bundle.weights_path}: bundle {bundle.name!r} is a {bundle.task}, not a segmenter"
            )
        self.bundle = bundle
        self.cfg = cfg
        self.device = torch.device(device)
        model = bundle.build(self.device)
        self.model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.codes = bundle.class_codes
        self.has_nucleus = len(self.codes) > 1 and self.codes[1] == "nucleus"
        self.mpp = bundle.mpp
        # what a read clipped to the slide keeps past its edge (pipeline.batch): the measured
        # border context (None: not measured), and the size multiple the network pools to
        self.context_um: float | None = bundle.model_card.context_um
        self.multiple = int(getattr(model, "multiple", 1))
        self._mean = torch.tensor(bundle.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(bundle.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        # Images per forward call. On CPU one: oneDNN's convolutions round differently with
        # the batch size (last-bit differences in the maps, measured on the demo U-Net), and
        # a tile's cells must not depend on which tiles shared its task (retries split
        # batches); a 1,024² tile already fills the cores. On a GPU, MAX_BATCH.
        self.max_batch = self.MAX_BATCH if self.device.type == "cuda" else 1

    MAX_BATCH = 8  # images per forward call in probability_maps_batch, on a GPU

    @torch.inference_mode()
    def probability_maps(
        self, rgb: NDArray[np.uint8], mpp: float | None = None
    ) -> tuple[NDArray[np.float32], NDArray[np.float32] | None]:
        """(cell, nucleus or None) sigmoid probabilities (H, W) for an RGB image.

        ``mpp``: µm/px of ``rgb``; when it differs from the bundle's by more than 10% the
        image is resampled to the bundle's µm/px and the maps back to the input size.
        """
        _check_rgb(rgb)
        return self._forward([rgb], mpp)[0]

    @torch.inference_mode()
    def probability_maps_batch(
        self, rgbs: Sequence[NDArray[np.uint8]], mpp: float | None = None
    ) -> list[tuple[NDArray[np.float32], NDArray[np.float32] | None]]:
        """:meth:`probability_maps` of each image, in order: the images of one shape go
        through the network together, up to ``max_batch`` per forward call (a slide's inner
        tiles share the full read size, those at its edges are clipped to it, so on a GPU a
        task is one call per shape). On CPU ``max_batch`` is 1, so the maps are exactly those
        of one image at a time."""
        for rgb in rgbs:
            _check_rgb(rgb)
        out: list[tuple[NDArray[np.float32], NDArray[np.float32] | None] | None] = [None] * len(rgbs)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, rgb in enumerate(rgbs):
            by_shape.setdefault(tuple(rgb.shape), []).append(i)
        for idx in by_shape.values():
            step = max(1, self.max_batch)
            for k in range(0, len(idx), step):
                part = idx[k : k + step]
                for i, maps in zip(part, self._forward([rgbs[i] for i in part], mpp), strict=True):
                    out[i] = maps
        return [m for m in out if m is not None]

    def _forward(
        self, rgbs: Sequence[NDArray[np.uint8]], mpp: float | None
    ) -> list[tuple[NDArray[np.float32], NDArray[np.float32] | None]]:
        """Maps of same-shape RGB images in one forward call (a batch of len(rgbs))."""
        h, w = rgbs[0].shape[:2]
        arr = rgbs[0][None] if len(rgbs) == 1 else np.stack(rgbs)
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if self.device.type == "cuda":  # pinned host memory: the copy overlaps host work
            t = t.pin_memory().to(self.device, non_blocking=True)
        else:
            t = t.to(self.device)
        x = t.permute(0, 3, 1, 2).float().div_(255)
        if mpp is not None and abs(mpp / self.mpp - 1) > MPP_TOLERANCE:
            size = (max(1, round(h * mpp / self.mpp)), max(1, round(w * mpp / self.mpp)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=mpp < self.mpp)
        x = ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                logits = self.model(x)
        else:
            logits = self.model(x)
        probs = torch.sigmoid(logits.float())
        if probs.shape[-2:] != (h, w):
            probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        out = probs.cpu().numpy().astype(np.float32)
        return [(out[i, 0], (out[i, 1] if self.has_nucleus else None)) for i in range(len(rgbs))]

    def probabilities(self, rgb: NDArray[np.uint8], mpp: float | None = None) -> NDArray[np.float32]:
        """Cell probability (H, W) float32 for an RGB uint8 image at the segmenter's µm/px."""
        return self.probability_maps(rgb, mpp)[0]

    def segment(
        self,
        rgb: NDArray[np.uint8],
        origin_xy: tuple[float, float],
        scale: float,
        mpp: float | None = None,
        *,
        owner: Tile | None = None,
        keep_cut: bool = False,
    ) -> tuple[CellTable, NDArray[np.bool_]]:
        """Cells of ``rgb`` (read at ``mpp`` µm/px, by default the segmenter's own; its top-left
        is level-0 ``origin_xy``; ``scale`` level-0 px per image px) → (CellTable in level-0 px,
        touches_edge (n,)).
        With ``owner`` (the tile read), only the cells that tile owns are built
        (``keep_cut``: also those cut by the image edge, flagged in touches_edge)."""
        mpp = self.mpp if mpp is None else mpp
        cell, nucleus = self.probability_maps(rgb, mpp)
        return instances_from_probs(
            cell, nucleus, self.cfg, origin_xy, scale, mpp, owner=owner, keep_cut=keep_cut, rgb=rgb
        )


def _check_rgb(rgb: NDArray[np.uint8]) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")


def _labels(
    prob: NDArray[np.float32],
    nucleus: NDArray[np.float32] | None,
    cfg: SegmenterSpec,
    mpp: float,
) -> NDArray[np.int32]:
    fg = ndi.binary_fill_holes(prob > cfg.threshold)
    speck = max(1, int(0.5 * cfg.min_area_um2 / (mpp * mpp)))
    fg = remove_small_objects(fg, max_size=speck)
    if not fg.any():
        return np.zeros(prob.shape, np.int32)
    dist = ndi.distance_transform_edt(fg)
    min_px = max(1, round(cfg.min_distance_um / mpp))
    markers = np.zeros(prob.shape, np.int32)
    if nucleus is not None:
        nuc = (nucleus > 0.5) & fg
        nuc = remove_small_objects(nuc, max_size=max(1, int(2.0 / (mpp * mpp))))
        markers = _nucleus_markers(nuc, fg, min_px, cfg.nucleus_split_um2, mpp)
    comp, n_comp = ndi.label(fg)
    if nucleus is None:
        peaks = peak_local_max(dist, min_distance=min_px, labels=comp, exclude_border=False)
        markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    labels = _flood(comp, n_comp, markers, dist, cfg.merge_solidity)
    orphan = fg & (labels == 0)  # regions of the foreground that no marker reached
    if orphan.any():
        extra, _ = ndi.label(orphan)
        labels = np.where(orphan, extra + labels.max(), labels).astype(np.int32)
    return labels


def _nucleus_markers(
    nuc: NDArray[np.bool_], fg: NDArray[np.bool_], min_px: int, split_um2: float | None, mpp: float
) -> NDArray[np.int32]:
    """Watershed markers from the nucleus mask: fragments closer than ``min_px`` (the lobes of
    one nucleus) are one marker, found by labelling a closed copy; with ``split_um2``, a joined
    marker holding two or more fragments of at least that area is split into those fragments
    (two whole nuclei side by side are two cells); its smaller fragments are no marker of their
    own, so the watershed gives their pixels to the large ones."""
    joined = ndi.binary_closing(nuc, disk(max(1, min_px // 2))) & fg | nuc
    lab, n_joined = ndi.label(joined)
    markers = np.where(nuc, lab, 0).astype(np.int32)
    if split_um2 is None or n_joined == 0:
        return markers
    frag, n_frag = ndi.label(nuc)
    area_um2 = np.bincount(frag.ravel(), minlength=n_frag + 1) * (mpp * mpp)
    owner = np.zeros(n_frag + 1, np.int64)
    owner[frag[nuc]] = lab[nuc]  # the joined marker each fragment lies in
    big = area_um2 >= split_um2
    big[0] = False
    split = np.bincount(owner[big], minlength=n_joined + 1) >= 2
    if not split.any():
        return markers
    in_split = split[lab] & nuc
    return np.where(in_split, np.where(big[frag], frag + n_joined, 0), markers).astype(np.int32)


def plain_runs(x: NDArray[np.floating], axis: int, tol: float = PLAIN_STD) -> tuple[int, int]:
    """How many plain lines of the image ``x`` (H, W, C) lie at its start and at its end: rows for
    ``axis`` 1 (each row's std along it), columns for ``axis`` 0; a line is plain when every
    channel's standard deviation along it is below ``tol``. All plain: (number of lines, 0)."""
    flat = x.std(axis=axis).max(axis=1) < tol
    if flat.all():
        return len(flat), 0
    return int(np.argmax(~flat)), int(np.argmax(~flat[::-1]))


def plain_border(rgb: NDArray[np.uint8], tol: float = PLAIN_STD) -> NDArray[np.bool_]:
    """Pixels (H, W) of the plain rows and columns at the edges of ``rgb``: from each side
    inward, the rows (columns) along which every channel's standard deviation is below ``tol``
    grey levels, up to the first that is not (:func:`plain_runs`). Such a run is padding, not
    tissue, such as a letterbox band. Rows are judged over the columns not already border and
    vice versa (a band above and black bars beside it, each plain but not alike), twice round.
    A row crossing any cell or smear is far from plain; an image plain throughout is all border."""
    x = rgb.astype(np.float32)
    h, w = rgb.shape[:2]
    rows, cols = np.zeros(h, bool), np.zeros(w, bool)
    for round_ in range(2):
        if round_ and not (rows.any() or cols.any()):
            break  # nothing plain at any edge: the second round would find the same
        for axis in (1, 0):  # axis 1: rows (std along each row, over the inner columns)
            inner = x[:, ~cols] if axis == 1 else x[~rows]
            if inner.size == 0:
                return np.ones((h, w), bool)
            head, tail = plain_runs(inner, axis, tol)
            edge = np.zeros(inner.shape[1 - axis], bool)
            edge[:head] = True
            edge[len(edge) - tail :] = True
            if axis == 1:
                rows = edge
            else:
                cols = edge
    return rows[:, None] | cols[None, :]


def grow_cytoplasm(
    labels: NDArray[np.int32],
    rgb: NDArray[np.uint8],
    spec: Cytoplasm,
    mpp: float,
    padding: NDArray[np.bool_] | None = None,
) -> NDArray[np.int32]:
    """``labels`` grown into the pale blue cytoplasm beside them (see :class:`Cytoplasm`):
    a flood from each instance over the cytoplasm pixels within ``max_um`` of it (nearest
    instance wins), so a pixel joins only through a chain of such pixels. The image's
    background is the ``background_percentile`` of each channel over its pixels that are not
    white padding (past a slide's edge the reader pads with 255); an image of padding only, or
    without instances, is returned as it is. ``padding``: pixels that are not the image's
    (:func:`plain_border`), left out of the background and never grown into."""
    if rgb.shape[:2] != labels.shape:
        raise ValueError(f"rgb {rgb.shape[:2]} and labels {labels.shape} differ in size")
    if not labels.any():
        return labels
    x = rgb.astype(np.float32)
    real = (rgb < 255).any(axis=2)
    if padding is not None:
        real &= ~padding
    if not real.any():
        return labels
    if spec.background_um is None:
        background = np.percentile(x[real], spec.background_percentile, axis=0)
    else:
        background = local_background(
            x, np.asarray(real, bool), spec.background_percentile, spec.background_um / mpp
        )
    od = -np.log10(np.clip((x + 1.0) / (background + 1.0), 1e-3, 1.0))
    total = od.sum(axis=2)
    cyto = (total >= 3 * spec.min_od) & (od[..., 2] <= spec.max_blue_fraction * total) & real
    dist = ndi.distance_transform_edt(labels == 0)
    region = (labels > 0) | (cyto & (dist <= spec.max_um / mpp))
    return watershed(dist, labels, mask=region).astype(np.int32)


def local_background(
    x: NDArray[np.float32],
    real: NDArray[np.bool_],
    percentile: float,
    side_px: float,
    fallback: NDArray[np.float32] | None = None,
) -> NDArray[np.float32]:
    """Per-pixel background (H, W, 3) of image ``x``: the ``percentile`` of each channel over the
    ``real`` pixels of each square of about ``side_px`` (the image cut into a grid of equal
    squares; every other pixel each way, which is plenty for a percentile), bilinearly blended
    between the squares' centres and constant past the outer ones. A square with fewer than a
    quarter of its pixels real takes ``fallback``; None: the whole image's, computed only then."""
    h, w = real.shape
    ny, nx = max(1, round(h / side_px)), max(1, round(w / side_px))
    ys = np.linspace(0, h, ny + 1).round().astype(int)
    xs = np.linspace(0, w, nx + 1).round().astype(int)
    grid = np.empty((ny, nx, 3), np.float32)
    for i in range(ny):
        for j in range(nx):
            sel = real[ys[i] : ys[i + 1] : 2, xs[j] : xs[j + 1] : 2]
            if sel.sum() * 4 < sel.size:
                if fallback is None:
                    fallback = np.percentile(x[real], percentile, axis=0).astype(np.float32)
                grid[i, j] = fallback
            else:
                grid[i, j] = np.percentile(
                    x[ys[i] : ys[i + 1] : 2, xs[j] : xs[j + 1] : 2][sel], percentile, axis=0
                )
    # bilinear weights from the squares' centres to every row and column (separable)
    wy = _interp_weights(h, (ys[:-1] + ys[1:] - 1) / 2)
    wx = _interp_weights(w, (xs[:-1] + xs[1:] - 1) / 2)
    rows = (wy @ grid.reshape(ny, nx * 3)).reshape(h, nx, 3)
    return np.ascontiguousarray((rows.transpose(0, 2, 1) @ wx.T).transpose(0, 2, 1))


def _interp_weights(n: int, centres: NDArray[np.float64]) -> NDArray[np.float32]:
    """(n, len(centres)) weights of linear interpolation from values at ``centres`` to 0..n-1."""
    eye = np.eye(len(centres), dtype=np.float64)
    pos = np.arange(n, dtype=np.float64)
    return np.stack([np.interp(pos, centres, eye[k]) for k in range(len(centres))], axis=1).astype(np.float32)


def _flood(
    comp: NDArray[np.int32],
    n_comp: int,
    markers: NDArray[np.int32],
    dist: NDArray[np.float64],
    merge_solidity: float | None = None,
) -> NDArray[np.int32]:
    """``watershed(-dist, markers, mask=comp > 0)``, computed per connected component: a component
    holding one marker label is that label entirely (what the flood gives it), one with none stays 0,
    and only components with several markers (touching cells) are flooded, each in its own box.
    Most cells stand alone, so this skips most of the tile's watershed work. Each component floods
    independently, so the labels are the global flood's except where two markers tie on a plateau
    of the distance map: such boundary pixels may go to the other neighbour (seen with nucleus
    markers; with distance-peak markers the test finds the labels identical). ``merge_solidity``:
    see :func:`_merge_convex`, applied to each flooded component."""
    hit = markers > 0
    pairs = np.unique(np.stack([comp[hit], markers[hit]]), axis=1)  # distinct (component, marker label)
    n_markers = np.bincount(pairs[0], minlength=n_comp + 1)
    lut = np.zeros(n_comp + 1, np.int32)
    lut[pairs[0]] = pairs[1]
    lut[n_markers != 1] = 0
    labels = lut[comp]
    slices = ndi.find_objects(comp)
    for c in np.flatnonzero(n_markers >= 2):
        sl = slices[c - 1]
        assert sl is not None
        inside = comp[sl] == c
        flooded = watershed(-dist[sl], np.where(inside, markers[sl], 0), mask=inside)
        if merge_solidity is not None:
            flooded = _merge_convex(flooded, merge_solidity)
        labels[sl][inside] = flooded[inside]
    return labels


def _merge_convex(lab: NDArray[np.int32], min_solidity: float) -> NDArray[np.int32]:
    """Merge touching labels of one component while some touching pair's union has solidity
    (area / convex-hull area) ≥ ``min_solidity``, the most convex union first. Two lobes of one
    round cell split it along a chord (union solidity ≈ 1); two touching round cells meet at a
    waist (two tangent discs: 0.88). A pair's solidity is computed once, in the box of the two
    labels (where their hull lies), and again only after a merge changes one of them."""
    lab = lab.copy()
    known: dict[tuple[int, int], float] = {}
    while True:
        pairs = np.concatenate(
            [
                np.stack([lab[:, :-1].ravel(), lab[:, 1:].ravel()]),
                np.stack([lab[:-1, :].ravel(), lab[1:, :].ravel()]),
            ],
            axis=1,
        )
        pairs = pairs[:, (pairs[0] > 0) & (pairs[1] > 0) & (pairs[0] != pairs[1])]
        if pairs.shape[1] == 0:
            return lab
        pairs = np.unique(np.sort(pairs, axis=0), axis=1)
        boxes = ndi.find_objects(lab)
        best: tuple[float, int, int] | None = None
        for a, b in pairs.T:
            key = (int(a), int(b))
            solidity = known.get(key)
            if solidity is None:
                solidity = known[key] = _union_solidity(lab, key, boxes)
            if solidity >= min_solidity and (best is None or solidity > best[0]):
                best = (solidity, *key)
        if best is None:
            return lab
        _, keep, gone = best
        lab[lab == gone] = keep
        known = {k: v for k, v in known.items() if keep not in k and gone not in k}


def _union_solidity(
    lab: NDArray[np.int32], pair: tuple[int, int], boxes: list[tuple[slice, ...] | None]
) -> float:
    """Solidity of the union of two labels, in the smallest box holding both."""
    ba, bb = boxes[pair[0] - 1], boxes[pair[1] - 1]
    assert ba is not None and bb is not None
    box = tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(ba, bb, strict=True))
    sub = lab[box]
    union = (sub == pair[0]) | (sub == pair[1])
    return float(union.sum()) / max(1.0, float(convex_hull_image(union).sum()))


def cell_mask(prob: NDArray[np.float32], cfg: SegmenterSpec, mpp: float) -> NDArray[np.bool_]:
    """Semantic cell mask: threshold, fill holes, drop connected regions outside the size limits."""
    fg = ndi.binary_fill_holes(prob > cfg.threshold)
    lab, n = ndi.label(fg)
    if n == 0:
        return np.zeros(prob.shape, bool)
    area = np.bincount(lab.ravel(), minlength=n + 1) * (mpp * mpp)
    ok = (area >= cfg.min_area_um2) & (area <= cfg.max_area_um2)
    ok[0] = False
    return np.asarray(ok[lab], dtype=bool)


def polygons_from_labels(
    labels: NDArray[np.int32],
    ids: NDArray[np.int64],
    simplify_px: float,
) -> tuple[list[NDArray[np.float64]], NDArray[np.float64]]:
    """Outer contour of each label in ``ids`` (open ring, (x, y) at pixel centres) and its length (px)."""
    slices = ndi.find_objects(labels)
    polys = np.empty(len(ids), dtype=object)
    lengths = np.zeros(len(ids))
    for k, lab in enumerate(ids):
        sl = slices[lab - 1]
        assert sl is not None
        y0, x0 = sl[0].start, sl[1].start
        crop = np.pad((labels[sl] == lab).astype(np.float32), 2)
        # a light blur before marching squares removes the pixel staircase (whose length
        # overstates the perimeter by ~8%) while keeping the enclosed area
        contours = find_contours(ndi.gaussian_filter(crop, CONTOUR_SIGMA), 0.5) or find_contours(crop, 0.5)
        c = max(contours, key=len)  # (row, col) in the padded crop; closed
        xy = np.column_stack([c[:, 1] + x0 - 2, c[:, 0] + y0 - 2])
        lengths[k] = float(np.hypot(*np.diff(xy, axis=0).T).sum())
        polys[k] = Polygon(xy)
    if simplify_px > 0 and len(polys):
        polys = _simplified(polys, simplify_px)
    rings = shapely.get_exterior_ring(polys)
    coords = shapely.get_coordinates(rings)
    sizes = shapely.get_num_coordinates(rings)
    ends = np.cumsum(sizes)
    return [coords[e - n : e - 1] for e, n in zip(ends, sizes, strict=True)], lengths  # open rings


def _simplified(polys: NDArray[np.object_], tolerance: float) -> NDArray[np.object_]:
    """Douglas-Peucker on all polygons at once (shapely, vectorised). The plain algorithm is ~20x
    cheaper than the topology-preserving one; the rare result that is invalid is redone with
    topology preserved, and one that collapses (not a polygon of >= 3 vertices) keeps its contour."""
    out = shapely.simplify(polys, tolerance, preserve_topology=False)
    redo = ~shapely.is_valid(out)
    if redo.any():
        out[redo] = shapely.simplify(polys[redo], tolerance, preserve_topology=True)
    bad = (shapely.get_type_id(out) != shapely.GeometryType.POLYGON) | shapely.is_empty(out)
    bad |= shapely.get_num_coordinates(out) < 4
    out[bad] = polys[bad]
    return out


def instances_from_probs(
    prob: NDArray[np.float32],
    nucleus: NDArray[np.float32] | None,
    cfg: SegmenterSpec,
    origin_xy: tuple[float, float],
    scale: float,
    mpp: float,
    *,
    owner: Tile | None = None,
    keep_cut: bool = False,
    rgb: NDArray[np.uint8] | None = None,
) -> tuple[CellTable, NDArray[np.bool_]]:
    """Probability maps → (CellTable, touches_edge). See the module docstring for conventions.

    ``rgb``: the image the maps came from (same size); needed when ``cfg.cytoplasm`` is set.
    With it and without ``owner`` (a whole image: a field, as evaluations and field harvests
    segment), the maps are zeroed on its :func:`plain_border` first, so no outline covers the
    image's padding (a letterbox band). A tile (``owner``) is not trimmed so: its padding is the
    white past the slide's edge, which ``owner.cuts`` handles, and on a flat background (blank
    glass) its plain rows would depend on how far the read reaches, so a cell read by two
    tiles could get two outlines.

    ``owner`` (the tile that was read): keep only the cells it owns — centroid inside its
    core (:meth:`Tile.owns`) and not touching the image edge — *before* their polygons are
    traced, so halo cells (a third of a tile's cells) cost no contour work. ``keep_cut``
    keeps the core's cells that touch the image edge too (flagged), so the caller can
    re-read a larger box for them instead of losing them. Only the sides of the image that
    ``owner.cuts`` (inside the slide) count as its edge: past a slide edge the image is white
    padding, and a cell touching it is whole. Without ``owner`` every side counts."""
    padding = None
    if rgb is not None and rgb.shape[:2] != prob.shape:
        raise ValueError(f"rgb {rgb.shape[:2]} and the maps {prob.shape} differ in size")
    if rgb is not None and owner is None:  # a whole image (a field), not a tile: see above
        padding = plain_border(rgb)
        if padding.any():
            prob = np.where(padding, np.float32(0), prob)
            nucleus = None if nucleus is None else np.where(padding, np.float32(0), nucleus)
    labels = _labels(prob, nucleus, cfg, mpp)
    cell_part = labels  # seg_score: the mean cell probability over the cell channel's part
    if cfg.cytoplasm is not None:
        if rgb is None:
            raise ValueError("segmenter.cytoplasm is set: instances_from_probs needs the RGB image")
        labels = grow_cytoplasm(labels, rgb, cfg.cytoplasm, mpp, padding)
    n_lab = int(labels.max())
    if n_lab == 0:
        return CellTable.empty(0), np.zeros(0, bool)
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n_lab + 1)
    area_um2 = counts * (mpp * mpp)
    keep = np.flatnonzero((counts > 0) & (area_um2 >= cfg.min_area_um2) & (area_um2 <= cfg.max_area_um2))
    keep = keep[keep > 0].astype(np.int64)
    if len(keep) == 0:
        return CellTable.empty(0), np.zeros(0, bool)
    h, w = labels.shape
    rows, cols = np.indices((h, w))
    sum_r = np.bincount(flat, weights=rows.ravel(), minlength=n_lab + 1)
    sum_c = np.bincount(flat, weights=cols.ravel(), minlength=n_lab + 1)
    sum_p = np.bincount(cell_part.ravel(), weights=prob.ravel().astype(np.float64), minlength=n_lab + 1)
    n_p = counts if cell_part is labels else np.bincount(cell_part.ravel(), minlength=n_lab + 1)
    border = np.zeros(n_lab + 1, bool)
    cuts = owner.cuts if owner is not None else (True, True, True, True)
    sides = (labels[:, 0], labels[0], labels[:, -1], labels[-1])  # left, top, right, bottom
    for side, cut in zip(sides, cuts, strict=True):
        if cut:
            border[side] = True
    ox, oy = float(origin_xy[0]), float(origin_xy[1])
    cnt = counts[keep].astype(np.float64)
    x = ox + (sum_c[keep] / cnt + 0.5) * scale
    y = oy + (sum_r[keep] / cnt + 0.5) * scale
    if owner is not None:
        owned = owner.owns(x, y)
        if not keep_cut:
            owned &= ~border[keep]
        keep, cnt, x, y = keep[owned], cnt[owned], x[owned], y[owned]
        if len(keep) == 0:
            return CellTable.empty(0), np.zeros(0, bool)
    slices = ndi.find_objects(labels)
    bbox_px = np.zeros((len(keep), 4))
    for k, lab in enumerate(keep):
        sl = slices[lab - 1]
        assert sl is not None
        bbox_px[k] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    simplify_px = cfg.simplify_um / mpp
    rings, lengths = polygons_from_labels(labels, keep, simplify_px)

    n = len(keep)
    bbox = np.empty((n, 4))
    bbox[:, [0, 2]] = ox + bbox_px[:, [0, 2]] * scale
    bbox[:, [1, 3]] = oy + bbox_px[:, [1, 3]] * scale
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum([len(r) for r in rings], out=offsets[1:])
    poly_px = np.concatenate(rings) if rings else np.zeros((0, 2))
    poly_xy = np.column_stack([ox + (poly_px[:, 0] + 0.5) * scale, oy + (poly_px[:, 1] + 0.5) * scale])
    a_um2 = area_um2[keep].astype(np.float64)
    perim_um = lengths * mpp
    circ = np.clip(4 * math.pi * a_um2 / np.maximum(perim_um, 1e-9) ** 2, 0, 1)
    table = CellTable(
        id=np.zeros(n, np.int64),
        x=x,
        y=y,
        bbox=bbox,
        poly_offsets=offsets,
        poly_xy=poly_xy.astype(np.float32),
        area_um2=a_um2.astype(np.float32),
        perimeter_um=perim_um.astype(np.float32),
        circularity=circ.astype(np.float32),
        seg_score=(sum_p[keep] / np.maximum(n_p[keep], 1)).astype(np.float32),
        class_id=np.full(n, -1, np.int16),
        probs=np.zeros((n, 0), np.float32),
        tile=np.zeros(n, np.int64),
    )
    return table, border[keep]

"""Deterministic stand-in models and a generated smear with cells at known positions.

For plumbing tests only (execution, resume, tiling seams): the shipped code paths load
these through the real ModelBundle / Segmenter / Classifier classes.

* Segmenter: a real ``unet`` bundle (depth 1, width 1) whose weights are set by hand so
  the network computes a per-pixel darkness threshold: with inputs scaled to [0, 1],
  ``logit = K · (1 − mean(R, G, B) − T)``. Dark discs on a light background → one cell each.
* Classifier: a real ``inception_v3`` bundle with seeded random weights (so probabilities
  are deterministic but meaningless), classes = the pipeline's taxonomy.
* Slide: an Aperio-style pyramid TIFF at 0.5 µm/px with dark discs at known centres,
  several exactly on tile seams and tile corners of the test grids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsiflow.config import Pipeline, load_pipeline, parse_pipeline

SLIDE_MPP = 0.5
SLIDE_W, SLIDE_H = 1024, 768  # level-0 px (512 × 384 µm)
CELL_RADIUS_PX = 9  # 4.5 µm radius at 0.5 µm/px: ~64 µm² area
BACKGROUND = (238, 232, 240)
NUCLEUS = (96, 48, 140)
TILE_UM_A = 128.0  # 256 px cores: seams at x = 256, 512, 768; y = 256, 512
TILE_UM_B = 96.0  # 192 px cores: seams at x = 192, 384, 576, 768, 960; y = 192, 384, 576


def cell_centres() -> NDArray[np.float64]:
    """Known cell centres (level-0 px, x, y): a grid plus cells straddling both seam sets."""
    pts: list[tuple[float, float]] = []
    for y in range(60, SLIDE_H - 40, 110):
        for x in range(70, SLIDE_W - 40, 120):
            pts.append((x + 0.5 * (y % 3), float(y)))
    seams = [
        (256.0, 100.0), (512.0, 300.0), (768.0, 640.0),  # vertical seams of A
        (130.0, 256.0), (620.0, 512.0),  # horizontal seams of A
        (256.0, 512.0), (512.0, 256.0),  # corners of four A tiles
        (192.0, 300.0), (384.0, 700.0), (960.0, 140.0),  # seams of B
        (576.0, 384.0), (768.0, 192.0),  # corners of B tiles (768 is a seam of both)
        (258.0, 190.0), (383.0, 450.0),  # near, not on, seams
    ]
    pts.extend(seams)
    arr = np.array(pts, np.float64)
    # drop grid cells that would overlap a seam cell (keep discs apart)
    keep = np.ones(len(arr), bool)
    n_grid = len(arr) - len(seams)
    for i in range(n_grid):
        d = np.hypot(*(arr[n_grid:] - arr[i]).T)
        if (d < 4 * CELL_RADIUS_PX).any():
            keep[i] = False
    return arr[keep]


def smear_image(centres: NDArray[np.float64]) -> NDArray[np.uint8]:
    yy, xx = np.mgrid[0:SLIDE_H, 0:SLIDE_W].astype(np.float32)
    img = np.empty((SLIDE_H, SLIDE_W, 3), np.uint8)
    img[:] = BACKGROUND
    for cx, cy in centres:
        # pixel centres at (i + 0.5): the disc is symmetric about the true centre
        disc = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= CELL_RADIUS_PX**2
        img[disc] = NUCLEUS
    return img


def write_smear(path: Path, compression: str = "zlib") -> tuple[Path, NDArray[np.float64]]:
    from wsiflow.slide.writer import write_pyramid_tiff

    centres = cell_centres()
    write_pyramid_tiff(path, smear_image(centres), mpp=SLIDE_MPP, app_mag=20, compression=compression)
    return path, centres


def _training_data() -> dict[str, str]:
    return {"name": "none", "licence": "n/a", "description": "hand-set / seeded weights for plumbing tests"}


def make_threshold_unet(path: Path, threshold: float = 0.3, gain: float = 40.0) -> Path:
    """A ``unet`` segmenter bundle computing ``gain · (darkness − threshold)`` per pixel."""
    import torch

    from wsiflow.models.bundle import save_bundle
    from wsiflow.models.unet import UNet

    net = UNet(in_ch=3, out_ch=1, depth=1, width=1)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.fill_(1.0)
                m.bias.zero_()
        net.inc[0].weight[0, :, 1, 1] = -1.0 / 3.0  # −mean(RGB)
        net.inc[1].bias.fill_(1.0)  # 1 − mean(RGB) = darkness
        net.inc[3].weight[0, 0, 1, 1] = 1.0
        up = net.ups[0]
        up.conv[0].weight[0, 1, 1, 1] = 1.0  # the skip path only (pointwise, no resampling)
        up.conv[3].weight[0, 0, 1, 1] = 1.0
        net.head.weight.fill_(gain)
        net.head.bias.fill_(-gain * threshold)
    card: dict[str, Any] = {
        "name": path.stem,
        "task": "segmenter",
        "architecture": "unet",
        "kwargs": {"in_ch": 3, "out_ch": 1, "depth": 1, "width": 1},
        "classes": [{"code": "cell", "name": "cell"}],
        "input_px": None,
        "mpp": SLIDE_MPP,
        "normalization": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        "training_data": _training_data(),
        "metrics": {},
        "split_seed": 0,
        "demo": True,
    }
    save_bundle(net, card, path)
    return path.with_suffix(".safetensors")


def make_random_inception(path: Path, pipeline: Pipeline, input_px: int, seed: int = 0) -> Path:
    """An ``inception_v3`` classifier bundle with seeded random weights and the pipeline's classes."""
    import torch

    from wsiflow.models.bundle import save_bundle
    from wsiflow.models.registry import build_model

    torch.manual_seed(seed)
    k = len(pipeline.taxonomy)
    net = build_model("inception_v3", {"num_classes": k, "init_weights": False})
    card: dict[str, Any] = {
        "name": path.stem,
        "task": "classifier",
        "architecture": "inception_v3",
        "kwargs": {"num_classes": k},
        "classes": [c.model_dump(mode="json") for c in pipeline.taxonomy],
        "input_px": input_px,
        "mpp": pipeline.resolution.cls_mpp,
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "training_data": _training_data(),
        "metrics": {},
        "split_seed": seed,
        "demo": True,
    }
    save_bundle(net, card, path, fp16=True)
    return path.with_suffix(".safetensors")


def standin_pipeline(seg: Path, cls: Path, tile_um: float = TILE_UM_A, input_px: int = 75) -> dict[str, Any]:
    """The shipped mds-demo pipeline (the generated-cell settings these stand-ins mimic) with
    the stand-in bundles, test tiling and no tissue step."""
    base = load_pipeline("mds-demo").model_dump(mode="json")
    base["name"] = "mds-standin"
    base["resolution"] = {"seg_mpp": 0.5, "cls_mpp": 0.5}
    base["tiling"] = {"tile_um": tile_um, "halo_um": 16.0, "max_object_um": 24.0, "batch_tiles": 2}
    base["tissue"] = {"method": "none", "min_tile_fraction": 0.0}
    base["segmenter"] = {**base["segmenter"], "bundle": str(seg), "sha256": None, "min_area_um2": 20.0}
    base["classifier"] = {**base["classifier"], "bundle": str(cls), "sha256": None, "input_px": input_px,
                          "batch_size": 32}
    base["adequacy"] = {**base["adequacy"], "min_cells": 10}
    return base


def write_pipeline_yaml(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    parse_pipeline(data, path.name)  # validate first
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def match_centres(found_xy: NDArray[np.float64], truth: NDArray[np.float64], tol: float = 2.0) -> list[int]:
    """For each true centre, how many found centroids lie within ``tol`` px."""
    if len(found_xy) == 0:
        return [0] * len(truth)
    d = np.hypot(found_xy[:, None, 0] - truth[None, :, 0], found_xy[:, None, 1] - truth[None, :, 1])
    return [int(n) for n in (d <= tol).sum(axis=0)]


def make_standin_models(directory: Path) -> tuple[Path, Path]:
    """(segmenter, classifier) stand-in bundle paths written into ``directory``."""
    seg = make_threshold_unet(directory / "standin-seg.safetensors")
    cls = make_random_inception(directory / "standin-cls.safetensors", load_pipeline("mds"), input_px=75)
    return seg, cls


def write_smear_with_corrupt_tile(
    path: Path, tile_xy: tuple[int, int] = (2, 2)
) -> tuple[Path, NDArray[np.float64], tuple[int, int, int, int]]:
    """The smear as 128-px JPEG tiles with one tile's data zeroed (decoding it fails).

    Returns the path, the cell centres and the corrupt tile's level-0 box (x0, y0, x1, y1).
    """
    import tifffile

    from wsiflow.slide.writer import write_pyramid_tiff

    centres = cell_centres()
    write_pyramid_tiff(path, smear_image(centres), mpp=SLIDE_MPP, app_mag=20, compression="jpeg", tile=128)
    col, row = tile_xy
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        per_row = -(-page.shape[1] // page.tilewidth)
        index = row * per_row + col
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * min(count, 64))  # no SOI marker: "Not a JPEG file"
    return path, centres, (col * 128, row * 128, (col + 1) * 128, (row + 1) * 128)


LEICA_XMLNS = "http://www.leica-microsystems.com/scn/2010/10/01"


def write_leica_scn(
    path: Path,
    image: NDArray[np.uint8],
    offset_px: tuple[int, int] = (300, 200),
    collection_px: tuple[int, int] = (1600, 1200),
    mpp: float = 0.5,
) -> Path:
    """A Leica SCN (BigTIFF + the collection XML OpenSlide and TiffSlide parse): ``image``
    is the main image, placed at ``offset_px`` in a larger collection, plus a small macro
    image of the whole collection. Both libraries then report ``bounds-x/y`` = ``offset_px``
    and a level 0 the size of the collection (the main image at the offset, blank around)."""
    import tifffile

    h, w = image.shape[:2]
    nm = round(mpp * 1000)  # "clicks" are nanometres
    cw, ch = collection_px[0] * nm, collection_px[1] * nm
    small = image[::4, ::4]
    macro = np.full((collection_px[1] // 16, collection_px[0] // 16, 3), 240, np.uint8)
    dims = [(w, h, 0), (small.shape[1], small.shape[0], 1)]

    def image_xml(
        name: str, dims: list[tuple[int, int, int]], view: tuple[int, int, int, int], obj: str
    ) -> str:
        dim = "".join(f'<dimension sizeX="{a}" sizeY="{b}" r="{i}" ifd="{i}"/>' for a, b, i in dims)
        vx, vy, vw, vh = view
        return (
            f'<image name="{name}"><creationDate>2020-01-01T00:00:00.00Z</creationDate>'
            '<device model="Leica SCN400;Leica SCN" version="1.5.1"/>'
            f'<pixels sizeX="{dims[0][0]}" sizeY="{dims[0][1]}">{dim}</pixels>'
            f'<view sizeX="{vw}" sizeY="{vh}" offsetX="{vx}" offsetY="{vy}" spacingZ="0"/>'
            f"<scanSettings><objectiveSettings><objective>{obj}</objective></objectiveSettings>"
            "<illuminationSettings><numericalAperture>0.7</numericalAperture>"
            "<illuminationSource>brightfield</illuminationSource></illuminationSettings></scanSettings></image>"
        )

    xml = (
        f'<?xml version="1.0" encoding="utf-8"?><scn xmlns="{LEICA_XMLNS}">'
        f'<collection name="wsiflow-test" sizeX="{cw}" sizeY="{ch}"><barcode>wsiflow-test</barcode>'
        + image_xml("macro", [(macro.shape[1], macro.shape[0], 2)], (0, 0, cw, ch), "1.25")
        + image_xml("main", dims, (offset_px[0] * nm, offset_px[1] * nm, w * nm, h * nm), "20")
        + "</collection></scn>"
    )
    res = 10000 / mpp  # px per cm
    opts = {"photometric": "rgb", "compression": "jpeg", "resolutionunit": "CENTIMETER", "metadata": None}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(image, tile=(256, 256), description=xml, resolution=(res, res), **opts)
        tw.write(small, tile=(256, 256), resolution=(res / 4, res / 4), **opts)
        macro_res = res * macro.shape[1] / collection_px[0]
        tw.write(macro, tile=(16, 16), resolution=(macro_res, macro_res), **opts)
    return path


def tiny_classifier_card(codes: list[str]) -> dict[str, Any]:
    """The card of a tiny random-weight InceptionV3 bundle with classes ``codes`` (bundle tests)."""
    return {
        "name": "tiny",
        "task": "classifier",
        "architecture": "inception_v3",
        "kwargs": {"num_classes": len(codes), "aux_logits": False, "dropout": 0.5},
        "classes": [
            {"code": c, "name": c, "lineage": None, "dysplastic": False, "blast": False, "color": [1, 2, 3]}
            for c in codes
        ],
        "input_px": 80,
        "mpp": 0.5,
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "training_data": {"name": "none", "licence": "n/a", "description": "random weights"},
        "metrics": {},
        "split_seed": 0,
        "demo": True,
    }

"""Segmenter evaluation: Dice/IoU against expert masks; WBC box recall/precision on BCCD fields.

Masks (wbc-seg convention 0/128/255 or any 0/>0 mask): the cells the pipeline would output
(:meth:`Segmenter.segment` with the pipeline's settings, cytoplasm growth included, their
outlines drawn back at the image's own resolution) are compared with cell = mask > 0
(``dice``, ``iou``); so is the cell channel alone (:func:`wsiflow.segment.cell_mask`:
threshold, holes filled, regions outside the size limits dropped; ``dice_channel``,
``iou_channel``). The image is resampled to the bundle's µm/px for the U-Net and the
probabilities back. Reported per image, per data set (pooled pixels and mean over images)
and overall.

BCCD (Pascal VOC boxes): detected cells (instances after watershed and size limits) are
matched to WBC boxes by centroid; recall = WBC boxes containing ≥ 1 centroid; precision =
detections whose centroid lies in some WBC box (BCCD boxes only WBCs among nucleated
cells, so anything else counts as false).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsiflow.atomic import atomic_write_bytes
from wsiflow.config import SegmenterSpec
from wsiflow.errors import WsiflowError
from wsiflow.matching import match_centroids
from wsiflow.models.bundle import ModelBundle
from wsiflow.segment import Segmenter, cell_mask, instances_from_probs
from wsiflow.train.seg_data import BCCD_MPP, find_pairs, load_pair, read_rgb, resample_pair, voc_boxes
from wsiflow.train.seg_partial import evaluate_partial, rasterise
from wsiflow.train.segmenter import dice_iou

__all__ = ["evaluate_bccd", "evaluate_masks", "evaluate_segmenter"]

REVIEW_RADIUS_PX = 40.0  # a reviewed point and a detection centroid on one white cell (~3 µm on BCCD)


def _write_atomic(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=False)


def evaluate_masks(
    seg: Segmenter, pairs: Iterable[tuple[Path, Path]], mpp: float, dataset: str = ""
) -> list[dict[str, Any]]:
    """One row per image: Dice, IoU of the output cells and of the cell channel, and the pixel
    counts needed to pool them."""
    rows = []
    for img_path, mask_path in pairs:
        pair = load_pair(img_path, mask_path)
        # one U-Net pass for both: the output cells as Segmenter.segment builds them, and the
        # cell channel alone
        cell, nucleus = seg.probability_maps(pair.rgb, mpp)
        table, _ = instances_from_probs(cell, nucleus, seg.cfg, (0.0, 0.0), 1.0, mpp, rgb=pair.rgb)
        cells = rasterise(table.poly_offsets, table.poly_xy, pair.cell.shape) > 0
        channel = cell_mask(cell, seg.cfg, mpp)
        d, i = dice_iou(cells, pair.cell)
        dc, ic = dice_iou(channel, pair.cell)
        rows.append(
            {
                "dataset": dataset,
                "image": img_path.name,
                "dice": d,
                "iou": i,
                "dice_channel": dc,
                "iou_channel": ic,
                "inter": int((cells & pair.cell).sum()),
                "pred": int(cells.sum()),
                "inter_channel": int((channel & pair.cell).sum()),
                "pred_channel": int(channel.sum()),
                "truth": int(pair.cell.sum()),
            }
        )
    return rows


def _pool(rows: list[dict[str, Any]]) -> dict[str, float]:
    truth = sum(r["truth"] for r in rows)
    out: dict[str, float] = {"n_images": len(rows)}
    for suffix in ("", "_channel"):
        inter = sum(r["inter" + suffix] for r in rows)
        pred = sum(r["pred" + suffix] for r in rows)
        out["dice" + suffix] = 2 * inter / (pred + truth) if pred + truth else 1.0
        out["iou" + suffix] = inter / (pred + truth - inter) if pred + truth - inter else 1.0
    return {
        **out,
        "mean_dice": float(np.mean([r["dice"] for r in rows])) if rows else float("nan"),
        "mean_iou": float(np.mean([r["iou"] for r in rows])) if rows else float("nan"),
        "median_dice": float(np.median([r["dice"] for r in rows])) if rows else float("nan"),
    }


def _in_boxes(x: np.ndarray, y: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(n points, m boxes) bool: point i lies in box j (``x0, y0, x1, y1``, edges included)."""
    return (
        (x[:, None] >= boxes[None, :, 0])
        & (x[:, None] <= boxes[None, :, 2])
        & (y[:, None] >= boxes[None, :, 1])
        & (y[:, None] <= boxes[None, :, 3])
    )


def evaluate_bccd(
    seg: Segmenter,
    root: Path,
    split: str = "test",
    mpp: float = BCCD_MPP,
    review: Mapping[str, Sequence[Sequence[float]]] | None = None,
    review_radius_px: float = REVIEW_RADIUS_PX,
) -> dict[str, Any]:
    """WBC box recall / precision by detected-cell centroids on BCCD ``ImageSets/Main/<split>.txt``.

    ``review``: image stem → (x, y) points (image px) of white cells that BCCD left without a
    WBC box, found by looking at the fields; a detection outside every WBC box within
    ``review_radius_px`` of such a point also counts as a white cell in ``precision_reviewed``,
    matched one to one (:func:`~wsiflow.matching.match_centroids`; ``precision`` stays against
    the boxes as given). Each row's ``unmatched_xy`` lists the centroids of its detections outside every
    WBC box, for that review."""
    ids = (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    rows = []
    tp_boxes = n_boxes = tp_det = n_det = plt_hits = reviewed = 0
    for stem in ids:
        rgb = read_rgb(root / "JPEGImages" / f"{stem}.jpg")
        ann = root / "Annotations" / f"{stem}.xml"
        wbc = np.array(voc_boxes(ann, "WBC"), float).reshape(-1, 4)
        plt = np.array(voc_boxes(ann, "Platelets"), float).reshape(-1, 4)
        # as the pipeline does: read at the segmenter's µm/px, geometry back in image px
        small, _ = resample_pair(rgb, (), mpp, seg.mpp)
        scale = rgb.shape[1] / small.shape[1]
        table, _ = seg.segment(small, (0.0, 0.0), scale, seg.mpp)
        x, y = table.x, table.y  # image coordinates (level-0 of this field)
        inside, in_plt = _in_boxes(x, y, wbc), _in_boxes(x, y, plt)
        found = inside.any(axis=0)
        good = inside.any(axis=1)
        tp_boxes += int(found.sum())
        n_boxes += len(wbc)
        tp_det += int(good.sum())
        n_det += len(table)
        plt_hits += int((in_plt.any(axis=1) & ~good).sum())
        miss = np.column_stack([x[~good], y[~good]])
        points = np.asarray((review or {}).get(stem, ()), float).reshape(-1, 2)
        radius = np.full(len(points), review_radius_px)
        reviewed += len(match_centroids(points[:, 0], points[:, 1], radius, miss[:, 0], miss[:, 1], 1.0))
        rows.append(
            {
                "image": stem,
                "wbc_boxes": len(wbc),
                "wbc_found": int(found.sum()),
                "detections": len(table),
                "in_wbc_box": int(good.sum()),
                "areas_um2": [round(float(a), 1) for a in table.area_um2],
                "unmatched_xy": [[round(float(a), 1), round(float(b), 1)] for a, b in miss],
            }
        )
    return {
        "split": split,
        "mpp": mpp,
        "n_images": len(ids),
        "wbc_boxes": n_boxes,
        "detections": n_det,
        "recall": tp_boxes / n_boxes if n_boxes else float("nan"),
        "precision": tp_det / n_det if n_det else float("nan"),
        "false_detections_in_platelet_boxes": plt_hits,
        **(
            {
                "reviewed_unboxed_wbc": reviewed,
                "precision_reviewed": (tp_det + reviewed) / n_det if n_det else float("nan"),
            }
            if review is not None
            else {}
        ),
        "per_image": rows,
    }


def _mask_sets(data: Path) -> list[tuple[str, Path, Path]]:
    """(dataset name, images folder, masks folder) for the layouts evaluate understands."""
    if (data / "images").is_dir() and (data / "masks").is_dir():
        return [(data.name, data / "images", data / "masks")]
    subs = [p for p in sorted(data.iterdir()) if p.is_dir()]
    sets = []
    for sub in subs:
        if (sub / "images").is_dir() and (sub / "masks").is_dir():
            sets.append((sub.name, sub / "images", sub / "masks"))
        elif any(p.suffix.lower() in (".bmp", ".jpg") for p in sub.iterdir()):
            sets.append((sub.name, sub, sub))  # wbc-seg layout: NNN.bmp + NNN.png mask side by side
    if not sets and any(p.suffix.lower() in (".bmp", ".jpg") for p in data.iterdir()):
        sets.append((data.name, data, data))
    if not sets:
        raise WsiflowError(f"{data}: no images/ + masks/ folders, image+mask pairs or BCCD layout found")
    return sets


def evaluate_segmenter(
    bundle: ModelBundle | str | Path,
    data: Path,
    out_dir: Path,
    mpp: float | dict[str, float] | None = None,
    cfg: SegmenterSpec | None = None,
    split: str = "test",
    device: str = "cpu",
    partial: bool = False,
) -> dict[str, Any]:
    """Evaluate a segmenter bundle on DATA and write ``seg_metrics.json``, ``per_image.csv``, ``summary.md``.

    DATA: a BCCD root (``Annotations/``, ``ImageSets/``) → WBC box recall/precision on
    ``split``; otherwise folders of images with masks → Dice/IoU. ``mpp``: µm/px of the
    images (one value, or per data-set folder name); default: the bundle's µm/px.
    """
    b = bundle if isinstance(bundle, ModelBundle) else ModelBundle.load(bundle)
    seg = Segmenter(b, cfg or SegmenterSpec(bundle=str(b.weights_path)), device)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"bundle": b.name, "sha256": b.sha256, "data": str(data)}
    md = [f"# Segmenter `{b.name}` on `{data}`", ""]
    if partial:
        m = mpp if isinstance(mpp, float) else b.mpp
        pres = evaluate_partial(seg, data, m, split)
        result["partial"] = {k: v for k, v in pres.items() if k != "per_image"}
        result["segmenter_settings"] = seg.cfg.model_dump(exclude={"bundle", "sha256"})
        buf = io.StringIO()
        dw = csv.DictWriter(buf, fieldnames=list(pres["per_image"][0]) if pres["per_image"] else ["image"])
        dw.writeheader()
        dw.writerows(pres["per_image"])
        _write_atomic(out_dir / "per_image.csv", buf.getvalue())
        md += [
            "| split | µm/px | fields | masked cells (merged suspects) | recall | one-to-one (IoU ≥ 0.5) "
            "| one-to-one, single-cell masks | one-to-one, one-nucleus masks (masks with ≥ 2) | median IoU "
            "| detections | on letterbox band (fields) | unmatched detections |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {split} | {m} | {pres['n_images']} | {pres['masked_cells']} ({pres['merged_suspects']}) | "
            f"{pres['recall']:.4f} | {pres['one_to_one']:.4f} | {pres['one_to_one_single_masks']:.4f} | "
            f"{pres['one_to_one_one_nucleus']:.4f} ({pres['multi_nucleus_masks']}) | "
            f"{pres['median_best_iou']:.3f} | {pres['detections']} | "
            f"{pres['band_detections']} ({pres['fields_with_band_detections']}) | "
            f"{pres['unmatched_detections']} |",
        ]
    elif (data / "Annotations").is_dir() and (data / "ImageSets").is_dir():
        m = mpp if isinstance(mpp, float) else BCCD_MPP
        res = evaluate_bccd(seg, data, split, m)
        result["bccd"] = {k: v for k, v in res.items() if k != "per_image"}
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["image", "wbc_boxes", "wbc_found", "detections", "in_wbc_box"])
        for r in res["per_image"]:
            w.writerow([r["image"], r["wbc_boxes"], r["wbc_found"], r["detections"], r["in_wbc_box"]])
        _write_atomic(out_dir / "per_image.csv", buf.getvalue())
        md += [
            "| split | images | WBC boxes | detections | recall | precision |",
            "|---|---|---|---|---|---|",
            f"| {split} | {res['n_images']} | {res['wbc_boxes']} | {res['detections']} | "
            f"{res['recall']:.4f} | {res['precision']:.4f} |",
        ]
    else:
        rows: list[dict[str, Any]] = []
        per: dict[str, Any] = {}
        for name, images, masks in _mask_sets(data):
            m = mpp.get(name, b.mpp) if isinstance(mpp, dict) else (mpp or b.mpp)
            r = evaluate_masks(seg, find_pairs(images, masks), m, name)
            per[name] = {"mpp": m, **_pool(r)}
            rows += r
        result["datasets"] = per
        result["overall"] = _pool(rows)
        buf = io.StringIO()
        dw = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["dataset", "image"])
        dw.writeheader()
        dw.writerows(rows)
        _write_atomic(out_dir / "per_image.csv", buf.getvalue())
        md += [
            "| data set | µm/px | images | Dice (pooled) | IoU (pooled) | mean Dice | mean IoU "
            "| Dice, cell channel alone |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, v in [*per.items(), ("overall", {"mpp": "", **result["overall"]})]:
            md.append(
                f"| {name} | {v['mpp']} | {v['n_images']} | {v['dice']:.4f} | {v['iou']:.4f} | "
                f"{v['mean_dice']:.4f} | {v['mean_iou']:.4f} | {v['dice_channel']:.4f} |"
            )
    _write_atomic(out_dir / "seg_metrics.json", json.dumps(result, indent=1))
    _write_atomic(out_dir / "summary.md", "\n".join(md) + "\n")
    return result

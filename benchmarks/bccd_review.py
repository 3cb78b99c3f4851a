"""Draw the BCCD test fields where a segmenter's detections fall outside every WBC box, for
reviewing them by eye (issue 14): WBC boxes green, platelet boxes yellow, the detections
outside every WBC box red (``evaluate_bccd``'s ``unmatched_xy``, the matching behind
``seg_real.py``'s precision). The white cells found this way without a box are listed in
``bccd_review.json`` (what ``seg_real.py`` counts as ``precision_reviewed``).

    python benchmarks/bccd_review.py marrow-seg --pipeline mds --out docs/bccd-unboxed.png

BCCD (Shenggan/BCCD_Dataset) is MIT-licensed; the PNG is a derivative and says so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import ROOT

DATA = ROOT.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", help="segmenter bundle (shipped name or path)")
    ap.add_argument("--pipeline", default="mds", help="post-processing settings from this pipeline")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    a = ap.parse_args(argv)

    import torch
    from PIL import Image, ImageDraw

    from wsiflow.config import load_pipeline
    from wsiflow.models.bundle import ModelBundle
    from wsiflow.segment import Segmenter
    from wsiflow.train.seg_data import read_rgb, voc_boxes
    from wsiflow.train.seg_eval import evaluate_bccd

    torch.set_num_threads(1)
    b = ModelBundle.load(a.bundle)
    cfg = load_pipeline(a.pipeline).segmenter.model_copy(
        update={"bundle": str(b.weights_path), "sha256": None}
    )
    seg = Segmenter(b, cfg)
    root = DATA / "bccd"
    res = evaluate_bccd(seg, root, "test")  # the same matching as seg_real.py's figures
    panels = []
    for row in res["per_image"]:
        if not row["unmatched_xy"]:
            continue
        stem = row["image"]
        rgb = read_rgb(root / "JPEGImages" / f"{stem}.jpg")
        ann = root / "Annotations" / f"{stem}.xml"
        im = Image.fromarray(rgb)
        d = ImageDraw.Draw(im)
        for box in voc_boxes(ann, "WBC"):
            d.rectangle(list(box), outline=(0, 200, 0), width=3)
        for box in voc_boxes(ann, "Platelets"):
            d.rectangle(list(box), outline=(230, 200, 0), width=2)
        for x, y in row["unmatched_xy"]:
            d.ellipse([x - 9, y - 9, x + 9, y + 9], outline=(255, 0, 0), width=4)
            d.text((x + 12, y - 6), f"({x:.0f}, {y:.0f})", fill=(0, 0, 0))
        d.text((6, 6), stem, fill=(0, 0, 0))
        panels.append(im)
        print(stem, row["unmatched_xy"])
    if not panels:
        print("every detection lies in a WBC box")
        return 0
    cols = 3
    w, h = panels[0].size
    sheet = Image.new("RGB", (cols * w, -(-len(panels) // cols) * h + 20), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, ((i % cols) * w, (i // cols) * h))
    ImageDraw.Draw(sheet).text(
        (6, sheet.size[1] - 16),
        f"BCCD test fields (Shenggan/BCCD_Dataset, MIT); {b.name} detections outside every WBC box in red",
        fill=(0, 0, 0),
    )
    sheet = sheet.resize((sheet.size[0] * 2 // 3, sheet.size[1] * 2 // 3))
    tmp = a.out.with_suffix(".tmp.png")
    sheet.save(tmp)
    tmp.replace(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A large generated slide in seconds: one ``wsiflow synth`` block, mirror-tiled.

``wsiflow synth`` draws every cell on one core (~25 s per 1,000 nucleated cells on this
2-core VM), far too slow for the ≥ 100k-cell slide of the GPU check's 8 minutes. This writes
a WIDTH×HEIGHT pyramid whose level 0 repeats one synthesised block (mirrored at every seam,
so no cell is cut by a hard edge): the cells are real generated cells, their count is
the block's times the number of copies (cells on mirror seams are doubled or merged, so the
run's own count is the figure to use). For speed measurements only: there is no truth
file for the mosaic.

    python benchmarks/mosaic_slide.py OUT.svs --block 6000 --size 36000 --density 2400
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def mirror_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Index into a block of length n of a mirror-tiled axis (0..n-1, n-1..0, 0..)."""
    period = idx % (2 * n)
    return np.where(period < n, period, 2 * n - 1 - period)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--block", type=int, default=6000, help="side of the synthesised block (px)")
    ap.add_argument("--size", type=int, default=36000, help="side of the mosaic (px)")
    ap.add_argument("--density", type=float, default=2400.0, help="cells per mm² of the block")
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args(argv)
    from wsiflow.slide.writer import write_pyramid_tiff
    from wsiflow.synth import SyntheticSlide, SynthParams

    t0 = time.perf_counter()
    params = SynthParams(width=a.block, height=a.block, mpp=0.25, seed=a.seed, cells_per_mm2=a.density)
    block_slide = SyntheticSlide.generate(params)
    block_cells = int(block_slide.truth_summary()["nucleated"])
    block = np.concatenate([band for _, band in block_slide.tile_rows(256)])[: a.block, : a.block]
    t_block = time.perf_counter() - t0

    def mosaic(x: int, y: int, w: int, h: int) -> np.ndarray:
        rows = mirror_index(np.arange(y, y + h), a.block)
        cols = mirror_index(np.arange(x, x + w), a.block)
        return np.ascontiguousarray(block[rows[:, None], cols[None, :]])

    write_pyramid_tiff(a.out, mosaic, size=(a.size, a.size), mpp=0.25, app_mag=40)
    copies = (a.size / a.block) ** 2
    print(
        json.dumps(
            {
                "slide": str(a.out),
                "size_px": [a.size, a.size],
                "block_px": a.block,
                "block_cells": block_cells,
                "expected_cells": round(block_cells * copies),
                "block_s": round(t_block, 1),
                "total_s": round(time.perf_counter() - t0, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

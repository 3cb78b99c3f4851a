"""Copy-paste training fields: masks follow the pasted pixels, touching cells stay apart, bands are empty."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from wsiflow.train.seg_data import read_mask, write_generated
from wsiflow.train.seg_partial import band_rows
from wsiflow.train.seg_paste import (
    _letterbox,
    _touch_gaps,
    load_fields,
    paste_field,
    sprites_from,
    stain_shift,
    write_paste_set,
)


def _prepared(tmp_path: Path, n: int = 6) -> Path:
    """Generated fields renamed to the prepared-PBC naming (pbc_<class>_<stem>)."""
    root = tmp_path / "prep"
    write_generated(root, n, size=96, seed=3)
    for sub in ("images", "masks"):
        for p in (root / sub).iterdir():
            p.rename(p.with_name("pbc_x_" + p.name))
    return root


def test_touch_gaps_between_different_cells_only() -> None:
    lab = np.zeros((6, 8), np.int32)
    lab[1:5, 1:4] = 1
    lab[1:5, 4:7] = 2
    gap = _touch_gaps(lab)
    assert gap[1:5, 4].all() and gap.sum() == 4  # one column, on the second cell's side
    assert not _touch_gaps(np.where(lab > 0, 1, 0).astype(np.int32)).any()


def test_paste_field_masks(tmp_path: Path) -> None:
    fields = load_fields(_prepared(tmp_path))
    sprites = sprites_from(fields, min_px=50)
    assert sprites and all(s.cell.shape == s.rgb.shape[:2] and (s.nucleus <= s.cell).all() for s in sprites)
    rng = np.random.default_rng(0)
    for _ in range(5):
        img, mask = paste_field(fields, sprites, 128, rng, n_paste=(4, 6))
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 128, 255} and (mask == 255).any()


def test_letterbox_band_is_plain_and_empty() -> None:
    rng = np.random.default_rng(5)
    rgb = rng.uniform(50, 250, (120, 120, 3)).astype(np.float32)
    labels = np.ones((120, 120), np.int32)
    nuc = np.ones((120, 120), bool)
    for _ in range(4):  # each side is banded with probability 0.75
        _letterbox(rgb, labels, nuc, rng)
    top, bottom = band_rows(np.clip(rgb, 0, 255).astype(np.uint8))
    assert top + bottom > 0
    assert not labels[:top].any() and not nuc[:top].any()
    assert not labels[120 - bottom :].any() if bottom else True


def test_stain_shift_deterministic_and_in_range() -> None:
    rgb = np.random.default_rng(0).uniform(0, 255, (40, 40, 3)).astype(np.float32)
    a = stain_shift(rgb, np.random.default_rng(1))
    b = stain_shift(rgb, np.random.default_rng(1))
    assert np.array_equal(a, b) and a.min() >= 0 and a.max() <= 255
    assert not np.allclose(a, rgb)


def test_write_paste_set(tmp_path: Path) -> None:
    out = tmp_path / "paste"
    info = write_paste_set(_prepared(tmp_path), out, 3, size=96, seed=2)
    assert info["n"] == 3 and info["licences"]["pbc"].startswith("CC BY")
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["paste_00000.png", "paste_00001.png", "paste_00002.png"]
    cell, nuc = read_mask(out / "masks" / names[0])
    assert cell.shape == (96, 96) and nuc is not None
    with Image.open(out / "images" / names[0]) as im:
        assert im.size == (96, 96)
    assert json.loads((out / "paste.json").read_text())["n_sprites"] == info["n_sprites"]


def test_abundant_cytoplasm_keeps_the_nucleus_inside_a_bigger_cell() -> None:
    from wsiflow.train.seg_paste import abundant_cytoplasm

    yy, xx = np.indices((40, 40))
    cell = (yy - 20) ** 2 + (xx - 20) ** 2 <= 14**2
    nu = (yy - 20) ** 2 + (xx - 20) ** 2 <= 8**2
    im = np.where(nu[..., None], [90.0, 40.0, 130.0], np.where(cell[..., None], [180.0, 170.0, 210.0], 230.0))
    big, bcell, bnuc = abundant_cytoplasm(
        im.astype(np.float32), cell, nu, np.random.default_rng(0), (1.5, 1.5)
    )
    assert bcell.sum() > 2 * cell.sum() and bnuc.sum() == nu.sum()
    assert (bnuc <= bcell).all()
    # the nucleus keeps its own pixels; what was the enlarged nucleus is cytoplasm-coloured now
    assert np.allclose(big[bnuc], [90.0, 40.0, 130.0])
    assert big[bcell & ~bnuc].mean(axis=0)[0] > 150

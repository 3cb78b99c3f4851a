"""segment.py: probability maps of known discs → instances, polygons in level-0 px, limits, edges."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from wsiflow.config import Cytoplasm, SegmenterSpec
from wsiflow.models.bundle import save_bundle
from wsiflow.models.unet import UNet
from wsiflow.segment import Segmenter, instances_from_probs, local_background, plain_border
from wsiflow.tiling import Tile
from wsiflow.types import Box

MPP = 0.5


def discs(shape: tuple[int, int], specs: list[tuple[float, float, float]], value: float = 0.9) -> np.ndarray:
    yy, xx = np.indices(shape)
    out = np.zeros(shape, np.float32)
    for cx, cy, r in specs:
        out[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = value
    return out


CFG = SegmenterSpec(
    bundle="x", threshold=0.5, min_area_um2=15, max_area_um2=2000, min_distance_um=3, simplify_um=0.25
)


def test_touching_discs_split_by_distance_transform() -> None:
    prob = discs((80, 100), [(35, 40, 12), (57, 40, 12)])  # overlap: one connected blob
    from scipy import ndimage as ndi

    assert ndi.label(prob > 0.5)[1] == 1
    table, edge = instances_from_probs(prob, None, CFG, (0.0, 0.0), 1.0, MPP)
    assert len(table) == 2
    xs = sorted(table.x)
    assert xs[0] == pytest.approx(35.5, abs=2) and xs[1] == pytest.approx(57.5, abs=2)
    assert not edge.any()


def test_nucleus_markers_split_touching_and_merge_lobes() -> None:
    prob = discs((80, 120), [(30, 40, 13), (54, 40, 13), (95, 40, 13)])
    nuc = discs((80, 120), [(30, 40, 5), (54, 40, 5), (91, 40, 3), (99, 40, 3)])  # 3rd: two lobes 2 px apart
    table, _ = instances_from_probs(prob, nuc, CFG, (0.0, 0.0), 1.0, MPP)
    assert len(table) == 3
    assert sorted(np.round(table.x).astype(int).tolist()) == pytest.approx([30, 54, 95], abs=2)


def test_nucleus_split_keeps_two_whole_nuclei_apart_and_lobes_together() -> None:
    # left: two cells pressed together, their nuclei (r 5 px, 19.6 µm²) 2 px apart, which the
    # min_distance closing joins into one marker; right: one cell whose nucleus is two lobes
    # (r 3 px, 7 µm²) as close. A speck of nucleus (r 2 px) below the left pair's gap is no
    # cell of its own
    prob = discs((60, 160), [(30, 30, 12), (50, 30, 12), (120, 30, 13)])
    nuc = discs((60, 160), [(34, 30, 5), (46, 30, 5), (40, 35, 2), (116, 30, 3), (124, 30, 3)])
    joined, _ = instances_from_probs(prob, nuc, CFG, (0.0, 0.0), 1.0, MPP)
    assert len(joined) == 2  # the two pressed cells are one outline
    cfg = CFG.model_copy(update={"nucleus_split_um2": 15.0})
    split, _ = instances_from_probs(prob, nuc, cfg, (0.0, 0.0), 1.0, MPP)
    assert sorted(np.round(split.x).astype(int).tolist()) == pytest.approx([30, 50, 120], abs=3)
    left = split.x < 85  # the speck's pixels went to the two cells: none of the pair is lost
    assert split.area_um2[left].sum() == pytest.approx((prob[:, :85] > 0.5).sum() * MPP**2)


def test_a_binucleate_round_cell_stays_one_cell_with_the_nucleus_split() -> None:
    """A binucleated erythroblast (a dysplastic feature) must stay one cell: the split gives its
    two nuclei two markers, and merge_solidity joins the halves back, their union being round;
    two pressed cells meet at a waist and stay two."""
    prob = discs((60, 160), [(35, 30, 14), (110, 30, 12), (132, 30, 12)])
    nuc = discs((60, 160), [(29, 30, 5), (41, 30, 5), (115, 30, 5), (127, 30, 5)])
    cfg = CFG.model_copy(update={"nucleus_split_um2": 15.0, "merge_solidity": 0.95})
    table, _ = instances_from_probs(prob, nuc, cfg, (0.0, 0.0), 1.0, MPP)
    assert sorted(np.round(table.x).astype(int).tolist()) == pytest.approx([35, 110, 132], abs=3)
    split_only, _ = instances_from_probs(
        prob, nuc, cfg.model_copy(update={"merge_solidity": None}), (0.0, 0.0), 1.0, MPP
    )
    assert len(split_only) == 4  # without merge_solidity the round cell is cut in two


def test_merge_solidity_joins_lobes_of_one_round_cell_not_touching_cells() -> None:
    # left: one round cell (r 14) whose nucleus is two lobes 12 px apart (a bilobed
    # eosinophil: the closing of min_distance cannot join them); right: two touching cells
    # with one nucleus each, meeting at a waist
    prob = discs((80, 160), [(35, 40, 14), (95, 40, 12), (118, 40, 12)])
    nuc = discs((80, 160), [(29, 40, 4), (41, 40, 4), (95, 40, 5), (118, 40, 5)])
    split, _ = instances_from_probs(prob, nuc, CFG, (0.0, 0.0), 1.0, MPP)
    assert len(split) == 4  # without the rule the round cell is cut in two along a chord
    merged, _ = instances_from_probs(
        prob, nuc, CFG.model_copy(update={"merge_solidity": 0.95}), (0.0, 0.0), 1.0, MPP
    )
    assert sorted(np.round(merged.x).astype(int).tolist()) == pytest.approx([35, 95, 118], abs=2)
    assert merged.area_um2[np.argmin(merged.x)] == pytest.approx(math.pi * 14**2 * MPP**2, rel=0.08)


def _paint(
    shape: tuple[int, int],
    background: tuple[int, int, int],
    discs_rgb: list[tuple[float, float, float, tuple[int, int, int]]],
    base: np.ndarray | None = None,
) -> np.ndarray:
    """An RGB image: ``background`` (or a copy of ``base``), then each (cx, cy, r, colour) disc
    painted in order."""
    yy, xx = np.indices(shape)
    out = np.empty((*shape, 3), np.uint8)
    out[:] = background if base is None else base
    for cx, cy, r, colour in discs_rgb:
        out[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = colour
    return out


BG, PURPLE, BLUE_GREY, PINK = (230, 226, 236), (90, 60, 140), (185, 195, 228), (220, 170, 190)


def test_cytoplasm_growth_takes_the_pale_blue_cytoplasm_not_red_cells_or_background() -> None:
    # a plasma cell: nucleus r 6 px (the cell channel sees only it) in blue-grey cytoplasm r 10;
    # a pink red cell touching its right side; a second cell far left whose blue-grey
    # cytoplasm reaches r 20 (10 µm): the growth stops max_um (3 µm = 6 px) past the outline
    shape = (80, 140)
    rgb = _paint(shape, BG, [(100, 40, 10, BLUE_GREY), (117, 40, 8, PINK), (100, 40, 6, PURPLE),
                             (35, 40, 20, BLUE_GREY), (35, 40, 6, PURPLE)])  # fmt: skip
    prob = discs(shape, [(100, 40, 6), (35, 40, 6)])
    cfg = CFG.model_copy(update={"cytoplasm": Cytoplasm(max_um=3.0)})
    plain, _ = instances_from_probs(prob, prob, CFG, (0.0, 0.0), 1.0, MPP)
    grown, _ = instances_from_probs(prob, prob, cfg, (0.0, 0.0), 1.0, MPP, rgb=rgb)
    assert len(plain) == len(grown) == 2
    right, left = int(np.argmax(grown.x)), int(np.argmin(grown.x))
    disc = math.pi * MPP**2
    assert plain.area_um2.max() == pytest.approx(disc * 6**2, rel=0.1)
    assert grown.area_um2[right] == pytest.approx(disc * 10**2, rel=0.08)  # the ring, not the red cell
    assert grown.x[right] == pytest.approx(100.5, abs=0.5)  # a red cell taken would pull it right
    assert grown.area_um2[left] == pytest.approx(disc * 12**2, rel=0.08)  # 6 px + max_um (6 px)
    # the cell channel's score, not diluted by the grown ring
    assert grown.seg_score == pytest.approx(plain.seg_score)


def test_cytoplasm_growth_never_enters_a_neighbour_and_ignores_padding() -> None:
    # two nuclei (r 6) 22 px apart in one small sheet of cytoplasm (r 15): each keeps its own
    # side of it. The background is a blue-grey that against white would itself pass as
    # cytoplasm: with the padding (255) in the reference, each cell would grow the full 6 px
    # into it, past the sheet
    shape = (60, 120)
    bg = (200, 205, 235)
    rgb = _paint(shape, bg, [(50, 30, 15, (160, 175, 225)), (39, 30, 6, PURPLE), (61, 30, 6, PURPLE)])
    rgb[:, 100:] = 255  # padding past the slide's edge
    prob = discs(shape, [(39, 30, 6), (61, 30, 6)])
    cfg = CFG.model_copy(update={"cytoplasm": Cytoplasm(max_um=3.0)})
    grown, _ = instances_from_probs(prob, prob, cfg, (0.0, 0.0), 1.0, MPP, rgb=rgb)
    assert len(grown) == 2
    half_sheet = math.pi * 15**2 * MPP**2 / 2
    assert grown.area_um2 == pytest.approx(np.full(2, grown.area_um2.mean()), rel=0.05)
    assert (grown.area_um2 > 1.3 * math.pi * 6**2 * MPP**2).all()  # each grew
    assert (grown.area_um2 <= 1.02 * half_sheet).all()  # within its half of the sheet
    with pytest.raises(ValueError, match="needs the RGB image"):
        instances_from_probs(prob, prob, cfg, (0.0, 0.0), 1.0, MPP)


def test_local_background_follows_the_light_across_the_image() -> None:
    # glass lit unevenly: bright on the left, dimmer and bluer on the right. One background for
    # the image (its 95th percentile: the bright glass) makes the dim glass look like pale blue
    # cytoplasm, and the cell on the right grows max_um into it; judged per 25 µm square it is
    # glass, and only the cell's own ring of cytoplasm is taken
    shape, left, right = (80, 200), (240, 240, 250), (195, 208, 245)
    rgb = _paint(shape, left, [])
    rgb[:, 100:] = right
    rgb = _paint(rgb.shape[:2], left, [(165, 40, 10, (150, 170, 235)), (165, 40, 6, PURPLE)], base=rgb)
    noise = np.random.default_rng(0).integers(-8, 9, rgb.shape)  # real glass is never plain
    rgb = np.clip(rgb.astype(int) + noise, 0, 254).astype(np.uint8)
    prob = discs(shape, [(165, 40, 6)])
    one = CFG.model_copy(update={"cytoplasm": Cytoplasm(max_um=3.0)})
    local = CFG.model_copy(update={"cytoplasm": Cytoplasm(max_um=3.0, background_um=25.0)})
    g_one, _ = instances_from_probs(prob, prob, one, (0.0, 0.0), 1.0, MPP, rgb=rgb)
    g_local, _ = instances_from_probs(prob, prob, local, (0.0, 0.0), 1.0, MPP, rgb=rgb)
    disc = math.pi * MPP**2
    assert g_one.area_um2[0] == pytest.approx(disc * 12**2, rel=0.08)  # 6 px + max_um into the glass
    assert g_local.area_um2[0] == pytest.approx(disc * 10**2, rel=0.08)  # its own ring only

    x = rgb.astype(np.float32)
    real = np.ones(shape, bool)
    bg = local_background(x, real, 95.0, 50.0, np.percentile(x, 95, axis=(0, 1)).astype(np.float32))
    assert bg.shape == (*shape, 3)
    np.testing.assert_allclose(bg[:, :20], np.broadcast_to(np.float32(left), (80, 20, 3)), atol=8.5)
    np.testing.assert_allclose(bg[:, -5:], np.broadcast_to(np.float32(right), (80, 5, 3)), atol=8.5)
    red = bg[40, :, 0]
    step = np.diff(red)  # falls from left to right, blended over a square's width: no step
    assert (step <= 0.5).all() and step.min() > -2 and red[0] - red[-1] > 35
    real[:, :50] = False  # a square of padding only takes the fallback
    fallback = np.float32([1, 2, 3])
    np.testing.assert_array_equal(local_background(x, real, 95.0, 50.0, fallback)[0, 0], fallback)


def test_plain_border_is_the_padding_at_the_edges_not_the_smear() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(200, 240, (60, 80, 3)).astype(np.uint8)  # a smear's noisy background
    assert not plain_border(rgb).any()
    rgb[:10] = (208, 196, 210)  # a letterbox band at the top
    rgb[:, 70:] = 255  # the reader's white past the slide's right edge
    rgb[30:33, :70] = (220, 220, 220)  # a plain stripe inside the image is not its border
    border = plain_border(rgb)
    want = np.zeros((60, 80), bool)
    want[:10] = True
    want[:, 70:] = True
    assert (border == want).all()
    assert plain_border(np.full((8, 8, 3), 255, np.uint8)).all()


def test_no_outline_covers_the_letterbox_band() -> None:
    """A cell cut by a plain band of a whole image keeps only its visible part: the U-Net's map
    spills onto the band (as at SegPC's letterbox), the outline and the centroid do not."""
    shape = (60, 80)
    rng = np.random.default_rng(1)
    rgb = rng.integers(215, 235, (*shape, 3)).astype(np.uint8)
    yy, xx = np.indices(shape)
    rgb[(xx - 40) ** 2 + (yy - 16) ** 2 <= 100] = PURPLE  # a cell centred 4 px below the band
    rgb[:12] = (208, 196, 210)
    prob = discs(shape, [(40, 16, 10)])  # the map spills 8 px onto the band
    spilt, _ = instances_from_probs(prob, prob, CFG, (0.0, 0.0), 1.0, MPP)
    assert spilt.poly_xy[:, 1].min() < 12 and spilt.y[0] == pytest.approx(16.5)
    table, _ = instances_from_probs(prob, prob, CFG, (0.0, 0.0), 1.0, MPP, rgb=rgb)
    assert len(table) == 1
    assert table.poly_xy[:, 1].min() >= 12  # pixel centres: row 12 is the first on the image
    assert table.y[0] > 18  # the visible part's centroid, below the cell's centre
    assert table.area_um2[0] < 0.9 * spilt.area_um2[0]
    rgb[:12] = (160, 175, 225)  # a band the colour of plasma-cell cytoplasm: not grown onto
    cfg = CFG.model_copy(update={"cytoplasm": Cytoplasm(max_um=3.0)})
    grown, _ = instances_from_probs(prob, prob, cfg, (0.0, 0.0), 1.0, MPP, rgb=rgb)
    assert grown.poly_xy[:, 1].min() >= 12
    # a tile is not trimmed by its content (its padding is past the slide edge, see Tile.cuts)
    box = Box(0.0, 0.0, 80.0, 60.0)
    tile = Tile(0, 0, 0, box, box, (80, 60), (80, 60), (False, False, False, False))
    as_tile, _ = instances_from_probs(prob, prob, CFG, (0.0, 0.0), 1.0, MPP, owner=tile, rgb=rgb)
    assert as_tile.poly_xy[:, 1].min() == pytest.approx(spilt.poly_xy[:, 1].min())


def test_size_limits_and_scores() -> None:
    # areas at 0.5 µm/px: r=3 px → 7 µm² (< 15, dropped); r=10 → 79 µm² (kept); r=60 → 2827 µm² (> 2000)
    prob = discs((300, 300), [(20, 20, 3), (60, 60, 10), (180, 180, 60)], value=0.8)
    table, _ = instances_from_probs(prob, None, CFG, (0.0, 0.0), 1.0, MPP)
    assert len(table) == 1
    assert table.area_um2[0] == pytest.approx(math.pi * 100 * MPP**2, rel=0.08)
    assert table.perimeter_um[0] == pytest.approx(2 * math.pi * 10 * MPP, rel=0.1)
    assert 0.85 < table.circularity[0] <= 1.0
    assert table.seg_score[0] == pytest.approx(0.8, abs=1e-5)
    assert table.class_id[0] == -1 and table.probs.shape == (1, 0)


def test_level0_mapping_and_touches_edge() -> None:
    origin, scale = (1000.0, 2000.0), 4.0
    prob = discs((100, 120), [(50, 50, 10), (3, 70, 10)])  # 2nd is cut by the left edge
    table, edge = instances_from_probs(prob, None, CFG, origin, scale, MPP)
    assert len(table) == 2
    i = int(np.argmax(table.x))
    assert table.x[i] == pytest.approx(origin[0] + 50.5 * scale, abs=0.5 * scale)
    assert table.y[i] == pytest.approx(origin[1] + 50.5 * scale, abs=0.5 * scale)
    poly = table.polygon(i)
    d = np.hypot(poly[:, 0] - table.x[i], poly[:, 1] - table.y[i])
    assert np.all(np.abs(d - 10 * scale) < 1.5 * scale)
    assert len(poly) >= 8 and not np.array_equal(poly[0], poly[-1])  # open ring
    x0, y0, x1, y1 = table.bbox[i]
    assert x0 == pytest.approx(origin[0] + 40 * scale) and x1 == pytest.approx(origin[0] + 61 * scale)
    assert y0 == pytest.approx(origin[1] + 40 * scale) and y1 == pytest.approx(origin[1] + 61 * scale)
    assert edge[1 - i] and not edge[i]


def _tile(core: tuple[float, float, float, float]) -> Tile:
    box = Box(core[0], core[1], core[2] - core[0], core[3] - core[1])
    assert (box.x1, box.y1) == (core[2], core[3])  # the tile's core is exactly this box
    return Tile(0, 0, 0, box, box, (1, 1), (1, 1))


def test_tile_owns_is_its_half_open_core() -> None:
    t = _tile((10.0, 20.0, 30.0, 40.0))
    assert t.owns([10.0, 29.999, 30.0, 9.999, 15.0], [20.0, 39.9, 25.0, 25.0, 40.0]).tolist() == [
        True, True, False, False, False]  # fmt: skip


def test_core_keeps_only_owned_cells_identical_to_filtering_after() -> None:
    origin, scale = (1000.0, 2000.0), 4.0
    # centroids (px): inside the core; right of it; cut by the left edge; inside, near the core's end
    prob = discs((100, 160), [(50, 50, 10), (130, 50, 10), (3, 70, 10), (95, 30, 8)])
    full, edge = instances_from_probs(prob, None, CFG, origin, scale, MPP)
    core = (origin[0] + 20 * scale, origin[1], origin[0] + 100 * scale, origin[1] + 100 * scale)
    owned = (full.x >= core[0]) & (full.x < core[2]) & (full.y >= core[1]) & (full.y < core[3]) & ~edge
    part, part_edge = instances_from_probs(prob, None, CFG, origin, scale, MPP, owner=_tile(core))
    assert len(full) == 4 and owned.sum() == 2 and len(part) == 2 and not part_edge.any()
    want = full.take(np.flatnonzero(owned))
    assert np.array_equal(np.sort(part.x), np.sort(want.x))
    i, j = np.argsort(part.x), np.argsort(want.x)
    for a, b in zip(i, j, strict=True):
        assert np.array_equal(part.polygon(int(a)), want.polygon(int(b)))
        assert part.area_um2[a] == want.area_um2[b] and part.perimeter_um[a] == want.perimeter_um[b]
    nothing = (origin[0] + 150 * scale, origin[1], origin[0] + 160 * scale, origin[1] + 100 * scale)
    assert len(instances_from_probs(prob, None, CFG, origin, scale, MPP, owner=_tile(nothing))[0]) == 0


def test_a_cell_touching_a_side_past_the_slide_edge_is_not_cut() -> None:
    """Only the sides of the image that lie inside the slide (``Tile.cuts``) cut a cell: one
    touching a side that is white padding past the slide edge is whole and kept."""
    prob = discs((100, 120), [(3, 50, 10), (60, 3, 10), (60, 50, 10)])  # left, top, inside
    core = (0.0, 0.0, 120.0, 100.0)
    box = Box(0.0, 0.0, 120.0, 100.0)
    inside = Tile(0, 0, 0, box, box, (120, 100), (120, 100))  # every side cuts (the default)
    _, edge = instances_from_probs(prob, None, CFG, (0.0, 0.0), 1.0, MPP, owner=inside, keep_cut=True)
    assert edge.sum() == 2
    assert len(instances_from_probs(prob, None, CFG, (0.0, 0.0), 1.0, MPP, owner=inside)[0]) == 1
    at_edge = Tile(0, 0, 0, box, box, (120, 100), (120, 100), (False, False, True, True))
    table, edge = instances_from_probs(prob, None, CFG, (0.0, 0.0), 1.0, MPP, owner=at_edge)
    assert len(table) == 3 and not edge.any()
    assert _tile(core).cuts == (True, True, True, True)
    left_only = Tile(0, 0, 0, box, box, (120, 100), (120, 100), (False, True, True, True))
    table, edge = instances_from_probs(prob, None, CFG, (0.0, 0.0), 1.0, MPP, owner=left_only, keep_cut=True)
    assert len(table) == 3 and edge.sum() == 1 and table.y[edge][0] < 10  # the top one is cut


def test_flood_per_component_matches_global_watershed() -> None:
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    from wsiflow.segment import _flood

    rng = np.random.default_rng(5)
    specs = [(float(x), float(y), float(r)) for x, y, r in rng.uniform((0, 0, 6), (300, 200, 14), (60, 3))]
    fg = discs((200, 300), specs) > 0.5
    comp, n = ndi.label(fg)
    dist = ndi.distance_transform_edt(fg)
    markers = np.zeros(fg.shape, np.int32)
    peaks = peak_local_max(dist, min_distance=4, labels=comp, exclude_border=False)  # as _labels does
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1)
    markers[comp == comp.max()] = 0  # one component without a marker stays 0
    want = watershed(-dist, markers, mask=fg)
    got = _flood(comp, n, markers, dist)
    assert (np.bincount(comp[markers > 0]) > 1).any()  # some components hold several markers
    assert np.array_equal(got, want)


def test_empty_and_ids() -> None:
    table, edge = instances_from_probs(np.zeros((50, 50), np.float32), None, CFG, (0.0, 0.0), 1.0, MPP)
    assert len(table) == 0 and edge.shape == (0,)
    prob = discs((64, 64), [(30, 30, 9)])
    table, _ = instances_from_probs(prob, None, CFG, (0.0, 0.0), 1.0, MPP)
    assert table.id.tolist() == [0] and table.tile.tolist() == [0]


def _bundle(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = UNet(3, 2, depth=2, width=4)
    card = {
        "name": "tiny-seg",
        "task": "segmenter",
        "architecture": "unet",
        "kwargs": {"in_ch": 3, "out_ch": 2, "depth": 2, "width": 4},
        "classes": [{"code": "cell"}, {"code": "nucleus"}],
        "input_px": None,
        "mpp": 0.5,
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }
    save_bundle(model.eval(), card, tmp_path / "tiny-seg.safetensors")
    return tmp_path / "tiny-seg.safetensors"


def test_segmenter_end_to_end_shapes(tmp_path: Path) -> None:
    seg = Segmenter(str(_bundle(tmp_path)), CFG)
    rgb = (np.random.default_rng(0).random((45, 67, 3)) * 255).astype(np.uint8)
    p = seg.probabilities(rgb)
    assert p.shape == (45, 67) and p.dtype == np.float32 and (p >= 0).all() and (p <= 1).all()
    cell, nuc = seg.probability_maps(rgb, mpp=0.25)  # resampled to the card's 0.5 µm/px and back
    assert cell.shape == (45, 67) and nuc is not None and nuc.shape == (45, 67)
    table, edge = seg.segment(rgb, (10.0, 20.0), 2.0, 0.5)
    assert len(table) == len(edge)
    # the untrained net may find nothing in noise: check the image → level-0 mapping on a
    # known probability map (one disc on image pixel (30, 20), centre at 30.5, 20.5), never vacuously
    disc = discs((45, 67), [(30.0, 20.0, 8.0)])
    seg.probability_maps = lambda rgb, mpp=None: (disc, None)  # type: ignore[method-assign]
    table, edge = seg.segment(rgb, (10.0, 20.0), 2.0, 0.5)
    assert len(table) == 1 and not edge[0]
    assert table.x[0] == pytest.approx(10 + 2 * 30.5, abs=0.01)
    assert table.y[0] == pytest.approx(20 + 2 * 20.5, abs=0.01)
    assert (table.poly_xy[:, 0] >= 10).all() and (table.poly_xy[:, 0] <= 10 + 67 * 2).all()


def _batch_images() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    shapes = [(160, 192), (160, 192), (128, 144), (160, 192), (160, 192)]
    images = []
    for h, w in shapes:
        img = np.full((h, w, 3), 235, np.uint8)
        for _ in range(6):  # dark "nuclei" on a light background
            cy, cx, r = rng.integers(10, h - 10), rng.integers(10, w - 10), rng.integers(5, 14)
            yy, xx = np.ogrid[:h, :w]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.integers(40, 140, 3)
        images.append(np.clip(img + rng.integers(0, 12, img.shape), 0, 255).astype(np.uint8))
    return images


def _demo_segmenter() -> Segmenter:
    from wsiflow.config import load_pipeline

    pipe = load_pipeline("mds-demo")
    return Segmenter(pipe.segmenter.bundle, pipe.segmenter)


def test_batched_unet_maps_equal_one_image_at_a_time() -> None:
    # the shipped demo U-Net (real width) on CPU: the maps of a batch of
    # tiles are bit-identical to one call per tile (CPU runs one image per forward call),
    # whatever the grouping: mixed shapes, order kept
    seg = _demo_segmenter()
    assert seg.max_batch == 1  # on CPU
    images = _batch_images()
    batched = seg.probability_maps_batch(images, mpp=0.5)
    assert len(batched) == len(images)
    for img, (cell, nuc) in zip(images, batched, strict=True):
        one_cell, one_nuc = seg.probability_maps(img, mpp=0.5)
        assert cell.shape == img.shape[:2]
        assert np.array_equal(cell, one_cell)
        assert (nuc is None) == (one_nuc is None) == (not seg.has_nucleus)
        assert nuc is None or np.array_equal(nuc, one_nuc)
    assert seg.probability_maps_batch([], mpp=0.5) == []


def test_the_gpu_path_stacks_tiles_into_one_forward_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # what a GPU runs (several tiles per forward call), here on CPU: the same maps as one
    # tile per call up to rounding (oneDNN rounds differently with the batch size), in order,
    # with shapes grouped and max_batch splitting a long batch
    seg = _demo_segmenter()
    seg.max_batch = 3
    calls: list[int] = []
    forward = seg._forward
    monkeypatch.setattr(seg, "_forward", lambda rgbs, mpp: calls.append(len(rgbs)) or forward(rgbs, mpp))
    images = _batch_images()
    batched = seg.probability_maps_batch(images, mpp=0.5)
    assert sorted(calls) == [1, 1, 3]  # four 160×192 tiles (3 + 1), one 128×144
    for img, (cell, nuc) in zip(images, batched, strict=True):
        one_cell, one_nuc = seg.probability_maps(img, mpp=0.5)
        assert cell.shape == img.shape[:2]
        np.testing.assert_allclose(cell, one_cell, rtol=0, atol=1e-5)
        assert (nuc is None) == (one_nuc is None)
        if nuc is not None:
            np.testing.assert_allclose(nuc, one_nuc, rtol=0, atol=1e-5)

"""Drawing the eight MDS cell classes of the seed (Lee et al. 2022, Table 1) as small patches.

Each cell is described by a :class:`CellDesign` (geometry and colours in level-0 px, made
deterministically from the cell's seed) and rendered into a small optical-density patch with
an alpha mask, which the slide renderer composites onto the smear. All drawing is vectorised
numpy over the patch: a soft body outline (an ellipse times a few low harmonics), nuclei made
of soft ellipses or thick poly-lines (segmented / band / lobulated nuclei), nucleoli, a
perinuclear halo, and granule / chromatin textures sampled from fixed noise tiles.

Features per class (sizes are diameters in µm):

EN  erythroid precursor, 8–14: round, central, very dense dark nucleus; cytoplasm from
    basophilic blue to orthochromatic pink; no granules.
ED  dyserythropoiesis: nuclear budding, bi-/multinuclearity (2–4 nuclei), or megaloblastic
    change (15–22, open fine chromatin, pink cytoplasm: nuclear–cytoplasmic asynchrony).
GN  granulocyte, 11–15: segmented (3–4 lobes linked by thin bridges) or band (C-shaped)
    nucleus, pink-lilac cytoplasm full of purple granules.
GD  dysgranulopoiesis: hypogranular pale cytoplasm with a bilobed pseudo-Pelger nucleus,
    a non-lobed nucleus, or an unusually large (17–24) hypersegmented cell.
MN  megakaryocyte, 35–85: compact multilobulated nucleus, abundant granular cytoplasm.
MD  dysmegakaryopoiesis: micromegakaryocyte (14–24, single/bilobed nucleus), large cell with a
    hypolobated (1–2 lobe) nucleus, or widely separated small round nuclei.
blast  12–18: high N:C ratio, lighter fine chromatin, 1–3 pale nucleoli, thin blue rim.
other  lymphocyte (7.5–10, dense nucleus, scant sky-blue cytoplasm) or plasma cell
    (10–15, oval, eccentric nucleus, deep blue cytoplasm, perinuclear halo).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

CLASS_CODES: tuple[str, ...] = ("EN", "GN", "MN", "ED", "GD", "MD", "blast", "other")
CLASS_INDEX: dict[str, int] = {c: i for i, c in enumerate(CLASS_CODES)}
LINEAGE_OF: dict[str, str | None] = {
    "EN": "erythroid",
    "ED": "erythroid",
    "GN": "granulocytic",
    "GD": "granulocytic",
    "MN": "megakaryocytic",
    "MD": "megakaryocytic",
    "blast": None,
    "other": None,
}
DYSPLASTIC_OF: dict[str, str] = {"erythroid": "ED", "granulocytic": "GD", "megakaryocytic": "MD"}
NORMAL_OF: dict[str, str] = {"erythroid": "EN", "granulocytic": "GN", "megakaryocytic": "MN"}

# Sub-types with their probability within the class.
SUBTYPES: dict[str, tuple[tuple[str, float], ...]] = {
    "EN": (("basophilic", 0.25), ("polychromatic", 0.45), ("orthochromatic", 0.30)),
    "ED": (("budding", 0.35), ("multinuclear", 0.35), ("megaloblastic", 0.30)),
    "GN": (("segmented", 0.65), ("band", 0.35)),
    "GD": (("pseudo-pelger", 0.5), ("non-lobed", 0.25), ("giant", 0.25)),
    "MN": (("lobulated", 1.0),),
    "MD": (("micromegakaryocyte", 0.45), ("hypolobated", 0.3), ("separated", 0.25)),
    "blast": (("blast", 1.0),),
    "other": (("lymphocyte", 0.65), ("plasma-cell", 0.35)),
}

# Diameter ranges (µm) per sub-type.
DIAMETER_UM: dict[str, tuple[float, float]] = {
    "basophilic": (11.0, 14.0),
    "polychromatic": (9.0, 12.0),
    "orthochromatic": (8.0, 10.0),
    "budding": (9.0, 13.0),
    "multinuclear": (12.0, 17.0),
    "megaloblastic": (15.0, 22.0),
    "segmented": (11.5, 15.0),
    "band": (11.0, 14.5),
    "pseudo-pelger": (11.0, 14.5),
    "non-lobed": (11.0, 14.0),
    "giant": (17.0, 24.0),
    "lobulated": (35.0, 85.0),
    "micromegakaryocyte": (14.0, 24.0),
    "hypolobated": (30.0, 60.0),
    "separated": (35.0, 70.0),
    "blast": (12.0, 18.0),
    "lymphocyte": (7.5, 10.0),
    "plasma-cell": (10.0, 15.0),
}

MAX_EXTENT = 1.22  # body extent / nominal radius (elongation × harmonics), for placement


def od_of(rgb: tuple[float, float, float] | NDArray[np.float64]) -> NDArray[np.float32]:
    """Optical density of an RGB colour on a white (255) background."""
    c = np.clip(np.asarray(rgb, np.float64), 1.0, 255.0)
    return (-np.log(c / 255.0)).astype(np.float32)


def sample_subtype(code: str, rng: np.random.Generator) -> tuple[str, float]:
    """A sub-type of class ``code`` and its diameter in µm."""
    names = [s for s, _ in SUBTYPES[code]]
    probs = np.array([p for _, p in SUBTYPES[code]])
    sub = names[int(rng.choice(len(names), p=probs / probs.sum()))]
    lo, hi = DIAMETER_UM[sub]
    return sub, float(rng.uniform(lo, hi))


# --------------------------------------------------------------------------- design


@dataclass(frozen=True)
class Ellipse:
    cx: float  # px, relative to the cell centre
    cy: float
    a: float
    b: float
    angle: float


@dataclass(frozen=True)
class Chain:
    """A thick poly-line (a band nucleus or the bridges between lobes)."""

    points: NDArray[np.float64]  # (m, 2) px relative to the cell centre
    half_width: float


@dataclass
class CellDesign:
    code: str
    subtype: str
    cx: float  # level-0 px
    cy: float
    a: float  # body semi-axes, px
    b: float
    angle: float
    harm_k: NDArray[np.float64]
    harm_amp: NDArray[np.float64]
    harm_phase: NDArray[np.float64]
    cyto_od: NDArray[np.float32]
    granule_od: NDArray[np.float32]
    granule_amount: float
    nuc_od: NDArray[np.float32]
    chromatin: float  # texture strength
    chromatin_fine: bool
    nuclei: list[Ellipse | Chain] = field(default_factory=list)
    nucleoli: list[Ellipse] = field(default_factory=list)
    nucleoli_od: NDArray[np.float32] = field(default_factory=lambda: od_of((175, 150, 205)))
    halo: Ellipse | None = None
    halo_od: NDArray[np.float32] = field(default_factory=lambda: od_of((200, 205, 232)))
    tex_offset: tuple[int, int] = (0, 0)

    @property
    def extent(self) -> float:
        """Farthest the body reaches from the centre, px."""
        return max(self.a, self.b) * (1.0 + float(np.abs(self.harm_amp).sum())) + 1.0

    def radius(self, theta: NDArray[np.float64]) -> NDArray[np.float64]:
        t = theta - self.angle
        r = self.a * self.b / np.sqrt((self.b * np.cos(t)) ** 2 + (self.a * np.sin(t)) ** 2)
        mod = 1.0 + (
            self.harm_amp[:, None] * np.cos(self.harm_k[:, None] * theta[None, :] + self.harm_phase[:, None])
        ).sum(axis=0)
        return np.asarray(r * mod, np.float64)

    def polygon(self, n: int | None = None) -> NDArray[np.float64]:
        """Outline in level-0 px, (n, 2), counter-clockwise in image coordinates, open ring."""
        if n is None:
            n = int(np.clip(self.extent * 0.6, 24, 128))
        theta = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
        r = self.radius(theta)
        return np.stack([self.cx + r * np.cos(theta), self.cy + r * np.sin(theta)], axis=1)


def _rgb_jitter(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float = 8.0) -> NDArray:
    return np.clip(np.asarray(rgb, np.float64) + rng.normal(0, amount, 3), 1, 255)


def _lerp_rgb(c0: tuple[float, ...], c1: tuple[float, ...], t: float) -> tuple[float, float, float]:
    a, b = np.asarray(c0, np.float64), np.asarray(c1, np.float64)
    v = a + (b - a) * t
    return float(v[0]), float(v[1]), float(v[2])


def _round_nucleus(rng: np.random.Generator, r: float, off: float) -> Ellipse:
    ang = rng.uniform(0, 2 * math.pi)
    d = rng.uniform(0, off)
    e = rng.uniform(0.9, 1.0)
    return Ellipse(d * math.cos(ang), d * math.sin(ang), r, r * e, rng.uniform(0, math.pi))


def _lobes_on_arc(
    rng: np.random.Generator, n: int, arc_r: float, lobe_r: float, span: float, bridge: float
) -> list[Ellipse | Chain]:
    start = rng.uniform(0, 2 * math.pi)
    angs = start + np.linspace(0, span, n)
    pts = np.stack([arc_r * np.cos(angs), arc_r * np.sin(angs)], axis=1)
    pts += rng.normal(0, lobe_r * 0.12, pts.shape)
    out: list[Ellipse | Chain] = [
        Ellipse(
            float(p[0]),
            float(p[1]),
            lobe_r * rng.uniform(0.9, 1.1),
            lobe_r * rng.uniform(0.75, 0.95),
            float(rng.uniform(0, math.pi)),
        )
        for p in pts
    ]
    out.append(Chain(pts, bridge))
    return out


def design_cell(
    code: str, subtype: str, diameter_um: float, cx: float, cy: float, seed: int, mpp: float
) -> CellDesign:
    """The deterministic drawing of one cell (same arguments → same cell)."""
    rng = np.random.default_rng(seed)
    r = diameter_um / 2.0 / mpp  # nominal body radius, px
    elong = rng.uniform(1.0, 1.08)
    angle = rng.uniform(0, math.pi)
    harm_k = np.array([2.0, 3.0, 5.0])
    harm_amp = rng.uniform(0.0, 1.0, 3) * np.array([0.03, 0.025, 0.012])
    granule_od = od_of(_rgb_jitter(rng, (150, 90, 165), 6))
    granule_amount = 0.0
    chromatin, fine = 0.18, False
    nuclei: list[Ellipse | Chain] = []
    nucleoli: list[Ellipse] = []
    halo: Ellipse | None = None
    nuc_rgb: tuple[float, float, float] = (62, 28, 92)
    cyto_rgb: tuple[float, float, float] = (200, 170, 200)

    if code in ("EN", "ED"):
        stage = {"basophilic": 0.0, "polychromatic": 0.5, "orthochromatic": 0.95}.get(subtype, 0.9)
        stage = float(np.clip(stage + rng.normal(0, 0.08), 0, 1))
        cyto_rgb = _lerp_rgb((105, 125, 195), (212, 150, 165), stage)
        nuc_rgb = (48, 22, 72)
        chromatin = 0.10
        if subtype in ("basophilic", "polychromatic", "orthochromatic"):
            nr = r * rng.uniform(0.50, 0.62) * (1.0 - 0.15 * stage)
            nuclei.append(_round_nucleus(rng, nr, 0.12 * r))
        elif subtype == "budding":
            nr = r * rng.uniform(0.40, 0.48)
            main = _round_nucleus(rng, nr, 0.06 * r)
            ang = rng.uniform(0, 2 * math.pi)
            br = nr * rng.uniform(0.32, 0.42)
            dist = nr + br * rng.uniform(0.55, 0.8)
            bx, by = main.cx + dist * math.cos(ang), main.cy + dist * math.sin(ang)
            nuclei += [
                main,
                Ellipse(bx, by, br, br * 0.95, 0.0),
                Chain(np.array([[main.cx, main.cy], [bx, by]]), max(1.2, br * 0.35)),
            ]
        elif subtype == "multinuclear":
            k = int(rng.choice([2, 2, 3, 4]))
            nr = r * rng.uniform(0.30, 0.36) * (1.0 if k == 2 else 0.85)
            start = rng.uniform(0, 2 * math.pi)
            for j in range(k):
                ang = start + 2 * math.pi * j / k + rng.normal(0, 0.15)
                d = nr * rng.uniform(1.05, 1.25)
                nuclei.append(
                    Ellipse(
                        d * math.cos(ang),
                        d * math.sin(ang),
                        nr,
                        nr * rng.uniform(0.88, 1.0),
                        float(rng.uniform(0, math.pi)),
                    )
                )
        else:  # megaloblastic: big cell, big open nucleus, mature (pink) cytoplasm
            cyto_rgb = _lerp_rgb((150, 140, 195), (215, 155, 170), rng.uniform(0.6, 1.0))
            nuclei.append(_round_nucleus(rng, r * rng.uniform(0.48, 0.58), 0.1 * r))
            nuc_rgb = (100, 62, 142)
            chromatin, fine = 0.30, True
    elif code in ("GN", "GD"):
        cyto_rgb = (226, 186, 204)
        granule_amount = float(rng.uniform(0.8, 1.0))
        nuc_rgb = (78, 38, 118)
        chromatin = 0.22
        if subtype == "segmented":
            n = int(rng.choice([3, 3, 4, 4, 5]))
            nuclei += _lobes_on_arc(
                rng, n, r * 0.42, r * rng.uniform(0.21, 0.25), rng.uniform(2.2, 3.6), max(1.0, r * 0.05)
            )
        elif subtype == "band":
            start = rng.uniform(0, 2 * math.pi)
            span = rng.uniform(3.3, 4.4)
            angs = start + np.linspace(0, span, 9)
            rad = r * rng.uniform(0.42, 0.5)
            pts = np.stack([rad * np.cos(angs), rad * 0.85 * np.sin(angs)], axis=1)
            nuclei.append(Chain(pts, r * rng.uniform(0.17, 0.21)))
        else:
            cyto_rgb = _lerp_rgb((236, 222, 232), (205, 210, 228), rng.uniform(0, 0.6))  # pale, greyish
            granule_amount = float(rng.uniform(0.0, 0.12))
            if subtype == "pseudo-pelger":
                lr = r * rng.uniform(0.26, 0.31)
                ang = rng.uniform(0, 2 * math.pi)
                d = lr * rng.uniform(1.25, 1.5)
                p1 = (d * math.cos(ang), d * math.sin(ang))
                p2 = (-p1[0], -p1[1])
                nuclei += [
                    Ellipse(p1[0], p1[1], lr, lr * 0.95, 0.0),
                    Ellipse(p2[0], p2[1], lr, lr * 0.95, 0.0),
                    Chain(np.array([p1, p2]), max(1.0, lr * 0.18)),
                ]
                chromatin = 0.28
            elif subtype == "non-lobed":
                nuclei.append(_round_nucleus(rng, r * rng.uniform(0.38, 0.44), 0.15 * r))
                chromatin = 0.28
            else:  # giant, hypersegmented
                n = int(rng.choice([6, 7, 7]))
                nuclei += _lobes_on_arc(
                    rng, n, r * 0.45, r * rng.uniform(0.15, 0.18), rng.uniform(4.0, 5.2), max(1.0, r * 0.035)
                )
    elif code in ("MN", "MD"):
        cyto_rgb = _lerp_rgb((214, 176, 214), (200, 180, 220), rng.uniform(0, 1))
        granule_od = od_of(_rgb_jitter(rng, (175, 120, 190), 6))
        granule_amount = float(rng.uniform(0.35, 0.55))
        nuc_rgb = (88, 44, 128)
        chromatin = 0.24
        harm_amp = harm_amp * 1.6
        if subtype == "lobulated":
            n = int(rng.integers(8, 14))
            spread = r * rng.uniform(0.3, 0.4)
            for _ in range(n):
                ang = rng.uniform(0, 2 * math.pi)
                d = spread * math.sqrt(rng.uniform(0.05, 1.0))
                lr = r * rng.uniform(0.16, 0.24)
                nuclei.append(
                    Ellipse(
                        d * math.cos(ang),
                        d * math.sin(ang),
                        lr,
                        lr * rng.uniform(0.6, 0.85),
                        float(rng.uniform(0, math.pi)),
                    )
                )
        elif subtype == "micromegakaryocyte":
            harm_k = np.array([2.0, 5.0, 9.0])
            harm_amp = rng.uniform(0.5, 1.0, 3) * np.array([0.03, 0.04, 0.035])
            nr = r * rng.uniform(0.36, 0.46)
            if rng.random() < 0.7:
                nuclei.append(_round_nucleus(rng, nr, 0.12 * r))
            else:
                ang = rng.uniform(0, 2 * math.pi)
                d = nr * 0.55
                nuclei += [
                    Ellipse(d * math.cos(ang), d * math.sin(ang), nr * 0.75, nr * 0.7, ang),
                    Ellipse(-d * math.cos(ang), -d * math.sin(ang), nr * 0.75, nr * 0.7, ang),
                ]
            nuc_rgb = (70, 32, 105)
        elif subtype == "hypolobated":
            nr = r * rng.uniform(0.26, 0.34)
            if rng.random() < 0.6:
                nuclei.append(
                    Ellipse(
                        *_offset(rng, 0.1 * r),
                        nr,
                        nr * rng.uniform(0.75, 0.95),
                        float(rng.uniform(0, math.pi)),
                    )
                )
            else:
                ang = rng.uniform(0, 2 * math.pi)
                d = nr * 0.75
                nuclei += [
                    Ellipse(d * math.cos(ang), d * math.sin(ang), nr * 0.8, nr * 0.7, ang),
                    Ellipse(-d * math.cos(ang), -d * math.sin(ang), nr * 0.8, nr * 0.7, ang),
                ]
        else:  # separated
            k = int(rng.integers(3, 7))
            start = rng.uniform(0, 2 * math.pi)
            for j in range(k):
                ang = start + 2 * math.pi * j / k + rng.normal(0, 0.25)
                d = r * rng.uniform(0.4, 0.62)
                nr = r * rng.uniform(0.1, 0.14)
                nuclei.append(Ellipse(d * math.cos(ang), d * math.sin(ang), nr, nr * 0.92, 0.0))
    elif code == "blast":
        cyto_rgb = (95, 122, 192)
        nuc_rgb = (128, 88, 172)
        chromatin, fine = 0.16, True
        nr = r * rng.uniform(0.78, 0.85)
        nuc = Ellipse(
            *_offset(rng, 0.06 * r), nr, nr * rng.uniform(0.88, 0.98), float(rng.uniform(0, math.pi))
        )
        nuclei.append(nuc)
        for _ in range(int(rng.integers(1, 4))):
            ang = rng.uniform(0, 2 * math.pi)
            d = nr * rng.uniform(0.0, 0.5)
            lr = nr * rng.uniform(0.11, 0.16)
            nucleoli.append(
                Ellipse(nuc.cx + d * math.cos(ang), nuc.cy + d * math.sin(ang), lr, lr * 0.85, ang)
            )
    else:  # other
        if subtype == "lymphocyte":
            cyto_rgb = (168, 196, 232)
            nuc_rgb = (58, 30, 98)
            chromatin = 0.22
            nr = r * rng.uniform(0.74, 0.82)
            nuclei.append(
                Ellipse(
                    *_offset(rng, 0.1 * r), nr, nr * rng.uniform(0.85, 0.97), float(rng.uniform(0, math.pi))
                )
            )
        else:  # plasma cell
            elong = rng.uniform(1.25, 1.4)
            cyto_rgb = (70, 95, 168)
            nuc_rgb = (55, 28, 90)
            chromatin = 0.3
            nr = r * rng.uniform(0.36, 0.42)
            d = r * rng.uniform(0.4, 0.5)
            ca, sa = math.cos(angle), math.sin(angle)
            nuclei.append(Ellipse(d * ca, d * sa, nr, nr * 0.95, angle))
            halo = Ellipse((d - nr * 0.9) * ca, (d - nr * 0.9) * sa, nr * 0.55, nr * 0.7, angle)

    a, b = r * math.sqrt(elong), r / math.sqrt(elong)
    return CellDesign(
        code=code,
        subtype=subtype,
        cx=cx,
        cy=cy,
        a=a,
        b=b,
        angle=angle,
        harm_k=harm_k,
        harm_amp=harm_amp,
        harm_phase=rng.uniform(0, 2 * math.pi, len(harm_k)),
        cyto_od=od_of(_rgb_jitter(rng, cyto_rgb, 7)),
        granule_od=granule_od,
        granule_amount=granule_amount,
        nuc_od=od_of(_rgb_jitter(rng, nuc_rgb, 6)),
        chromatin=chromatin,
        chromatin_fine=fine,
        nuclei=nuclei,
        nucleoli=nucleoli,
        halo=halo,
        tex_offset=(int(rng.integers(0, _TEX)), int(rng.integers(0, _TEX))),
    )


def _offset(rng: np.random.Generator, max_d: float) -> tuple[float, float]:
    ang = rng.uniform(0, 2 * math.pi)
    d = rng.uniform(0, max_d)
    return d * math.cos(ang), d * math.sin(ang)


# --------------------------------------------------------------------------- textures

_TEX = 512


@lru_cache(maxsize=1)
def textures() -> dict[str, NDArray[np.float32]]:
    """Fixed noise tiles (same on every run): granules in [0, 1]; chromatin zero-mean, unit-std."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(20220406)
    noise = rng.random((_TEX, _TEX)).astype(np.float32)
    g = ndi.gaussian_filter(noise, 0.9, mode="wrap")
    dots = (g > np.quantile(g, 0.8)).astype(np.float32)
    gran = ndi.gaussian_filter(dots, 0.6, mode="wrap")
    gran /= gran.max()
    out = {"granule": gran.astype(np.float32)}
    for name, sigma in (("coarse", 2.2), ("fine", 0.8)):
        t = ndi.gaussian_filter(rng.standard_normal((_TEX, _TEX)).astype(np.float32), sigma, mode="wrap")
        out[name] = ((t - t.mean()) / t.std()).astype(np.float32)
    return out


def _tex(name: str, off: tuple[int, int], h: int, w: int) -> NDArray[np.float32]:
    t = textures()[name]
    rows = (np.arange(h) + off[0]) % _TEX
    cols = (np.arange(w) + off[1]) % _TEX
    return t[np.ix_(rows, cols)]


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class CellPatch:
    x0: int  # level-0 px of the patch's top-left
    y0: int
    od: NDArray[np.float32]  # (h, w, 3)
    alpha: NDArray[np.float32]  # (h, w) in [0, 1]


_LUT = 2048


def _shape_box(s: Ellipse | Chain) -> tuple[float, float, float, float]:
    """Bounding box (relative px) of a shape, with a 2 px margin."""
    if isinstance(s, Ellipse):
        r = max(s.a, s.b) + 2.0
        return s.cx - r, s.cy - r, s.cx + r, s.cy + r
    m = s.half_width + 2.0
    return (
        float(s.points[:, 0].min()) - m,
        float(s.points[:, 1].min()) - m,
        float(s.points[:, 0].max()) + m,
        float(s.points[:, 1].max()) + m,
    )


def _ellipse_alpha(e: Ellipse, dx: NDArray[np.float32], dy: NDArray[np.float32]) -> NDArray[np.float32]:
    c, s = math.cos(e.angle), math.sin(e.angle)
    u = ((dx - e.cx) * c + (dy - e.cy) * s) / e.a
    v = (-(dx - e.cx) * s + (dy - e.cy) * c) / e.b
    q = np.sqrt(u * u + v * v)
    return np.clip((1.0 - q) * min(e.a, e.b) + 0.5, 0.0, 1.0).astype(np.float32)


def _chain_alpha(ch: Chain, dx: NDArray[np.float32], dy: NDArray[np.float32]) -> NDArray[np.float32]:
    best: NDArray[np.float32] | None = None
    pts = ch.points
    if len(pts) == 1:
        pts = np.vstack([pts, pts])
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        vx, vy = x1 - x0, y1 - y0
        ll = vx * vx + vy * vy
        t = np.clip(((dx - x0) * vx + (dy - y0) * vy) / ll, 0.0, 1.0) if ll > 0 else np.float32(0.0)
        d = np.hypot(dx - (x0 + t * vx), dy - (y0 + t * vy)).astype(np.float32)
        best = d if best is None else np.minimum(best, d)
    assert best is not None
    return np.clip(ch.half_width - best + 0.5, 0.0, 1.0).astype(np.float32)


def _window(
    box: tuple[float, float, float, float], xs: NDArray[np.float32], ys: NDArray[np.float32]
) -> tuple[slice, slice]:
    """Row and column slices of the patch covering a relative box."""
    c0 = int(np.searchsorted(xs, box[0], "left"))
    c1 = int(np.searchsorted(xs, box[2], "right"))
    r0 = int(np.searchsorted(ys, box[1], "left"))
    r1 = int(np.searchsorted(ys, box[3], "right"))
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def render_cell(d: CellDesign) -> CellPatch:
    """Render one cell into an optical-density patch with a soft alpha (1 px anti-aliased edge)."""
    ext = d.extent + 2.0
    x0, y0 = math.floor(d.cx - ext), math.floor(d.cy - ext)
    x1, y1 = math.ceil(d.cx + ext) + 1, math.ceil(d.cy + ext) + 1
    w, h = x1 - x0, y1 - y0
    xs = np.arange(w, dtype=np.float32) + np.float32(x0 - d.cx)
    ys = np.arange(h, dtype=np.float32) + np.float32(y0 - d.cy)
    dx, dy = xs[None, :], ys[:, None]
    theta = np.arctan2(dy, dx)
    dist = np.hypot(dx, dy)
    lut = d.radius(np.linspace(-math.pi, math.pi, _LUT + 1)).astype(np.float32)
    idx = ((theta + np.float32(math.pi)) * np.float32(_LUT / (2 * math.pi)) + np.float32(0.5)).astype(
        np.int32
    )
    alpha = np.clip(lut[idx] - dist + np.float32(0.5), 0.0, 1.0).astype(np.float32)

    od = np.empty((h, w, 3), np.float32)
    od[:] = d.cyto_od
    if d.granule_amount > 0:
        g = _tex("granule", d.tex_offset, h, w) * np.float32(d.granule_amount)
        od += g[..., None] * (d.granule_od - d.cyto_od)
    if d.halo is not None:
        rs, cs = _window(_shape_box(d.halo), xs, ys)
        ha = _ellipse_alpha(d.halo, xs[None, cs], ys[rs, None]) * np.float32(0.8)
        sub = od[rs, cs]
        sub += ha[..., None] * (d.halo_od - sub)
    if d.nuclei:
        boxes = np.array([_shape_box(s) for s in d.nuclei])
        rs, cs = _window((boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()), xs, ys)
        sx, sy = xs[None, cs], ys[rs, None]
        na = np.zeros((rs.stop - rs.start, cs.stop - cs.start), np.float32)
        for s in d.nuclei:
            m = _ellipse_alpha(s, sx, sy) if isinstance(s, Ellipse) else _chain_alpha(s, sx, sy)
            np.maximum(na, m, out=na)
        chrom = _tex(
            "fine" if d.chromatin_fine else "coarse",
            (d.tex_offset[1] + rs.start, d.tex_offset[0] + cs.start),
            na.shape[0],
            na.shape[1],
        )
        nod = d.nuc_od[None, None, :] * np.clip(1.0 + np.float32(d.chromatin) * chrom, 0.3, 2.0)[..., None]
        sub = od[rs, cs]
        sub += na[..., None] * (nod - sub)
        for s in d.nucleoli:
            la = _ellipse_alpha(s, sx, sy) * np.float32(0.85)
            sub += la[..., None] * (d.nucleoli_od - sub)
    return CellPatch(x0, y0, od, alpha)

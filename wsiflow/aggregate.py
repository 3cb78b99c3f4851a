"""Slide-level aggregation: class counts → SlideSummary (DESIGN §5).

Everything is driven by the pipeline's taxonomy (``ClassDef.lineage / dysplastic / blast /
nucleated``), never by hard-coded class codes.

* The differential (ICSH): percentages, the blast % and the ``adequacy.min_cells`` count are
  taken over the cells ``counting.denominator`` names — by default nucleated cells without
  megakaryocytes ("nucleated-without-megakaryocytes"): platelets and other non-nucleated
  objects are never in it, megakaryocytes are counted and assessed apart. Classes outside
  the denominator keep their count and get no percentage. The rule's name is in the summary.
* Dysplasia mode: per lineage, dysplastic / (normal + dysplastic) with a Wilson score
  interval at ``who.confidence``; flag "met" when the lower bound reaches the WHO threshold
  (the criterion is ≥ 10 %), "not met" when the upper bound is below it, "uncertain" when
  the interval straddles it, "insufficient" when the lineage has no cells (or, for the
  megakaryocytic lineage, fewer than ``adequacy.min_megakaryocytes``).
* Blast % of the differential with its WHO 2022 band (``<5%``, ``5–9%``, ``10–19%``,
  ``≥20%`` for the default bands 5/10/20 %).
* M:E ratio (``counting.me_ratio``: granulocytic : erythroid lineage cells) with the interval
  from the Wilson interval of myeloid / (myeloid + erythroid), mapped through p / (1 − p).
* Differential mode: count and % of every class with a Wilson interval.
* Adequacy: cells of the differential ≥ ``adequacy.min_cells``; fewer (including zero) gives
  status "insufficient cells". Zero cells is a valid result, never a division by zero.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import norm

from wsiflow.config import DENOMINATOR_RULES, ClassDef, Pipeline

__all__ = [
    "BlastStat",
    "ClassStat",
    "LineageStat",
    "MERatio",
    "SlideSummary",
    "band_labels",
    "blast_band",
    "blast_stat",
    "dysplasia_flag",
    "summarize",
    "wilson_interval",
]

STATUS_OK = "ok"
STATUS_INSUFFICIENT = "insufficient cells"
STATUS_PARTIAL = "partial"
UNCERTAIN_BANDS = "uncertain between bands"

# Bone-marrow blast ranges of the two 2022 classifications, for the cuts 5/10/20 % only.
# Blasts alone never classify: peripheral-blood blasts, Auer rods and genetics also decide,
# and AML-defining genetic abnormalities need no blast cut-off (WHO) or ≥ 10 % (ICC).
DEFAULT_BLAST_CUTS = (0.05, 0.10, 0.20)
WHO_2022_CATEGORIES = ("MDS-LB (<5%)", "MDS-IB1 (5–9%)", "MDS-IB2 (10–19%)", "AML (≥20%)")
ICC_2022_CATEGORIES = ("MDS (<5%)", "MDS-EB (5–9%)", "MDS/AML (10–19%)", "AML (≥20%)")


def z_value(confidence: float) -> float:
    """Two-sided normal quantile, e.g. 1.959963984540054 for 0.95."""
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be within (0, 1)")
    return float(norm.ppf(1.0 - (1.0 - confidence) / 2.0))


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n; (0, 1) when n == 0."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = z_value(confidence)
    p = k / n
    z2n = z * z / n
    denom = 1.0 + z2n
    centre = (p + z2n / 2.0) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    if k == 0:
        lo = 0.0
    if k == n:
        hi = 1.0
    return lo, hi


def dysplasia_flag(lo: float, hi: float, threshold: float) -> str:
    """'met' (lower bound ≥ threshold), 'not met' (upper bound < threshold), else 'uncertain'."""
    if lo >= threshold:
        return "met"
    if hi < threshold:
        return "not met"
    return "uncertain"


def _pct(v: float) -> str:
    return f"{v * 100:.10g}"


def band_labels(bands: tuple[float, ...]) -> tuple[str, ...]:
    """Labels for the intervals cut by ``bands``: (0.05, 0.1, 0.2) → <5%, 5–9%, 10–19%, ≥20%."""
    if not bands:
        return ("all",)
    labels = [f"<{_pct(bands[0])}%"]
    for lo, hi in itertools.pairwise(bands):
        lo_pct, hi_pct = lo * 100, hi * 100
        if abs(lo_pct - round(lo_pct)) < 1e-9 and abs(hi_pct - round(hi_pct)) < 1e-9:
            labels.append(f"{round(lo_pct)}–{round(hi_pct) - 1}%")
        else:
            labels.append(f"{_pct(lo)}–<{_pct(hi)}%")
    labels.append(f"≥{_pct(bands[-1])}%")
    return tuple(labels)


def _band_index(fraction: float, bands: tuple[float, ...]) -> int:
    return sum(1 for b in bands if fraction >= b)


def blast_band(fraction: float, bands: tuple[float, ...]) -> str:
    """WHO band of a blast fraction: the number of cut points it reaches picks the label."""
    return band_labels(bands)[_band_index(fraction, bands)]


def blast_stat(
    n_blast: int, n: int, bands: tuple[float, ...], confidence: float, adequate: bool
) -> BlastStat:
    """Blast % of ``n`` cells; the call is the estimate's band unless the interval crosses a
    cut ("uncertain between bands") or the slide has too few cells ("insufficient")."""
    if n == 0:
        return BlastStat(0, 0, None, None, None, None, call="insufficient")
    frac = n_blast / n
    lo, hi = wilson_interval(n_blast, n, confidence)
    labels = band_labels(bands)
    idx, i_lo, i_hi = _band_index(frac, bands), _band_index(lo, bands), _band_index(hi, bands)
    if not adequate:
        call = "insufficient"
    elif i_lo != i_hi:
        call = UNCERTAIN_BANDS
    else:
        call = labels[idx]
    default = tuple(bands) == DEFAULT_BLAST_CUTS
    return BlastStat(
        n_blast,
        n,
        frac,
        lo,
        hi,
        labels[idx],
        band_low=labels[i_lo],
        band_high=labels[i_hi],
        call=call,
        who_category=WHO_2022_CATEGORIES[idx] if default else None,
        icc_band=ICC_2022_CATEGORIES[idx] if default else None,
    )


@dataclass(frozen=True)
class ClassStat:
    code: str
    name: str
    count: int
    fraction: float | None  # of the differential's cells (None outside the denominator)
    ci_low: float | None
    ci_high: float | None
    in_differential: bool = True


@dataclass(frozen=True)
class LineageStat:
    lineage: str
    normal: int
    dysplastic: int
    fraction: float | None  # dysplastic / (normal + dysplastic)
    ci_low: float | None
    ci_high: float | None
    flag: str  # met | not met | uncertain | insufficient
    minimum: int = 0  # cells of the lineage a call needs (adequacy)

    @property
    def total(self) -> int:
        return self.normal + self.dysplastic


@dataclass(frozen=True)
class MERatio:
    """Myeloid (granulocytic) : erythroid cells; ``ratio``/``ci_high`` None where unbounded."""

    myeloid: int
    erythroid: int
    ratio: float | None
    ci_low: float | None
    ci_high: float | None


@dataclass(frozen=True)
class BlastStat:
    count: int
    nucleated: int  # cells of the differential (the denominator rule's), not all nucleated cells
    fraction: float | None
    ci_low: float | None
    ci_high: float | None
    band: str | None  # WHO 2022 band of the estimate
    band_low: str | None = None  # bands of the interval's ends
    band_high: str | None = None
    call: str | None = None  # the band | "uncertain between bands" | "insufficient"
    who_category: str | None = None  # WHO 2022 category of the band (default cuts only)
    icc_band: str | None = None  # ICC 2022 category of the band (default cuts only)


@dataclass(frozen=True)
class SlideSummary:
    """One slide's result; ``to_dict()`` is JSON-ready, ``to_row()`` a flat CSV row."""

    pipeline: str
    mode: str
    status: str
    n_cells: int
    n_unclassified: int
    n_nucleated: int
    n_counted: int  # cells of the differential: the denominator of %, blast % and adequacy
    denominator_rule: str
    denominator_description: str
    counts: dict[str, int]
    classes: tuple[ClassStat, ...]
    lineages: tuple[LineageStat, ...]
    blast: BlastStat | None
    confidence: float
    dysplasia_threshold: float
    min_cells: int
    adequate_cells: bool
    megakaryocytes: int
    min_megakaryocytes: int
    adequate_megakaryocytes: bool
    failed_tiles: int
    failed_area_fraction: float
    tiles_total: int
    notes: tuple[str, ...]
    error: str | None = None
    me_ratio: MERatio | None = None
    max_failed_area_fraction: float = 0.05
    tissue_skipped_fraction: float | None = None  # of the tile grid's area, left out by the tissue mask
    unreadable_tiles: int = 0  # corrupt source tiles of the file, read as white
    unreadable_area_fraction: float = 0.0  # their area, of the counted area
    cells_cut_at_read_edge: int = 0  # owned cells left out: the read edge cut them even in a grown box

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = [asdict(c) for c in self.classes]
        d["lineages"] = [asdict(lin) | {"total": lin.total} for lin in self.lineages]
        d["blast"] = asdict(self.blast) if self.blast is not None else None
        d["me_ratio"] = asdict(self.me_ratio) if self.me_ratio is not None else None
        d["notes"] = list(self.notes)
        d["counts"] = dict(self.counts)
        return d

    def to_row(self) -> dict[str, str | int | float | None]:
        """Flat, stable-order row for summary.csv (fractions as percentages)."""

        def pct(v: float | None) -> float | None:
            return None if v is None else round(v * 100, 4)

        row: dict[str, str | int | float | None] = {
            "status": self.status,
            "error": self.error or "",
            "pipeline": self.pipeline,
            "mode": self.mode,
            "n_cells": self.n_cells,
            "n_nucleated": self.n_nucleated,
            "n_counted": self.n_counted,
            "denominator_rule": self.denominator_rule,
            "n_unclassified": self.n_unclassified,
            "adequate_cells": self.adequate_cells,
            "megakaryocytes": self.megakaryocytes,
            "adequate_megakaryocytes": self.adequate_megakaryocytes,
            "tiles_total": self.tiles_total,
            "failed_tiles": self.failed_tiles,
            "failed_area_fraction": round(self.failed_area_fraction, 6),
            "unreadable_tiles": self.unreadable_tiles,
            "cells_cut_at_read_edge": self.cells_cut_at_read_edge,
            "unreadable_area_fraction": round(self.unreadable_area_fraction, 6),
            "tissue_skipped_fraction": (
                None if self.tissue_skipped_fraction is None else round(self.tissue_skipped_fraction, 6)
            ),
        }
        if self.blast is not None:
            row["blast_pct"] = pct(self.blast.fraction)
            row["blast_ci_low_pct"] = pct(self.blast.ci_low)
            row["blast_ci_high_pct"] = pct(self.blast.ci_high)
            row["blast_band"] = self.blast.band or ""
            row["blast_call"] = self.blast.call or ""
            row["blast_icc"] = self.blast.icc_band or ""
        if self.me_ratio is not None:
            me = self.me_ratio
            for key, v in (
                ("me_ratio", me.ratio),
                ("me_ratio_ci_low", me.ci_low),
                ("me_ratio_ci_high", me.ci_high),
            ):
                row[key] = None if v is None else round(v, 4)
        for lin in self.lineages:
            row[f"{lin.lineage}_dysplastic_pct"] = pct(lin.fraction)
            row[f"{lin.lineage}_ci_low_pct"] = pct(lin.ci_low)
            row[f"{lin.lineage}_ci_high_pct"] = pct(lin.ci_high)
            row[f"{lin.lineage}_flag"] = lin.flag
        for c in self.classes:
            row[f"n_{c.code}"] = c.count
        return row


def in_differential(c: ClassDef, pipeline: Pipeline) -> bool:
    """Whether class ``c`` is in the differential's denominator (``counting.denominator``)."""
    if not c.nucleated:
        return False
    rule = pipeline.counting.denominator
    if rule == "nucleated-without-megakaryocytes":
        return c.lineage != pipeline.adequacy.megakaryocytic_lineage
    return True


def me_ratio(myeloid: int, erythroid: int, confidence: float = 0.95) -> MERatio:
    """M:E ratio with the interval of p = M / (M + E) mapped through p / (1 − p)."""
    n = myeloid + erythroid
    if n == 0:
        return MERatio(myeloid, erythroid, None, None, None)
    lo, hi = wilson_interval(myeloid, n, confidence)

    def odds(q: float) -> float | None:
        return None if q >= 1.0 else q / (1.0 - q)

    ratio = myeloid / erythroid if erythroid else None
    return MERatio(myeloid, erythroid, ratio, odds(lo), odds(hi))


def summarize(
    class_ids: ArrayLike,
    pipeline: Pipeline,
    failed_tiles: int = 0,
    failed_area_fraction: float = 0.0,
    tiles_total: int = 0,
    error: str | None = None,
    tissue_skipped_fraction: float | None = None,
    unreadable_tiles: int = 0,
    unreadable_area_fraction: float = 0.0,
    cells_cut_at_read_edge: int = 0,
) -> SlideSummary:
    """Aggregate per-cell class indices (into ``pipeline.taxonomy``; -1 = unclassified).

    ``failed_area_fraction`` is the failed tiles' share of the counted (selected) area;
    beyond ``adequacy.max_failed_area_fraction`` the status is "partial".
    ``tissue_skipped_fraction`` is the share of the slide the tissue mask left out.
    ``unreadable_area_fraction``: corrupt source tiles of the file read as white, of the
    counted area; it counts toward "partial" with the failed area.
    """
    taxonomy = pipeline.taxonomy
    k = len(taxonomy)
    ids = np.asarray(class_ids).astype(np.int64, copy=False).ravel()
    if ids.size and (ids.min() < -1 or ids.max() >= k):
        raise ValueError(f"class ids must be within -1..{k - 1}")
    classified = ids[ids >= 0]
    counts_arr = np.bincount(classified, minlength=k)
    counts = {c.code: int(n) for c, n in zip(taxonomy, counts_arr, strict=True)}
    n_cells = int(classified.size)
    conf = pipeline.who.confidence
    threshold = pipeline.who.dysplasia_threshold
    counted = {c.code: in_differential(c, pipeline) for c in taxonomy}
    n_counted = sum(counts[c.code] for c in taxonomy if counted[c.code])

    classes = []
    for c in taxonomy:
        n = counts[c.code]
        if counted[c.code] and n_counted:
            lo, hi = wilson_interval(n, n_counted, conf)
            classes.append(ClassStat(c.code, c.name, n, n / n_counted, lo, hi))
        else:
            classes.append(ClassStat(c.code, c.name, n, None, None, None, counted[c.code]))

    adeq = pipeline.adequacy
    mk_lineage = adeq.megakaryocytic_lineage
    megakaryocytes = sum(counts[c.code] for c in taxonomy if c.lineage == mk_lineage and c.nucleated)
    adequate_mk = megakaryocytes >= adeq.min_megakaryocytes
    notes: list[str] = []
    adequate_cells = n_counted >= adeq.min_cells and n_counted > 0

    lineages: list[LineageStat] = []
    if pipeline.mode == "dysplasia":
        for lineage in pipeline.lineages:
            members = [c for c in taxonomy if c.lineage == lineage]
            if not any(c.dysplastic for c in members) or all(c.dysplastic for c in members):
                continue  # no normal/dysplastic split defined for this lineage
            dys = sum(counts[c.code] for c in members if c.dysplastic)
            normal = sum(counts[c.code] for c in members if not c.dysplastic)
            total = dys + normal
            minimum = adeq.lineage_minimum(lineage)
            if total == 0:
                lineages.append(LineageStat(lineage, normal, dys, None, None, None, "insufficient", minimum))
                continue
            lo, hi = wilson_interval(dys, total, conf)
            flag = dysplasia_flag(lo, hi, threshold)
            if lineage == mk_lineage and not adequate_mk:
                flag = "insufficient"
                notes.append(
                    f"{megakaryocytes} megakaryocytes counted (< {adeq.min_megakaryocytes}): "
                    "megakaryocytic dysplasia not called"
                )
            elif total < minimum:
                flag = "insufficient"
                notes.append(f"{lineage}: {total} cells (< {minimum}): {lineage} dysplasia not called")
            elif not adequate_cells:
                flag = "insufficient"
            lineages.append(LineageStat(lineage, normal, dys, dys / total, lo, hi, flag, minimum))

    n_nucleated = sum(counts[c.code] for c in taxonomy if c.nucleated)
    blast: BlastStat | None = None
    if any(c.blast for c in taxonomy):
        n_blast = sum(counts[c.code] for c in taxonomy if c.blast and counted[c.code])
        blast = blast_stat(n_blast, n_counted, pipeline.who.blast_bands, conf, adequate_cells)

    me: MERatio | None = None
    if pipeline.counting.me_ratio is not None:
        my_lin, ery_lin = pipeline.counting.me_ratio
        n_my = sum(counts[c.code] for c in taxonomy if c.lineage == my_lin and c.nucleated)
        n_ery = sum(counts[c.code] for c in taxonomy if c.lineage == ery_lin and c.nucleated)
        me = me_ratio(n_my, n_ery, conf)

    status = STATUS_OK if adequate_cells else STATUS_INSUFFICIENT
    if not adequate_cells:
        notes.append(
            f"{n_counted} cells in the differential (< {adeq.min_cells}): insufficient for a reliable count; "
            "no lineage or blast band is called"
        )
    limit = adeq.max_failed_area_fraction
    lost = failed_area_fraction + unreadable_area_fraction
    if adequate_cells and lost > limit:
        status = STATUS_PARTIAL
    if failed_tiles:
        partial = f" > {limit * 100:g}%: partial result" if status == STATUS_PARTIAL else ""
        notes.append(
            f"{failed_tiles} tile(s) failed and were excluded "
            f"({failed_area_fraction * 100:.2f}% of the counted area{partial})"
        )
    if unreadable_tiles:
        notes.append(
            f"{unreadable_tiles} source tile(s) of the file could not be decoded and were read as white "
            f"({unreadable_area_fraction * 100:.2f}% of the counted area lost)"
        )
    if cells_cut_at_read_edge:
        notes.append(
            f"{cells_cut_at_read_edge} cell(s) could not be kept: the tile's read edge cut them even with "
            "a grown read box (objects larger than tiling.max_object_um); they are not counted"
        )
    if tissue_skipped_fraction is not None and tissue_skipped_fraction > 0:
        notes.append(
            f"the tissue mask left out {tissue_skipped_fraction * 100:.1f}% of the slide "
            "(no stained cells found there)"
        )
    n_unclassified = int(ids.size - n_cells)
    if n_unclassified:
        notes.append(f"{n_unclassified} cell(s) were not classified and are excluded")
    rule = pipeline.counting.denominator
    return SlideSummary(
        pipeline=pipeline.name,
        mode=pipeline.mode,
        status=status,
        n_cells=n_cells,
        n_unclassified=n_unclassified,
        n_nucleated=n_nucleated,
        n_counted=n_counted,
        denominator_rule=rule,
        denominator_description=DENOMINATOR_RULES[rule],
        counts=counts,
        classes=tuple(classes),
        lineages=tuple(lineages),
        blast=blast,
        confidence=conf,
        dysplasia_threshold=threshold,
        min_cells=adeq.min_cells,
        adequate_cells=adequate_cells,
        megakaryocytes=megakaryocytes,
        min_megakaryocytes=adeq.min_megakaryocytes,
        adequate_megakaryocytes=adequate_mk,
        failed_tiles=int(failed_tiles),
        failed_area_fraction=float(failed_area_fraction),
        tiles_total=int(tiles_total),
        notes=tuple(notes),
        error=error,
        me_ratio=me,
        max_failed_area_fraction=limit,
        tissue_skipped_fraction=None if tissue_skipped_fraction is None else float(tissue_skipped_fraction),
        unreadable_tiles=int(unreadable_tiles),
        unreadable_area_fraction=float(unreadable_area_fraction),
        cells_cut_at_read_edge=int(cells_cut_at_read_edge),
    )

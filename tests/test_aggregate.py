"""Aggregation: hand-computed fractions and Wilson intervals, WHO bands, flags, zero cells."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsiflow.aggregate import (
    band_labels,
    blast_band,
    dysplasia_flag,
    summarize,
    wilson_interval,
    z_value,
)
from wsiflow.config import Pipeline, load_pipeline

# Class indices in pipelines/mds.yaml
EN, GN, MN, ED, GD, MD, BLAST, OTHER = range(8)


@pytest.fixture(scope="module")
def mds() -> Pipeline:
    return load_pipeline("mds")


def _ids(**counts: int) -> np.ndarray:
    names = {"EN": EN, "GN": GN, "MN": MN, "ED": ED, "GD": GD, "MD": MD, "blast": BLAST, "other": OTHER}
    ids = np.concatenate([np.full(n, names[k], np.int16) for k, n in counts.items()])
    return np.random.default_rng(0).permutation(ids)


def test_z_for_95_percent() -> None:
    assert z_value(0.95) == pytest.approx(1.959963984540054, abs=1e-12)


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        # Wilson score interval, z = 1.959964 (hand-computed; e.g. 10/100: p=0.1,
        # centre=(0.1+0.019207)/1.038415=0.114797, half=1.887457*sqrt(0.0009+0.0000960)=0.059568)
        (10, 100, 0.0552291, 0.1743657),
        (30, 100, 0.2189489, 0.3958485),
        (2, 200, 0.0027467, 0.0357218),
        (0, 20, 0.0, 0.1611252),
        (20, 20, 0.8388748, 1.0),
        (1, 2, 0.0945312, 0.9054688),
    ],
)
def test_wilson_interval_hand_computed(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson_interval(k, n, 0.95)
    assert got == pytest.approx((lo, hi), abs=1e-6)


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_flags_against_the_threshold_are_inclusive() -> None:
    assert dysplasia_flag(0.10, 0.2, 0.10) == "met"  # WHO: >= 10 %
    assert dysplasia_flag(0.0999999, 0.2, 0.10) == "uncertain"
    assert dysplasia_flag(0.01, 0.0999999, 0.10) == "not met"
    assert dysplasia_flag(0.01, 0.10, 0.10) == "uncertain"


@pytest.mark.parametrize(
    ("blasts", "nucleated", "band"),
    [
        (499, 10_000, "<5%"),  # 4.99 %
        (500, 10_000, "5–9%"),  # 5.0 %
        (999, 10_000, "5–9%"),  # 9.99 %
        (1000, 10_000, "10–19%"),  # 10 %
        (1999, 10_000, "10–19%"),  # 19.99 %
        (2000, 10_000, "≥20%"),  # 20 %
        (0, 10_000, "<5%"),
        (10_000, 10_000, "≥20%"),
    ],
)
def test_who_blast_bands_at_boundaries(mds: Pipeline, blasts: int, nucleated: int, band: str) -> None:
    assert blast_band(blasts / nucleated, mds.who.blast_bands) == band
    s = summarize(_ids(blast=blasts, other=nucleated - blasts), mds)
    assert s.blast is not None
    assert s.blast.band == band
    assert s.blast.fraction == blasts / nucleated
    assert s.blast.nucleated == nucleated


def test_band_labels() -> None:
    assert band_labels((0.05, 0.10, 0.20)) == ("<5%", "5–9%", "10–19%", "≥20%")
    assert band_labels((0.025, 0.1)) == ("<2.5%", "2.5–<10%", "≥10%")


def test_dysplasia_summary_hand_computed(mds: Pipeline) -> None:
    # erythroid 30/100 dysplastic -> met; granulocytic 10/100 -> uncertain;
    # megakaryocytic 2/40 -> p=0.05, centre=0.0980182/1.0960365=0.0894298,
    # half=1.788229*sqrt(0.0011875+0.0006002)=0.0756092 -> (0.0138207, 0.1650388)
    # uncertain; 50 blasts, 260 other.
    ids = _ids(EN=70, ED=30, GN=90, GD=10, MN=38, MD=2, blast=50, other=260)
    data = mds.model_dump()
    data["adequacy"]["min_lineage_cells"] = {"erythroid": 100, "granulocytic": 100}
    s = summarize(ids, Pipeline.model_validate(data))
    assert s.status == "ok" and s.n_cells == 550 and s.adequate_cells
    assert s.counts == {"EN": 70, "GN": 90, "MN": 38, "ED": 30, "GD": 10, "MD": 2, "blast": 50, "other": 260}
    lin = {x.lineage: x for x in s.lineages}
    assert list(lin) == ["erythroid", "granulocytic", "megakaryocytic"]
    ery, gra, meg = lin["erythroid"], lin["granulocytic"], lin["megakaryocytic"]
    assert (ery.normal, ery.dysplastic, ery.fraction) == (70, 30, 0.30)
    assert (ery.ci_low, ery.ci_high) == pytest.approx((0.2189489, 0.3958485), abs=1e-6)
    assert ery.flag == "met"
    assert gra.fraction == 0.10 and gra.flag == "uncertain"
    assert (gra.ci_low, gra.ci_high) == pytest.approx((0.0552291, 0.1743657), abs=1e-6)
    assert s.megakaryocytes == 40 and s.adequate_megakaryocytes
    assert meg.fraction == 0.05 and meg.flag == "uncertain"
    assert (meg.ci_low, meg.ci_high) == pytest.approx((0.0138207, 0.1650388), abs=1e-6)
    # megakaryocytes are left out of the differential: 50 blasts / 510 cells
    assert s.n_counted == 510 and s.blast is not None and s.blast.nucleated == 510
    assert s.blast.fraction == 50 / 510 and s.blast.band == "5–9%"
    d = s.to_dict()
    json.dumps(d)  # JSON-ready
    assert d["lineages"][0]["total"] == 100
    row = s.to_row()
    assert row["erythroid_flag"] == "met" and row["erythroid_dysplastic_pct"] == 30.0
    assert row["n_blast"] == 50 and row["status"] == "ok"


def test_not_met_case(mds: Pipeline) -> None:
    s = summarize(_ids(EN=198, ED=2, other=400), mds)
    ery = next(x for x in s.lineages if x.lineage == "erythroid")
    assert ery.flag == "not met"
    assert (ery.ci_low, ery.ci_high) == pytest.approx((0.0027467, 0.0357218), abs=1e-6)


def test_megakaryocytic_dysplasia_needs_enough_megakaryocytes(mds: Pipeline) -> None:
    s = summarize(_ids(MN=10, MD=19, other=600), mds)  # 29 < 30 megakaryocytes
    meg = next(x for x in s.lineages if x.lineage == "megakaryocytic")
    assert not s.adequate_megakaryocytes and s.megakaryocytes == 29
    assert meg.flag == "insufficient" and meg.fraction == 19 / 29  # the fraction is still reported
    assert any("megakaryocytes" in n for n in s.notes)
    s = summarize(_ids(MN=10, MD=20, other=600), mds)  # 30: now called
    meg = next(x for x in s.lineages if x.lineage == "megakaryocytic")
    assert meg.flag == "met"


def test_lineage_without_cells_is_insufficient(mds: Pipeline) -> None:
    s = summarize(_ids(other=600), mds)
    assert all(x.flag == "insufficient" and x.fraction is None for x in s.lineages)


def test_zero_cells_is_a_valid_result(mds: Pipeline) -> None:
    s = summarize(np.zeros(0, np.int16), mds, failed_tiles=2, failed_area_fraction=0.25, tiles_total=8)
    assert s.status == "insufficient cells" and s.n_cells == 0 and not s.adequate_cells
    assert s.blast is not None and s.blast.fraction is None and s.blast.band is None
    assert all(x.flag == "insufficient" for x in s.lineages)
    assert all(c.fraction is None for c in s.classes)
    assert s.failed_tiles == 2 and s.failed_area_fraction == 0.25 and s.tiles_total == 8
    assert any("2 tile(s) failed" in n for n in s.notes)
    d = s.to_dict()
    assert json.loads(json.dumps(d))["status"] == "insufficient cells"
    assert s.to_row()["failed_tiles"] == 2


def test_few_cells_is_insufficient_but_reported(mds: Pipeline) -> None:
    s = summarize(_ids(EN=50, ED=50), mds)
    assert s.status == "insufficient cells" and s.n_cells == 100
    assert s.lineages[0].fraction == 0.5


def test_unclassified_cells_are_excluded(mds: Pipeline) -> None:
    ids = np.concatenate([_ids(EN=500, ED=100), np.full(7, -1, np.int16)])
    s = summarize(ids, mds)
    assert s.n_cells == 600 and s.n_unclassified == 7
    with pytest.raises(ValueError):
        summarize(np.array([8]), mds)


def test_differential_mode_from_the_taxonomy() -> None:
    data = load_pipeline("mds").model_dump()
    data["mode"] = "differential"
    data["name"] = "pb"
    data["taxonomy"] = [
        {"code": "neu", "name": "Neutrophil", "color": [0, 0, 255]},
        {"code": "lym", "name": "Lymphocyte", "color": [0, 255, 0]},
        {"code": "bla", "name": "Blast", "blast": True, "color": [255, 0, 0]},
        {"code": "plt", "name": "Platelet", "nucleated": False, "color": [9, 9, 9]},
    ]
    p = Pipeline.model_validate(data)
    ids = np.array([0] * 60 + [1] * 30 + [2] * 10 + [3] * 100)
    s = summarize(ids, p)
    assert s.mode == "differential" and s.lineages == ()
    neu = s.classes[0]
    # platelets are not nucleated: the differential is over the 100 nucleated cells
    assert (neu.code, neu.count, neu.fraction) == ("neu", 60, 0.60)
    assert (neu.ci_low, neu.ci_high) == pytest.approx(wilson_interval(60, 100), abs=1e-12)
    assert s.n_nucleated == 100 and s.classes[3].fraction is None
    assert s.blast is not None and s.blast.fraction == 0.10 and s.blast.band == "10–19%"


# --------------------------------------------------------------------------- issue 15: counting rules


def _pb_like() -> Pipeline:
    data = load_pipeline("mds").model_dump()
    data["mode"] = "differential"
    data["name"] = "pb"
    data["taxonomy"] = [
        {"code": "neu", "name": "Neutrophil", "lineage": "granulocytic", "color": [0, 0, 255]},
        {"code": "lym", "name": "Lymphocyte", "lineage": "lymphoid", "color": [0, 255, 0]},
        {
            "code": "plt",
            "name": "Platelet",
            "lineage": "megakaryocytic",
            "nucleated": False,
            "color": [9] * 3,
        },
    ]
    return Pipeline.model_validate(data)


def test_differential_divides_by_nucleated_cells_not_platelets() -> None:
    # 60 neutrophils + 40 lymphocytes + 100 platelets: neutrophils are 60 % of the differential
    s = summarize(np.array([0] * 60 + [1] * 40 + [2] * 100), _pb_like())
    neu, lym, plt = s.classes
    assert neu.fraction == 0.60 and lym.fraction == 0.40
    assert (neu.ci_low, neu.ci_high) == pytest.approx(wilson_interval(60, 100), abs=1e-12)
    assert plt.count == 100 and plt.fraction is None and not plt.in_differential
    assert s.n_counted == 100 and s.n_cells == 200


def test_adequacy_counts_nucleated_cells_only() -> None:
    # 300 nucleated + 300 platelets is not a 500-cell differential
    s = summarize(np.array([0] * 200 + [1] * 100 + [2] * 300), _pb_like())
    assert s.n_counted == 300 and not s.adequate_cells and s.status == "insufficient cells"


def test_megakaryocytes_are_left_out_of_the_blast_denominator_by_default(mds: Pipeline) -> None:
    s = summarize(_ids(blast=50, other=450, MN=90, MD=10), mds)
    assert s.denominator_rule == "nucleated-without-megakaryocytes"
    assert s.n_counted == 500 and s.adequate_cells
    assert s.blast is not None and s.blast.nucleated == 500 and s.blast.fraction == 0.10
    mn = next(c for c in s.classes if c.code == "MN")
    assert mn.fraction is None and mn.count == 90
    assert s.to_row()["denominator_rule"] == "nucleated-without-megakaryocytes"
    assert "megakaryocytes" in s.denominator_description


def test_denominator_rule_is_configurable(mds: Pipeline) -> None:
    data = mds.model_dump()
    data["counting"] = {"denominator": "nucleated"}
    p = Pipeline.model_validate(data)
    s = summarize(_ids(blast=50, other=450, MN=90, MD=10), p)
    assert s.denominator_rule == "nucleated"
    assert s.n_counted == 600 and s.blast is not None and s.blast.fraction == 50 / 600


def test_me_ratio_with_its_interval(mds: Pipeline) -> None:
    # granulocytic 300 : erythroid 100 -> 3.0; interval from the Wilson interval of 300/400
    s = summarize(_ids(GN=270, GD=30, EN=90, ED=10, other=100), mds)
    me = s.me_ratio
    assert me is not None and (me.myeloid, me.erythroid) == (300, 100) and me.ratio == 3.0
    lo, hi = wilson_interval(300, 400)
    assert (me.ci_low, me.ci_high) == pytest.approx((lo / (1 - lo), hi / (1 - hi)), abs=1e-12)
    assert me.ci_low < 3.0 < me.ci_high
    assert s.to_row()["me_ratio"] == 3.0
    # no erythroid cells: the ratio is undefined, not infinite
    s = summarize(_ids(GN=300, other=300), mds)
    assert s.me_ratio is not None and s.me_ratio.ratio is None and s.me_ratio.ci_high is None
    json.dumps(s.to_dict())


def test_a_lineage_call_needs_the_lineage_minimum(mds: Pipeline) -> None:
    # 3 dysplastic of 5 erythroid cells: Wilson 0.23-0.88, but 5 < 200 erythroid precursors
    s = summarize(_ids(EN=2, ED=3, GN=190, GD=10, other=400), mds)
    assert s.status == "ok"
    ery = next(x for x in s.lineages if x.lineage == "erythroid")
    assert ery.fraction == 0.6 and ery.ci_low == pytest.approx(0.2307, abs=1e-4)
    assert ery.flag == "insufficient" and ery.minimum == 200
    gra = next(x for x in s.lineages if x.lineage == "granulocytic")
    assert gra.total == 200 and gra.flag == "not met" and gra.minimum == 200  # 200 is enough
    assert any("erythroid: 5 cells (< 200)" in n for n in s.notes)
    assert s.to_row()["erythroid_flag"] == "insufficient"


def test_lineage_minimums_are_configurable(mds: Pipeline) -> None:
    data = mds.model_dump()
    data["adequacy"]["min_lineage_cells"] = {"erythroid": 5}
    p = Pipeline.model_validate(data)
    s = summarize(_ids(EN=2, ED=3, other=600), p)
    assert next(x for x in s.lineages if x.lineage == "erythroid").flag == "met"
    assert p.adequacy.lineage_minimum("granulocytic") == 0  # not listed: no minimum but one cell
    assert p.adequacy.lineage_minimum("megakaryocytic") == 30  # adequacy.min_megakaryocytes


def test_an_insufficient_slide_calls_no_lineage(mds: Pipeline) -> None:
    # 250 erythroid cells, 30 % dysplastic, would be "met" — but the slide has 250 < 500 cells
    s = summarize(_ids(EN=175, ED=75), mds)
    assert s.status == "insufficient cells"
    assert all(x.flag == "insufficient" for x in s.lineages)
    assert s.lineages[0].fraction == 0.3  # the fraction is still reported
    assert s.blast is not None and s.blast.call == "insufficient"


def test_blast_band_straddling_a_cut_is_uncertain(mds: Pipeline) -> None:
    # 23 / 500 = 4.6 %, interval 3.1-6.8 %: "<5%" by the estimate, but it straddles 5 %
    s = summarize(_ids(blast=23, other=477), mds)
    b = s.blast
    assert b is not None and b.fraction == 0.046
    assert (b.ci_low, b.ci_high) == pytest.approx((0.0308, 0.0681), abs=1e-4)
    assert b.band == "<5%" and b.band_low == "<5%" and b.band_high == "5–9%"
    assert b.call == "uncertain between bands"
    assert s.to_row()["blast_call"] == "uncertain between bands"
    # well inside a band: the call is the band
    s = summarize(_ids(blast=750, other=4250), mds)  # 15 %, interval 14.0-16.0 %
    assert s.blast is not None and s.blast.call == "10–19%" == s.blast.band
    assert s.blast.icc_band == "MDS/AML (10–19%)"
    assert s.blast.who_category == "MDS-IB2 (10–19%)"


def test_icc_band_only_for_the_who_icc_cuts(mds: Pipeline) -> None:
    data = mds.model_dump()
    data["who"]["blast_bands"] = [0.02, 0.05]
    p = Pipeline.model_validate(data)
    s = summarize(_ids(blast=10, other=490), p)
    assert s.blast is not None and s.blast.icc_band is None and s.blast.who_category is None
    assert s.blast.band == "2–4%"


def test_failed_area_above_the_limit_makes_the_slide_partial(mds: Pipeline) -> None:
    ids = _ids(EN=300, GN=300, other=100)
    s = summarize(ids, mds, failed_tiles=1, failed_area_fraction=0.05, tiles_total=20)
    assert s.status == "ok"  # 5 % is the limit, not beyond it
    s = summarize(ids, mds, failed_tiles=2, failed_area_fraction=0.10, tiles_total=20)
    assert s.status == "partial" and s.max_failed_area_fraction == 0.05
    assert s.to_row()["status"] == "partial" and s.to_row()["failed_area_fraction"] == 0.1
    assert any("10.00% of the counted area" in n and "partial" in n for n in s.notes)
    data = mds.model_dump()
    data["adequacy"]["max_failed_area_fraction"] = 0.2
    assert summarize(ids, Pipeline.model_validate(data), 2, 0.10, 20).status == "ok"
    # too few cells stays "insufficient cells" whatever failed
    assert summarize(_ids(EN=10), mds, 2, 0.5, 4).status == "insufficient cells"


def test_tissue_skipped_fraction_is_reported(mds: Pipeline) -> None:
    s = summarize(np.zeros(0, np.int16), mds, tiles_total=3, tissue_skipped_fraction=0.97)
    assert s.tissue_skipped_fraction == 0.97 and s.to_row()["tissue_skipped_fraction"] == 0.97
    assert any("97.0% of the slide" in n for n in s.notes)


def test_the_run_table_says_when_the_blast_band_is_uncertain(mds: Pipeline) -> None:
    from wsiflow.cli.run import format_table
    from wsiflow.execution.runner import SlideResult

    s = summarize(_ids(blast=23, other=477), mds)  # 4.6 %, interval 3.1-6.8 %
    r = SlideResult(path="a.svs", name="a.svs", out_dir=None, status=s.status, summary=s)
    assert "4.6% (<5%; uncertain between bands)" in format_table([r], mds)

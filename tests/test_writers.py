"""Writers: Zarr cell store (round trip, idempotence, crash recovery), QuPath GeoJSON,
summary JSON/CSV (atomic, one row per slide) and safe output folders."""

from __future__ import annotations

import csv
import errno
import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import shapely

from wsiflow.cells import CellTable, make_ids
from wsiflow.config import load_pipeline
from wsiflow.errors import OutputError
from wsiflow.writers import zarr_store
from wsiflow.writers.geojson import COORD_DECIMALS, cell_uuids, measurement_names, write_geojson
from wsiflow.writers.paths import safe_name, slide_output_dir
from wsiflow.writers.record import SlideRecord, SummaryRow, TileCounts
from wsiflow.writers.summary import (
    SUMMARY_BASE_COLUMNS,
    read_summary_csv,
    update_summary_csv,
    write_summary_csv,
    write_summary_json,
)
from wsiflow.writers.zarr_store import CellStore

TAXONOMY = load_pipeline("mds").taxonomy
K = len(TAXONOMY)


def make_table(tile: int, n: int, k: int = K, seed: int = 0) -> CellTable:
    """n cells of one tile: star-shaped polygons (5..24 vertices) around random centroids."""
    rng = np.random.default_rng(seed * 100_003 + tile)
    cx = rng.uniform(0, 4000, n) + tile * 5000
    cy = rng.uniform(0, 4000, n)
    counts = rng.integers(5, 25, n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    polys = []
    for i in range(n):
        ang = np.sort(rng.uniform(0, 2 * np.pi, counts[i]))
        r = rng.uniform(4, 12) * rng.uniform(0.8, 1.0, counts[i])
        polys.append(np.stack([cx[i] + r * np.cos(ang), cy[i] + r * np.sin(ang)], 1))
    poly_xy = np.concatenate(polys).astype(np.float32) if polys else np.zeros((0, 2), np.float32)
    probs = rng.dirichlet(np.ones(k), n).astype(np.float32) if k else np.zeros((n, 0), np.float32)
    bbox = np.stack([cx - 12, cy - 12, cx + 12, cy + 12], 1) if n else np.zeros((0, 4))
    return CellTable(
        id=make_ids(tile, n),
        x=cx,
        y=cy,
        bbox=bbox,
        poly_offsets=offsets,
        poly_xy=poly_xy,
        area_um2=rng.uniform(20, 400, n).astype(np.float32),
        perimeter_um=rng.uniform(15, 80, n).astype(np.float32),
        circularity=rng.uniform(0.5, 1, n).astype(np.float32),
        seg_score=rng.uniform(0.5, 1, n).astype(np.float32),
        class_id=(probs.argmax(1) if k else np.full(n, -1)).astype(np.int16),
        probs=probs,
        tile=np.full(n, tile, np.int64),
    )


def tables_for(tiles: list[int], n: int = 40, seed: int = 0) -> list[CellTable]:
    return [make_table(t, n if t % 3 else n // 2, seed=seed) for t in tiles]


# ---------------------------------------------------------------------- Zarr store


def test_store_round_trip(tmp_path: Path) -> None:
    attrs = {"pipeline": {"name": "mds"}, "models": {"seg": "ab" * 32}, "slide": {"path": "x.svs"}}
    store = CellStore.create(tmp_path / "cells.zarr", n_tiles=10, n_classes=K, attrs=attrs, buffer_rows=50)
    batches = [[0, 1], [2], [3, 4, 5], [7]]  # tile 6 has no cells; 8, 9 never done
    expected = []
    for b in batches:
        t = CellTable.concat(tables_for(b), K)
        store.append(t, b)
        expected.append(t)
    store.append(CellTable.empty(K), [6])
    assert not CellStore.is_complete(tmp_path / "cells.zarr")
    store.finalize({"summary": {"n": 1}})
    want = CellTable.concat(expected, K)

    again = CellStore.open(tmp_path / "cells.zarr", mode="r")
    assert again.complete and CellStore.is_complete(tmp_path / "cells.zarr")
    got = again.read_table()
    assert got.equals(want)
    assert CellTable.concat(list(again.iter_tables(rows=37)), K).equals(want)
    assert again.done.tolist() == [True] * 8 + [False] * 2
    assert again.n_cells == len(want)
    a = again.attrs
    assert a["pipeline"] == {"name": "mds"} and a["summary"] == {"n": 1} and a["format"] == zarr_store.FORMAT
    assert a["n_cells"] == len(want) and a["complete"] is True and "wsiflow_version" in a


def test_row_reader_gathers_any_rows_across_chunks(tmp_path: Path) -> None:
    import zarr

    g = zarr.open_group(tmp_path / "r.zarr", mode="w", zarr_format=3)
    data = np.arange(203 * 2, dtype=np.float32).reshape(203, 2)
    arr = g.create_array("a", shape=data.shape, chunks=(7, 2), dtype=np.float32)
    arr[:] = data
    reader = zarr_store._RowReader(arr)
    rng = np.random.default_rng(0)
    for index in (
        np.arange(203),  # in order: each chunk once
        rng.permutation(203),  # any order: every chunk many times, through the small cache
        rng.integers(0, 203, 500),  # repeats
        np.array([202, 0, 6, 7, 202]),  # the last, partial chunk
        np.zeros(0, np.int64),
    ):
        assert np.array_equal(reader.take(index), data[index])
        assert len(reader._cache) <= zarr_store.CACHED_CHUNKS


def test_sorted_stream_is_the_sorted_table_whatever_the_commit_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tiles committed out of order into small stored chunks: the stream's table chunks
    # gather rows from many of them, more than the reader caches
    monkeypatch.setattr(zarr_store, "CHUNK_ROWS", 64)
    monkeypatch.setattr(zarr_store, "VERTEX_CHUNK_ROWS", 256)
    store = CellStore.create(tmp_path / "c.zarr", n_tiles=30, n_classes=K, buffer_rows=1)
    for t in np.random.default_rng(2).permutation(30):
        store.append(make_table(int(t), 25), [int(t)])
    store.flush()
    ro = CellStore.open(tmp_path / "c.zarr")
    want = ro.read_table().sorted()
    for rows in (1, 37, 10_000):
        assert CellTable.concat(list(ro.iter_sorted(rows=rows)), K).equals(want)


def test_store_without_classes_round_trips(tmp_path: Path) -> None:
    store = CellStore.create(tmp_path / "c.zarr", n_tiles=2, n_classes=0)
    t = make_table(1, 30, k=0)
    store.append(t, [0, 1])
    store.finalize()
    assert CellStore.open(tmp_path / "c.zarr").read_table().equals(t)


def test_empty_store_reads_an_empty_table(tmp_path: Path) -> None:
    CellStore.create(tmp_path / "c.zarr", n_tiles=3, n_classes=K).finalize()
    t = CellStore.open(tmp_path / "c.zarr").read_table()
    assert len(t) == 0 and t.n_classes == K


def test_append_is_idempotent_per_tile(tmp_path: Path) -> None:
    store = CellStore.create(tmp_path / "c.zarr", n_tiles=5, n_classes=K, buffer_rows=10_000)
    t01 = CellTable.concat(tables_for([0, 1]), K)
    assert store.append(t01, [0, 1]) == len(t01)
    assert store.append(t01, [0, 1]) == 0  # buffered: still a no-op
    store.flush()
    assert store.append(t01, [0, 1]) == 0  # committed
    t12 = CellTable.concat(tables_for([1, 2]), K)
    n2 = len(tables_for([2])[0])
    assert store.append(t12, [1, 2]) == n2  # only tile 2 is new
    store.finalize()
    got = CellStore.open(tmp_path / "c.zarr").read_table()
    assert len(got) == len(t01) + n2
    assert len(np.unique(got.id)) == len(got)
    assert got.sorted().equals(CellTable.concat(tables_for([0, 1, 2]), K).sorted())


def test_append_validates_its_input(tmp_path: Path) -> None:
    store = CellStore.create(tmp_path / "c.zarr", n_tiles=3, n_classes=K)
    with pytest.raises(ValueError, match="not listed"):
        store.append(make_table(1, 5), [0])
    with pytest.raises(ValueError, match="within"):
        store.append(CellTable.empty(K), [3])
    with pytest.raises(ValueError, match="classes"):
        store.append(make_table(0, 5, k=2), [0])


def test_create_refuses_an_existing_store(tmp_path: Path) -> None:
    CellStore.create(tmp_path / "c.zarr", n_tiles=1, n_classes=K)
    with pytest.raises(OutputError, match="already exists"):
        CellStore.create(tmp_path / "c.zarr", n_tiles=1, n_classes=K)
    CellStore.create(tmp_path / "c.zarr", n_tiles=1, n_classes=K, overwrite=True)


def test_incomplete_and_foreign_stores_are_detected(tmp_path: Path) -> None:
    assert not CellStore.is_complete(tmp_path / "missing.zarr")
    (tmp_path / "junk.zarr").mkdir()
    (tmp_path / "junk.zarr" / "zarr.json").write_text("{not json")
    assert not CellStore.is_complete(tmp_path / "junk.zarr")
    with pytest.raises(OutputError):
        CellStore.open(tmp_path / "missing.zarr")
    s = CellStore.create(tmp_path / "c.zarr", n_tiles=2, n_classes=K)
    s.append(make_table(0, 3), [0])
    s.flush()
    assert not CellStore.is_complete(tmp_path / "c.zarr")
    assert not CellStore.open(tmp_path / "c.zarr").complete


def test_appending_to_a_finished_store_clears_complete(tmp_path: Path) -> None:
    s = CellStore.create(tmp_path / "c.zarr", n_tiles=2, n_classes=K)
    s.append(make_table(0, 3), [0])
    s.finalize()
    again = CellStore.open(tmp_path / "c.zarr", mode="r+")
    again.append(make_table(1, 3), [1])
    again.flush()
    assert not CellStore.is_complete(tmp_path / "c.zarr")
    again.finalize()
    assert CellStore.is_complete(tmp_path / "c.zarr")


def test_failed_tiles_persist_and_a_retry_clears_them(tmp_path: Path) -> None:
    s = CellStore.create(tmp_path / "c.zarr", n_tiles=4, n_classes=K)
    s.mark_failed([1, 3])
    assert CellStore.open(tmp_path / "c.zarr", mode="r").failed.tolist() == [False, True, False, True]
    s.append(make_table(1, 4), [1])
    s.flush()
    again = CellStore.open(tmp_path / "c.zarr", mode="r")
    assert again.failed.tolist() == [False, False, False, True]
    assert again.done.tolist() == [False, True, False, False]


def test_uncommitted_rows_are_truncated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    s = CellStore.create(path, n_tiles=4, n_classes=K)
    t01 = CellTable.concat(tables_for([0, 1]), K)
    s.append(t01, [0, 1])
    s.flush()
    # A crash in the middle of the next flush: rows (some arrays only) written, not committed.
    t2 = make_table(2, 25)
    s._write_rows("cells/x", t2.x, len(t01), len(t01) + 25)
    s._write_rows("cells/tile", t2.tile, len(t01), len(t01) + 25)
    s._write_rows("cells/poly_xy", t2.poly_xy, len(t01.poly_xy), len(t01.poly_xy) + len(t2.poly_xy))
    (path / "cells" / "x" / "c" / "0.deadbeef.partial").write_bytes(b"half")  # zarr temp file
    reopened = CellStore.open(path, mode="r+")
    assert reopened.n_cells == len(t01)
    assert reopened._arr("cells/x").shape == (len(t01),)
    assert reopened._arr("cells/poly_xy").shape == (len(t01.poly_xy), 2)
    assert not list(path.rglob("*.partial"))
    assert reopened.read_table().equals(t01)
    reopened.append(t2, [2])
    reopened.finalize()
    assert CellStore.open(path).read_table().equals(CellTable.concat([t01, t2], K))


def test_rows_of_tiles_not_marked_done_are_discarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.zarr"
    s = CellStore.create(path, n_tiles=4, n_classes=K)
    t0 = make_table(0, 30)
    s.append(t0, [0])
    s.flush()
    t12 = CellTable.concat(tables_for([1, 2]), K)
    s.append(t12, [1, 2])

    def crash(name: str, values: np.ndarray) -> None:
        raise KeyboardInterrupt("killed between committing rows and marking tiles done")

    monkeypatch.setattr(s, "_write_tile_array", crash)
    with pytest.raises(KeyboardInterrupt):
        s.flush()
    monkeypatch.undo()
    assert CellStore.open(path, mode="r").read_table().equals(t0)  # readers never see them
    reopened = CellStore.open(path, mode="r+")
    assert reopened.n_cells == len(t0) and reopened.done.tolist() == [True, False, False, False]
    assert reopened.append(t12, [1, 2]) == len(t12)  # the resumed run redoes tiles 1 and 2
    reopened.finalize()
    got = CellStore.open(path).read_table()
    assert got.equals(CellTable.concat([t0, t12], K))


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_writers import make_table
    from wsiflow.writers.zarr_store import CellStore
    store = CellStore.create({path!r}, n_tiles=400, n_classes=8, buffer_rows=1)
    print("ready", flush=True)
    for t in range(400):
        store.append(make_table(t, 20 + t % 7), [t])
        print("appended", t, flush=True)
    store.finalize()
    print("finished", flush=True)
    """
)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_every_cell_once(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    code = KILL_SCRIPT.format(tests=str(Path(__file__).parent), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    while proc.stdout.readline().strip() != "appended 5":
        pass
    time.sleep(0.05)  # somewhere inside a later flush
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not CellStore.is_complete(path)
    store = CellStore.open(path, mode="r+")
    done = np.flatnonzero(store.done)
    assert 0 < len(done) < 400, "kill the writer while it is appending"
    partial = store.read_table()
    assert set(np.unique(partial.tile)) <= set(done.tolist())
    for t in range(400):  # resume: only tiles not done
        if not store.done[t]:
            store.append(make_table(t, 20 + t % 7), [t])
    store.finalize()
    got = CellStore.open(path).read_table().sorted()
    want = CellTable.concat([make_table(t, 20 + t % 7) for t in range(400)], K).sorted()
    assert got.equals(want)


# ---------------------------------------------------------------------- GeoJSON


def _load(path: Path) -> dict:
    with gzip.open(path, "rb") as f:
        return json.loads(f.read())


def test_geojson_features_follow_qupath_rules(tmp_path: Path) -> None:
    tables = [make_table(0, 30), CellTable.empty(K), make_table(3, 17)]
    tables[1] = CellTable.empty(K)
    out = tmp_path / "cells.geojson.gz"
    n = write_geojson(out, iter(tables), TAXONOMY, slide_id="slide-A", chunk_cells=8)
    both = CellTable.concat(tables, K)
    assert n == len(both) == 47
    doc = _load(out)
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == n
    names = measurement_names(TAXONOMY)
    ids = set()
    for i, f in enumerate(doc["features"]):
        assert f["type"] == "Feature"
        u = uuid.UUID(f["id"])
        assert str(u) == f["id"] and u.version == 8
        ids.add(f["id"])
        g = f["geometry"]
        assert g["type"] == "Polygon" and len(g["coordinates"]) == 1
        ring = np.array(g["coordinates"][0])
        assert len(ring) >= 4 and (ring[0] == ring[-1]).all()
        # fixed precision: COORD_DECIMALS decimals of a level-0 pixel, rounded to nearest
        assert np.abs(ring[:-1] - both.polygon(i)).max() <= 0.5 * 10.0**-COORD_DECIMALS + 1e-9
        assert shapely.Polygon(ring).is_valid
        p = f["properties"]
        assert p["objectType"] == "detection"
        cls = TAXONOMY[int(both.class_id[i])]
        assert p["classification"] == {"name": cls.name, "color": list(cls.color)}
        m = p["measurements"]
        assert list(m) == names
        assert all(isinstance(v, int | float) and math.isfinite(v) for v in m.values())
        assert m["Area µm^2"] == pytest.approx(float(both.area_um2[i]), rel=1e-6)
        assert m["Confidence"] == pytest.approx(float(both.probs[i].max()), rel=1e-6)
        for j, c in enumerate(TAXONOMY):
            assert m[f"P({c.code})"] == pytest.approx(float(both.probs[i, j]), rel=1e-6)
    assert len(ids) == n


def test_geojson_offset_moves_polygons_into_the_qupath_frame(tmp_path: Path) -> None:
    """A slide with bounds (OpenSlide's ``bounds-x/y``): every vertex minus the offset."""
    t = make_table(0, 12)
    write_geojson(tmp_path / "a.geojson.gz", [t], TAXONOMY, slide_id="s", offset=(300, 200))
    write_geojson(tmp_path / "b.geojson.gz", [t], TAXONOMY, slide_id="s")
    a, b = _load(tmp_path / "a.geojson.gz"), _load(tmp_path / "b.geojson.gz")
    for fa, fb, i in zip(a["features"], b["features"], range(len(t)), strict=True):
        ra, rb = np.array(fa["geometry"]["coordinates"][0]), np.array(fb["geometry"]["coordinates"][0])
        assert np.abs(ra[:-1] - (t.polygon(i) - [300, 200])).max() <= 0.5 * 10.0**-COORD_DECIMALS + 1e-6
        assert np.allclose(ra, rb - [300, 200], atol=0.02)
        assert fa["id"] == fb["id"] and fa["properties"] == fb["properties"]


def test_geojson_percent_signs_in_names(tmp_path: Path) -> None:
    from wsiflow.config import ClassDef

    tax = (
        ClassDef(code="a%s", name="50% blasts %d", color=(1, 2, 3)),
        ClassDef(code="b", name="b", color=(4, 5, 6)),
    )
    t = make_table(0, 6, k=2)
    write_geojson(tmp_path / "p.geojson.gz", [t], tax)
    feats = _load(tmp_path / "p.geojson.gz")["features"]
    assert {f["properties"]["classification"]["name"] for f in feats} <= {"50% blasts %d", "b"}
    assert all("P(a%s)" in f["properties"]["measurements"] for f in feats)


def test_geojson_is_deterministic_and_ids_depend_on_the_slide(tmp_path: Path) -> None:
    t = make_table(2, 20)
    write_geojson(tmp_path / "a.geojson.gz", [t], TAXONOMY, slide_id="s1")
    write_geojson(tmp_path / "b.geojson.gz", [t], TAXONOMY, slide_id="s1")
    assert (tmp_path / "a.geojson.gz").read_bytes() == (tmp_path / "b.geojson.gz").read_bytes()
    a = cell_uuids("s1", t.id)
    b = cell_uuids("s2", t.id)
    assert len(set(a)) == len(a) and not set(a) & set(b)
    big = cell_uuids("s1", np.array([(2**38 - 1) << 24 | (2**24 - 1)], np.int64))
    assert uuid.UUID(big[0].decode()).variant == uuid.RFC_4122


def test_geojson_odd_cells(tmp_path: Path) -> None:
    t = make_table(0, 3)
    cols = t.columns()
    cols["area_um2"] = np.array([np.nan, 1.0, 2.0], np.float32)  # non-finite: measurement left out
    cols["class_id"] = np.array([0, -1, 1], np.int16)  # below min_confidence: QuPath class "Unclassified"
    counts = np.array([2, 5, 6])  # a degenerate 2-vertex "polygon" is written as its bbox
    cols["poly_offsets"] = np.concatenate([[0], np.cumsum(counts)])
    cols["poly_xy"] = np.arange(26, dtype=np.float32).reshape(13, 2)
    odd = CellTable(**cols)
    write_geojson(tmp_path / "o.geojson.gz", [odd], TAXONOMY)
    f0, f1, f2 = _load(tmp_path / "o.geojson.gz")["features"]
    assert "Area µm^2" not in f0["properties"]["measurements"]
    assert f1["properties"]["classification"]["name"] == "Unclassified"
    assert f2["properties"]["classification"]["name"] == TAXONOMY[1].name
    x0, y0, x1, y1 = np.round(odd.bbox[0].astype(np.float32).astype(np.float64), COORD_DECIMALS)
    ring = f0["geometry"]["coordinates"][0]
    assert ring == [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _ring_table(rings: list[np.ndarray]) -> CellTable:
    """A table with the given open rings (float32, level-0 px) and otherwise plain columns."""
    n = len(rings)
    t = make_table(0, n)
    cols = t.columns()
    cols["poly_offsets"] = np.concatenate([[0], np.cumsum([len(r) for r in rings])]).astype(np.int64)
    cols["poly_xy"] = np.concatenate(rings).astype(np.float32)
    return CellTable(**cols)


def test_geojson_coordinates_round_trip_at_fixed_precision(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    rings = []
    for centre in ([3.0, 2.0], [-40.0, 15.5], [123456.0, 654321.0], [999_950.0, 5.0], [0.004, -0.004]):
        ang = np.sort(rng.uniform(0, 2 * np.pi, 24))
        r = rng.uniform(4, 30) * rng.uniform(0.8, 1.0, 24)
        rings.append(np.stack([centre[0] + r * np.cos(ang), centre[1] + r * np.sin(ang)], 1))
    rings.append(np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.005], [0.125, 10.0]]))  # ties and integers
    rings.append(np.array([[-0.001, 0.0], [1.0, -0.0049], [1.0, 1.0]]))  # rounds to 0, never "-0"
    t = _ring_table(rings)
    write_geojson(tmp_path / "c.geojson", [t], TAXONOMY, chunk_cells=3)  # plain text, 3 chunks
    text = (tmp_path / "c.geojson").read_bytes()
    numbers = re.findall(rb"-?[0-9.]+", b"".join(re.findall(rb'"coordinates":(\[\[.*?\]\]\])', text)))
    assert len(numbers) == 2 * sum(len(r) + 1 for r in rings)
    assert not [x for x in numbers if x == b"-0" or (b"." in x and x.endswith(b"0")) or x.endswith(b".")]
    feats = json.loads(text)["features"]
    step = 10.0**-COORD_DECIMALS
    for i, f in enumerate(feats):
        ring = np.array(f["geometry"]["coordinates"][0])
        src = t.polygon(i).astype(np.float64)
        assert (ring[0] == ring[-1]).all() and len(ring) == len(src) + 1
        assert np.array_equal(ring[:-1], np.round(src, COORD_DECIMALS))  # the nearest multiple of 0.01
        assert np.abs(ring[:-1] - src).max() <= step / 2 + 1e-9
        got, want = shapely.Polygon(ring), shapely.Polygon(src)
        assert got.is_valid == want.is_valid
        assert shapely.hausdorff_distance(got, want) <= step / 2 * math.sqrt(2) + 1e-9
        assert got.area == pytest.approx(want.area, rel=1e-3, abs=0.05)
    # gzip is the same text
    write_geojson(tmp_path / "c.geojson.gz", [t], TAXONOMY, chunk_cells=3)
    with gzip.open(tmp_path / "c.geojson.gz", "rb") as fh:
        assert fh.read() == text


def test_geojson_far_or_non_finite_coordinates_keep_their_float_text(tmp_path: Path) -> None:
    far = np.array([[2.0e6, 1.5], [2.0e6 + 10, 1.5], [2.0e6 + 10, 9.75]])  # beyond fixed precision's range
    t = _ring_table([np.array([[1.0, 1.0], [2.0, 1.0], [2.0, 2.0]]), far])
    feats = _load_plain(tmp_path, t)
    assert feats[1]["geometry"]["coordinates"][0][:-1] == far.astype(np.float32).astype(float).tolist()
    assert feats[0]["geometry"]["coordinates"][0] == [[1, 1], [2, 1], [2, 2], [1, 1]]


def _load_plain(tmp_path: Path, t: CellTable) -> list[dict]:
    write_geojson(tmp_path / "p.json", [t], TAXONOMY)
    return list(json.loads((tmp_path / "p.json").read_bytes())["features"])


def test_geojson_write_is_atomic(tmp_path: Path) -> None:
    out = tmp_path / "cells.geojson.gz"
    out.write_bytes(b"previous")

    def broken() -> Iterator[CellTable]:
        yield make_table(0, 5)
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        write_geojson(out, broken(), TAXONOMY)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.geojson.gz"]


def test_geojson_reads_back_from_the_store(tmp_path: Path) -> None:
    s = CellStore.create(tmp_path / "c.zarr", n_tiles=3, n_classes=K)
    s.append(CellTable.concat(tables_for([0, 1, 2]), K), [0, 1, 2])
    s.finalize()
    store = CellStore.open(tmp_path / "c.zarr", mode="r")
    n = write_geojson(tmp_path / "g.geojson.gz", store.iter_tables(rows=16), TAXONOMY, "x")
    assert n == store.n_cells == len(_load(tmp_path / "g.geojson.gz")["features"])


# ---------------------------------------------------------------------- summaries


def test_summary_json_is_written_atomically(tmp_path: Path) -> None:
    write_summary_json(tmp_path / "summary.json", {"n": np.int64(3), "x": [1.5, None]})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"n": 3, "x": [1.5, None]}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_summary_csv_has_one_row_per_slide(tmp_path: Path) -> None:
    csv_path = tmp_path / "summary.csv"
    update_summary_csv(
        csv_path, {"slide": "a", "output": "a", "status": "ok", "n_cells": 10, "blast_pct": 2.5}
    )
    update_summary_csv(csv_path, {"slide": "b", "output": "b", "status": "error", "error": "b.svs: broken"})
    update_summary_csv(
        csv_path, {"slide": "a", "output": "a", "status": "ok", "n_cells": 12, "blast_pct": 3.0}
    )
    update_summary_csv(csv_path, {"slide": "a", "output": "a-1f2e3d4c", "status": "ok", "n_cells": 1})
    cols, rows = read_summary_csv(csv_path)
    assert tuple(cols[: len(SUMMARY_BASE_COLUMNS)]) == SUMMARY_BASE_COLUMNS
    assert cols[len(SUMMARY_BASE_COLUMNS) :] == ["n_cells", "blast_pct"]
    assert [r["output"] for r in rows] == ["a", "b", "a-1f2e3d4c"]
    assert rows[0]["n_cells"] == "12" and rows[0]["blast_pct"] == "3.0"
    assert rows[1]["status"] == "error" and rows[1]["error"] == "b.svs: broken" and rows[1]["n_cells"] == ""
    with csv_path.open(newline="") as f:
        assert len(list(csv.reader(f))) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]


def test_summary_csv_rewrite_failure_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv_path = tmp_path / "summary.csv"
    write_summary_csv(csv_path, [{"slide": "a", "output": "a", "status": "ok"}])
    before = csv_path.read_bytes()

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OutputError, match="No space left on device") as info:
        update_summary_csv(csv_path, {"slide": "b", "output": "b", "status": "ok"})
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert csv_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]


def test_unwritable_folder_gives_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot write"):
        write_summary_json(tmp_path / "missing-dir" / "summary.json", {})


# ---------------------------------------------------------------------- output paths


@pytest.mark.parametrize(
    ("slide", "name"),
    [
        ("../../etc/passwd.svs", "passwd"),
        ("/abs/dir/case 12.svs", "case_12"),
        ("Präparat Nr. 3 (µ).ndpi", "Pr_parat_Nr._3"),
        ("a*b?[c].svs", "a_b_c"),
        ("..svs", "slide"),
        ("....", "slide"),
        ("-rf.svs", "rf"),
        ("s3://bucket/dir/img.ome.tiff?version=2", "img"),
        ("C:\\scans\\x.svs", "x"),
    ],
)
def test_output_dir_is_safe(tmp_path: Path, slide: str, name: str) -> None:
    out = tmp_path / "OUT"
    out.mkdir()
    d = slide_output_dir(out, slide, set())
    assert d.name == name
    assert d.parent == out.resolve()
    assert set(d.name) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def test_same_stem_in_two_folders_gets_two_folders(tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    taken: set[str] = set()
    a = slide_output_dir(out, tmp_path / "site1" / "case.svs", taken)
    b = slide_output_dir(out, tmp_path / "site2" / "case.svs", taken)
    c = slide_output_dir(out, tmp_path / "site3" / "CASE.tiff", taken)  # case-insensitive clash
    assert a.name == "case" and b.name.startswith("case-") and c.name.startswith("CASE-")
    assert len({a, b, c}) == 3 and taken == {a.name, b.name, c.name}
    # deterministic: the same inputs in the same order give the same folders
    again: set[str] = set()
    assert [slide_output_dir(out, tmp_path / s / "case.svs", again) for s in ("site1", "site2")] == [a, b]


def test_symlink_escaping_out_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out / "evil").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="outside"):
        slide_output_dir(out, "/x/evil.svs", set())


def test_safe_name_is_bounded() -> None:
    assert len(safe_name("x" * 500)) <= 80
    assert safe_name("a..b") == "a.b"


def test_store_read_columns_and_polygons_agree_with_read_table(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    s = CellStore.create(path, n_tiles=3, n_classes=K)
    s.append(CellTable.concat(tables_for([2, 0]), K), [2, 0])
    s.finalize()
    store = CellStore.open(path)
    assert not store.writable  # read-only is the default: opening never rolls anything back
    want = store.read_table()
    cols = store.read_columns(("id", "bbox", "probs", "class_id"))
    assert np.array_equal(cols["id"], want.id) and np.array_equal(cols["bbox"], want.bbox)
    assert cols["probs"].shape == (len(want), K) and np.array_equal(cols["class_id"], want.class_id)
    rows = store.kept_rows()[::-1][:5]
    polys = store.polygons(rows)
    assert [p.tolist() for p in polys] == [want.polygon(int(r)).tolist() for r in rows]
    assert store.polygons(np.zeros(0, np.int64)) == []
    with pytest.raises(ValueError):
        store.read_columns(("poly_xy",))


# ---------------------------------------------------------------------- SlideRecord


def _record(tmp_path: Path, n_cells: int = 900, seed: int = 3) -> SlideRecord:
    from wsiflow.aggregate import summarize

    pipe = load_pipeline("mds")
    ids = np.random.default_rng(seed).integers(-1, len(pipe.taxonomy), n_cells)
    summary = summarize(ids, pipe, failed_tiles=1, failed_area_fraction=0.125, tiles_total=8)
    ident = {"path": str(tmp_path / "a.svs"), "name": "a.svs", "size_bytes": 10, "dimensions": [4000, 3000],
             "mpp": 0.25, "mpp_override": None, "vendor": "aperio", "objective_power": 40.0,
             "backend": "tiffslide"}  # fmt: skip
    return SlideRecord(
        name="a.svs",
        path=ident["path"],
        output=str(tmp_path / "out" / "a"),
        status=summary.status,
        error=summary.error,
        identity=ident,
        pipeline=pipe.name,
        models={"segmenter": {"name": "s", "sha256": "0" * 64, "demo": True}},
        tissue_fraction=0.5,
        tiles=TileCounts(12, 8, (3,)),
        summary=summary,
        wsiflow_version="0.1.0",
    )


def test_slide_record_round_trips_through_summary_json(tmp_path: Path) -> None:
    rec = _record(tmp_path)
    write_summary_json(tmp_path / "summary.json", rec.to_json())
    doc = json.loads((tmp_path / "summary.json").read_text())
    keys = ["wsiflow_version", "slide", "pipeline", "models", "tissue_fraction", "tiles", "summary"]
    assert list(doc) == keys and rec.summary is not None and doc["summary"] == rec.summary.to_dict()
    assert doc["tiles"] == {"grid": 12, "selected": 8, "failed": [3], "unreadable_source_tiles": {}}
    assert SlideRecord.from_json(doc, output=rec.output) == rec


def test_slide_record_loads_its_file_and_names_a_bad_one(tmp_path: Path) -> None:
    rec = _record(tmp_path)
    folder = Path(rec.output)
    folder.mkdir(parents=True)
    write_summary_json(folder / "summary.json", rec.to_json())
    assert SlideRecord.load(folder / "summary.json") == rec  # output: the folder it was read from
    bad = tmp_path / "bad.json"
    for text, why in (
        ("[1, 2]", "expected a JSON object"),
        ('{"summary": 3}', "'summary' is not an object"),
        ('{"summary": {"pipeline": "mds"}}', "not a wsiflow summary.json"),
        ("{not json", "invalid JSON"),
    ):
        bad.write_text(text)
        with pytest.raises(OutputError, match=re.escape(f"{bad}: {why}")):
            SlideRecord.load(bad)


def test_slide_record_round_trips_through_summary_csv(tmp_path: Path) -> None:
    rec = _record(tmp_path)
    bad = SlideRecord(name="b.svs", path="/x/b.svs", output="", status="error", error="b.svs: corrupt")
    update_summary_csv(tmp_path / "summary.csv", rec.to_row())
    update_summary_csv(tmp_path / "summary.csv", bad.to_row())
    cols, raw = read_summary_csv(tmp_path / "summary.csv")
    got, err = (SummaryRow.from_csv(r, cols) for r in raw)
    s = rec.summary
    assert s is not None and (got.slide, got.path, got.output) == (rec.name, rec.path, rec.output)
    assert (got.status, got.n_cells, got.megakaryocytes) == (s.status, s.n_cells, s.megakaryocytes)
    assert got.failed_tiles == 1
    assert got.adequate_cells is s.adequate_cells and got.pipeline == "mds"
    assert set(got.lineages) == {lin.lineage for lin in s.lineages}
    for lin in s.lineages:
        c = got.lineages[lin.lineage]
        assert c.flag == lin.flag and c.value == pytest.approx(100 * lin.fraction, abs=1e-4)
    assert s.blast is not None and got.blast_pct == pytest.approx(100 * s.blast.fraction, abs=1e-4)
    assert got.blast_band == s.blast.band
    assert got.class_counts == {c.code: c.count for c in s.classes}
    assert (err.status, err.error, err.n_cells) == ("error", bad.error, None)
    assert err.lineages["erythroid"].value is None

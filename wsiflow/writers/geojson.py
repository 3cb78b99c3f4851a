"""QuPath (≥ 0.4) GeoJSON of cells: ``cells.geojson.gz``, streamed, vectorised, atomic.

Each cell becomes one Feature, as QuPath's own reader expects (``PathObjectTypeAdapters``):

    {"type": "Feature", "id": "<UUID>",
     "geometry": {"type": "Polygon", "coordinates": [[[x, y], …, [x0, y0]]]},   # closed, level-0 px
     "properties": {"objectType": "detection",
                    "classification": {"name": "<class name>", "color": [r, g, b]},
                    "measurements": {"Area µm^2": …, "Perimeter µm": …, "Circularity": …,
                                     "Confidence": …, "Seg score": …, "P(<code>)": …}}}

Speed: a million dicts are never built, and no float is formatted by Python. Vertices are
written with fixed precision (``COORD_DECIMALS`` = 2 decimals of a level-0 pixel, trailing
zeros dropped: ``1234.5``, ``-0.07``, ``88``) by integer arithmetic in numpy: each vertex
becomes three 64-bit words of ASCII (``[``, sign, digits, ``.``, ``,`` …) with the unused
bytes zero, and one ``bytes.translate`` deletes the zeros. Measurements are float32 and keep
their shortest round-trip text (orjson's numpy path). The per-cell pieces are glued into a
template. The output is one text per chunk of cells; with a ``.gz`` path it is gzip, one
member per chunk, compressed by libdeflate in two threads while the next chunk is
formatted; any other suffix writes plain GeoJSON.
UUIDs are deterministic version-8 UUIDs (RFC 9562): 60 bits of a hash of the slide
identity and the 62-bit cell id, so a cell keeps its id across runs and slides never
collide in practice; they are built for the whole chunk at once in numpy.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import cast

import numpy as np
import orjson
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from wsiflow.atomic import atomic_open
from wsiflow.cells import COLUMNS, CellTable, closing_index
from wsiflow.config import ClassDef
from wsiflow.types import UNCLASSIFIED_COLOR, UNCLASSIFIED_NAME

__all__ = ["cell_uuids", "measurement_names", "write_geojson"]

_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
_DASH_AT = (8, 12, 16, 20)
_OPEN = ord("[")
_SLOT = 16  # bytes per measurement value: float32 shortest text is at most 15
CHUNK_CELLS = 4096  # cells formatted per numpy pass (their temporaries stay in cache)


def _uuid_chars(slide_id: str, ids: NDArray[np.int64]) -> NDArray[np.uint8]:
    """(n, 36) ASCII of the deterministic UUIDs of cell ids of one slide."""
    ids = np.asarray(ids, np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError("cell ids must be non-negative")
    n = len(ids)
    raw = np.empty((n, 16), np.uint8)
    raw[:, :8] = np.frombuffer(hashlib.sha256(slide_id.encode("utf-8")).digest()[:8], np.uint8)
    raw[:, 8:] = ids.astype(">u8").view(np.uint8).reshape(n, 8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x80  # version 8
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122/9562 variant (top bits of the id are 0)
    hexed = np.empty((n, 32), np.uint8)
    hexed[:, 0::2] = _HEX[raw >> 4]
    hexed[:, 1::2] = _HEX[raw & 0x0F]
    out = np.full((n, 36), ord("-"), np.uint8)
    src = 0
    dst = 0
    for cut in (*_DASH_AT, 32):
        out[:, dst : dst + cut - src] = hexed[:, src:cut]
        dst += cut - src + 1
        src = cut
    return out


def cell_uuids(slide_id: str, ids: NDArray[np.int64]) -> list[bytes]:
    """Deterministic UUID strings (as ASCII bytes) for cell ids of one slide."""
    buf = _uuid_chars(slide_id, ids).tobytes()
    return [buf[i * 36 : i * 36 + 36] for i in range(len(ids))]


def measurement_names(taxonomy: Sequence[ClassDef]) -> list[str]:
    names = ["Area µm^2", "Perimeter µm", "Circularity", "Seg score"]
    if taxonomy:
        names.append("Confidence")
        names += [f"P({c.code})" for c in taxonomy]
    return names


def _row_starts(buf: bytes, n_rows: int) -> NDArray[np.int64]:
    """Offsets of the '[' opening each row of orjson's dump of a 2-D array, plus len(buf)."""
    opens = np.flatnonzero(np.frombuffer(buf, np.uint8) == _OPEN)[1:]
    if len(opens) != n_rows:
        raise AssertionError("unexpected '[' in a numeric dump")
    return np.append(opens, len(buf)).astype(np.int64)


def _open_rings(table: CellTable) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Vertices and offsets of the rings to write (open: first vertex not repeated).

    A cell with fewer than 3 vertices (never produced by the segmenter) is written as its
    bounding box so QuPath still reads a valid polygon.
    """
    offsets = table.poly_offsets
    counts = np.diff(offsets)
    if not (counts < 3).any():
        return table.poly_xy, offsets
    parts = []
    for i in range(len(table)):
        if counts[i] >= 3:
            parts.append(table.polygon(i))
        else:
            x0, y0, x1, y1 = table.bbox[i]
            parts.append(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32))
    counts = np.array([len(p) for p in parts], np.int64)
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return np.concatenate(parts).astype(np.float32), offsets


def _closed_rings(table: CellTable) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Vertices with each ring closed (first vertex repeated), and the new offsets."""
    xy, offsets = _open_rings(table)
    index, _ = closing_index(offsets)
    return xy[index], offsets + np.arange(len(offsets), dtype=np.int64)


# ---------------------------------------------------------------- fixed-precision vertices
# A coordinate v is written as round(|v|·100) = 8 decimal digits d0…d7 (|v| < 10⁶ px):
# sign, d0…d5 without leading zeros (d5 always), then "." d6 d7 without trailing zeros.
# Digits are computed 8 at a time in one uint64 ("SWAR": 4+4, then 2+2, then 1+1 digits per
# lane by multiply-shift division), byte k of the word holding the ASCII of d_k.
_U = np.uint64
_BLOCK = 16384  # vertices per numpy pass: the temporaries stay in the CPU cache
_COORD_LIMIT = 999_999.99
_ASCII_ZEROS = _U(0x3030303030303030)
_INT_BYTES = _U(0x0000FFFFFFFFFFFF)  # d0…d5
_SIX = _U(0xFFFFFF)
_UNITS_BIT = _U(1 << 40)  # a set bit in d5's byte: the units digit is always written


def _fraction_tables() -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    """By d6 + 256·d7: the mask keeping d6, d7 without trailing zeros, and the "." (or 0)."""
    keep = np.zeros(256 * 9 + 10, np.uint64)
    dot = np.zeros_like(keep)
    for d6 in range(10):
        for d7 in range(10):
            i = d6 + 256 * d7
            keep[i] = (0xFFFF << 48) if d7 else (0xFF << 48) if d6 else 0
            dot[i] = ord(".") if d6 or d7 else 0
    return keep, dot


_FRAC_KEEP, _FRAC_DOT = _fraction_tables()
_C_OPEN, _C_COMMA, _C_CLOSE, _C_MINUS = (_U(ord(c)) for c in "[,]-")
COORD_DECIMALS = 2


def _digits8(a: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """The 8 decimal digits (values 0…9) of each a < 10⁸, most significant digit in byte 0."""
    hi = a // _U(10000)
    x = hi | ((a - hi * _U(10000)) << _U(32))
    h = ((x * _U(5243)) >> _U(19)) & _U(0x0000007F0000007F)  # x // 100 in each 32-bit lane
    x = h | ((x - h * _U(100)) << _U(16))
    h = ((x * _U(103)) >> _U(10)) & _U(0x000F000F000F000F)  # x // 10 in each 16-bit lane
    return cast(NDArray[np.uint64], h | ((x - h * _U(10)) << _U(8)))


def _fixed(v: NDArray[np.float64]) -> tuple[NDArray[np.uint64], NDArray[np.uint64], NDArray[np.uint64]]:
    """(ASCII digit word with unused bytes 0, sign byte, dot byte) of each |v| < 10⁶."""
    q = np.rint(v * 100.0)
    x = _digits8(np.abs(q).astype(np.uint64))
    # leading zeros = the bytes below the lowest set bit (d5's byte always has one here)
    y = x | _UNITS_BIT
    lead = (y & (~y + _U(1))) - _U(1)
    frac = x >> _U(48)
    word = (x + _ASCII_ZEROS) & ~lead & (_INT_BYTES | _FRAC_KEEP[frac])
    sign = (q < 0).astype(np.uint64) * _C_MINUS
    return word, sign, _FRAC_DOT[frac]


def _vertex_words(xy: NDArray[np.float32]) -> NDArray[np.uint64]:
    """'[x,y],' of each vertex as 24 ASCII bytes (3 words; unused bytes 0)."""
    m = len(xy)
    words = np.empty((m, 3), np.uint64)
    for s in range(0, m, _BLOCK):
        e = min(m, s + _BLOCK)
        dx, sx, px = _fixed(xy[s:e, 0].astype(np.float64))
        dy, sy, py = _fixed(xy[s:e, 1].astype(np.float64))
        # "[" sx x0..x5 | "." x6 x7 "," sy y0..y2 | y3..y5 "." y6 y7 "]" ","
        words[s:e, 0] = _C_OPEN | (sx << _U(8)) | (dx << _U(16))
        words[s:e, 1] = (
            px | ((dx >> _U(48)) << _U(8)) | (_C_COMMA << _U(24)) | (sy << _U(32)) | ((dy & _SIX) << _U(40))
        )
        words[s:e, 2] = (
            ((dy >> _U(24)) & _SIX)
            | (py << _U(24))
            | ((dy >> _U(48)) << _U(32))
            | (_C_CLOSE << _U(48))
            | (_C_COMMA << _U(56))
        )
    return words


def _ring_words(offsets: NDArray[np.int64], xy: NDArray[np.float32]) -> NDArray[np.uint64] | None:
    """The closed rings as vertex words ((m + n) × 3), or None when a coordinate is not finite
    or |v| > 999999.99 (no slide is that large; orjson then writes those chunks)."""
    if not (len(xy) and np.isfinite(xy).all() and float(np.abs(xy).max()) <= _COORD_LIMIT):
        return None
    index, last = closing_index(offsets)
    words = _vertex_words(xy)[index]
    words[last, 2] &= _U(0x00FFFFFFFFFFFFFF)  # no "," after a ring's last vertex
    return words


def _text_rows(n: int, parts: Sequence[bytes | NDArray[np.uint8]]) -> tuple[NDArray[np.uint8], list[int]]:
    """An (n, 8·w) byte matrix of the parts side by side (constants or (n, k) byte matrices),
    zero-padded to whole 64-bit words, and the column where each part starts."""
    widths = [len(q) if isinstance(q, bytes) else q.shape[1] for q in parts]
    cols = np.concatenate([[0], np.cumsum(widths)]).astype(int).tolist()
    rows = np.zeros((n, -(-cols[-1] // 8) * 8), np.uint8)
    for q, c0, c1 in zip(parts, cols[:-1], cols[1:], strict=True):
        rows[:, c0:c1] = np.frombuffer(q, np.uint8) if isinstance(q, bytes) else q
    return rows, cols[:-1]


def _value_slots(meas: NDArray[np.float32]) -> NDArray[np.uint8]:
    """(n, m, w ≤ 16) zero-padded shortest texts of float32 values (orjson's numpy path)."""
    n, m = meas.shape
    u = np.frombuffer(orjson.dumps(meas, option=orjson.OPT_SERIALIZE_NUMPY), np.uint8)
    sep = np.flatnonzero((u == ord(",")) | (u == ord("[")) | (u == ord("]")))
    gap = np.diff(sep) - 1
    starts = sep[:-1][gap > 0] + 1
    lengths = gap[gap > 0]
    if len(starts) != n * m or (lengths > _SLOT).any():
        raise AssertionError("unexpected text in a numeric dump")
    width = int(lengths.max())
    slots = sliding_window_view(np.concatenate([u, np.zeros(width, np.uint8)]), width)[starts]
    slots *= np.arange(width) < lengths[:, None]
    return slots.reshape(n, m, width)


def _features(table: CellTable, taxonomy: Sequence[ClassDef], slide_id: str) -> bytes:
    """Comma-joined Feature objects for one chunk of cells."""
    n = len(table)
    if n == 0:
        return b""
    k = len(taxonomy)
    if table.n_classes != k:
        raise ValueError(f"table has {table.n_classes} class probabilities, taxonomy has {k} classes")

    # before the ring: ",\n" (not for the first cell), {"type":"Feature","id":"<uuid>",…[[
    sep = np.zeros((n, 2), np.uint8)
    sep[1:] = np.frombuffer(b",\n", np.uint8)
    head, _ = _text_rows(
        n,
        [
            sep,
            b'{"type":"Feature","id":"',
            _uuid_chars(slide_id, table.id),
            b'","geometry":{"type":"Polygon","coordinates":[[',
        ],
    )

    # after the ring: ]]},"properties":{…,"classification":…,"measurements":{…}}}
    cols = [table.area_um2, table.perimeter_um, table.circularity, table.seg_score]
    if k:
        cols.append(table.probs.max(axis=1))
        cols.extend(table.probs[:, j] for j in range(k))
    meas = np.stack(cols, axis=1).astype(np.float32)  # float32: the stored values, shortest repr
    present = np.isfinite(meas)  # JSON has no NaN/inf: leave those measurements out
    complete = bool(present.all())
    comma = present & (np.cumsum(present, axis=1) > present)  # a measurement written before it
    slots = _value_slots(meas)
    if not complete:
        slots *= present[:, :, None]
    classes = [
        b'"classification":' + orjson.dumps({"name": name, "color": list(color)}) + b","
        for name, color in [*((c.name, c.color) for c in taxonomy), (UNCLASSIFIED_NAME, UNCLASSIFIED_COLOR)]
    ]  # row k: class_id -1, a cell below classifier.min_confidence
    lut, _ = _text_rows(k + 1, [np.zeros((k + 1, max(map(len, classes), default=0)), np.uint8)])
    for j, c in enumerate(classes):
        lut[j, : len(c)] = np.frombuffer(c, np.uint8)
    cid = table.class_id.astype(np.int64)
    parts: list[bytes | NDArray[np.uint8]] = [
        b']]},"properties":{"objectType":"detection",',
        lut[np.where((cid >= 0) & (cid < k), cid, k)],
        b'"measurements":{',
    ]
    for j, name in enumerate(measurement_names(taxonomy)):
        key = orjson.dumps(name) + b":"
        if complete:
            parts += [(b"," if j else b"") + key, slots[:, j]]
        else:
            parts += [comma[:, j : j + 1] * np.uint8(ord(",")), key, slots[:, j]]
    parts.append(b"}}}")
    tail, tail_cols = _text_rows(n, parts)
    if not complete:
        for j in range(meas.shape[1]):  # blank the keys of left-out measurements
            key, c0 = cast(bytes, parts[3 + 3 * j + 1]), tail_cols[3 + 3 * j + 1]
            tail[:, c0 : c0 + len(key)] *= present[:, j : j + 1]

    xy, offsets = _open_rings(table)
    words = _ring_words(offsets, xy)
    if words is None:  # orjson's shortest text of the closed rings, glued per cell
        index, _ = closing_index(offsets)
        closed = xy[index]
        cbuf = orjson.dumps(closed, option=orjson.OPT_SERIALIZE_NUMPY)
        cstart = _row_starts(cbuf, len(closed))
        offs = offsets + np.arange(n + 1, dtype=np.int64)
        ring_a, ring_b = cstart[offs[:-1]].tolist(), (cstart[offs[1:]] - 1).tolist()
        h, t = head.tobytes(), tail.tobytes()
        wh, wt = head.shape[1], tail.shape[1]
        pieces = [
            h[i * wh : i * wh + wh] + cbuf[a:b] + t[i * wt : i * wt + wt]
            for i, (a, b) in enumerate(zip(ring_a, ring_b, strict=True))
        ]
        return b"".join(pieces).translate(None, b"\0")
    # one word stream: head i, ring i's vertex words, tail i, head i + 1, …; zero bytes deleted
    hw, tw = head.view(np.uint64), tail.view(np.uint64)
    a1, a2 = hw.shape[1], tw.shape[1]
    rows = np.diff(offsets) + 1  # closed vertices per cell
    cell_at = np.arange(n, dtype=np.int64) * (a1 + a2) + 3 * (offsets[:-1] + np.arange(n, dtype=np.int64))
    stream = np.empty(n * (a1 + a2) + 3 * len(words), np.uint64)
    stream[cell_at[:, None] + np.arange(a1)] = hw
    stream[(cell_at + a1 + 3 * rows)[:, None] + np.arange(a2)] = tw
    row_at = 3 * np.arange(len(words), dtype=np.int64) + np.repeat(
        np.arange(n, dtype=np.int64) * (a1 + a2) + a1, rows
    )
    stream[row_at[:, None] + np.arange(3)] = words
    return stream.tobytes().translate(None, b"\0")


def _rows(table: CellTable, start: int, stop: int) -> CellTable:
    """Rows start..stop of a table as views (no copies of the columns)."""
    if start == 0 and stop == len(table):
        return table
    offsets = table.poly_offsets[start : stop + 1]
    cols = {name: getattr(table, name)[start:stop] for name in COLUMNS}
    cols["poly_offsets"] = offsets - offsets[0]
    cols["poly_xy"] = table.poly_xy[offsets[0] : offsets[-1]]
    return CellTable(**cols)


def write_geojson(
    path_gz: str | os.PathLike[str],
    tables: Iterable[CellTable],
    taxonomy: Sequence[ClassDef],
    slide_id: str = "",
    *,
    compresslevel: int = 1,
    chunk_cells: int = CHUNK_CELLS,
    offset: Sequence[float] = (0.0, 0.0),
) -> int:
    """Stream cells into a FeatureCollection (temp file + rename); returns the count.

    A path ending in ``.gz`` is written gzip (``compresslevel``), any other plain.
    ``tables`` is consumed lazily (e.g. :meth:`CellStore.iter_tables`), so memory stays
    bounded by one chunk. ``slide_id`` seeds the feature UUIDs. ``offset`` (level-0 px) is
    subtracted from every vertex: the slide's bounds corner, so polygons land in the frame
    QuPath draws (its OpenSlide server crops to ``openslide.bounds-x/y``).
    """
    shift = np.asarray(offset, np.float64).reshape(2)
    path = Path(path_gz)
    count = 0
    compress = _compressor(compresslevel) if path.suffix.lower() == ".gz" else _plain
    # Each chunk becomes one gzip member (a .gz file may hold several; every gzip reader
    # concatenates them). Members are compressed in worker threads (the codecs release
    # the GIL) while the next chunk is formatted; at most a few chunks wait.
    with (
        atomic_open(path) as raw,
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="geojson-gzip") as pool,
    ):
        pending: deque[Future[bytes]] = deque()

        def put(data: bytes) -> None:
            while len(pending) >= 3:
                raw.write(pending.popleft().result())
            pending.append(pool.submit(compress, data))

        try:
            head = b'{"type":"FeatureCollection","features":[\n'
            for table in tables:
                for start in range(0, len(table), chunk_cells):
                    stop = min(start + chunk_cells, len(table))
                    part = _rows(table, start, stop)
                    if shift.any():
                        cols = part.columns()
                        cols["poly_xy"] = (part.poly_xy.astype(np.float64) - shift).astype(np.float32)
                        part = CellTable(**cols)
                    blob = _features(part, taxonomy, slide_id)
                    if not blob:
                        continue
                    put(head + blob)
                    head = b",\n"
                    count += len(part)
            put((b'{"type":"FeatureCollection","features":[' if count == 0 else b"") + b"\n]}\n")
            while pending:
                raw.write(pending.popleft().result())
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return count


def _plain(data: bytes) -> bytes:
    return data


def _compressor(level: int) -> Callable[[bytes], bytes]:
    """One-shot gzip member encoder: libdeflate (via imagecodecs) when present, else zlib."""
    try:
        import imagecodecs

        if imagecodecs.GZIP.available:
            return cast(Callable[[bytes], bytes], partial(imagecodecs.gzip_encode, level=level))
    except ImportError:  # pragma: no cover - imagecodecs is a dependency
        pass
    return partial(gzip.compress, compresslevel=level, mtime=0)

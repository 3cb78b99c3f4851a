"""QuPath (≥ 0.4) GeoJSON of cells: ``cells.geojson.gz``, streamed, vectorised, atomic.

Each cell becomes one Feature, as QuPath's own reader expects (``PathObjectTypeAdapters``):

    {"type": "Feature", "id": "<UUID>",
     "geometry": {"type": "Polygon", "coordinates": [[[x, y], …, [x0, y0]]]},   # closed, level-0 px
     "properties": {"objectType": "detection",
                    "classification": {"name": "<class name>", "color": [r, g, b]},
                    "measurements": {"Area µm^2": …, "Perimeter µm": …, "Circularity": …,
                                     "Confidence": …, "Seg score": …, "P(<code>)": …}}}

The file is gzip: one member per chunk of cells, compressed with libdeflate in two
threads. Speed: a million dicts are never built. For a chunk of cells, orjson serialises the whole
vertex array and the whole measurement matrix once (numpy fast path); the per-cell pieces
are cut out of those buffers at the ``[`` that opens every row, and glued into a template.
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
from numpy.typing import NDArray

from wsiflow.cells import CellTable
from wsiflow.config import ClassDef
from wsiflow.writers._atomic import atomic_open

__all__ = ["cell_uuids", "measurement_names", "write_geojson"]

_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
_DASH_AT = (8, 12, 16, 20)
_OPEN = ord("[")
CHUNK_CELLS = 32768


def cell_uuids(slide_id: str, ids: NDArray[np.int64]) -> list[bytes]:
    """Deterministic UUID strings (as ASCII bytes) for cell ids of one slide."""
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
    buf = out.tobytes()
    return [buf[i * 36 : i * 36 + 36] for i in range(n)]


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


def _closed_rings(table: CellTable) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Vertices with each ring closed (first vertex repeated), and the new offsets.

    A cell with fewer than 3 vertices (never produced by the segmenter) is written as its
    bounding box so QuPath still reads a valid polygon.
    """
    offsets = table.poly_offsets
    counts = np.diff(offsets)
    xy = table.poly_xy
    if (counts < 3).any():
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
        xy = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 2), np.float32)
    closed = np.insert(xy, offsets[1:], xy[offsets[:-1]], axis=0)
    new_offsets = offsets + np.arange(len(offsets), dtype=np.int64)
    return closed, new_offsets


def _classification(c: ClassDef) -> bytes:
    return b'"classification":' + orjson.dumps({"name": c.name, "color": list(c.color)}) + b","


def _features(table: CellTable, taxonomy: Sequence[ClassDef], slide_id: str) -> bytes:
    """Comma-joined Feature objects for one chunk of cells."""
    n = len(table)
    if n == 0:
        return b""
    k = len(taxonomy)
    if table.n_classes != k:
        raise ValueError(f"table has {table.n_classes} class probabilities, taxonomy has {k} classes")
    uuids = cell_uuids(slide_id, table.id)

    closed, offs = _closed_rings(table)
    cbuf = orjson.dumps(closed, option=orjson.OPT_SERIALIZE_NUMPY)
    cstart = _row_starts(cbuf, len(closed))

    cols = [table.area_um2, table.perimeter_um, table.circularity, table.seg_score]
    if k:
        cols.append(table.probs.max(axis=1))
        cols.extend(table.probs[:, j] for j in range(k))
    meas = np.stack(cols, axis=1).astype(np.float32)  # float32: the stored values, shortest repr
    m = meas.shape[1]
    values = orjson.dumps(meas.ravel(), option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")

    names = measurement_names(taxonomy)
    keys = [orjson.dumps(nm).replace(b"%", b"%%") for nm in names]
    measurements = b'"measurements":{' + b",".join(key + b":%s" for key in keys) + b"}}}"
    head = b'{"type":"Feature","id":"%s","geometry":{"type":"Polygon","coordinates":[[%s]]},'
    props = b'"properties":{"objectType":"detection",'
    templates = [head + props + _classification(c).replace(b"%", b"%%") + measurements for c in taxonomy]
    unclassified = head + props + measurements
    class_ids = table.class_id.tolist()
    ring_a = cstart[offs[:-1]].tolist()
    ring_b = (cstart[offs[1:]] - 1).tolist()
    out = [
        (templates[c] if 0 <= c < k else unclassified) % (u, cbuf[a:b], *values[i * m : i * m + m])
        for i, (c, u, a, b) in enumerate(zip(class_ids, uuids, ring_a, ring_b, strict=True))
    ]
    bad = np.flatnonzero(~np.isfinite(meas).all(axis=1))
    for i in bad.tolist():  # JSON has no NaN/inf: leave those measurements out
        pairs = {nm: float(v) for nm, v in zip(names, meas[i], strict=True) if np.isfinite(v)}
        cid = class_ids[i]
        cls = (
            b'"classification":'
            + orjson.dumps({"name": taxonomy[cid].name, "color": list(taxonomy[cid].color)})
            + b","
            if 0 <= cid < k
            else b""
        )
        out[i] = (
            (head % (uuids[i], cbuf[ring_a[i] : ring_b[i]]))
            + props
            + cls
            + b'"measurements":'
            + orjson.dumps(pairs)
            + b"}}"
        )
    return b",\n".join(out)


def write_geojson(
    path_gz: str | os.PathLike[str],
    tables: Iterable[CellTable],
    taxonomy: Sequence[ClassDef],
    slide_id: str = "",
    *,
    compresslevel: int = 1,
    chunk_cells: int = CHUNK_CELLS,
) -> int:
    """Stream cells into a gzipped FeatureCollection (temp file + rename); returns the count.

    ``tables`` is consumed lazily (e.g. :meth:`CellStore.iter_tables`), so memory stays
    bounded by one chunk. ``slide_id`` seeds the feature UUIDs.
    """
    path = Path(path_gz)
    count = 0
    compress = _compressor(compresslevel)
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
                    part = table if len(table) <= chunk_cells else table.take(np.arange(start, stop))
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


def _compressor(level: int) -> Callable[[bytes], bytes]:
    """One-shot gzip member encoder: libdeflate (via imagecodecs) when present, else zlib."""
    try:
        import imagecodecs

        if imagecodecs.GZIP.available:
            return cast(Callable[[bytes], bytes], partial(imagecodecs.gzip_encode, level=level))
    except ImportError:  # pragma: no cover - imagecodecs is a dependency
        pass
    return partial(gzip.compress, compresslevel=level, mtime=0)

"""Issue 6, the remaining kinds of input and output trouble, on generated fixtures:

* a Hamamatsu NDPI file (hand-built: NDPI's TIFF variant with 64-bit IFD links and the
  tags OpenSlide and tifffile key on) is read by both backends with its µm/px;
* an Aperio SVS with JPEG 2000 tiles (compression 33005) is read by both backends;
* a TIFF declaring zero width or height is refused with one clear line;
* an output folder that cannot take files (below a regular file, immutable, read-only
  mount) stops ``wsiflow run`` with one line, before any cluster starts;
* a full disk (a small tmpfs) stops ``wsiflow run`` with one line naming the output and
  "No space left on device", leaves no half-written file, and ``--resume`` completes;
* bounded client memory: thumbnails and the sorted cell stream do not grow with the
  slide, and the client holds no more tile results than tasks in flight.
"""

from __future__ import annotations

import contextlib
import gc
import io
import shutil
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import reference_image
from numpy.typing import NDArray
from PIL import Image

from wsiflow.cells import CellTable
from wsiflow.errors import OutputError, SlideError
from wsiflow.slide import open_slide
from wsiflow.slide.writer import write_pyramid_tiff
from wsiflow.writers.zarr_store import CellStore

BACKENDS = ("openslide", "tiffslide")


def wsiflow(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsiflow", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def mean_abs(a: NDArray[np.uint8], b: NDArray[np.uint8]) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --------------------------------------------------------------------------- NDPI


def _jpeg(img: NDArray[np.uint8]) -> bytes:
    buf = io.BytesIO()
    # NDPI levels are one JPEG each, with restart markers (OpenSlide tiles by them)
    Image.fromarray(img).save(buf, format="JPEG", quality=92, subsampling=0, restart_marker_blocks=8)
    return buf.getvalue()


def write_ndpi(path: Path, levels: list[NDArray[np.uint8]], mpp: float, lens: float = 20.0) -> Path:
    """A minimal Hamamatsu NDPI: classic little-endian TIFF whose IFDs link with 8-byte
    offsets and carry the high 32 bits of every tag value after the next-IFD link (all zero
    here). Each level is one JPEG strip; the last level is written as the macro image
    (SourceLens −1). Tags: Make/Model/Software, resolution in cm, 65420 (format flag),
    65421 (source lens), 65422–65424 (offsets from the slide centre)."""
    out = bytearray(b"II*\x00" + b"\x00" * 8)  # first-IFD offset: 4 low + 4 high bytes
    link = 4
    w0 = levels[0].shape[1]
    for i, arr in enumerate(levels):
        macro = i == len(levels) - 1 and len(levels) > 1
        h, w = arr.shape[:2]
        data = _jpeg(np.ascontiguousarray(arr))
        out += b"\x00" * (len(out) % 2)
        strip = len(out)
        out += data
        px_per_cm = 1e4 / (mpp * w0 / w)
        ascii_tags = {271: b"Hamamatsu\x00", 272: b"C13210\x00", 305: b"NDP.scan 3.2.4\x00"}
        tags: list[tuple[int, int, int, object]] = [
            (256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, b"\x08\x00\x08\x00\x08\x00"), (259, 3, 1, 7),
            (262, 3, 1, 6), (271, 2, 0, None), (272, 2, 0, None), (273, 4, 1, strip), (277, 3, 1, 3),
            (278, 4, 1, h), (279, 4, 1, len(data)), (282, 5, 1, None), (283, 5, 1, None), (296, 3, 1, 3),
            (305, 2, 0, None), (65420, 4, 1, 1), (65421, 11, 1, -1.0 if macro else lens),
            (65422, 9, 1, 0), (65423, 9, 1, 0), (65424, 9, 1, 0),
        ]  # fmt: skip
        out += b"\x00" * (len(out) % 2)
        ifd, n = len(out), len(tags)
        blob_at = ifd + 2 + 12 * n + 8 + 4 * n
        body, blob = bytearray(struct.pack("<H", n)), bytearray()
        for tag, typ, count, value in tags:
            if tag in ascii_tags:
                text = ascii_tags[tag]
                count, field = len(text), struct.pack("<I", blob_at + len(blob))
                blob += text + b"\x00" * (len(text) % 2)
            elif tag == 258:
                field = struct.pack("<I", blob_at + len(blob))
                blob += value  # type: ignore[operator]
            elif tag in (282, 283):
                field = struct.pack("<I", blob_at + len(blob))
                blob += struct.pack("<II", round(px_per_cm * 1000), 1000)
            elif typ == 3:
                field = struct.pack("<HH", value, 0)
            elif typ == 11:
                field = struct.pack("<f", value)
            elif typ == 9:
                field = struct.pack("<i", value)
            else:
                field = struct.pack("<I", value)
            body += struct.pack("<HHI", tag, typ, count) + field
        body += b"\x00" * (8 + 4 * n)  # next-IFD link (patched by the next level), high bits
        out[link : link + 4] = struct.pack("<I", ifd)
        link = ifd + 2 + 12 * n
        out += body + blob
    path.write_bytes(bytes(out))
    return path


@pytest.fixture(scope="module")
def ndpi(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, NDArray[np.uint8]]:
    ref = reference_image(1024, 768, seed=3)
    levels = [ref, np.ascontiguousarray(ref[::4, ::4]), np.ascontiguousarray(ref[::8, ::8])]
    return write_ndpi(tmp_path_factory.mktemp("ndpi") / "scan 1.ndpi", levels, mpp=0.25), ref


def test_ndpi_fixture_is_what_tifffile_calls_ndpi(ndpi) -> None:
    path, _ = ndpi
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ndpi and tf.pages[0].is_ndpi
        assert [s.name for s in tf.series] == ["Baseline", "Macro"]
        assert tf.pages[0].ndpi_tags["Magnification"] == 20.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_ndpi_is_read_with_its_mpp(ndpi, backend: str) -> None:
    path, ref = ndpi
    with open_slide(path, backend=backend) as s:
        assert s.vendor == "hamamatsu" and s.dimensions == (1024, 768)
        assert s.mpp == pytest.approx(0.25, rel=1e-3) and s.mpp_source == "metadata"
        assert s.objective_power == 20
        native = s.read(100, 200, 300, 200, 0.25)
        assert mean_abs(native, ref[200:400, 100:400]) < 2.5  # JPEG q92, no chroma subsampling
        half = s.read(0, 0, 512, 384, 0.5)
        assert mean_abs(half, np.asarray(Image.fromarray(ref).reduce(2))) < 3.0


def test_ndpi_info_row(ndpi) -> None:
    path, _ = ndpi
    r = wsiflow("info", path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    row = r.stdout.splitlines()[1]
    assert row.startswith("scan 1.ndpi ") and "hamamatsu" in row and "1024x768" in row
    assert " 0.25 " in row and "20x" in row and " yes " in row


# --------------------------------------------------------------------------- JPEG 2000 SVS


@pytest.fixture(scope="module")
def j2k_svs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, NDArray[np.uint8]]:
    ref = reference_image(1200, 900, seed=4)
    path = tmp_path_factory.mktemp("j2k") / "j2k.svs"
    write_pyramid_tiff(path, ref, mpp=0.25, app_mag=40, compression="jpeg2000", downsamples=(1, 4))
    return path, ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_jpeg2000_svs_is_read(j2k_svs, backend: str) -> None:
    path, ref = j2k_svs
    with tifffile.TiffFile(path) as tf:
        assert tf.series[0].kind == "svs"
        assert [int(p.compression) for p in tf.pages] == [33005, 7, 33005]  # thumbnail: JPEG
    with open_slide(path, backend=backend) as s:
        assert s.vendor == "aperio" and s.mpp == 0.25 and s.level_dimensions == ((1200, 900), (300, 225))
        got = s.read(100, 100, 400, 300, 0.25)
        want = ref[100:400, 100:500]
        assert mean_abs(got, want) < 1.0 and int(np.abs(got.astype(int) - want).max()) <= 16
        thumb = s.thumbnail(300)
        assert thumb.shape == (225, 300, 3) and mean_abs(thumb, s.read(0, 0, 300, 225, 1.0)) < 1.0


# --------------------------------------------------------------------------- zero size


def _zero_size_tiff(path: Path, tag: int, tiled: bool) -> Path:
    """A small valid RGB TIFF whose ImageWidth (256) or ImageLength (257) is patched to 0."""
    layout = {"tile": (256, 256)} if tiled else {"rowsperstrip": 64}
    tifffile.imwrite(path, reference_image(512, 384), photometric="rgb", compression="zlib",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **layout)  # fmt: skip
    with tifffile.TiffFile(path) as tf:
        t = tf.pages[0].tags[tag]
        offset, fmt = t.valueoffset, "<H" if t.dtype == 3 else "<I"
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(fmt, 0))
    return path


@pytest.mark.parametrize(("tag", "size"), [(256, "0×384"), (257, "512×0")])
@pytest.mark.parametrize("tiled", [True, False])
def test_zero_width_or_height_is_one_clear_error(tmp_path: Path, tag: int, size: str, tiled: bool) -> None:
    path = _zero_size_tiff(tmp_path / "zero.tiff", tag, tiled)
    for backend in ("auto", *BACKENDS):
        with pytest.raises(SlideError) as info:
            open_slide(path, backend=backend)
        assert str(info.value) == f"{path}: image has zero width or height ({size} px)", backend


def test_dicom_that_is_not_a_slide_says_so(tmp_path: Path) -> None:
    """A DICOM file (CT image SOP class) that OpenSlide's DICOM reader refuses."""

    def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        value += b"\0" * (len(value) % 2)
        return struct.pack("<HH2sH", group, elem, vr, len(value)) + value

    meta = element(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1")
    ct_image = b"1.2.840.10008.5.1.4.1.1.2"
    body = element(0x0008, 0x0016, b"UI", ct_image) + element(0x0008, 0x0060, b"CS", b"CT")
    path = tmp_path / "ct.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(meta)) + meta + body)
    for backend in ("auto", *BACKENDS):
        with pytest.raises(SlideError) as info:
            open_slide(path, backend=backend)
        if backend == "tiffslide":  # OpenSlide was not asked, so the message cannot blame it
            assert str(info.value) == (
                f"{path}: a DICOM file, which TiffSlide cannot read "
                "(OpenSlide reads DICOM whole-slide images)"
            )
        else:
            assert str(info.value) == f"{path}: a DICOM file, but not a whole-slide image OpenSlide can read"


# --------------------------------------------------------------------------- bounded memory


def _traced_peak(fn) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del result
    return peak


def test_thumbnail_memory_is_bounded_by_its_output(tmp_path: Path) -> None:
    """Drawing a thumbnail reads the slide in small chunks: the peak follows the output
    size, not the slide size (it used to hold ~16 M level pixels at once: ~200 MB)."""

    def region(x: int, y: int, w: int, h: int) -> NDArray[np.uint8]:
        yy, xx = np.mgrid[y : y + h, x : x + w]
        return np.stack([xx % 251, yy % 241, (xx + yy) % 239], axis=-1).astype(np.uint8)

    big = write_pyramid_tiff(tmp_path / "big.svs", region, size=(4096, 3072), mpp=0.25,
                             compression="zlib", downsamples=(1, 16))  # fmt: skip
    with open_slide(big, backend="tiffslide") as s:
        out_bytes = 1800 * 1350 * 3
        peak = _traced_peak(lambda: s.thumbnail(1800))
    assert peak < 3 * out_bytes + 16 * 2**20, f"thumbnail peak {peak / 2**20:.1f} MB"


def _store_with_cells(path: Path, n_tiles: int, per_tile: int, k: int = 4) -> CellStore:
    """A store of ``n_tiles × per_tile`` cells with 24-vertex polygons, tiles committed out of order."""
    rng = np.random.default_rng(0)
    store = CellStore.create(path, n_tiles=n_tiles, n_classes=k, buffer_rows=4096, flush_seconds=1e9)
    for t in rng.permutation(n_tiles):
        n, v = per_tile, 24
        x, y = rng.uniform(0, 1000, n), rng.uniform(0, 1000, n)
        ang = np.linspace(0, 2 * np.pi, v, endpoint=False)
        ring = np.stack([np.cos(ang), np.sin(ang)], 1) * 5
        poly = (ring[None] + np.stack([x, y], 1)[:, None]).reshape(-1, 2).astype(np.float32)
        probs = rng.dirichlet(np.ones(k), n).astype(np.float32)
        table = CellTable(
            id=(int(t) << 24) + rng.permutation(n).astype(np.int64), x=x, y=y,
            bbox=np.stack([x - 5, y - 5, x + 5, y + 5], 1), poly_offsets=np.arange(n + 1) * v, poly_xy=poly,
            area_um2=np.full(n, 78.0), perimeter_um=np.full(n, 31.0), circularity=np.full(n, 0.99),
            seg_score=rng.uniform(0.5, 1, n), class_id=probs.argmax(1).astype(np.int16), probs=probs,
            tile=np.full(n, t, np.int32),
        )  # fmt: skip
        store.append(table, [int(t)])
    store.flush()
    return store


def test_sorted_stream_matches_the_table_and_stays_small(tmp_path: Path) -> None:
    store = _store_with_cells(tmp_path / "cells.zarr", n_tiles=64, per_tile=500)
    full = store.read_table().sorted()
    assert len(full) == 32000
    parts = list(store.iter_sorted(rows=2000))
    assert len(parts) == 16 and CellTable.concat(parts, n_classes=4).equals(full)
    assert np.array_equal(store.read_column("class_id"), store.read_table().class_id)
    whole = _traced_peak(lambda: store.read_table().sorted())

    def stream() -> int:
        return sum(len(t) for t in store.iter_sorted(rows=2000))

    streamed = _traced_peak(stream)
    assert streamed < 0.6 * whole, (streamed, whole)  # no whole table, no sorted copy


# --------------------------------------------------------------------------- outputs: unwritable, full


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``where`` (root with CAP_SYS_ADMIN); skips the test when not permitted."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _chattr(path: Path, flag: str) -> bool:
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("kind", ["below-a-file", "immutable-folder", "read-only-mount"])
def test_unwritable_output_folders_fail_before_any_work(tmp_path: Path, generated_slides, kind: str) -> None:
    """Each kind of unwritable folder is its own case, so one this machine cannot make
    (no ``chattr``, no permission to mount) shows as a skip with its reason."""
    from wsiflow.execution.runner import prepare_output

    with contextlib.ExitStack() as stack:
        if kind == "below-a-file":
            (tmp_path / "a-file").write_text("x")
            cases = {
                tmp_path / "a-file" / "out": "cannot create the output folder (Not a directory)",
                tmp_path / "a-file": "cannot create the output folder (a file of that name exists)",
            }
        elif kind == "immutable-folder":
            immutable = tmp_path / "immutable"
            immutable.mkdir()
            if not _chattr(immutable, "+i"):  # root ignores permission bits, not the immutable flag
                pytest.skip("cannot set the immutable flag here (chattr +i missing or not permitted)")
            stack.callback(_chattr, immutable, "-i")
            cases = {
                immutable: "output folder is not writable (Operation not permitted)",
                immutable / "sub": "cannot create the output folder (Operation not permitted)",
            }
        else:
            ro = stack.enter_context(tmpfs(tmp_path / "ro", "ro,size=1m"))  # skips with its reason
            cases = {
                ro: "output folder is not writable (Read-only file system)",
                ro / "sub": "cannot create the output folder (Read-only file system)",
            }
        for out, why in cases.items():
            with pytest.raises(OutputError) as info:
                prepare_output(out)
            assert str(info.value) == f"{out}: {why}"
        # the CLI: one line, exit 1, no traceback, and no cluster was started
        out = next(iter(cases))
        r = wsiflow("run", generated_slides.svs_zlib, "-o", out, "--workers", "1", "--no-progress")
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.splitlines() == [f"wsiflow: error: {out}: {cases[out]}"], r.stderr


@pytest.mark.slow
def test_full_disk_stops_with_one_line_then_resume_completes(tmp_path: Path, standin_models) -> None:
    """``wsiflow run`` onto a 128 KiB tmpfs: the Zarr store fits, its first flush does not.
    One line naming the output and the cause, exit 1, no half-written final file; after
    the file system grows, ``--resume`` completes with every cell found once."""
    from standins import match_centres, standin_pipeline, write_pipeline_yaml, write_smear

    smear, centres = write_smear(tmp_path / "smear.svs")
    pipe = write_pipeline_yaml(tmp_path / "p.yaml", standin_pipeline(*standin_models))
    args = ["--pipeline", pipe, "--workers", "1", "--threads-per-worker", "1", "--no-progress",
            "--checkpoint-seconds", "0"]  # fmt: skip
    with tmpfs(tmp_path / "disk", "size=128k") as disk:
        out = disk / "out"
        r = wsiflow("run", smear, "-o", out, *args)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("wsiflow: error:")]
        assert len(errors) == 1, r.stderr
        assert f"{out}/smear/" in errors[0] and "No space left on device" in errors[0]
        assert "--resume" in errors[0]
        # nothing half-written: no temp files, no final file of an unfinished slide
        assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))
        assert not (out / "smear" / "summary.json").exists()
        assert not (out / "smear" / "cells.geojson.gz").exists()
        assert not CellStore.is_complete(out / "smear" / "cells.zarr")
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        r = wsiflow("run", smear, "-o", out, "--resume", *args)
        assert r.returncode == 0, r.stderr
        store = CellStore.open(out / "smear" / "cells.zarr", mode="r")
        assert store.complete
        table = store.read_table()
        assert match_centres(np.column_stack([table.x, table.y]), centres) == [1] * len(centres)
        assert (out / "smear" / "summary.json").is_file() and (out / "smear" / "cells.geojson.gz").is_file()


class _LiveTables:
    """Reporter counting the CellTables alive in the client each time tiles come back."""

    def __init__(self) -> None:
        self.most = 0
        self.calls = 0

    def run_started(self, n_slides: int) -> None:
        pass

    def slide_started(self, slide: str, total_tiles: int, done_tiles: int) -> None:
        pass

    def tiles_done(self, slide: str, n_tiles: int, n_cells: int) -> None:
        self.calls += 1
        live = sum(1 for o in gc.get_objects() if type(o) is CellTable)
        self.most = max(self.most, live)

    def slide_finished(self, result) -> None:
        pass

    def note(self, message: str) -> None:
        pass


@pytest.mark.slow
def test_client_holds_no_more_tile_results_than_tasks_in_flight(tmp_path: Path, standin_models) -> None:
    """48 one-tile tasks, at most 2 in flight: at every result the client holds at most 2
    CellTables (the result being stored, and at most one more), never the slide's."""
    from standins import standin_pipeline, write_pipeline_yaml, write_smear

    from wsiflow.config import load_pipeline
    from wsiflow.execution.cluster import ClusterOptions, connect
    from wsiflow.execution.runner import Runner, RunOptions
    from wsiflow.execution.worker import resolve_models

    smear, centres = write_smear(tmp_path / "smear.svs")
    yaml_path = write_pipeline_yaml(tmp_path / "p.yaml", standin_pipeline(*standin_models, tile_um=64.0))
    pipe = load_pipeline(yaml_path)
    refs, bundles = resolve_models(pipe, "cpu")
    opts = RunOptions(out=tmp_path / "out", batch_tiles=1, max_in_flight=2, flush_seconds=0.0, report=False)
    live = _LiveTables()
    with connect(ClusterOptions(n_workers=1, threads_per_worker=1, device="cpu")) as session:
        runner = Runner(session.client, pipe, refs, bundles, opts, live)
        [res] = runner.run([str(smear)])
    assert res.ok and res.n_cells == len(centres) and len(res.tiles_computed) == 48
    assert live.calls == 48 and runner.peak_in_flight == 2
    assert 1 <= live.most <= 2, live.most

"""The slide layer: metadata, µm/px reads, both backends, generated and real files, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import GeneratedSlides, reference_image
from PIL import Image

from wsiflow.errors import MppError, SlideError, SlideNotFound
from wsiflow.slide import Slide, open_slide
from wsiflow.slide._base import parse_mpp, to_rgb
from wsiflow.slide.writer import write_pyramid_tiff

BACKENDS = ("openslide", "tiffslide")


def box_downsample(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape[0] // f * f, a.shape[1] // f * f
    return a[:h, :w].reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3))


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# --- metadata ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_aperio_jpeg_metadata(generated_slides: GeneratedSlides, backend: str) -> None:
    with open_slide(generated_slides.svs_jpeg, backend=backend) as s:
        assert s.backend == backend
        assert s.format == "aperio" and s.vendor == "aperio"
        assert s.dimensions == (1200, 900)
        assert s.level_count == 3
        assert s.level_dimensions == ((1200, 900), (300, 225), (75, 56))
        assert s.level_downsamples[:2] == (1.0, 4.0)
        assert s.level_downsamples[2] == pytest.approx(16, rel=0.01)
        assert s.mpp == pytest.approx(0.25)
        assert s.mpp_source == "metadata"
        assert s.objective_power == 40
        assert "thumbnail" in s.associated_images
        assert isinstance(s.properties, dict) and all(isinstance(v, str) for v in s.properties.values())


def test_auto_prefers_openslide_and_prefer_switches(generated_slides: GeneratedSlides) -> None:
    assert open_slide(generated_slides.svs_zlib).backend == "openslide"
    assert open_slide(generated_slides.svs_zlib, prefer="tiffslide").backend == "tiffslide"


@pytest.mark.parametrize("backend", BACKENDS)
def test_generic_tiff_without_mpp(generated_slides: GeneratedSlides, backend: str) -> None:
    s = open_slide(generated_slides.generic, backend=backend)
    assert s.format == "generic-tiff" and s.vendor is None
    assert s.mpp is None and s.mpp_note is None
    assert s.level_downsamples == (1.0, 2.0, 4.0)
    with pytest.raises(MppError, match="pass --mpp"):
        s.read(0, 0, 10, 10, 0.5)
    # reads that need no mpp still work, and --mpp makes µm/px reads possible
    assert s.thumbnail(100).shape == (75, 100, 3)
    s2 = open_slide(generated_slides.generic, backend=backend, mpp=0.5)
    assert s2.mpp == 0.5 and s2.mpp_source == "override"
    assert np.array_equal(s2.read(10, 20, 30, 40, 0.5), generated_slides.ref[20:60, 10:40])


@pytest.mark.parametrize("backend", BACKENDS)
def test_resolution_tags_plausible_and_absurd(generated_slides: GeneratedSlides, backend: str) -> None:
    assert open_slide(generated_slides.generic_res, backend=backend).mpp == pytest.approx(0.5)
    s = open_slide(generated_slides.absurd_res, backend=backend)
    assert s.mpp is None
    assert s.mpp_note is not None and "352.8" in s.mpp_note
    with pytest.raises(MppError, match=r"implausible.*--mpp"):
        s.read_level0_scale(0.5)


def test_parse_mpp_and_override_bounds(generated_slides: GeneratedSlides) -> None:
    assert parse_mpp("0.499") == 0.499
    assert parse_mpp(None) is None and parse_mpp("") is None and parse_mpp("abc") is None
    assert parse_mpp("0") is None and parse_mpp("-1") is None and parse_mpp("10.5") is None
    assert parse_mpp("nan") is None and parse_mpp("inf") is None
    with pytest.raises(MppError, match="not plausible"):
        open_slide(generated_slides.generic, mpp=0)
    s = open_slide(generated_slides.svs_zlib, mpp=0.3)
    assert s.mpp == 0.3 and s.read_level0_scale(0.6) == pytest.approx(2.0)


# --- pixels -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_reads_match_reference_exactly(generated_slides: GeneratedSlides, backend: str) -> None:
    ref = generated_slides.ref
    s = open_slide(generated_slides.svs_zlib, backend=backend)
    assert np.array_equal(s.read(0, 0, 1200, 900, 0.5), ref)
    for x, y, w, h in [(0, 0, 17, 9), (333, 517, 256, 256), (1100, 800, 100, 100), (257, 3, 511, 300)]:
        out = s.read(x, y, w, h, 0.5)
        assert out.dtype == np.uint8 and out.shape == (h, w, 3)
        assert np.array_equal(out, ref[y : y + h, x : x + w]), (x, y, w, h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_at_05_and_10_mpp(generated_slides: GeneratedSlides, backend: str) -> None:
    """0.25 µm/px slide: 0.5 → 2× down (level 0), 1.0 → 4× down (level 1 exactly)."""
    ref = generated_slides.ref
    s = open_slide(generated_slides.svs_jpeg, backend=backend)
    a = s.read(0, 0, 600, 450, 0.5)
    b = s.read(0, 0, 300, 225, 1.0)
    assert a.shape == (450, 600, 3) and b.shape == (225, 300, 3)
    assert a.dtype == b.dtype == np.uint8
    assert s.best_level(2.0) == 0 and s.best_level(4.0) == 1 and s.best_level(100) == 2
    assert mean_abs(a, box_downsample(ref, 2)) < 3.0
    assert mean_abs(b, box_downsample(ref, 4)) < 3.0
    # finer than the slide: upsampled, still the right picture
    c = s.read(400, 300, 200, 200, 0.125)
    assert c.shape == (200, 200, 3)
    assert mean_abs(np.asarray(Image.fromarray(c).reduce(2)), ref[300:400, 400:500]) < 4.0
    # a float origin shifts by a fraction: close to its integer neighbour
    assert mean_abs(s.read(100.5, 100.25, 64, 64, 0.25), s.read(100, 100, 64, 64, 0.25)) < 8.0


def test_jpeg_close_to_reference_and_backends_identical(generated_slides: GeneratedSlides) -> None:
    ref = generated_slides.ref
    os_, ts = (open_slide(generated_slides.svs_jpeg, backend=b) for b in BACKENDS)
    a, b = os_.read(0, 0, 1200, 900, 0.25), ts.read(0, 0, 1200, 900, 0.25)
    assert np.array_equal(a, b)
    assert mean_abs(a, ref) < 3.0
    for mpp in (0.5, 1.0, 1.7):  # levels with integer downsamples (1, 4): identical
        assert np.array_equal(os_.read(50, 70, 128, 96, mpp), ts.read(50, 70, 128, 96, mpp)), mpp
    # level 2 is 75x56 (downsample 16 x 16.07): OpenSlide resamples sub-pixel, we stay aligned
    assert mean_abs(os_.read(50, 70, 128, 96, 4.0), ts.read(50, 70, 128, 96, 4.0)) < 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_edges_pad_white(generated_slides: GeneratedSlides, backend: str) -> None:
    ref = generated_slides.ref
    s = open_slide(generated_slides.svs_zlib, backend=backend)
    out = s.read(-10, -20, 50, 60, 0.5)
    assert (out[:20] == 255).all() and (out[:, :10] == 255).all()
    assert np.array_equal(out[20:, 10:], ref[:40, :40])
    out = s.read(1180, 880, 50, 40, 0.5)
    assert np.array_equal(out[:20, :20], ref[880:, 1180:])
    assert (out[20:] == 255).all() and (out[:, 20:] == 255).all()
    assert (s.read(5000, 5000, 30, 30, 0.5) == 255).all()
    assert (s.read(-500, 10, 30, 30, 2.0) == 255).all()
    # downsampled read straddling the edge: white outside, image inside
    out = s.read(-400, 0, 200, 100, 4.0)  # 8 level-0 px per output px
    assert (out[:, :50] == 255).all()  # level-0 x < 0
    assert mean_abs(out[:, 50:], box_downsample(ref[:800, :1200], 8)) < 1.0


def test_odd_downsample_levels(generated_slides: GeneratedSlides) -> None:
    ref = generated_slides.ref
    stored = tifffile.TiffFile(generated_slides.odd).series[0].levels[1].asarray()  # (360, 480, 3)
    slides = {b: open_slide(generated_slides.odd, backend=b) for b in BACKENDS}
    for s in slides.values():
        assert s.level_dimensions == ((1200, 900), (480, 360), (164, 123))
        assert s.level_downsamples[1] == 2.5
        assert s.level_downsamples[2] == pytest.approx(7.3, rel=0.01)
        assert s.best_level(2.4) == 0 and s.best_level(2.5) == 1 and s.best_level(7.0) == 1
        assert s.best_level(7.3) == 2
    # TiffSlide gives the stored level pixels exactly at level-pixel positions …
    ts = slides["tiffslide"]
    assert np.array_equal(ts.read(2.5 * 33, 2.5 * 21, 100, 80, 1.25), stored[21:101, 33:133])
    # … OpenSlide resamples at fractional positions; our geometry keeps both aligned
    os_ = slides["openslide"]
    for x, y in [(0, 0), (2.5 * 33, 2.5 * 21), (101, 203), (517.3, 250.9)]:
        a, b = os_.read(x, y, 100, 80, 1.25), ts.read(x, y, 100, 80, 1.25)
        assert mean_abs(a, b) < 3.0, (x, y)
    # and the level content is the reference, downsampled
    assert (
        mean_abs(
            ts.read(0, 0, 480, 360, 1.25),
            np.asarray(Image.fromarray(ref).resize((480, 360), Image.Resampling.BOX)),
        )
        < 1.0
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_thumbnail(generated_slides: GeneratedSlides, backend: str) -> None:
    s = open_slide(generated_slides.svs_jpeg, backend=backend)
    t = s.thumbnail(300)
    assert t.shape == (225, 300, 3) and t.dtype == np.uint8
    assert mean_abs(t, box_downsample(generated_slides.ref, 4)) < 3.0
    assert s.thumbnail(5000).shape == (900, 1200, 3)  # never upsampled


def test_to_rgb_composites_alpha_onto_white() -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = 100
    rgba[0, :, 3] = 0
    rgba[1, :, 3] = 255
    out = to_rgb(rgba)
    assert out.shape == (2, 3, 3)
    assert (out[0] == 255).all() and (out[1] == 100).all()
    rgba[1, 0, 3] = 128
    assert to_rgb(rgba)[1, 0, 0] == round((100 * 128 + 255 * 127) / 255)
    grey = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    assert np.array_equal(to_rgb(grey), np.repeat(grey, 3, axis=2))


def test_fsspec_url_goes_to_tiffslide(generated_slides: GeneratedSlides) -> None:
    import fsspec

    with fsspec.open("memory://wsiflow-test/zlib.svs", "wb") as fh:
        fh.write(generated_slides.svs_zlib.read_bytes())
    s = open_slide("memory://wsiflow-test/zlib.svs")
    assert s.backend == "tiffslide" and s.mpp == 0.5
    assert np.array_equal(s.read(10, 10, 64, 64, 0.5), generated_slides.ref[10:74, 10:74])
    with pytest.raises(SlideError, match="OpenSlide cannot read URLs"):
        open_slide("memory://wsiflow-test/zlib.svs", backend="openslide")


# --- writer -----------------------------------------------------------------------------------


def test_writer_streams_from_a_callable(tmp_path: Path) -> None:
    ref = reference_image(700, 530, seed=3)
    calls: list[tuple[int, int, int, int]] = []

    def region(x: int, y: int, w: int, h: int) -> np.ndarray:
        calls.append((x, y, w, h))
        assert w <= 256 and h <= 256  # never more than a tile at a time
        return ref[y : y + h, x : x + w]

    a = write_pyramid_tiff(tmp_path / "a.svs", ref, mpp=0.5, compression="zlib", downsamples=(1, 2, 4))
    b = write_pyramid_tiff(
        tmp_path / "b.svs", region, size=(700, 530), mpp=0.5, compression="zlib", downsamples=(1, 2, 4)
    )
    assert len(calls) == 3 * 3
    sa, sb = open_slide(a), open_slide(b)
    assert sa.level_dimensions == sb.level_dimensions == ((700, 530), (350, 265), (175, 132))
    for level_mpp in (0.5, 1.0, 2.0):
        assert np.array_equal(sa.read(0, 0, 100, 100, level_mpp), sb.read(0, 0, 100, 100, level_mpp))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.svs", "b.svs"]  # no temp leftovers


def test_writer_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_pyramid_tiff(tmp_path / "x.svs", np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError):
        write_pyramid_tiff(tmp_path / "x.svs", lambda x, y, w, h: np.zeros((h, w, 3), np.uint8))
    with pytest.raises(ValueError):
        write_pyramid_tiff(tmp_path / "x.svs", np.zeros((64, 64, 3), np.uint8), downsamples=(1, 4, 2))
    assert list(tmp_path.iterdir()) == []


# --- bad inputs (issue 6 item 1, the cheap ones) --------------------------------------------


def _corrupt_tile(src: Path, dst: Path, tile_index: int) -> None:
    data = bytearray(src.read_bytes())
    page = tifffile.TiffFile(src).pages[0]
    off = page.dataoffsets[tile_index]
    data[off + 2 : off + 6] = b"\xff\xdb\x00\x01"  # a DQT marker with a bogus length
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_tile_fails_that_read_only(
    generated_slides: GeneratedSlides, tmp_path: Path, backend: str
) -> None:
    path = tmp_path / "corrupt.svs"
    _corrupt_tile(generated_slides.svs_jpeg, path, tile_index=5)  # tiles are 256 px, 5 columns
    s = open_slide(path, backend=backend)
    good = s.read(0, 0, 64, 64, 0.25)
    with pytest.raises(SlideError, match=r"corrupt.svs: cannot read level 0 pixels"):
        s.read(10, 300, 64, 64, 0.25)  # inside tile (row 1, col 0)
    assert np.array_equal(s.read(0, 0, 64, 64, 0.25), good)  # the handle still works afterwards


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_corrupt_source_tile_costs_only_its_own_area(
    generated_slides: GeneratedSlides, tmp_path: Path, backend: str
) -> None:
    """A read spanning a corrupt 256-px tile reads around it: that tile is white and recorded
    (level, col, row) → level-0 box; every other pixel is what the intact file gives."""
    path = tmp_path / "corrupt.svs"
    _corrupt_tile(generated_slides.svs_jpeg, path, tile_index=5)  # row 1, col 0
    s = open_slide(path, backend=backend)
    intact = open_slide(generated_slides.svs_jpeg, backend=backend)
    x, y, w, h = 100, 200, 400, 400  # over tiles (0..1, 0..2): the corrupt one among them
    img, ref = s.read(x, y, w, h, s.mpp), intact.read(x, y, w, h, s.mpp)
    assert s.unreadable == {(0, 0, 1): (0.0, 256.0, 256.0, 512.0)}
    lost = np.zeros((h, w), bool)
    lost[256 - y : 512 - y, : 256 - x] = True
    assert (img[lost] == 255).all()
    assert np.array_equal(img[~lost], ref[~lost])
    s.unreadable.clear()
    assert np.array_equal(s.read(300, 0, 64, 64, s.mpp), intact.read(300, 0, 64, 64, s.mpp))
    assert s.unreadable == {}  # reads not touching it record nothing
    s.close()
    intact.close()


def _bad_files(d: Path, generated: GeneratedSlides) -> dict[str, tuple[Path, str]]:
    """name -> (path, expected message fragment)."""
    files: dict[str, tuple[Path, str]] = {}
    (d / "empty.svs").write_bytes(b"")
    files["empty"] = (d / "empty.svs", "empty file")
    (d / "text.svs").write_text("this is not a slide\n")
    files["text"] = (d / "text.svs", "a text file, not a whole-slide image")
    Image.fromarray(generated.ref[:64, :64]).save(d / "png.svs", format="PNG")
    files["png"] = (d / "png.svs", "a PNG image, not a whole-slide image")
    (d / "folder.svs").mkdir()
    files["dir"] = (d / "folder.svs", "is a directory")
    data = generated.svs_zlib.read_bytes()
    (d / "truncated.svs").write_bytes(data[: len(data) // 3])
    files["truncated"] = (d / "truncated.svs", "")
    tifffile.imwrite(d / "u16.tiff", np.zeros((256, 256, 3), np.uint16), tile=(256, 256), photometric="rgb")
    files["16-bit"] = (d / "u16.tiff", "not a brightfield RGB slide (16-bit samples)")
    tifffile.imwrite(
        d / "fluo.tiff", np.zeros((5, 256, 256), np.uint8), tile=(256, 256), photometric="minisblack"
    )
    files["fluorescence"] = (d / "fluo.tiff", "not a brightfield RGB slide")
    return files


def test_bad_inputs_give_one_slide_error(generated_slides: GeneratedSlides, tmp_path: Path) -> None:
    for name, (path, fragment) in _bad_files(tmp_path, generated_slides).items():
        for backend in ("auto", *BACKENDS):
            with pytest.raises(SlideError) as info:
                s = open_slide(path, backend=backend)
                s.thumbnail(64)
                s.read_scaled(0, 0, s.dimensions[0], s.dimensions[1], 1.0)
            msg = str(info.value)
            assert msg.startswith(f"{path}: ") and fragment in msg, (name, backend, msg)
            assert "\n" not in msg and len(msg) < 300, msg
    with pytest.raises(SlideNotFound, match="no such file") as missing:
        open_slide(tmp_path / "missing.svs")
    assert isinstance(missing.value, FileNotFoundError)


def test_greyscale_and_strip_tiffs_are_read(generated_slides: GeneratedSlides, tmp_path: Path) -> None:
    ref = generated_slides.ref
    grey = ref[..., 1]
    tifffile.imwrite(tmp_path / "grey.tiff", grey, tile=(256, 256), photometric="minisblack")
    s = open_slide(tmp_path / "grey.tiff", mpp=0.5)
    out = s.read(100, 100, 50, 40, 0.5)
    assert np.array_equal(out, np.repeat(grey[100:140, 100:150, None], 3, axis=2))
    tifffile.imwrite(tmp_path / "strips.tiff", ref, photometric="rgb", rowsperstrip=64)
    s = open_slide(tmp_path / "strips.tiff", mpp=0.5)
    assert s.backend == "tiffslide"  # OpenSlide refuses untiled TIFFs
    assert np.array_equal(s.read(300, 200, 80, 90, 0.5), ref[200:290, 300:380])


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_reads_from_threads(generated_slides: GeneratedSlides, backend: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    s = open_slide(generated_slides.svs_jpeg, backend=backend)
    boxes = [(37 * i % 900, 53 * i % 600, 300, 300, (0.25, 0.5, 1.0)[i % 3]) for i in range(24)]
    serial = [s.read(*b) for b in boxes]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda b: s.read(*b), boxes))
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel, strict=True))


def test_slide_is_a_context_manager(generated_slides: GeneratedSlides) -> None:
    with open_slide(generated_slides.generic) as s:
        assert isinstance(s, Slide)
        assert "generic.tiff" in repr(s)


# --- real files (../shared/data/slides) -------------------------------------------------------

GOOD = [
    "CMU-1-Small-Region.svs",
    "small.svs",
    "boxes.tiff",
    "boxes_0.dcm",
    "boxes_1.dcm",
    "sm_image.dcm",
    "yb10kx5k.zstd.tiff",
]
BROKEN = ["unreadable.svs", "unopenable.tiff", "broken.svs"]


@pytest.mark.shared_data
@pytest.mark.parametrize("name", GOOD)
def test_real_good_files_open_and_read(shared_data: Path, name: str) -> None:
    with open_slide(shared_data / "slides" / name) as s:
        w, h = s.dimensions
        out = s.read_scaled(w / 2 - 32, h / 2 - 32, 64, 64, 1.0)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        assert s.thumbnail(128).shape[2] == 3
        if name.endswith((".svs", ".dcm")):
            assert s.mpp == pytest.approx(0.499)
        else:  # generic TIFFs: resolution tags say ~353 µm/px, which is not a scan
            assert s.mpp is None and s.mpp_note


@pytest.mark.shared_data
def test_real_cmu1_backends_agree_pixel_for_pixel(shared_data: Path) -> None:
    path = shared_data / "slides" / "CMU-1-Small-Region.svs"
    os_, ts = (open_slide(path, backend=b) for b in BACKENDS)
    assert os_.dimensions == ts.dimensions == (2220, 2967)
    assert os_.mpp == ts.mpp == pytest.approx(0.499)
    assert np.array_equal(os_.read(0, 0, 2220, 2967, 0.499), ts.read(0, 0, 2220, 2967, 0.499))
    assert np.array_equal(os_.read(-30, 100.5, 300, 200, 1.0), ts.read(-30, 100.5, 300, 200, 1.0))


@pytest.mark.shared_data
def test_real_dicom_opens_through_openslide(shared_data: Path) -> None:
    s = open_slide(shared_data / "slides" / "sm_image.dcm")
    assert s.backend == "openslide" and s.format == "dicom"
    with pytest.raises(SlideError, match="TiffSlide"):
        open_slide(shared_data / "slides" / "sm_image.dcm", backend="tiffslide")


@pytest.mark.shared_data
@pytest.mark.parametrize("name", BROKEN)
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_real_broken_files_raise_slide_error(shared_data: Path, name: str, backend: str) -> None:
    path = shared_data / "slides" / name
    with pytest.raises(SlideError) as info:
        s = open_slide(path, backend=backend)
        s.read_scaled(0, 0, 16, 16, 1.0)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_sparse_tile_reads_white_and_neighbours_intact(tmp_path: Path) -> None:
    """A tile with no data (byte count 0) is background: white, while the tiles around it decode."""
    tile = np.full((256, 256, 3), 40, np.uint8)
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(
        path,
        (None if i == 1 else tile for i in range(4)),  # tile (row 0, col 1) left out
        shape=(512, 512, 3),
        dtype=np.uint8,
        tile=(256, 256),
        photometric="rgb",
        compression="jpeg",
    )
    assert tifffile.TiffFile(path).pages[0].databytecounts[1] == 0
    with open_slide(path, backend="tiffslide", mpp=0.5) as s:
        out = s.read(0, 0, 512, 512, 0.5)
    assert (out[:256, 256:] == 255).all()
    for decoded in (out[:256, :256], out[256:]):
        assert np.abs(decoded.astype(int) - 40).max() <= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_leica_bounds_are_read_as_the_qupath_offset(tmp_path: Path, backend: str) -> None:
    """A generated Leica SCN whose main image sits at (300, 200) in its collection: level 0
    is the collection, the bounds corner is the offset QuPath's OpenSlide server crops to."""
    from standins import write_leica_scn

    img = np.full((700, 900, 3), 230, np.uint8)
    img[100:140, 200:260] = (120, 30, 90)
    s = open_slide(write_leica_scn(tmp_path / "b.scn", img), backend=backend)
    assert s.format == "leica" and s.dimensions == (1600, 1200) and s.mpp == 0.5
    assert s.bounds_offset == (300, 200)
    mark = s.read(300 + 200, 200 + 100, 60, 40, 0.5).reshape(-1, 3).mean(axis=0)
    assert np.abs(mark - (120, 30, 90)).max() < 6  # the image's (200, 100) is level-0 (500, 300)
    s.close()
    plain = open_slide(write_pyramid_tiff(tmp_path / "p.svs", img, mpp=0.5), backend=backend)
    assert plain.bounds_offset == (0, 0)
    plain.close()

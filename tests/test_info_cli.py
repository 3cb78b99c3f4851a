"""``wsiflow info``: a table (or JSON) for good slides, one stderr line per bad one, exit 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GeneratedSlides


def wsiflow(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsiflow", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_info_table_for_good_slides(generated_slides: GeneratedSlides) -> None:
    r = wsiflow("info", generated_slides.svs_jpeg, generated_slides.generic)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["SLIDE", "FORMAT", "SIZE", "LEVELS", "MPP"]
    jpeg = next(line for line in lines if line.startswith("jpeg.svs"))
    assert "aperio" in jpeg and "1200x900" in jpeg and "3 (1, 4, 16" in jpeg and "0.25" in jpeg
    assert "40x" in jpeg and " yes " in jpeg
    generic = next(line for line in lines if line.startswith("generic.tiff"))
    assert "generic-tiff" in generic and "none" in generic and " yes " in generic


def test_info_json_and_mpp_override(generated_slides: GeneratedSlides) -> None:
    r = wsiflow("info", "--json", "--mpp", "0.3", generated_slides.generic, generated_slides.svs_zlib)
    assert r.returncode == 0, r.stderr
    recs = json.loads(r.stdout)
    assert [Path(x["path"]).name for x in recs] == ["generic.tiff", "zlib.svs"]
    assert all(x["mpp"] == 0.3 and x["mpp_source"] == "override" and x["readable"] for x in recs)
    assert recs[1]["level_dimensions"] == [[1200, 900], [300, 225]]
    assert recs[1]["format"] == "aperio" and recs[1]["error"] is None


def test_info_bad_inputs_one_line_each(generated_slides: GeneratedSlides, tmp_path: Path) -> None:
    (tmp_path / "empty.svs").write_bytes(b"")
    (tmp_path / "text.svs").write_text("hello\n")
    (tmp_path / "a dir").mkdir()
    bad = [tmp_path / "empty.svs", tmp_path / "text.svs", tmp_path / "a dir", tmp_path / "missing ü.svs"]
    r = wsiflow("info", bad[0], generated_slides.svs_zlib, *bad[1:])
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    err = r.stderr.splitlines()
    assert err == [
        f"wsiflow: {bad[0]}: empty file (0 bytes)",
        f"wsiflow: {bad[1]}: a text file, not a whole-slide image",
        f"wsiflow: {bad[2]}: is a directory, not a slide file",
        f"wsiflow: {bad[3]}: no such file",
    ]
    assert "zlib.svs" in r.stdout  # the good slide still prints
    r = wsiflow("info", "--json", *bad)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 4
    assert [x["readable"] for x in json.loads(r.stdout)] == [False] * 4


def test_info_unreadable_pixels(generated_slides: GeneratedSlides, tmp_path: Path) -> None:
    """A slide that opens but whose middle tile is corrupt: listed as not readable, one line."""
    import tifffile

    data = bytearray(generated_slides.svs_jpeg.read_bytes())
    page = tifffile.TiffFile(generated_slides.svs_jpeg).pages[0]
    for i in range(len(page.dataoffsets)):  # every level-0 tile
        data[page.dataoffsets[i] + 2 : page.dataoffsets[i] + 6] = b"\xff\xdb\x00\x01"
    path = tmp_path / "corrupt.svs"
    path.write_bytes(bytes(data))
    for backend in ("openslide", "tiffslide"):
        r = wsiflow("info", "--backend", backend, path)
        assert r.returncode == 1
        assert "Traceback" not in r.stdout + r.stderr
        assert r.stderr.startswith(f"wsiflow: {path}: cannot read level 0 pixels")
        assert len(r.stderr.splitlines()) == 1, r.stderr
        assert " no " in r.stdout.splitlines()[1]


@pytest.mark.shared_data
def test_info_on_the_real_slides(shared_data: Path) -> None:
    slides = sorted((shared_data / "slides").iterdir())
    r = wsiflow("info", *slides)
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    err = r.stderr.splitlines()
    assert len(err) == 3
    for name in ("unreadable.svs", "unopenable.tiff", "broken.svs"):
        assert sum(line.startswith(f"wsiflow: {shared_data / 'slides' / name}: ") for line in err) == 1
    out = r.stdout
    for name, size in [
        ("CMU-1-Small-Region.svs", "2220x2967"),
        ("boxes.tiff", "300x250"),
        ("sm_image.dcm", "50x50"),
        ("yb10kx5k.zstd.tiff", "10000x5000"),
        ("small.svs", "16x16"),
        ("boxes_0.dcm", "16x16"),
    ]:
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert size in line and " yes " in line, line
    cmu = next(line for line in out.splitlines() if line.startswith("CMU-1"))
    assert "0.499" in cmu and "1 (1)" in cmu

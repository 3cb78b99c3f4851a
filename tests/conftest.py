"""Shared fixtures: the repo root, the shared real data, small generated slides.

Keep this file minimal and additive: several test modules depend on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_SHARED_DATA = "WSIFLOW_REQUIRE_SHARED_DATA"  # "1": missing shared data fails its tests
SHARED_DATA = "WSIFLOW_SHARED_DATA"  # another location of the shared data (default ../shared/data)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped where torch sees no CUDA device (torch is imported
    only when such a test was collected), unless ``WSIFLOW_CUDA_TEST_DEVICE=cpu`` asks for a
    dry run of their code on the CPU."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    if os.environ.get("WSIFLOW_CUDA_TEST_DEVICE") == "cpu":  # dry run of their code (tests/test_cuda.py)
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module that runs models in-process (on a shared 2-core machine
    more threads spin and run far slower); restored afterwards, with the pipeline's caches cleared."""
    import torch

    from wsiflow.execution.worker import clear_caches

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    clear_caches()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data``; the test is skipped when it is absent, and fails instead
    where it is expected (``WSIFLOW_REQUIRE_SHARED_DATA=1``, set by ``.ci/run``: CI always
    has it, so a missing copy must not turn its tests into silent skips)."""
    path = Path(os.environ.get(SHARED_DATA) or ROOT.parent / "shared" / "data")
    if not (path / "slides").is_dir():
        if os.environ.get(REQUIRE_SHARED_DATA, "") not in ("", "0"):
            pytest.fail(f"shared data not found at {path}, but {REQUIRE_SHARED_DATA} is set", pytrace=False)
        pytest.skip(f"shared data not found at {path}")
    return path


def reference_image(width: int, height: int, seed: int = 0) -> NDArray[np.uint8]:
    """A deterministic RGB test image: smooth gradients, sharp-edged shapes, a noisy patch."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 60 + 150 * xx / max(1, width - 1)
    img[..., 1] = 60 + 150 * yy / max(1, height - 1)
    img[..., 2] = 128 + 80 * np.sin(xx / 37.0) * np.cos(yy / 23.0)
    rng = np.random.default_rng(seed)
    for _ in range(12):  # "cells": dark discs
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, 60)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[disc] = rng.uniform(30, 200, 3)
    h4, w4 = height // 4, width // 4
    img[h4 : h4 + 40, w4 : w4 + 40] = rng.uniform(0, 255, (min(40, height - h4), min(40, width - w4), 3))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class GeneratedSlides:
    """Paths of the generated slide files and the reference array they were written from."""

    ref: NDArray[np.uint8]  # level 0 of every "good" file, (H, W, 3)
    svs_jpeg: Path  # Aperio layout, JPEG YCbCr 4:2:0, MPP 0.25, AppMag 40, downsamples 1/4/16
    svs_zlib: Path  # Aperio layout, lossless, MPP 0.5, downsamples 1/4
    odd: Path  # Aperio layout, lossless, MPP 0.5, downsamples 1/2.5/7.3 (non-integer)
    generic: Path  # generic tiled TIFF, lossless, no mpp, downsamples 1/2/4
    generic_res: Path  # generic tiled TIFF with resolution tags giving 0.5 µm/px
    absurd_res: Path  # generic tiled TIFF whose resolution tags give 352 µm/px
    dir: Path


@pytest.fixture(scope="session")
def generated_slides(tmp_path_factory: pytest.TempPathFactory) -> GeneratedSlides:
    from wsiflow.slide.writer import write_pyramid_tiff

    d = tmp_path_factory.mktemp("slides")
    ref = reference_image(1200, 900)
    w: Callable[..., Path] = write_pyramid_tiff
    return GeneratedSlides(
        ref=ref,
        svs_jpeg=w(d / "jpeg.svs", ref, mpp=0.25, app_mag=40, downsamples=(1, 4, 16)),
        svs_zlib=w(d / "zlib.svs", ref, mpp=0.5, app_mag=20, compression="zlib", downsamples=(1, 4)),
        odd=w(d / "odd.svs", ref, mpp=0.5, compression="zlib", downsamples=(1, 2.5, 7.3)),
        generic=w(d / "generic.tiff", ref, aperio=False, compression="zlib", downsamples=(1, 2, 4)),
        generic_res=w(d / "res.tiff", ref, mpp=0.5, aperio=False, compression="zlib", downsamples=(1, 2)),
        absurd_res=w(d / "absurd.tiff", ref, mpp=352.8, aperio=False, compression="zlib", downsamples=(1, 2)),
        dir=d,
    )


@pytest.fixture(scope="session")
def standin_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(segmenter, classifier) stand-in bundles for plumbing tests (see tests/standins.py)."""
    from standins import make_standin_models

    return make_standin_models(tmp_path_factory.mktemp("standin-models"))

"""wsiflow.heap: the client's glibc trim threshold (what Dask sets for its workers)."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from wsiflow import heap

GLIBC = sys.platform.startswith("linux") and ctypes.util.find_library("c") is not None


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_the_threshold_is_set_where_glibc_has_mallopt() -> None:
    assert heap.trim_freed_memory() is True
    assert heap.trim_freed_memory(heap.TRIM_THRESHOLD) is True  # idempotent


def test_no_glibc_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap.sys, "platform", "darwin")
    assert heap.trim_freed_memory() is False
    monkeypatch.setattr(heap.sys, "platform", "linux")
    monkeypatch.setattr(heap.ctypes.util, "find_library", lambda name: None)
    assert heap.trim_freed_memory() is False

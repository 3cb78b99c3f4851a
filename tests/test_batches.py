"""How the runner cuts a slide's tiles into batches (the run's last slide ends in one-tile
batches) and which batch goes out next (in the run's tail, the one with the most work)."""

from __future__ import annotations

from collections import deque
from pathlib import Path

from wsiflow.execution.runner import SlideResult, _Batch, _batches, _next_slide, _SlideRun, _tail_split
from wsiflow.tiling import TileGrid


def _tiles(n_cols: int, n_rows: int) -> list:
    grid = TileGrid(n_cols * 100, n_rows * 100, 1.0, 1.0, 100.0, 10.0, 10.0)
    return grid.tiles


def test_last_slide_ends_in_one_tile_batches_and_keeps_every_tile_once() -> None:
    tiles = _tiles(6, 5)  # 30 tiles
    batches = list(_tail_split(tiles, 4, 2))
    sizes = [len(b.tiles) for b in batches]
    assert sizes == [4] * 5 + [2] + [1] * 8  # 22 tiles in fours, then k·threads = 8 single tiles
    assert [t.id for b in batches for t in b.tiles] == [t.id for t in tiles]  # same order, once each
    # with one tile per batch already, or fewer tiles than the tail, nothing changes but the sizes
    assert [len(b.tiles) for b in _tail_split(tiles, 1, 2)] == [1] * 30
    assert [len(b.tiles) for b in _tail_split(tiles[:5], 4, 2)] == [1] * 5
    assert [len(b.tiles) for b in _batches(tiles, 4)] == [4] * 7 + [2]


def _slide(index: int, works: list[float]) -> _SlideRun:
    result = SlideResult(path=f"s{index}.svs", name=f"s{index}.svs", out_dir=Path("."), status="error")
    s = _SlideRun(index, result, Path("."))
    s.queue = deque(_Batch([], work=w) for w in works)
    return s


def test_batches_go_out_earliest_slide_first_then_largest_first_in_the_tail() -> None:
    a, b = _slide(0, [1.0, 5.0]), _slide(1, [9.0, 2.0, 7.0])
    assert _next_slide([a, b], largest_first=False) is a  # before the tail: input order
    assert [b.work for b in a.queue] == [1.0, 5.0]  # queues untouched
    order = []
    while (s := _next_slide([a, b], largest_first=True)) is not None:
        order.append((s.index, s.queue.popleft().work))
    # across both slides, the most work first; each slide's own batches are sorted once
    assert order == [(1, 9.0), (1, 7.0), (0, 5.0), (1, 2.0), (0, 1.0)]
    assert _next_slide([a, b], largest_first=True) is None
    # ties go to the earliest slide
    c, d = _slide(0, [3.0]), _slide(1, [3.0])
    assert _next_slide([c, d], largest_first=True) is c

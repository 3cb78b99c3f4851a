"""How the runner cuts a slide's tiles into batches: the run's last slide ends in one-tile batches."""

from __future__ import annotations

from wsiflow.execution.runner import _batches, _tail_split
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

"""Progress bars (tqdm, on stderr): the CLI is the only layer that draws them (DESIGN §4).

:class:`BarReporter` is the runner's progress sink for ``wsiflow run`` and ``wsiflow
demo`` (a bar per slide); :class:`EpochBar` draws the training commands' epochs.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

    from wsiflow.execution.runner import SlideResult

__all__ = ["BarReporter", "EpochBar"]


class BarReporter:
    """A tqdm bar per slide on stderr: tiles done / total, cells found, cells/s."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: tqdm[Any] | None = None
        self._cells = 0
        self._t0 = 0.0

    def slide_started(self, name: str, total_tiles: int, done_tiles: int) -> None:
        from tqdm import tqdm

        self._close()
        self._cells = 0
        self._t0 = time.perf_counter()
        self._bar = tqdm(
            total=total_tiles,
            initial=done_tiles,
            desc=name[:40],
            unit="tile",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not self.enabled,
            leave=True,
        )
        self._bar.set_postfix_str("cells=0")

    def tiles_done(self, n_tiles: int, n_cells: int) -> None:
        if self._bar is None:
            return
        self._cells += n_cells
        rate = self._cells / max(1e-6, time.perf_counter() - self._t0)
        self._bar.set_postfix_str(f"cells={self._cells} {rate:.1f} cells/s", refresh=False)
        self._bar.update(n_tiles)

    def slide_finished(self, result: SlideResult) -> None:
        self._close()

    def note(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"wsiflow: {message}", file=sys.stderr)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class EpochBar:
    """One tqdm bar per epoch of batches, showing the loss and the last validation metric."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.last: str = "-"
        self.epoch: int | None = None
        self.bar: Any = None

    def batch(self, info: dict[str, Any]) -> None:
        from tqdm import tqdm

        if self.bar is None or self.epoch != info["epoch"]:
            self.close()
            self.bar = tqdm(total=info["batches"], desc=f"epoch {info['epoch']}", unit="batch", leave=False)
            self.epoch = info["epoch"]
        self.bar.update(1)
        self.bar.set_postfix({"loss": f"{info['loss']:.4f}", self.metric: self.last})

    def epoch_done(self, value: float) -> None:
        self.close()
        self.last = f"{value:.4f}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

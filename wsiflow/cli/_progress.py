"""Progress bars (tqdm, on stderr): the CLI is the only layer that draws them (DESIGN §4).

:class:`BarReporter` is the runner's progress sink for ``wsiflow run`` and ``wsiflow
demo`` (the cohort and a bar per active slide); :class:`EpochBar` draws the training
commands' epochs.
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
    """On stderr: a cohort bar (slides done / total, cells found, cells/s since the run
    started) and a bar per active slide (tiles done / total, its cells, its cells/s).

    Slides overlap on the cluster, so several slide bars may be open at once; each closes
    when its slide is finished. The runner calls a reporter from one thread only (see
    :class:`wsiflow.execution.runner.Reporter`), so no locking is needed here.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._cohort: tqdm[Any] | None = None
        self._bars: dict[str, tqdm[Any]] = {}
        self._slide_cells: dict[str, int] = {}
        self._slide_t0: dict[str, float] = {}
        self._cells = 0
        self._t0 = time.perf_counter()

    def run_started(self, n_slides: int) -> None:
        from tqdm import tqdm

        self.close()
        self._cells = 0
        self._t0 = time.perf_counter()
        self._cohort = tqdm(
            total=n_slides,
            desc="slides",
            unit="slide",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not self.enabled,
            leave=True,
        )
        self._cohort.set_postfix_str("cells=0")

    def slide_started(self, slide: str, total_tiles: int, done_tiles: int) -> None:
        from tqdm import tqdm

        self._close_slide(slide)
        self._slide_cells[slide] = 0
        self._slide_t0[slide] = time.perf_counter()
        bar = tqdm(
            total=total_tiles,
            initial=done_tiles,
            desc=slide[:40],
            unit="tile",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not self.enabled,
            leave=False,
        )
        bar.set_postfix_str("cells=0")
        self._bars[slide] = bar

    def tiles_done(self, slide: str, n_tiles: int, n_cells: int) -> None:
        now = time.perf_counter()
        self._cells += n_cells
        if self._cohort is not None:
            rate = self._cells / max(1e-6, now - self._t0)
            self._cohort.set_postfix_str(f"cells={self._cells} {rate:.1f} cells/s")
        bar = self._bars.get(slide)
        if bar is None:
            return
        cells = self._slide_cells[slide] = self._slide_cells.get(slide, 0) + n_cells
        rate = cells / max(1e-6, now - self._slide_t0.get(slide, now))
        bar.set_postfix_str(f"cells={cells} {rate:.1f} cells/s", refresh=False)
        bar.update(n_tiles)

    def slide_finished(self, result: SlideResult) -> None:
        self._close_slide(result.label)
        if self._cohort is not None:
            self._cohort.update(1)

    def note(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"wsiflow: {message}", file=sys.stderr)

    def close(self) -> None:
        """Close every bar (the cohort bar stays on screen)."""
        for slide in list(self._bars):
            self._close_slide(slide)
        if self._cohort is not None:
            self._cohort.close()
            self._cohort = None

    def _close_slide(self, slide: str) -> None:
        bar = self._bars.pop(slide, None)
        self._slide_cells.pop(slide, None)
        self._slide_t0.pop(slide, None)
        if bar is not None:
            bar.close()


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

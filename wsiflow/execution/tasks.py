"""What a Dask task runs on a worker, and the error it sends back.

Kept in its own small module so spawned workers (and external ``dask worker`` processes)
import only this, :mod:`wsiflow.execution.worker` and :mod:`wsiflow.pipeline.batch`.
Errors cross the network as :class:`TaskError`, which pickles by value and says how far a failure reaches:

* ``run``: the models cannot be used on this worker (missing bundle, sha256 mismatch,
  no CUDA); nothing will succeed, the run stops;
* ``slide``: the worker cannot open the slide; the slide fails;
* ``tile``: one of the batch's tiles cannot be read or processed; the runner isolates it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from wsiflow.cells import CellTable
from wsiflow.config import Pipeline
from wsiflow.errors import ConfigError, ModelError, SlideError, WsiflowError
from wsiflow.execution.worker import ModelRefs, SlideRef, get_models, get_slide
from wsiflow.pipeline.batch import process_batch
from wsiflow.roi import Rois
from wsiflow.tiling import Tile

__all__ = ["BatchResult", "Scope", "TaskError", "batch_task"]

Scope = Literal["run", "slide", "tile"]


class TaskError(Exception):
    """A deliberate failure inside a task, with its scope; pickles by value."""

    def __init__(self, scope: Scope, message: str) -> None:
        super().__init__(scope, message)
        self.scope: Scope = scope
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type[TaskError], tuple[Scope, str]]:
        return (TaskError, (self.scope, self.message))


@dataclass
class BatchResult:
    """A batch's cells and the corrupt source tiles it read as white ("level/col/row" →
    level-0 box)."""

    table: CellTable
    unreadable: dict[str, list[float]] = field(default_factory=dict)
    cut_cells: dict[int, int] = field(default_factory=dict)  # tile id → owned cells the read edge cut


def batch_task(
    slide_ref: SlideRef,
    tiles: Sequence[Tile],
    pipeline: Pipeline,
    models: ModelRefs,
    rois: Rois | None = None,
) -> BatchResult:
    """:func:`wsiflow.pipeline.batch.process_batch` on the worker's cached slide and models,
    with its errors scoped for the runner."""
    try:
        loaded = get_models(models, pipeline)
    except (ModelError, ConfigError) as exc:
        raise TaskError("run", str(exc)) from None
    try:
        slide = get_slide(slide_ref)
    except WsiflowError as exc:
        raise TaskError("slide", str(exc)) from None
    unreadable: dict[str, list[float]] = {}
    cut_cells: dict[int, int] = {}
    try:
        table = process_batch(slide, tiles, pipeline, loaded, unreadable, rois, cut_cells)
    except SlideError as exc:
        raise TaskError("tile", exc.reason) from None
    except WsiflowError as exc:
        raise TaskError("tile", str(exc)) from None
    return BatchResult(table, unreadable, cut_cells)

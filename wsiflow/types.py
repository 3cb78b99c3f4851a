"""Small shared types."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

RGB: TypeAlias = tuple[int, int, int]

# Cells below the pipeline's classifier.min_confidence (class_id -1): their QuPath class.
UNCLASSIFIED_NAME = "Unclassified"
UNCLASSIFIED_COLOR: RGB = (200, 200, 200)


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned rectangle in level-0 pixel coordinates (x right, y down)."""

    x: float
    y: float
    w: float
    h: float

    @property
    def x1(self) -> float:
        return self.x + self.w

    @property
    def y1(self) -> float:
        return self.y + self.h

    def contains(self, px: float, py: float) -> bool:
        """Half-open containment: [x, x1) × [y, y1)."""
        return self.x <= px < self.x1 and self.y <= py < self.y1


class StorageOptions:
    """fsspec storage options for remote slides (``--storage-options``): they may hold
    credentials, so no value ever shows in ``repr``/``str`` (Dask logs a failed task's
    arguments, tracebacks print locals' reprs), only the option names. Hashable (slide
    caches key on it) and compared by value; pickles by value, because workers need the
    options to read pixels themselves."""

    __slots__ = ("_json",)

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self._json = json.dumps(dict(options or {}), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """A fresh copy of the options, to hand to fsspec."""
        out: dict[str, Any] = json.loads(self._json)
        return out

    def names(self) -> list[str]:
        return sorted(self.to_dict())

    def __bool__(self) -> bool:
        return self._json != "{}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorageOptions) and other._json == self._json

    def __hash__(self) -> int:
        return hash(self._json)

    def __repr__(self) -> str:
        return f"StorageOptions({', '.join(self.names())}; values hidden)"

    __str__ = __repr__

    def __reduce__(self) -> tuple[type[StorageOptions], tuple[dict[str, Any]]]:
        return (StorageOptions, (self.to_dict(),))

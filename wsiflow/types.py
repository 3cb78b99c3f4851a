"""Small shared types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

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

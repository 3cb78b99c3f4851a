"""One typed record per slide: ``summary.json`` and its row of ``summary.csv`` (DESIGN §5).

:class:`SlideRecord` is what a run knows about one slide: where it came from and went
(name, path, output folder), its status and error, the slide identity, the model bundles,
the tiles, and the :class:`~wsiflow.aggregate.SlideSummary`. It is written and read by the
same code:

* ``SlideRecord.to_json()`` is the ``summary.json`` document and
  ``SlideRecord.from_json()`` reads one back (``from_json(r.to_json()) == r``);
  ``SlideRecord.load(path)`` reads the file (a file that is not such a document is one
  :class:`~wsiflow.errors.OutputError` naming it);
* ``SlideRecord.to_row()`` is the flat ``summary.csv`` row: the column scheme lives here
  (base columns first, then :meth:`SlideSummary.to_row`); :class:`SummaryRow` reads such a
  row back from the file, typed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from wsiflow.aggregate import BlastStat, ClassStat, LineageStat, MERatio, SlideSummary
from wsiflow.atomic import read_json_object
from wsiflow.errors import OutputError

__all__ = [
    "SUMMARY_BASE_COLUMNS",
    "SlideRecord",
    "SummaryRow",
    "TileCounts",
    "summary_from_dict",
]

SUMMARY_BASE_COLUMNS: tuple[str, ...] = ("slide", "path", "output", "status", "error")
STATUS_ERROR = "error"
_ROW_COUNTS = ("n_cells", "n_nucleated", "n_counted", "n_unclassified")


def _known(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def summary_from_dict(d: Mapping[str, Any]) -> SlideSummary:
    """The inverse of :meth:`SlideSummary.to_dict` (derived keys such as a lineage's
    ``total`` are dropped)."""
    kw = _known(SlideSummary, d)
    kw["counts"] = {str(k): int(v) for k, v in (d.get("counts") or {}).items()}
    kw["classes"] = tuple(ClassStat(**_known(ClassStat, c)) for c in d.get("classes") or ())
    kw["lineages"] = tuple(LineageStat(**_known(LineageStat, x)) for x in d.get("lineages") or ())
    blast = d.get("blast")
    kw["blast"] = BlastStat(**_known(BlastStat, blast)) if isinstance(blast, Mapping) else None
    me = d.get("me_ratio")
    kw["me_ratio"] = MERatio(**_known(MERatio, me)) if isinstance(me, Mapping) else None
    kw["notes"] = tuple(str(n) for n in d.get("notes") or ())
    return SlideSummary(**kw)


@dataclass(frozen=True)
class TileCounts:
    grid: int  # tiles in the grid
    selected: int  # tiles with tissue (read)
    failed: tuple[int, ...] = ()  # ids of tiles that failed (excluded)
    # source tiles of the file that could not be decoded (read as white): level/col/row → box
    unreadable: Mapping[str, Sequence[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class SlideRecord:
    """Everything a run records about one slide; see the module docstring."""

    name: str
    path: str
    output: str = ""  # the slide's output folder ("" when it has none)
    status: str = STATUS_ERROR
    error: str | None = None
    identity: Mapping[str, Any] = field(default_factory=dict)  # Slide.identity()
    pipeline: str | None = None
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tissue_fraction: float | None = None
    tiles: TileCounts | None = None
    summary: SlideSummary | None = None
    wsiflow_version: str | None = None
    # ``--roi``: per region, its name, area (mm²), cells and summary (the slide's is their union)
    rois: tuple[Mapping[str, Any], ...] = ()

    # ------------------------------------------------------------------ summary.json
    def to_json(self) -> dict[str, Any]:
        """The ``summary.json`` document."""
        if self.summary is None or self.tiles is None:
            raise ValueError(f"{self.path}: a slide without a summary has no summary.json")
        return {
            "wsiflow_version": self.wsiflow_version,
            "slide": dict(self.identity),
            "pipeline": self.pipeline,
            "models": {k: dict(v) for k, v in self.models.items()},
            "tissue_fraction": self.tissue_fraction,
            "tiles": {
                "grid": self.tiles.grid,
                "selected": self.tiles.selected,
                "failed": list(self.tiles.failed),
                "unreadable_source_tiles": {k: list(v) for k, v in sorted(self.tiles.unreadable.items())},
            },
            "summary": self.summary.to_dict(),
            **({"rois": [dict(r) for r in self.rois]} if self.rois else {}),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], output: str = "") -> SlideRecord:
        """A record from a ``summary.json`` document (``output``: the folder it was read from)."""
        ident = dict(doc.get("slide") or {})
        s = doc.get("summary")
        summary = summary_from_dict(s) if isinstance(s, Mapping) else None
        t = doc.get("tiles") or {}
        tiles = TileCounts(
            int(t.get("grid") or 0),
            int(t.get("selected") or 0),
            tuple(int(i) for i in t.get("failed") or ()),
            {str(k): [float(x) for x in v] for k, v in (t.get("unreadable_source_tiles") or {}).items()},
        )
        return cls(
            name=str(ident.get("name") or ""),
            path=str(ident.get("path") or ""),
            output=output,
            status=summary.status if summary is not None else STATUS_ERROR,
            error=summary.error if summary is not None else None,
            identity=ident,
            pipeline=doc.get("pipeline"),
            models={str(k): dict(v) for k, v in (doc.get("models") or {}).items() if isinstance(v, Mapping)},
            tissue_fraction=doc.get("tissue_fraction"),
            tiles=tiles,
            summary=summary,
            wsiflow_version=doc.get("wsiflow_version"),
            rois=tuple(dict(r) for r in doc.get("rois") or () if isinstance(r, Mapping)),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SlideRecord:
        """The record of a ``summary.json`` file; ``output`` is the folder holding it."""
        p = Path(path)
        doc = read_json_object(p)
        if not isinstance(doc.get("summary"), Mapping):
            raise OutputError(f"{p}: 'summary' is not an object")
        try:
            return cls.from_json(doc, output=str(p.parent))
        except (TypeError, ValueError, AttributeError) as exc:
            raise OutputError(f"{p}: not a wsiflow summary.json ({exc})") from None

    # ------------------------------------------------------------------ summary.csv
    def to_row(self) -> dict[str, Any]:
        """The slide's ``summary.csv`` row: base columns, then the summary's columns."""
        row: dict[str, Any] = {"slide": self.name, "path": self.path, "output": self.output}
        if self.summary is not None:
            row.update(self.summary.to_row())
        row.setdefault("status", self.status)
        row.setdefault("error", self.error or "")
        return row


def _float(v: str | None) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass(frozen=True)
class LineageCells:
    value: float | None  # dysplastic %, of normal + dysplastic
    lo: float | None
    hi: float | None
    flag: str


@dataclass(frozen=True)
class SummaryRow:
    """One row of ``summary.csv`` read back, typed (percentages as in the file)."""

    slide: str
    path: str
    output: str
    status: str
    error: str
    pipeline: str
    n_cells: float | None
    megakaryocytes: float | None
    failed_tiles: float | None
    adequate_cells: bool | None
    adequate_megakaryocytes: bool | None
    blast_pct: float | None
    blast_band: str
    lineages: dict[str, LineageCells]
    class_counts: dict[str, float | None]

    @staticmethod
    def lineage_names(columns: list[str]) -> list[str]:
        """The lineages a table of these columns reports (from ``<lineage>_dysplastic_pct``)."""
        return [c[: -len("_dysplastic_pct")] for c in columns if c.endswith("_dysplastic_pct")]

    @staticmethod
    def class_codes(columns: list[str]) -> list[str]:
        """The classes counted in these columns (``n_<code>``)."""
        return [c[2:] for c in columns if c.startswith("n_") and c not in _ROW_COUNTS]

    @classmethod
    def from_csv(cls, r: Mapping[str, str], columns: list[str] | None = None) -> SummaryRow:
        cols = list(r) if columns is None else columns

        def flag(key: str) -> bool | None:
            v = r.get(key)
            return None if v not in ("true", "false") else v == "true"

        return cls(
            slide=r.get("slide", ""),
            path=r.get("path", ""),
            output=r.get("output", ""),
            status=r.get("status", ""),
            error=r.get("error", ""),
            pipeline=r.get("pipeline", ""),
            n_cells=_float(r.get("n_cells")),
            megakaryocytes=_float(r.get("megakaryocytes")),
            failed_tiles=_float(r.get("failed_tiles")),
            adequate_cells=flag("adequate_cells"),
            adequate_megakaryocytes=flag("adequate_megakaryocytes"),
            blast_pct=_float(r.get("blast_pct")),
            blast_band=r.get("blast_band", ""),
            lineages={
                lin: LineageCells(
                    _float(r.get(f"{lin}_dysplastic_pct")),
                    _float(r.get(f"{lin}_ci_low_pct")),
                    _float(r.get(f"{lin}_ci_high_pct")),
                    r.get(f"{lin}_flag", ""),
                )
                for lin in cls.lineage_names(cols)
            },
            class_counts={code: _float(r.get(f"n_{code}")) for code in cls.class_codes(cols)},
        )

"""Pipeline YAML → frozen, validated objects.

A pipeline names the taxonomy, the resolutions, tiling, tissue detection, the two model
bundles, the WHO thresholds, adequacy minimums and outputs (DESIGN §5 "Pipeline").
YAML is read with ``yaml.safe_load``; every error names the bad key, e.g.
``mds.yaml: tiling.halo_um: Input should be greater than 0``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from wsiflow.errors import ConfigError

PIPELINES_PACKAGE = "wsiflow.pipelines"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ClassDef(_Frozen):
    """One class of the taxonomy. ``lineage`` and ``dysplastic`` are optional per class."""

    code: str = Field(min_length=1)
    name: str = Field(min_length=1)
    lineage: str | None = None
    dysplastic: bool = False
    blast: bool = False
    nucleated: bool = True
    color: tuple[int, int, int]

    @field_validator("color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(c < 0 or c > 255 for c in v):
            raise ValueError("each colour channel must be within 0..255")
        return v


class Resolution(_Frozen):
    seg_mpp: float = Field(gt=0, le=10)
    cls_mpp: float = Field(gt=0, le=10)


class Tiling(_Frozen):
    tile_um: float = Field(gt=0)
    max_object_um: float = Field(gt=0, description="largest object's diameter, µm")
    halo_um: float = Field(gt=0)
    batch_tiles: int = Field(default=4, ge=1)

    @field_validator("halo_um")
    @classmethod
    def _halo_invariant(cls, v: float, info: ValidationInfo) -> float:
        # DESIGN §3: the halo exceeds the farthest a cell reaches from its centroid.
        biggest = info.data.get("max_object_um")
        if biggest is not None and v <= biggest / 2:
            raise ValueError(
                f"{v} µm must exceed half of tiling.max_object_um ({biggest} µm): "
                "a cell on a tile seam would otherwise be cut"
            )
        return v


class Tissue(_Frozen):
    thumbnail_mpp: float = Field(default=8.0, gt=0)
    method: Literal["saturation-od", "none"] = "saturation-od"
    min_saturation: float | None = Field(default=None, ge=0, le=1)
    min_od: float = Field(default=0.05, ge=0)
    min_tile_fraction: float = Field(default=0.01, ge=0, le=1)


class ModelRef(_Frozen):
    bundle: str = Field(min_length=1, description="bundle name shipped in wsiflow/weights, or a path")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class Cytoplasm(_Frozen):
    """Grow each instance into the pale basophilic cytoplasm next to it that the cell channel
    misses (plasma cells, erythroblasts: grey-blue, barely darker than the background). A pixel
    is such cytoplasm when its mean optical density (each channel against the image's
    background, the ``background_percentile`` of its non-padding pixels) is at least ``min_od``
    and the blue channel's share of that density is at most ``max_blue_fraction`` (blue cytoplasm
    passes blue light; red cells, pink or grey, absorb it); the growth floods from the instance
    through such pixels, at most ``max_um`` beyond its outline, never into another instance.
    ``background_um``: estimate the background locally instead, per square of about that side
    (the percentile over its non-padding pixels, blended between squares), so that light or
    stain varying across a read does not move the density of the glass far from it; None: one
    background for the whole image."""

    max_um: float = Field(default=3.0, gt=0)
    min_od: float = Field(default=0.05, gt=0)
    max_blue_fraction: float = Field(default=0.25, gt=0, lt=1)
    background_percentile: float = Field(default=95.0, gt=50, le=100)
    background_um: float | None = Field(default=None, gt=0)


class SegmenterSpec(ModelRef):
    threshold: float = Field(default=0.5, gt=0, lt=1)
    min_area_um2: float = Field(default=15.0, ge=0)
    max_area_um2: float = Field(default=12000.0, gt=0)
    min_distance_um: float = Field(default=3.0, gt=0)
    nucleus_split_um2: float | None = Field(default=None, gt=0)
    """Nucleus fragments that ``min_distance_um`` would join into one marker stay separate when
    two or more of them are at least this large (each a whole nucleus: the nuclei of two cells
    pressed together, not the lobes of one). None: joined by distance alone."""
    merge_solidity: float | None = Field(default=None, gt=0, le=1)
    """Touching instances whose union is at least this convex (area / convex-hull area) are
    one cell: a lobed nucleus (a bilobed eosinophil) gives two watershed markers inside one
    round cell. None: no merging."""
    simplify_um: float = Field(default=0.25, ge=0)
    cytoplasm: Cytoplasm | None = None
    """See :class:`Cytoplasm`; None: instances are the cell channel's only."""

    @model_validator(mode="after")
    def _areas(self) -> SegmenterSpec:
        if self.min_area_um2 >= self.max_area_um2:
            raise ValueError("min_area_um2 must be below max_area_um2")
        return self


class Crop(_Frozen):
    """How a cell is cropped for the classifier (see :mod:`wsiflow.classify`): ``bbox-square``
    keeps the neighbouring pixels in the square, ``bbox-zero-pad`` (the seed's rule, with
    ``pad_um: 0``) centres the bounding box on black."""

    rule: Literal["bbox-square", "bbox-zero-pad"] = "bbox-square"
    pad_um: float = Field(default=1.0, ge=0)


class ClassifierSpec(ModelRef):
    input_px: int = Field(ge=75)
    batch_size: int = Field(default=64, ge=1)
    crop: Crop = Crop()
    # Cells whose top (temperature-scaled) probability is below this are "Unclassified":
    # counted and shown, left out of lineage fractions, the blast % and the differential.
    min_confidence: float | None = Field(default=None, gt=0, lt=1)


class Who(_Frozen):
    dysplasia_threshold: float = Field(default=0.10, gt=0, lt=1)
    blast_bands: tuple[float, ...] = (0.05, 0.10, 0.20)
    confidence: float = Field(default=0.95, gt=0, lt=1)

    @field_validator("blast_bands")
    @classmethod
    def _increasing(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if list(v) != sorted(v) or any(b <= 0 or b >= 1 for b in v):
            raise ValueError("must be increasing fractions within (0, 1)")
        return v


class Adequacy(_Frozen):
    """How many cells a count and a call need (DESIGN §5 "SlideSummary").

    ``min_cells`` applies to the cells of the differential (``counting.denominator``): by
    default nucleated cells without megakaryocytes, ICSH's 500-cell count.
    """

    min_cells: int = Field(default=500, ge=0)
    min_megakaryocytes: int = Field(default=30, ge=0)
    megakaryocytic_lineage: str = "megakaryocytic"
    # WHO: ≥ 200 erythroid precursors and ≥ 200 granulocytic cells before judging ≥ 10 %
    # dysplasia (megakaryocytes: min_megakaryocytes); a lineage not listed needs one cell
    min_lineage_cells: dict[str, int] = Field(default_factory=lambda: {"erythroid": 200, "granulocytic": 200})
    # failed tiles covering more than this fraction of the counted area make the slide "partial"
    max_failed_area_fraction: float = Field(default=0.05, ge=0, le=1)

    @field_validator("min_lineage_cells")
    @classmethod
    def _non_negative(cls, v: dict[str, int]) -> dict[str, int]:
        bad = sorted(k for k, n in v.items() if n < 0)
        if bad:
            raise ValueError(f"minimums must be ≥ 0 ({', '.join(bad)})")
        return v

    def lineage_minimum(self, lineage: str) -> int:
        """Cells of ``lineage`` a dysplasia call needs."""
        if lineage == self.megakaryocytic_lineage:
            return self.min_megakaryocytes
        return self.min_lineage_cells.get(lineage, 0)


DENOMINATOR_RULES: dict[str, str] = {
    "nucleated-without-megakaryocytes": (
        "nucleated cells without megakaryocytes (platelets and other non-nucleated objects "
        "left out; megakaryocytes are assessed apart)"
    ),
    "nucleated": (
        "all nucleated cells, megakaryocytes included (platelets and other non-nucleated objects left out)"
    ),
}


class Counting(_Frozen):
    """The differential's denominator and the M:E ratio's lineages.

    ``denominator`` names the cells the differential percentages, the blast % and the
    ``adequacy.min_cells`` count are taken over (see :data:`DENOMINATOR_RULES`);
    megakaryocytes are the classes of ``adequacy.megakaryocytic_lineage``.
    ``me_ratio`` is (myeloid lineage, erythroid lineage), or null where an M:E ratio makes
    no sense (peripheral blood).
    """

    denominator: Literal["nucleated-without-megakaryocytes", "nucleated"] = "nucleated-without-megakaryocytes"
    me_ratio: tuple[str, str] | None = ("granulocytic", "erythroid")


class Outputs(_Frozen):
    zarr: bool = True
    geojson: bool = True
    geoparquet: bool = False


class Pipeline(_Frozen):
    name: str
    description: str = ""
    mode: Literal["dysplasia", "differential"] = "dysplasia"
    taxonomy: tuple[ClassDef, ...] = Field(min_length=2)
    resolution: Resolution
    tiling: Tiling
    tissue: Tissue = Tissue()
    segmenter: SegmenterSpec
    classifier: ClassifierSpec
    who: Who = Who()
    adequacy: Adequacy = Adequacy()
    counting: Counting = Counting()
    outputs: Outputs = Outputs()

    @field_validator("taxonomy")
    @classmethod
    def _unique_codes(cls, v: tuple[ClassDef, ...]) -> tuple[ClassDef, ...]:
        codes = [c.code for c in v]
        dup = sorted({c for c in codes if codes.count(c) > 1})
        if dup:
            raise ValueError(f"duplicate class codes {dup}")
        return v

    @property
    def class_codes(self) -> tuple[str, ...]:
        return tuple(c.code for c in self.taxonomy)

    @property
    def lineages(self) -> tuple[str, ...]:
        seen: list[str] = []
        for c in self.taxonomy:
            if c.lineage and c.lineage not in seen:
                seen.append(c.lineage)
        return tuple(seen)


def _format_loc(loc: tuple[Any, ...], data: Any) -> str:
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int) and isinstance(node, list) and 0 <= item < len(node):
            node = node[item]
            code = node.get("code") if isinstance(node, dict) else None
            parts[-1:] = [f"{parts[-1]}[{code or item}]"] if parts else [f"[{item}]"]
            continue
        parts.append(str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts)


def parse_pipeline(data: Any, source: str = "<pipeline>") -> Pipeline:
    """Validate a mapping into a frozen :class:`Pipeline`; errors name the bad key."""
    if not isinstance(data, dict):
        raise ConfigError(source, "", "the pipeline must be a YAML mapping")
    try:
        return Pipeline.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = _format_loc(tuple(err["loc"]), data)
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise ConfigError(source, key, msg + more) from None


def shipped_pipelines() -> dict[str, Path]:
    """Names → paths of the pipelines shipped inside the package."""
    root = resources.files(PIPELINES_PACKAGE)
    out: dict[str, Path] = {}
    for entry in root.iterdir():
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = Path(str(entry))
    return dict(sorted(out.items()))


def load_pipeline(name_or_path: str | Path) -> Pipeline:
    """Load a shipped pipeline by name (``mds``) or a YAML file by path."""
    text_path = Path(name_or_path)
    shipped = shipped_pipelines()
    if isinstance(name_or_path, str) and name_or_path in shipped:
        text_path = shipped[name_or_path]
    elif not text_path.suffix:
        known = ", ".join(shipped) or "none"
        raise ConfigError("", "--pipeline", f"unknown pipeline {str(name_or_path)!r} (shipped: {known})")
    source = text_path.name
    try:
        raw = text_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(text_path), "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(text_path), "", f"cannot read: {exc}") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(source, "", f"invalid YAML{where}") from None
    return parse_pipeline(data, source)

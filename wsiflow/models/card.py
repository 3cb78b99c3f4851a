"""The model card: the JSON beside each ``.safetensors`` file (DESIGN §5), typed.

:class:`CardContent` is what a trainer says about its weights (architecture and kwargs,
classes, input size, µm/px, normalisation, training data and licence, metrics, split,
calibration, …); :class:`ModelCard` adds what :func:`~wsiflow.models.bundle.save_bundle`
fills in when it writes the weights (format, sha256, storage dtype, time, version).

Fields only some cards have are optional, and keys no field names are kept as they are
(``extra="allow"``), so every card written so far loads unchanged and
``json.loads(card.to_json()) == json.loads(original)``: a field the file did not set is
not written back. Validation is strict (a string is not a number); a card that does not
validate is one :class:`~wsiflow.errors.ModelError` line naming the file and the field.
Torch-free, like bundle loading.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)

from wsiflow.atomic import read_json_object
from wsiflow.errors import ModelError

__all__ = ["FORMAT", "Calibration", "CardClass", "CardContent", "ModelCard", "Normalization"]

FORMAT = "wsiflow-bundle/1"
_JSON_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


class CardClass(_Part):
    """One output class (a taxonomy entry for a classifier, a channel for a segmenter)."""

    code: str
    name: str | None = None
    lineage: str | None = None
    dysplastic: bool | None = None
    blast: bool | None = None
    color: list[int] | None = None


class Normalization(_Part):
    """Per-channel mean and std of RGB/255 (the network sees ``(x - mean) / std``)."""

    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)


class Calibration(_Part):
    """Temperature scaling fitted on the validation split (``wsiflow calibrate``); the
    temperature's sign is checked where it is used (:attr:`ModelBundle.temperature`)."""

    temperature: float | None = None


class CardContent(_Part):
    """A card as a trainer writes it, before the weights file exists."""

    _order: tuple[str, ...] = PrivateAttr(default=())  # the top-level keys in the order given

    name: str
    task: Literal["classifier", "segmenter"]
    architecture: str
    kwargs: dict[str, Any]
    classes: list[CardClass] = Field(min_length=1)
    input_px: int | None = None
    mpp: float = Field(gt=0)
    source_mpp: float | None = None
    preprocessing: str | None = None
    normalization: Normalization
    training_data: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    calibration: Calibration | None = None
    crop: dict[str, Any] | None = None  # the crop rule the classifier was trained with
    split_seed: int | None = None
    split: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    demo: bool = False
    notes: str | None = None
    context_um: float | None = None  # a segmenter's measured border context (train.seg_context)
    context_tol: float | None = None
    context_measured: str | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        card = handler(data)
        if isinstance(data, Mapping) and isinstance(card, CardContent):
            card._order = tuple(str(k) for k in data)
        return card

    @property
    def class_codes(self) -> tuple[str, ...]:
        return tuple(c.code for c in self.classes)

    def to_dict(self) -> dict[str, Any]:
        """The card as a JSON object: the keys that were set, in the order they were given
        (a card read and written back keeps its layout), then any others."""
        d = self.model_dump(mode="python", exclude_unset=True)
        first = {k: d[k] for k in self._order if k in d}
        return first | d

    def to_json(self) -> bytes:
        """The card file's bytes (indented JSON and a newline)."""
        return orjson.dumps(self.to_dict(), option=_JSON_OPTIONS) + b"\n"

    @classmethod
    def parse(cls, doc: Any, source: str | Path) -> CardContent:
        """``doc`` validated; a card that does not fit is one :class:`ModelError` line."""
        if not isinstance(doc, Mapping):
            raise ModelError(f"{source}: the card must be a JSON object")
        try:
            return cls.model_validate(dict(doc))
        except ValidationError as exc:
            raise ModelError(f"{source}: {_first_error(exc)}") from None


class ModelCard(CardContent):
    """A card as it lies beside its weights (what :class:`ModelBundle` loads)."""

    format: Literal["wsiflow-bundle/1"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    storage_dtype: Literal["float16", "float32"] | None = None
    created: str | None = None
    wsiflow_version: str | None = None

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """The card file at ``path``, validated."""
        p = Path(path)
        card = cls.parse(read_json_object(p, ModelError), p)
        assert isinstance(card, ModelCard)
        return card


def _first_error(exc: ValidationError) -> str:
    """``card lacks sha256`` / ``card field mpp: Input should be a valid number (got 'x')``,
    plus how many more problems there are."""
    errors = exc.errors()
    e = errors[0]
    where = ".".join(str(p) for p in e["loc"])
    if e["type"] == "missing":
        missing = [".".join(str(p) for p in x["loc"]) for x in errors if x["type"] == "missing"]
        text = f"card lacks {', '.join(missing)}"
        rest = len(errors) - len(missing)
    else:
        text = f"card field {where}: {e['msg']} (got {e.get('input')!r:.60})"
        rest = len(errors) - 1
    return text + (f" (and {rest} more problem{'s' if rest > 1 else ''})" if rest else "")

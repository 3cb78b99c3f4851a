"""Model bundles: ``<name>.safetensors`` weights + ``<name>.json`` card (DESIGN §5).

The card (:class:`~wsiflow.models.card.ModelCard`) says what the weights are (architecture
and kwargs, classes, input size, µm/px, normalisation, training data and licence, metrics)
and holds the sha256 of the weights file; it is validated when a bundle loads and written
only through it. Loading verifies that sha256 (and the pipeline's pin, when it has one) and reads
tensors with safetensors only: pickle-based formats (``.pt``, ``.pth``, ``.ckpt``) are
refused, because unpickling a file can execute arbitrary code.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsiflow._version import __version__
from wsiflow.atomic import atomic_path, atomic_write_bytes
from wsiflow.errors import BundleIntegrityError, ConfigError, ModelError
from wsiflow.models.card import FORMAT, CardContent, ModelCard

if TYPE_CHECKING:
    import torch
    from torch import nn

    from wsiflow.config import Pipeline

__all__ = [
    "FORMAT",
    "ModelBundle",
    "check_taxonomy",
    "file_sha256",
    "resolve_bundle",
    "save_bundle",
    "shipped_bundles",
    "update_card",
]

WEIGHTS_PACKAGE = "wsiflow.weights"
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar", ".joblib"})
_PICKLE_REASON = (
    "pickle-based weight files are refused because unpickling can execute arbitrary code; "
    "convert the weights to .safetensors with a JSON card (see `wsiflow train`)"
)


def _weights_dir() -> Path:
    return Path(str(resources.files(WEIGHTS_PACKAGE)))


def shipped_bundles() -> dict[str, Path]:
    """Bundle names shipped in ``wsiflow/weights`` → their ``.safetensors`` path."""
    root = _weights_dir()
    return {p.stem: p for p in sorted(root.glob("*.safetensors")) if p.with_suffix(".json").is_file()}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_bundle(ref: str | os.PathLike[str]) -> tuple[Path, Path]:
    """A bundle name or a path to either file → (weights path, card path). Refuses pickle."""
    text = str(ref)
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelError(f"{path}: {_PICKLE_REASON}")
    if suffix in (".safetensors", ".json"):
        weights, card = path.with_suffix(".safetensors"), path.with_suffix(".json")
    elif "/" not in text and os.sep not in text and not path.exists():
        weights = _weights_dir() / f"{text}.safetensors"
        card = weights.with_suffix(".json")
        if not weights.is_file():
            known = ", ".join(shipped_bundles()) or "none"
            raise ModelError(
                f"unknown model bundle {text!r} (shipped: {known}; or give a path to a .safetensors file)"
            )
    else:
        raise ModelError(f"{path}: a model bundle is a .safetensors file with a .json card beside it")
    for p in (weights, card):
        if not p.is_file():
            raise ModelError(f"{p}: bundle file not found")
    with weights.open("rb") as fh:
        head = fh.read(9)
    if not _is_safetensors(head, weights.stat().st_size):
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise ModelError(
                f"{weights}: this is a pickle/zip (torch.save) file, not safetensors; {_PICKLE_REASON}"
            )
        raise ModelError(f"{weights}: not a safetensors file (no valid header)")
    return weights, card


def _is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with a little-endian u64 header length, then a JSON object.

    Checked structurally: a header whose length happens to start with byte 0x80 (e.g. 9600
    bytes) is still safetensors, not a pickle.
    """
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8 and head[8:9] == b"{"


@dataclass(frozen=True)
class ModelBundle:
    """A verified bundle: the card plus the path and sha256 of its weights."""

    model_card: ModelCard
    weights_path: Path
    card_path: Path
    sha256: str

    @classmethod
    def load(cls, ref: str | os.PathLike[str], expected_sha256: str | None = None) -> ModelBundle:
        weights, card_path = resolve_bundle(ref)
        card = ModelCard.load(card_path)
        digest = file_sha256(weights)
        if expected_sha256 is not None and digest != expected_sha256.lower():
            raise BundleIntegrityError(
                f"{weights}: sha256 {digest} does not match the pinned {expected_sha256.lower()}"
            )
        if card.sha256 != digest:
            raise BundleIntegrityError(
                f"{weights}: sha256 {digest} does not match its card ({card.sha256}); "
                "the weights were changed"
            )
        return cls(model_card=card, weights_path=weights, card_path=card_path, sha256=digest)

    @property
    def card(self) -> dict[str, Any]:
        """The card as its JSON object (a copy), for keys :class:`ModelCard` leaves untyped."""
        return self.model_card.to_dict()

    @property
    def name(self) -> str:
        return self.model_card.name

    @property
    def task(self) -> str:
        return self.model_card.task

    @property
    def demo(self) -> bool:
        return self.model_card.demo

    @property
    def class_codes(self) -> tuple[str, ...]:
        return self.model_card.class_codes

    @property
    def input_px(self) -> int | None:
        return self.model_card.input_px

    @property
    def mpp(self) -> float:
        return self.model_card.mpp

    @property
    def temperature(self) -> float:
        """Softmax temperature fitted on the validation split (card ``calibration``); 1.0 if none."""
        cal = self.model_card.calibration
        t = cal.temperature if cal is not None else None
        if t is None:
            return 1.0
        if not t > 0:
            raise ModelError(f"{self.card_path}: calibration.temperature must be positive, not {t!r}")
        return float(t)

    @property
    def mean(self) -> tuple[float, float, float]:
        m = self.model_card.normalization.mean
        return (m[0], m[1], m[2])

    @property
    def std(self) -> tuple[float, float, float]:
        s = self.model_card.normalization.std
        return (s[0], s[1], s[2])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as float32 (fp16-stored tensors are widened) CPU tensors."""
        import torch
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(self.weights_path))
        except Exception as exc:
            raise ModelError(f"{self.weights_path}: cannot read safetensors ({exc})") from None
        return {
            k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v)
            for k, v in tensors.items()
        }

    def build(self, device: str | torch.device = "cpu") -> nn.Module:
        """The network with these weights, in eval mode, on ``device``."""
        from wsiflow.models.registry import build_model

        model = build_model(self.model_card.architecture, dict(self.model_card.kwargs))
        try:
            model.load_state_dict(self.state_dict(), strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise ModelError(
                f"{self.weights_path}: weights do not fit {self.model_card.architecture} ({first})"
            ) from None
        return model.to(device).eval()


def update_card(bundle: ModelBundle, changes: dict[str, Any]) -> ModelBundle:
    """Rewrite the bundle's card atomically with ``changes`` merged in (top-level keys).

    Only card fields may change (e.g. ``calibration``): the weights file, hence the sha256
    pinned by pipelines, stays as it is.
    """
    forbidden = sorted(set(changes) & {"format", "sha256", "task", "classes", "architecture", "kwargs"})
    if forbidden:
        raise ModelError(f"{bundle.card_path}: {', '.join(forbidden)} cannot be changed in place")
    full = ModelCard.parse({**bundle.card, **changes}, bundle.card_path)
    atomic_write_bytes(bundle.card_path, full.to_json())
    return ModelBundle.load(bundle.weights_path)


def _content(card: CardContent | Mapping[str, Any]) -> CardContent:
    return card if isinstance(card, CardContent) else CardContent.parse(card, "model card")


def check_taxonomy(card: CardContent | Mapping[str, Any], pipeline: Pipeline) -> None:
    """A classifier's output classes must be the pipeline's taxonomy, code for code, in order."""
    c = _content(card)
    if c.task != "classifier":
        return
    codes = c.class_codes
    if codes != pipeline.class_codes:
        raise ModelError(
            f"classifier {c.name!r} predicts {list(codes)} but pipeline {pipeline.name!r} "
            f"has taxonomy {list(pipeline.class_codes)}; they must match in order"
        )


def check_halo(card: CardContent | Mapping[str, Any], pipeline: Pipeline) -> None:
    """DESIGN §3: the halo covers the farthest a cell reaches from its centroid plus the
    segmenter's measured border context (card ``context_um``, see
    :mod:`wsiflow.train.seg_context`), and the read boxes keep the U-Net's pooling grid
    (tile and halo in whole multiples of 2**depth px at ``seg_mpp``). A card without
    ``context_um`` (e.g. a pointwise stand-in) is checked against half the object only."""
    c = _content(card)
    if c.task != "segmenter":
        return
    t = pipeline.tiling
    context = c.context_um
    need = t.max_object_um / 2 + (float(context) if context is not None else 0.0)
    if context is not None and t.halo_um < need:
        raise ConfigError(
            pipeline.name,
            "tiling.halo_um",
            f"{t.halo_um:g} µm is less than max_object_um / 2 + the segmenter's context "
            f"({t.max_object_um:g} / 2 + {float(context):g} = {need:g} µm, card of {c.name!r}): "
            "a cell on a tile seam would be seen with part of its surroundings missing",
        )
    depth = c.kwargs.get("depth")
    if c.architecture == "unet" and isinstance(depth, int) and depth > 0:
        step = 2**depth
        seg_mpp = pipeline.resolution.seg_mpp
        for key, um in (("tiling.tile_um", t.tile_um), ("tiling.halo_um", t.halo_um)):
            px = um / seg_mpp
            if abs(px - round(px)) > 1e-6 or round(px) % step:
                raise ConfigError(
                    pipeline.name,
                    key,
                    f"{um:g} µm is {px:g} px at seg_mpp {seg_mpp:g}; it must be a multiple of {step} px "
                    f"(the segmenter pools {depth} times), or neighbouring tiles see different pooling grids",
                )


def save_bundle(
    model: nn.Module,
    card: CardContent | Mapping[str, Any],
    path: str | os.PathLike[str],
    fp16: bool = False,
) -> ModelBundle:
    """Write ``<path>.safetensors`` and ``<path>.json`` atomically; returns the loaded bundle.

    ``card`` supplies everything but ``format``, ``sha256``, ``storage_dtype``, ``created``
    and ``wsiflow_version``, which are filled in here (a mapping is validated as a
    :class:`CardContent` first, its ``name`` defaulting to the file's stem). ``fp16`` stores
    floating tensors as float16 (halving the file); loading always widens them back to float32.
    """
    import torch
    from safetensors.torch import save_file

    target = Path(path)
    if target.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(f"{target}: {_PICKLE_REASON}")
    weights = target.with_suffix(".safetensors")
    card_path = target.with_suffix(".json")
    if not isinstance(card, CardContent):
        card = CardContent.parse({"name": target.stem, **card}, card_path)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        t = v.detach().to("cpu")
        if fp16 and t.is_floating_point():
            t = t.to(torch.float16)
        tensors[k] = t.contiguous().clone()
    with atomic_path(weights, fsync=False, mkdir=True) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "name": card.name})
        provenance = {
            "format": FORMAT,
            "sha256": file_sha256(tmp),
            "storage_dtype": "float16" if fp16 else "float32",
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "wsiflow_version": __version__,
        }
        full = ModelCard.parse({**card.to_dict(), **provenance}, card_path)
    atomic_write_bytes(card_path, full.to_json(), fsync=False, mkdir=True)
    return ModelBundle.load(weights)

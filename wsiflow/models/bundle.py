"""Model bundles: ``<name>.safetensors`` weights + ``<name>.json`` card (DESIGN §5).

The card says what the weights are (architecture and kwargs, classes, input size, µm/px,
normalisation, training data and licence, metrics) and holds the sha256 of the weights
file. Loading verifies that sha256 (and the pipeline's pin, when it has one) and reads
tensors with safetensors only: pickle-based formats (``.pt``, ``.pth``, ``.ckpt``) are
refused, because unpickling a file can execute arbitrary code.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from wsiflow._version import __version__
from wsiflow.atomic import atomic_path, atomic_write_bytes
from wsiflow.errors import BundleIntegrityError, ConfigError, ModelError

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

FORMAT = "wsiflow-bundle/1"
WEIGHTS_PACKAGE = "wsiflow.weights"
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar", ".joblib"})
REQUIRED_KEYS = (
    "format",
    "name",
    "task",
    "architecture",
    "kwargs",
    "classes",
    "mpp",
    "normalization",
    "sha256",
)
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


def _read_card(card_path: Path) -> dict[str, Any]:
    try:
        card = orjson.loads(card_path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ModelError(f"{card_path}: invalid JSON card ({exc})") from None
    if not isinstance(card, dict):
        raise ModelError(f"{card_path}: the card must be a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in card]
    if missing:
        raise ModelError(f"{card_path}: card lacks {', '.join(missing)}")
    if card["format"] != FORMAT:
        raise ModelError(f"{card_path}: unsupported card format {card['format']!r} (expected {FORMAT!r})")
    if card["task"] not in ("classifier", "segmenter"):
        raise ModelError(f"{card_path}: task must be 'classifier' or 'segmenter', got {card['task']!r}")
    if not isinstance(card["classes"], list) or not all(
        isinstance(c, dict) and "code" in c for c in card["classes"]
    ):
        raise ModelError(f"{card_path}: classes must be a list of objects with a 'code'")
    return card


@dataclass(frozen=True)
class ModelBundle:
    """A verified bundle: the card plus the path and sha256 of its weights."""

    card: dict[str, Any]
    weights_path: Path
    card_path: Path
    sha256: str

    @classmethod
    def load(cls, ref: str | os.PathLike[str], expected_sha256: str | None = None) -> ModelBundle:
        weights, card_path = resolve_bundle(ref)
        card = _read_card(card_path)
        digest = file_sha256(weights)
        if expected_sha256 is not None and digest != expected_sha256.lower():
            raise BundleIntegrityError(
                f"{weights}: sha256 {digest} does not match the pinned {expected_sha256.lower()}"
            )
        if card["sha256"] != digest:
            raise BundleIntegrityError(
                f"{weights}: sha256 {digest} does not match its card ({card['sha256']}); "
                "the weights were changed"
            )
        return cls(card=card, weights_path=weights, card_path=card_path, sha256=digest)

    @property
    def name(self) -> str:
        return str(self.card["name"])

    @property
    def task(self) -> str:
        return str(self.card["task"])

    @property
    def class_codes(self) -> tuple[str, ...]:
        return tuple(str(c["code"]) for c in self.card["classes"])

    @property
    def input_px(self) -> int | None:
        v = self.card.get("input_px")
        return int(v) if v is not None else None

    @property
    def mpp(self) -> float:
        return float(self.card["mpp"])

    @property
    def temperature(self) -> float:
        """Softmax temperature fitted on the validation split (card ``calibration``); 1.0 if none."""
        cal = self.card.get("calibration")
        t = cal.get("temperature") if isinstance(cal, dict) else None
        if t is None:
            return 1.0
        if not (isinstance(t, int | float) and t > 0):
            raise ModelError(f"{self.card_path}: calibration.temperature must be positive, not {t!r}")
        return float(t)

    @property
    def mean(self) -> tuple[float, float, float]:
        m = self.card["normalization"]["mean"]
        return (float(m[0]), float(m[1]), float(m[2]))

    @property
    def std(self) -> tuple[float, float, float]:
        s = self.card["normalization"]["std"]
        return (float(s[0]), float(s[1]), float(s[2]))

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

        model = build_model(str(self.card["architecture"]), dict(self.card["kwargs"]))
        try:
            model.load_state_dict(self.state_dict(), strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise ModelError(
                f"{self.weights_path}: weights do not fit {self.card['architecture']} ({first})"
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
    full = {**bundle.card, **changes}
    atomic_write_bytes(
        bundle.card_path, orjson.dumps(full, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n"
    )
    return ModelBundle.load(bundle.weights_path)


def check_taxonomy(card: dict[str, Any], pipeline: Pipeline) -> None:
    """A classifier's output classes must be the pipeline's taxonomy, code for code, in order."""
    if card.get("task") != "classifier":
        return
    codes = tuple(str(c["code"]) for c in card["classes"])
    if codes != pipeline.class_codes:
        raise ModelError(
            f"classifier {card.get('name')!r} predicts {list(codes)} but pipeline {pipeline.name!r} "
            f"has taxonomy {list(pipeline.class_codes)}; they must match in order"
        )


def check_halo(card: dict[str, Any], pipeline: Pipeline) -> None:
    """DESIGN §3: the halo covers the farthest a cell reaches from its centroid plus the
    segmenter's measured border context (card ``context_um``, see
    :mod:`wsiflow.train.seg_context`), and the read boxes keep the U-Net's pooling grid
    (tile and halo in whole multiples of 2**depth px at ``seg_mpp``). A card without
    ``context_um`` (e.g. a pointwise stand-in) is checked against half the object only."""
    if card.get("task") != "segmenter":
        return
    t = pipeline.tiling
    context = card.get("context_um")
    need = t.max_object_um / 2 + (float(context) if context is not None else 0.0)
    if context is not None and t.halo_um < need:
        raise ConfigError(
            pipeline.name,
            "tiling.halo_um",
            f"{t.halo_um:g} µm is less than max_object_um / 2 + the segmenter's context "
            f"({t.max_object_um:g} / 2 + {float(context):g} = {need:g} µm, card of {card.get('name')!r}): "
            "a cell on a tile seam would be seen with part of its surroundings missing",
        )
    depth = (card.get("kwargs") or {}).get("depth")
    if card.get("architecture") == "unet" and isinstance(depth, int) and depth > 0:
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
    card: dict[str, Any],
    path: str | os.PathLike[str],
    fp16: bool = False,
) -> ModelBundle:
    """Write ``<path>.safetensors`` and ``<path>.json`` atomically; returns the loaded bundle.

    ``card`` supplies everything but ``format``, ``sha256``, ``created`` and
    ``wsiflow_version``, which are filled in here. ``fp16`` stores floating tensors as
    float16 (halving the file); loading always widens them back to float32.
    """
    import torch
    from safetensors.torch import save_file

    target = Path(path)
    if target.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(f"{target}: {_PICKLE_REASON}")
    weights = target.with_suffix(".safetensors")
    card_path = target.with_suffix(".json")
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        t = v.detach().to("cpu")
        if fp16 and t.is_floating_point():
            t = t.to(torch.float16)
        tensors[k] = t.contiguous().clone()
    with atomic_path(weights, fsync=False, mkdir=True) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "name": str(card.get("name", target.stem))})
        digest = file_sha256(tmp)
        full = dict(card)
        full.setdefault("name", target.stem)
        full["format"] = FORMAT
        full["sha256"] = digest
        full["storage_dtype"] = "float16" if fp16 else "float32"
        full["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        full["wsiflow_version"] = __version__
        missing = [k for k in REQUIRED_KEYS if k not in full]
        if missing:
            raise ModelError(f"{card_path}: card lacks {', '.join(missing)}")
    atomic_write_bytes(
        card_path,
        orjson.dumps(full, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n",
        fsync=False,
        mkdir=True,
    )
    return ModelBundle.load(weights)

"""A pipeline pinned to a newly trained classifier (``wsiflow pipeline derive``).

The last step of the lab's loop: the base pipeline (e.g. ``mds``) with its classifier
replaced by the new bundle — absolute path, its sha256 (so a changed file is refused at
load time), ``input_px`` and, when the card records it (bundles trained on a harvest), the
crop rule and classifier resolution the cells were cut with. The bundle's classes must be
the base pipeline's taxonomy, code for code; the result is validated like any pipeline
before it is written (atomically).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from wsiflow.atomic import atomic_write_bytes
from wsiflow.config import Pipeline, load_pipeline, parse_pipeline
from wsiflow.errors import ConfigError
from wsiflow.models.bundle import ModelBundle, check_taxonomy

__all__ = ["derive_pipeline", "pipeline_yaml", "resolved_models"]


def pipeline_yaml(pipeline: Pipeline, header: str = "") -> str:
    """The pipeline as YAML (every default written out), with an optional comment header."""
    data = pipeline.model_dump(mode="json")
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
    lines = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return lines + body


def derive_pipeline(base: str | Path, classifier: str | Path, out: Path, name: str | None = None) -> Pipeline:
    """Write ``out``: ``base`` with its classifier pinned to ``classifier``; returns it loaded."""
    pipe = load_pipeline(base)
    bundle = ModelBundle.load(classifier)
    if bundle.task != "classifier":
        raise ConfigError(str(classifier), "--classifier", f"not a classifier bundle (task {bundle.task!r})")
    check_taxonomy(bundle.model_card, pipe)
    if bundle.input_px is None:
        raise ConfigError(str(bundle.card_path), "input_px", "a classifier card needs input_px")
    data: dict[str, Any] = pipe.model_dump(mode="json")
    cls_cfg = data["classifier"]
    cls_cfg.update(bundle=str(bundle.weights_path.resolve()), sha256=bundle.sha256, input_px=bundle.input_px)
    crop = bundle.card.get("crop")
    if isinstance(crop, dict):
        if "rule" in crop or "pad_um" in crop:
            cls_cfg["crop"] = {k: crop[k] for k in ("rule", "pad_um") if k in crop}
        if "cls_mpp" in crop:
            data["resolution"]["cls_mpp"] = crop["cls_mpp"]
    data["name"] = name or out.stem
    data["description"] = (
        f"{pipe.description} Classifier: {bundle.name} (derived from pipeline {pipe.name!r} "
        f"by wsiflow pipeline derive)."
    ).strip()
    derived = parse_pipeline(data, out.name)
    header = (
        f"Derived from pipeline {pipe.name!r} by `wsiflow pipeline derive`.\n"
        f"Classifier {bundle.name!r}: sha256 {bundle.sha256}\n"
        f"trained on: {bundle.card.get('training_data', {}).get('name', 'unknown')}\n"
        "Research use only."
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, pipeline_yaml(derived, header).encode("utf-8"))
    loaded = load_pipeline(out)
    if loaded != derived:  # the YAML must round-trip exactly
        raise ConfigError(str(out), "", "the written pipeline does not load back identically")
    return loaded


def resolved_models(pipeline: Pipeline) -> list[dict[str, Any]]:
    """Each model of the pipeline resolved and verified: path, sha256, card facts."""
    rows = []
    for role, ref in (("segmenter", pipeline.segmenter), ("classifier", pipeline.classifier)):
        b = ModelBundle.load(ref.bundle, ref.sha256)
        rows.append(
            {
                "role": role,
                "bundle": b.name,
                "path": str(b.weights_path),
                "sha256": b.sha256,
                "pinned": ref.sha256 is not None,
                "demo": b.demo,
                "trained_on": b.card.get("training_data", {}).get("name"),
                "temperature": b.temperature if b.task == "classifier" else None,
            }
        )
    return rows

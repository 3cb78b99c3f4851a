"""What a worker process holds: opened slides and loaded models, cached (DESIGN §1, §4).

A Dask task receives small references (:class:`SlideRef`, :class:`ModelRefs`) and turns
them into loaded objects here, once per process (models, keyed by weight sha256, device
and model settings) or per thread (slides, keyed by path, mpp and backend: not every
backend's handle is safe to share between the threads of one Dask worker), then hands
those to :func:`wsiflow.pipeline.batch.process_batch`.

Slides are opened with TiffSlide first (``prefer=RUN_READER``, the preference the client
plans with, so the slide identity names this reader), OpenSlide for what it cannot read:
on JPEG tiles TiffSlide decodes ~2.7× faster here (benchmarks B1) and gives the same pixels
(tests/test_perf_equivalence.py).

:func:`resolve_models` runs on the client: it verifies both bundles (sha256 pins, task,
taxonomy) before anything is submitted.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsiflow.config import Pipeline
from wsiflow.errors import ModelError
from wsiflow.pipeline.batch import LoadedModels
from wsiflow.types import StorageOptions

if TYPE_CHECKING:
    from wsiflow.models.bundle import ModelBundle
    from wsiflow.slide import Slide

__all__ = [
    "ModelRefs",
    "SlideRef",
    "clear_caches",
    "describe_worker",
    "get_models",
    "get_slide",
    "resolve_models",
]

log = logging.getLogger(__name__)

_SLIDES_PER_THREAD = 4


@dataclass(frozen=True, slots=True)
class SlideRef:
    """What a worker needs to open a slide: a path (or fsspec URL), the mpp override and,
    for a URL, the fsspec storage options (their values never show in a repr)."""

    path: str
    mpp: float | None = None
    backend: str = "auto"
    storage: StorageOptions | None = None


@dataclass(frozen=True, slots=True)
class ModelRefs:
    """The two bundles a batch uses, pinned by the sha256 the client verified.

    A worker that finds different bytes behind ``segmenter``/``classifier`` (another file
    on its file system) raises :class:`~wsiflow.errors.BundleIntegrityError` instead of
    silently computing with other weights. ``device`` is ``auto``, ``cpu`` or ``cuda``;
    ``auto`` is resolved on the worker (CUDA when the worker has it).
    """

    segmenter: str
    segmenter_sha256: str
    classifier: str
    classifier_sha256: str
    device: str = "auto"


def _ref_for_workers(ref: str) -> str:
    """A bundle path becomes absolute (workers may run elsewhere); a bundle name stays."""
    p = Path(ref)
    if p.suffix.lower() in (".safetensors", ".json") or p.exists():
        return str(p.expanduser().resolve())
    return ref


def resolve_models(pipeline: Pipeline, device: str = "auto") -> tuple[ModelRefs, list[ModelBundle]]:
    """Load both bundles on the client: verify sha256 pins, task and taxonomy.

    Returns the refs to send to workers and the two bundles (for their cards: demo flag,
    names, sha256 for the Zarr attributes).
    """
    from wsiflow.models.bundle import ModelBundle, check_halo, check_taxonomy

    seg = ModelBundle.load(pipeline.segmenter.bundle, pipeline.segmenter.sha256)
    cls = ModelBundle.load(pipeline.classifier.bundle, pipeline.classifier.sha256)
    if seg.task != "segmenter":
        raise ModelError(f"segmenter.bundle {seg.name!r} is a {seg.task} bundle, not a segmenter")
    if cls.task != "classifier":
        raise ModelError(f"classifier.bundle {cls.name!r} is a {cls.task} bundle, not a classifier")
    check_taxonomy(cls.model_card, pipeline)
    check_halo(seg.model_card, pipeline)
    if device not in ("auto", "cpu", "cuda"):
        raise ModelError(f"--device must be auto, cpu or cuda, not {device!r}")
    refs = ModelRefs(
        segmenter=_ref_for_workers(pipeline.segmenter.bundle),
        segmenter_sha256=seg.sha256,
        classifier=_ref_for_workers(pipeline.classifier.bundle),
        classifier_sha256=cls.sha256,
        device=device,
    )
    return refs, [seg, cls]


# --------------------------------------------------------------------------- caches
# Per process: models by (weights sha256, device, settings); slides by (path, mpp,
# backend) per thread, because not every backend's handle is safe to share between the
# threads of one Dask worker.

_model_lock = threading.Lock()
_models: dict[tuple[Any, ...], LoadedModels] = {}
_local = threading.local()


def get_models(refs: ModelRefs, pipeline: Pipeline) -> LoadedModels:
    """The segmenter and classifier for ``refs``, built once per process."""
    from wsiflow.models.device import resolve_device

    device = resolve_device(refs.device)
    key = (
        refs.segmenter_sha256,
        refs.classifier_sha256,
        device,
        pipeline.segmenter.model_dump_json(),
        pipeline.classifier.model_dump_json(),
    )
    with _model_lock:
        hit = _models.get(key)
        if hit is not None:
            return hit
        from wsiflow.classify import Classifier
        from wsiflow.models.bundle import ModelBundle
        from wsiflow.segment import Segmenter

        seg_bundle = ModelBundle.load(refs.segmenter, refs.segmenter_sha256)
        cls_bundle = ModelBundle.load(refs.classifier, refs.classifier_sha256)
        loaded = LoadedModels(
            segmenter=Segmenter(seg_bundle, pipeline.segmenter, device=device),
            classifier=Classifier(cls_bundle, pipeline.classifier, device=device),
            device=device,
        )
        _models[key] = loaded
        log.debug("loaded models %s / %s on %s", seg_bundle.name, cls_bundle.name, device)
        return loaded


def get_slide(ref: SlideRef) -> Slide:
    """An open handle for ``ref``, cached per thread (a few slides, least recently used)."""
    from wsiflow.slide import RUN_READER, open_slide

    cache: OrderedDict[SlideRef, Slide] | None = getattr(_local, "slides", None)
    if cache is None:
        cache = OrderedDict()
        _local.slides = cache
    slide = cache.get(ref)
    if slide is not None:
        cache.move_to_end(ref)
        return slide
    # "auto": RUN_READER (TiffSlide) first, as the client planned; OpenSlide for what it cannot read
    storage = ref.storage.to_dict() if ref.storage else None
    slide = open_slide(ref.path, backend=ref.backend, mpp=ref.mpp, prefer=RUN_READER, storage_options=storage)
    cache[ref] = slide
    while len(cache) > _SLIDES_PER_THREAD:
        _, old = cache.popitem(last=False)
        old.close()
    return slide


def describe_worker(
    bundles: Sequence[str], slides: Sequence[str], storage: StorageOptions | None = None
) -> dict[str, Any]:
    """What this process would compute with, for the client's check before a run
    (:mod:`wsiflow.execution.preflight`; run on every worker with ``client.run``).

    ``version``: its wsiflow; ``bundles``: per bundle reference (a shipped name or the
    absolute path the client sent) the sha256 of the weights *this* process resolves, or
    why it cannot; ``unreadable``: the local slide paths it cannot read, and the first URL
    if it cannot reach it. Cheap: no model is loaded, no slide opened."""
    import os

    from wsiflow._version import __version__
    from wsiflow.models.bundle import file_sha256, resolve_bundle

    found: dict[str, dict[str, str]] = {}
    for ref in bundles:
        try:
            weights, _ = resolve_bundle(ref)
            found[ref] = {"sha256": file_sha256(weights)}
        except (ModelError, OSError) as exc:
            found[ref] = {"error": " ".join(str(exc).split())}
    unreadable = [p for p in slides if "://" not in p and not (os.path.isfile(p) and os.access(p, os.R_OK))]
    url = next((p for p in slides if "://" in p), None)
    if url is not None:
        try:
            import fsspec

            fs, where = fsspec.core.url_to_fs(url, **(storage.to_dict() if storage else {}))
            fs.info(where)
        except Exception:
            unreadable.append(url)
    return {"version": __version__, "bundles": found, "unreadable": unreadable}


def clear_caches() -> None:
    """Close this thread's slides and drop loaded models (tests, worker teardown)."""
    cache: OrderedDict[SlideRef, Slide] | None = getattr(_local, "slides", None)
    if cache:
        for slide in cache.values():
            slide.close()
        cache.clear()
    with _model_lock:
        _models.clear()

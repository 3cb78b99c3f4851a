"""Shared helpers for the wsiflow benchmarks (B1-B8).

Every ``bench_*.py`` script prints one JSON object on stdout (logs go to stderr), so
``run.py`` can run each in a fresh process and collect the results. Inputs are generated
(``wsiflow synth``) into a work folder and reused between scripts of one run.

Models: the pipeline's bundles when they are shipped in ``wsiflow/weights`` (``--models
shipped``); otherwise (``--models standin``) bundles with the *same architectures and
kwargs* the pipeline's trained bundles use, so every timing has the real cost:

* segmenter: ``UNet(in_ch=3, out_ch=2, depth=4, width=8)`` whose weights are set by hand
  so that it computes a colour threshold (cell = blue-ish stain, nucleus = dark), which
  finds the nucleated cells of a generated smear; post-processing then has real work;
* classifier: ``inception_v3(num_classes=8)`` at the pipeline's ``input_px`` with random
  weights (the class it picks does not change its cost).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent
WSIFLOW = str(BIN / "wsiflow")
SHARED = ROOT.parent / "shared" / "data"
CMU1 = SHARED / "slides" / "CMU-1-Small-Region.svs"


def log(*parts: object) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    """The script's single JSON result on stdout."""
    sys.stdout.write(json.dumps(result, indent=1, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(o: object) -> object:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    try:
        import psutil

        info["mem_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    return info


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    box = [0.0]
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - t0


# --------------------------------------------------------------------------- slides


@dataclass(frozen=True)
class SlideSpec:
    width: int
    height: int
    seed: int = 1
    density: float = 1600.0
    mpp: float = 0.25

    @property
    def name(self) -> str:
        return f"synth_{self.width}x{self.height}_s{self.seed}_d{int(self.density)}.svs"


def synth_slide(work: Path, spec: SlideSpec) -> tuple[Path, dict[str, Any]]:
    """A generated slide (cached in ``work``) and its truth summary."""
    from wsiflow.synth import SynthParams, synthesize, truth_paths

    work.mkdir(parents=True, exist_ok=True)
    path = work / spec.name
    truth_json = truth_paths(path)[1]
    if not (path.is_file() and truth_json.is_file()):
        log(f"generating {path.name} ...")
        params = SynthParams(
            width=spec.width, height=spec.height, mpp=spec.mpp, seed=spec.seed, cells_per_mm2=spec.density
        )
        params.validate()
        res = synthesize(path, params)
        log(f"generated {path.name} in {res.seconds:.1f} s")
    truth = json.loads(truth_json.read_text())
    return path, {
        "path": str(path),
        "dimensions": [spec.width, spec.height],
        "mpp": spec.mpp,
        "seed": spec.seed,
        "density_per_mm2": spec.density,
        "true_nucleated_cells": truth.get("nucleated"),
        "size_mb": round(path.stat().st_size / 1e6, 1),
    }


# --------------------------------------------------------------------------- models


def _standin_segmenter(path: Path) -> None:
    """U-Net(3→2, depth 4, width 8) whose weights compute a colour threshold.

    Input normalisation is identity (x = rgb/255). First conv: channel 0 = B − R (stained
    cytoplasm and nuclei are blue/purple, red cells are red, background is grey), channel 1
    = −mean(R,G,B) (nuclei are dark). BatchNorm biases subtract the thresholds, ReLU keeps
    the excess; every later layer passes channels 0/1 through the level-0 path (deeper
    levels compute zeros, at full cost), the head turns them into logits.
    """
    import torch

    from wsiflow.models.bundle import save_bundle
    from wsiflow.models.card import CardClass, CardContent, Normalization
    from wsiflow.models.unet import UNet

    torch.manual_seed(0)
    m = UNet(in_ch=3, out_ch=2, depth=4, width=8)
    cell_t, nuc_t = 14 / 255, -105 / 255  # B−R > 14 ; mean < 105
    sd = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in m.state_dict().items()}
    for k in sd:
        if k.endswith("running_var"):
            sd[k].fill_(1.0 - 1e-5)  # BatchNorm eps: (x - 0) / sqrt(var + eps) = x
        elif k.endswith(".weight") and sd[k].ndim == 1:  # BatchNorm scale
            sd[k].fill_(1.0)
    c1, bn1, c2 = sd["inc.0.weight"], sd["inc.1.bias"], sd["inc.3.weight"]
    c1[0, 2, 1, 1], c1[0, 0, 1, 1] = 1.0, -1.0  # channel 0: B - R
    c1[1, :, 1, 1] = -1.0 / 3  # channel 1: -mean(R, G, B)
    bn1[0], bn1[1] = -cell_t, -nuc_t
    last = f"ups.{len(m.ups) - 1}.conv"  # level 0: cat([reduce(up) (8 ch), skip (8 ch)])
    for ch in (0, 1):
        c2[ch, ch, 1, 1] = 1.0
        sd[f"{last}.0.weight"][ch, 8 + ch, 1, 1] = 1.0
        sd[f"{last}.3.weight"][ch, ch, 1, 1] = 1.0
        sd["head.weight"][ch, ch, 0, 0] = 255 * 0.25
    sd["head.bias"][:] = -0.5
    m.load_state_dict(sd)
    card = CardContent(
        name="bench-seg-standin",
        task="segmenter",
        architecture="unet",
        kwargs={"in_ch": 3, "out_ch": 2, "depth": 4, "width": 8},
        classes=[
            CardClass(code="cell", name="Nucleated cell", color=[0, 200, 0]),
            CardClass(code="nucleus", name="Nucleus", color=[255, 255, 0]),
        ],
        input_px=None,
        mpp=0.5,
        normalization=Normalization(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0]),
        training_data={
            "name": "none",
            "licence": "n/a",
            "description": "hand-set colour threshold (benchmark)",
        },
        metrics={},
        demo=True,
    )
    save_bundle(m, card, path)


CLASS_KEYS = ("code", "name", "lineage", "dysplastic", "blast", "color")


def _standin_classifier(path: Path, taxonomy: list[dict[str, Any]], input_px: int) -> None:
    import torch

    from wsiflow.models.bundle import save_bundle
    from wsiflow.models.card import CardClass, CardContent, Normalization
    from wsiflow.models.inception import build_inception_v3

    torch.manual_seed(0)
    m = build_inception_v3(num_classes=len(taxonomy), aux_logits=False, dropout=0.5, init_weights=True)
    card = CardContent(
        name=f"bench-cls-standin-{input_px}",
        task="classifier",
        architecture="inception_v3",
        kwargs={"num_classes": len(taxonomy), "aux_logits": False, "dropout": 0.5},
        classes=[CardClass.model_validate({k: c.get(k) for k in CLASS_KEYS}) for c in taxonomy],
        input_px=input_px,
        mpp=0.25,
        normalization=Normalization(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]),
        training_data={"name": "none", "licence": "n/a", "description": "random weights (benchmark)"},
        metrics={},
        demo=True,
    )
    save_bundle(m, card, path)


def bench_pipeline(work: Path, models: str = "auto", base: str = "mds") -> tuple[Path, dict[str, Any]]:
    """A pipeline YAML for the benchmarks and a description of the models it uses.

    It is the shipped ``base`` pipeline with its bundle references pointing at the shipped
    bundles (when present and ``models`` allows) or at stand-ins written into ``work``.
    """
    import yaml

    from wsiflow.config import shipped_pipelines
    from wsiflow.models.bundle import ModelBundle, shipped_bundles

    data = yaml.safe_load(shipped_pipelines()[base].read_text(encoding="utf-8"))
    shipped = shipped_bundles()
    seg_name, cls_name = data["segmenter"]["bundle"], data["classifier"]["bundle"]
    have = seg_name in shipped and cls_name in shipped
    if models == "shipped" and not have:
        raise SystemExit(f"--models shipped: bundles {seg_name}/{cls_name} are not in wsiflow/weights")
    use_shipped = have and models != "standin"
    info: dict[str, Any] = {"kind": "shipped" if use_shipped else "standin"}
    if use_shipped:
        cls_b = ModelBundle.load(cls_name)
        if cls_b.input_px is not None:
            data["classifier"]["input_px"] = cls_b.input_px
        info["segmenter"] = seg_name
        info["classifier"] = cls_name
    else:
        mdir = work / "models"
        seg_p = mdir / "bench-seg-standin.safetensors"
        input_px = int(data["classifier"]["input_px"])
        cls_p = mdir / f"bench-cls-standin-{input_px}.safetensors"
        if not seg_p.is_file():
            _standin_segmenter(seg_p)
        if not cls_p.is_file():
            _standin_classifier(cls_p, data["taxonomy"], input_px)
        data["segmenter"]["bundle"] = str(seg_p)
        data["classifier"]["bundle"] = str(cls_p)
        info["segmenter"] = "stand-in UNet(3→2, depth 4, width 8), colour-threshold weights"
        info["classifier"] = f"stand-in inception_v3(8 classes), random weights, {input_px} px"
    data["segmenter"]["sha256"] = None
    data["classifier"]["sha256"] = None
    data["name"] = f"{data['name']}-bench"
    out = work / f"bench-{base}-{info['kind']}.yaml"
    work.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    info["pipeline"] = str(out)
    info["input_px"] = int(data["classifier"]["input_px"])
    info["seg_mpp"] = data["resolution"]["seg_mpp"]
    info["cls_mpp"] = data["resolution"]["cls_mpp"]
    return out, info


# --------------------------------------------------------------------------- processes
# (real dask scheduler/worker processes: wsiflow.execution.loopback)


class RssSampler:
    """Samples the RSS of process trees in a thread; keeps each process's peak.

    ``roots``: {label: pid}; every descendant of a root is sampled too and reported with
    its depth below the root and a short command line.
    """

    def __init__(self, roots: dict[str, int], interval: float = 0.05) -> None:
        self.roots = dict(roots)
        self.interval = interval
        self.peaks: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def add_root(self, label: str, pid: int) -> None:
        self.roots[label] = pid

    def _visit(self, label: str, proc: Any, depth: int) -> None:
        import psutil

        try:
            rss = proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return
        rec = self.peaks.get(proc.pid)
        if rec is None:
            try:
                cmd = " ".join(proc.cmdline())[:160]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                cmd = "?"
            rec = {"root": label, "depth": depth, "cmd": cmd, "peak_rss": 0, "ppid": proc.ppid()}
            self.peaks[proc.pid] = rec
        rec["peak_rss"] = max(rec["peak_rss"], rss)
        try:
            children = proc.children()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return
        for c in children:
            self._visit(label, c, depth + 1)

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            for label, pid in list(self.roots.items()):
                try:
                    self._visit(label, psutil.Process(pid), 0)
                except psutil.NoSuchProcess:
                    pass
            self._stop.wait(self.interval)


def wsiflow_run_cmd(slide: Path, out: Path, pipeline_path: Path) -> list[str]:
    """``wsiflow run`` as the benchmarks time it: 2 workers × 1 thread, CPU, no progress bars."""
    return [WSIFLOW, "run", str(slide), "-o", str(out), "--pipeline", str(pipeline_path), "--workers", "2",
            "--threads-per-worker", "1", "--device", "cpu", "--no-progress"]  # fmt: skip


def run_cmd(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 3600
) -> tuple[float, str, str]:
    """Run a command to completion; (seconds, stdout, stderr); raises on failure."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} … exited {p.returncode}: {p.stderr[-2000:]}")
    return dt, p.stdout, p.stderr


def tree_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (a Zarr store)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def ratio(a: float | None, b: float | None, nd: int = 3) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, nd)


def profile_top(stats_path: Path, n: int = 15) -> list[str]:
    """The top ``n`` functions by cumulative time of a cProfile dump, as text lines."""
    import io
    import pstats

    buf = io.StringIO()
    st = pstats.Stats(str(stats_path), stream=buf)
    st.sort_stats("tottime").print_stats(n)
    lines = [ln.rstrip() for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return lines[start : start + n + 1]

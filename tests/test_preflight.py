"""The cluster is checked before work goes out: workers that would compute different numbers
(another wsiflow version, other or missing weights) are named in one line and ``wsiflow run
--scheduler`` stops with exit 2 before any slide starts. The odd workers are real ``dask
worker`` processes on loopback whose ``PYTHONPATH`` gives them another wsiflow install (a
copy of this one with its weights or version changed), as a cluster node with a stale
install would have."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from distributed import Client
from standins import write_smear

from wsiflow.config import load_pipeline
from wsiflow.execution.loopback import loopback_cluster, start_worker
from wsiflow.execution.preflight import check_cluster, worker_problems
from wsiflow.execution.worker import ModelRefs, resolve_models
from wsiflow.models.bundle import file_sha256

pytestmark = pytest.mark.slow


def alt_install(
    root: Path, repo: Path, *, version: str | None = None, drop: str = "", perturb: str = ""
) -> Path:
    """A copy of the wsiflow package under ``root`` (weights linked, not copied), with the
    bundle ``drop`` missing, the bundle ``perturb`` holding other (valid) weights, or another
    version; returns the folder to put on ``PYTHONPATH``."""
    src = repo / "wsiflow"
    shutil.copytree(src, root / "wsiflow", ignore=shutil.ignore_patterns("*.safetensors", "__pycache__"))
    weights = root / "wsiflow" / "weights"
    for p in sorted((src / "weights").glob("*.safetensors")):
        if p.stem == drop:
            continue
        if p.stem == perturb:
            data = bytearray(p.read_bytes())
            data[-1] ^= 0x01  # one weight changes; still a valid safetensors file
            (weights / p.name).write_bytes(bytes(data))
            card = orjson.loads(p.with_suffix(".json").read_bytes())
            card["sha256"] = file_sha256(weights / p.name)  # a consistent bundle, other numbers
            (weights / p.with_suffix(".json").name).write_bytes(orjson.dumps(card))
        else:
            (weights / p.name).symlink_to(p)
    if version:
        (root / "wsiflow" / "_version.py").write_text(f'__version__ = "{version}"\n')
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, repo_root: Path):
    d = tmp_path_factory.mktemp("preflight")
    smear, _ = write_smear(d / "smear.svs")
    alts = {
        "w-other-weights": alt_install(d / "alt-weights", repo_root, perturb="demo-seg"),
        "w-no-weights": alt_install(d / "alt-missing", repo_root, drop="mds-demo"),
        "w-old": alt_install(d / "alt-version", repo_root, version="0.0.1"),
    }
    with loopback_cluster(d / "logs", n_workers=1, nthreads=1) as pair:  # w0: this install
        for name, path in alts.items():
            pair.workers.append(
                start_worker(pair.address, d / "logs" / f"{name}.log", 1, name=name,
                             extra_env={"PYTHONPATH": str(path)})
            )  # fmt: skip
        with Client(pair.address, timeout=60, set_as_default=False) as c:
            c.wait_for_workers(1 + len(alts), timeout=120)
        yield d, smear, pair


def test_odd_workers_are_named_and_the_run_stops_before_any_slide(cluster) -> None:
    d, smear, pair = cluster
    out = d / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "wsiflow", "run", str(smear), "-o", str(out), "--scheduler", pair.address,
         "--no-progress", "--pipeline", "mds-demo"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("wsiflow: error:")]
    assert len(errors) == 1, proc.stderr
    line = errors[0]
    assert "cluster: 3 of 4 workers would compute different numbers" in line
    assert "(w-other-weights): segmenter bundle 'demo-seg' has other weights" in line
    assert "(w-no-weights): classifier bundle 'mds-demo': unknown model bundle 'mds-demo'" in line
    assert "(w-old): wsiflow 0.0.1 (the client has" in line
    assert "(w0)" not in line  # the worker with this install is not blamed
    assert not (out / "smear").exists()  # no slide started


def test_a_matching_worker_passes_and_a_slide_it_cannot_read_is_named(cluster) -> None:
    d, smear, pair = cluster
    refs, _ = resolve_models(load_pipeline("mds-demo"), "cpu")
    with Client(pair.address, timeout=60, set_as_default=False) as c:
        w0 = [a for a, w in c.scheduler_info(n_workers=-1)["workers"].items() if w["name"] == "w0"]
        reports = c.run(
            __import__("wsiflow.execution.worker", fromlist=["describe_worker"]).describe_worker,
            [refs.segmenter, refs.classifier], [str(smear), str(d / "gone.svs")], None, workers=w0,
        )  # fmt: skip
    [report] = reports.values()
    # the worker cannot read gone.svs (it does not exist anywhere): named; nothing else differs
    assert worker_problems(report, refs) == [f"cannot read the slide {d / 'gone.svs'}"]
    fine = {**report, "unreadable": []}
    assert worker_problems(fine, refs) == []
    other = ModelRefs(refs.segmenter, "0" * 64, refs.classifier, refs.classifier_sha256)
    assert worker_problems(fine, other)[0].startswith("segmenter bundle 'demo-seg' has other weights")
    # check_cluster only sends slides the client can read: with w0 alone, it passes
    with Client(pair.address, timeout=60, set_as_default=False) as c:
        only_w0 = _OnlyWorkers(c, w0)
        assert check_cluster(only_w0, refs, [str(smear), str(d / "gone.svs")]) == 1  # type: ignore[arg-type]


class _OnlyWorkers:
    """A client view that runs on the given workers only (the cluster fixture also holds odd ones)."""

    def __init__(self, client: Client, workers: list[str]) -> None:
        self._c, self._w = client, workers

    def run(self, fn, *args, **kw):
        return self._c.run(fn, *args, workers=self._w, **kw)

    def scheduler_info(self, **kw):
        return self._c.scheduler_info(**kw)

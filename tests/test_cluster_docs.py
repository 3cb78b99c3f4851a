"""The example cluster configurations of docs/cluster.md parse and name real options:

* ``docs/examples/jobqueue-slurm.yaml``: every key is one of dask-jobqueue's own SLURM
  options (the ``jobqueue.yaml`` it ships), and ``docs/examples/slurm_run.py`` renders the
  sbatch script from it with the real ``SLURMCluster`` (nothing is submitted: no SLURM here);
* ``docs/examples/daskcluster.yaml``: every key is a field of the DaskCluster custom
  resource definition that dask-kubernetes ships (checked where dask-kubernetes is
  installed; its dependencies clash with this project's pins, so it is not a test extra).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def test_every_example_parses() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert {p.name for p in files} >= {"jobqueue-slurm.yaml", "daskcluster.yaml"}
    for p in files:
        docs = list(yaml.safe_load_all(p.read_text(encoding="utf-8")))
        assert docs and all(isinstance(d, dict) for d in docs), p
    compile((EXAMPLES / "slurm_run.py").read_text(encoding="utf-8"), "slurm_run.py", "exec")


def test_slurm_config_names_only_dask_jobqueue_options() -> None:
    root = _package_dir("dask_jobqueue")
    if root is None:
        pytest.skip("dask-jobqueue is not installed (pip install -e '.[test]' installs it)")
    shipped = yaml.safe_load((root / "jobqueue.yaml").read_text(encoding="utf-8"))["jobqueue"]["slurm"]
    ours = yaml.safe_load((EXAMPLES / "jobqueue-slurm.yaml").read_text(encoding="utf-8"))
    assert list(ours) == ["jobqueue"] and list(ours["jobqueue"]) == ["slurm"]
    unknown = sorted(set(ours["jobqueue"]["slurm"]) - set(shipped))
    assert unknown == [], f"not dask-jobqueue SLURM options: {unknown}"


@pytest.mark.slow
def test_slurm_run_renders_the_job_script_with_dask_jobqueue() -> None:
    pytest.importorskip("dask_jobqueue")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "slurm_run.py"), "--print-job-script", "--host", "127.0.0.1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for line in ("#SBATCH -J wsiflow-worker", "#SBATCH --cpus-per-task=8", "#SBATCH -t 04:00:00"):
        assert line in script.splitlines(), script
    worker = next(ln for ln in script.splitlines() if "distributed.cli.dask_worker" in ln)
    assert worker.startswith("/shared/envs/wsiflow/bin/python -m distributed.cli.dask_worker tcp://127.0.0.1:")
    # 8 cores as 2 processes × 4 threads (what docs/cluster.md recommends per node)
    assert "--nthreads 4" in worker and "--nworkers 2" in worker


def _unknown(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """Keys of ``value`` that the OpenAPI ``schema`` does not define, and missing required ones."""
    bad: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is None:
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                for k, v in value.items():
                    bad += _unknown(v, extra, f"{path}.{k}")
            return bad
        bad += [f"{path}.{k} (required)" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k not in props:
                bad.append(f"{path}.{k}")
            else:
                bad += _unknown(v, props[k], f"{path}.{k}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            bad += _unknown(v, schema["items"], f"{path}[{i}]")
    return bad


def test_daskcluster_names_only_fields_of_the_dask_kubernetes_crd() -> None:
    ours = yaml.safe_load((EXAMPLES / "daskcluster.yaml").read_text(encoding="utf-8"))
    worker = ours["spec"]["worker"]["spec"]["containers"][0]
    args = worker["args"]
    # the worker's threads match its CPU request (one model copy per process)
    assert args[:2] == ["dask", "worker"]
    assert args[args.index("--nthreads") + 1] == worker["resources"]["requests"]["cpu"]
    root = _package_dir("dask_kubernetes")
    if root is None:
        pytest.skip("dask-kubernetes is not installed: its CRD cannot be checked here")
    crd_path = root / "operator/deployment/helm/dask-kubernetes-operator/crds/daskcluster.yaml"
    crd = yaml.safe_load(crd_path.read_text(encoding="utf-8"))
    assert ours["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"
    assert ours["kind"] == crd["spec"]["names"]["kind"]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    body = {k: v for k, v in ours.items() if k not in ("apiVersion", "kind", "metadata")}
    assert _unknown(body, schema, "DaskCluster") == []
    # and the checker itself catches a misspelt field
    typo = {"spec": {"worker": {"replica": 2, "spec": {"containers": []}},
                     "scheduler": ours["spec"]["scheduler"]}}
    assert "DaskCluster.spec.worker.replica" in _unknown(typo, schema, "DaskCluster")

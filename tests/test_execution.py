"""wsiflow.execution.cluster / tasks: layout defaults, TLS options, loopback binding,
torch threads in workers, connecting to an external scheduler, error scoping."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from wsiflow.errors import ConfigError
from wsiflow.execution.cluster import (
    ClusterOptions,
    connect,
    default_layout,
    make_security,
    worker_devices,
)
from wsiflow.execution.loopback import free_port, loopback_cluster
from wsiflow.execution.tasks import TaskError


def _torch_threads():  # a function the workers can import (test modules are not importable there)
    import torch

    return torch.get_num_threads


def test_default_layout_uses_the_machine() -> None:
    assert default_layout("cpu", cpus=2, gpus=0) == (1, 2)
    assert default_layout("cpu", cpus=16, gpus=0) == (4, 4)
    assert default_layout("auto", cpus=16, gpus=2) == (2, 8)  # one worker per GPU
    assert default_layout("cpu", cpus=16, gpus=2) == (4, 4)  # --device cpu ignores GPUs
    assert default_layout("auto", cpus=1, gpus=0) == (1, 1)


def test_each_worker_gets_its_own_gpu() -> None:
    assert worker_devices(2, gpus=2) == ["0", "1"]
    assert worker_devices(4, gpus=2) == ["0", "1", "0", "1"]  # round robin: two per GPU
    assert worker_devices(1, gpus=0) == []  # no GPU: nothing pinned
    # the client's own CUDA_VISIBLE_DEVICES is dealt out (indices or UUIDs), not 0..n-1
    assert worker_devices(2, gpus=2, visible="3, 5") == ["3", "5"]
    assert worker_devices(3, gpus=1, visible="GPU-aa,GPU-bb") == ["GPU-aa"] * 3
    assert worker_devices(2, gpus=2, visible="") == ["0", "1"]


def _visible_devices() -> str | None:
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.mark.slow
def test_embedded_cluster_pins_one_gpu_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    # no GPU here: pretend the client sees two, and check what each worker process was given
    # (torch in the workers then sees none: CUDA_VISIBLE_DEVICES only narrows real devices)
    import wsiflow.execution.cluster as cluster

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(cluster, "_gpus", lambda device: 2)
    with connect(ClusterOptions(n_workers=2, threads_per_worker=1)) as session:
        seen = session.client.run(_visible_devices)
        assert sorted(seen.values()) == ["0", "1"]
        assert "GPUs 0,1" in session.description
        assert session.total_threads() == 2


def test_security_options(tmp_path: Path) -> None:
    assert make_security(ClusterOptions()) is None
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem"))
    for p in (ca, cert, key):
        p.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="--tls-key"):
        make_security(ClusterOptions(scheduler="tls://127.0.0.1:1", tls_ca_file=str(ca), tls_cert=str(cert)))
    with pytest.raises(ConfigError, match="tls://"):
        make_security(ClusterOptions(scheduler="tcp://127.0.0.1:1", tls_ca_file=str(ca), tls_cert=str(cert),
                                     tls_key=str(key)))
    with pytest.raises(ConfigError, match="--scheduler"):
        make_security(ClusterOptions(tls_ca_file=str(ca), tls_cert=str(cert), tls_key=str(key)))
    with pytest.raises(ConfigError, match="file not found"):
        make_security(ClusterOptions(scheduler="tls://127.0.0.1:1", tls_ca_file=str(tmp_path / "nope"),
                                     tls_cert=str(cert), tls_key=str(key)))
    sec = make_security(ClusterOptions(scheduler="tls://127.0.0.1:1", tls_ca_file=str(ca), tls_cert=str(cert),
                                       tls_key=str(key)))
    assert sec is not None and sec.require_encryption
    assert sec.tls_ca_file == str(ca) and sec.tls_client_cert == str(cert) and sec.tls_client_key == str(key)


def test_task_error_pickles_with_its_scope() -> None:
    err = pickle.loads(pickle.dumps(TaskError("tile", "x.svs: corrupt JPEG")))
    assert isinstance(err, TaskError) and err.scope == "tile" and str(err) == "x.svs: corrupt JPEG"


def test_scheduler_and_embedded_options_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match="embedded"), connect(
        ClusterOptions(scheduler="tcp://127.0.0.1:1", n_workers=2)
    ):
        pass


def test_unreachable_scheduler_is_one_clear_error() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(ConfigError, match="cannot connect"), connect(
        ClusterOptions(scheduler=f"tcp://127.0.0.1:{port}", connect_timeout_s=2)
    ):
        pass


@pytest.mark.slow
def test_embedded_cluster_is_loopback_processes_with_torch_threads() -> None:
    with connect(ClusterOptions(n_workers=1, threads_per_worker=2, device="cpu")) as session:
        client = session.client
        assert session.embedded
        info = client.scheduler_info()
        assert info["address"].startswith("tcp://127.0.0.1:")
        workers = list(info["workers"])
        assert len(workers) == 1 and all(w.startswith("tcp://127.0.0.1:") for w in workers)
        if session.dashboard_link is not None:
            assert session.dashboard_link.startswith("http://127.0.0.1:")
        assert client.submit(_torch_threads(), pure=False).result() == 2
        # a separate process: its pid differs from ours
        import os

        assert client.submit(os.getpid, pure=False).result() != os.getpid()


@pytest.mark.slow
def test_external_scheduler_gets_the_worker_setup(tmp_path: Path) -> None:
    with loopback_cluster(tmp_path / "logs", n_workers=1, nthreads=2) as pair, connect(
        ClusterOptions(scheduler=pair.address)
    ) as session:
        assert not session.embedded
        assert session.total_threads() == 2
        # torch threads follow the worker's thread count (the worker set OMP_NUM_THREADS=1)
        assert session.client.submit(_torch_threads(), pure=False).result() == 2

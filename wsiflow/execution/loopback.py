"""A real ``dask scheduler`` + ``dask worker`` processes on 127.0.0.1, for tests and benchmarks.

What ``--scheduler tcp://…`` connects to in production, started locally: free ports, each
process in its own process group, always stopped (TERM, then KILL) when the context exits,
whatever happens inside it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

DASK = str(Path(sys.executable).with_name("dask"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """TERM the process group we started (start_new_session), then KILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    else:  # the leader exited; its group may still hold children
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def process_env(threads: int = 1) -> dict[str, str]:
    """The environment with BLAS/OpenMP pools sized to ``threads`` and warnings off."""
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env["PYTHONWARNINGS"] = "ignore"
    return env


@dataclass
class LoopbackCluster:
    address: str
    scheduler: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)


def start_worker(
    address: str, log: Path, nthreads: int = 1, name: str = "w0", extra_env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A ``dask worker`` process; ``extra_env`` is added to its environment (e.g. a
    ``PYTHONPATH`` giving it another wsiflow install)."""
    env = {**process_env(nthreads), **(extra_env or {})}
    with log.open("ab") as fh:
        return subprocess.Popen(
            [DASK, "worker", address, "--host", "127.0.0.1", "--nthreads", str(nthreads),
             "--nworkers", "1", "--no-dashboard", "--name", name, "--death-timeout", "60"],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )  # fmt: skip


@contextlib.contextmanager
def loopback_cluster(
    logdir: Path, n_workers: int = 1, nthreads: int = 1, timeout: float = 60.0
) -> Iterator[LoopbackCluster]:
    """Scheduler + ``n_workers`` workers on loopback; yields once all workers joined."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logdir.mkdir(parents=True, exist_ok=True)
    with (logdir / "scheduler.log").open("ab") as fh:
        sched = subprocess.Popen(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=process_env(1),
        )  # fmt: skip
    cluster = LoopbackCluster(address, sched)
    try:
        deadline = time.monotonic() + timeout
        while not port_open(port):
            if sched.poll() is not None or time.monotonic() > deadline:
                log = (logdir / "scheduler.log").read_text()[-2000:]
                raise RuntimeError(f"dask scheduler did not start: {log}")
            time.sleep(0.2)
        for i in range(n_workers):
            cluster.workers.append(start_worker(address, logdir / f"worker{i}.log", nthreads, name=f"w{i}"))
        with Client(address, timeout=timeout, set_as_default=False) as c:
            c.wait_for_workers(n_workers, timeout=timeout)
        yield cluster
    finally:
        for w in cluster.workers:
            stop_process_group(w)
        stop_process_group(sched)

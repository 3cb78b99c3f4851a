"""A real ``dask scheduler`` + ``dask worker`` pair as subprocesses on 127.0.0.1 (tests only).

Started in their own process groups and always stopped (TERM, then KILL) by the context
manager, whatever the test does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DASK = str(Path(sys.executable).with_name("dask"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop(proc: subprocess.Popen[bytes]) -> None:
    """TERM the process group we started, then KILL it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@dataclass
class DaskPair:
    address: str
    scheduler: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start_worker(address: str, log: Path, nthreads: int = 1, name: str = "w0") -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(
            [DASK, "worker", address, "--host", "127.0.0.1", "--nthreads", str(nthreads),
             "--nworkers", "1", "--no-dashboard", "--name", name, "--death-timeout", "60"],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=_env(),
        )


@contextlib.contextmanager
def dask_pair(
    logdir: Path, n_workers: int = 1, nthreads: int = 1, timeout: float = 60.0
) -> Iterator[DaskPair]:
    """Scheduler + ``n_workers`` workers on loopback; yields once all workers joined."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logdir.mkdir(parents=True, exist_ok=True)
    with (logdir / "scheduler.log").open("ab") as fh:
        sched = subprocess.Popen(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=_env(),
        )
    pair = DaskPair(address, sched)
    try:
        deadline = time.monotonic() + timeout
        while not _port_open(port):
            if sched.poll() is not None or time.monotonic() > deadline:
                log = (logdir / "scheduler.log").read_text()[-2000:]
                raise RuntimeError(f"dask scheduler did not start: {log}")
            time.sleep(0.2)
        for i in range(n_workers):
            pair.workers.append(start_worker(address, logdir / f"worker{i}.log", nthreads, name=f"w{i}"))
        with Client(address, timeout=timeout, set_as_default=False) as c:
            c.wait_for_workers(n_workers, timeout=timeout)
        yield pair
    finally:
        for w in pair.workers:
            stop(w)
        stop(sched)

"""The Dask cluster a run uses: an embedded LocalCluster, or an existing scheduler.

Embedded (default): a :class:`distributed.LocalCluster` of worker *processes* (spawned,
so every entry point lives in an importable module), scheduler and dashboard bound to
127.0.0.1 only. ``--scheduler tcp://HOST:PORT`` (or ``tls://``) connects to an existing
cluster instead; nothing else about the run changes. TLS: pass ``--tls-ca-file``,
``--tls-cert`` and ``--tls-key`` (PEM files, as ``dask scheduler`` takes them), or set
``distributed.comm.tls.*`` in a Dask config file, which :class:`distributed.Client`
reads by default.

Every worker gets :class:`TorchThreads`, which sets ``torch.set_num_threads`` to the
worker's thread count (LocalCluster pins OMP/MKL threads to 1 in the workers, and an
external worker may have any environment).

GPUs: the embedded cluster makes one worker per visible GPU and pins each worker process to
its own device: worker *i* starts with ``CUDA_VISIBLE_DEVICES`` set to the *i*-th visible
device (round robin when ``--workers`` exceeds the GPUs), passed as the nanny's ``env`` so
it is in place before torch initialises CUDA in that process (:func:`worker_devices`,
:class:`PinnedLocalCluster`). Inside a worker its GPU is then ``cuda:0``. An external
cluster does the same by starting one ``dask worker`` per GPU, each with its own
``CUDA_VISIBLE_DEVICES`` and ``--resources GPU=1`` (docs/architecture.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.security import Security

from wsiflow.errors import ConfigError

__all__ = [
    "ClusterOptions",
    "ClusterSession",
    "PinnedLocalCluster",
    "TorchThreads",
    "connect",
    "default_layout",
    "make_security",
    "worker_devices",
]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    scheduler: str | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    device: str = "auto"
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    quiet: bool = True
    connect_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("", "--device", f"must be auto, cpu or cuda, not {self.device!r}")
        for key, value in (("--workers", self.n_workers), ("--threads-per-worker", self.threads_per_worker)):
            if value is not None and value < 1:
                raise ConfigError("", key, "must be at least 1")


@dataclass(frozen=True)
class ClusterSession:
    client: Client
    embedded: bool
    dashboard_link: str | None
    description: str

    def total_threads(self) -> int:
        return max(1, sum(self.client.nthreads().values()))


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_layout(device: str = "auto", cpus: int | None = None, gpus: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) for this machine.

    With CUDA: one worker per GPU, the CPUs shared among them. On CPU: workers of up to
    four threads each (one model copy per process; torch's intra-op threads do the rest).
    """
    cpus = _cpu_count() if cpus is None else max(1, cpus)
    if gpus is None:
        from wsiflow.models.device import cuda_device_count

        gpus = 0 if device == "cpu" else cuda_device_count()
    if gpus > 0 and device != "cpu":
        n = gpus
    else:
        n = max(1, cpus // 4)
    return n, max(1, cpus // n)


def worker_devices(n_workers: int, gpus: int, visible: str | None = None) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` value of each of ``n_workers`` workers: one device each.

    ``visible`` is the client's own ``CUDA_VISIBLE_DEVICES`` (indices or ``GPU-…`` UUIDs);
    its first ``gpus`` entries are dealt out, else ``0 … gpus-1``. Worker *i* gets device
    ``i mod gpus`` (two workers per GPU when there are twice as many workers). No GPUs → [].
    """
    if gpus < 1 or n_workers < 1:
        return []
    if visible is not None and visible.strip() not in ("", "-1"):
        devices = [d.strip() for d in visible.split(",") if d.strip()][:gpus]
    else:
        devices = [str(i) for i in range(gpus)]
    if not devices:
        return []
    return [devices[i % len(devices)] for i in range(n_workers)]


class PinnedLocalCluster(LocalCluster):
    """A LocalCluster whose worker *i* runs with ``CUDA_VISIBLE_DEVICES=devices[i]``.

    LocalCluster gives every worker the same spec; here the workers are added after start by
    :meth:`new_worker_spec`, each spec a copy with its own ``env`` (the nanny sets it in the
    worker process before anything in it imports torch).
    """

    def __init__(self, devices: Sequence[str], **kwargs: Any) -> None:
        if not devices:
            raise ValueError("PinnedLocalCluster needs at least one device")
        self.devices = list(devices)
        kwargs.pop("n_workers", None)
        super().__init__(n_workers=0, **kwargs)
        self.scale(len(self.devices))

    def new_worker_spec(self) -> dict[Any, dict[str, Any]]:
        ((name, spec),) = super().new_worker_spec().items()
        options = dict(spec.get("options") or {})
        env = dict(options.get("env") or {})
        env["CUDA_VISIBLE_DEVICES"] = self.devices[int(name) % len(self.devices)]
        options["env"] = env
        return {name: {**spec, "options": options}}


def _gpus(device: str) -> int:
    if device == "cpu":
        return 0
    from wsiflow.models.device import cuda_device_count

    return cuda_device_count()


def make_security(options: ClusterOptions) -> Security | None:
    given = {
        "--tls-ca-file": options.tls_ca_file,
        "--tls-cert": options.tls_cert,
        "--tls-key": options.tls_key,
    }
    if not any(given.values()):
        return None
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise ConfigError("", ", ".join(missing), "TLS needs --tls-ca-file, --tls-cert and --tls-key")
    for key, value in given.items():
        if not Path(str(value)).is_file():
            raise ConfigError("", key, f"file not found: {value}")
    if not options.scheduler:
        raise ConfigError("", "--tls-ca-file", "TLS is for --scheduler (the embedded cluster is local)")
    if not options.scheduler.startswith("tls://"):
        raise ConfigError("", "--scheduler", "with TLS options the address must start with tls://")
    return Security(
        tls_ca_file=options.tls_ca_file,
        tls_client_cert=options.tls_cert,
        tls_client_key=options.tls_key,
        require_encryption=True,
    )


class TorchThreads(WorkerPlugin):
    """Sets torch's intra-op thread count in each worker process (spawned: importable)."""

    name = "wsiflow-torch-threads"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def setup(self, worker: Any) -> None:
        from wsiflow.models.device import set_torch_threads

        set_torch_threads(self.threads or int(worker.state.nthreads))


def _dashboard(link: str | None) -> str | None:
    # Without bokeh the scheduler serves no dashboard, whatever the link says.
    if not link or find_spec("bokeh") is None:
        return None
    return link


@contextmanager
def connect(options: ClusterOptions) -> Iterator[ClusterSession]:
    """A client on an embedded LocalCluster, or on ``options.scheduler``; closed on exit.

    ``quiet`` is passed to the embedded workers (``silence_logs``): they log a traceback per
    failed task ("Compute Failed"), which the runner already reports in one line. The
    client process's own loggers are the CLI's to configure (``wsiflow.cli._logging``).
    """
    silence = logging.CRITICAL if options.quiet else logging.WARNING
    yield from _connect(options, silence)


def _connect(options: ClusterOptions, silence: int) -> Iterator[ClusterSession]:
    security = make_security(options)
    if options.scheduler:
        if options.n_workers is not None or options.threads_per_worker is not None:
            raise ConfigError(
                "", "--scheduler", "--workers/--threads-per-worker apply to the embedded cluster only"
            )
        try:
            client = Client(
                options.scheduler,
                security=security,
                timeout=options.connect_timeout_s,
                set_as_default=False,
            )
        except (OSError, TimeoutError) as exc:
            raise ConfigError("", "--scheduler", f"cannot connect to {options.scheduler}: {exc}") from None
        try:
            try:
                client.wait_for_workers(1, timeout=options.connect_timeout_s)
            except TimeoutError:
                why = f"{options.scheduler} has no workers (waited {options.connect_timeout_s:g} s)"
                raise ConfigError("", "--scheduler", why) from None
            client.register_plugin(TorchThreads())
            info = client.scheduler_info(n_workers=-1)
            workers = info.get("workers", {})
            yield ClusterSession(
                client=client,
                embedded=False,
                dashboard_link=_dashboard(client.dashboard_link),
                description=f"scheduler {options.scheduler} ({len(workers)} workers)",
            )
        finally:
            client.close()
        return

    gpus = _gpus(options.device)
    n_default, t_default = default_layout(options.device, gpus=gpus)
    n = options.n_workers or n_default
    t = options.threads_per_worker or t_default
    if n < 1 or t < 1:
        raise ConfigError("", "--workers", "workers and threads per worker must be at least 1")
    devices = worker_devices(n, gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    kwargs: dict[str, Any] = dict(
        threads_per_worker=t,
        processes=True,
        host=LOOPBACK,
        dashboard_address=f"{LOOPBACK}:0",
        silence_logs=silence,
    )
    cluster = PinnedLocalCluster(devices, **kwargs) if devices else LocalCluster(n_workers=n, **kwargs)
    try:
        client = Client(cluster, set_as_default=False)
        try:
            if devices:  # workers are added after start: wait for all of them
                client.wait_for_workers(n, timeout=options.connect_timeout_s)
            client.register_plugin(TorchThreads(t))
            yield ClusterSession(
                client=client,
                embedded=True,
                dashboard_link=_dashboard(cluster.dashboard_link),
                description=(
                    f"embedded cluster {cluster.scheduler_address} ({n} workers × {t} threads"
                    + (f", GPUs {','.join(devices)}" if devices else "")
                    + ")"
                ),
            )
        finally:
            client.close()
    finally:
        cluster.close()

"""The cluster is checked before work goes out (DESIGN §1; issue 16).

On connect the client asks every worker (``client.run`` →
:func:`wsiflow.execution.worker.describe_worker`) for its wsiflow version, the sha256 of the
pipeline's bundles as that worker resolves them, and whether it can read the slides the
client can. A worker that would compute different numbers, or could not compute at all
(another version, missing or different weights, no access to the slides), is named in one
line and the run stops before any slide starts (a :class:`ClusterMismatch`, exit 2),
instead of failing tile by tile.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from distributed import Client

from wsiflow._version import __version__
from wsiflow.errors import ConfigError
from wsiflow.execution.worker import ModelRefs, describe_worker
from wsiflow.types import StorageOptions

__all__ = ["ClusterMismatch", "check_cluster", "worker_problems"]


class ClusterMismatch(ConfigError):
    """Some workers would compute different numbers than the client expects."""


def _short(sha: str | None) -> str:
    return f"{sha[:12]}…" if sha else "?"


def worker_problems(report: Any, refs: ModelRefs, version: str = __version__) -> list[str]:
    """What differs between one worker's :func:`describe_worker` report and the client."""
    if isinstance(report, BaseException):
        what = f"{type(report).__name__}: {' '.join(str(report).split())}"
        return [f"cannot run wsiflow's check ({what}; is wsiflow {version} installed?)"]
    problems: list[str] = []
    if report.get("version") != version:
        problems.append(f"wsiflow {report.get('version')} (the client has {version})")
    bundles = report.get("bundles") or {}
    for task, ref, want in (
        ("segmenter", refs.segmenter, refs.segmenter_sha256),
        ("classifier", refs.classifier, refs.classifier_sha256),
    ):
        got = bundles.get(ref) or {"error": "not checked"}
        if "error" in got:
            problems.append(f"{task} bundle {ref!r}: {got['error']}")
        elif got.get("sha256") != want:
            problems.append(
                f"{task} bundle {ref!r} has other weights (sha256 {_short(got.get('sha256'))}, "
                f"the client's {_short(want)})"
            )
    unreadable = list(report.get("unreadable") or [])
    if unreadable:
        more = f" and {len(unreadable) - 1} more" if len(unreadable) > 1 else ""
        problems.append(f"cannot read the slide {unreadable[0]}{more}")
    return problems


def _first_reachable_url(urls: Sequence[str], storage: StorageOptions | None, tries: int = 3) -> str | None:
    """The first of (at most ``tries``) URLs the client itself can reach, else None."""
    import fsspec

    for url in urls[:tries]:
        try:
            fs, where = fsspec.core.url_to_fs(url, **(storage.to_dict() if storage else {}))
            if fs.isfile(where):
                return url
        except Exception:  # its own "cannot read" line comes when the slide is planned
            continue
    return None


def check_cluster(
    client: Client,
    refs: ModelRefs,
    slides: Sequence[str],
    storage: StorageOptions | None = None,
) -> int:
    """Ask every worker; raise :class:`ClusterMismatch` naming each worker that differs.
    Returns how many workers were checked. Only slides the client itself can read are
    checked on the workers (one the client cannot read fails on its own, one line)."""
    local = [os.path.abspath(s) for s in slides if "://" not in s]
    mine = [s for s in local if os.path.isfile(s) and os.access(s, os.R_OK)]
    url = _first_reachable_url([s for s in slides if "://" in s], storage)
    if url is not None:
        mine.append(url)  # workers check the first URL only
    bundles = [refs.segmenter, refs.classifier]
    reports: dict[str, Any] = client.run(describe_worker, bundles, mine, storage, on_error="return")
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    names = {addr: w.get("name") for addr, w in workers.items()}
    bad: list[str] = []
    for addr in sorted(reports):
        problems = worker_problems(reports[addr], refs)
        if problems:
            name = names.get(addr)
            label = f"worker {addr}" + (f" ({name})" if name is not None and str(name) != addr else "")
            bad.append(f"{label}: {'; '.join(problems)}")
    if bad:
        n = f"{len(bad)} of {len(reports)} workers" if len(reports) > 1 else "the worker"
        raise ClusterMismatch(
            "",
            "cluster",
            f"{n} would compute different numbers, nothing was run: {' | '.join(bad)}",
        )
    return len(reports)

"""One writer per output folder (issue 15 §4): a second run on a folder another run is
writing refuses with one line; the lock goes with its holder, killed or not."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsiflow.errors import OutputError
from wsiflow.writers.lock import LOCK_NAME, output_lock

HOLD = """
import sys, time
from wsiflow.writers.lock import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _holder(folder: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def test_a_second_writer_is_refused_until_the_first_is_gone(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    try:
        with pytest.raises(OutputError) as exc, output_lock(tmp_path):
            pass
        msg = str(exc.value)
        assert "another wsiflow run is writing to this output folder" in msg and f"pid {holder.pid}" in msg
        assert str(tmp_path) in msg and "\n" not in msg
    finally:
        holder.kill()  # killed, not unlocked: the kernel drops the lock with the process
        holder.wait()
    with output_lock(tmp_path), output_lock(tmp_path):  # free now; re-entrant within a process
        assert (tmp_path / LOCK_NAME).is_file()


def test_concurrent_resume_run_refuses_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    holder = _holder(out)
    try:
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "wsiflow", "run", str(tmp_path / "a.svs"), "-o", str(out), "--resume"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("wsiflow: error: ") and "another wsiflow run" in lines[0]
    assert not (out / "a").exists() and not (out / "summary.csv").exists()  # nothing written
    assert time.monotonic() - t0 < 120  # refused before any cluster started

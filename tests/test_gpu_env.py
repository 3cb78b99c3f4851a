"""What the GPU machine's Python lacks (issue 17: no geopandas, no bokeh there, and only the
wheels of benchmarks/gpu_wheels.txt): a plain ``wsiflow run`` must not need them.
geopandas is imported only where GeoParquet is asked for (``writers.geoparquet``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from standins import standin_pipeline, write_pipeline_yaml, write_smear

BLOCKED = ("geopandas", "bokeh")


def test_importing_the_cli_loads_no_geopandas() -> None:
    code = "import sys, wsiflow.cli.app; print(sorted(m for m in ('geopandas', 'bokeh') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_plain_run_works_where_geopandas_and_bokeh_cannot_be_imported(
    tmp_path: Path, standin_models: tuple[Path, Path]
) -> None:
    # packages of those names that refuse to import, first on the path of the CLI and of
    # its spawned workers: any import of them on the run's path fails the run
    block = tmp_path / "block"
    for name in BLOCKED:
        (block / name).mkdir(parents=True)
        (block / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked by the test')\n")
    smear, _ = write_smear(tmp_path / "smear.svs")
    pipe = write_pipeline_yaml(tmp_path / "p.yaml", standin_pipeline(*standin_models))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(block), os.environ.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable,
        "-m",
        "wsiflow",
        "run",
        str(smear),
        "-o",
        str(tmp_path / "out"),
        "--pipeline",
        str(pipe),
        "--workers",
        "1",
        "--threads-per-worker",
        "1",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "smear" / "summary.json").is_file()

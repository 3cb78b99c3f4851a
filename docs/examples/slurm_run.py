"""Start Dask workers as SLURM jobs with dask-jobqueue, then run ``wsiflow run`` on them.

    python docs/examples/slurm_run.py --config docs/examples/jobqueue-slurm.yaml --jobs 8 -- \
        /shared/slides/*.svs -o /shared/results/cohort1

Runs on a login node (or in a small SLURM job): the Dask scheduler lives in this process,
the workers are SLURM jobs that connect back to it, and ``wsiflow run ... --scheduler`` is
started with the scheduler's address once the first worker has joined. The workers are
cancelled when the run ends. ``--print-job-script`` prints the sbatch script the workers
would be submitted with and exits (nothing is submitted; tests/test_cluster_docs.py runs it).
Needs ``pip install dask-jobqueue``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=HERE / "jobqueue-slurm.yaml", help="dask-jobqueue YAML")
    ap.add_argument("--jobs", type=int, default=4, help="SLURM jobs to start (each runs `processes` workers)")
    ap.add_argument("--host", default=None, help="address the scheduler binds to (default: dask-jobqueue's)")
    ap.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the first worker")
    ap.add_argument("--print-job-script", action="store_true", help="print the sbatch script and exit")
    ap.add_argument("wsiflow_args", nargs=argparse.REMAINDER, help="-- then the arguments of `wsiflow run`")
    args = ap.parse_args(argv)

    import dask
    import yaml
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    config = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    dask.config.update(dask.config.config, config, priority="new")  # merged over the defaults
    scheduler_options = {"host": args.host} if args.host else {}
    with SLURMCluster(scheduler_options=scheduler_options) as cluster:
        if args.print_job_script:
            print(cluster.job_script())
            return 0
        cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=args.wait)
        run_args = [a for a in args.wsiflow_args if a != "--"]
        cmd = ["wsiflow", "run", *run_args, "--scheduler", cluster.scheduler_address]
        return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())

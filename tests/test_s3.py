"""Slides straight from object storage: ``wsiflow run 's3://bucket/x/*.svs'`` against moto's
S3 server, started here on 127.0.0.1 (no network). The client lists the glob through fsspec
(s3fs) and plans from the URL; the workers read pixels themselves through TiffSlide. The
cells equal those of the local copy of the file; credentials, given as ``--storage-options``
or in the AWS environment, appear nowhere in the output folder, stdout or stderr (the
embedded workers' logs included); a remote slide that is missing or not a slide gets one line.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from standins import standin_pipeline, write_pipeline_yaml, write_smear

from wsiflow.types import StorageOptions
from wsiflow.writers.summary import read_summary_csv
from wsiflow.writers.zarr_store import CellStore

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

pytestmark = pytest.mark.slow

BUCKET = "marrow"
KEY_ID = "AKIAWSIFLOWTESTKEY01"
SECRET = "wsiflow-test-secret-9f3b2c71d5e0"  # any leak of this string fails the test
ENV_SECRET = "wsiflow-env-secret-4a8e61c0b2d7"
CLUSTER = ["--workers", "1", "--threads-per-worker", "1", "--no-progress"]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # never ask an instance-metadata service
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    env.update(extra)
    return env


def wsiflow(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsiflow", *map(str, args)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def cells_of(slide_dir: Path):
    store = CellStore.open(slide_dir / "cells.zarr", mode="r")
    assert store.complete
    return store.read_table().sorted()


def _no_secret_in(out: Path, proc: subprocess.CompletedProcess[str], *secrets: str) -> None:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "summary.json" for p in files) and any(p.name == "zarr.json" for p in files)
    for secret in secrets:
        assert secret not in proc.stdout and secret not in proc.stderr
        for p in files:  # summary.json, summary.csv, Zarr attributes, GeoJSON, reports
            assert secret.encode() not in p.read_bytes(), p


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, standin_models):
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    endpoint = f"http://{host}:{port}"
    d = tmp_path_factory.mktemp("s3")
    smear, _ = write_smear(d / "smear.svs")
    (d / "notes.svs").write_text("this is not a slide\n")
    fs = s3fs.S3FileSystem(key=KEY_ID, secret=SECRET, endpoint_url=endpoint)
    fs.mkdir(BUCKET)
    fs.put(str(smear), f"{BUCKET}/x/smear.svs")
    fs.put(str(d / "notes.svs"), f"{BUCKET}/x/notes.svs")
    pipe = write_pipeline_yaml(d / "standin.yaml", standin_pipeline(*standin_models))
    try:
        yield d, smear, pipe, endpoint
    finally:
        server.stop()


@pytest.fixture(scope="module")
def local_cells(s3):
    d, smear, pipe, _ = s3
    out = d / "out-local"
    proc = wsiflow("run", smear, "-o", out, "--pipeline", pipe, "--no-report", *CLUSTER, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    return cells_of(out / "smear")


def test_a_glob_of_s3_slides_with_storage_options(s3, local_cells) -> None:
    d, _, pipe, endpoint = s3
    out = d / "out-s3"
    options = orjson.dumps({"key": KEY_ID, "secret": SECRET, "endpoint_url": endpoint}).decode()
    proc = wsiflow(
        "--debug", "run", f"s3://{BUCKET}/x/missing.svs", f"s3://{BUCKET}/x/*.svs", "s3://no-such-bucket/*.svs",
        "-o", out,
        "--pipeline", pipe, "--storage-options", options, *CLUSTER, env=_clean_env(),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # three bad inputs, one good slide
    assert "Traceback" not in proc.stderr
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("wsiflow: s3://")]  # not --debug's logs
    missing = [ln for ln in ours if "missing.svs" in ln]
    notes = [ln for ln in ours if "notes.svs" in ln]
    unlisted = [ln for ln in ours if "no-such-bucket" in ln]
    assert len(missing) == 1 and "no such file" in missing[0], proc.stderr
    assert len(notes) == 1 and "not a TIFF file" in notes[0], proc.stderr
    assert unlisted == ["wsiflow: s3://no-such-bucket/*.svs: no remote file matches (or it cannot be listed)"]
    # the same cells as the local copy of the file
    assert cells_of(out / "smear").equals(local_cells)
    doc = orjson.loads((out / "smear" / "summary.json").read_bytes())
    assert doc["slide"]["path"] == f"s3://{BUCKET}/x/smear.svs"
    assert doc["summary"]["n_cells"] == len(local_cells)
    _, rows = read_summary_csv(out / "summary.csv")
    assert sorted(r["status"] == "error" for r in rows) == [False, True, True, True]
    _no_secret_in(out, proc, SECRET)


def test_credentials_from_the_aws_environment(s3, local_cells) -> None:
    d, _, pipe, endpoint = s3
    out = d / "out-env"
    env = _clean_env(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=ENV_SECRET)
    proc = wsiflow(
        "run", f"s3://{BUCKET}/x/smear.svs", "-o", out, "--pipeline", pipe, "--no-report",
        "--storage-options", orjson.dumps({"endpoint_url": endpoint}).decode(), *CLUSTER, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert cells_of(out / "smear").equals(local_cells)
    _no_secret_in(out, proc, ENV_SECRET)


def test_storage_options_never_show_their_values() -> None:
    opts = StorageOptions({"key": KEY_ID, "secret": SECRET})
    assert SECRET not in repr(opts) and SECRET not in str(opts) and KEY_ID not in repr(opts)
    assert "secret" in repr(opts)  # the names do show
    back = pickle.loads(pickle.dumps(opts))  # workers get the values
    assert back == opts and back.to_dict()["secret"] == SECRET and hash(back) == hash(opts)
    from wsiflow.execution.worker import SlideRef

    assert SECRET not in repr(SlideRef("s3://b/x.svs", storage=opts))


@pytest.mark.parametrize("value", ['{"secret": "wsiflow-bad-json', '["a list"]'])
def test_a_bad_storage_options_value_is_a_usage_error_not_echoed(tmp_path: Path, value: str) -> None:
    out = tmp_path / "out"
    proc = wsiflow("run", "s3://b/x.svs", "-o", out, "--storage-options", value, env=_clean_env())
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsiflow: error: --storage-options:"), proc.stderr
    assert "wsiflow-bad-json" not in proc.stderr and "a list" not in proc.stderr

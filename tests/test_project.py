"""Project-level checks: light imports, packaging metadata, environment.yml parity."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# pyproject (PyPI) name -> conda-forge name, where they differ.
CONDA_NAME = {"torch": "pytorch", "openslide-bin": "openslide"}


def test_import_wsiflow_is_light() -> None:
    code = (
        "import sys, wsiflow, wsiflow.config, wsiflow.cells;"
        "heavy=[m for m in sys.modules if m.split('.')[0] in ('torch','dask','distributed','typer','tqdm')];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout}"


def _pyproject_names() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[=<>!~\[ ]", d, maxsplit=1)[0].lower() for d in deps}


def test_dependencies_are_pinned() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert all("==" in d for d in deps), [d for d in deps if "==" not in d]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps


def test_environment_yml_names_the_same_packages() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "conda-forge" in env["channels"]
    conda = {re.split(r"[=<> ]", d, maxsplit=1)[0].lower() for d in env["dependencies"] if isinstance(d, str)}
    wanted = {CONDA_NAME.get(n, n) for n in _pyproject_names()}
    assert wanted <= conda, f"missing from environment.yml: {sorted(wanted - conda)}"
    extra = conda - wanted - {"python", "pip"}
    assert not extra, f"in environment.yml but not pyproject: {sorted(extra)}"


def test_pinned_versions_agree_with_environment_yml() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {d.split("==")[0].lower(): d.split("==")[1] for d in deps}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = dict(d.split("=", 1) for d in env["dependencies"] if isinstance(d, str) and "=" in d)
    for name, ver in pins.items():
        cname = CONDA_NAME.get(name, name)
        if name == "openslide-bin":
            continue  # the wheel's version is its own; conda has the library itself
        assert conda.get(cname) == ver, f"{name}: pyproject {ver} vs environment.yml {conda.get(cname)}"


def _top_level_modules() -> set[str]:
    pkg = ROOT / "wsiflow"
    mods = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    mods |= {p.name for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return mods


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_layer_contract_places_every_module() -> None:
    (layers,) = [c for c in _contracts() if c["type"] == "layers"]
    assert layers["containers"] == ["wsiflow"] and layers["exhaustive"] is True
    placed = {m.strip() for layer in layers["layers"] for m in re.split(r"[:|]", layer)}
    assert placed | set(layers.get("exhaustive_ignores", [])) == _top_level_modules()


# which top-level modules may import each heavy library directly (DESIGN §4)
HEAVY_OWNERS = {
    "torch": {"models", "segment", "classify", "train"},
    "dask": {"execution"},
    "typer": {"cli"},
}


def test_heavy_import_contracts_cover_every_other_module() -> None:
    for lib, owners in HEAVY_OWNERS.items():
        (c,) = [c for c in _contracts() if c["type"] == "forbidden" and lib in c["forbidden_modules"]
                and c.get("allow_indirect_imports")]
        sources = {s.removeprefix("wsiflow.") for s in c["source_modules"]}
        assert sources == _top_level_modules() - owners - {"weights"}, lib


def test_logging_is_configured_only_in_the_cli() -> None:
    pattern = re.compile(r"basicConfig|\.setLevel\(|addHandler\(|logging\.disable\(|dictConfig|fileConfig")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sorted((ROOT / "wsiflow").rglob("*.py"))
        if "cli" not in p.relative_to(ROOT / "wsiflow").parts[:1]
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


def test_architecture_doc_is_linked_and_names_every_module() -> None:
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = [
        m
        for m in sorted(_top_level_modules() - {"weights"})
        if f"`{m}.py`" not in doc and f"`wsiflow/{m}/`" not in doc and f"`wsiflow/{m}.py`" not in doc
    ]
    assert not missing, f"docs/architecture.md does not place: {missing}"
    for path in re.findall(r"`wsiflow/([a-z_]+)/`", doc):
        assert (ROOT / "wsiflow" / path).is_dir(), path


def test_missing_shared_data_fails_where_it_is_expected(tmp_path) -> None:
    """CI sets WSIFLOW_REQUIRE_SHARED_DATA=1: without ../shared/data the tests that need it
    fail there instead of skipping; elsewhere they skip, visibly, with the reason."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    test = "tests/test_info_cli.py::test_info_on_the_real_slides"

    def run(require: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "WSIFLOW_SHARED_DATA": str(tmp_path / "nowhere")}
        env["WSIFLOW_REQUIRE_SHARED_DATA"] = require
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
            cwd=root, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    r = run("1")
    assert r.returncode == 1 and "1 error" in r.stdout, r.stdout
    assert "WSIFLOW_REQUIRE_SHARED_DATA is set" in r.stdout
    r = run("")
    assert r.returncode == 0 and "1 skipped" in r.stdout and "shared data not found" in r.stdout, r.stdout
    ci = (root / ".ci" / "run").read_text()
    assert "export WSIFLOW_REQUIRE_SHARED_DATA=1" in ci

"""The project as `pip install` delivers it: what the wheel holds (modules, the web page, the YAML
recipes, the licence, the entry point), what the sdist holds, one version, and the extras declared in
pyproject.toml matching the modules the code asks for (imdb_lora.extras)."""

import fnmatch
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from conftest import REPO
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE = REPO / "src" / "imdb_lora"


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalized(re.match(r"[A-Za-z0-9._-]+", r)[0]) for r in requirements}


def data_files() -> list[Path]:
    """Every file in the package tree that is not Python code."""
    return [
        p
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]


def test_package_data_covers_every_file_the_code_opens():
    # a file the code opens (the page, a shipped config) but no pattern names is left out of the wheel:
    # it works from a checkout and fails once installed
    declared = PYPROJECT["tool"]["setuptools"]["package-data"]
    found = data_files()
    assert {p.relative_to(PACKAGE).as_posix() for p in found} >= {
        "serving/static/index.html",
        "configs/reference.yaml",
    }
    for p in found:
        covered = any(
            p.is_relative_to(PACKAGE.parent / pkg.replace(".", "/"))
            and any(
                fnmatch.fnmatch(p.relative_to(PACKAGE.parent / pkg.replace(".", "/")).as_posix(), pattern)
                for pattern in patterns
            )
            for pkg, patterns in declared.items()
        )
        assert covered, f"{p.relative_to(REPO)} is not in [tool.setuptools.package-data]"


def test_the_version_is_written_once():
    import imdb_lora

    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "imdb_lora.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", imdb_lora.__version__)


def test_each_extra_the_code_names_is_declared_with_the_packages_it_checks():
    from imdb_lora.extras import EXTRAS

    declared = PYPROJECT["project"]["optional-dependencies"]
    dists = packages_distributions()  # top-level module -> distributions (the dev install has them all)
    for extra, modules in EXTRAS.items():
        assert extra in declared, extra
        names = requirement_names(declared[extra])
        for module in modules:
            assert {normalized(d) for d in dists[module]} & names, f"{module} is not from extra {extra!r}"


def test_the_pins_hold_the_gpu_machines_versions():
    # the GPU machine runs the code from source with these (requirements/gpu-machine.txt): a range
    # that excluded them would make `pip install` refuse the very versions the figures come from

    pins = dict(
        line.split("==")
        for line in (REPO / "requirements" / "gpu-machine.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    deps = {Requirement(d).name: Requirement(d) for d in PYPROJECT["project"]["dependencies"]}
    assert pins.keys() <= deps.keys()
    for name, version in pins.items():
        assert deps[name].specifier.contains(version), f"{name}=={version} is outside {deps[name]}"
    assert "3.12" in PYPROJECT["project"]["requires-python"] or Requirement(
        f"python{PYPROJECT['project']['requires-python']}"
    ).specifier.contains("3.12")


def test_wheel_and_sdist_hold_what_an_install_needs(tmp_path):
    setuptools = pytest.importorskip("setuptools")  # no build isolation: offline, ~2 s, so the one here
    need = Requirement(PYPROJECT["build-system"]["requires"][0])
    if not need.specifier.contains(setuptools.__version__):  # pip's isolated build would fetch one
        pytest.skip(f"setuptools {setuptools.__version__} here; the build needs {need}")
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("src", "tests", "docs", "requirements", "scripts"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "Makefile"):
        shutil.copy(REPO / name, src / name)
    dist = tmp_path / "dist"
    built = []
    for hook in ("build_wheel", "build_sdist"):  # a process each: setuptools rewrites sys.argv
        code = f"from setuptools import build_meta as b; print('built:', b.{hook}({str(dist)!r}))"
        r = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        built.append(r.stdout.rsplit("built: ", 1)[1].strip())
    wheel_name, sdist_name = built

    with zipfile.ZipFile(dist / wheel_name) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    modules = {f"imdb_lora/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*.py")}
    data = {f"imdb_lora/{p.relative_to(PACKAGE).as_posix()}" for p in data_files()}
    assert modules | data <= names
    assert not [n for n in names if n.startswith(("tests/", "docs/", "scripts/")) or "__pycache__" in n]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "imdb-lora = imdb_lora.cli:main" in entry
    import imdb_lora

    assert f"\nVersion: {imdb_lora.__version__}\n" in meta
    assert "\nRequires-Python: >=3.10\n" in meta and "\nLicense-Expression: MIT\n" in meta
    assert (
        "Provides-Extra: serve" in meta and "Provides-Extra: onnx" in meta and "Provides-Extra: scale" in meta
    )

    with tarfile.open(dist / sdist_name) as t:
        top = sdist_name.removesuffix(".tar.gz")
        held = {n.removeprefix(f"{top}/") for n in t.getnames()}
    # the tests run from it (conftest.py with them; it held seven test files without it)
    assert {"LICENSE", "pyproject.toml", "tests/conftest.py", "tests/cli/test_cli.py", "Makefile"} <= held
    assert "src/imdb_lora/configs/reference.yaml" in held
    assert not [n for n in held if "__pycache__" in n or n.endswith(".pyc")]

"""The Makefile on a clean clone: IMDB_LORA_DATA points at the shared archive only where one exists."""

import os
import shutil
import subprocess

import pytest
from conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def make_env(*args: str, **env: str) -> str:
    """What `make` exports as IMDB_LORA_DATA to its recipes, for the given variables."""
    base = {k: v for k, v in os.environ.items() if k != "IMDB_LORA_DATA"}
    show = 'show-data: ; @echo "[$$IMDB_LORA_DATA]"'
    r = subprocess.run(["make", "-s", "--no-print-directory", f"--eval={show}", "show-data", *args],
                       cwd=REPO, env={**base, **env}, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_no_shared_folder_means_no_data_override(tmp_path):
    # nothing exported: `imdb-lora train` falls back to the official download, never "--data: no such file"
    assert make_env(f"SHARED={tmp_path / 'nonexistent'}") == "[]"


def test_shared_archive_is_used_where_it_exists(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "aclImdb-labeled.tar.xz").write_bytes(b"")
    assert make_env(f"SHARED={tmp_path}") == f"[{tmp_path / 'data' / 'aclImdb-labeled.tar.xz'}]"


def test_the_users_own_setting_wins(tmp_path):
    assert make_env(f"SHARED={tmp_path}", IMDB_LORA_DATA="/my/imdb") == "[/my/imdb]"


@pytest.fixture
def fake_venv(tmp_path):
    """A set-up venv as far as make can tell, whose pytest only says how it was called."""
    bin_ = tmp_path / "venv" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "pytest").write_text('#!/bin/sh\necho "pytest called with: $*"\n')
    (bin_ / "pytest").chmod(0o755)
    (bin_ / "imdb-lora").write_text("")  # newer than pyproject.toml: `setup` has nothing to do
    return tmp_path / "venv"


def make_test(fake_venv, shared, pretrained) -> str:
    base = {k: v for k, v in os.environ.items() if k != "IMDB_LORA_DATA"}
    r = subprocess.run(["make", "-s", "--no-print-directory", "test", f"SHARED={shared}", f"VENV={fake_venv}",
                        f"PRETRAINED_DIR={pretrained}"], cwd=REPO, env=base, capture_output=True, text=True,
                       timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_make_test_without_shared_runs_the_fast_suite_and_says_why(fake_venv, tmp_path):
    out = make_test(fake_venv, tmp_path / "nonexistent", tmp_path / "none")
    assert "the real check (tests/test_real.py) needs" in out
    assert "pytest called with: -q -m not slow -n 2 --dist=worksteal" in out
    assert "-m slow" not in out.replace("not slow", "")


def test_make_test_with_weights_and_data_runs_everything(fake_venv, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "aclImdb-labeled.tar.xz").write_bytes(b"")
    (tmp_path / "pre" / "all-MiniLM-L6-v2").mkdir(parents=True)
    (tmp_path / "pre" / "all-MiniLM-L6-v2" / "model.safetensors").write_bytes(b"")
    out = make_test(fake_venv, tmp_path, tmp_path / "pre")
    # the fast suite over two workers, then the slow checks alone
    calls = [line for line in out.strip().splitlines() if line.startswith("pytest called with:")]
    assert calls == [
        "pytest called with: -q -m not slow -n 2 --dist=worksteal",
        "pytest called with: -q -m slow",
    ]


def test_gpu_versions_venv_installs_the_gpu_machines_torch_first(tmp_path):
    """`make test-gpu-versions` builds its venv with torch at requirements/gpu-machine.txt's version (not
    the default TORCH_VERSION, which a later step would then replace) and the file as pip constraints."""
    lines = (REPO / "requirements" / "gpu-machine.txt").read_text().splitlines()
    pinned = dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))
    assert {"torch", "transformers", "peft"} <= set(pinned)
    r = subprocess.run(["make", "-n", "--no-print-directory", "test-gpu-versions", f"GPU_VENV={tmp_path / 'v'}",
                        "GPU_PY=python3"], cwd=REPO, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    torch_installs = [line for line in r.stdout.splitlines() if "pip install" in line and "torch==" in line]
    assert torch_installs and all(f"torch=={pinned['torch']} " in line for line in torch_installs)
    assert "-c requirements/gpu-machine.txt" in r.stdout


def test_pytest_options_that_need_xdist_stay_out_of_pyproject():
    # scripts/gpu-checks.sh runs `python -m pytest` on the GPU machine, whose pytest may lack pytest-xdist:
    # an xdist option in addopts would make it refuse to start, and the CUDA checks would not run there.
    import tomllib

    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    addopts = options.get("addopts", [])
    addopts = addopts.split() if isinstance(addopts, str) else addopts
    assert not [o for o in addopts if o.startswith(("-n", "--numprocesses", "--dist", "-d", "--tx"))], addopts

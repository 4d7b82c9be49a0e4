"""The real check: real MiniLM weights, real IMDB reviews, the real CLI (a few minutes on 2 cores).

MiniLM comes from `../shared/tools/fetch-pretrained minilm` (`make test` runs it first); the data is the
shared IMDB archive (or $IMDB_LORA_DATA).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SHARED

pytestmark = pytest.mark.slow

MINILM = Path(os.environ.get("PRETRAINED_DIR", Path.home() / ".cache" / "pretrained")) / "all-MiniLM-L6-v2"
DATA = Path(os.environ.get("IMDB_LORA_DATA", SHARED / "data" / "aclImdb-labeled.tar.xz"))


# The recipe (chosen on validation, docs/experiments.md); `--config minilm-quick` ships the same
# (tests/test_config.py checks they agree). Head+tail keeps the verdict at a review's end.
REAL_CHECK_FLAGS = ["--max-train-samples", "2000", "--max-eval-samples", "1000", "--max-length", "128",
                    "--epochs", "1", "--seed", "42",
                    "--batch-size", "16", "--truncation", "head_tail", "--head-tokens", "64"]  # fmt: skip


def test_minilm_learns_imdb(tmp_path):
    assert (MINILM / "model.safetensors").is_file(), f"run `{SHARED}/tools/fetch-pretrained minilm` first"
    assert DATA.exists(), f"IMDB data not found at {DATA}"
    out = tmp_path / "minilm"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    cmd = [sys.executable, "-m", "imdb_lora", "train", "--model", str(MINILM), "--data", str(DATA),
           "--output-dir", str(out), *REAL_CHECK_FLAGS]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    elapsed = time.time() - t0
    info = json.loads((out / "run.json").read_text())
    print(f"\nreal check: MiniLM, 2,000 train / 1,000 test reviews, 128 tokens, 1 epoch: "
          f"test accuracy {100 * info['test_accuracy']:.2f}%, val {100 * info['val_accuracy']:.2f}%, "
          f"train {info['train_seconds']:.0f}s, wall {elapsed:.0f}s, "
          f"trainable {info['trainable_parameters']:,} of {info['total_parameters']:,}")  # fmt: skip
    assert info["examples"] == {"train": 2000, "val": 1000, "test": 1000}
    # The recipe is deterministic on the CPU: it reached 80.80% test (85.10% validation) on the 2-core CPU
    # machine (torch 2.13.0+cpu) on 2026-11-28, after the sub-package restructure, and again on 2026-12-01
    # when that machine had another CPU (AVX-512 VNNI, not AVX2). The threshold sits half
    # a point under that, so a regression of a point (10 of the 1,000 reviews) fails.
    assert info["test_accuracy"] >= 0.803
    # calibration: the temperature fitted on validation leaves the labels alone and lowers validation ECE
    cal = info["calibration"]
    print(f"calibration: temperature {cal['temperature']:.3f}, ECE val {100 * cal['val']['before']['ece']:.2f}% -> "
          f"{100 * cal['val']['after']['ece']:.2f}%, test {100 * cal['test']['before']['ece']:.2f}% -> "
          f"{100 * cal['test']['after']['ece']:.2f}%")  # fmt: skip
    assert (out / "calibration.json").is_file() and (out / "reliability.png").is_file()
    for split in ("val", "test"):
        assert cal[split]["after"]["accuracy"] == cal[split]["before"]["accuracy"]
    assert cal["val"]["after"]["nll"] <= cal["val"]["before"]["nll"]
    assert cal["val"]["after"]["ece"] <= cal["val"]["before"]["ece"]
    # the CLI's own evaluation of the finished run agrees with the training record
    r = subprocess.run([sys.executable, "-m", "imdb_lora", "evaluate", str(out), "--max-samples", "1000", "--json"],
                       capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(info["test_accuracy"], abs=1e-6)

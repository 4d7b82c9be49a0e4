"""SIGKILL a real `imdb-lora train` process mid-epoch: `--resume` finishes it exactly as an uninterrupted
run does (metrics less timings, logits bit for bit), and the lock died with the killed process."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import hold_train_at, train_args, wait_running_until, write_imdb
from safetensors import safe_open

from imdb_lora.cli import main
from imdb_lora.inference.classifier import Classifier

TEXTS = ["great wonderful film", "awful boring waste", "the plot was dull and poor", "loved it. brilliant"]
TIMINGS = ("train_seconds", "eval_seconds")


def progress(run) -> dict | None:
    """The progress saved in the run's checkpoint, or None while there is none (or it is being replaced)."""
    try:
        with safe_open(run / "checkpoint.safetensors", "pt") as f:
            return json.loads(f.metadata()["progress"])
    except Exception:  # noqa: BLE001 - not written yet
        return None


def metrics(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


@pytest.fixture(scope="module")
def longer_imdb(tmp_path_factory):
    """Enough reviews for 18 steps an epoch (72 train reviews, batch 4), so a kill lands inside one."""
    return write_imdb(tmp_path_factory.mktemp("imdb48"), per_class=48, seed=1)


# a real process killed and resumed (~15 s): slow, run by `make test` and CI after the fast suite
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tiny_models, longer_imdb, tmp_path):
    def args(out):
        return train_args(tiny_models("bert"), longer_imdb, out, "--batch-size", "4", "--max-length", "32",
                          "--checkpoint-every", "2", "--no-token-cache")  # fmt: skip

    killed = tmp_path / "killed"
    # one thread, as in this process (conftest), so both halves compute with the same reductions
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # killed after step 4 of epoch 2 (its checkpoint written), so the resume starts inside an epoch with
    # history: the process waits there for the kill (a test that killed it on seeing a checkpoint of
    # epoch 2 could, on a loaded machine, kill it once epoch 2 was over)
    held = tmp_path / "held"
    env = hold_train_at("_after_step:22", held, env)
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imdb_lora", *args(killed)], env=env, stdout=f, stderr=f
        )
    try:
        wait_running_until(proc, held.exists)
        assert proc.poll() is None and held.exists(), (
            f"training never reached step 22: {log.read_text()[-2000:]}"
        )
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at = progress(killed)
    assert at["epoch"] == 2 and at["step_in_epoch"] == 4 and len(at["history"]) == 1
    assert json.loads((killed / "run.json").read_text())["status"] == "running"

    # the killed process's flock is gone with it: the resume takes the lock without complaint
    assert main(["train", "--output-dir", str(killed), "--resume", "--device", "cpu"]) == 0
    straight = tmp_path / "straight"
    assert main(args(straight)) == 0
    assert metrics(killed) == metrics(straight) and len(metrics(straight)) == 2
    a = Classifier.load(str(straight), device="cpu").logits(TEXTS)
    b = Classifier.load(str(killed), device="cpu").logits(TEXTS)
    assert torch.equal(a, b)
    ra, rb = (json.loads((r / "run.json").read_text()) for r in (straight, killed))
    assert (ra["best_epoch"], ra["val_accuracy"], ra["test_accuracy"]) == (
        rb["best_epoch"],
        rb["val_accuracy"],
        rb["test_accuracy"],
    )

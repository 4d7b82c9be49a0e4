"""Data-parallel training: torchrun with 2 CPU processes (gloo) computes what one process computes.

The tiny bert is rebuilt without dropout (hidden, attention, LoRA), so one process with batch 8 and two
with batch 4 each run the same computation; 25 training reviews make the last batch of every epoch a
single review, so rank 1 steps on a weightless stand-in there; 9 evaluation reviews split 5 + 4.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import hold_train_at, sigint_as_in_a_terminal, train_args, wait_running_until

from imdb_lora.cli import main
from imdb_lora.config import Config, Given
from imdb_lora.errors import UserError
from imdb_lora.inference.classifier import Classifier
from imdb_lora.training.distributed import Dist

HERE = Path(__file__).resolve().parent
TEXTS = ["great wonderful film", "awful boring waste", "the plot was dull and poor", "loved it. brilliant"]
TOL = 1e-5
TIMINGS = ("train_seconds", "eval_seconds")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def no_dropout_bert(tiny_models, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("nodrop") / "bert"
    shutil.copytree(tiny_models("bert"), dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def recipe(model: Path, data: Path, out: Path, per_device_batch: int) -> list[str]:
    return train_args(
        model, data, out, "--lora-dropout", "0", "--lr", "1e-2", "--epochs", "2", "--checkpoint-every", "2",
        "--max-train-samples", "25", "--max-eval-samples", "9", "--batch-size", str(per_device_batch),
    )  # fmt: skip


def torchrun(*args: str, env: dict | None = None, log_dir: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS` (a free port each time)."""
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    cmd = [*TORCHRUN, *logs, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def one_process(no_dropout_bert, imdb_dir, tmp_path_factory) -> Path:
    """The reference: one process, batch 8."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(recipe(no_dropout_bert, imdb_dir, out, 8)) == 0
    return out


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    ma, mb = metrics(a), metrics(b)
    assert [r.keys() for r in ma] == [r.keys() for r in mb]
    for ra, rb in zip(ma, mb):
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=TOL), (k, ra, rb)
    la = Classifier.load(str(a), device="cpu").logits(TEXTS)
    lb = Classifier.load(str(b), device="cpu").logits(TEXTS)
    assert torch.allclose(la, lb, atol=TOL), (la - lb).abs().max()
    ia, ib = (json.loads((r / "run.json").read_text()) for r in (a, b))
    assert ia["best_epoch"] == ib["best_epoch"] and ia["test_accuracy"] == pytest.approx(ib["test_accuracy"])


# ---------------------------------------------------------------- the plumbing, in one process


def test_shards_are_disjoint_and_scaled_to_the_global_mean():
    batch = list(range(7))
    ranks = [Dist(rank=r, world_size=2) for r in range(2)]
    shares = [d.shard_batch(batch) for d in ranks]
    assert sorted(shares[0][0] + shares[1][0]) == batch
    # DDP averages the ranks' gradients: (4/7*2 * mean_4 + 3/7*2 * mean_3) / 2 = the mean over all 7
    assert [s for _, s in shares] == [pytest.approx(8 / 7), pytest.approx(6 / 7)]
    stand_in = Dist(rank=1, world_size=2).shard_batch([5])
    assert stand_in == ([5], 0.0)  # rank 1 has nothing: it steps on rank 0's review, weighing zero
    assert Dist().shard_batch(batch) == (batch, 1.0)


def test_environment_and_resume_checks(tmp_path):
    assert Dist.from_env({}) == Dist()
    d = Dist.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (d.rank, d.world_size, d.local_rank, d.enabled, d.main) == (3, 4, 1, True, False)
    with pytest.raises(UserError, match="RANK=4, WORLD_SIZE=4"):
        Dist.from_env({"WORLD_SIZE": "4", "RANK": "4", "LOCAL_RANK": "0"})
    d.check_resume({"world_size": 4}, tmp_path)
    with pytest.raises(UserError, match="trained by 1 process"):
        d.check_resume({}, tmp_path)  # runs from before data parallelism were single-process
    cfg = Config()
    cfg.train.batching, cfg.train.cuda_graphs = "flat", True
    Dist().check(cfg)  # one process: fine
    with pytest.raises(UserError, match="--cuda-graphs does not run under torchrun"):
        d.check(cfg)
    cfg.train.cuda_graphs, cfg.train.bf16_working_copies = False, True
    Dist().check(cfg)
    with pytest.raises(UserError, match="--bf16-working-copies does not run under torchrun"):
        d.check(cfg)


def test_torchrun_refusals_name_a_config_files_setting_by_file_and_key():
    """The data-parallel refusals named --cuda-graphs, --bf16-working-copies and --device whatever had
    set them; the trainer passes its config.Given, and a typed flag is still named by the flag."""
    d = Dist.from_env({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    given = Given(file="my.yaml", in_file=frozenset({"train.batching", "train.cuda_graphs", "train.device"}))
    cfg = Config()
    cfg.train.batching, cfg.train.cuda_graphs = "flat", True
    with pytest.raises(UserError, match=r"^my\.yaml: train\.cuda_graphs does not run under torchrun: .*; set "
        r"it false there \(train\.batching: flat itself works\)$"):  # fmt: skip
        d.check(cfg, given)
    with pytest.raises(UserError, match=r"^--cuda-graphs does not run .*; drop the flag \(--batching flat "):
        d.check(cfg, Given())
    cfg.train.cuda_graphs, cfg.train.bf16_working_copies = False, True
    in_file = Given(file="my.yaml", in_file=frozenset({"train.bf16_working_copies"}))
    with pytest.raises(
        UserError, match=r"^my\.yaml: train\.bf16_working_copies does not .*; set it false there$"
    ):
        d.check(cfg, in_file)
    # checked before CUDA is touched: the same on a machine without it
    with pytest.raises(
        UserError,
        match=r"^my\.yaml: train\.device cuda:1: under torchrun .*; set it to cuda \(or auto\) there$",
    ):
        d.start(torch.device("cuda", 1), given.where("train.device"))
    with pytest.raises(
        UserError, match=r"^--device cuda:1: under torchrun .*; pass --device cuda \(or auto\)$"
    ):
        d.start(torch.device("cuda", 1))


def test_the_resume_hint_names_the_launch_a_run_needs():
    run = Path("runs/my run")
    assert Dist().resume_command(run) == "imdb-lora train --output-dir 'runs/my run' --resume"
    env = {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0"}
    one_machine = Dist.from_env({**env, "LOCAL_WORLD_SIZE": "4"})  # torchrun: every process is local
    want = "torchrun --nproc-per-node 4 -m imdb_lora train --output-dir 'runs/my run' --resume"
    assert one_machine.resume_command(run) == want
    for other in ({**env, "LOCAL_WORLD_SIZE": "2"}, env):  # two machines, or a launcher that does not say
        hint = Dist.from_env(other).resume_command(run)
        assert hint.startswith("torchrun -m imdb_lora train") and "4 processes in all" in hint


def test_write_probe_sees_a_runs_writes(tmp_path):
    """The audit hook the torchrun tests rely on does see writes to the run directory."""
    run, log = tmp_path / "run", tmp_path / "log"
    run.mkdir()
    r = subprocess.run([sys.executable, str(HERE / "ddp_probe.py"), "--self-test", str(run), str(log)])
    assert r.returncode == 0
    seen = log.read_text()
    assert "run.json.tmp" in seen and "os.rename" in seen and ".lock" in seen and "os.mkdir" in seen


# ---------------------------------------------------------------- torchrun, 2 processes, gloo


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(one_process, no_dropout_bert, imdb_dir, tmp_path):
    out = tmp_path / "ddp"
    r = torchrun("-m", "imdb_lora", *recipe(no_dropout_bert, imdb_dir, out, 4))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done: ") == 1 and r.stdout.count("epoch 1: ") == 1  # rank 0 reports alone
    assert_same_run(one_process, out)
    info = json.loads((out / "run.json").read_text())
    assert (info["world_size"], info["global_batch_size"]) == (2, 8)
    assert json.loads((one_process / "run.json").read_text())["world_size"] == 1
    assert {p.name for p in out.iterdir()} == {p.name for p in one_process.iterdir()}


@pytest.mark.slow
def test_torchrun_with_fused_qkv_matches_one_process_with_it(no_dropout_bert, imdb_dir, tmp_path):
    """--fused-qkv runs data-parallel (its gradients reach the parameters through autograd, which DDP
    watches; unlike --bf16-working-copies): two processes with batch 4 compute what one with batch 8
    does, on the flat path with q, k and v fused."""
    flags = ("--batching", "flat", "--fused-qkv")
    one = tmp_path / "one"
    assert main([*recipe(no_dropout_bert, imdb_dir, one, 8), *flags]) == 0
    r = torchrun("-m", "imdb_lora", *recipe(no_dropout_bert, imdb_dir, tmp_path / "ddp", 4), *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(one, tmp_path / "ddp")
    assert "fused q/k/v" in json.loads((tmp_path / "ddp" / "run.json").read_text())["train_path"]


@pytest.mark.slow
def test_torchrun_killed_mid_epoch_resumes_to_the_same_result(
    one_process, no_dropout_bert, imdb_dir, tmp_path, capsys
):
    out, log = tmp_path / "ddp", tmp_path / "writes"
    probe = {"PROBE_RUN_DIR": str(out), "PROBE_LOG": str(log)}
    args = [str(HERE / "ddp_probe.py"), *recipe(no_dropout_bert, imdb_dir, out, 4)]
    # 4 steps per epoch (8 + 8 + 8 + 1 reviews), a checkpoint every 2: step 7 is epoch 2, step 3
    killed = torchrun(*args, env={**probe, "PROBE_KILL_AT_STEP": "7"})
    assert killed.returncode != 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "running" and info["epochs_done"] == 1 and info["world_size"] == 2

    # one process cannot continue what two started: one clear line, nothing changed
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "trained by 2 processes and this launch has 1" in err and "Traceback" not in err

    resumed = torchrun(
        *args[:1], "train", "--output-dir", str(out), "--resume", env=probe, log_dir=tmp_path / "logs"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rank_logs = {p.parent.name + "/" + p.name: p.read_text() for p in (tmp_path / "logs").rglob("*.log")}
    assert "resuming" in "".join(v for k, v in rank_logs.items() if k.startswith("0/"))
    assert "at epoch 2, step 2" in "".join(rank_logs.values())
    rank1 = "".join(v for k, v in rank_logs.items() if k.startswith("1/"))
    assert "epoch" not in rank1 and "eval" not in rank1 and "done" not in rank1  # no prints, no bars
    assert_same_run(one_process, out)
    assert Path(f"{log}.rank1").read_text() == ""  # rank 1 was watched (both launches) and never wrote


@pytest.mark.slow
def test_sigterm_to_a_torchrun_job_stops_every_rank_and_rank_0_alone_prints_the_resume_command(
    no_dropout_bert, imdb_dir, tmp_path
):
    """A scheduler stopping the job signals the whole process group (torchrun passes it on as well):
    one line, from rank 0, whose torchrun command then continues the run to the end."""
    out = tmp_path / "ddp"
    args = [*recipe(no_dropout_bert, imdb_dir, out, 4), "--epochs", "30"]  # far from done when stopped
    job = subprocess.Popen(
        [*TORCHRUN, "-m", "imdb_lora", *args], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    wait_running_until(job, (out / "checkpoint.safetensors").exists, poll=0.1)
    assert job.poll() is None and (out / "checkpoint.safetensors").exists(), "no checkpoint in 300 s"
    os.killpg(job.pid, signal.SIGTERM)
    err = job.communicate(timeout=120)[1]
    stops = [line for line in err.splitlines() if line.startswith("imdb-lora: stopped by SIGTERM")]
    assert len(stops) == 1, err[-3000:]
    hint = stops[0].split("continue it with: ")[1]
    assert (
        hint
        == f"torchrun --nproc-per-node 2 -m imdb_lora train --output-dir {shlex.quote(str(out))} --resume"
    )
    assert json.loads((out / "run.json").read_text())["status"] == "running"

    resumed = torchrun(*shlex.split(hint)[3:])  # the same launch: this test's torchrun, 2 processes
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_a_torchrun_job_stops_every_rank_after_the_same_step_and_resume_ends_as_uncut(
    sig, one_process, no_dropout_bert, imdb_dir, tmp_path
):
    """torchrun passes a signal on to every rank, and the ranks can be a step apart when it comes: they
    agree on the step to stop after. Here rank 1 waits after step 7 (of 8) for its signal while rank 0,
    which gets it too but is held at that step's boundary in the agreement, decides nothing alone. Both
    stop after step 7 with the signal's status, rank 0 writes a checkpoint of step 7 (none was due:
    --checkpoint-every 0; before, a data-parallel run stopped at once and kept the end of epoch 1's,
    step 4) and alone prints, and the torchrun --resume it prints ends with the uncut run's figures."""
    from safetensors import safe_open

    out, status, held = tmp_path / "ddp", tmp_path / "status", tmp_path / "held"
    env = hold_train_at("_after_step:7", held, {**os.environ, "PROBE_STATUS": str(status)}, rank=1)
    args = [str(HERE / "ddp_probe.py"), *recipe(no_dropout_bert, imdb_dir, out, 4), "--checkpoint-every", "0"]
    job = subprocess.Popen(
        [*TORCHRUN, *args],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    try:
        wait_running_until(job, held.exists, poll=0.05)
        assert job.poll() is None and held.exists(), "rank 1 never reached step 7"
        os.killpg(job.pid, sig)  # torchrun's own group, as a terminal or a scheduler signals it
        err = job.communicate(timeout=120)[1]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    what, name = ("stopped by SIGTERM", "SIGTERM") if sig == signal.SIGTERM else ("interrupted", "Ctrl-C")
    assert [Path(f"{status}.rank{r}").read_text() for r in (0, 1)] == [str(128 + sig)] * 2, err[-3000:]
    assert job.returncode == 1, err[-3000:]  # torchrun's own status, after its traceback (README says so)
    said = [line for line in err.splitlines() if line.startswith("imdb-lora: ")]
    assert said == [
        f"imdb-lora: {name}: finishing the step in flight and saving a checkpoint there, then stopping "
        "(under torchrun, Ctrl-C again does not stop it sooner)",
        f"imdb-lora: {what}; training was at step 7 of 8; its last checkpoint is "
        f"{out / 'checkpoint.safetensors'} (step 7); continue it with: torchrun --nproc-per-node 2 -m "
        f"imdb_lora train --output-dir {shlex.quote(str(out))} --resume",
    ], err[-3000:]
    with safe_open(out / "checkpoint.safetensors", "pt") as f:
        assert json.loads(f.metadata()["progress"])["global_step"] == 7
    assert json.loads((out / "run.json").read_text())["status"] == "running"

    resumed = torchrun(str(HERE / "ddp_probe.py"), "train", "--output-dir", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(one_process, out)

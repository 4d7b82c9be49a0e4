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


def torchrun(
    *args: str, env: dict | None = None, log_dir: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS` (a free port each time).
    A job still running after `timeout` s (ranks waiting in different collectives wait for gloo's 30
    minutes) fails the test: torchrun is sent SIGTERM, which it passes on to its ranks and follows with
    SIGKILL 30 s later (they run in sessions of their own: killing torchrun alone would leave them)."""
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    cmd = [*TORCHRUN, *logs, *args]
    job = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.terminate()
        try:
            err = job.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            job.kill()
            err = job.communicate()[1]
        pytest.fail(
            f"torchrun still running after {timeout} s (ranks waiting for each other?):\n{err[-3000:]}"
        )
    return subprocess.CompletedProcess(cmd, job.returncode, out, err)


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


# ---------------------------------------------------------------- --max-time under torchrun

# Seconds from the command's start. The 2-core machine starts the first step 3.7-4.4 s after it (torch's
# import, the rendezvous, the model) and runs all 8 steps in ~0.15 s: no real-clock budget can be aimed
# at a later step, and one spent during startup is still a cut inside the first epoch (after step 1).
BUDGET = "1"


@pytest.fixture(scope="module")
def cut_by_max_time(no_dropout_bert, imdb_dir, tmp_path_factory):
    """step -> the reference of a run --max-time cuts there: one process, batch 8, its clock made to
    run out at that step (built once per step)."""
    from imdb_lora.training.trainer import Trainer

    built: dict[int, Path] = {}

    def get(step: int) -> Path:
        if step not in built:
            out = tmp_path_factory.mktemp(f"cut{step}") / "run"
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(Trainer, "_elapsed", lambda self: 1e9 if self.state.global_step >= step else 0.0)
                assert main([*recipe(no_dropout_bert, imdb_dir, out, 8), "--max-time", BUDGET]) == 0
            built[step] = out
        return built[step]

    return get


def cut_line(step: int) -> str:
    """What rank 0 says at a --max-time cut of the tests' runs (4 steps an epoch, 8 in all)."""
    epoch, in_epoch = 1 + (step - 1) // 4, 1 + (step - 1) % 4
    return (
        f"--max-time {BUDGET} reached at step {step} (epoch {epoch}, {in_epoch} of its 4 steps): "
        "evaluating it, then finishing the run"
    )


def assert_cut_and_finished(run: Path, stdout: str, cut_by_max_time) -> int:
    """run.json records the cut (at a step before the last), the done line says it, and the figures
    are one process's cut at the same step; the step of the cut."""
    info = json.loads((run / "run.json").read_text())
    step = info["steps_done"]
    assert (info["status"], info["ended_by"], info["max_time"], info["total_steps"]) == (
        "finished", "max_time", BUDGET, 8,
    )  # fmt: skip
    assert 1 <= step < 8 and info["world_size"] == 2
    done = [line for line in stdout.splitlines() if line.startswith("done: ")]
    assert len(done) == 1 and done[0].endswith(f" | stopped by --max-time {BUDGET} at step {step}"), stdout
    assert (
        f"| Training ended by | --max-time {BUDGET} (step {step} of 8) |" in (run / "results.md").read_text()
    )
    assert_same_run(cut_by_max_time(step), run)
    return step


@pytest.mark.slow
def test_max_time_under_torchrun_stops_every_rank_after_the_same_step_and_rank_0_alone_reports(
    cut_by_max_time, no_dropout_bert, imdb_dir, tmp_path
):
    """--max-time on a real clock under torchrun: rank 0's clock decides at each step boundary and the
    stop's collective passes it on. Rank 1's own clock stands still here (PROBE_STILL_CLOCK_RANK), so it
    stops only because rank 0 says so; a rank deciding alone would go on training while the other
    evaluates, the two waiting in different collectives (the timeout then fails the test). The budget is
    spent at whichever step boundary the machine's load puts past it (the command's start counts, so
    here the first); every rank exits 0, rank 0 alone says where it cut and reports, run.json records
    the cut, and the figures are those of one process cut at the same step."""
    out, status = tmp_path / "ddp", tmp_path / "status"
    env = {"PROBE_STATUS": str(status), "PROBE_STILL_CLOCK_RANK": "1"}
    args = [str(HERE / "ddp_probe.py"), *recipe(no_dropout_bert, imdb_dir, out, 4), "--max-time", BUDGET]
    r = torchrun(*args, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [Path(f"{status}.rank{rank}").read_text() for rank in (0, 1)] == ["0", "0"]
    step = assert_cut_and_finished(out, r.stdout, cut_by_max_time)
    assert [line for line in r.stderr.splitlines() if "reached at step" in line] == [cut_line(step)]


@pytest.mark.slow
def test_a_torchrun_job_stopped_after_its_max_time_cut_resumes_to_the_figures_of_one_left_alone(
    cut_by_max_time, no_dropout_bert, imdb_dir, tmp_path
):
    """SIGTERM to the job after --max-time's cut (rank 1 held just past it, rank 0 going on to the cut
    epoch's evaluation, where it waits for rank 1): the ranks finish that evaluation and its record and stop together at the end-of-epoch
    checkpoint, which holds the cut, each with SIGTERM's status; the torchrun --resume that rank 0 prints
    trains no more step and finishes as the run left alone would have (README: Budgets)."""
    out, status, held = tmp_path / "ddp", tmp_path / "status", tmp_path / "held"
    env = hold_train_at("_cut_line", held, {**os.environ, "PROBE_STATUS": str(status)}, rank=1)
    args = [str(HERE / "ddp_probe.py"), *recipe(no_dropout_bert, imdb_dir, out, 4), "--max-time", BUDGET]
    job = subprocess.Popen(
        [*TORCHRUN, *args], stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        wait_running_until(job, held.exists, seconds=120, poll=0.05)
        assert job.poll() is None and held.exists(), "rank 1 never reached the cut"
        os.killpg(job.pid, signal.SIGTERM)
        err = job.communicate(timeout=120)[1]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert [Path(f"{status}.rank{rank}").read_text() for rank in (0, 1)] == ["143"] * 2, err[-3000:]
    info = json.loads((out / "run.json").read_text())
    step = info["steps_done"]
    said = [line for line in err.splitlines() if line.startswith(("imdb-lora: ", "--max-time "))]
    # rank 0 alone speaks; its signal's line comes before or after its cut line (rank 0 may still be
    # on its way to the evaluation when the signal comes), and says what it then finishes
    assert len(said) == 3 and said.count(cut_line(step)) == 1, err[-3000:]
    assert any(
        line.startswith("imdb-lora: SIGTERM: finishing ")
        and line.endswith(", then stopping (under torchrun, Ctrl-C again does not stop it sooner)")
        for line in said[:2]
    ), err[-3000:]
    assert said[2] == (
        f"imdb-lora: stopped by SIGTERM; training was at step {step} of 8; its last checkpoint is "
        f"{out / 'checkpoint.safetensors'} (step {step}); continue it with: torchrun --nproc-per-node 2 -m "
        f"imdb_lora train --output-dir {shlex.quote(str(out))} --resume"
    ), err[-3000:]
    assert info["status"] == "running" and info["epochs_done"] == 1 + (step - 1) // 4

    resumed = torchrun(str(HERE / "ddp_probe.py"), "train", "--output-dir", str(out), "--resume", timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "reached at step" not in resumed.stderr  # no step trained, no second cut
    assert assert_cut_and_finished(out, resumed.stdout, cut_by_max_time) == step

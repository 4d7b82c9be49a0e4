"""scripts/gpu_resume.py: a run cut by gpu-checks.sh's DEADLINE packed into what comes back from the device
(at most 8 files of 16 MiB), put back on the next machine with its paths, and timed by what it has left."""

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import train_args

from imdb_lora.cli import main
from imdb_lora.config import Config
from imdb_lora.training.trainer import Trainer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_resume.py"
spec = importlib.util.spec_from_file_location("gpu_resume", SCRIPT)
gpu_resume = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_resume)


def cut_run(root: Path, model: str, data: str, epochs_done: int = 1, payload: int = 200_000) -> Path:
    """A run directory as a cut training leaves it: a checkpoint (incompressible bytes behind a real
    safetensors header with the progress record), the best adapter so far, tokenizer, config, lock."""
    run = root / "mpnet-default"
    (run / "adapter").mkdir(parents=True)
    (run / "tokenizer").mkdir()
    progress = {"epoch": epochs_done + 1, "step_in_epoch": 3, "global_step": 7, "history": [{}] * epochs_done}
    header = json.dumps(
        {
            "__metadata__": {"progress": json.dumps(progress)},
            "w": {"dtype": "U8", "shape": [payload], "data_offsets": [0, payload]},
        }
    ).encode()
    (run / "checkpoint.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + os.urandom(payload)
    )
    (run / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(50_000))
    (run / "tokenizer" / "tokenizer.json").write_text("{}")
    cfg = Config()
    cfg.model.name, cfg.data.path = model, data
    cfg.save(run / "config.yaml")
    (run / "run.json").write_text(json.dumps({"status": "running"}))
    (run / ".lock").write_text("123")
    (run / "checkpoint.safetensors.tmp").write_bytes(b"half")
    return run


def tree(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_cut_run_comes_back_in_parts_and_resumes_under_another_home(tmp_path, monkeypatch, capsys):
    old, new = tmp_path / "old-home", tmp_path / "new-home"
    run = cut_run(old / "runs", f"{old}/runs/mpnet-fp32", f"{old}/stage/aclImdb-labeled.tar.xz")
    out = tmp_path / "OUT"
    out.mkdir()
    for name in ("log.txt", "summary.txt", "results.txt"):  # what the call writes before the packing
        (out / name).write_text("x")
    monkeypatch.setattr(gpu_resume, "PART_BYTES", 100_000)  # 16 MiB on the device
    assert gpu_resume.main(["pack", str(run), str(out)]) == 0
    parts = sorted(out.glob("mpnet-default.resume.tgz.*"))
    assert [p.name[-2:] for p in parts] == ["00", "01", "02"]
    assert all(p.stat().st_size <= 100_000 for p in parts)
    line = capsys.readouterr().out
    assert "epoch 2, step 3" in line and "1 epoch(s) done" in line and "mpnet-default.resume.tgz.02" in line

    stage, runs = new / "stage", new / "runs"
    stage.mkdir(parents=True)
    runs.mkdir()
    real = tmp_path / "elsewhere" / "aclImdb-labeled.tar.xz"  # the data reached through a link:
    real.parent.mkdir()  # config.yaml must hold it as train's own check of the settings resolves it
    real.write_bytes(b"")
    (stage / "aclImdb-labeled.tar.xz").symlink_to(real)
    for p in parts:  # the next session stages what came back
        (stage / p.name).write_bytes(p.read_bytes())
    model, data = f"{new}/runs/mpnet-fp32", f"{new}/stage/aclImdb-labeled.tar.xz"
    assert gpu_resume.main(["restore", str(stage), str(runs), "mpnet-default", model, data]) == 0
    assert "model.name" in capsys.readouterr().out
    back, was = tree(runs / "mpnet-default"), tree(run)
    # everything train --resume reads, byte for byte; the lock and the half-written temporary left out
    assert set(back) == set(was) - {".lock", "checkpoint.safetensors.tmp"}
    assert all(back[k] == was[k] for k in back if k != "config.yaml")
    cfg = Config.load(runs / "mpnet-default" / "config.yaml", flag=None)
    assert (cfg.model.name, cfg.data.path) == (model, str(real))
    assert cfg.to_dict()["lora"] == Config.load(run / "config.yaml", flag=None).to_dict()["lora"]
    # a second restore keeps the run already there (it may have trained on since)
    assert gpu_resume.main(["restore", str(stage), str(runs), "mpnet-default", model, data]) == 1


def test_a_state_that_does_not_fit_the_eight_files_is_said_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    run = cut_run(tmp_path / "runs", "/m/mpnet-fp32", "/d/aclImdb-labeled.tar.xz")
    out = tmp_path / "OUT"
    out.mkdir()
    for i in range(5):
        (out / f"f{i}.txt").write_text("x")
    monkeypatch.setattr(gpu_resume, "PART_BYTES", 100_000)  # 3 parts, + 5 files + summary.json > 8
    assert gpu_resume.main(["pack", str(run), str(out)]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [f"f{i}.txt" for i in range(5)]


def test_a_missing_part_leaves_no_half_run_behind(tmp_path, monkeypatch, capsys):
    run = cut_run(tmp_path / "old", "/m/mpnet-fp32", "/d/aclImdb-labeled.tar.xz")
    out, runs = tmp_path / "OUT", tmp_path / "runs"
    out.mkdir()
    runs.mkdir()
    monkeypatch.setattr(gpu_resume, "PART_BYTES", 100_000)
    assert gpu_resume.main(["pack", str(run), str(out)]) == 0
    (out / "mpnet-default.resume.tgz.01").unlink()  # left behind when staging
    assert gpu_resume.main(["restore", str(out), str(runs), "mpnet-default", "/n/mpnet-fp32", "/n/x"]) == 1
    assert "unreadable" in capsys.readouterr().out and not any(runs.iterdir())  # trained afresh instead


def test_a_run_cut_before_its_first_checkpoint_has_nothing_to_pack(tmp_path, capsys):
    out = tmp_path / "OUT"
    out.mkdir()
    assert gpu_resume.main(["pack", str(tmp_path / "removed"), str(out)]) == 1
    assert "no resume state" in capsys.readouterr().out and not any(out.iterdir())


def test_another_model_is_not_resumed(tmp_path):
    run = cut_run(tmp_path / "old", "/old/runs/mpnet-fp32", "/old/stage/aclImdb-labeled.tar.xz")
    with pytest.raises(SystemExit, match="model.name"):
        gpu_resume.repath(run / "config.yaml", "/new/runs/minilm-fp32", "/new/stage/aclImdb-labeled.tar.xz")


def test_a_resumed_run_needs_the_time_of_its_epochs_left(tmp_path):
    run = cut_run(tmp_path, "/m/mpnet-fp32", "/d/aclImdb-labeled.tar.xz", epochs_done=2)  # of 3
    assert gpu_resume.need(run, 370) == 30 + 114  # loading again, then a third of the training
    assert gpu_resume.need(tmp_path / "no-run", 370) == 370


class Crash(Exception):
    pass


def test_a_run_cut_on_one_machine_finishes_on_another_as_if_never_cut(
    tiny_models, imdb_dir, tmp_path, monkeypatch, capsys
):
    """The model and data under another home folder, the old machine's paths gone: the restored run
    resumes with --resume alone and ends as the uninterrupted run does."""

    def args(model, data, out):
        return train_args(model, data, out, "--checkpoint-every", "2", "--epochs", "2")

    assert main(args(tiny_models("bert"), imdb_dir, tmp_path / "straight")) == 0
    old, new = tmp_path / "old", tmp_path / "new"
    for home in (old, new):
        shutil.copytree(tiny_models("bert"), home / "runs" / "model")
        shutil.copytree(imdb_dir, home / "stage" / "imdb")
    steps = {"n": 0}

    def crash_after_7(self):
        steps["n"] += 1
        if steps["n"] == 7:  # epoch 2, just after its mid-epoch checkpoint
            raise Crash

    monkeypatch.setattr(Trainer, "_after_step", crash_after_7)
    with pytest.raises(Crash):
        main(args(old / "runs" / "model", old / "stage" / "imdb", old / "runs" / "cut"))
    monkeypatch.undo()
    out = tmp_path / "OUT"
    out.mkdir()
    assert gpu_resume.main(["pack", str(old / "runs" / "cut"), str(out)]) == 0
    shutil.rmtree(old)  # the machine goes back
    for p in out.glob("cut.resume.tgz.*"):
        shutil.copy(p, new / "stage")
    restored = ["restore", str(new / "stage"), str(new / "runs"), "cut"]
    assert gpu_resume.main([*restored, str(new / "runs" / "model"), str(new / "stage" / "imdb")]) == 0
    capsys.readouterr()
    assert main(["train", "--output-dir", str(new / "runs" / "cut"), "--resume"]) == 0
    assert "at epoch 2, step 2" in capsys.readouterr().out

    def rows(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(r).items() if not k.endswith("_seconds")} for r in lines]

    assert rows(new / "runs" / "cut") == rows(tmp_path / "straight")


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:5],  # cut inside the header's length
        lambda b: (10**15).to_bytes(8, "little") + b[8:],  # a garbled length: not read as asked
        lambda b: b[:8] + b"{not json" + b[17:],
    ],
)
def test_a_damaged_checkpoint_is_said_in_one_line_and_not_carried(tmp_path, capsys, damage):
    """The old reader ended pack and restore in a traceback (struct.error, a JSON error, or an attempt
    to read a garbled length's petabytes), restore's after the run was put back."""
    run = cut_run(tmp_path / "old", "/m/mpnet-fp32", "/d/aclImdb-labeled.tar.xz")
    checkpoint = run / "checkpoint.safetensors"
    checkpoint.write_bytes(damage(checkpoint.read_bytes()))
    out = tmp_path / "OUT"
    out.mkdir()
    assert gpu_resume.main(["pack", str(run), str(out)]) == 1
    line = capsys.readouterr().out
    assert "checkpoint unreadable" in line and len(line.splitlines()) == 1 and not any(out.iterdir())

    # staged as an earlier version packed it: not restored, so the run is trained afresh
    with tarfile.open(out / "mpnet-default.resume.tgz.00", "w:gz") as tar:
        for path in (p for p in run.rglob("*") if p.is_file()):
            tar.add(path, arcname=f"mpnet-default/{path.relative_to(run)}")
    runs = tmp_path / "runs"
    runs.mkdir()
    assert gpu_resume.main(["restore", str(out), str(runs), "mpnet-default", "/m/mpnet-fp32", "/d/x"]) == 1
    line = capsys.readouterr().out
    assert "staged checkpoint unreadable" in line and len(line.splitlines()) == 1 and not any(runs.iterdir())
    assert gpu_resume.need(run, 370) == 370  # the whole run's time, as before


def test_pack_and_need_run_without_torch(tmp_path):
    """As gpu-checks.sh runs the script (from the checkout's root, its src/ on PYTHONPATH): torch is never
    imported (~10 s on the GPU machine, right after a deadline), nor safetensors."""
    root = SCRIPT.parents[1]
    run = cut_run(tmp_path / "runs", "/m/mpnet-fp32", "/d/aclImdb-labeled.tar.xz", epochs_done=2)
    out = tmp_path / "OUT"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    for args, said in (
        (["pack", str(run), str(out)], "resume state back as"),
        (["need", str(run), "370"], "144"),
    ):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", str(SCRIPT), *args],
            cwd=root, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0 and said in done.stdout, done.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
        assert "imdb_lora.training.progress" in imported
        assert not {m for m in imported if m.split(".")[0] in ("torch", "safetensors", "numpy")}

"""scripts/gpu_summary.py: the JSON record of a gpu-checks.sh call (steps, figures, runs; no home paths)."""

import hashlib
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_summary.py"
spec = importlib.util.spec_from_file_location("gpu_summary", SCRIPT)
gpu_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_summary)


def test_steps_and_runs_are_recorded_without_home_paths(tmp_path):
    out = tmp_path / "step.txt"
    home = str(Path.home())
    out.write_text(
        "loading\nepoch 1: train loss 0.3 acc 0.9 | val loss 0.2 acc 0.93\n"
        '{"run": "r", "split": "val", "accuracy": 0.93}\n{not json\n'
        f"done: {home}/runs/x | best epoch 1\n"
    )
    steps = tmp_path / "steps.jsonl"
    cmd = ["imdb-lora", "train", "--model", f"{home}/runs/mpnet-fp32"]
    assert gpu_summary.main(["record", str(steps), "train-x", "0", "12", str(out), "--", *cmd]) == 0
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "finished", "val_accuracy": 0.93}))
    (run / "metrics.jsonl").write_text('{"epoch": 1, "val_accuracy": 0.93}\n')
    (run / "config.yaml").write_text("model:\n  pooling: mean\n")
    dest = tmp_path / "summary.json"
    assert gpu_summary.main(["write", str(steps), str(tmp_path / "runs"), str(dest), "levers", "1"]) == 0
    doc = json.loads(dest.read_text())
    (step,) = doc["steps"]
    assert step["step"] == "train-x" and step["rc"] == 0 and step["seconds"] == 12
    assert step["json"] == [{"run": "r", "split": "val", "accuracy": 0.93}]
    assert step["lines"][0].startswith("epoch 1:") and step["lines"][1].startswith("done:")
    assert step["command"][-1] == "~/runs/mpnet-fp32"
    assert doc["runs"][0]["summary"]["val_accuracy"] == 0.93 and doc["runs"][0]["epochs"][0]["epoch"] == 1
    assert doc["quick_rehearsal"] is True and "torch" in doc["machine"] and doc["what"].endswith("levers")
    assert home + "/" not in dest.read_text()


def test_a_cut_step_and_the_resume_state_that_came_back_are_recorded(tmp_path):
    out = tmp_path / "step.txt"
    out.write_text(
        "epoch 1: train loss 0.3 acc 0.9 | val loss 0.2 acc 0.93\n"
        "imdb-lora: stopped by SIGTERM; training was at step 900 of 2,112; its last checkpoint is x (step 800)\n"
    )
    steps = tmp_path / "steps.jsonl"
    assert (
        gpu_summary.main(["record", str(steps), "mpnet-default", "124", "300", str(out), "--", "train"]) == 0
    )
    dest = tmp_path / "OUT" / "summary.json"
    dest.parent.mkdir()
    (dest.parent / "mpnet-default.resume.tgz.00").write_bytes(b"ab")
    (dest.parent / "mpnet-default.resume.tgz.01").write_bytes(b"c")
    assert gpu_summary.main(["write", str(steps), str(tmp_path / "runs"), str(dest), "default", "1"]) == 0
    doc = json.loads(dest.read_text())
    assert doc["steps"][0]["rc"] == 124 and doc["steps"][0]["lines"][1].startswith(
        "imdb-lora: stopped by SIGTERM"
    )
    state = doc["resume_states"]["mpnet-default"]
    assert state["parts"] == ["mpnet-default.resume.tgz.00", "mpnet-default.resume.tgz.01"]
    assert state["bytes"] == 3 and state["sha256"] == hashlib.sha256(b"abc").hexdigest()

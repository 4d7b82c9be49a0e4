"""`train --resume` at its edges: settings a resume may change are recorded and applied whole, and a
checkpoint that does not fit the run (another model, settings or version) ends in one line."""

import json
import shutil

import pytest
import torch
import yaml
from conftest import train_args
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from imdb_lora.cli import main
from imdb_lora.errors import UserError
from imdb_lora.inference.classifier import Classifier
from imdb_lora.training import trainer as trainer_module
from imdb_lora.training.ema import Ema
from imdb_lora.training.trainer import Trainer

TEXTS = ["great wonderful film", "awful boring waste"]


class Crash(Exception):
    pass


def crash_at_step(mp: pytest.MonkeyPatch, n: int) -> None:
    steps = {"n": 0}

    def after_step(self):
        steps["n"] += 1
        if steps["n"] == n:
            raise Crash

    mp.setattr(Trainer, "_after_step", after_step)


@pytest.fixture(scope="module")
def crashed(tiny_models, imdb_dir, tmp_path_factory):
    """A run that stopped mid-epoch 1 right after a checkpoint (5 steps an epoch, one every 2)."""
    out = tmp_path_factory.mktemp("crashed") / "run"
    with pytest.MonkeyPatch.context() as mp:
        crash_at_step(mp, 3)
        with pytest.raises(Crash):
            main(train_args(tiny_models("bert"), imdb_dir, out, "--checkpoint-every", "2"))
    return out


def test_no_calibration_on_resume_leaves_no_temperature_of_the_interrupted_attempt(
    tiny_models, imdb_dir, tmp_path, monkeypatch
):
    run = tmp_path / "r"
    # stopped after the temperature was written, before the reports: the run is not finished
    monkeypatch.setattr(trainer_module, "write_reports", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        main(train_args(tiny_models("bert"), imdb_dir, run, "--epochs", "1"))
    monkeypatch.undo()
    assert (run / "calibration.json").is_file()
    eval_file = tmp_path / "extra.csv"
    eval_file.write_text("text,label\ngreat film,1\nawful film,0\n")
    resume = ["train", "--output-dir", str(run), "--resume"]
    assert main([*resume, "--no-calibration", "--eval-file", str(eval_file)]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["calibration"]["enabled"] is False
    # what run.json says is what predictions use: no temperature left behind to scale them
    assert not (run / "calibration.json").exists()
    calibrated, raw = (Classifier.load(str(run), device="cpu", raw=r).predict(TEXTS) for r in (False, True))
    assert [p.positive for p in calibrated] == [p.positive for p in raw]
    # config.yaml, the run's recipe, records the settings the resume changed
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["calibration"] is False
    assert saved["data"]["eval_files"] == [str(eval_file)]


def _edit_checkpoint(run, kind: str) -> None:
    path = run / "checkpoint.safetensors"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    progress = json.loads(meta["progress"])
    if kind == "progress field of a later version":
        meta["progress"] = json.dumps({**progress, "added_later": 1})
    elif kind == "no progress":
        del meta["progress"]
    elif kind == "weight of another model":
        key = next(k for k in tensors if k.startswith("param/"))
        tensors["param/other.weight"] = tensors.pop(key)
    elif kind == "weight of another shape":
        key = next(k for k in tensors if k.startswith("param/") and "lora_A" in k)
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    elif kind == "no optimizer state":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("opt/")}
    elif kind == "no RNG state":
        del tensors["rng/cpu"]
    save_file(tensors, path, metadata=meta)


@pytest.mark.parametrize(
    "kind",
    [
        "progress field of a later version",
        "no progress",
        "weight of another model",
        "weight of another shape",
        "no optimizer state",
        "no RNG state",
    ],
)
def test_a_checkpoint_that_does_not_fit_the_run_is_one_line(crashed, tmp_path, kind, capsys):
    run = tmp_path / "run"
    shutil.copytree(crashed, run)
    _edit_checkpoint(run, kind)
    capsys.readouterr()
    assert main(["train", "--output-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("imdb-lora: error: --resume:") and "does not fit this run" in err
    assert json.loads((run / "run.json").read_text())["status"] == "running"  # nothing was trained


def test_resume_of_a_missing_folder_or_a_foreign_run_json_is_one_line(crashed, tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path / "nope"), "--resume"]) == 2
    assert "does not exist" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(crashed, run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "world_size": "two"}))
    assert main(["train", "--output-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "world_size 'two'" in err and "Traceback" not in err


def test_a_checkpoint_without_the_moving_average_is_one_line():
    ema = Ema(torch.nn.Linear(2, 2), 0.9)
    with pytest.raises(UserError, match="--resume: the checkpoint has no moving average"):
        ema.load_state_dict({"rng/cpu": torch.get_rng_state()})

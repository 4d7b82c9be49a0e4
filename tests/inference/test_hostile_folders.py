"""Run and export folders that were edited, damaged or crafted: refused in one line (exit 2), never a
traceback, never a pickle loaded, never a model's own Python code run, never a file outside the export."""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import train_args

from imdb_lora.cli import main
from imdb_lora.config import Config
from imdb_lora.errors import UserError
from imdb_lora.inference.exported import MARKER


@pytest.fixture(scope="module")
def merged_export(trained_run, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("hostile") / "merged"
    assert main(["export", str(trained_run), "--to", str(dest)]) == 0
    return dest


def copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def predict_fails(folder: Path, capsys, *expected: str) -> str:
    """predict on `folder` exits 2 with one line holding every `expected` piece."""
    assert main(["predict", str(folder), "great film", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0 and err.startswith("imdb-lora: error:"), err
    for piece in expected:
        assert piece in err
    return captured.out


def edit_yaml(path: Path, section: str, key: str, value) -> None:
    raw = yaml.safe_load(path.read_text())
    raw[section][key] = value
    path.write_text(yaml.safe_dump(raw))


# ------------------------------------------------------------ model code, pickles


def add_custom_code(model_dir: Path, witness: Path) -> None:
    """Point the model's config at Python code of its own that, if ever imported, leaves `witness`."""
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "evilbert"
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForSequenceClassification": "evil.EvilModel",
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "evil.py").write_text(f"import pathlib\npathlib.Path({str(witness)!r}).touch()\n")


def test_a_model_with_its_own_code_is_refused_without_running_or_asking(
    merged_export, tiny_models, imdb_dir, tmp_path, capsys
):
    witness = tmp_path / "code-ran"
    from imdb_lora.inference.exported import recorded_files

    export = copy(merged_export, tmp_path)
    add_custom_code(export / "model", witness)
    edit_marker(export, files=recorded_files(export, "merged"))  # crafted: its record matches its files
    out = predict_fails(export, capsys, "needs Python code of its own", "imdb-lora never runs it")
    assert "[y/N]" not in out  # transformers asks on a terminal unless told trust_remote_code=False

    model = copy(tiny_models("bert"), tmp_path)
    add_custom_code(model, witness)
    assert main(train_args(model, imdb_dir, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "imdb-lora never runs it" in err
    assert not witness.exists()


def test_a_pickled_adapter_is_refused(trained_run, tmp_path, capsys):
    run = copy(trained_run, tmp_path)
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.rename(weights.with_name("adapter_model.bin"))  # PEFT would torch.load a .bin
    predict_fails(run, capsys, "no adapter_model.safetensors", "only safetensors")


# ------------------------------------------------------------ calibration.json


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"temperature": 1e-300}', "outside [0.05, 20.0]"),  # every probability NaN
        ('{"temperature": 1e300}', "outside [0.05, 20.0]"),  # every probability 0.5
        ('{"temperature": ' + "9" * 400 + "}", "is unreadable"),  # OverflowError in float()
        ("[" * 100_000 + "]" * 100_000, "is unreadable"),  # RecursionError in json
    ],
)
def test_calibration_outside_what_training_writes_is_refused(
    trained_run, tmp_path, capsys, content, expected
):
    run = copy(trained_run, tmp_path)
    (run / "calibration.json").write_text(content)
    predict_fails(run, capsys, "calibration.json", expected)


# ------------------------------------------------------------ run.json, config.yaml


@pytest.mark.parametrize("content", ["[1]", '"finished"', "[" * 100_000 + "]" * 100_000])
def test_run_json_that_is_not_an_object_is_refused(trained_run, tmp_path, capsys, content):
    run = copy(trained_run, tmp_path)
    (run / "run.json").write_text(content)
    predict_fails(run, capsys, "run.json")


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("data", "max_length", 1_000_000_000, "invalid: data.max_length must be between 8 and 8192"),
        ("data", "max_length", -5, "invalid: data.max_length must be between 8 and 8192"),
        ("data", "max_length", 4096, "exceeds the"),  # valid as a setting, past the model's positions
        ("data", "truncation", "bogus", "invalid: data.truncation must be head or head_tail"),
        ("model", "pooling", "evil", "invalid: model.pooling must be cls or mean"),
        ("train", "seed", 10**26, "invalid: train.seed must be in [0, 2**32)"),
    ],
)
def test_saved_settings_are_checked_like_flags(trained_run, tmp_path, capsys, section, key, value, expected):
    """Named by their key in config.yaml: no flag was typed (they were named by flags)."""
    run = copy(trained_run, tmp_path)
    edit_yaml(run / "config.yaml", section, key, value)
    predict_fails(run, capsys, "config.yaml", expected)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    # 8 levels of 9 aliases: ~43 million strings if expanded (minutes and gigabytes before the check)
    items = ["&a0 [x,x,x,x,x,x,x,x,x]"] + [
        f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)
    ]
    path = tmp_path / "bomb.yaml"
    path.write_text("lora:\n  target_modules: [" + ", ".join(items) + "]\n")
    start = time.perf_counter()
    with pytest.raises(UserError, match="lora.target_modules: expected list"):
        Config.load(path)
    assert time.perf_counter() - start < 2


# ------------------------------------------------------------ export folders


def edit_marker(export: Path, **changes) -> None:
    marker = json.loads((export / MARKER).read_text())
    marker.update(changes)
    (export / MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize(
    "onnx_file",
    [5, "/elsewhere/model.onnx", "../../model.onnx", "..", ""],
    ids=["int", "abs", "up", "dots", "empty"],
)
def test_the_marker_names_only_a_file_inside_the_export(merged_export, tmp_path, capsys, onnx_file):
    export = copy(merged_export, tmp_path)
    edit_marker(export, format="onnx", onnx_file=onnx_file)
    predict_fails(export, capsys, "invalid onnx_file")


def test_an_export_marker_that_is_not_an_object_is_refused(merged_export, tmp_path, capsys):
    export = copy(merged_export, tmp_path)
    (export / MARKER).write_text("[]")
    predict_fails(export, capsys, f"unreadable {MARKER}")


def test_an_export_with_a_damaged_run_json_is_refused(merged_export, tmp_path, capsys):
    export = copy(merged_export, tmp_path)
    (export / "run.json").write_text("{bad")
    predict_fails(export, capsys, "run.json is unreadable (JSONDecodeError)")


def test_an_export_missing_its_model_or_its_calibration_is_incomplete(merged_export, tmp_path, capsys):
    export = copy(merged_export, tmp_path)
    shutil.rmtree(export / "model")
    predict_fails(export, capsys, "incomplete export (no model)")  # not "could not load it from the hub"

    calibrated = copy(merged_export, tmp_path / "calibrated")
    edit_marker(calibrated, temperature=0.5)
    (calibrated / "calibration.json").unlink(missing_ok=True)
    predict_fails(calibrated, capsys, "incomplete export (no calibration.json)")  # not silently uncalibrated


# ------------------------------------------------------------ labeled and text files


def test_jsonl_nested_past_the_parser_limit_is_one_line(trained_run, tmp_path, capsys):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "fine", "label": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    assert main(["predict", str(trained_run), "--file", str(deep), "--device", "cpu"]) == 2
    assert "deep.jsonl line 2 is not usable JSON (RecursionError)" in capsys.readouterr().err
    assert main(["evaluate", str(trained_run), "--file", str(deep), "--device", "cpu"]) == 2
    assert "deep.jsonl line 2 is not usable JSON (RecursionError)" in capsys.readouterr().err


def test_a_text_of_only_control_characters_is_empty_everywhere(trained_run, tmp_path, capsys):
    """The service refused "\\u0000" as a review; predict, evaluate --file and score take the same rule."""
    from imdb_lora.scale.batch import text_problem

    assert main(["predict", str(trained_run), "\x00\x00", "--device", "cpu"]) == 2
    assert "text 1 is empty (or only whitespace or control characters)" in capsys.readouterr().err
    labeled = tmp_path / "nul.csv"
    labeled.write_text("text,label\ngreat film,1\n\x00\x07,0\n")
    assert main(["evaluate", str(trained_run), "--file", str(labeled), "--device", "cpu"]) == 2
    assert "nul.csv line 3 has an empty or missing text" in capsys.readouterr().err
    assert text_problem("\x00 \u200b\x1f", "text") == "empty text"
    assert text_problem("\x00ok", "text") is None


# ------------------------------------------------------------ damaged, swapped and incomplete weights


def truncate(path: Path, size: int = 500) -> None:
    path.write_bytes(path.read_bytes()[:size])


@pytest.fixture(scope="module")
def full_run(tiny_models, imdb_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "bert-full"
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--method", "full", "--epochs", "1")) == 0
    return out


def test_truncated_weights_are_one_line_naming_the_folder(trained_run, full_run, tmp_path, capsys):
    """safetensors' own error (not an OSError) escaped as a traceback, for a run's adapter or model."""
    run = copy(trained_run, tmp_path)
    truncate(run / "adapter" / "adapter_model.safetensors")
    predict_fails(run, capsys, "adapter weights in", "are damaged")
    full = copy(full_run, tmp_path)
    truncate(full / "model" / "model.safetensors")
    err_out = predict_fails(full, capsys, f"{full / 'model'} are damaged")
    assert "--model" not in err_out


@pytest.mark.parametrize(
    "command",
    [["predict", "great film"], ["evaluate"], ["export", "--to", "EXPORT"], ["serve"], ["select"]],
    ids=lambda c: c[0],
)
def test_a_folder_of_runs_names_its_runs(command, tmp_path, capsys):
    """compare's --output-dir (or runs/) given where one run is meant: one line naming the runs inside,
    not only 'not an imdb-lora run directory'; nothing is written."""
    folder = tmp_path / "cmp"
    for method in ("lora", "full"):
        (folder / method).mkdir(parents=True)
        (folder / method / "run.json").write_text('{"status": "finished"}')
        (folder / method / "config.yaml").write_text("{}")
    (folder / "comparison.md").write_text("| Method |\n")
    argv = [command[0], str(folder), *(str(tmp_path / "x") if a == "EXPORT" else a for a in command[1:])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("imdb-lora: error:"), err
    assert f"{folder} is compare's output folder, not a run" in err
    assert f"{folder / 'full'}, {folder / 'lora'}" in err
    assert not (tmp_path / "x").exists()
    (folder / "comparison.md").unlink()  # runs/ holding runs: the same pointer, without naming compare
    assert main(argv) == 2
    assert f"{folder} is a folder of runs, not a run" in capsys.readouterr().err


def test_missing_weights_or_tokenizer_files_are_one_line(
    trained_run, merged_export, tmp_path, capsys, monkeypatch
):
    """Not "--model: ... use --random-init" (flags of train), nor transformers' message on five lines."""
    no_weights = copy(merged_export, tmp_path / "a")
    (no_weights / "model" / "model.safetensors").unlink()
    predict_fails(no_weights, capsys, "incomplete export (no model/model.safetensors)")
    no_tokenizer = copy(merged_export, tmp_path / "b")
    (no_tokenizer / "tokenizer" / "tokenizer.json").unlink()
    predict_fails(no_tokenizer, capsys, "incomplete export (no tokenizer/tokenizer.json)")
    run = copy(trained_run, tmp_path / "c")
    for f in (run / "tokenizer").iterdir():
        f.unlink()
    predict_fails(run, capsys, "no usable tokenizer in")
    (run / "tokenizer").rmdir()  # it said "(Repo id must be in the form 'repo_name' ...)": a hub id's rule
    predict_fails(run, capsys, f"no usable tokenizer in {run / 'tokenizer'}: no such folder")
    monkeypatch.chdir(tmp_path)  # a relative c/tokenizer that is not there read as a hub id: "--model: ..."
    relative = run.relative_to(tmp_path)
    predict_fails(relative, capsys, f"no usable tokenizer in {relative / 'tokenizer'}: no such folder")


def test_a_damaged_or_swapped_export_file_is_named(trained_run, merged_export, tmp_path, capsys):
    """The marker records each weight, graph and tokenizer file's sha256: a truncated copy, or a
    model.onnx taken from another export (it loaded and predicted with the other model's weights), is
    refused before anything loads it; an export made before the record existed still loads."""
    onnx = tmp_path / "onnx"
    assert main(["export", str(trained_run), "--to", str(onnx), "--format", "onnx"]) == 0
    int8 = tmp_path / "int8"
    assert (
        main(["export", str(trained_run), "--to", str(int8), "--format", "onnx", "--quantize", "int8"]) == 0
    )
    capsys.readouterr()
    swapped = copy(onnx, tmp_path / "s")
    shutil.copy(int8 / "model.onnx", swapped / "model.onnx")
    predict_fails(swapped, capsys, "model.onnx is not the file that was exported", "sha256")
    damaged = copy(merged_export, tmp_path / "d")
    truncate(damaged / "model" / "model.safetensors")
    predict_fails(damaged, capsys, "model.safetensors is not the file that was exported")
    outside = copy(onnx, tmp_path / "o")
    edit_marker(outside, files={"../../model.onnx": "0" * 64})
    predict_fails(outside, capsys, "names a file outside the export")
    older = copy(onnx, tmp_path / "old")
    marker = json.loads((older / MARKER).read_text())
    del marker["files"]
    (older / MARKER).write_text(json.dumps(marker))
    assert main(["predict", str(older), "great film", "--device", "cpu"]) == 0


def test_an_export_whose_calibration_was_changed_is_refused_unless_raw(merged_export, tmp_path, capsys):
    """The marker records the temperature the export was made with; another calibration.json (edited,
    or copied from another run) silently changed every probability."""
    export = copy(merged_export, tmp_path)
    (export / "calibration.json").write_text('{"temperature": 0.5}')
    predict_fails(export, capsys, "calibration.json holds temperature 0.5", "the export was made with")
    assert main(["predict", str(export), "great film", "--raw", "--device", "cpu"]) == 0


def test_base_model_is_refused_where_it_does_not_apply(merged_export, full_run, tiny_models, capsys):
    """It was silently ignored for a fully fine-tuned run and for an export."""
    for folder, expected in (
        (full_run, "LoRA runs only"),
        (merged_export, "run directories only"),
    ):
        args = ["predict", str(folder), "great film", "--base-model", str(tiny_models("mpnet"))]
        assert main([*args, "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"--base-model applies to {expected}" in err and "\n" not in err
    assert main(["export", str(full_run), "--to", str(full_run.parent / "x"), "--base-model", "b"]) == 2
    assert "--base-model applies to LoRA runs only" in capsys.readouterr().err


def resave(path: Path, change) -> None:
    """Rewrite a safetensors file with `change` applied to its tensors (a dict, changed in place)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def named(tensors: dict, *parts: str) -> str:
    return next(k for k in sorted(tensors) if all(p in k for p in parts))


def widen(*parts: str):
    def change(tensors):
        key = named(tensors, *parts)
        tensors[key] = torch.zeros(*(n + 1 for n in tensors[key].shape))

    return change


def drop(*parts: str):
    return lambda tensors: tensors.pop(named(tensors, *parts))


@pytest.mark.parametrize(
    "change, expected",
    [
        (widen("lora_A"), "is unusable (size mismatch for "),
        (widen("classifier", "weight"), "is unusable (size mismatch for "),
        # PEFT loads non-strictly: a missing LoRA tensor kept its random initialisation, silently
        (drop("lora_A"), "adapter_model.safetensors lacks 1 tensor of the adapter"),
        (drop("classifier", "weight"), "is unusable (adapter_model.safetensors lacks"),
    ],
    ids=["lora-shape", "head-shape", "lora-missing", "head-missing"],
)
def test_adapter_weights_that_do_not_fit_are_one_line(trained_run, tmp_path, capsys, change, expected):
    """A tensor of the wrong shape was torch's traceback; a missing one a traceback or a silent
    random initialisation (every answer wrong)."""
    run = copy(trained_run, tmp_path)
    resave(run / "adapter" / "adapter_model.safetensors", change)
    predict_fails(run, capsys, expected, "train the run again")


@pytest.mark.parametrize(
    "text, expected",
    [("{oops", "adapter_config.json is not valid JSON"), ('"8"', "adapter_config.json: ")],
    ids=["not-json", "r-a-string"],
)
def test_a_damaged_adapter_config_is_one_line(trained_run, tmp_path, capsys, text, expected):
    run = copy(trained_run, tmp_path)
    config = run / "adapter" / "adapter_config.json"
    config.write_text(text if text.startswith("{") else config.read_text().replace('"r": 8', f'"r": {text}'))
    predict_fails(run, capsys, f"the adapter in {run / 'adapter'} is unusable", expected)


@pytest.mark.parametrize(
    "change, expected",
    [(widen("classifier", "weight"), "do not fit its config.json"), (drop("encoder"), "lack 1 tensor")],
    ids=["shape", "missing"],
)
def test_full_weights_that_do_not_fit_are_one_line(full_run, tmp_path, capsys, change, expected):
    """transformers' RuntimeError pointing at a report it never showed; a missing tensor randomly
    initialised without a word."""
    full = copy(full_run, tmp_path)
    resave(full / "model" / "model.safetensors", change)
    predict_fails(full, capsys, f"the weights in {full / 'model'} {expected}")


def test_a_tokenizer_without_its_config_is_one_line(trained_run, tmp_path, capsys):
    """Without tokenizer_config.json the tokenizer loads with no padding token: torch's TypeError."""
    run = copy(trained_run, tmp_path)
    (run / "tokenizer" / "tokenizer_config.json").unlink()
    predict_fails(run, capsys, "no usable tokenizer in", "has no padding token")

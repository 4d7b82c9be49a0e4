"""Refusals made after Config.validate (by the trainer, the model loading and the step's rewrites) name a
setting as it was given: a --config file's by the file and key (`my.yaml: data.max_length 200 exceeds
...`), a typed one by its flag, as before. They named the flag whatever had set the value."""

import math
import shutil

import pytest
from conftest import train_args

from imdb_lora import config
from imdb_lora.cli import main


def without(args: list[str], flag: str) -> list[str]:
    """train_args less one of its flags and its value (the value then comes from the --config file)."""
    i = args.index(flag)
    return args[:i] + args[i + 2 :]


@pytest.fixture(scope="module")
def electra(tiny_models, tmp_path_factory):
    """A tiny electra (config and the tiny bert's tokenizer; --random-init): no flat path, no mean pooling."""
    from transformers import AutoConfig, ElectraConfig

    folder = tmp_path_factory.mktemp("electra") / "electra"
    shutil.copytree(
        tiny_models("bert"), folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json")
    )
    bert = AutoConfig.from_pretrained(tiny_models("bert"))
    sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    ElectraConfig(
        embedding_size=bert.hidden_size, max_position_embeddings=128, **{k: getattr(bert, k) for k in sizes}
    ).save_pretrained(folder)
    return folder


# (model kind, the --config file, the flag train_args gives that the file then sets, its typed flags,
#  the refusal from the file (RECIPE: the file's path), the same refusal typed)
CASES = {
    "max_length": (
        "bert",
        "data: {max_length: 200}",
        "--max-length",
        ["--max-length", "200"],
        "RECIPE: data.max_length 200 exceeds what bert can read (128 tokens per sequence); set it to 128 or less there",
        "--max-length 200 exceeds what bert can read (128 tokens per sequence); pass --max-length 128 or less",
    ),
    "device": (
        "bert",
        "train: {device: 'cuda:7'}",
        "--device",
        ["--device", "cuda:7"],
        "RECIPE: train.device cuda:7: ",  # CUDA is not available, or the machine has fewer GPUs
        "--device cuda:7: ",
    ),
    "model_folder": (
        "bert",
        "model: {name: TMP/absent}",
        "--model",
        ["--model", "TMP/absent"],
        "RECIPE: model.name: no such directory: TMP/absent",
        "--model: no such directory: TMP/absent",
    ),
    "hub": (
        "bert",
        "model: {name: no-such-org/no-such-model}",
        "--model",
        ["--model", "no-such-org/no-such-model"],
        "RECIPE: model.name: could not load 'no-such-org/no-such-model' from the Hugging Face hub (the hub "
        "is unreachable and no copy is cached); without network, point it at a local model folder",
        "--model: could not load 'no-such-org/no-such-model' from the Hugging Face hub (the hub is "
        "unreachable and no copy is cached); without network, pass --model PATH to a local model folder",
    ),
    "targets": (
        "roberta",
        "lora: {targets: [pooler]}",
        None,
        ["--lora-targets", "pooler"],
        "RECIPE: lora.targets pooler: LoRA would wrap no module (this roberta model has no pooler); add a "
        "role to lora.targets, e.g. attention_qkv",
        "--lora-targets pooler: LoRA would wrap no module (this roberta model has no pooler); add a role, "
        "e.g. --lora-targets attention_qkv",
    ),
    "modules": (
        "bert",
        "lora: {target_modules: [nothing_here]}",
        None,
        ["--lora-modules", "nothing_here"],
        "RECIPE: lora.target_modules: none of nothing_here names a module of this bert model",
        "--lora-modules: none of nothing_here names a module of this bert model",
    ),
    "rank": (
        "bert",
        "lora: {r: 33}",
        None,
        ["--lora-r", "33"],
        "RECIPE: lora.r 33 is more than 32, the smallest dimension of the layers LoRA wraps (a rank cannot "
        "exceed it); lower it there",
        "--lora-r 33 is more than 32, the smallest dimension of the layers LoRA wraps (a rank cannot "
        "exceed it); lower --lora-r",
    ),
    "fused_qkv": (
        "bert",
        "train: {batching: flat, fused_qkv: true}\nlora: {targets: [ffn]}",
        None,
        ["--batching", "flat", "--fused-qkv", "--lora-targets", "ffn"],
        "RECIPE: train.fused_qkv needs LoRA on query, key and value of every self-attention (base_model.model.bert.encoder."
        "layer.0.attention.self has it on none); add the attention_qkv role to lora.targets or set "
        "train.fused_qkv false there",
        "--fused-qkv needs LoRA on query, key and value of every self-attention (base_model.model.bert.encoder.layer.0."
        "attention.self has it on none); add the attention_qkv role to --lora-targets or drop --fused-qkv",
    ),
    "eval_file": (
        "bert",
        "data: {eval_files: [TMP/absent.csv]}",
        None,
        ["--eval-file", "TMP/absent.csv"],
        "RECIPE: data.eval_files: no such file: TMP/absent.csv",
        "--eval-file: no such file: TMP/absent.csv",
    ),
    "batching": (
        "electra",
        "train: {batching: flat}",
        None,
        ["--batching", "flat"],
        "RECIPE: train.batching flat is not supported for model type 'electra'",
        "--batching flat is not supported for model type 'electra'",
    ),
    "pooling": (
        "electra",
        "model: {pooling: mean}",
        None,
        ["--pooling", "mean"],
        "RECIPE: model.pooling mean is not supported for model type 'electra'",
        "--pooling mean is not supported for model type 'electra'",
    ),
}


@pytest.fixture
def hub_unreachable(monkeypatch):
    """A hub id fails at once, as on a machine without network (test_model.py's way)."""
    from huggingface_hub import constants

    from imdb_lora.modeling import load

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(load, "hub_reachable", lambda: False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("given", ["file", "typed"])
def test_a_refusal_names_the_setting_as_it_was_given(
    case, given, tiny_models, electra, imdb_dir, tmp_path, capsys, hub_unreachable
):
    kind, recipe, replaced, typed, from_file, from_flag = CASES[case]
    model = electra if kind == "electra" else tiny_models(kind)
    out = tmp_path / "run"
    args = train_args(model, imdb_dir, out, *(["--random-init"] if kind == "electra" else []))
    path = tmp_path / "my.yaml"
    path.write_text(recipe.replace("TMP", str(tmp_path)) + "\n")
    if given == "file":
        args = [*(without(args, replaced) if replaced else args), "--config", str(path)]
        expected = from_file.replace("RECIPE", str(path))
    else:
        args = [*args, *(a.replace("TMP", str(tmp_path)) for a in typed)]
        expected = from_flag
    expected = expected.replace("TMP", str(tmp_path))
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("imdb-lora: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].removeprefix("imdb-lora: error: ").startswith(expected), lines[0]
    assert not out.exists()  # refused before the run folder was made, or it was removed


def test_a_tokenizer_from_another_model_names_the_files_model(tiny_models, imdb_dir, tmp_path, capsys):
    """The vocabulary check named `--model PATH` for a model the --config file named."""
    from transformers import AutoConfig

    folder = tmp_path / "bert"
    shutil.copytree(tiny_models("bert"), folder)
    cfg = AutoConfig.from_pretrained(folder)
    cfg.vocab_size = 50  # the tiny bert's tokenizer has more tokens than this
    cfg.save_pretrained(folder)
    recipe = tmp_path / "my.yaml"
    recipe.write_text(f"model: {{name: {folder}, random_init: true}}\n")
    args = [*without(train_args(folder, imdb_dir, tmp_path / "r"), "--model"), "--config", str(recipe)]
    assert main(args) == 2
    assert f"imdb-lora: error: {recipe}: model.name {folder}: its tokenizer has" in capsys.readouterr().err


def test_a_diverging_training_names_the_files_rate_and_alpha(
    tiny_models, imdb_dir, tmp_path, capsys, monkeypatch
):
    """`try a lower --lr (it is 0.9) or --lora-alpha (...)` named flags for a --config file's values
    (test_train.py's diverging run, its settings in the file: the lifted bound reaches the check)."""
    monkeypatch.setattr(config, "MAX_LORA_SCALE", math.inf)
    recipe = tmp_path / "my.yaml"
    recipe.write_text("train: {lr: 0.9}\nlora: {alpha: 1.0e+20}\n")
    args = train_args(
        tiny_models("bert"), imdb_dir, tmp_path / "r", "--epochs", "1", "--max-train-samples", "8"
    )
    assert main([*without(args, "--lr"), "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"try a lower train.lr in {recipe} (it is 0.9) or lora.alpha in {recipe} (it is 1e+20)" in err, err

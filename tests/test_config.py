import os
import re
import shutil

import pytest
import yaml

from imdb_lora.cli import build_parser
from imdb_lora.cli.train import config_from_args
from imdb_lora.config import LORA_ROLES, SHIPPED_CONFIGS, Config, shipped_configs
from imdb_lora.errors import UserError


def test_defaults_are_the_reference_recipe():
    c = Config().validate()
    assert c.model.name == "roberta-base"
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.rslora) == (8, 8.0, 0.1, True)
    assert c.lora.targets == list(LORA_ROLES) and c.lora.train_biases
    assert (c.train.epochs, c.data.max_length, c.data.val_size) == (3, 512, 0.05)
    assert c.train.lr == 4e-4  # resolved from the method


def test_full_method_gets_its_own_default_lr():
    c = Config()
    c.train.method = "full"
    assert c.validate().train.lr == 2e-5


@pytest.mark.parametrize("path", sorted(SHIPPED_CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses_and_validates(path):
    Config.load(path).validate()


def test_yaml_then_flags_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump({"train": {"epochs": 5, "lr": 1e-3}, "lora": {"r": 16}}))
    ns = build_parser().parse_args(
        ["train", "--config", str(y), "--epochs", "2", "--lora-targets", "attention_qkv"]
    )
    c = config_from_args(ns, Config.load(y)).validate()
    assert (c.train.epochs, c.train.lr, c.lora.r) == (2, 1e-3, 16)
    assert c.lora.targets == ["attention_qkv"]


def test_boolean_and_optional_flags():
    ns = build_parser().parse_args(["train", "--no-rslora", "--random-init", "--max-train-samples", "100"])
    c = config_from_args(ns, Config()).validate()
    assert c.lora.rslora is False and c.model.random_init is True and c.data.max_train_samples == 100


def test_saved_config_round_trips(tmp_path):
    c = Config()
    c.train.epochs, c.data.truncation = 7, "head_tail"
    c.validate().save(tmp_path / "config.yaml")
    assert Config.load(tmp_path / "config.yaml").to_dict() == c.to_dict()


# One invalid value for every check Config.validate makes: each must fail on its own, naming its flag,
# in one line that shows the value given.
INVALID = [
    (["--model", ""], "--model"),
    (["--pooling", "max"], "--pooling"),
    (["--lora-r", "0"], "--lora-r"),
    (["--lora-alpha", "0"], "--lora-alpha"),
    (["--lora-dropout", "1"], "--lora-dropout"),
    (["--lora-targets", ""], "--lora-targets"),
    (["--lora-targets", "attention_qkv,heads"], "--lora-targets"),
    (["--val-size", "1.5"], "--val-size"),
    (["--val-size", "0"], "--val-size"),
    (["--max-train-samples", "1"], "--max-train-samples"),
    (["--max-eval-samples", "1"], "--max-eval-samples"),
    (["--max-length", "7"], "--max-length"),
    (["--max-length", "8193"], "--max-length"),
    (["--truncation", "middle"], "--truncation"),
    (["--truncation", "head_tail", "--max-length", "64", "--head-tokens", "62"], "--head-tokens"),
    (["--truncation", "head_tail", "--head-tokens", "0"], "--head-tokens"),
    (["--test-file", "t.csv"], "--test-file"),
    (["--method", "prefix"], "--method"),
    (["--epochs", "0"], "--epochs"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--batching", "dense"], "--batching"),
    (["--cuda-graphs"], "--cuda-graphs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--eval-batch-size", "0"], "--eval-batch-size"),
    (["--lr", "0"], "--lr"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--warmup-ratio", "1"], "--warmup-ratio"),
    (["--warmup-ratio", "-0.1"], "--warmup-ratio"),
    (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--device", "tpu"], "--device"),
    # infinities passed the >= checks: --lr inf trained to NaN losses, then calibration's LBFGS raised
    (["--lr", "inf"], "--lr"),
    (["--lr", "1"], "--lr"),  # 1e12 and 1e308 overflowed float32 inside AdamW's step: a traceback
    (["--weight-decay", "2500"], "--weight-decay"),  # x 4e-4 = 1: every weight zeroed, then sign-flipped
    (["--weight-decay", "1e308"], "--weight-decay"),
    (["--lr", "nan"], "--lr"),
    (["--lora-alpha", "inf"], "--lora-alpha"),
    # finite but absurd: 1e36 trained to chance accuracy with finite losses, so nothing stopped it
    (["--lora-alpha", "1e36"], "--lora-alpha"),
    (["--lora-alpha", "725"], "--lora-alpha"),  # scale 725/sqrt(8) = 256.3, over MAX_LORA_SCALE
    (["--no-rslora", "--lora-alpha", "2049"], "--lora-alpha"),  # 2049/8, without rsLoRA's sqrt
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--max-grad-norm", "inf"], "--max-grad-norm"),
    *(
        (["--" + flag, "nan"], "--" + flag)
        for flag in ("lora-dropout", "val-size", "warmup-ratio", "ema-decay")
    ),
]


@pytest.mark.parametrize("flags, named", INVALID, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_invalid_values_name_their_flag(flags, named):
    ns = build_parser().parse_args(["train", *flags])
    with pytest.raises(UserError) as e:
        config_from_args(ns, Config()).validate()
    msg = str(e.value)
    assert msg.startswith(named + " ") or msg.startswith(named + ":"), msg
    assert "\n" not in msg


ROLES = ", ".join(LORA_ROLES)


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--batching", "flta"], "--batching must be auto, padded, packed or flat (got 'flta'); did you mean flat?"),
        (["--truncation", "head-tail"], "--truncation must be head or head_tail (got 'head-tail'); did you mean head_tail?"),
        (["--pooling", "maen"], "--pooling must be cls or mean (got 'maen'); did you mean mean?"),
        (["--method", "ful"], "--method must be lora or full (got 'ful'); did you mean full?"),
        (
            ["--lora-targets", "ffm,poolr"],
            f"--lora-targets: unknown role(s) ['ffm', 'poolr']; choose from {ROLES}; did you mean ffn and pooler?",
        ),
        (["--batching", "zzz"], "--batching must be auto, padded, packed or flat (got 'zzz')"),  # nothing close
        (["--lora-targets", "xyz"], f"--lora-targets: unknown role(s) ['xyz']; choose from {ROLES}"),
    ],
)  # fmt: skip
def test_a_mistyped_value_names_the_close_one(flags, error):
    """README: a mistyped choice close to a real one is named. argparse's choices did; the values the
    config checks only listed theirs."""
    ns = build_parser().parse_args(["train", *flags])
    with pytest.raises(UserError) as e:
        config_from_args(ns, Config()).validate()
    assert str(e.value) == error


def test_the_edges_of_each_range_are_accepted():
    ok = ["--lora-dropout", "0", "--val-size", "0.99", "--max-train-samples", "2", "--max-eval-samples", "2",
          "--max-length", "8", "--seed", str(2**32 - 1), "--weight-decay", "0", "--warmup-ratio", "0",
          "--max-grad-norm", "0", "--label-smoothing", "0", "--checkpoint-every", "0", "--ema-decay", "0",
          "--device", "cuda:1", "--batching", "flat", "--cuda-graphs",
          "--lora-alpha", "724"]  # fmt: skip
    config_from_args(build_parser().parse_args(["train", *ok]), Config()).validate()


def test_wrong_type_names_the_flag():
    ns = build_parser().parse_args(["train", "--epochs", "three"])
    with pytest.raises(UserError, match="--epochs: expected int"):
        config_from_args(ns, Config())


def test_unknown_yaml_field_is_an_error(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  epochz: 3\n")
    with pytest.raises(UserError, match="unknown field train.epochz"):
        Config.load(y)


@pytest.mark.parametrize(
    "text, error",
    [
        # PyYAML keeps the last of two keys: the first section's settings were dropped without a word
        ("train:\n  epochs: 1\ntrain:\n  lr: 0.001\n", "at line 3, column 1 (found the key 'train' twice"),
        ("train:\n  epochs: 1\n  epochs: 5\n", "at line 3, column 3 (found the key 'epochs' twice"),
        ("train:\n  epochs: true\n", "train.epochs: expected int, got True"),  # trained 1 epoch
        ("train:\n  lr: true\n", "train.lr: expected float, got True"),
        ("model:\n  name: [a, b]\n", "model.name: expected str, got ['a', 'b']"),  # the model "['a', 'b']"
        ("data:\n  path: {a: 1}\n", "data.path: expected str, got {'a': 1}"),
        ("train:\n  epochz: 3\n", "unknown field train.epochz; did you mean epochs?"),  # the file, not a flag
        (
            "trian:\n  epochs: 3\n",
            "unknown section 'trian'; expected one of ['model', 'lora', 'data', 'train']; did you mean train?",
        ),  # fmt: skip
    ],
)
def test_a_yaml_recipe_read_wrong_is_one_line_naming_the_flag(tmp_path, text, error):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(UserError, match=f"^--config: {re.escape(str(y))}.*{re.escape(error)}"):
        Config.load(y)


def test_a_yaml_merge_key_may_still_be_overridden(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  <<: {epochs: 2, lr: 0.001}\n  epochs: 5\n")
    cfg = Config.load(y)
    assert (cfg.train.epochs, cfg.train.lr) == (5, 0.001)


def changed_from_defaults(name: str) -> dict[tuple[str, str], object]:
    """What a shipped recipe sets otherwise than the built-in defaults, (section, key): value."""
    shipped = Config.load(name).validate().to_dict()
    defaults = Config().validate().to_dict()
    return {(s, k): shipped[s][k] for s in defaults for k in defaults[s] if shipped[s][k] != defaults[s][k]}


def test_mpnet_default_config_is_the_default_recipe_with_a_larger_validation_split():
    assert changed_from_defaults("mpnet-default") == {
        ("model", "name"): "sentence-transformers/all-mpnet-base-v2",
        ("data", "val_size"): 0.1,
    }


def test_reference_config_is_the_defaults_written_out():
    # the README: "`--config reference` (the defaults written out)"
    assert changed_from_defaults("reference") == {}


def test_full_finetune_config_is_the_defaults_with_every_weight_trained():
    assert changed_from_defaults("full-finetune") == {("train", "method"): "full", ("train", "lr"): 2e-5}


def test_minilm_quick_config_is_the_real_checks_recipe():
    """The README calls it the real check's: the recipe whose 80.80% test_real.py guards."""
    from test_real import REAL_CHECK_FLAGS

    ns = build_parser().parse_args(["train", *REAL_CHECK_FLAGS])
    real = config_from_args(ns, Config()).validate().to_dict()
    shipped = Config.load("minilm-quick").validate().to_dict()
    assert shipped["model"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"  # test_real: a local copy
    shipped["model"]["name"] = real["model"]["name"]
    assert shipped == real


def test_invalid_yaml_is_one_line_with_its_position(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("data:\n  max_length: [\n")
    with pytest.raises(UserError) as e:
        Config.load(y)
    assert "\n" not in str(e.value) and "is not valid YAML at line 3, column 1" in str(e.value)


@pytest.mark.parametrize(
    "path", ["x" * 300, "a/" * 2100, "a\0b", "\ud800"], ids=["name", "total", "nul", "surrogate"]
)
@pytest.mark.parametrize(
    "field, flag", [("path", "--data"), ("train_file", "--train-file"), ("eval_files", "--eval-file")]
)
def test_a_path_no_file_system_can_hold_is_one_line_naming_its_flag(path, field, flag):
    """From a YAML file or a flag: os.stat raised (File name too long, embedded null byte) as a traceback."""
    c = Config()
    setattr(c.data, field, [path] if field == "eval_files" else path)
    with pytest.raises(UserError, match=f"^{flag}: not a usable path: "):
        c.validate()


def test_the_same_eval_file_given_twice_is_refused(tmp_path, monkeypatch):
    # once as a relative path, once absolute: the same file, which would be evaluated and reported twice
    (tmp_path / "x.csv").write_text("text,label\ngood,1\n")
    monkeypatch.chdir(tmp_path)
    c = Config()
    c.data.eval_files = ["x.csv", str(tmp_path / "x.csv")]
    line = f"--eval-file {(tmp_path / 'x.csv').resolve()} is given twice; list each file once"
    with pytest.raises(UserError, match=f"^{re.escape(line)}$"):
        c.validate()


@pytest.mark.parametrize("clash", ["eval is train", "eval is test", "test is train"])
def test_an_eval_or_test_file_that_is_the_train_or_test_file_is_refused(tmp_path, monkeypatch, capsys, clash):
    """The same file through a symlink and a ./ path, resolved before they are compared; refused before
    the model is looked for (the missing one would be the next line). A --test-file that is the
    --train-file was accepted: trained-on reviews reported as the test accuracy."""
    from imdb_lora.cli import main

    (tmp_path / "x.csv").write_text("text,label\ngood,1\nbad,0\n")
    (tmp_path / "link.csv").symlink_to(tmp_path / "x.csv")
    monkeypatch.chdir(tmp_path)
    files, flag, other = {
        "eval is train": (
            ["--train-file", "./x.csv", "--eval-file", "link.csv"],
            "--eval-file",
            "--train-file",
        ),
        "eval is test": (
            ["--train-file", "y.csv", "--test-file", "./x.csv", "--eval-file", "link.csv"],
            "--eval-file",
            "--test-file",
        ),
        "test is train": (
            ["--train-file", "./x.csv", "--test-file", "link.csv"],
            "--test-file",
            "--train-file",
        ),
    }[clash]
    assert main(["train", *files, "--model", "no-model", "--output-dir", "run"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {(tmp_path / 'x.csv').resolve()} is also the {other}: " in err and err.count("\n") == 1, (
        err
    )


def test_a_resumed_run_keeps_the_file_clash_it_was_started_with(tmp_path, monkeypatch, capsys):
    """A run started before clashes were refused: --resume cannot drop its --eval-file, so refusing
    the clash stranded its epochs. It is said and kept; a clash typed with --resume is still refused."""
    from imdb_lora.cli import main

    (tmp_path / "x.csv").write_text("text,label\ngood,1\nbad,0\n")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = Config()
    saved.data.train_file, saved.data.eval_files = str(tmp_path / "x.csv"), [str(tmp_path / "x.csv")]
    saved.model.name = str(tmp_path / "no-model")
    saved.save(tmp_path / "run" / "config.yaml")
    main(["train", "--resume", "--output-dir", "run"])  # goes on, to fail on the missing model or run
    err = capsys.readouterr().err
    assert (
        "is also the --train-file: its reviews were trained on" in err
        and "kept, as the run was started" in err
    )
    saved.data.eval_files = []
    saved.save(tmp_path / "run" / "config.yaml")
    assert main(["train", "--resume", "--output-dir", "run", "--eval-file", "x.csv"]) == 2
    assert "; give --eval-file another file" in capsys.readouterr().err


def test_an_eval_file_hard_linked_to_the_train_file_is_refused(tmp_path, monkeypatch, capsys):
    """Another name for the same file, which resolve() cannot see through: compared by samefile."""
    from imdb_lora.cli import main

    (tmp_path / "x.csv").write_text("text,label\ngood,1\nbad,0\n")
    os.link(tmp_path / "x.csv", tmp_path / "hard.csv")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--train-file", "x.csv", "--eval-file", "hard.csv", "--model", "no-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (
        f"--eval-file {tmp_path / 'hard.csv'} is also the --train-file ({tmp_path / 'x.csv'}, the same file "
        "under another name): its reviews were trained on" in err
    ), err


def test_an_identical_copy_is_refused_and_another_file_of_its_size_is_not(tmp_path, monkeypatch, capsys):
    """`cp train.csv test.csv` is the same leakage as the same file; a file of the same size but other
    bytes is another file, and the command goes on (to fail on the missing model)."""
    from imdb_lora.cli import main

    (tmp_path / "x.csv").write_text("text,label\ngood,1\nbad,0\n")
    (tmp_path / "copy.csv").write_bytes((tmp_path / "x.csv").read_bytes())
    (tmp_path / "other.csv").write_text("text,label\nnice,1\nsad,0\n")
    assert (tmp_path / "other.csv").stat().st_size == (tmp_path / "x.csv").stat().st_size
    monkeypatch.chdir(tmp_path)
    args = ["train", "--train-file", "x.csv", "--model", "no-model", "--output-dir", "run"]
    assert main([*args, "--test-file", "copy.csv"]) == 2
    err = capsys.readouterr().err
    line = (
        f"imdb-lora: error: --test-file {tmp_path / 'copy.csv'} is an identical copy of the --train-file "
        f"{tmp_path / 'x.csv'}: its reviews were trained on, so its accuracy would say nothing of unseen "
        "reviews; give --test-file another file\n"
    )
    assert err == line, err
    assert main([*args, "--test-file", "other.csv"]) == 2
    err = capsys.readouterr().err
    assert "copy" not in err and "is also" not in err and "--model" in err, err


@pytest.mark.parametrize("kind", ["hard link", "copy", "folder linked since"])
def test_a_resumed_run_keeps_the_hard_link_or_copy_it_was_started_with(tmp_path, monkeypatch, capsys, kind):
    """A run started before these were refused is not stranded by the content check: the saved settings
    (not validated again) find the same clash, said and kept; the same typed with --resume is refused.
    Also when the saved path's folder became a symlink since: the typed files resolve through it, so
    the saved ones are resolved too, or the two lines differ and the kept clash was refused."""
    from imdb_lora.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.csv").write_text("text,label\ngood,1\nbad,0\n")
    if kind == "hard link":
        os.link(tmp_path / "data" / "x.csv", tmp_path / "data" / "e.csv")
    elif kind == "copy":
        shutil.copy(tmp_path / "data" / "x.csv", tmp_path / "data" / "e.csv")
    else:  # trained on data/x.csv as the --eval-file too; data/ then moved to real/, data a link to it
        (tmp_path / "data").rename(tmp_path / "real")
        (tmp_path / "data").symlink_to(tmp_path / "real")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = Config()
    e = "x.csv" if kind == "folder linked since" else "e.csv"
    saved.data.train_file, saved.data.eval_files = str(tmp_path / "data/x.csv"), [str(tmp_path / "data" / e)]
    saved.model.name = str(tmp_path / "no-model")
    saved.save(tmp_path / "run" / "config.yaml")
    main(["train", "--resume", "--output-dir", "run"])  # goes on, to fail on the missing model or run
    err = capsys.readouterr().err
    said = {
        "hard link": "the same file under another name",
        "copy": "is an identical copy of the --train-file",
        "folder linked since": f"--eval-file {tmp_path / 'real' / 'x.csv'} is also the --train-file: ",
    }[kind]
    assert said in err and "; kept, as the run was started with it" in err, err
    saved.data.eval_files = []
    saved.save(tmp_path / "run" / "config.yaml")
    assert main(["train", "--resume", "--output-dir", "run", "--eval-file", f"data/{e}"]) == 2
    err = capsys.readouterr().err
    assert said in err and "; give --eval-file another file" in err, err


def test_compare_refuses_a_file_clash_before_the_first_run(tmp_path, capsys):
    """It started the LoRA run, whose train refused it, and then said that run had failed: two lines."""
    from imdb_lora.cli import main

    (tmp_path / "x.csv").write_text("text,label\ngood,1\nbad,0\n")
    x = str(tmp_path / "x.csv")
    args = ["compare", "--output-dir", str(tmp_path / "cmp"), "--train-file", x, "--eval-file", x]
    assert main([*args, "--model", str(tmp_path / "no-model")]) == 2
    out, err = capsys.readouterr()
    assert "== lora" not in out and err.count("\n") == 1 and "is also the --train-file" in err, (out, err)


@pytest.mark.parametrize(
    "typed, said, fix",
    [
        (
            [],
            "my.yaml: data.eval_files {x} is also the data.train_file: ",
            "; point data.eval_files in my.yaml at",
        ),
        (
            ["--eval-file", "x.csv"],
            "--eval-file {x} is also the data.train_file in my.yaml: ",
            "; give --eval-file",
        ),
        (
            ["--train-file", "x.csv"],
            "my.yaml: data.eval_files {x} is also the --train-file: ",
            "; point data.",
        ),
    ],
    ids=["both in the file", "eval typed", "train typed"],
)
def test_a_file_clash_names_each_file_as_it_was_given(tmp_path, monkeypatch, capsys, typed, said, fix):
    """A clash a --config file set was refused naming flags the user never typed (`--eval-file X is
    also the --train-file; give --eval-file another file`): each side is named by flag or by key."""
    from imdb_lora.cli import main

    (tmp_path / "x.csv").write_text("text,label\ngood,1\nbad,0\n")
    (tmp_path / "my.yaml").write_text("data: {train_file: x.csv, eval_files: [x.csv]}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "my.yaml", *typed, "--model", "no-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said.format(x=tmp_path / "x.csv") in err and fix in err, err


def test_compare_resume_refuses_a_new_sub_runs_file_clash_before_the_first_run(tmp_path, capsys):
    """Under --resume the clash was left to each method's train: a sub-run not started yet was refused
    by its train, after the method before it had trained, in two lines. A sub-run started with the clash
    keeps it, as `train --resume` does."""
    from imdb_lora.cli import main

    (tmp_path / "x.csv").write_text("text,label\ngood,1\nbad,0\n")
    x, out = str(tmp_path / "x.csv"), tmp_path / "cmp"
    args = ["compare", "--resume", "--output-dir", str(out), "--train-file", x, "--eval-file", x]
    args += ["--model", str(tmp_path / "no-model")]
    assert main(args) == 2
    stdout, err = capsys.readouterr()
    assert "== lora" not in stdout and err.count("\n") == 1 and "is also the --train-file" in err, (
        stdout,
        err,
    )
    for method in ("lora", "full"):  # both started with it: not refused here
        started = Config()
        started.model.name, started.train.method = str(tmp_path / "no-model"), method
        started.data.train_file, started.data.eval_files = x, [x]
        (out / method).mkdir(parents=True)
        started.save(out / method / "config.yaml")
    assert main(args) == 2
    stdout, err = capsys.readouterr()
    assert "is also the" not in err and "holds no finished or resumable run" in err, err  # on to the plan


def test_compare_names_a_file_clash_its_config_file_set_by_key(tmp_path, monkeypatch, capsys):
    from imdb_lora.cli import main

    (tmp_path / "x.csv").write_text("text,label\ngood,1\nbad,0\n")
    (tmp_path / "my.yaml").write_text("data: {train_file: x.csv, test_file: x.csv}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--output-dir", "cmp", "--config", "my.yaml", "--model", "no-model"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and (
            f"my.yaml: data.test_file {tmp_path / 'x.csv'} is also the data.train_file: its reviews were trained "
            "on" in err
        )
        and "; point data.test_file in my.yaml at another file" in err
    ), err


def test_a_config_path_no_file_system_can_hold_is_one_line():
    with pytest.raises(UserError, match="^--config: not a usable path: a name of 300 bytes"):
        Config.load("x" * 300)


def _with(**fields) -> Config:
    cfg = Config()
    for key, value in fields.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.mark.parametrize(
    "fields, said",
    [
        (dict(train__method="full", lora__r=4, lora__targets=["ffn"]), "--lora-r, --lora-targets: no effect with --method full"),
        (dict(lora__target_modules=["query"], lora__targets=["ffn"]), "--lora-targets: no effect with --lora-modules"),
        (dict(data__head_tokens=16), "--head-tokens: no effect with --truncation head"),
        (dict(data__train_file="a.csv", data__path="aclImdb"), "--data: no effect with --train-file"),
        (dict(train__batching="flat", model__pooling="mean"), "--batching flat: no effect with --pooling mean"),
    ],
)  # fmt: skip
def test_a_setting_the_others_leave_without_effect_is_said(fields, said):
    """Each was silently ignored (found by running train's flags in combinations)."""
    from imdb_lora.config import inert_settings

    assert [n for n in inert_settings(_with(**fields)) if n.startswith(said)], inert_settings(_with(**fields))


def test_defaults_and_settings_that_take_effect_say_nothing():
    from imdb_lora.config import inert_settings

    assert inert_settings(Config()) == []
    assert inert_settings(_with(train__method="full")) == []  # the LoRA section at its defaults
    assert inert_settings(_with(data__truncation="head_tail", data__head_tokens=16)) == []
    assert inert_settings(_with(lora__target_modules=["query"])) == []  # roles at their default
    assert inert_settings(_with(train__batching="packed", model__pooling="mean")) == []


def test_only_a_setting_typed_on_the_command_line_is_named_inert():
    """A value a recipe set (minilm-quick's head_tokens 64) that a typed flag leaves inert (--truncation
    head) was named as if the user had typed its flag."""
    from imdb_lora.config import Given, inert_settings

    recipe = _with(data__truncation="head", data__head_tokens=64, train__method="full", lora__r=4)
    assert inert_settings(recipe, Given(frozenset({"data.truncation", "train.method"}))) == []
    assert inert_settings(recipe, Given(frozenset({"data.head_tokens", "lora.r"}))) == [
        "--lora-r: no effect with --method full (every weight trains; no adapters)",
        "--head-tokens: no effect with --truncation head (head_tail only)",
    ]
    typed_default = inert_settings(
        _with(train__method="full"), Given(frozenset({"lora.r"}))
    )  # at its default too
    assert typed_default == ["--lora-r: no effect with --method full (every weight trains; no adapters)"]


def _in_file(text: str, tmp_path, typed: frozenset[str] = frozenset()) -> list[str]:
    """inert_settings for my.yaml holding `text`, with the flags `typed` (their values as the file's)."""
    from imdb_lora.config import Given, inert_settings

    (tmp_path / "my.yaml").write_text(text)
    cfg, keys = Config.load_with_keys(tmp_path / "my.yaml")
    return inert_settings(cfg.validate(), Given(typed, "my.yaml", keys))


@pytest.mark.parametrize(
    "text, said",
    [
        ("train: {method: full}\nlora: {r: 4, alpha: 16}\n",
         "my.yaml: lora.r, lora.alpha have no effect with train.method: full (every weight trains; no adapters)"),
        ("lora: {target_modules: [query], targets: [ffn]}\n",
         "my.yaml: lora.targets has no effect with lora.target_modules (the modules it names are wrapped instead)"),
        ("data: {truncation: head, head_tokens: 16}\n",
         "my.yaml: data.head_tokens has no effect with data.truncation: head (head_tail only)"),
        ("data: {train_file: a.csv, path: aclImdb}\n",
         "my.yaml: data.path has no effect with data.train_file (the labeled files replace IMDB)"),
        ("train: {batching: flat}\nmodel: {pooling: mean}\n",
         "my.yaml: train.batching: flat has no effect with model.pooling: mean (it trains and evaluates "
         "padded: the flat forward reads each review's first token only)"),
    ],
)  # fmt: skip
def test_a_conflict_inside_a_config_file_is_said_naming_the_file_and_key(tmp_path, text, said):
    """The same settings as flags were said; set in a --config file, nothing was."""
    assert _in_file(text, tmp_path) == [said]


def test_a_typed_flag_overrides_the_files_setting_quietly_and_names_the_files_condition(tmp_path):
    """--method full over a file's LoRA section is the user's choice (as --config reference --method
    full): its lora.* then have no use, and saying so would be noise. A typed --lora-r that the file's
    method: full leaves without effect names where that method came from."""
    text = "train: {method: full}\nlora: {r: 4}\n"
    assert _in_file(text, tmp_path, frozenset({"train.method"})) == []
    assert _in_file(text, tmp_path, frozenset({"lora.r"})) == [
        "--lora-r: no effect with train.method: full in my.yaml (every weight trains; no adapters)"
    ]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_runs_own_config_yaml_rerun_as_config_says_nothing_inert(tmp_path, method):
    """A run's config.yaml (its recipe, `train --config runs/x/config.yaml`) writes every setting out:
    at their defaults, a default run's head_tokens (truncation head) and a full run's LoRA section were
    said on every rerun, though the run is the same with them or without them. A value off its default
    in the same file is still said."""
    cfg = Config()
    cfg.train.method = method
    cfg.save(tmp_path / "config.yaml")
    from imdb_lora.config import Given, inert_settings

    loaded, keys = Config.load_with_keys(tmp_path / "config.yaml")
    assert inert_settings(loaded.validate(), Given(frozenset(), "config.yaml", keys)) == []
    cfg.data.head_tokens = 32
    cfg.save(tmp_path / "config.yaml")
    loaded, keys = Config.load_with_keys(tmp_path / "config.yaml")
    assert inert_settings(loaded.validate(), Given(frozenset(), "config.yaml", keys)) == [
        "config.yaml: data.head_tokens has no effect with data.truncation: head (head_tail only)"
    ]


@pytest.mark.parametrize("name", shipped_configs())
def test_each_shipped_config_as_meant_says_nothing_inert(name):
    """Each shipped recipe alone (minilm-quick with --model, as offline use needs) has no setting that
    another leaves without effect: a note on one would be noise on every use."""
    from imdb_lora.config import Given, inert_settings

    cfg, keys = Config.load_with_keys(name)
    typed = frozenset({"model.name"}) if name == "minilm-quick" else frozenset()
    assert keys and inert_settings(cfg.validate(), Given(typed, name, keys)) == []


@pytest.mark.parametrize(
    "args, said",
    [
        (["--config", "minilm-quick", "--truncation", "head"], False),
        (["--config", "minilm-quick", "--truncation", "head", "--head-tokens", "64"], True),
    ],
)
def test_train_names_as_inert_only_the_flags_typed(tmp_path, capsys, args, said):
    """Through the CLI: the note comes before the model is looked for, so a missing one ends the run."""
    from imdb_lora.cli import main

    out = ["--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "run")]
    assert main(["train", *args, *out]) == 2
    assert ("--head-tokens: no effect" in capsys.readouterr().err) is said


def test_a_resume_does_not_name_its_saved_settings_inert(tmp_path, capsys):
    """`train --resume` with no flags reads the run's config.yaml: nothing in it was typed now."""
    from imdb_lora.cli import main

    run = tmp_path / "run"
    run.mkdir()
    saved = _with(data__truncation="head", data__head_tokens=64, train__method="full", lora__r=4)
    saved.model.name = str(tmp_path / "no-model")
    saved.save(run / "config.yaml")
    assert main(["train", "--resume", "--output-dir", str(run)]) == 2  # no checkpoint to resume
    err = capsys.readouterr().err
    assert "no effect" not in err and "holds no resumable run" in err, err


def test_head_tokens_from_a_config_under_a_shorter_max_length_names_the_key_and_the_flag(capsys):
    """minilm-quick's head_tokens 64 with --max-length 64 typed: the refusal named only --head-tokens,
    which the user had not typed, and `max_length - 2` without its value; then --head-tokens beside
    --max-length, though the recipe set it."""
    from imdb_lora.cli import main

    assert main(["train", "--config", "minilm-quick", "--max-length", "64"]) == 2
    err = capsys.readouterr().err
    said = "minilm-quick: data.head_tokens must be in (0, 62): below --max-length 64 less its 2 special tokens (got 64)"
    assert said in err


# A refusal of a --config file's value: (the file's text, the same value as flags, the refusal's rest after
# its subject, as the file's key and as the flag). Each refusal validate() makes, in its kinds.
FILE_REFUSALS = [
    ("lora: {r: 0}", ["--lora-r", "0"], "lora.r", "--lora-r", " must be a positive integer (got 0)"),
    (
        "train: {batching: flta}",
        ["--batching", "flta"],
        "train.batching",
        "--batching",
        " must be auto, padded, packed or flat (got 'flta'); did you mean flat?",
    ),
    (
        "train: {max_time: soon}",
        ["--max-time", "soon"],
        "train.max_time",
        "--max-time",
        " must be a duration: ",
    ),
    (
        f"data: {{path: {'x' * 300}}}",
        ["--data", "x" * 300],
        "data.path",
        "--data",
        ": not a usable path: a name of 300 bytes",
    ),
    (
        "data: {eval_files: [no-such.csv, no-such.csv]}",
        ["--eval-file", "no-such.csv", "--eval-file", "no-such.csv"],
        "data.eval_files",
        "--eval-file",
        " no-such.csv is given twice; list each file once",
    ),
    (
        "train: {weight_decay: 2500}",
        ["--weight-decay", "2500"],
        "train.weight_decay",
        "--weight-decay",
        " 2500 times --lr 0.0004 must be below 1: AdamW multiplies",
    ),
    (
        "lora: {targets: [ffm]}",
        ["--lora-targets", "ffm"],
        "lora.targets",
        "--lora-targets",
        f": unknown role(s) ['ffm']; choose from {ROLES}; did you mean ffn?",
    ),
    (
        "train: {cuda_graphs: true}",
        ["--cuda-graphs"],
        "train.cuda_graphs",
        "--cuda-graphs",
        " needs --batching flat (got True)",
    ),
]


def _train_refusal(capsys, *args: str) -> str:
    """The one line `train` refuses `args` with (before any model or data is looked for)."""
    from imdb_lora.cli import main

    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.removeprefix("imdb-lora: error: ").strip()


@pytest.mark.parametrize("text, flags, key, flag, rest", FILE_REFUSALS, ids=[r[2] for r in FILE_REFUSALS])
def test_a_refused_config_file_value_names_the_file_and_key(
    tmp_path, monkeypatch, capsys, text, flags, key, flag, rest
):
    """`train --config my.yaml` whose file set `lora: {r: 0}` was refused naming --lora-r, a flag never
    typed. The same value typed is named by its flag, as is a typed flag over the file's value."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.yaml").write_text(text + "\n")
    assert _train_refusal(capsys, "--config", "my.yaml").startswith(f"my.yaml: {key}{rest}")
    assert _train_refusal(capsys, *flags).startswith(f"{flag}{rest}")
    assert _train_refusal(capsys, "--config", "my.yaml", *flags).startswith(f"{flag}{rest}")


def test_the_other_setting_a_refusal_names_says_where_it_came_from(tmp_path, monkeypatch, capsys):
    """--weight-decay times --lr, and --head-tokens below --max-length: each side as it was given."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lr.yaml").write_text("train: {lr: 0.5}\n")
    (tmp_path / "both.yaml").write_text("train: {lr: 0.5, weight_decay: 2500}\n")
    assert _train_refusal(capsys, "--config", "lr.yaml", "--weight-decay", "2500").startswith(
        "--weight-decay 2500 times train.lr 0.5 in lr.yaml must be below 1"
    )
    assert _train_refusal(capsys, "--config", "both.yaml").startswith(
        "both.yaml: train.weight_decay 2500 times train.lr 0.5 must be below 1"
    )
    assert _train_refusal(capsys, "--config", "both.yaml", "--lr", "0.1").startswith(
        "both.yaml: train.weight_decay 2500 times --lr 0.1 must be below 1"
    )
    (tmp_path / "ht.yaml").write_text("data: {truncation: head_tail, max_length: 64, head_tokens: 100}\n")
    bound = "must be in (0, 62): below"
    assert _train_refusal(capsys, "--config", "ht.yaml") == (
        f"ht.yaml: data.head_tokens {bound} data.max_length 64 less its 2 special tokens (got 100)"
    )
    assert _train_refusal(capsys, "--config", "ht.yaml", "--head-tokens", "90") == (
        f"--head-tokens {bound} data.max_length 64 in ht.yaml less its 2 special tokens (got 90)"
    )


def test_compare_names_a_refused_config_file_value_by_the_file_and_key(tmp_path, monkeypatch):
    """compare checks both methods' settings before the first trains, naming them as each `train` will."""
    from imdb_lora.cli.compare import method_configs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.yaml").write_text("lora: {r: 0}\ntrain: {weight_decay: 2500, method: full}\n")
    lrs = {"lora": None, "full": None}
    with pytest.raises(UserError, match=r"^my\.yaml: lora\.r must be a positive integer \(got 0\)$"):
        method_configs(["--config", "my.yaml"], lrs)
    with pytest.raises(UserError, match=r"^--lora-r must be a positive integer \(got -1\)$"):
        method_configs(["--config", "my.yaml", "--lora-r", "-1"], lrs)
    # the LoRA arm's rate is --lora-lr's, given to its `train` as --lr: named as the user typed it
    with pytest.raises(UserError, match=r"^my\.yaml: train\.weight_decay 2500 times --lora-lr 0\.001 must"):
        method_configs(["--config", "my.yaml", "--lora-r", "4"], {"lora": 1e-3, "full": None})


def test_compare_names_each_arms_rate_by_the_flag_typed(tmp_path, monkeypatch):
    """compare's weight-decay x lr refusal named --lora-lr's (and --full-lr's) rate `--lr`, the flag compare
    passes to the arm's `train`, not one the user typed; a --lr among the train flags stays --lr."""
    from imdb_lora.cli.compare import method_configs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "wd.yaml").write_text("train: {weight_decay: 500}\n")  # x LoRA's default 4e-4: 0.2, fine
    with pytest.raises(UserError, match=r"^wd\.yaml: train\.weight_decay 500 times --full-lr 0\.01 must"):
        method_configs(["--config", "wd.yaml"], {"lora": None, "full": 0.01})
    with pytest.raises(UserError, match=r"^wd\.yaml: train\.weight_decay 500 times --lr 0\.01 must"):
        method_configs(["--config", "wd.yaml", "--lr", "0.01"], {"lora": None, "full": None})
    with pytest.raises(UserError, match=r"^--weight-decay 500 times --lora-lr 0\.01 must"):
        method_configs(["--weight-decay", "500", "--lr", "1e-4"], {"lora": 0.01, "full": None})


def test_a_saved_config_yaml_names_its_invalid_setting_by_key(tmp_path):
    """A run's config.yaml was refused naming a flag: `.../config.yaml: a saved setting is invalid:
    --lora-r must be ...`; no flag was typed, the file holds lora.r."""
    (tmp_path / "config.yaml").write_text("lora: {r: 0}\ndata: {truncation: head_tail, max_length: 64}\n")
    with pytest.raises(UserError) as e:
        Config.load_saved(tmp_path / "config.yaml")
    assert (
        str(e.value)
        == f"{tmp_path / 'config.yaml'}: a saved setting is invalid: lora.r must be a positive integer (got 0)"
    )
    (tmp_path / "config.yaml").write_text(
        "data: {truncation: head_tail, max_length: 64}\n"
    )  # head_tokens 128: default
    with pytest.raises(
        UserError, match=r"is invalid: data\.head_tokens must be in \(0, 62\): below data\.max_length 64 less"
    ):
        Config.load_saved(tmp_path / "config.yaml")

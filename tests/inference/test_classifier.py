"""Classifier: which data a finished run is read against by default; long texts read as windows."""

import json

from conftest import train_args, write_imdb

from imdb_lora.cli import main
from imdb_lora.config import Config
from imdb_lora.inference.classifier import use_recorded_imdb


def test_a_run_trained_on_the_environments_imdb_is_evaluated_on_that_copy(
    tiny_models, imdb_dir, tmp_path, monkeypatch, capsys
):
    # trained without --data (`make train` beside ../shared does this): $IMDB_LORA_DATA chose the copy
    monkeypatch.setenv("IMDB_LORA_DATA", str(imdb_dir))
    args = train_args(tiny_models("bert"), imdb_dir, tmp_path / "run", "--epochs", "1")
    i = args.index("--data")
    del args[i : i + 2]
    assert main(args) == 0
    # later the environment names another copy (or none, and IMDB would be downloaded)
    monkeypatch.setenv("IMDB_LORA_DATA", str(write_imdb(tmp_path / "other", per_class=5, seed=1)))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["examples"] == 48  # the run's own test split (24 reviews per class), not the other 10


def test_a_recorded_copy_that_is_gone_or_not_absolute_is_not_used(tmp_path):
    cfg = Config()
    use_recorded_imdb(cfg, {"data_source": {"kind": "imdb", "path": str(tmp_path / "gone.tar.xz")}})
    assert cfg.data.path is None  # $IMDB_LORA_DATA, else the download, as before
    # an export records a bare file name: never resolved against the current directory
    use_recorded_imdb(cfg, {"data_source": {"kind": "imdb", "path": "aclImdb-labeled.tar.xz"}})
    assert cfg.data.path is None
    cfg.data.path = "/my/imdb"  # given to train: config.yaml has it, run.json is not consulted
    use_recorded_imdb(cfg, {"data_source": {"kind": "imdb", "path": str(tmp_path)}})
    assert cfg.data.path == "/my/imdb"


def test_window_averaging_is_the_mean_of_the_windows_probabilities(trained_run):
    import torch

    from imdb_lora.data.tokenize import encode_windows
    from imdb_lora.inference.classifier import Classifier

    clf = Classifier.load(str(trained_run), device="cpu")
    texts = ["great film and boring plot " * 30, "awful"]
    windows, owner = encode_windows(clf.tokenizer, texts, clf.config.data.max_length, 20)
    assert owner.count(0) > 2 and owner.count(1) == 1  # the long text is read as several windows
    each = (clf.batched_logits(windows) / clf.temperature).softmax(-1)
    want = torch.stack([each[[i for i, o in enumerate(owner) if o == t]].mean(0) for t in range(len(texts))])
    got = clf.logits(texts, window_stride=20).exp()
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(got.sum(-1), torch.ones(2), atol=1e-6)

"""--pooling mean: the head on the masked mean, padded = packed, and train -> predict/export/serve."""

import json

import pytest
import torch
from conftest import train_args
from test_packing import random_reviews

from imdb_lora.cli import main
from imdb_lora.config import Config
from imdb_lora.data.batches import pack, pad_batch
from imdb_lora.errors import UserError
from imdb_lora.inference.classifier import Classifier
from imdb_lora.modeling.forward import batched_logits, padded_logits
from imdb_lora.modeling.lora import build_model
from imdb_lora.modeling.packing import packed_logits, position_start
from imdb_lora.modeling.pooling import CONFIG_KEY, set_pooling

TEXTS = [
    "great wonderful film i loved it",
    "awful boring plot and terrible acting",
    "the movie was " * 20,
    "a",
]


def lora_model(tiny_models, kind: str, pooling: str):
    cfg = Config()
    cfg.model.name, cfg.model.pooling = str(tiny_models(kind)), pooling
    model, _ = build_model(cfg.validate())
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero LoRA B, so the adapters take part
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.normal_(0, 0.02)
    return model.eval()


@pytest.mark.parametrize("kind", ["mpnet", "bert"])
def test_mean_head_reads_the_masked_mean_padded_or_packed(tiny_models, kind):
    model = lora_model(tiny_models, kind, "mean")
    base = model.get_base_model()
    seqs = random_reviews(base.config.vocab_size, 7, seed=4)
    ids, mask = pad_batch(seqs, base.config.pad_token_id)
    with torch.no_grad():
        padded = padded_logits(model, ids, mask)
        alone = torch.cat([padded_logits(model, *pad_batch([s], base.config.pad_token_id)) for s in seqs])
        packed = packed_logits(model, pack(seqs, 128, base.config.pad_token_id, position_start(model)))
        cls = model(input_ids=ids, attention_mask=mask).logits  # the Hugging Face head: first token
        hidden = getattr(base, base.base_model_prefix)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(padded, alone, atol=1e-5)  # padding never enters the mean
    assert torch.allclose(packed, padded, atol=1e-4), (packed - padded).abs().max()
    assert not torch.allclose(padded, cls, atol=1e-3)
    if kind == "mpnet":  # by hand: the mean of the review's own states through the model's head
        by_hand = torch.stack([base.classifier(hidden[i : i + 1, : len(s)].mean(1, keepdim=True))[0]
                               for i, s in enumerate(seqs)])  # fmt: skip
        assert torch.allclose(padded, by_hand, atol=1e-5)


def test_cls_pooling_leaves_the_config_untouched(tiny_models):
    model = lora_model(tiny_models, "mpnet", "cls")
    assert not hasattr(model.get_base_model().config, CONFIG_KEY)


def test_mean_pooling_refuses_unknown_heads():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=50)
    with pytest.raises(UserError, match="--pooling mean is not supported for model type 'distilbert'"):
        set_pooling(DistilBertForSequenceClassification(cfg), "mean")


def test_pooling_is_validated(capsys):
    assert main(["train", "--pooling", "max"]) == 2
    assert "--pooling must be cls or mean" in capsys.readouterr().err


@pytest.fixture(scope="module")
def mean_run(tiny_models, imdb_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pool") / "mpnet-mean"
    assert main(train_args(tiny_models("mpnet"), imdb_dir, out, "--epochs", "1", "--pooling", "mean")) == 0
    return out


def test_mean_run_reloads_predicts_and_exports(mean_run, tmp_path, capsys):
    assert Config.load(mean_run / "config.yaml").model.pooling == "mean"
    clf = Classifier.load(str(mean_run), device="cpu")
    want = clf.logits(TEXTS, batch_size=3)
    # the same weights read with the first token give other numbers: the pooling really is applied
    set_pooling(clf.model.get_base_model(), "cls")
    assert not torch.allclose(clf.logits(TEXTS, batch_size=3), want, atol=1e-4)
    for fmt in ("merged", "onnx"):
        assert main(["export", str(mean_run), "--to", str(tmp_path / fmt), "--format", fmt]) == 0
        got = Classifier.load(str(tmp_path / fmt), device="cpu").logits(TEXTS, batch_size=3)
        assert torch.allclose(got, want, atol=1e-5), (fmt, (got - want).abs().max())
    merged_cfg = json.loads((tmp_path / "merged" / "model" / "config.json").read_text())
    assert merged_cfg[CONFIG_KEY] == "mean"  # the merged model carries its pooling
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "onnx"), "--json", TEXTS[0]]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["probabilities"]["positive"] == pytest.approx(want.softmax(-1)[0, 1].item(), abs=1e-5)


def test_mean_run_is_served_with_its_pooling(mean_run):
    from fastapi.testclient import TestClient

    from imdb_lora.serving.app import create_app

    clf = Classifier.load(str(mean_run), device="cpu")
    want = clf.logits(TEXTS[:2]).softmax(-1)
    with TestClient(create_app(clf)) as client:
        r = client.post("/predict", json={"texts": TEXTS[:2]})
    assert r.status_code == 200, r.text
    got = [p["probabilities"]["positive"] for p in r.json()["predictions"]]
    assert got == pytest.approx(want[:, 1].tolist(), abs=1e-5)


def test_mean_adapter_loads_with_plain_peft_plus_the_pooling(mean_run, tiny_models):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_models("mpnet"), num_labels=2)
    set_pooling(base, "mean")
    model = PeftModel.from_pretrained(base, mean_run / "adapter").eval()
    clf = Classifier.load(str(mean_run), device="cpu", raw=True)  # raw: no temperature, as plain PEFT
    ids = clf.encode(TEXTS)
    got = batched_logits(model, ids, clf.tokenizer.pad_token_id, 4, torch.device("cpu"))
    assert torch.allclose(got, clf.logits(TEXTS), atol=1e-5)


def test_flat_batching_falls_back_to_padded_with_mean_pooling(tiny_models):
    from imdb_lora.modeling.flat import batching_path

    cpu = torch.device("cpu")
    for training in (True, False):
        assert batching_path("flat", lora_model(tiny_models, "bert", "cls"), cpu, training) == "flat"
        assert batching_path("flat", lora_model(tiny_models, "bert", "mean"), cpu, training) == "padded"
        assert batching_path("packed", lora_model(tiny_models, "bert", "mean"), cpu, training) == "packed"
        assert batching_path("flat", lora_model(tiny_models, "mpnet", "mean"), cpu, training) == "padded"
    cuda = torch.device("cuda")  # auto's flat evaluation on CUDA falls back too: packing computes the mean
    assert batching_path("auto", lora_model(tiny_models, "bert", "cls"), cuda, training=False) == "flat"
    assert batching_path("auto", lora_model(tiny_models, "bert", "mean"), cuda, training=False) == "packed"

import re
from pathlib import Path

import pytest
from conftest import ROBERTA_BASE, needs_shared
from torch import nn

from imdb_lora.config import Config
from imdb_lora.errors import UserError
from imdb_lora.modeling.load import load_base_model
from imdb_lora.modeling.lora import build_model, lora_target_modules


def cfg_for(path, **lora) -> Config:
    c = Config()
    c.model.name = str(path)
    for k, v in lora.items():
        setattr(c.lora, k, v)
    return c.validate()


def test_reference_count_on_the_real_roberta_base_architecture():
    """The reference's 2,410,442 trainable parameters, on roberta-base's real config (random weights)."""
    needs_shared()
    c = cfg_for(ROBERTA_BASE)
    c.model.random_init = True
    model, info = build_model(c)
    assert info["trainable_parameters"] == 2_410_442
    assert info["base_parameters"] == 124_647_170
    assert info["total_parameters"] == 124_647_170 + sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n
    )


EXPECTED = {
    # per layer: q, k, v, attention output, intermediate, output
    "roberta": r"roberta\.encoder\.layer\.\d\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)$",
    "bert": r"bert\.(encoder\.layer\.\d\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)|pooler\.dense)$",
    "mpnet": r"mpnet\.encoder\.layer\.\d\.(attention\.attn\.(q|k|v|o)|intermediate\.dense|output\.dense)$",
}


@pytest.mark.parametrize("kind", ["roberta", "bert", "mpnet"])
def test_roles_map_to_the_right_modules(tiny_models, kind):
    model, _ = load_base_model(str(tiny_models(kind)), 2, False, 0)
    targets = lora_target_modules(model, Config().lora.targets)
    linear = [t for t in targets if not t.endswith("word_embeddings")]
    assert all(re.fullmatch(EXPECTED[kind], t) for t in linear), linear
    assert len(linear) == 2 * 6 + (kind == "bert")  # 2 layers x 6 projections (+ bert's pooler)
    assert sum(t.endswith("embeddings.word_embeddings") for t in targets) == 1
    assert not any(t.startswith("classifier") for t in targets)


@pytest.mark.parametrize("kind", ["roberta", "bert", "mpnet"])
def test_head_trains_in_full_and_base_stays_frozen(tiny_models, kind):
    model, info = build_model(cfg_for(tiny_models(kind)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in n and "modules_to_save" in n for n in trainable)
    # outside LoRA and the head, exactly the biases of LoRA-wrapped layers train (peft's "lora_only"):
    # not LayerNorm biases, not the biases of layers LoRA left alone
    wrapped_biases = {
        f"{n}.base_layer.bias"
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and getattr(m.get_base_layer(), "bias", None) is not None
    }
    rest = {n for n in trainable if "lora_" not in n and "modules_to_save" not in n}
    assert wrapped_biases and rest == wrapped_biases
    # the record's counts: what trains, and the base counted once plus the LoRA matrices
    base, _ = load_base_model(str(tiny_models(kind)), 2, False, 0)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert info["base_parameters"] == sum(p.numel() for p in base.parameters())
    assert info["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info["total_parameters"] == info["base_parameters"] + lora > info["trainable_parameters"]


@pytest.mark.parametrize("rslora, scale", [(True, 8 / 4**0.5), (False, 8 / 4)])
def test_lora_scale_is_alpha_over_sqrt_r_with_rslora(tiny_models, rslora, scale):
    model, _ = build_model(cfg_for(tiny_models("bert"), r=4, alpha=8.0, rslora=rslora))
    scales = {
        m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A") and "default" in m.scaling
    }
    assert len(scales) == 1 and scales.pop() == pytest.approx(scale)


def test_no_bias_trains_without_lora_train_biases(tiny_models):
    model, _ = build_model(cfg_for(tiny_models("bert"), train_biases=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "modules_to_save" in n for n in trainable), trainable


def test_role_subset(tiny_models):
    model, _ = load_base_model(str(tiny_models("mpnet")), 2, False, 0)
    assert all(t.split(".")[-1] in "qkv" for t in lora_target_modules(model, ["attention_qkv"]))


def test_unknown_architecture_names_the_flag(tmp_path):
    from transformers import AlbertConfig, AlbertForSequenceClassification

    AlbertForSequenceClassification(
        AlbertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            embedding_size=8,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(
        UserError, match="not mapped for model type 'albert'.*--lora-modules.*query,key,value"
    ):
        build_model(cfg_for(tmp_path))
    model, info = build_model(cfg_for(tmp_path, target_modules=["query", "key", "value"]))
    wrapped = [
        n for n, m in model.named_modules() if n.endswith(("query", "key", "value")) and hasattr(m, "lora_A")
    ]
    assert wrapped and info["trainable_parameters"] > 0


def test_explicit_module_names_that_match_nothing(tiny_models):
    with pytest.raises(UserError, match="--lora-modules"):
        build_model(cfg_for(tiny_models("bert"), target_modules=["nothing_here"]))


@pytest.mark.parametrize("kind, names", [("mpnet", "q,k,v,o,"), ("roberta", "query,key,value,dense,")])
def test_lora_modules_matching_nothing_names_the_models_own_layers(tiny_models, kind, names):
    # roberta's query,value names nothing on mpnet, whose attention is q,k,v,o: the refusal says so
    with pytest.raises(UserError) as e:
        build_model(cfg_for(tiny_models(kind), target_modules=["query_x", "value_x"]))
    line = str(e.value)
    assert line.startswith(f"--lora-modules: none of query_x,value_x names a module of this {kind} model")
    assert names in line.split("its layers' names: ")[1] + "," and "classifier" not in line, line


def test_missing_model_folder(tmp_path):
    with pytest.raises(UserError, match="--model: no such directory"):
        build_model(cfg_for(tmp_path / "absent"))
    (tmp_path / "model.txt").write_text("not a folder")
    with pytest.raises(UserError, match=r"--model: \S+model.txt is a file, not a model folder"):
        build_model(cfg_for(tmp_path / "model.txt"))  # it said "no such directory" of a file that exists


def test_model_folder_without_weights(tmp_path, tiny_models):
    (tmp_path / "config.json").write_text((tiny_models("bert") / "config.json").read_text())
    with pytest.raises(UserError, match="no model.safetensors.*--random-init"):
        build_model(cfg_for(tmp_path))
    c = cfg_for(tmp_path)
    c.model.random_init = True
    assert isinstance(build_model(c)[0], nn.Module)


def test_hub_unreachable_suggests_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="hub.*--model PATH"):
        build_model(cfg_for("no-such-org/no-such-model"))


def test_half_precision_checkpoint_loads_as_float32(tmp_path, tiny_models):
    """GPU staging ships fp16 copies of real weights; training needs fp32 master weights."""
    import torch

    model, _ = load_base_model(str(tiny_models("bert")), 2, False, 0)
    half = tmp_path / "half"
    model.half().save_pretrained(half)
    loaded, _ = load_base_model(str(half), 2, False, 0)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for a, b in zip(model.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a.float(), b)


def test_unreachable_hub_fails_at_once_without_library_retries(monkeypatch):
    import time

    from huggingface_hub import constants

    from imdb_lora.modeling import load as model_mod

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model_mod, "hub_reachable", lambda: False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert model_mod.hub_options("no-such-org/no-such-model") == {"local_files_only": True}
    assert model_mod.hub_options("./local-folder") == {}
    t0 = time.time()
    with pytest.raises(UserError, match="hub is unreachable.*--model PATH"):
        build_model(cfg_for("no-such-org/no-such-model"))
    assert time.time() - t0 < 10
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # behind a proxy the probe says nothing
    assert model_mod.hub_options("no-such-org/no-such-model") == {}


@pytest.mark.parametrize("kind", ["roberta", "mpnet"])
def test_a_pooler_alone_on_a_model_without_one_is_refused_in_one_line(tiny_models, kind):
    """Their sequence-classification heads have no pooler: LoRA on it alone wrapped nothing, and peft
    raised NoMatchingPeftModuleError (a traceback) after the data had loaded."""
    with pytest.raises(UserError, match=rf"--lora-targets pooler: .*this {kind} model has no pooler"):
        build_model(cfg_for(tiny_models(kind), targets=["pooler"]))


def test_the_pooler_alone_is_refused_before_the_data_are_read(tiny_models, tmp_path, capsys):
    """Decided from config.json: the refusal came after the data had loaded (seconds to minutes for
    IMDB). A --data that does not exist shows the order: it would be the first line otherwise."""
    from imdb_lora.cli import main

    args = ["--model", str(tiny_models("roberta")), "--lora-targets", "pooler", "--max-length", "64"]
    args += ["--data", str(tmp_path / "no-data"), "--output-dir", str(tmp_path / "run")]
    assert main(["train", *args]) == 2
    assert "--lora-targets pooler: LoRA would wrap no module (this roberta model has no pooler)" in (
        capsys.readouterr().err
    )


def test_a_bert_checkpoint_without_its_pooler_is_not_said_to_have_none(tiny_models, tmp_path):
    """BERT's classifier has a pooler; a checkpoint saved without its weights gets a new one, trained
    in full. It was refused as 'this bert model has no pooler', which is not so."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(tiny_models("bert"), tmp_path / "bert"))
    weights = next(folder.glob("*.safetensors"))
    kept = {k: v for k, v in load_file(weights).items() if ".pooler." not in k}
    save_file(kept, weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"--lora-targets pooler: .*the modules it selects were missing from"):
        build_model(cfg_for(folder, targets=["pooler"]))

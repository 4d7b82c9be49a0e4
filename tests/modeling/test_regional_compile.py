"""--compile is regional: each encoder layer compiled in place, one graph serving every layer."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny
from test_packing import models

from imdb_lora.config import Config, Given
from imdb_lora.data.batches import flatten, pad_batch
from imdb_lora.errors import UserError
from imdb_lora.modeling.flat import flat_logits
from imdb_lora.modeling.forward import batched_logits, compile_encoder, encoder_layers
from imdb_lora.modeling.lora import build_model
from imdb_lora.modeling.packing import position_start

# Review lengths (specials included) and flat bucket chosen apart from the tiny models' own sizes
# (hidden 32, FFN 64, head dim 16, LoRA rank 8): dynamo gives a dimension equal to a static one the same
# symbol and then specialises it, which would add a graph for a reason other than the layer count.
LENGTHS = ([11, 23, 37], [30, 41, 50])
BUCKET = 48


def reviews(vocab: int, lengths: list[int]) -> list[list[int]]:
    return [[0] + [5 + (7 * i + j) % (vocab - 5) for j in range(n - 2)] + [2] for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def layered(tiny_models, tmp_path_factory):
    """kind -> layers -> a tiny model folder with that many encoder layers."""
    root = tmp_path_factory.mktemp("layered")
    cache = {}

    def get(kind: str, layers: int):
        if (kind, layers) not in cache:
            cache[kind, layers] = build_tiny(kind, root / f"{kind}-{layers}", layers=layers)
        return cache[kind, layers]

    return get


def logits_of(model, seqs, path: str) -> torch.Tensor:
    cfg = model.get_base_model().config
    if path == "flat":
        return flat_logits(model, flatten(seqs, cfg.pad_token_id, position_start(model), bucket=BUCKET))
    ids, mask = pad_batch(seqs, cfg.pad_token_id)
    return model(input_ids=ids, attention_mask=mask).logits


def traced_graphs(model, path: str) -> list[int]:
    """Compile the model as --compile does with a backend that only counts, run two training steps'
    forward and backward (two different lengths), and return each traced graph's op count."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(sum(1 for n in gm.graph.nodes if n.op == "call_function"))
        return gm.forward

    torch._dynamo.reset()
    compile_encoder(model, backend=counting_backend)
    model.train()
    vocab = model.get_base_model().config.vocab_size
    for lengths in LENGTHS:
        logits = logits_of(model, reviews(vocab, lengths), path)
        F.cross_entropy(logits, torch.tensor([0, 1, 1])).backward()
    return graphs


@pytest.mark.parametrize("kind, path", [("roberta", "flat"), ("mpnet", "padded")])
def test_one_compiled_graph_serves_every_layer(layered, kind, path):
    """The graphs dynamo traces, and the ops in them, do not grow with num_hidden_layers: the first
    layer's graph is reused by the others (compiling the whole encoder traced every layer's ops: 2x
    as many for 3 layers as for 1), and the second length reuses it too (dynamic shapes)."""
    traced = {}
    for layers in (1, 3):
        cfg = Config()
        cfg.model.name = str(layered(kind, layers))
        model, _ = build_model(cfg.validate())
        assert len(encoder_layers(model)) == layers
        traced[layers] = traced_graphs(model, path)
    assert len(traced[1]) == 1, traced  # one graph for both lengths and every layer
    assert traced[3] == traced[1], traced
    torch._dynamo.reset()


def test_compiled_logits_and_gradients_equal_eager(tiny_models):
    """Regional compilation is the same computation, padded and flat: fp32, dropout off, logits within
    1e-5 and every trainable gradient within 1e-5; the state dict keeps its keys (in place, no
    _orig_mod). The "eager" backend runs the graph dynamo traced, which is what regional compilation
    changes: a layer's weights baked into the shared graph would give every layer the first's weights.
    AOT autograd and Inductor on that graph: the slow tests (test_flat.py, test_packing.py)."""
    model = models(tiny_models, "roberta", "sdpa")  # eval mode: dropout off
    compiled = copy.deepcopy(model)
    keys = list(model.state_dict())
    torch._dynamo.reset()
    compile_encoder(compiled, backend="eager")
    assert list(compiled.state_dict()) == keys
    seqs = reviews(model.get_base_model().config.vocab_size, LENGTHS[0])
    y = torch.tensor([0, 1, 1])
    for path in ("padded", "flat"):
        out = []
        for m in (model, compiled):
            logits = logits_of(m, seqs, path)
            params = [p for p in m.parameters() if p.requires_grad]
            out.append((logits.detach(), torch.autograd.grad(F.cross_entropy(logits, y), params)))
        (a, ga), (b, gb) = out
        assert torch.allclose(a, b, atol=1e-5), (path, (a - b).abs().max())
        assert len(ga) > 10
        for x, z in zip(ga, gb):
            assert torch.allclose(x, z, atol=1e-5, rtol=1e-4), (path, (x - z).abs().max())
    torch._dynamo.reset()


def test_merged_flat_evaluation_of_a_compiled_model(tiny_models):
    """Flat evaluation merges LoRA into the base weights for the pass: on a compiled model it equals
    the eager padded evaluation, and the weights are put back bit for bit."""
    model = models(tiny_models, "bert", "sdpa")
    cfg = model.get_base_model().config
    seqs = reviews(cfg.vocab_size, LENGTHS[0] + LENGTHS[1])
    cpu = torch.device("cpu")
    padded = batched_logits(model, seqs, cfg.pad_token_id, 4, cpu)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch._dynamo.reset()
    compile_encoder(model, backend="eager")
    flat = batched_logits(model, seqs, cfg.pad_token_id, 1, cpu, packed="flat")
    assert torch.allclose(flat, padded, atol=1e-4), (flat - padded).abs().max()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    torch._dynamo.reset()


def test_a_model_without_a_layer_list_is_one_line(tiny_models):
    model = models(tiny_models, "bert", "sdpa")
    model.get_base_model().config.num_hidden_layers = 5  # no ModuleList of 5 layers in the tiny bert
    with pytest.raises(UserError, match="--compile: no list of 5 encoder layers found in this bert model"):
        compile_encoder(model, backend="eager")
    # a --config file's train.compile, as the trainer names it (config.Given): by the file and key
    flag = Given(file="my.yaml", in_file=frozenset({"train.compile"})).where("train.compile")
    with pytest.raises(UserError, match=r"^my\.yaml: train\.compile: no list of 5 .*; set it false there$"):
        compile_encoder(model, backend="eager", flag=flag)


class Crash(Exception):
    pass


def test_a_compiled_run_resumes_saves_standard_keys_and_exports(tiny_models, imdb_dir, tmp_path, monkeypatch):
    """`train --compile --batching flat` (dynamo's graphs run eagerly, standing in for Inductor), crashed
    after its step-2 checkpoint and resumed compiled: it finishes, its adapter holds the tensor names
    of an uncompiled model's, run.json says torch.compile, and it exports merged and evaluates."""
    import functools
    import json

    from conftest import train_args
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    import imdb_lora.training.trainer as trainer_module
    from imdb_lora.cli import main

    monkeypatch.setattr(
        trainer_module, "compile_encoder", functools.partial(compile_encoder, backend="eager")
    )
    steps = {"n": 0}

    def crash_after_3(self):
        steps["n"] += 1
        if steps["n"] == 3:
            raise Crash

    out = tmp_path / "compiled"
    flags = ("--epochs", "1", "--batching", "flat", "--no-eval-test-each-epoch", "--checkpoint-every", "2")
    torch._dynamo.reset()
    with monkeypatch.context() as m:
        m.setattr(trainer_module.Trainer, "_after_step", crash_after_3)
        with pytest.raises(Crash):
            main(train_args(tiny_models("roberta"), imdb_dir, out, *flags, "--compile"))
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    torch._dynamo.reset()
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and "torch.compile" in info["train_path"]
    cfg = Config()
    cfg.model.name = str(tiny_models("roberta"))
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        saved = sorted(f.keys())
    assert saved == sorted(get_peft_model_state_dict(build_model(cfg.validate())[0]))
    assert main(["export", str(out), "--to", str(tmp_path / "merged")]) == 0
    assert main(["evaluate", str(tmp_path / "merged"), "--data", str(imdb_dir), "--max-samples", "8"]) == 0

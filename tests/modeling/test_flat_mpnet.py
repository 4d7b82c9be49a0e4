"""MPNet's flat path (FlexAttention, document mask, relative position bias as a score_mod) is the same
computation as its padded forward (fp32, dropout off), LoRA and full fine-tuning alike."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_flat import as_fake, needs_cuda_build
from test_packing import models, random_reviews

from imdb_lora.data.batches import flatten, pad_batch
from imdb_lora.errors import UserError
from imdb_lora.modeling.flat import batching_path, flat_logits, flat_options_check, supports_flat
from imdb_lora.modeling.flat_mpnet import (
    FlatPositionBias,
    bias_table,
    document_block_mask,
    document_ids,
    enable_flat_mpnet,
    flex_attend,
    reference_attend,
)
from imdb_lora.modeling.packing import position_start


def flat_batch(model, seqs, bucket=64):
    return flatten(seqs, 1, position_start(model), bucket=bucket)


def long_mpnet(positions=400):
    """An in-memory random MPNet whose reviews may exceed max_distance (128) by far: every bucket used."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    cfg = MPNetConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=positions, pad_token_id=1, num_labels=2,
    )  # fmt: skip
    model = MPNetForSequenceClassification(cfg).eval()
    with torch.no_grad():  # a bias large enough that a wrong bucket shows in the logits
        model.mpnet.encoder.relative_attention_bias.weight.normal_(0, 1.0)
    return loud_head(model)


def loud_head(model):
    """Head weights of std 1 (random init gives 0.02): the logits and gradients then depend enough on
    the encoder's output that a wrong bias or mask shows far above the tolerances."""
    torch.manual_seed(6)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "classifier" in n and "lora" not in n:
                p.normal_(0, 1.0)
    return model


def tiny_lora_mpnet(tiny_models):
    return loud_head(models(tiny_models, "mpnet", "eager"))


def test_bias_table_is_transformers_dense_bias():
    """table[h, k - q + R] = MPNetEncoder.compute_position_bias at every (q, k) of a 300-token row."""
    enc = long_mpnet().mpnet.encoder
    n, reach = 300, 400
    dense = enc.compute_position_bias(torch.zeros(1, n, 32))[0]  # [heads, n, n]
    idx = torch.arange(n)
    table = bias_table(enc, reach)
    assert table.shape == (2, 2 * reach + 1)
    assert torch.equal(table[:, (idx[None, :] - idx[:, None]) + reach], dense)
    # the clamp is exact: the bucket no longer changes beyond max_distance (128)
    assert torch.equal(table[:, 0], table[:, reach - 128]) and torch.equal(
        table[:, -1], table[:, reach + 128]
    )


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_with_the_mods_equals_the_reference():
    """What CUDA runs (FlexAttention: the document block mask and the bias score_mod), eagerly on the
    CPU (forward only: eager FlexAttention has no CPU backward), = the per-review SDPA reference."""
    torch.manual_seed(2)
    lengths = [5, 150, 1, 37, 200]
    batch = flatten([[3] * n for n in lengths], 1, 2, bucket=128)
    heads, width, reach = 2, batch.width, 260
    q, k, v = (torch.randn(1, heads, width, 16) for _ in range(3))
    table = torch.randn(heads, 2 * reach + 1)
    ref = reference_attend(q, k, v, FlatPositionBias(table, reach, batch.cu_seqlens), scale=0.25)
    mask = document_block_mask(batch.cu_seqlens, width)
    flex = flex_attend(q, k, v, FlatPositionBias(table, reach, batch.cu_seqlens, mask), scale=0.25)
    assert torch.allclose(flex, ref, atol=1e-5), (flex - ref).abs().max()
    ids = document_ids(batch.cu_seqlens, width)
    assert ids[[0, 4, 5, 154, 155, 156, 192, 193, 392, 393, width - 1]].tolist() == [
        0,
        0,
        1,
        1,
        2,
        3,
        3,
        4,
        4,
        5,
        5,
    ]


def test_compiled_flex_attention_is_traced_once_per_shape_kind_not_per_call():
    """On CUDA every flat forward calls the compiled FlexAttention with a new score_mod closure, a new
    block mask and (bucketed) new widths. Dynamo must not compile again for each of them (it would hit
    its recompile limit and fall back to the unfused eager kernel): a fresh closure reuses the graph,
    and a second width makes the width dynamic once. Traced here with a counting backend (the CPU's
    Inductor cannot build FlexAttention's backward, and its forward template fails to compile in
    torch 2.13): this is dynamo's guard behaviour, which is the same on CUDA."""
    from torch.nn.attention.flex_attention import flex_attention

    from imdb_lora.modeling.flat_mpnet import relative_bias_mod

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(flex_attention, backend=counting_backend)
    heads, dim, reach = 2, 16, 64
    for width, lengths in [
        (128, [100, 28]),
        (128, [30, 90, 8]),
        (256, [200, 56]),
        (384, [300, 84]),
        (128, [128]),
    ]:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        mask = document_block_mask(cu, width)
        bias = FlatPositionBias(torch.randn(heads, 2 * reach + 1), reach, cu, mask)
        q, k, v = (torch.randn(1, heads, width, dim) for _ in range(3))
        out = fn(q, k, v, score_mod=relative_bias_mod(bias), block_mask=mask, scale=dim**-0.5)
        ref = reference_attend(q, k, v, bias, scale=dim**-0.5)
        assert torch.allclose(out, ref, atol=1e-5)
    assert len(graphs) == 2  # the first width, then one dynamic-width graph for all the others
    torch._dynamo.reset()


@pytest.mark.parametrize("where", ["tiny", "long"])
def test_mpnet_flat_logits_equal_padded_logits(tiny_models, where):
    if where == "tiny":  # the conftest model with LoRA (128 positions at most)
        model = tiny_lora_mpnet(tiny_models)
        seqs = random_reviews(model.get_base_model().config.vocab_size, 9, seed=3, max_len=120)
    else:  # reviews of up to ~330 tokens: distances far beyond max_distance
        model = long_mpnet()
        seqs = random_reviews(60, 5, seed=4, max_len=330) + [[0, 7, 2]]
    fresh = copy.deepcopy(model)
    assert supports_flat(model)
    ids, mask = pad_batch(seqs, 1)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        batch = flat_batch(model, seqs)
        assert batch.width > batch.real_tokens  # a padding tail, its own segment
        flat = flat_logits(model, batch)
        again = model(input_ids=ids, attention_mask=mask).logits  # padded calls still work after
        other = fresh(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(flat, padded, atol=1e-4), (flat - padded).abs().max()
    assert torch.equal(again, other) and torch.equal(again, padded)
    # the flat logits are in input order: each review alone gives its own row
    with torch.no_grad():
        for i in (0, len(seqs) - 1):
            alone = flat_logits(model, flat_batch(model, [seqs[i]]))
            assert torch.allclose(alone[0], flat[i], atol=1e-4)


def _grads(model, logits_fn, y):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(logits_fn(), y)
    return loss.detach(), dict(zip([n for n, p in model.named_parameters() if p.requires_grad], torch.autograd.grad(loss, params)))  # fmt: skip


def test_mpnet_flat_loss_and_lora_gradients_equal_padded(tiny_models):
    model = tiny_lora_mpnet(tiny_models)  # eval mode: dropout off
    seqs = random_reviews(model.get_base_model().config.vocab_size, 7, seed=5, max_len=120)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    ids, mask = pad_batch(seqs, 1)
    loss_a, ga = _grads(model, lambda: model(input_ids=ids, attention_mask=mask).logits, y)
    loss_b, gb = _grads(model, lambda: flat_logits(model, flat_batch(model, seqs)), y)
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert any("lora_A" in n for n in ga) and any("classifier" in n for n in ga) and len(ga) > 10
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), n


def test_mpnet_flat_full_fine_tuning_trains_the_bias():
    """Full fine-tuning: every weight, relative_attention_bias included, gets the padded gradient."""
    model = long_mpnet(positions=200)
    seqs = random_reviews(60, 6, seed=8, max_len=190)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    ids, mask = pad_batch(seqs, 1)
    loss_a, ga = _grads(model, lambda: model(input_ids=ids, attention_mask=mask).logits, y)
    loss_b, gb = _grads(model, lambda: flat_logits(model, flat_batch(model, seqs)), y)
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    name = "mpnet.encoder.relative_attention_bias.weight"
    assert name in gb and gb[name].abs().max() > 1e-3, gb[name].abs().max()
    assert (ga[name] - gb[name]).abs().max() <= 1e-4 * ga[name].abs().max()  # relative, not just 1e-5
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), n


def test_mpnet_flat_evaluation_merged_equals_padded_in_input_order(tiny_models):
    from imdb_lora.modeling.forward import batched_logits

    model = tiny_lora_mpnet(tiny_models)
    seqs = random_reviews(model.get_base_model().config.vocab_size, 13, seed=7, max_len=120)
    cpu = torch.device("cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    padded = batched_logits(model, seqs, 1, 4, cpu)
    flat = batched_logits(model, seqs, 1, 1, cpu, packed="flat")  # rows of <= 256 tokens: several rows
    assert torch.allclose(flat, padded, atol=1e-4), (flat - padded).abs().max()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_mpnet_flat_switches_only_the_attention_modules(tiny_models):
    model = tiny_lora_mpnet(tiny_models)
    base = model.get_base_model().mpnet
    names = {n for n, _ in model.named_parameters()}
    enable_flat_mpnet(base)
    enable_flat_mpnet(base)  # idempotent
    attn = base.encoder.layer[0].attention.attn
    assert (
        type(attn).__name__ == "FlatMPNetSelfAttention" and {n for n, _ in model.named_parameters()} == names
    )
    assert type(copy.deepcopy(model).get_base_model().mpnet.encoder.layer[0].attention.attn) is type(attn)
    del base.encoder.relative_attention_bias  # a layout the hook does not know: a one-line error
    with pytest.raises(
        UserError, match=r"\(MPNetEncoder has no relative_attention_bias\); use --batching padded"
    ):
        enable_flat_mpnet(base)


def test_mpnet_flat_is_chosen_only_when_asked(tiny_models):
    model = tiny_lora_mpnet(tiny_models)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert batching_path("flat", model, cpu, training=True) == "flat"
    assert batching_path("auto", model, cuda, training=True) == "padded"  # auto unchanged
    assert batching_path("auto", model, cuda, training=False) == "packed"  # its flat path: not measured
    flat_options_check(model, "flat", compile=False, cuda_graphs=False)
    flat_options_check(model, "padded", compile=True, cuda_graphs=True)
    with pytest.raises(UserError, match="--cuda-graphs is not built for mpnet's flat path"):
        flat_options_check(model, "flat", compile=False, cuda_graphs=True)
    with pytest.raises(UserError, match="--compile is not built for mpnet's flat path"):
        flat_options_check(model, "flat", compile=True, cuda_graphs=False)


def test_mpnet_flat_refusal_names_a_config_files_key_as_it_was_given(tiny_models):
    """The refusal named --cuda-graphs and said to drop it where a --config file had set it."""
    from imdb_lora.config import Given

    model = tiny_lora_mpnet(tiny_models)
    in_file = Given(frozenset(), "my.yaml", frozenset({"train.cuda_graphs", "train.fused_qkv"}))
    with pytest.raises(UserError) as e:
        flat_options_check(model, "flat", compile=False, cuda_graphs=True, name=in_file.where)
    assert str(e.value) == (
        "my.yaml: train.cuda_graphs is not built for mpnet's flat path (FlexAttention, compiled on its own); "
        "set it false there or use --batching padded"
    )
    with pytest.raises(
        UserError, match="^--fused-qkv is not built for .*; drop --fused-qkv or use --batching padded$"
    ):
        flat_options_check(
            model, "flat", False, False, fused_qkv=True, name=Given(frozenset({"train.fused_qkv"})).where
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention needs a CUDA device here")
def test_mpnet_flex_on_cuda_matches_padded():
    """On the GPU: compiled FlexAttention under bf16 autocast; logits and every full-fine-tuning
    gradient (relative_attention_bias included) close to the padded model's."""
    from imdb_lora.modeling.forward import autocast_for

    cuda = torch.device("cuda")
    model = long_mpnet().to(cuda)
    seqs = random_reviews(60, 9, seed=3, max_len=330)
    ids, mask = (t.cuda() for t in pad_batch(seqs, 1))
    batch = flat_batch(model, seqs, bucket=512).to(cuda)
    y = torch.tensor([i % 2 for i in range(len(seqs))], device=cuda)
    with autocast_for(cuda):
        loss_a, ga = _grads(model, lambda: model(input_ids=ids, attention_mask=mask).logits.float(), y)
        loss_b, gb = _grads(model, lambda: flat_logits(model, batch).float(), y)
    assert abs(loss_a - loss_b) < 2e-2, (loss_a, loss_b)
    for n in ga:
        scale = ga[n].abs().max() + 1e-6
        assert (ga[n] - gb[n]).abs().max() < 5e-2 * scale, n


@needs_cuda_build
def test_mpnet_flat_cuda_branch_runs_on_fake_cuda_tensors(monkeypatch):
    """Without a GPU (make test-gpu-versions: the GPU machine's CUDA build of torch): MPNet's flat
    forward on fake CUDA tensors (shapes, dtypes and devices, no data) takes its CUDA branch, the
    document block mask built on the device and FlexAttention called with it and the bias's score_mod.
    Fake tensors cannot be compiled, so the eager FlexAttention stands in for the compiled one (the
    same call); the compiled kernel itself is checked on a GPU (test_mpnet_flex_on_cuda_matches_padded)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from imdb_lora.data import batches

    monkeypatch.setattr(
        batches, "can_pin", lambda: False
    )  # fake tensors cannot be pinned (a GPU machine can pin)
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from imdb_lora.modeling import flat_mpnet

    calls = []

    def eager_flex(q, k, v, score_mod, block_mask, scale):
        calls.append((q.device.type, isinstance(block_mask, BlockMask), block_mask.shape))
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)

    monkeypatch.setattr(flat_mpnet, "_compiled_flex", lambda: eager_flex)
    model = long_mpnet()
    b = flat_batch(model, random_reviews(60, 9, seed=3, max_len=330), bucket=512)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake, torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile", UserWarning)
        logits = flat_logits(model.to("cuda"), as_fake(fake, b).to(torch.device("cuda")))
    assert logits.shape == (9, 2) and logits.device.type == "cuda"
    assert calls == [("cuda", True, (1, 1, b.width, b.width))] * model.config.num_hidden_layers

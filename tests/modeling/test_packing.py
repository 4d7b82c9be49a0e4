"""The packed (padding-free) forward is the same computation as the padded one."""

import random

import pytest
import torch
import torch.nn.functional as F

from imdb_lora.config import Config
from imdb_lora.data.batches import pack, pad_batch
from imdb_lora.modeling.lora import build_model
from imdb_lora.modeling.packing import packed_logits, position_start, supports_packing


def random_reviews(vocab: int, n: int, seed: int, max_len: int = 60, specials=(0, 2)) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [specials[0]] + [rng.randrange(5, vocab) for _ in range(rng.randint(3, max_len))] + [specials[1]]
        for _ in range(n)
    ]


def models(tiny_models, kind, attn):
    cfg = Config()
    cfg.model.name = str(tiny_models(kind))
    model, _ = build_model(cfg.validate())
    base = model.get_base_model()
    base.config._attn_implementation = attn if kind != "mpnet" else base.config._attn_implementation
    # non-zero LoRA B, so the adapters take part in the comparison
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.normal_(0, 0.02)
    return model.eval()


CASES = [("roberta", "sdpa"), ("roberta", "eager"), ("bert", "sdpa"), ("bert", "eager"), ("mpnet", "eager")]


@pytest.mark.parametrize("kind, attn", CASES)
def test_packed_logits_equal_padded_logits(tiny_models, kind, attn):
    model = models(tiny_models, kind, attn)
    assert supports_packing(model)
    vocab = model.get_base_model().config.vocab_size
    seqs = random_reviews(vocab, 9, seed=3)
    pad_id = model.get_base_model().config.pad_token_id
    ids, mask = pad_batch(seqs, pad_id)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        batch = pack(seqs, row_tokens=128, pad_id=pad_id, position_start=position_start(model))
        assert batch.input_ids.shape[0] < len(seqs)  # really packed: several reviews per row
        packed = packed_logits(model, batch)
    assert torch.allclose(packed, padded, atol=1e-4), (packed - padded).abs().max()


@pytest.mark.parametrize("kind, attn", [("roberta", "sdpa"), ("bert", "eager"), ("mpnet", "eager")])
def test_packed_loss_and_gradients_equal_padded(tiny_models, kind, attn):
    model = models(tiny_models, kind, attn)  # eval mode: dropout off, so both paths are deterministic
    cfg = model.get_base_model().config
    seqs = random_reviews(cfg.vocab_size, 7, seed=5)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(logits):
        loss = F.cross_entropy(logits, y)
        g = torch.autograd.grad(loss, params)
        return loss.detach(), g

    ids, mask = pad_batch(seqs, cfg.pad_token_id)
    loss_a, ga = grads(model(input_ids=ids, attention_mask=mask).logits)
    loss_b, gb = grads(packed_logits(model, pack(seqs, 128, cfg.pad_token_id, position_start(model))))
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_pack_keeps_input_order_and_fills_rows():
    seqs = [[1] * n for n in (50, 10, 70, 30, 60, 5)]
    b = pack(seqs, row_tokens=100, pad_id=0, position_start=0)
    assert b.real_tokens == sum(map(len, seqs))
    for i, s in enumerate(seqs):
        r, c = int(b.rows[i]), int(b.offsets[i])
        assert (b.segments[r, c : c + len(s)] == i).all()
        assert b.position_ids[r, c : c + len(s)].tolist() == list(range(len(s)))
    assert b.input_ids.shape[0] == 3  # 225 tokens in rows of 100
    with pytest.raises(ValueError):
        pack([[1] * 101], 100, 0, 0)


@pytest.mark.slow  # inductor compiles C++ kernels on the CPU: ~20 s (one layer's graph)
def test_compiled_encoder_gives_the_same_packed_and_padded_logits(tiny_models):
    from imdb_lora.modeling.forward import compile_encoder

    model = models(tiny_models, "roberta", "sdpa")
    pad_id = model.get_base_model().config.pad_token_id
    seqs = random_reviews(model.get_base_model().config.vocab_size, 6, seed=5)
    ids, mask = pad_batch(seqs, pad_id)
    batch = pack(seqs, row_tokens=128, pad_id=pad_id, position_start=position_start(model))
    with torch.no_grad():
        eager_padded = model(input_ids=ids, attention_mask=mask).logits
        eager_packed = packed_logits(model, batch)
        compile_encoder(model)
        compiled_padded = model(input_ids=ids, attention_mask=mask).logits
        compiled_packed = packed_logits(model, batch)
    assert torch.allclose(compiled_padded, eager_padded, atol=1e-4)
    assert torch.allclose(compiled_packed, eager_packed, atol=1e-4)


@pytest.mark.parametrize("kind, attn", [("roberta", "sdpa"), ("bert", "eager"), ("mpnet", "eager")])
def test_packed_evaluation_equals_padded_in_input_order(tiny_models, kind, attn):
    from imdb_lora.modeling.forward import batched_logits

    model = models(tiny_models, kind, attn)
    cfg = model.get_base_model().config
    seqs = random_reviews(cfg.vocab_size, 13, seed=7)
    cpu = torch.device("cpu")
    padded = batched_logits(model, seqs, cfg.pad_token_id, 4, cpu)
    packed = batched_logits(model, seqs, cfg.pad_token_id, 5, cpu, packed=True)
    assert torch.allclose(packed, padded, atol=1e-4), (packed - padded).abs().max()
    one_by_one = torch.cat([batched_logits(model, [s], cfg.pad_token_id, 1, cpu) for s in seqs])
    assert torch.allclose(padded, one_by_one, atol=1e-4)  # input order, not length order


def test_batching_choice(tiny_models):
    from types import SimpleNamespace

    from imdb_lora.errors import UserError
    from imdb_lora.modeling.packing import use_packing

    model = models(tiny_models, "bert", "sdpa")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object, no GPU needed
    for training in (True, False):
        assert not use_packing("auto", model, cpu, training)
        assert use_packing("packed", model, cpu, training) and not use_packing(
            "padded", model, cuda, training
        )
    # auto: padded training, packed evaluation on CUDA (the faster of each, as measured on an H200)
    assert not use_packing("auto", model, cuda, training=True) and use_packing(
        "auto", model, cuda, training=False
    )
    other = torch.nn.Module()
    other.config = SimpleNamespace(model_type="gpt2", _attn_implementation="sdpa")
    assert not use_packing("auto", other, cuda, training=False)
    with pytest.raises(UserError, match="--batching packed is not supported for model type 'gpt2'"):
        use_packing("packed", other, cpu, training=True)

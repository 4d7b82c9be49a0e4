"""--fused-qkv (training/fused.py): each self-attention's q, k and v as one computation in the step."""

import copy
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from test_flat import KINDS, _step_data, flat_batch
from test_packing import models
from test_working_copies import step_ops

from imdb_lora.config import TrainConfig
from imdb_lora.modeling import flat
from imdb_lora.modeling.flat import flat_logits
from imdb_lora.modeling.merge import frozen_weights_to_bf16, merged_lora
from imdb_lora.training.fused import QKV, FusedQKV
from imdb_lora.training.graphs import CapturedSteps, make_optimizer
from imdb_lora.training.step import train_step
from imdb_lora.training.step_rewrites import step_swaps
from imdb_lora.training.working import WorkingCopies


def run_steps(  # noqa: PLR0913
    model, batches, labels, fused=False, working_dtype=None, static=True, autocast=False, counter=None, capture=False
):  # fmt: skip
    """Flat training steps, as test_working_copies.run_steps, with or without the fused q/k/v (and the
    working copies); returns the trainable parameters, the per-step sums and the FusedQKV."""
    device = next(model.parameters()).device
    cfg = TrainConfig(lr=1e-2)
    params = [p for p in model.parameters() if p.requires_grad]
    if counter is None:
        opt = make_optimizer(params, cfg, device, captured=capture)
    else:  # fused AdamW as on CUDA
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    pad_id = model.get_base_model().config.pad_token_id
    fuse = FusedQKV(model) if fused else None
    working = WorkingCopies(model, working_dtype, fused=fuse) if working_dtype is not None else None
    captured = None
    if static:
        captured = CapturedSteps(
            model, opt, params, cfg, device, pad_id, len(batches[0]), 128, capture=capture, working=working, fused=fuse
        )  # fmt: skip
        captured.autocast = autocast or device.type == "cuda"
    sums = []
    for i, (seqs, y) in enumerate(zip(batches, labels)):
        last = counter is not None and i == len(batches) - 1
        with counter if last else nullcontext():
            out = train_step(model, opt, params, seqs, y.to(device), pad_id, device, "flat", 1e-2, cfg, captured=captured, working=working, fused=fuse)  # fmt: skip
        sums.append(torch.stack(out).cpu())
    return [p.detach().cpu().clone() for p in params], sums, fuse


def close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float) -> float:
    """The largest difference of two lists of tensors, checked against atol."""
    worst = max(float((x - y).abs().max()) for x, y in zip(a, b))
    assert worst <= atol, worst
    return worst


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("static", [True, False])
def test_fused_steps_give_the_unfused_parameters(tiny_models, kind, static):
    """float64, dropout off: 4 steps (the static-buffer step in two buckets and a partial batch eagerly,
    or the eager step alone) give the unfused steps' parameters and sums within 1e-10. (In fp32 the
    gradients agree within ~4e-9, but AdamW's per-element normalisation turns that rounding into up to
    1.3e-4 after 4 steps at lr 1e-2 in gradients that are rounding noise themselves, such as the key
    bias's, measured 2026-12-01; float64 shows it is the same computation.) The model's parameters, their
    names and the state-dict keys are unchanged, the frozen q/k/v weights are views of one tensor per
    self-attention (not a second copy), and no stand-in is left in the model after a step."""
    model = models(tiny_models, kind, "sdpa").double()  # eval mode: no dropout
    other = copy.deepcopy(model)
    keys, names = list(other.state_dict()), [n for n, _ in other.named_parameters()]
    batches, labels = _step_data(model)
    plain, plain_sums, _ = run_steps(model, batches, labels, static=static)
    fused, fused_sums, fuse = run_steps(other, batches, labels, True, static=static)
    assert len(fuse.groups) == 2  # the tiny models' two layers
    close(plain, fused, 1e-10)
    close(plain_sums, fused_sums, 1e-10)
    assert list(other.state_dict()) == keys and [n for n, _ in other.named_parameters()] == names
    group = fuse.groups[0]
    q = group.layers[0].get_base_layer().weight
    assert q.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
    assert all(type(m).__name__ != "_StandIn" for m in other.modules())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("static", [True, False])
def test_packed_working_copies_give_the_fused_parameters(tiny_models, kind, static):
    """fp32 working copies (the CPU's: no autocast) with --fused-qkv: q/k/v's LoRA matrices and biases
    are views of one buffer per kind and layer, and 4 steps give the fused steps' parameters within 1e-6
    (the same GEMMs on the same values); the copies follow the masters."""
    model = models(tiny_models, kind, "sdpa")
    other = copy.deepcopy(model)
    batches, labels = _step_data(model)
    fused, fused_sums, _ = run_steps(model, batches, labels, True, static=static)
    packed, packed_sums, fuse = run_steps(other, batches, labels, True, torch.float32, static=static)
    close(fused, packed, 1e-6)
    close(fused_sums, packed_sums, 1e-6)
    a, b, bias = fuse.groups[0].packed
    assert a.shape[0] == 3 * fuse.groups[0].rank and b.shape == (3 * a.shape[1], a.shape[0])
    assert bias is not None and bias.shape == (3 * a.shape[1],)  # the default recipe trains the biases
    q_a = fuse.groups[0].layers[0].lora_A["default"].weight
    assert torch.equal(a.detach()[: q_a.shape[0]], q_a.detach())  # refreshed after the last step


def grads(model, seqs, y, fuse: FusedQKV | None):
    """Logits, loss and trainable gradients of one flat forward and backward (fp32)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with step_swaps(None, fuse):
        logits = flat_logits(model, flat_batch(model, seqs))
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return logits.detach(), loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("frozen_biases", [False, True])
def test_fused_logits_loss_and_gradients_equal_the_unfused(tiny_models, kind, frozen_biases):
    """fp32, dropout off: one flat forward and backward, fused and not: logits, loss and every trainable
    gradient within 1e-5 (measured 2026-12-01: ~4e-9 each), q/k/v's LoRA gradients among them; with
    the wrapped layers' biases trained (the default) or frozen (--no-lora-train-biases: fused as well)."""
    model = models(tiny_models, kind, "sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("base_layer.bias"):  # the tiny models' are zero: make them count
                p.normal_(0, 0.02).requires_grad_(not frozen_biases)
    other = copy.deepcopy(model)
    seqs, _ = _step_data(model, sizes=(6,))
    y = torch.tensor([i % 2 for i in range(6)])
    la, loss_a, ga = grads(model, seqs[0], y, None)
    fuse = FusedQKV(other)
    lb, loss_b, gb = grads(other, seqs[0], y, fuse)
    assert torch.allclose(la, lb, atol=1e-5) and abs(loss_a - loss_b) < 1e-5
    assert len(ga) == len(gb)
    close(ga, gb, 1e-5)
    assert (fuse.groups[0].bias is not None) == frozen_biases  # frozen: concatenated, views of it
    for m in fuse.groups[0].layers:  # the fused branches got their gradients
        assert m.lora_A["default"].weight.grad.abs().max() > 0
        assert m.lora_B["default"].weight.grad.abs().max() > 0


def autocast_grads(model, seqs, y, fuse: FusedQKV | None, working: WorkingCopies | None):
    """Loss and trainable gradients of one flat forward and backward under CPU bf16 autocast (as the
    CUDA step runs it), through the working copies when given."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16), step_swaps(working, fuse):
        logits = flat_logits(model, flat_batch(model, seqs)).float()
    loss = F.cross_entropy(logits, y)
    loss.backward()
    if working is not None:
        working.grads_to_masters()
    return float(loss.detach()), [p.grad.clone() for p in params]


def relative_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """|got - ref| / |ref| over the tensors concatenated."""
    a, b = torch.cat([t.flatten() for t in got]), torch.cat([t.flatten() for t in ref])
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("working", [False, True])
def test_bf16_autocast_fused_step_is_as_close_to_fp32_as_the_unfused(tiny_models, kind, working):
    """Under bf16 autocast with the frozen weights in bf16 (the CUDA step's numerics, here on the CPU),
    with or without the bf16 working copies: the fused step's loss and gradients are as far from the
    fp32 step's as the unfused step's are, within bf16 rounding. Measured 2026-12-01 (relative error of
    all gradients, q/k/v's LoRA gradients): roberta 0.112 and 0.030 unfused, 0.124 and 0.029 fused;
    bert 0.370 and 0.018 both ways; a wrong scaling, block or bias gives errors of order 1. The key
    biases are left out: their true gradient is zero (softmax ignores them), so theirs is noise."""
    model = models(tiny_models, kind, "sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("base_layer.bias"):  # the tiny models' are zero: make them count
                p.normal_(0, 0.02)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    keep = [i for i, n in enumerate(names) if not n.endswith("key.base_layer.bias")]
    qkv = [i for i in keep if ".attention.self." in names[i]]
    seqs, _ = _step_data(model, sizes=(6,))
    y = torch.tensor([i % 2 for i in range(6)])
    _, loss32, g32 = grads(copy.deepcopy(model), seqs[0], y, None)
    frozen_weights_to_bf16(model)
    errors = {}
    for fused in (False, True):
        m = copy.deepcopy(model)
        fuse = FusedQKV(m) if fused else None
        copies = WorkingCopies(m, torch.bfloat16, fused=fuse) if working else None
        loss, g = autocast_grads(m, seqs[0], y, fuse, copies)
        errors[fused] = [
            abs(loss - float(loss32)),
            relative_error([g[i] for i in keep], [g32[i] for i in keep]),
            relative_error([g[i] for i in qkv], [g32[i] for i in qkv]),
        ]
    unfused, fused = errors[False], errors[True]
    assert fused[0] < 1e-4, errors  # measured <= 2.3e-5 either way
    assert fused[1] <= 1.25 * unfused[1] + 0.01 and fused[2] <= 1.25 * unfused[2] + 0.01, errors


@pytest.mark.parametrize("kind", KINDS)
def test_packed_b_keeps_its_zero_blocks_and_the_masters_diagonal(tiny_models, kind):
    """4 static-buffer steps under CPU bf16 autocast with the bf16 working copies packed, dropout on:
    the block-diagonal B buffer's off-diagonal blocks are still exact zeros (AdamW updates the masters
    only, and refresh writes only the diagonal views), and each diagonal block is its master in bf16."""
    model = models(tiny_models, kind, "sdpa").train()
    frozen_weights_to_bf16(model)
    batches, labels = _step_data(model, sizes=(4, 4, 4, 4))  # no partial batch: all static-buffer steps
    _, _, fuse = run_steps(model, batches, labels, True, torch.bfloat16, autocast=True)
    for g in fuse.groups:
        b, r = g.packed[1].detach(), g.rank
        diagonal = torch.block_diag(*[torch.ones(n, r, dtype=torch.bool) for n in g.sizes])
        assert not b[~diagonal].any()
        for i, (m, (off, n)) in enumerate(
            zip(g.layers, [(sum(g.sizes[:i]), n) for i, n in enumerate(g.sizes)])
        ):
            master = m.lora_B["default"].weight.detach()
            assert master.abs().max() > 0 and torch.equal(
                b[off : off + n, i * r : (i + 1) * r], master.bfloat16()
            )


def qkv_seen(model, seqs, fuse: FusedQKV | None) -> list[tuple[torch.Tensor, ...]]:
    """The q, k, v each attention call receives, in training mode (dropout on)."""
    seen = []
    real = flat.varlen_attention

    def spy(q, k, v, *args):
        seen.append((q.detach(), k.detach(), v.detach()))
        return real(q, k, v, *args)

    flat.varlen_attention = spy
    try:
        with torch.no_grad(), step_swaps(None, fuse):
            flat_logits(model, flat_batch(model, seqs))
    finally:
        flat.varlen_attention = real
    return seen


def test_evaluations_lora_merge_reaches_the_fused_weights_and_is_undone(tiny_models):
    """merge.merged_lora (flat evaluation inside `train`) writes the base weights in place: the fused
    tensor sees the merged weights inside the block and the original ones after, still aliased."""
    model = models(tiny_models, "roberta", "sdpa")
    fuse = FusedQKV(model)
    group = fuse.groups[0]
    before = group.weight.clone()
    with merged_lora(model):
        assert not torch.equal(group.weight, before) and group.aliased()
    assert torch.equal(group.weight, before) and group.aliased()


def qkv_layers(model) -> list[list[torch.nn.Module]]:
    """Each self-attention's query, key and value LoRA layers."""
    modules = dict(model.named_modules())
    parents = sorted({n.rsplit(".", 1)[0] for n in modules if n.endswith("attention.self.query")})
    return [[modules[f"{p}.{name}"] for name in QKV] for p in parents]


@pytest.mark.parametrize("fused", [False, True])
def test_the_three_lora_branches_share_one_dropout_mask(tiny_models, fused):
    """In training mode, q, k and v given the same base weights, biases, A and B, LoRA dropout 0.5 and
    attention dropout off: fused, the three branches read one dropout mask, so q = k = v in every layer;
    unfused (the flag off: the model as peft runs it), each module draws its own and they differ."""
    model = models(tiny_models, "roberta", "sdpa").train()
    groups = qkv_layers(model)
    with torch.no_grad():
        for layers in groups:
            q = layers[0]
            for m in layers:
                m.get_base_layer().weight.copy_(q.get_base_layer().weight)
                m.get_base_layer().bias.copy_(q.get_base_layer().bias)
                m.lora_A["default"].weight.copy_(q.lora_A["default"].weight)
                m.lora_B["default"].weight.copy_(q.lora_B["default"].weight)
                m.lora_dropout["default"].p = 0.5
    for m in model.modules():
        if type(m).__name__.endswith("SelfAttention"):
            m.dropout.p = 0.0
    fuse = FusedQKV(model) if fused else None
    seqs, _ = _step_data(model, sizes=(4,))
    seen = qkv_seen(model, seqs[0], fuse)
    assert len(seen) == len(groups) == 2
    for q, k, v in seen:
        assert torch.equal(q, k) == fused and torch.equal(q, v) == fused


def step_counter(model, working: bool, fused: bool):
    """scripts/step_ops.py's counter over the third static-buffer step, in training mode (dropout on),
    under CPU bf16 autocast with the frozen weights in bf16, as on CUDA."""
    ops = step_ops()
    counter = ops.StepOps()
    frozen_weights_to_bf16(model)
    model.train()
    batches, labels = _step_data(model, sizes=(4, 4, 4))
    saved = flat.varlen_attention
    flat.varlen_attention = ops.attention_as_one_op(counter)
    try:
        dtype = torch.bfloat16 if working else None
        run_steps(model, batches, labels, fused, dtype, autocast=True, counter=counter)
    finally:
        flat.varlen_attention = saved
    return counter


@pytest.mark.parametrize("working", [False, True])
def test_fused_qkv_cuts_the_step_ops(tiny_models, working):
    """The op count of one step on the tiny roberta (2 layers), with and without the working copies:
    fused, each layer draws one LoRA dropout mask instead of three and runs 16 fewer matmuls (mm and
    addmm: 105 -> 73 per step); a regression that brings back the per-module branches fails here.
    Measured 2026-12-01: 535 -> 429 ops without the working copies, 377 -> 305 with them; with them no
    per-step gather of the LoRA tensors is left (packed buffers: only split's backward concatenates)."""
    model = models(tiny_models, "roberta", "sdpa")
    plain = step_counter(copy.deepcopy(model), working, fused=False)
    fused = step_counter(model, working, fused=True)
    layers = 2
    assert fused.by_op["bernoulli_"] == plain.by_op["bernoulli_"] - 2 * layers
    assert fused.ops <= plain.ops - 30 * layers, (plain.figures(), fused.figures())
    assert fused.casts <= plain.casts
    if working:
        assert fused.by_op["block_diag"] == 0 and fused.by_op["cat"] == layers  # split's backward only
        assert fused.foreach_casts == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("working", [False, True])
def test_cuda_graph_step_with_fused_qkv_equals_the_eager_step(tiny_models, kind, working):
    """On the GPU (scripts/gpu-checks.sh part fast): the captured step with fused q/k/v (and the bf16
    working copies, packed) against the eager step with them, frozen weights in bf16 on both, dropout
    off: parameters after 4 steps (3 captured in two buckets, 1 eager) equal up to reduction order, as
    the working copies' captured-step check; the fused weights stay views of the frozen parameters."""
    model = models(tiny_models, kind, "sdpa").cuda()
    frozen_weights_to_bf16(model)
    other = copy.deepcopy(model)
    batches, labels = _step_data(model, sizes=(4, 4, 4, 3))
    dtype = torch.bfloat16 if working else None
    eager, eager_sums, _ = run_steps(model, batches, labels, True, dtype, static=False)
    graphed, graphed_sums, fuse = run_steps(other, batches, labels, True, dtype, capture=True)
    for a, b in zip(eager, graphed):
        assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()
    for a, b in zip(eager_sums, graphed_sums):
        assert torch.allclose(a, b, atol=1e-2)
    assert all(g.aliased() for g in fuse.groups)
    assert all(p.dtype == torch.float32 for p in other.parameters() if p.requires_grad)

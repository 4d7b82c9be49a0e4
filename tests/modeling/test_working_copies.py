"""--bf16-working-copies (training/working.py): the same step with fewer casts and gradient adds."""

import copy
import importlib.util
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_flat import KINDS, _step_data, flat_batch
from test_packing import models

from imdb_lora.config import TrainConfig
from imdb_lora.modeling.flat import flat_logits
from imdb_lora.modeling.merge import frozen_weights_to_bf16
from imdb_lora.training.graphs import CapturedSteps, make_optimizer
from imdb_lora.training.step import train_step
from imdb_lora.training.working import WorkingCopies

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "step_ops.py"


def step_ops():
    """scripts/step_ops.py as a module (its counter and attention stand-in)."""
    spec = importlib.util.spec_from_file_location("step_ops", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_steps(  # noqa: PLR0913
    model, batches, labels, working_dtype=None, static=True, autocast=False, counter=None, capture=False
):
    """Flat training steps through CapturedSteps' static-buffer step (uncaptured unless `capture`; a
    batch of another size runs train_step's eager path) or train_step alone; returns the trainable
    parameters, the per-step sums and the WorkingCopies. `counter` (a StepOps) counts the last step,
    with fused AdamW as on CUDA (the CPU's default AdamW runs a few ops per tensor)."""
    device = next(model.parameters()).device
    cfg = TrainConfig(lr=1e-2)
    params = [p for p in model.parameters() if p.requires_grad]
    if counter is None:
        opt = make_optimizer(params, cfg, device, captured=capture)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    pad_id = model.get_base_model().config.pad_token_id
    working = WorkingCopies(model, working_dtype) if working_dtype is not None else None
    captured = None
    if static:
        captured = CapturedSteps(
            model, opt, params, cfg, device, pad_id, len(batches[0]), 128, capture=capture, working=working
        )
        captured.autocast = autocast or device.type == "cuda"
    sums = []
    for i, (seqs, y) in enumerate(zip(batches, labels)):
        last = counter is not None and i == len(batches) - 1
        with counter if last else nullcontext():
            out = train_step(model, opt, params, seqs, y.to(device), pad_id, device, "flat", 1e-2, cfg, captured=captured, working=working)  # fmt: skip
        sums.append(torch.stack(out).cpu())
    return [p.detach().cpu().clone() for p in params], sums, working


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("static", [True, False])
def test_fp32_working_copies_give_the_same_parameters(tiny_models, kind, static):
    """Without autocast the copies are fp32: the static-buffer step (full batches in two buckets, a
    partial batch eagerly) and the eager step give the current step's parameters after 4 steps,
    dropout off; the model's parameters are still the fp32 masters, under the same state-dict keys."""
    model = models(tiny_models, kind, "sdpa")  # eval mode: no dropout
    other = copy.deepcopy(model)
    keys = list(other.state_dict())
    batches, labels = _step_data(model)
    plain, plain_sums, _ = run_steps(model, batches, labels, static=static)
    copied, copied_sums, working = run_steps(other, batches, labels, torch.float32, static=static)
    assert len(working.slots) > 10
    for a, b in zip(plain, copied):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    for a, b in zip(plain_sums, copied_sums):
        assert torch.allclose(a, b, atol=1e-6)
    assert list(other.state_dict()) == keys
    assert all(p.dtype == torch.float32 for p in other.parameters() if p.requires_grad)
    assert all(torch.equal(w, m) for w, m in zip(working.workings, working.masters))  # refreshed
    assert not any(torch.equal(a, b) for a, b in zip(plain, [p.detach() for p in models(tiny_models, kind, "sdpa").parameters() if p.requires_grad]))  # fmt: skip


def loss_and_grads(model, seqs, y, working: WorkingCopies | None):
    """One flat forward and backward under CPU bf16 autocast; the fp32 trainable gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if working is None:
            logits = flat_logits(model, flat_batch(model, seqs)).float()
        else:
            with working.swapped():
                logits = flat_logits(model, flat_batch(model, seqs)).float()
    loss = F.cross_entropy(logits, y)
    loss.backward()
    if working is not None:
        working.grads_to_masters()
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_working_copies_agree_with_autocast_at_bf16_rounding(tiny_models, kind):
    """CPU bf16 autocast, frozen weights in bf16 (as on CUDA), dropout off: the loss agrees within
    1e-2 and every trainable gradient within 3% of the largest gradient. The differences are bf16
    rounding: gradients of a shared bf16 input are summed in bf16 (they were summed in fp32)."""
    model = models(tiny_models, kind, "sdpa")
    frozen_weights_to_bf16(model)
    other = copy.deepcopy(model)
    seqs, _ = _step_data(model, sizes=(6,))
    y = torch.tensor([i % 2 for i in range(6)])
    loss_a, ga = loss_and_grads(model, seqs[0], y, None)
    working = WorkingCopies(other, torch.bfloat16)
    loss_b, gb = loss_and_grads(other, seqs[0], y, working)
    assert all(w.dtype == torch.bfloat16 for w in working.workings)
    assert abs(loss_a - loss_b) < 1e-2, (loss_a, loss_b)
    scale = max(g.abs().max() for g in ga)
    worst = max((a - b).abs().max() for a, b in zip(ga, gb))
    assert worst < 3e-2 * scale, (worst, scale)
    assert all(g.dtype == torch.float32 for g in gb)


def mean_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(float((x - y).abs().sum()) for x, y in zip(a, b)) / sum(x.numel() for x in a)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_working_copies_train_as_close_to_fp32_as_autocast_does(tiny_models, kind):
    """4 static-buffer steps under CPU bf16 autocast (frozen weights in bf16), with and without the
    working copies, against the same steps in fp32 from the same weights: the working copies end no
    farther from fp32 than 1.5x plain autocast's distance (measured 2026-12-01: 1.02x roberta, 1.23x
    bert; each ~0.004-0.007 mean per element after 4 steps at lr 1e-2, where AdamW's per-element
    normalisation turns rounding in small gradients into whole-lr steps)."""
    model = models(tiny_models, kind, "sdpa")
    frozen_weights_to_bf16(model)
    fp32 = copy.deepcopy(model)
    for m in fp32.modules():  # the same (bf16-rounded) frozen values, computed in fp32
        for p in m._parameters.values():
            if p is not None and p.dtype == torch.bfloat16:
                p.data = p.data.float()
    other = copy.deepcopy(model)
    batches, labels = _step_data(model, sizes=(4, 4, 4, 4))
    ref, _, _ = run_steps(fp32, batches, labels)
    plain, _, _ = run_steps(model, batches, labels, autocast=True)
    copied, _, _ = run_steps(other, batches, labels, torch.bfloat16, autocast=True)
    base = mean_distance(plain, ref)
    assert base > 0  # autocast really rounded
    assert mean_distance(copied, ref) <= 1.5 * base, (mean_distance(copied, ref), base)


def count(model, working: bool):
    """Ops of the third static-buffer step under CPU bf16 autocast, frozen weights in bf16."""
    ops = step_ops()
    counter = ops.StepOps()
    frozen_weights_to_bf16(model)
    batches, labels = _step_data(model, sizes=(4, 4, 4))
    from imdb_lora.modeling import flat

    saved = flat.varlen_attention
    flat.varlen_attention = ops.attention_as_one_op(counter)
    try:
        run_steps(model, batches, labels, torch.bfloat16 if working else None, autocast=True, counter=counter)
    finally:
        flat.varlen_attention = saved
    return counter.figures()


def test_working_copies_cut_the_step_ops(tiny_models):
    """The op count of one step (scripts/step_ops.py's counter) on the tiny roberta (2 layers): the
    casts of trainable weights and their gradients, the LoRA inputs' round trips through fp32 and the
    gradient accumulations go; a regression that brings them back fails here. Measured 2026-12-01:
    see the assertions' figures."""
    model = models(tiny_models, "roberta", "sdpa")
    before = count(copy.deepcopy(model), working=False)
    after = count(model, working=True)
    assert after["ops"] <= 0.75 * before["ops"], (before, after)
    assert after["casts"] <= 0.25 * before["casts"], (before, after)
    assert after["grad_accumulations"] <= 4 and before["grad_accumulations"] > 20, (before, after)
    assert after["foreach_casts"] == 2  # the gradients to the masters, the masters to the copies


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graph_step_with_working_copies_equals_the_eager_step(tiny_models, kind):
    """On the GPU (scripts/gpu-checks.sh part fast): the captured step with bf16 working copies (updated
    in place inside the graph) against the eager step with them, frozen weights in bf16 on both,
    dropout off: parameters after 4 steps (3 captured in two buckets, 1 eager) equal up to reduction
    order, as test_flat's captured-step check; and the copies follow the masters."""
    model = models(tiny_models, kind, "sdpa").cuda()
    frozen_weights_to_bf16(model)
    other = copy.deepcopy(model)
    batches, labels = _step_data(model, sizes=(4, 4, 4, 3))
    eager, eager_sums, _ = run_steps(model, batches, labels, torch.bfloat16, static=False)
    graphed, graphed_sums, working = run_steps(other, batches, labels, torch.bfloat16, capture=True)
    for a, b in zip(eager, graphed):
        assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()
    for a, b in zip(eager_sums, graphed_sums):
        assert torch.allclose(a, b, atol=1e-2)
    assert all(torch.equal(w, m.to(torch.bfloat16)) for w, m in zip(working.workings, working.masters))
    assert all(p.dtype == torch.float32 for p in other.parameters() if p.requires_grad)

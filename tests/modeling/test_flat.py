"""The flat (one padding-free row, per-review attention) forward is the same computation as padded."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_packing import models, random_reviews

from imdb_lora.data.batches import FlatBatch, flat_token_batches, flat_width, flatten, pad_batch
from imdb_lora.modeling.flat import FLAT_ATTENTION, batching_path, flat_logits, supports_flat
from imdb_lora.modeling.packing import position_start

KINDS = ["roberta", "bert"]


def flat_batch(model, seqs, bucket=64):
    cfg = model.get_base_model().config
    return flatten(seqs, cfg.pad_token_id, position_start(model), bucket=bucket)


@pytest.mark.parametrize("kind", KINDS)
def test_flat_logits_equal_padded_logits(tiny_models, kind):
    model = models(tiny_models, kind, "sdpa")
    assert supports_flat(model)
    cfg = model.get_base_model().config
    seqs = random_reviews(cfg.vocab_size, 9, seed=3)
    ids, mask = pad_batch(seqs, cfg.pad_token_id)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        batch = flat_batch(model, seqs)
        assert batch.input_ids.shape[0] == 1 and batch.width > batch.real_tokens  # one row, a tail
        flat = flat_logits(model, batch)
        assert cfg._attn_implementation == FLAT_ATTENTION
        again = model(input_ids=ids, attention_mask=mask).logits  # padded calls still work after
    assert torch.allclose(flat, padded, atol=1e-4), (flat - padded).abs().max()
    assert torch.allclose(again, padded, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_flat_loss_and_gradients_equal_padded(tiny_models, kind):
    model = models(tiny_models, kind, "sdpa")  # eval mode: dropout off, so both paths are deterministic
    cfg = model.get_base_model().config
    seqs = random_reviews(cfg.vocab_size, 7, seed=5)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(logits):
        loss = F.cross_entropy(logits, y)
        return loss.detach(), torch.autograd.grad(loss, params)

    ids, mask = pad_batch(seqs, cfg.pad_token_id)
    loss_a, ga = grads(model(input_ids=ids, attention_mask=mask).logits)
    loss_b, gb = grads(flat_logits(model, flat_batch(model, seqs)))
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert len(ga) > 10
    for p, a, b in zip(params, ga, gb):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), p.shape


def test_flatten_layout():
    seqs = [[7] * n for n in (5, 3, 9)]
    b = flatten(seqs, pad_id=1, position_start=2, bucket=8)
    assert b.width == 24 == flat_width(17, 8) and b.real_tokens == 17
    assert b.cu_seqlens.tolist() == [0, 5, 8, 17, 24] and b.cu_seqlens.dtype == torch.int32
    assert b.starts.tolist() == [0, 5, 8] and b.max_len == 9
    assert b.position_ids[0].tolist() == [*range(2, 7), *range(2, 5), *range(2, 11), *[2] * 7]
    assert (b.input_ids[0, 17:] == 1).all() and (b.input_ids[0, :17] == 7).all()
    assert flat_width(16, 8) == 24  # a full bucket still gets a padding tail: no empty segment
    assert flat_token_batches([5, 3, 9, 2, 20], 10) == [[0, 1], [2], [3], [4]]


def test_flat_needs_a_supported_architecture(tiny_models):
    from imdb_lora.errors import UserError

    other = models(tiny_models, "bert", "sdpa")
    other.get_base_model().config.model_type = "electra"  # an architecture without a flat forward
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(UserError, match="--batching flat is not supported for model type 'electra'"):
        batching_path("flat", other, cpu, training=True)
    bert = models(tiny_models, "bert", "sdpa")
    assert batching_path("flat", bert, cpu, training=True) == "flat"
    # auto as measured on an H200 (2026-11-30): padded training, flat evaluation on CUDA, padded on the CPU
    assert batching_path("auto", bert, cuda, training=True) == "padded"
    assert batching_path("auto", bert, cuda, training=False) == "flat"
    assert batching_path("auto", bert, cpu, training=False) == "padded"


@pytest.mark.parametrize("kind", KINDS)
def test_flat_evaluation_merged_equals_padded_in_input_order(tiny_models, kind):
    from imdb_lora.modeling.forward import batched_logits

    model = models(tiny_models, kind, "sdpa")
    cfg = model.get_base_model().config
    seqs = random_reviews(cfg.vocab_size, 13, seed=7)
    cpu = torch.device("cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    padded = batched_logits(model, seqs, cfg.pad_token_id, 4, cpu)
    flat = batched_logits(model, seqs, cfg.pad_token_id, 1, cpu, packed="flat")  # rows of <= 256 tokens
    assert torch.allclose(flat, padded, atol=1e-4), (flat - padded).abs().max()
    for n, p in model.named_parameters():  # LoRA merged for the pass, then the weights put back exactly
        assert torch.equal(p, before[n]), n
    unmerged = batched_logits(model, seqs, cfg.pad_token_id, 4, cpu)
    assert torch.equal(unmerged, padded)


def _steps(model, batches, labels, captured_cls=None, capture=False):
    """Three-ish flat training steps of the real step function; returns the trainable parameters."""
    from imdb_lora.config import TrainConfig
    from imdb_lora.training.graphs import CapturedSteps, make_optimizer
    from imdb_lora.training.step import train_step

    device = next(model.parameters()).device
    cfg = TrainConfig(lr=1e-2)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg, device, captured=capture)
    pad_id = model.get_base_model().config.pad_token_id
    captured = (
        CapturedSteps(model, opt, params, cfg, device, pad_id, len(batches[0]), 128, capture=capture)
        if captured_cls
        else None
    )
    sums = []
    for seqs, y in zip(batches, labels):
        y = y.to(device)
        sums.append(
            train_step(model, opt, params, seqs, y, pad_id, device, "flat", 1e-2, cfg, captured=captured)
        )
    return [p.detach().cpu() for p in params], [torch.stack(s).cpu() for s in sums], captured


def _step_data(model, sizes=(4, 4, 3, 4)):
    vocab = model.get_base_model().config.vocab_size
    seqs = random_reviews(vocab, sum(sizes), seed=11)
    out, i = [], 0
    for n in sizes:  # two buckets of full batches, and a partial batch that runs eagerly
        out.append(seqs[i : i + n])
        i += n
    return out, [torch.tensor([j % 2 for j in range(n)]) for n in sizes]


@pytest.mark.parametrize("kind", KINDS)
def test_static_buffer_step_equals_the_eager_step(tiny_models, kind):
    """CapturedSteps on the CPU runs its static-buffer step uncaptured: same parameters as the plain
    eager step after 4 steps (3 full batches in two buckets, 1 partial batch run eagerly), dropout off."""
    import copy

    model = models(tiny_models, kind, "sdpa")  # eval mode: no dropout
    other = copy.deepcopy(model)
    batches, labels = _step_data(model)
    eager, eager_sums, _ = _steps(model, batches, labels)
    static, static_sums, captured = _steps(other, batches, labels, captured_cls=True)
    assert len(captured.buckets) >= 1
    for a, b in zip(eager, static):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    for a, b in zip(eager_sums, static_sums):
        assert torch.allclose(a, b, atol=1e-5)
    assert not any(torch.equal(a, b) for a, b in zip(eager, [p.detach() for p in models(tiny_models, kind, "sdpa").parameters() if p.requires_grad]))  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graph_step_equals_the_eager_step(tiny_models, kind):
    import copy

    model = models(tiny_models, kind, "sdpa").cuda()
    other = copy.deepcopy(model)
    batches, labels = _step_data(model, sizes=(4, 4, 4, 3))
    eager, eager_sums, _ = _steps(model, batches, labels)
    graphed, graphed_sums, captured = _steps(other, batches, labels, captured_cls=True, capture=True)
    assert all(b.graph is not None for b in captured.buckets.values())
    for a, b in zip(eager, graphed):  # bf16 autocast on both: equal up to reduction order
        assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()
    for a, b in zip(eager_sums, graphed_sums):
        assert torch.allclose(a, b, atol=1e-2)


@pytest.mark.slow  # ~25 s on 2 CPU cores (one layer traced, forward and backward; whole encoder: ~110 s)
def test_compiled_flat_step_equals_the_eager_step(tiny_models):
    """torch.compile of the encoder (dynamic token dimension) on the flat path: same parameters after 3
    steps. aot_eager traces forward and backward as Inductor would, without its slow CPU code
    generation (the Inductor variant is the slow test in test_packing.py and the GPU script)."""
    import copy

    from imdb_lora.modeling.forward import compile_encoder

    torch._dynamo.reset()
    model = models(tiny_models, "roberta", "sdpa")
    other = copy.deepcopy(model)
    batches, labels = _step_data(model, sizes=(4, 5, 3))
    eager, eager_losses, _ = _steps(model, batches, labels)
    compile_encoder(other, backend="aot_eager")
    compiled, compiled_losses, _ = _steps(other, batches, labels)
    for a, b in zip(eager_losses, compiled_losses):  # traced attention: a block mask, eager a loop
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # AdamW divides each update by the gradient's own scale, so where a gradient is still ~0 (lora_A
    # while lora_B is near its zero start) float rounding becomes a visible update difference (3.8e-5
    # here on 8 of 512 elements); a different computation moves parameters by ~lr (1e-2) per step.
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_flash_varlen_on_cuda_matches_padded(tiny_models, kind):
    """On the GPU the flat path runs the flash kernel under bf16 autocast: logits close to the padded
    model's, gradients close in train mode with dropout off, and finite with attention dropout on."""
    from imdb_lora.modeling.forward import autocast_for

    model = models(tiny_models, kind, "sdpa").cuda()
    cfg = model.get_base_model().config
    seqs = random_reviews(cfg.vocab_size, 9, seed=3)
    cuda = torch.device("cuda")
    ids, mask = (t.cuda() for t in pad_batch(seqs, cfg.pad_token_id))
    batch = flat_batch(model, seqs).to(cuda)
    with autocast_for(cuda):
        with torch.no_grad():
            padded = model(input_ids=ids, attention_mask=mask).logits.float()
            flat = flat_logits(model, batch).float()
        assert torch.allclose(flat, padded, atol=3e-2), (flat - padded).abs().max()
        params = [p for p in model.parameters() if p.requires_grad]
        y = torch.tensor([i % 2 for i in range(len(seqs))], device=cuda)
        ga = torch.autograd.grad(
            F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits.float(), y), params
        )
        gb = torch.autograd.grad(F.cross_entropy(flat_logits(model, batch).float(), y), params)
        scale = max(a.abs().max() for a in ga)
        assert max((a - b).abs().max() for a, b in zip(ga, gb)) < 5e-2 * scale
        model.train()  # attention dropout 0.1 inside the flash kernel, and its backward
        gc = torch.autograd.grad(F.cross_entropy(flat_logits(model, batch).float(), y), params)
    assert all(torch.isfinite(g).all() for g in gc)


# Fake CUDA tensors (shapes, dtypes and devices, no data) run CUDA code paths without a GPU, but only where
# torch is a CUDA build (make test-gpu-versions installs the GPU machine's); a CPU build refuses them.
needs_cuda_build = pytest.mark.skipif(
    torch.version.cuda is None, reason="fake CUDA tensors need a CUDA build of torch"
)


def as_fake(fake, b: FlatBatch) -> FlatBatch:
    """b with its tensors as fake tensors of the FakeTensorMode `fake` (same shapes, dtypes, devices)."""
    tensors = (b.input_ids, b.position_ids, b.cu_seqlens, b.starts)
    return FlatBatch(*(fake.from_tensor(t) for t in tensors), b.max_len, b.real_tokens)


@needs_cuda_build
@pytest.mark.parametrize("kind", KINDS)
def test_flat_cuda_branch_runs_on_fake_cuda_tensors(tiny_models, kind, monkeypatch):
    """Without a GPU (make test-gpu-versions: the GPU machine's CUDA build of torch): CUDA training's
    flat evaluation (frozen weights in bf16, LoRA merged into them, the flash varlen kernel, logits back
    in input order) run on fake CUDA tensors (shapes, dtypes and devices, no data), so a call that torch
    refuses fails here rather than in a GPU session."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    from torch.utils._python_dispatch import TorchDispatchMode

    from imdb_lora.data import batches

    monkeypatch.setattr(
        batches, "can_pin", lambda: False
    )  # fake tensors cannot be pinned (a GPU machine can pin)

    from imdb_lora.modeling import forward
    from imdb_lora.modeling.merge import frozen_weights_to_bf16

    fake = FakeTensorMode(allow_non_fake_inputs=True)

    def host_flatten(*args, **kwargs):  # built on the host from real token ids, then handed over as fake
        with unset_fake_temporarily():
            return as_fake(fake, flatten(*args, **kwargs))

    monkeypatch.setattr(forward, "flatten", host_flatten)

    calls = []

    class FlashCalls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._flash_attention_forward.default:
                calls.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    model = models(tiny_models, kind, "sdpa")
    cfg = model.get_base_model().config
    seqs = random_reviews(cfg.vocab_size, 9, seed=3)
    cuda = torch.device("cuda")
    with fake, FlashCalls(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "CUDA is not available", UserWarning)  # autocast: no real GPU
        model.to(cuda)
        assert frozen_weights_to_bf16(model) > 0
        logits = forward.batched_logits(
            model, seqs, cfg.pad_token_id, batch_size=4, device=cuda, packed="flat"
        )
    assert logits.shape == (9, 2) and logits.dtype == torch.float32
    assert calls and set(calls) == {torch.bfloat16}  # the kernel ran, in half precision
    assert len(calls) % cfg.num_hidden_layers == 0  # once per layer for each flat row


def test_flat_evaluation_rows_are_the_measured_65536_tokens_on_cuda_only():
    from imdb_lora.modeling.forward import flat_eval_row_tokens

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert flat_eval_row_tokens(64, cuda) == flat_eval_row_tokens(8, cuda) == 65_536
    assert flat_eval_row_tokens(64, cpu) == 64 * 256  # the CPU's compiled reference builds a row x row mask


def _fake_cuda_copies(monkeypatch):
    """Tensor.to(cuda) and pin_memory() stand-ins on a CPU-only build: a "pinned" tensor is marked, a
    copy to CUDA records (source pinned?, non_blocking) and returns the tensor itself."""
    from imdb_lora.data import batches

    real_to = torch.Tensor.to
    sent: list[tuple[bool, bool]] = []

    def fake_pin(self):
        out = self.clone()
        out._test_pinned = True
        return out

    def fake_to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            sent.append((getattr(self, "_test_pinned", False), kwargs.get("non_blocking", False)))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: getattr(self, "_test_pinned", False))
    monkeypatch.setattr(batches, "can_pin", lambda: True)  # pinning needs a CUDA runtime
    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    return sent


def test_batches_reach_cuda_from_pinned_memory_without_a_sync(monkeypatch, tiny_models):
    """A copy from pageable host memory makes the host wait for the device's queued work (the last
    step); flat, packed and padded batches and the labels go through pinned memory, non-blocking."""
    from imdb_lora.data.batches import to_device
    from imdb_lora.modeling.forward import forward_logits

    cpu_source = torch.arange(6)
    assert to_device(cpu_source, torch.device("cpu")) is cpu_source  # the CPU: no pinning, no copy
    sent = _fake_cuda_copies(monkeypatch)
    to_device(torch.tensor([0, 1]), torch.device("cuda"))
    assert sent == [(True, True)]
    model = models(tiny_models, "roberta", "sdpa")
    seqs = random_reviews(model.get_base_model().config.vocab_size, 3, seed=5)
    for path, copies in (("flat", 4), ("packed", 5), ("padded", 2)):
        sent.clear()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # autocast for "cuda" without CUDA: disabled, with a warning
            forward_logits(model, seqs, 1, torch.device("cuda"), path)
        assert sent == [(True, True)] * copies, path


def test_captured_step_copies_its_batch_from_pinned_memory(monkeypatch, tiny_models):
    """CapturedSteps on CUDA copies each batch into its static buffers from pinned memory (the
    uncaptured static step run on the CPU under a CUDA device name: only the copies are checked)."""
    from imdb_lora.config import TrainConfig
    from imdb_lora.training import graphs

    sent = _fake_cuda_copies(monkeypatch)
    staged: list[torch.Tensor] = []
    real_pinned = graphs.pinned

    def spy(t):
        staged.append(t)
        return real_pinned(t)

    monkeypatch.setattr(graphs, "pinned", spy)
    model = models(tiny_models, "roberta", "sdpa")
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig(lr=1e-2)
    opt = torch.optim.AdamW(params, lr=1e-2)
    steps = graphs.CapturedSteps(model, opt, params, cfg, torch.device("cuda"), 1, 2, 128, capture=False)
    vocab = model.get_base_model().config.vocab_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in (1, 2):  # two batches of one bucket: the first allocates, the second copies in
            seqs = [s[:20] for s in random_reviews(vocab, 2, seed=seed)]
            steps.step(seqs, torch.tensor([0, 1]), 1e-2)
    assert len(steps.buckets) == 1
    assert sent == [(True, True)] * 4  # the first batch's buffers
    assert len(staged) == 4  # the second's copies: input ids, positions, cu_seqlens, starts

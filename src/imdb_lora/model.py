"""Base model + LoRA: loading (local folder, hub, random init), role-aware LoRA targets, parameter counts.

LoRA targets are chosen by role ("attention q/k/v", "attention output", "feed-forward", "pooler",
"word embeddings") and mapped to module names per architecture, so the same recipe means the same thing
on roberta, bert and mpnet (which calls its attention projections q/k/v/o).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import socket
from pathlib import Path

import torch
from torch import nn

from .config import Config
from .errors import UserError

# Per architecture: role -> regex over full module names (re.search). A layer index is always present
# for encoder roles, so heads such as the classifier's own `dense` never match.
_BERT_LIKE = {
    "attention_qkv": r"encoder\.layer\.\d+\.attention\.self\.(query|key|value)$",
    "attention_output": r"encoder\.layer\.\d+\.attention\.output\.dense$",
    "ffn": r"encoder\.layer\.\d+\.(intermediate|output)\.dense$",
    "pooler": r"^[a-z_]+\.pooler\.dense$",
    "word_embeddings": r"embeddings\.word_embeddings$",
}
ROLE_PATTERNS: dict[str, dict[str, str]] = {
    "roberta": _BERT_LIKE,
    "bert": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "mpnet": {
        **_BERT_LIKE,
        "attention_qkv": r"encoder\.layer\.\d+\.attention\.attn\.(q|k|v)$",
        "attention_output": r"encoder\.layer\.\d+\.attention\.attn\.o$",
    },
    "distilbert": {
        "attention_qkv": r"transformer\.layer\.\d+\.attention\.(q_lin|k_lin|v_lin)$",
        "attention_output": r"transformer\.layer\.\d+\.attention\.out_lin$",
        "ffn": r"transformer\.layer\.\d+\.ffn\.(lin1|lin2)$",
        "pooler": r"$^",  # no pooler: pre_classifier belongs to the head, trained in full
        "word_embeddings": r"embeddings\.word_embeddings$",
    },
}
OPTIONAL_ROLES = {"pooler"}  # sequence-classification heads of roberta/mpnet have no pooler

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- loading


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~"))


def has_weights(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))


def check_model_source(name: str, random_init: bool) -> None:
    """Fail early, naming --model, when a local model folder is missing or unusable."""
    if not is_local(name):
        return
    p = Path(name).expanduser()
    if not p.is_dir():
        raise UserError(f"--model: no such directory: {p}")
    if not (p / "config.json").is_file():
        raise UserError(f"--model: {p} has no config.json (not a Hugging Face model folder)")
    if not random_init and not has_weights(p):
        raise UserError(
            f"--model: {p} has no model.safetensors (only safetensors weights are loaded); "
            "use --random-init for an untrained architecture"
        )


def _hub_error(name: str, e: Exception) -> UserError:
    why = "the hub is unreachable and no copy is cached" if hub_options(name) else type(e).__name__
    return UserError(
        f"--model: could not load {name!r} from the Hugging Face hub ({why}); "
        "without network, pass --model PATH to a local model folder"
    )


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's endpoint: seconds, where huggingface_hub's retries take ~50 s."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_options(name: str) -> dict[str, bool]:
    """from_pretrained options for `name`: cached files only when the hub is known to be unreachable.

    Behind a proxy a direct connection says nothing, so the probe is skipped and the libraries decide.
    """
    from huggingface_hub import constants

    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if is_local(name) or constants.HF_HUB_OFFLINE or proxied or hub_reachable():
        return {}
    return {"local_files_only": True}


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, use_fast=True, **hub_options(name))
    except OSError as e:
        if is_local(name):
            raise UserError(f"no usable tokenizer in {name} ({e})") from None
        raise _hub_error(name, e) from None
    if not tok.is_fast:
        raise UserError(f"{name}: a fast tokenizer (tokenizer.json) is required")
    return tok


def load_base_model(name: str, num_labels: int, random_init: bool, seed: int) -> tuple[nn.Module, list[str]]:
    """A sequence-classification model and the names of weights the checkpoint did not provide."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    check_model_source(name, random_init)
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here, not news
    hf_logging.disable_progress_bar()  # our own bars say what is happening
    torch.manual_seed(seed)  # random init and any newly created head are reproducible
    hub = hub_options(name)
    try:
        if random_init:
            config = AutoConfig.from_pretrained(name, num_labels=num_labels, **hub)
            return AutoModelForSequenceClassification.from_config(config), []
        # float32 always: transformers 5 otherwise keeps a checkpoint's own dtype (fp16/bf16 copies,
        # as staged for the GPU machine), and training needs fp32 master weights under bf16 autocast.
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name,
            num_labels=num_labels,
            use_safetensors=True,
            output_loading_info=True,
            dtype=torch.float32,
            **hub,
            # transformers looks for a PEFT adapter on the hub too, ignoring local_files_only above
            **({"adapter_kwargs": hub} if hub else {}),
        )
    except OSError as e:
        if is_local(name):
            raise UserError(f"--model: cannot load {name}: {e}") from None
        raise _hub_error(name, e) from None
    except ValueError as e:  # unknown model_type and similar
        raise UserError(f"--model: cannot build a classifier from {name}: {e}") from None
    return model, list(info.get("missing_keys", []))


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level modules outside the encoder (the classification head), trained in full with LoRA."""
    prefix = model.base_model_prefix
    return [n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]


# ---------------------------------------------------------------- LoRA targets


def lora_target_modules(model: nn.Module, roles: list[str]) -> list[str]:
    """Full names of the modules that the given roles select on this architecture."""
    model_type = model.config.model_type
    patterns = ROLE_PATTERNS.get(model_type)
    if patterns is None:
        raise UserError(
            f"LoRA roles are not mapped for model type {model_type!r} (known: {', '.join(ROLE_PATTERNS)}); "
            "give module names with --lora-modules, e.g. --lora-modules query,key,value,dense"
        )
    head = tuple(head_module_names(model))
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    names = [n for n in names if not n.startswith(head)]
    chosen: list[str] = []
    for role in roles:
        hits = [n for n in names if re.search(patterns[role], n)]
        if not hits and role not in OPTIONAL_ROLES:
            raise UserError(f"LoRA role {role!r} matched no module in this {model_type} model")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def named_target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Modules chosen by explicit name suffixes (--lora-modules), the head excluded."""
    head = tuple(head_module_names(model))
    found = [
        n
        for n, _ in model.named_modules()
        if not n.startswith(head) and any(n == t or n.endswith("." + t) for t in names)
    ]
    if not found:
        raise UserError(f"--lora-modules: none of {names} names a module of this model")
    return found


def apply_lora(model: nn.Module, cfg: Config, missing_keys: list[str]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lo = cfg.lora
    if lo.target_modules:
        targets = named_target_modules(model, lo.target_modules)
    else:
        targets = lora_target_modules(model, lo.targets)
    # Weights the checkpoint lacked (besides the head) are random: train and save them in full rather
    # than freeze noise that a later load could not reproduce.
    fresh = sorted({k.rsplit(".", 1)[0] for k in missing_keys})
    head = head_module_names(model)
    fresh = [m for m in fresh if not m.startswith(tuple(head)) and m not in ("", "position_ids")]
    targets = [t for t in targets if t not in fresh]
    peft_cfg = LoraConfig(
        task_type="SEQ_CLS",
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        use_rslora=lo.rslora,
        bias="lora_only" if lo.train_biases else "none",
        target_modules=targets,
        modules_to_save=head + fresh,
    )
    return get_peft_model(model, peft_cfg)


def build_model(
    cfg: Config, source: str | None = None, random_init: bool | None = None, save_base_to: Path | None = None
) -> tuple[nn.Module, dict]:
    """The model to train (LoRA-wrapped or full) and facts about its base for the run record.

    `source`/`random_init` override the config (a resumed random-init run reloads its saved base);
    `save_base_to` keeps the base weights the adapter belongs to when they exist nowhere else.
    """
    m = cfg.model
    source = source or m.name
    random_init = m.random_init if random_init is None else random_init
    model, missing = load_base_model(source, m.num_labels, random_init, cfg.train.seed)
    info = {
        "model_type": model.config.model_type,
        "base_fingerprint": base_fingerprint(model),
        "base_parameters": sum(p.numel() for p in model.parameters()),
    }
    if save_base_to is not None:
        model.save_pretrained(save_base_to)
    if cfg.train.method == "lora":
        model = apply_lora(model, cfg, missing)
    else:
        model.requires_grad_(True)
    info["trainable_parameters"], info["total_parameters"] = count_parameters(model, info["base_parameters"])
    return model, info


def count_parameters(model: nn.Module, base_params: int) -> tuple[int, int]:
    """(trainable, total at inference): total counts the base once plus the LoRA matrices."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return trainable, base_params + lora


def base_fingerprint(model: nn.Module) -> str:
    """Identifies a base model by architecture and a slice of its word embeddings (cheap, stable)."""
    c = model.config
    facts = {k: getattr(c, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
    h = hashlib.sha256(json.dumps(facts, sort_keys=True).encode())
    emb = model.get_input_embeddings().weight.detach()
    h.update(emb[:32].float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def compile_encoder(model: nn.Module) -> None:
    """torch.compile the transformer encoder in place, with dynamic shapes (review lengths vary).

    In place, so PEFT, the state dict and the packed path (which calls the encoder directly) see the
    same modules; only the encoder's forward is replaced by its compiled version.
    """
    from .packing import classifier_of

    m = classifier_of(model)
    getattr(m, m.base_model_prefix).compile(dynamic=True)


# ---------------------------------------------------------------- devices and batched inference


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, plain fp32 elsewhere (CPU bf16 is slower and less exact here)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def forward_logits(
    model: nn.Module,
    seqs: list[list[int]],
    pad_id: int,
    device: torch.device,
    packed: bool,
    row_tokens: int | None = None,
) -> torch.Tensor:
    """Logits for one batch of token-id sequences, in the given order, under the device's autocast.

    Packed: reviews share rows of up to row_tokens (default: the longest review) with block-diagonal
    attention. Padded: one row per review, padded to the longest. The one forward that training,
    evaluation and the benches all run.
    """
    from .data import pad_batch
    from .packing import pack, packed_logits, position_start

    with autocast_for(device):
        if packed:
            rows = pack(seqs, row_tokens or max(map(len, seqs)), pad_id, position_start(model))
            return packed_logits(model, rows.to(device))
        ids, mask = pad_batch(seqs, pad_id)
        return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits


@torch.inference_mode()
def batched_logits(
    model: nn.Module,
    seqs: list[list[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    progress=None,
    packed: bool = False,
) -> torch.Tensor:
    """fp32 logits for token-id sequences, in input order.

    Padded: length-sorted batches of batch_size, so padding is small. Packed: batch_size reviews at a
    time packed into rows as long as the longest of them, no padding but block-diagonal attention.
    """
    from .data import length_sorted_batches

    was_training = model.training
    model.eval()
    out = torch.empty((len(seqs), model.config.num_labels), dtype=torch.float32)
    if packed:
        batches = [list(range(i, min(i + batch_size, len(seqs)))) for i in range(0, len(seqs), batch_size)]
    else:
        batches = length_sorted_batches([len(s) for s in seqs], batch_size)
    for idx in batches:
        logits = forward_logits(model, [seqs[i] for i in idx], pad_id, device, packed)
        out[idx] = logits.float().cpu()
        if progress is not None:
            progress.update(len(idx))
    model.train(was_training)
    return out

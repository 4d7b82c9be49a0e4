"""LoRA on a loaded base model: role-aware targets, the model to train (LoRA or full), parameter counts.

LoRA targets are chosen by role ("attention q/k/v", "attention output", "feed-forward", "pooler",
"word embeddings") and mapped to module names per architecture, so the same recipe means the same thing
on roberta, bert and mpnet (which calls its attention projections q/k/v/o).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from ..config import Config, Given
from ..errors import UserError
from .load import (
    NUM_LABELS,
    base_fingerprint,
    config_if_readable,
    head_module_names,
    hub_revision,
    load_base_model,
    open_to_readers,
)
from .pooling import POOLER_HEADS, set_pooling

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


def lora_target_modules(model: nn.Module, roles: list[str]) -> list[str]:
    """Full names of the modules that the given roles select on this architecture."""
    model_type = model.config.model_type
    patterns = ROLE_PATTERNS.get(model_type)
    if patterns is None:
        raise UserError(
            f"LoRA roles are not mapped for model type {model_type!r} (known: {', '.join(ROLE_PATTERNS)}); "
            f"give module names with --lora-modules; its layers' names: {','.join(module_suffixes(model))}"
        )
    names = wrappable_modules(model)
    chosen: list[str] = []
    for role in roles:
        hits = [n for n in names if re.search(patterns[role], n)]
        if not hits and role not in OPTIONAL_ROLES:
            raise UserError(f"LoRA role {role!r} matched no module in this {model_type} model")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def named_target_modules(model: nn.Module, names: list[str], flag: str = "--lora-modules") -> list[str]:
    """Modules chosen by explicit name suffixes (--lora-modules), the head excluded. `flag`: the setting
    as given (`--lora-modules`, or `my.yaml: lora.target_modules` from a --config file)."""
    head = tuple(head_module_names(model))
    found = [
        n
        for n, _ in model.named_modules()
        if not n.startswith(head) and any(n == t or n.endswith("." + t) for t in names)
    ]
    if not found:
        raise UserError(
            f"{flag}: none of {','.join(names)} names a module of this {model.config.model_type} "
            f"model; its layers' names: {','.join(module_suffixes(model))}"
        )
    return found


def module_suffixes(model: nn.Module) -> list[str]:
    """The last parts of the names of the layers LoRA can wrap (linear and embedding, the head excluded),
    in model order: what --lora-modules takes (mpnet's attention is q,k,v,o where roberta's is
    query,key,value)."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in wrappable_modules(model)))


def wrappable_modules(model: nn.Module) -> list[str]:
    """Full names of the linear and embedding layers outside the classification head."""
    head = tuple(head_module_names(model))
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    return [n for n in names if not n.startswith(head)]


def check_targets_before_data(name: str, cfg: Config, given: Given | None = None) -> None:
    """--lora-targets naming only the pooler, for a model whose classifier has none (all but bert's):
    decided from config.json alone, so the refusal comes before the data are read (seconds to minutes).
    `given`: where the settings came from (config.Given), to name a --config file's key as written."""
    lo = cfg.lora
    if cfg.train.method != "lora" or lo.target_modules or not set(lo.targets) <= OPTIONAL_ROLES:
        return
    config = config_if_readable(name)
    kind = getattr(config, "model_type", None)
    if kind in ROLE_PATTERNS and kind not in POOLER_HEADS:  # others are left to build_model's checks
        raise UserError(no_targets_message(kind, lo.targets, [], given))


def no_targets_message(
    model_type: str, roles: list[str], names: list[str], given: Given | None = None
) -> str:
    """Why LoRA would wrap nothing: only optional roles the model lacks (a sequence-classification head
    of roberta or mpnet has no pooler), or only modules the checkpoint lacked (they train in full: a
    bert checkpoint saved without its pooler has one, new). `given`: where the settings came from
    (config.Given): a --config file's lora.targets is named by the file and key, the role added there."""
    given = given or Given()
    key, listed = ("lora.target_modules", names) if names else ("lora.targets", roles)
    has_all = names or model_type in POOLER_HEADS
    lacking = [] if has_all else [r for r in roles if r in OPTIONAL_ROLES]
    why = (
        f"this {model_type} model has no {' or '.join(lacking)}"
        if lacking
        else "the modules it selects were missing from the checkpoint and train in full"
    )
    if given.from_file("lora.targets"):
        fix = f"add a role to {given.said('lora.targets', key)}, e.g. attention_qkv"
    else:
        fix = f"add a role, e.g. {given.flag('lora.targets')} attention_qkv"
    return f"{given.where(key)} {','.join(listed)}: LoRA would wrap no module ({why}); {fix}"


def check_rank(model: nn.Module, targets: list[str], r: int, given: Given | None = None) -> None:
    """A rank above a wrapped layer's smallest dimension adds nothing a product A @ B could express, and
    a huge one failed allocating its matrices (a RuntimeError traceback for --lora-r 10**12). `given`:
    where the settings came from (config.Given), to name a --config file's lora.r by the file and key."""
    modules = dict(model.named_modules())
    weights = [getattr(modules[t], "weight", None) for t in targets]
    smallest = min(
        (min(w.shape) for w in weights if isinstance(w, torch.Tensor) and w.dim() == 2), default=None
    )
    if smallest is not None and r > smallest:
        given = given or Given()
        fix = "lower it there" if given.from_file("lora.r") else f"lower {given.flag('lora.r')}"
        raise UserError(
            f"{given.where('lora.r')} {r:,} is more than {smallest:,}, the smallest dimension of the layers "
            f"LoRA wraps (a rank cannot exceed it); {fix}"
        )


def apply_lora(
    model: nn.Module,
    cfg: Config,
    missing_keys: list[str],
    revision: str | None = None,
    given: Given | None = None,
) -> nn.Module:
    """Wrap `model` in LoRA adapters as the config says. `revision`: the hub commit the base was loaded
    from (None for a local folder), saved in adapter_config.json where peft keeps it (`revision`), so
    that peft's AutoPeftModel* loads the very base weights the adapter was trained on, not the hub's
    latest. `given`: where the settings came from (config.Given), as the refusals name them."""
    from peft import LoraConfig, get_peft_model

    lo = cfg.lora
    given = given or Given()
    if lo.target_modules:
        targets = named_target_modules(model, lo.target_modules, given.where("lora.target_modules"))
    else:
        targets = lora_target_modules(model, lo.targets)
    # Weights the checkpoint lacked (besides the head) are random: train and save them in full rather
    # than freeze noise that a later load could not reproduce.
    fresh = sorted({k.rsplit(".", 1)[0] for k in missing_keys})
    head = head_module_names(model)
    fresh = [m for m in fresh if not m.startswith(tuple(head)) and m not in ("", "position_ids")]
    targets = [t for t in targets if t not in fresh]
    if not targets:  # peft would raise NoMatchingPeftModuleError, a traceback
        raise UserError(no_targets_message(model.config.model_type, lo.targets, lo.target_modules, given))
    check_rank(model, targets, lo.r, given)
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
    return get_peft_model(model, peft_cfg, revision=revision)


def build_model(
    cfg: Config,
    source: str | None = None,
    random_init: bool | None = None,
    save_base_to: Path | None = None,
    given: Given | None = None,
) -> tuple[nn.Module, dict]:
    """The model to train (LoRA-wrapped or full) and facts about its base for the run record.

    `source`/`random_init` override the config (a resumed random-init run reloads its saved base);
    `save_base_to` keeps the base weights the adapter belongs to when they exist nowhere else; `given`:
    where the settings came from (config.Given): a refusal names a --config file's setting by the file
    and key (`my.yaml: lora.r`), a typed one by its flag (the default).
    """
    m = cfg.model
    given = given or Given()
    source = source or m.name
    random_init = m.random_init if random_init is None else random_init
    model, missing = load_base_model(
        source, NUM_LABELS, random_init, cfg.train.seed, flag=given.where("model.name")
    )
    set_pooling(model, m.pooling, given.where("model.pooling"))
    info = {
        "model_type": model.config.model_type,
        "base_fingerprint": base_fingerprint(model),
        "base_parameters": sum(p.numel() for p in model.parameters()),
        # the hub revision (commit) the weights came from; None for local folders
        "model_revision": hub_revision(source),
    }
    if save_base_to is not None:
        model.save_pretrained(save_base_to)
        open_to_readers(save_base_to)
    if cfg.train.method == "lora":
        # a random-init base exists only in the run's base_model/: no hub commit holds its weights
        revision = None if random_init else info["model_revision"]
        model = apply_lora(model, cfg, missing, revision=revision, given=given)
    else:
        model.requires_grad_(True)
    info["trainable_parameters"], info["total_parameters"] = count_parameters(model, info["base_parameters"])
    return model, info


def count_parameters(model: nn.Module, base_params: int) -> tuple[int, int]:
    """(trainable, total at inference): total counts the base once plus the LoRA matrices."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return trainable, base_params + lora

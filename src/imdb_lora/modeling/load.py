"""Loading: local folders (safetensors only), the hub (offline-aware), random init; devices."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
from pathlib import Path

import torch
from torch import nn

from ..config import Given
from ..data.labeled import LABEL_NAMES
from ..errors import UserError, counted

NUM_LABELS = len(LABEL_NAMES)  # binary sentiment: 0 = negative, 1 = positive, end to end
# Models whose position ids start after the padding index (fairseq convention) rather than at 0.
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "mpnet"}

# ---------------------------------------------------------------- loading


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~"))


def new_file_mode() -> int:
    """The permission bits a file created now gets (0o666 less the umask: 0o644 by default)."""
    try:  # Linux says it without changing it; os.umask can only be read by setting it
        for line in Path("/proc/self/status").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def open_to_readers(path: Path) -> None:
    """Give the files at `path` (a file, or every file under a folder) the mode any other new file gets.

    safetensors writes through a private temporary file renamed into place, so its files come out 0600
    where config.json, run.json and the rest follow the umask: a run or export shared with a group,
    copied by another user or served from a container as non-root had readable configs but unreadable
    weights (a PermissionError, which transformers reports as "No such file or directory")."""
    mode = new_file_mode()
    for f in [path] if path.is_file() else sorted(path.rglob("*")):
        if f.is_file() and not f.is_symlink() and (f.stat().st_mode & 0o777) != mode:
            os.chmod(f, mode)


def has_weights(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))


def check_model_source(name: str, random_init: bool, flag: str | None = "--model") -> None:
    """Fail early, naming the flag (--model; --base-model when reading a run), when a local model folder is
    missing or unusable. flag=None: a folder inside a run or an export, which no flag names; a --config
    file's model.name is named by the file and key (`my.yaml: model.name`, config.Given.where)."""
    if not is_local(name):
        return
    p = Path(name).expanduser()
    lead = f"{flag}: " if flag else ""
    if p.exists() and not p.is_dir():
        raise UserError(f"{lead}{p} is a file, not a model folder (config.json, weights and tokenizer files)")
    if not p.is_dir():
        raise UserError(f"{lead}no such directory: {p}")
    if not (p / "config.json").is_file():
        raise UserError(f"{lead}{p} has no config.json (not a Hugging Face model folder)")
    if not random_init and not has_weights(p):
        # a model to train (--model or a file's model.name), not a run's base: --random-init builds it
        hint = (
            "; use --random-init for an untrained architecture" if flag not in (None, "--base-model") else ""
        )
        raise UserError(f"{lead}{p} has no model.safetensors (only safetensors weights are loaded){hint}")


# Passed to every from_pretrained: a model or tokenizer whose config maps to its own Python code
# (auto_map) is refused, never run, and never asked about (transformers prompts y/N on a terminal if
# the option is left unset).
NO_REMOTE_CODE = {"trust_remote_code": False}


def _remote_code_error(name: str, e: Exception, flag: str) -> UserError | None:
    if "trust_remote_code" not in str(e):
        return None
    return UserError(
        f"{flag}: {name} needs Python code of its own to load (auto_map); imdb-lora never runs it"
    )


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def one_line(e: Exception) -> str:
    """The whole message on one line (transformers' tokenizer errors list their reasons on several)."""
    return " ".join(str(e).split()) or type(e).__name__


def is_damaged_weights(e: Exception) -> bool:
    """safetensors' own error for a truncated or garbled file (not an OSError, not a ValueError)."""
    return type(e).__name__ == "SafetensorError"


def _hub_error(name: str, e: Exception, flag: str = "--model") -> UserError:
    """`flag`: the setting that named the model, as given (`--model`, or `my.yaml: model.name`)."""
    why = "the hub is unreachable and no copy is cached" if hub_options(name) else type(e).__name__
    fix = f"pass {flag} PATH to" if flag.startswith("--") else "point it at"
    return UserError(
        f"{flag}: could not load {name!r} from the Hugging Face hub ({why}); "
        f"without network, {fix} a local model folder"
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


def position_limit(config) -> int | None:
    """Tokens per sequence the model's position embeddings allow (roberta/mpnet lose padding_idx + 1)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    if config.model_type in OFFSET_POSITIONS:
        limit -= (config.pad_token_id or 0) + 1
    return limit


def check_saved_max_length(max_length: int, limit: int | None, config_path: os.PathLike) -> None:
    """A run's or export's max_length must fit its model (else every long text fails mid-request)."""
    if limit is not None and max_length > limit:
        raise UserError(
            f"{config_path}: max_length {max_length} exceeds the {limit} positions its model reads; "
            "the file was edited or does not belong to this model"
        )


def config_if_readable(name: str):
    """The model's config for the early checks below, or None when it cannot be read: loading the model
    itself then reports the problem, with its own message."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, **hub_options(name), **NO_REMOTE_CODE)
    except (OSError, ValueError):
        return None


def check_max_length(name: str, max_length: int, given: Given | None = None) -> None:
    """--max-length must fit the model's position embeddings; checked before anything is written.
    `given`: where the settings came from (config.Given), to name a --config file's data.max_length by
    the file and key; by its flag by default."""
    config = config_if_readable(name)
    if config is None:
        return
    limit = position_limit(config)
    if limit is not None and max_length > limit:
        given = given or Given()
        subject = given.where("data.max_length")
        fix = (
            f"set it to {limit} or less there"
            if given.from_file("data.max_length")
            else f"pass {subject} {limit} or less"
        )
        raise UserError(
            f"{subject} {max_length} exceeds what {Path(name).name or name} can read "
            f"({limit} tokens per sequence); {fix}"
        )


def check_vocabulary(name: str, tokenizer, flag: str = "--model") -> None:
    """The tokenizer's ids must all have a row in the model's embeddings (config vocab_size): a folder
    whose tokenizer is another model's otherwise fails mid-epoch with torch's index error. `flag`: the
    setting that named the model, as given (`--model`, or `my.yaml: model.name`)."""
    config = config_if_readable(name)
    rows = getattr(config, "vocab_size", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise UserError(
            f"{flag} {name}: its tokenizer has {len(tokenizer):,} tokens, more than the {rows:,} rows of "
            "the model's embeddings (vocab_size in config.json); the tokenizer belongs to another model"
        )


def hub_revision(name: str) -> str | None:
    """The commit a hub model was loaded from, read from the local hub cache (where the load just put
    it); None for local folders. transformers 5 no longer keeps it on the config (`_commit_hash`)."""
    if is_local(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(name, "config.json")  # resolves refs/main -> snapshots/<commit>/
    if not isinstance(path, str):
        return None
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def software_versions(package: Path | None = None) -> dict[str, str | bool | None]:
    """Versions that decide what a run computes, and the project's git commit when run from a checkout
    (`package`: the folder of the package's code, by default this one), with `git_dirty`: whether tracked
    files differ from that commit (the commit alone would then not say what ran). Only a repository
    that tracks the package's own `__init__.py` counts: an installed copy in a virtualenv inside some
    other repository (`myproject/.venv/...`) would otherwise be recorded as that repository's commit."""
    import subprocess

    import peft
    import transformers

    from .. import __version__

    def git(*args: str) -> str | None:
        folder = package if package is not None else Path(__file__).resolve().parents[1]
        try:
            done = subprocess.run(
                ["git", "-C", str(folder), *args],
                capture_output=True,
                text=True,
                encoding="utf-8",
                errors="replace",
                timeout=5,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = None
    if git("ls-files", "--error-unmatch", "--", "__init__.py") is not None:  # a checkout of this code
        commit = (git("rev-parse", "HEAD") or "").strip() or None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "imdb_lora": __version__,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status.strip()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def load_tokenizer(name: str, folder: bool = False, flag: str = "--model"):
    """`folder`: a run's or an export's own tokenizer/, never a hub id, even where its relative path
    (runs/x/tokenizer) is not there and reads as one. `flag`: the setting a hub id came from, as given."""
    from transformers import AutoTokenizer

    local = folder or is_local(name)
    if local and not Path(name).expanduser().is_dir():  # transformers would take it for a hub id
        raise UserError(f"no usable tokenizer in {name}: no such folder")
    try:
        tok = AutoTokenizer.from_pretrained(name, use_fast=True, **hub_options(name), **NO_REMOTE_CODE)
    except OSError as e:
        if local:
            raise UserError(f"no usable tokenizer in {name} ({one_line(e)})") from None
        raise _hub_error(name, e, flag) from None
    except ValueError as e:  # custom tokenizer code, an unknown tokenizer class and the like
        raise _remote_code_error(name, e, "tokenizer") or UserError(
            f"no usable tokenizer in {name} ({one_line(e)})"
        ) from None
    if not tok.is_fast:
        raise UserError(f"{name}: a fast tokenizer (tokenizer.json) is required")
    if folder and tok.pad_token_id is None:  # a run's tokenizer always has one: batching pads with it
        raise UserError(
            f"no usable tokenizer in {name}: it has no padding token (tokenizer_config.json missing or edited?)"
        )
    return tok


def load_base_model(
    name: str, num_labels: int, random_init: bool, seed: int, flag: str | None = "--model"
) -> tuple[nn.Module, list[str]]:
    """A sequence-classification model and the names of weights the checkpoint did not provide; errors
    name `flag`, the option the user would change (None: a run's or an export's own model folder)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    check_model_source(name, random_init, flag)
    lead = f"{flag}: " if flag else ""
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here, not news
    hf_logging.disable_progress_bar()  # our own bars say what is happening
    torch.manual_seed(seed)  # random init and any newly created head are reproducible
    hub = hub_options(name)
    try:
        if random_init:
            config = AutoConfig.from_pretrained(name, num_labels=num_labels, **hub, **NO_REMOTE_CODE)
            return name_labels(AutoModelForSequenceClassification.from_config(config)), []
        # float32 always: transformers 5 otherwise keeps a checkpoint's own dtype (fp16/bf16 copies,
        # as staged for the GPU machine), and training needs fp32 master weights under bf16 autocast.
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name,
            num_labels=num_labels,
            use_safetensors=True,
            output_loading_info=True,
            dtype=torch.float32,
            **hub,
            **NO_REMOTE_CODE,
            # transformers looks for a PEFT adapter on the hub too, ignoring local_files_only above
            **({"adapter_kwargs": hub} if hub else {}),
        )
    except OSError as e:
        if is_local(name):
            raise UserError(f"{lead}cannot load {name}: {e}") from None
        raise _hub_error(name, e, flag or "--model") from None
    except ValueError as e:  # unknown model_type, custom code, and similar
        remote = _remote_code_error(name, e, flag or "model")
        raise remote or UserError(f"{lead}cannot build a classifier from {name}: {first_line(e)}") from None
    except Exception as e:
        if is_damaged_weights(e):  # a truncated copy or download: one line, not safetensors' traceback
            raise UserError(f"{lead}the weights in {name} are damaged ({first_line(e)})") from None
        if isinstance(e, RuntimeError) and "ignore_mismatched_sizes" in str(e):  # its report is logged
            raise UserError(
                f"{lead}the weights in {name} do not fit its config.json (a tensor of the wrong shape): "
                "damaged, edited or from another model"
            ) from None
        raise
    missing = list(info.get("missing_keys", []))
    if flag is None and missing:
        # A run's or an export's own model was saved whole: a weight it lacks would be randomly
        # initialised and every prediction silently wrong. (A base model's missing head is expected.)
        raise UserError(
            f"the weights in {name} lack {counted(len(missing), 'tensor')} its config.json needs "
            f"({missing[0]}{', ...' if len(missing) > 1 else ''}): damaged or edited; restore them"
        )
    return name_labels(model), missing


def name_labels(model: nn.Module) -> nn.Module:
    """Give the config our label names (0 = NEGATIVE, 1 = POSITIVE), as predict prints them.

    Every config.json written from this model (a full run's model/, a merged export, a random-init
    run's base_model/) then carries them: transformers' pipeline() answered LABEL_0/LABEL_1 and
    AutoConfig's label2id said nothing of which one is positive."""
    if model.config.num_labels == len(LABEL_NAMES):
        model.config.id2label = dict(enumerate(LABEL_NAMES))
        model.config.label2id = {name: i for i, name in enumerate(LABEL_NAMES)}
    return model


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level modules outside the encoder (the classification head), trained in full with LoRA."""
    prefix = model.base_model_prefix
    return [n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]


def base_fingerprint(model: nn.Module) -> str:
    """Identifies a base model by architecture and a slice of its word embeddings (cheap, stable)."""
    c = model.config
    facts = {k: getattr(c, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
    h = hashlib.sha256(json.dumps(facts, sort_keys=True).encode())
    emb = model.get_input_embeddings().weight.detach()
    h.update(emb[:32].float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- devices and batched inference


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """--device: auto (a GPU when there is one), cpu, cuda or cuda:N. Other torch devices (mps, xla...)
    are refused here, in one line: nothing of imdb-lora is built or tested for them. `flag`: the setting
    as given (train's device may come from a --config file: `my.yaml: train.device`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{flag} {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"{flag} {name}: imdb-lora runs on cpu or cuda (cuda:N) only")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(
            f"{flag} {name}: this machine has {counted(torch.cuda.device_count(), 'GPU')}, cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return device

"""One validated configuration for a run: model, lora, data and train sections.

Precedence: dataclass defaults < YAML file (`--config`) < command-line flags. Every field is also a CLI
flag (its name with dashes, or the `flag` given in its metadata). The resolved config is saved as
`config.yaml` in the run directory, so a run describes itself.
"""

from __future__ import annotations

import dataclasses
import filecmp
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError, did_you_mean

# The YAML recipes shipped inside the package (a wheel too): `--config NAME` picks one by its name.
SHIPPED_CONFIGS = Path(__file__).with_name("configs")


def shipped_configs() -> list[str]:
    """The names `--config` accepts besides a file: the shipped YAML files' names without `.yaml`."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def config_file(value: str | os.PathLike) -> Path:
    """`--config`'s value: a YAML file if one is there, else a shipped config's name (`reference` or
    `reference.yaml`), so the recipes work from an installed package, outside any checkout."""
    p = Path(value).expanduser()
    if p.is_file():
        return p
    name = p.name.removesuffix(".yaml")
    shipped = shipped_configs()
    if name in shipped and p.name == str(value):
        return SHIPPED_CONFIGS / f"{name}.yaml"
    hint = f"; the shipped one is --config {name}" if name in shipped else did_you_mean(name, shipped)
    if p.is_dir():
        raise UserError(
            f"--config: {value} is a folder, not a YAML file{hint} (shipped configs: {', '.join(shipped)})"
        )
    raise UserError(f"--config: no such file: {value}{hint} (shipped configs: {', '.join(shipped)})")


# Roles LoRA can target; model.py maps each to module names per architecture.
LORA_ROLES = ("attention_qkv", "attention_output", "ffn", "pooler", "word_embeddings")

# The closed sets of values some fields take, by config key: a value outside one is refused naming the
# close one (`--batching flta` ... did you mean flat?), as argparse's choices are.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.pooling": ("cls", "mean"),
    "data.truncation": ("head", "head_tail"),
    "train.method": ("lora", "full"),
    "train.batching": ("auto", "padded", "packed", "flat"),
}


def _f(
    default: Any,
    help: str,
    flag: str | None = None,
    repeatable: bool = False,
    shown: str | None = None,
    metavar: str | None = None,
    **kw: Any,
) -> Any:
    """A dataclass field with its CLI help (and optional flag name) attached; a repeatable list flag
    takes one value per use (`--eval-file a.csv --eval-file b.csv`) instead of a comma list. `shown`:
    the default in the help's words where the value alone does not say it (None: worked out later);
    `metavar`: the value's name in the help (default: the field's name)."""
    meta = {"help": help, "flag": flag, "repeatable": repeatable, "shown": shown, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    name: str = _f(
        "roberta-base",
        "base model: a local Hugging Face folder or a hub id (hub needs network)",
        flag="--model",
    )
    random_init: bool = _f(
        False,
        "architecture from config.json with random weights (tests and speed benchmarks only)",
    )
    pooling: str = _f(
        "cls",
        "what the classification head reads: cls (the first token, as Hugging Face heads do) or mean "
        "(the masked mean of the last hidden states, as sentence-transformers models were trained)",
    )


# The most a LoRA update may be multiplied by. The default recipe's scale is 2.8 (8/sqrt(8)); alpha = 2r
# without rsLoRA is 2, and with rsLoRA at r = 1024 it is 64. On the tiny test model scale 23 learned, 181
# learned erratically and 1,448 did not; --lora-alpha 1e36 trained to finite nonsense (chance accuracy,
# no divergence to stop it), which only a bound says.
MAX_LORA_SCALE = 256.0


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """What peft multiplies the LoRA update B @ A by: alpha/sqrt(r) with rsLoRA, else alpha/r."""
    return alpha / (math.sqrt(r) if rslora else r)


@dataclass
class LoraSettings:
    r: int = _f(8, "LoRA rank", flag="--lora-r")
    alpha: float = _f(8.0, "LoRA scaling numerator (rsLoRA scale = alpha / sqrt(r))", flag="--lora-alpha")
    dropout: float = _f(0.1, "dropout on the LoRA input", flag="--lora-dropout")
    rslora: bool = _f(True, "rank-stabilised scaling alpha/sqrt(r) instead of alpha/r", flag="--rslora")
    targets: list[str] = _f(
        list(LORA_ROLES),
        "LoRA targets by role: " + ", ".join(LORA_ROLES),
        flag="--lora-targets",
    )
    target_modules: list[str] = _f(
        [],
        "explicit module names (suffixes) to wrap instead of roles, for architectures without a role map",
        flag="--lora-modules",
        metavar="MODULES",
    )
    train_biases: bool = _f(
        True,
        "also train the biases of LoRA-wrapped layers (peft bias='lora_only'; the reference's count)",
        flag="--lora-train-biases",
    )


@dataclass
class DataConfig:
    path: str | None = _f(
        None,
        "aclImdb folder or .tar/.tar.gz/.tar.xz of it",
        flag="--data",
        shown="$IMDB_LORA_DATA, else download",
    )
    train_file: str | None = _f(
        None, "labeled CSV/TSV/JSONL with text,label columns instead of IMDB", metavar="FILE"
    )
    test_file: str | None = _f(None, "labeled CSV/TSV/JSONL test file (with --train-file)", metavar="FILE")
    val_size: float = _f(0.05, "fraction of train held out (stratified) as the validation split")
    max_train_samples: int | None = _f(None, "stratified, seeded subset of train for quick runs", shown="all")
    max_eval_samples: int | None = _f(None, "stratified, seeded subset of validation and test", shown="all")
    max_length: int = _f(512, "tokens per review after truncation (special tokens included)")
    truncation: str = _f("head", "how long reviews are cut: head (keep the start) or head_tail")
    head_tokens: int = _f(128, "with head_tail: tokens kept from the start; the rest come from the end")
    token_cache: bool = _f(
        True, "keep tokenized splits in ~/.cache/imdb-lora/tokens ($IMDB_LORA_CACHE) and reuse them"
    )
    eval_files: list[str] = _f(
        [],
        "labeled CSV/TSV/JSONL (text, label columns) evaluated with the kept checkpoint after the last "
        "epoch, reported in results.md and run.json, never used to choose anything (repeatable)",
        flag="--eval-file",
        repeatable=True,
    )


@dataclass
class TrainConfig:
    method: str = _f("lora", "lora (adapters + classifier) or full (every weight trains)")
    epochs: int = _f(3, "passes over the training split")
    max_steps: int | None = _f(
        None,
        "stop after N optimizer steps in all (every epoch counted); the learning-rate schedule is laid "
        "over min(N, epochs x steps per epoch), and an epoch cut short is evaluated like a full one",
        shown="none: --epochs decides",
        metavar="N",
    )
    max_time: str | None = _f(
        None,
        "wall-time budget counted from the command's start: seconds (90, 90s), 30m, 1h30m or 1.5h; "
        "training stops at the first step boundary past it (the learning-rate schedule is not "
        "rescaled), then the cut epoch's evaluation, calibration and reports run (after the budget)",
        shown="none",
        metavar="DURATION",
    )
    batch_size: int = _f(32, "reviews per optimizer step")
    eval_batch_size: int = _f(
        64,
        "reviews per batch at evaluation (sorted by length; on CUDA flat evaluation fills rows of 65,536 tokens)",
    )
    lr: float | None = _f(None, "peak learning rate (AdamW)", shown="4e-4 for lora, 2e-5 for full")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_ratio: float = _f(0.06, "fraction of steps with linear warm-up, then linear decay to 0")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy loss")
    seed: int = _f(42, "seed for splits, subsets, shuffling, dropout and initialisation")
    batching: str = _f(
        "auto",
        "padded (dynamic padding), packed (several reviews per row, no padding), flat (a batch's "
        "reviews as one row, per-review attention; roberta/bert, and mpnet through FlexAttention without "
        "attention dropout) or auto (padded training; on CUDA, evaluation flat with LoRA merged for "
        "roberta/bert and packed for the other architectures that pack: the fastest measured)",
    )
    device: str = _f("auto", "auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    compile: bool = _f(
        False,
        "torch.compile each encoder layer in place (regional: one compiled graph serves every layer; "
        "dynamic shapes); the first step is slower while it compiles",
    )
    cuda_graphs: bool = _f(
        False,
        "capture each --batching flat training step as a CUDA graph per length bucket (CUDA only; "
        "the last partial batch runs eagerly)",
    )
    bf16_working_copies: bool = _f(
        False,
        "--batching flat, LoRA: the step's forward and backward use bf16 working copies of the trainable "
        "weights (fp32 masters in the optimizer and checkpoints, copied over once per step) and cast each "
        "shared input to bf16 once, a third fewer ops per step (no change on the CPU: fp32 copies)",
    )
    fused_qkv: bool = _f(
        False,
        "--batching flat, LoRA on q/k/v: each self-attention computes query, key and value with one GEMM "
        "each for the frozen weights, the LoRA A's and the B's, and one LoRA dropout mask shared by the "
        "three (peft draws one per module); fewer kernels per step",
    )
    checkpoint_every: int = _f(200, "also checkpoint every N steps inside an epoch (0: epoch ends only)")
    eval_test_each_epoch: bool = _f(True, "report test loss/acc after every epoch (never used to choose)")
    calibration: bool = _f(
        True,
        "fit a temperature on the validation split after training (calibration.json); predict, "
        "evaluate, serve and exports apply it",
    )
    ema_decay: float = _f(
        0.0,
        "exponential moving average of the trainable weights (0: off; e.g. 0.999), evaluated beside "
        "the raw weights each epoch and saved when it wins on validation",
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, given: Given | None = None) -> Config:
        """Raise UserError naming the first invalid field as it was given (`given`, config.Given): by its
        flag (`--lora-r`), or by the --config file and key that set it (`my.yaml: lora.r`). None: every
        field by its flag (a config built in code, or from flags alone)."""
        given = given or Given()
        m, lo, d, t = self.model, self.lora, self.data, self.train
        max_length = _beside(given, "data.max_length", d.max_length, "data.head_tokens")
        checks = [
            (bool(m.name), "model.name", "must not be empty"),
            _one_of("model.pooling", m.pooling),
            (lo.r >= 1, "lora.r", "must be a positive integer"),
            (0 < lo.alpha < math.inf, "lora.alpha", "must be a positive number"),
            (
                lo.r < 1 or lora_scale(lo.alpha, lo.r, lo.rslora) <= MAX_LORA_SCALE,
                "lora.alpha",
                f"must keep the LoRA scale (alpha/sqrt(r) with --rslora, alpha/r without) at most "
                f"{MAX_LORA_SCALE:g}",
            ),
            (0 <= lo.dropout < 1, "lora.dropout", "must be in [0, 1)"),
            (bool(lo.targets) or bool(lo.target_modules), "lora.targets", "needs at least one role"),
            (0 < d.val_size < 1, "data.val_size", "must be a fraction in (0, 1)"),
            (
                d.max_train_samples is None or d.max_train_samples >= 2,
                "data.max_train_samples",
                "must be >= 2",
            ),
            (d.max_eval_samples is None or d.max_eval_samples >= 2, "data.max_eval_samples", "must be >= 2"),
            (8 <= d.max_length <= 8192, "data.max_length", "must be between 8 and 8192"),
            _one_of("data.truncation", d.truncation),
            (
                d.truncation != "head_tail" or 0 < d.head_tokens < d.max_length - 2,
                "data.head_tokens",
                f"must be in (0, {d.max_length - 2}): below {max_length} less its 2 special tokens",
            ),
            (d.test_file is None or d.train_file is not None, "data.test_file", "needs --train-file"),
            _one_of("train.method", t.method),
            (t.epochs >= 1, "train.epochs", "must be >= 1"),
            (t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1"),
            (0 <= t.seed < 2**32, "train.seed", "must be in [0, 2**32)"),  # numpy's and CUDA's seed range
            _one_of("train.batching", t.batching),
            (not t.cuda_graphs or t.batching == "flat", "train.cuda_graphs", "needs --batching flat"),
            (
                not t.bf16_working_copies or (t.batching == "flat" and t.method == "lora"),
                "train.bf16_working_copies",
                "needs --batching flat and --method lora",
            ),
            (
                not t.fused_qkv or (t.batching == "flat" and t.method == "lora"),
                "train.fused_qkv",
                "needs --batching flat and --method lora",
            ),
            (t.batch_size >= 1, "train.batch_size", "must be >= 1"),
            (t.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1"),
            (
                t.lr is None or 0 < t.lr < 1,
                "train.lr",
                "must be a number in (0, 1): AdamW moves each weight by about lr a step",
            ),
            (0 <= t.weight_decay < math.inf, "train.weight_decay", "must be a number >= 0"),
            (0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)"),
            (0 <= t.max_grad_norm < math.inf, "train.max_grad_norm", "must be a number >= 0"),
            (0 <= t.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)"),
            (t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0"),
            (0 <= t.ema_decay < 1, "train.ema_decay", "must be in [0, 1) (0: off)"),
            (
                t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
                "train.device",
                "must be auto, cpu or cuda[:N]",
            ),
        ]
        if t.max_time is not None:
            duration_seconds(t.max_time, given.where("train.max_time"))
        for ok, key, msg in checks:
            if not ok:
                value = _value_at(self, key)
                hint = did_you_mean(value, CHOICES[key]) if key in CHOICES else ""
                raise UserError(f"{given.where(key)} {msg} (got {value!r}){hint}")
        paths = [("model.name", m.name), ("data.path", d.path), ("data.train_file", d.train_file)]
        paths += [("data.test_file", d.test_file), *(("data.eval_files", f) for f in d.eval_files)]
        for key, path in paths:
            problem = path and path_problem(path)
            if problem:
                raise UserError(f"{given.where(key)}: not a usable path: {problem}")
        # Local paths become absolute, so a run directory works from any working directory.
        m.name = _absolute_if_local(m.name)
        d.path, d.train_file, d.test_file = map(_absolute_if_local, (d.path, d.train_file, d.test_file))
        d.eval_files = [_absolute_if_local(f) for f in d.eval_files]
        twice = sorted({f for f in d.eval_files if d.eval_files.count(f) > 1})
        if twice:  # it would be evaluated, and reported, once per mention
            raise UserError(
                f"{given.where('data.eval_files')} {twice[0]} is given twice; list each file once"
            )
        if t.lr is None:  # LoRA matrices start at zero and need a far larger step than full weights
            t.lr = 4e-4 if t.method == "lora" else 2e-5
        if t.lr * t.weight_decay >= 1:  # AdamW scales each weight by 1 - lr * weight_decay a step
            lr = _beside(given, "train.lr", f"{t.lr:g}", "train.weight_decay")
            raise UserError(
                f"{given.where('train.weight_decay')} {t.weight_decay:g} times {lr} must be below 1: AdamW "
                "multiplies every weight by 1 - lr * weight_decay each step"
            )
        bad = [r for r in lo.targets if r not in LORA_ROLES]
        if bad:
            raise UserError(
                f"{given.where('lora.targets')}: unknown role(s) {bad}; choose from {', '.join(LORA_ROLES)}"
                f"{did_you_mean(bad, LORA_ROLES)}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Config:
        cfg = cls()
        for section, values in (raw or {}).items():
            if section not in _sections():
                raise UserError(
                    f"{source}: unknown section {section!r}; expected one of {list(_sections())}"
                    f"{did_you_mean(str(section), _sections())}"
                )
            if not isinstance(values, dict):
                raise UserError(f"{source}: section {section!r} must be a mapping")
            target = getattr(cfg, section)
            names = {f.name: f for f in dataclasses.fields(target)}
            for key, value in values.items():
                if RETIRED_FIELDS.get((section, key), object()) == value:
                    continue  # an older run's config.yaml: the field's only value, now implied
                if key not in names:
                    raise UserError(f"{source}: unknown field {section}.{key}{did_you_mean(str(key), names)}")
                setattr(target, key, coerce(value, type(target), names[key], f"{source}: {section}.{key}"))
        return cfg

    @classmethod
    def load(cls, path: str | os.PathLike, flag: str | None = "--config") -> Config:
        """A YAML config; errors start with `flag` (None: a file the user did not name, e.g. a run's)."""
        return cls.load_with_keys(path, flag)[0]

    @classmethod
    def load_with_keys(
        cls, path: str | os.PathLike, flag: str | None = "--config"
    ) -> tuple[Config, frozenset[str]]:
        """load(), and the keys (`lora.r`) the file sets: what a note about them names (Given)."""
        at = f"{flag}: " if flag else ""
        problem = path_problem(str(path))
        if problem:
            raise UserError(f"{at}not a usable path: {problem}")
        p = config_file(path) if flag == "--config" else Path(path)
        if not p.is_file():
            raise UserError(f"{at}no such file: {p}")
        try:
            raw = yaml.load(p.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
        except yaml.YAMLError as e:  # one line: where, and PyYAML's short reason
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            reason = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UserError(f"{at}{p} is not valid YAML{where} ({reason})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{at}{p} is unreadable ({type(e).__name__})") from None
        if raw is not None and not isinstance(raw, dict):
            raise UserError(f"{at}{p} must hold a mapping of sections")
        cfg = cls.from_dict(raw or {}, source=f"{at}{p}")  # its errors name the flag too
        keys = {f"{section}.{key}" for section, values in (raw or {}).items() for key in values}
        return cfg, frozenset(keys - {f"{sec}.{key}" for sec, key in RETIRED_FIELDS})

    @classmethod
    def load_saved(cls, path: str | os.PathLike) -> Config:
        """The config.yaml of a run or an export, held to the same checks as the flags that made it: a
        hand-edited or foreign file fails here in one line, not later as a traceback mid-request, naming
        the setting by its key in that file (`lora.r`), as no flag was typed."""
        cfg = cls.load(path, flag=None)
        try:
            return cfg.validate(Given(in_file=frozenset(_FLAGS_OF_KEYS)))  # every key: the file's
        except UserError as e:
            raise UserError(f"{path}: a saved setting is invalid: {e}") from None


# compare trains each method as a child `train` given the user's same train flags, naming the child's
# method here: the full arm's --lora-* flags were meant for the LoRA arm, so calling them inert is noise.
COMPARE_ARM_ENV = "IMDB_LORA_COMPARE_ARM"
# ... and, where it passes the child --lr for the user's --lora-lr or --full-lr, that flag here: the
# child's refusals (a diverging training's `try a lower ...`) name the rate as the user typed it.
COMPARE_LR_ENV = "IMDB_LORA_COMPARE_LR"


@dataclass(frozen=True)
class Given:
    """Where the settings a user gave came from, so that a note names each as it was written: the config
    keys (`data.head_tokens`) that flags typed on the command line set, and those a `--config` file set
    (`file`: that flag's value as given, my.yaml or a shipped name)."""

    typed: frozenset[str] = frozenset()
    file: str | None = None
    in_file: frozenset[str] = frozenset()
    # (key, flag) where the flag typed for a key is not its own: compare's `--lora-lr` sets the LoRA
    # arm's train.lr, and a refusal of that rate names what the user typed, not train's `--lr`
    flags: tuple[tuple[str, str], ...] = ()

    def from_file(self, key: str) -> bool:
        """Set by the --config file, not overridden by a flag."""
        return key in self.in_file and key not in self.typed

    def flag(self, key: str) -> str:
        """The flag that sets `key` here (`--lr`; `--lora-lr` in compare's LoRA arm when typed)."""
        return dict(self.flags).get(key) or _FLAGS_OF_KEYS[key]

    def where(self, key: str) -> str:
        """A note's subject: `--cuda-graphs` as typed (or built in code), `my.yaml: train.cuda_graphs` from
        the file (`train.cuda_graphs` alone where no file is named: a message that names it itself)."""
        if not self.from_file(key):
            return self.flag(key)
        return f"{self.file}: {key}" if self.file else key

    def name(self, key: str, value: Any = None) -> str:
        """`--batching flat` as typed (or built in code); `train.batching: flat` as the file says it."""
        if self.from_file(key):
            return key if value is None else f"{key}: {value}"
        return self.flag(key) if value is None else f"{self.flag(key)} {value}"

    def said(self, key: str, subject: str | None = None) -> str:
        """A setting named inside a refusal whose subject is another (`subject`), or in its advice:
        `--lora-targets` as typed, `lora.targets in my.yaml` from the file (the file left out where the
        subject came from it too: the line begins with its name)."""
        if not self.from_file(key):
            return self.flag(key)
        named = subject is not None and self.from_file(subject)
        return key + (f" in {self.file}" if self.file and not named else "")


def turn_off(subject: str, said: str = "it") -> str:
    """The advice to turn a boolean setting off, as `subject` names it (Given.where): `drop --compile`
    for a flag, `set it false there` for a --config file's key (`my.yaml: train.compile`; `said`: how the
    advice names that key, where the line began with another setting)."""
    return f"drop {subject}" if subject.startswith("--") else f"set {said} false there"


def inert_settings(cfg: Config, given: Given | None = None) -> list[str]:
    """One line for each setting given that the others leave without effect: said on stderr, as
    `--cuda-graphs` on the CPU is, so that no flag is silently ignored. `given`: what the command line
    typed and what its --config file set; each note names the flag, or the file and its key. A file's
    value left inert by a typed flag is not said (`--config minilm-quick --truncation head` overrides the
    recipe, whose head_tokens then has no use); nor is one from a resumed run's config.yaml, which names
    every setting. None (a config built in code): every value that differs from its default, named by
    its flag. Settings whose effect depends on the model or the device are said where those are known."""
    lo, d, t = cfg.lora, cfg.data, cfg.train
    notes: list[str] = []
    if t.method == "full":
        lora_keys = [f"lora.{f.name}" for f in dataclasses.fields(lo)]
        notes += _inert(cfg, given, lora_keys, ("train.method", "full"), "every weight trains; no adapters")
    elif lo.target_modules:
        notes += _inert(
            cfg,
            given,
            ["lora.targets"],
            ("lora.target_modules", None),
            "the modules it names are wrapped instead",
        )
    if d.truncation == "head":
        notes += _inert(cfg, given, ["data.head_tokens"], ("data.truncation", "head"), "head_tail only")
    if d.train_file and d.path:
        notes += _inert(
            cfg, given, ["data.path"], ("data.train_file", None), "the labeled files replace IMDB"
        )
    if t.batching == "flat" and cfg.model.pooling == "mean":
        why = "it trains and evaluates padded: the flat forward reads each review's first token only"
        notes += _inert(cfg, given, ["train.batching"], ("model.pooling", "mean"), why, shown="flat")
    return notes


def _inert(
    cfg: Config,
    given: Given | None,
    keys: list[str],
    by: tuple[str, str | None],
    why: str,
    shown: str | None = None,
) -> list[str]:
    """The notes for `keys` left without effect by the setting `by` (its key, and its value as said; `shown`:
    the inert keys' value as said): one for those typed, one for those the --config file set, unless a
    typed flag set `by` (an override of the file: its value then has no use). A file's value at its
    default is not said: the run is the same with it or without it, and a run's own config.yaml given as
    --config (its recipe, rerun) writes every setting out, so a default run's head_tokens would be said
    on every rerun."""
    condition, value = by
    defaults = Config()
    if given is None:  # built in code: every value off its default, named by its flag
        given = Given()
        typed = [k for k in keys if _value_at(cfg, k) != _value_at(defaults, k)]
        in_file: list[str] = []
    else:
        typed = [k for k in keys if k in given.typed]
        in_file = [
            k
            for k in keys
            if condition not in given.typed
            and given.from_file(k)
            and _value_at(cfg, k) != _value_at(defaults, k)
        ]
    about = given.name(condition, value)
    notes = []
    if typed:
        where = f" in {given.file}" if given.from_file(condition) else ""
        names = ", ".join(given.name(k, shown) for k in typed)
        notes.append(f"{names}: no effect with {about}{where} ({why})")
    if in_file:
        names = ", ".join(given.name(k, shown) for k in in_file)
        verb = "has" if len(in_file) == 1 else "have"
        notes.append(f"{given.file}: {names} {verb} no effect with {about} ({why})")
    return notes


def _value_at(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load's loader, but a key given twice in one mapping is an error: PyYAML keeps the last
    silently, so a second `train:` section dropped every setting of the first."""


def _unique_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden: that is its use
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            repeated = key in seen
        except TypeError:  # an unhashable key: construct_mapping says so itself
            break
        if repeated:
            raise yaml.constructor.ConstructorError(
                None, None, f"found the key {key!r} twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


# Bytes a file system allows in one name and in a whole path (Linux's; macOS allows 255 and 1,024): a
# longer one makes os.stat raise "File name too long" (pathlib's exists() and is_dir() pass it on).
NAME_MAX, PATH_MAX = 255, 4096


def path_problem(path: str) -> str | None:
    """Why no file system could hold `path`, in a few words; None if one could. Checked where a path
    enters (flags, YAML), so that it fails in one line naming its flag, not as a traceback wherever
    it is first looked at."""
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a lone surrogate (YAML "\ud800"): no file name encodes it
        return f"{reprlib.repr(path)} cannot be encoded as a file name"
    if b"\0" in raw:
        return f"{reprlib.repr(path)} holds a NUL byte"
    longest = max(Path(path).parts, key=lambda part: len(os.fsencode(part)), default="")
    if len(os.fsencode(longest)) > NAME_MAX:
        return f"a name of {len(os.fsencode(longest)):,} bytes ({reprlib.repr(longest)}); file systems allow {NAME_MAX}"
    if len(raw) >= PATH_MAX:
        return f"{len(raw):,} bytes long; file systems allow {PATH_MAX - 1}"
    return None


# --max-time's grammar: plain seconds (90, 2.5) or hours, minutes and seconds, each at most once and in
# that order, each a number with its unit (90s, 30m, 1h30m, 1.5h, 1h0m30s).
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
DURATION = re.compile(rf"(?:{_NUMBER}h)?(?:{_NUMBER}m)?(?:{_NUMBER}s)?")
DURATION_FORMS = "seconds (90, 90s) or a number with h, m, s units in that order (30m, 1h30m, 1.5h)"


def duration_seconds(text: str, name: str = "--max-time") -> float:
    """--max-time's value in seconds; a one-line error naming the setting (`name`: its flag, or the
    --config file's key) for anything else, or for 0."""
    s = str(text).strip().lower()
    plain = re.fullmatch(_NUMBER, s)
    parts = None if plain else DURATION.fullmatch(s)
    if plain:
        seconds = float(s)
    elif parts and any(parts.groups()):
        h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
        seconds = 3600 * h + 60 * m + sec
    else:
        raise UserError(f"{name} must be a duration: {DURATION_FORMS} (got {text!r})")
    if not 0 < seconds < math.inf:
        raise UserError(f"{name} must be a finite duration above 0 seconds (got {text!r})")
    return seconds


# A labeled file that is also another of the run's: (its key, its path, the other's key, the other's
# path, how it is that file: "path", "file" or "copy", see _sameness).
FileClash = tuple[str, str, str, str, str]


def file_clashes(cfg: Config) -> list[FileClash]:
    """Each labeled file that is also another of the run's: an --eval-file or --test-file that is the
    --train-file (leakage: trained-on reviews reported as unseen) or an --eval-file that is the
    --test-file (the same reviews reported twice under two names). Paths are compared resolved, so ./a,
    a and a symlink to it are one file; a hard link (or a bind mount) is the same file to
    os.path.samefile; and a byte-identical copy holds the same reviews: the same leakage."""
    d = cfg.data
    # resolved here too: a resumed run's saved settings (not validated again) then name each file as the
    # validated ones do, so that refuse_file_clashes matches the clash it was started with
    train, test = _absolute_if_local(d.train_file), _absolute_if_local(d.test_file)
    pairs = [("data.test_file", test, "data.train_file", train)]
    for f in map(_absolute_if_local, d.eval_files):
        pairs += [
            ("data.eval_files", f, "data.train_file", train),
            ("data.eval_files", f, "data.test_file", test),
        ]
    clashes = [(key, path, other, also, _sameness(path, also)) for key, path, other, also in pairs]
    return [clash for clash in clashes if clash[4]]


def _sameness(path: str | None, also: str | None) -> str | None:
    """How `path` is the file `also`: "path" (the same resolved path), "file" (another name for the
    same file: a hard link), "copy" (another file of the same bytes), or None."""
    if not path or not also:
        return None
    if path == also:  # kept for missing files, which samefile cannot stat
        return "path"
    try:
        if os.path.samefile(path, also):
            return "file"
        # Sizes first (filecmp compares them before any byte), then the bytes, up to the first that
        # differs: no reading at all for files of different sizes, the usual case. Not file_sha256:
        # config sits below data in the import layers. shallow=False: equal stat signatures (size and
        # mtime) are not taken for equal content; clear_cache: a file rewritten within the mtime's
        # resolution is read again.
        filecmp.clear_cache()
        return "copy" if filecmp.cmp(path, also, shallow=False) else None
    except OSError:  # missing or unreadable: read, and refused by name, where the data loads
        return None


def clash_line(clash: FileClash, given: Given | None = None) -> str:
    """Why a file that is also the --train-file or the --test-file (or a copy of it) means nothing, each
    file named as it was given (config.Given): `--eval-file X is also the --train-file: ...`, or
    `my.yaml: data.eval_files X is also the data.train_file: ...` where the --config file set them."""
    given = given or Given()
    key, path, other, also, same = clash
    why = (
        "its reviews were trained on, so its accuracy would say nothing of unseen reviews"
        if other == "data.train_file"
        else "it is evaluated and reported already, as the test split; it would be reported twice under two names"
    )
    other_name = given.said(other, key)  # the file's key; which file, unless the subject named it already
    subject = given.where(key)
    if same == "copy":
        return f"{subject} {path} is an identical copy of the {other_name} {also}: {why}"
    if same == "file":
        return f"{subject} {path} is also the {other_name} ({also}, the same file under another name): {why}"
    return f"{subject} {path} is also the {other_name}: {why}"


def refuse_file_clashes(cfg: Config, started: Config | None = None, given: Given | None = None) -> list[str]:
    """Refuse a new training's clashing files (file_clashes) in one line. Not part of validate(), so a
    run trained before this check still loads; and under --resume (`started`: the run's saved settings)
    a clash the run was started with is returned as a note, not refused: refusing would strand the
    epochs it has trained, and --resume cannot drop an --eval-file. `given`: where each setting came
    from, so that the line names a --config file's key as the file wrote it (default: by its flag)."""
    given = given or Given()
    kept = file_clashes(started) if started is not None else []
    clashes = file_clashes(cfg)
    for clash in clashes:
        if clash not in kept:
            key = clash[0]
            fix = (
                f"point {key} in {given.file} at another file"
                if given.from_file(key) and given.file
                else f"give {given.flag(key)} another file"
            )
            raise UserError(f"{clash_line(clash, given)}; {fix}")
    return [f"{clash_line(clash, given)}; kept, as the run was started with it" for clash in clashes]


def _absolute_if_local(path: str | None) -> str | None:
    """An existing local path as an absolute one; hub ids, URLs and None unchanged."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


# Settings a resumed run may change: where and how it computes, not what it computes (calibration and
# the labeled-file report happen after the last epoch and change no weight; --max-time is the resumed
# command's own budget, from its start, and the schedule is never laid over it; --max-steps is not
# here: the schedule is laid over it, so a changed cap would change every step's learning rate).
RESUME_MAY_CHANGE = frozenset(
    {
        "train.device",
        "train.compile",
        "train.cuda_graphs",
        "train.bf16_working_copies",
        "data.token_cache",
        "train.calibration",
        "data.eval_files",
        "train.max_time",
    }
)


def differing_fields(saved: Config, given: Config, ignore: frozenset[str] = RESUME_MAY_CHANGE) -> list[str]:
    """The fields (outside `ignore`) where a run's saved config and the one asked for now disagree, each
    named by its flag and its config.yaml key: `--lr (train.lr: 0.003 saved, 0.001 given)`."""
    ds, dg = saved.to_dict(), given.to_dict()
    flags = {(sec, f.name): flag_of(f) for sec, _, f in section_fields()}
    return [
        f"{flags[sec, k]} ({sec}.{k}: {ds[sec][k]!r} saved, {dg[sec][k]!r} given)"
        for sec in ds
        for k in ds[sec]
        if f"{sec}.{k}" not in ignore and ds[sec][k] != dg[sec][k]
    ]


# Fields that earlier versions wrote to config.yaml and that no longer exist (value they always had).
RETIRED_FIELDS = {("model", "num_labels"): 2}


def _sections() -> dict[str, type]:
    return {f.name: f.type for f in dataclasses.fields(Config)}


def section_fields() -> list[tuple[str, type, dataclasses.Field]]:
    """(section name, section class, field) for every leaf field, in declaration order."""
    out = []
    for sec in dataclasses.fields(Config):
        cls = sec.default_factory  # type: ignore[misc]
        out.extend((sec.name, cls, f) for f in dataclasses.fields(cls))
    return out


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


# `lora.r` -> `--lora-r`: the flag of each config key, for messages about keys
_FLAGS_OF_KEYS = {f"{sec}.{f.name}": flag_of(f) for sec, _, f in section_fields()}


def _beside(given: Given, key: str, value: Any, subject: str) -> str:
    """Another setting that a refusal of `subject` names, with its value, as it was given: `--max-length
    64`, or `data.max_length 64` from the --config file (`... in my.yaml` where the subject was typed)."""
    if not given.from_file(key):
        return f"{given.flag(key)} {value}"
    return f"{key} {value}" + (f" in {given.file}" if given.file and not given.from_file(subject) else "")


def _one_of(key: str, value: str) -> tuple[bool, str, str]:
    """validate()'s check of a field whose values are CHOICES[key]: `must be head or head_tail`."""
    *most, last = CHOICES[key]
    return value in CHOICES[key], key, f"must be {', '.join(most)} or {last}"


def _resolved_type(owner: type, f: dataclasses.Field) -> tuple[Any, bool]:
    """The field's base type and whether it is optional (`X | None`)."""
    tp = typing.get_type_hints(owner)[f.name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None)), True
    return tp, False


def coerce(value: Any, owner: type, f: dataclasses.Field, where: str) -> Any:
    """Convert a YAML or CLI value to the field's type, with an error that names where it came from."""
    tp, optional = _resolved_type(owner, f)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise UserError(f"{where}: a value is required")
    try:
        # YAML's true is an int to Python (epochs: true trained 1 epoch), and a list or mapping is no
        # name or number (model: {name: [a]} became the model "['a']")
        if isinstance(value, bool) and tp is not bool or isinstance(value, dict | list) and tp is str:
            raise ValueError(value)
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typing.get_origin(tp) is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
                # also keeps YAML aliases of nested lists (a few bytes that expand to gigabytes) out
                raise ValueError(value)
            return [str(v) for v in value]
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise UserError(f"{where}: expected {name}, got {reprlib.repr(value)}") from None  # bounded length

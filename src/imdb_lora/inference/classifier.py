"""One Classifier, loaded once from a run directory or an export, used by predict, evaluate, serve, score."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config, Given
from ..data.batches import default_max_batch_tokens
from ..data.labeled import LABEL_NAMES, has_content
from ..data.tokenize import check_window_stride, encode, encode_windows
from ..errors import UserError, counted
from ..modeling.forward import batched_logits
from ..modeling.load import (
    NUM_LABELS,
    base_fingerprint,
    check_saved_max_length,
    first_line,
    is_damaged_weights,
    is_local,
    load_base_model,
    load_tokenizer,
    position_limit,
    resolve_device,
)
from ..modeling.pooling import set_pooling
from ..runs.rundir import CALIBRATION, RunDir, folder_state, read_calibration
from .exported import MARKER, is_export, load_export


@dataclass
class Prediction:
    text: str
    label: str  # NEGATIVE or POSITIVE
    label_id: int
    confidence: float  # probability of the predicted label
    negative: float
    positive: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "label": self.label,
            "label_id": self.label_id,
            "confidence": round(self.confidence, 6),
            "probabilities": {"negative": round(self.negative, 6), "positive": round(self.positive, 6)},
        }

    def to_text(self) -> str:
        return (
            f"Text: {self.text}\n"
            f"Prediction: {self.label}\n"
            f"Confidence: {self.confidence:.4f}\n"
            f"Probabilities - Negative: {self.negative:.4f} | Positive: {self.positive:.4f}"
        )


def check_texts(texts: list[str], start: int = 0) -> None:
    """Every text has content; `start`: how many texts came before these (a chunk of a longer input)."""
    for i, t in enumerate(texts, start + 1):
        if not isinstance(t, str) or not has_content(t):
            raise UserError(f"text {i} is empty (or only whitespace or control characters); give a review")


class Classifier:
    """A loaded model + tokenizer + the run's preprocessing; `predict(texts)` is all most callers need."""

    def __init__(
        self,
        model,
        tokenizer,
        device: torch.device,
        config: Config,
        info: dict[str, Any],
        max_batch_tokens: int | None = None,
    ):
        # model: a torch module, or an export's OnnxModel (anything with batched_logits(seqs, pad_id, ...))
        self.model = model.eval() if isinstance(model, torch.nn.Module) else model
        self.tokenizer = tokenizer
        self.device = device
        self.config = config
        self.info = info
        # padded tokens per forward pass, whatever the backend: a call of many texts runs as length-sorted
        # micro-batches of this size, so it costs no more per text than a call of a few
        self.max_batch_tokens = max_batch_tokens or default_max_batch_tokens(device.type)
        # Temperature scaling (calibration.json, fitted on validation at the end of training): every
        # caller - predict, evaluate, serve, score, the benches - gets calibrated probabilities.
        self.temperature = 1.0
        self.calibration_note = "uncalibrated"
        self.raw = False  # --raw: the temperature is ignored (said apart from a run that has none)
        # How errors name the saved data settings when a split is read again (saved_data_where); None:
        # by their flags, as for a config built in code
        self.data_where: Callable[[str], str] | None = None

    def use_calibration(self, folder: str, raw: bool = False) -> None:
        """Apply the temperature stored in `folder` (a run or an export), or none with raw=True."""
        self.raw = raw
        if raw:  # the file is not even read: --raw works with a damaged one too
            self.temperature, self.calibration_note = 1.0, "raw probabilities (--raw: temperature 1)"
            return
        record = read_calibration(folder)
        exported = (self.info.get("export") or {}).get("temperature")  # what the export was made with
        found = 1.0 if record is None else float(record["temperature"])
        if isinstance(exported, (int, float)) and exported != found:
            raise UserError(
                f"{Path(folder) / CALIBRATION} holds temperature {found!r}, but the export was made with "
                f"{exported!r} ({MARKER}); export the run again"
            )
        if record is None:
            self.temperature = 1.0
            self.calibration_note = f"no {CALIBRATION} (uncalibrated run): temperature 1"
        else:
            self.temperature = float(record["temperature"])
            self.calibration_note = f"calibrated: temperature {self.temperature:.4f} (fitted on validation)"

    @classmethod
    def load(
        cls,
        path: str,
        device: str = "auto",
        base_model: str | None = None,
        merge: bool = False,
        raw: bool = False,
        max_batch_tokens: int | None = None,
        base_flag: bool = True,
    ) -> Classifier:
        """Load a finished run directory or an export folder; `merge` folds the adapter into the base
        weights; `raw` ignores the run's calibration (temperature 1); base_flag=False: the command has no
        --base-model to suggest when the base has moved.

        A folder that another process replaces or rewrites while it is read (a `train --overwrite`, an
        `export --overwrite`) is refused in one line rather than loaded as a mix of the old and the new."""
        before = folder_state(path)
        clf = cls._load(path, device, base_model, merge, raw, max_batch_tokens, base_flag)
        if folder_state(path) != before:
            raise UserError(
                f"{path} changed while it was read (another imdb-lora process is writing it: a train "
                "--overwrite or --resume, an export?); run the command again once that has finished"
            )
        return clf

    @classmethod
    def _load(
        cls,
        path: str,
        device: str,
        base_model: str | None,
        merge: bool,
        raw: bool,
        max_batch_tokens: int | None,
        base_flag: bool,
    ) -> Classifier:
        if is_export(path):  # self-contained: base model, adapter and --base-model do not apply
            if base_model is not None:  # said, not ignored: the user meant some other model to be used
                raise base_model_of_an_export(path)
            clf = cls(*load_export(path, device), max_batch_tokens=max_batch_tokens)
            clf.data_where = saved_data_where(Path(path).expanduser() / "config.yaml")
        else:
            clf = cls._load_run(path, device, base_model, merge, max_batch_tokens, base_flag)
        clf.use_calibration(path, raw)
        return clf

    @classmethod
    def _load_run(
        cls,
        path: str,
        device: str,
        base_model: str | None,
        merge: bool,
        max_batch_tokens: int | None,
        base_flag: bool = True,
    ) -> Classifier:
        run = RunDir(path)
        info = run.require_finished()
        cfg = Config.load_saved(run.config_path)
        recorded = use_recorded_imdb(cfg, info)
        dev = resolve_device(device)
        if info["method"] == "full":
            if base_model is not None:  # the run holds the whole model: there is no base to point at
                raise base_model_of_a_full_run(run.path)
            model, _ = load_base_model(
                str(run.weights_dir("full")), NUM_LABELS, False, cfg.train.seed, flag=None
            )
            set_pooling(model, cfg.model.pooling)
        else:
            model = load_adapter_model(run, cfg, info, base_model, merge, base_flag)
            if base_model is not None:  # the same base (fingerprint-checked) from another place: said
                info = {**info, "base_model_from": base_model}
        check_saved_max_length(cfg.data.max_length, position_limit(model.config), run.config_path)
        tokenizer = load_tokenizer(str(run.tokenizer_dir), folder=True)
        clf = cls(model.to(dev), tokenizer, dev, cfg, info, max_batch_tokens)
        clf.data_where = saved_data_where(run.config_path, recorded)
        return clf

    # ------------------------------------------------------------ inference

    def encode(self, texts: list[str]) -> list[list[int]]:
        d = self.config.data
        return encode(self.tokenizer, texts, d.max_length, d.truncation, d.head_tokens)

    def logits(
        self, texts: list[str], batch_size: int = 32, progress=None, window_stride: int | None = None
    ) -> torch.Tensor:
        """Calibrated logits per text (divided by the temperature), in input order. With `window_stride`,
        long texts are read as overlapping max-length windows and the result is the log of the
        window-averaged (calibrated) probabilities."""
        check_texts(texts)
        if window_stride is None:
            ids = self.encode(texts)
            return self.batched_logits(ids, batch_size, progress) / self.temperature
        windows, owner = encode_windows(self.tokenizer, texts, self.config.data.max_length, window_stride)
        probs = (self.batched_logits(windows, batch_size) / self.temperature).softmax(-1)
        idx = torch.tensor(owner)
        total = torch.zeros(len(texts), probs.shape[1]).index_add_(0, idx, probs)
        counts = torch.zeros(len(texts)).index_add_(0, idx, torch.ones(len(owner)))
        if progress is not None:
            progress.update(len(texts))
        return (total / counts[:, None]).log()

    def batched_logits(self, seqs: list[list[int]], batch_size: int = 32, progress=None) -> torch.Tensor:
        """Raw fp32 logits (no temperature) of token-id sequences, in input order, from whichever backend
        holds the model, in length-sorted micro-batches of at most batch_size rows and max_batch_tokens
        padded tokens."""
        pad_id, budget = self.tokenizer.pad_token_id, self.max_batch_tokens
        if isinstance(self.model, torch.nn.Module):
            return batched_logits(
                self.model, seqs, pad_id, batch_size, self.device, progress, max_tokens=budget
            )
        return self.model.batched_logits(seqs, pad_id, batch_size, progress, max_tokens=budget)

    def describe(self) -> str:
        """What was loaded, in words, for stderr (serve, predict, score): "onnx int8 export of roberta-base
        (onnxruntime, cpu), calibrated: temperature 0.7900 (fitted on validation)"."""
        export = self.info.get("export")
        if export:
            kind = f"{export['format']}{' ' + export['quantize'] if export.get('quantize') else ''} export"
        else:
            kind = f"{self.info.get('method', 'lora')} run"
        # run.json's record of the base (an export's: without this machine's paths), not config.yaml's
        # name, which a relative name in an export would resolve against the current directory
        base = str(self.info.get("model") or self.config.model.name)
        base += " (random init)" if self.info.get("random_init") else ""
        base += (
            f" (from --base-model {self.info['base_model_from']})" if self.info.get("base_model_from") else ""
        )
        return f"{kind} of {base} ({self.backend}, {self.device.type}), {self.calibration_note}"

    @property
    def backend(self) -> str:
        """torch, or onnxruntime for an ONNX export."""
        return getattr(self.model, "backend", "torch")

    def predict(
        self, texts: list[str], batch_size: int = 32, window_stride: int | None = None
    ) -> list[Prediction]:
        if not texts:
            return []
        probs = self.logits(texts, batch_size, window_stride=window_stride).softmax(-1)
        return [to_prediction(t, p) for t, p in zip(texts, probs.tolist())]


def use_recorded_imdb(cfg: Config, info: dict[str, Any]) -> bool:
    """A run trained on `$IMDB_LORA_DATA` or the download keeps `data.path: null` in config.yaml, and
    its run.json (`data_source.path`) says which IMDB copy it read. Reading the run again (evaluate,
    select, bench) defaults to that copy while it is there, as `--data` given to train would, not to
    whatever `$IMDB_LORA_DATA` says now or a fresh download (which fails offline). True if it did."""
    d, source = cfg.data, info.get("data_source") or {}
    recorded = source.get("path")
    if d.path is not None or d.train_file is not None or source.get("kind") != "imdb":
        return False
    if isinstance(recorded, str) and Path(recorded).is_absolute() and Path(recorded).exists():
        d.path = recorded
        return True
    return False


def saved_data_where(config_path: Path, recorded: bool = False) -> Callable[[str], str]:
    """How errors name a run's (or an export's) data settings when its splits are read again without
    --data: as `runs/x/config.yaml: data.path`, where they were saved, not as the --data, --train-file
    or --test-file the user did not type; the IMDB copy use_recorded_imdb took from run.json (`recorded`)
    as `runs/x/run.json: data_source.path`."""
    saved = Given(
        file=str(config_path), in_file=frozenset({"data.path", "data.train_file", "data.test_file"})
    )

    def where(key: str) -> str:
        if recorded and key == "data.path":
            return f"{config_path.with_name('run.json')}: data_source.path"
        return saved.where(key)

    return where


def check_window_stride_of(path: str, stride: int | None) -> None:
    """--window-stride against a run's or export's saved max length and tokenizer, before the model
    loads or any data is read (seconds, not minutes; and `score` would make it every row's error)."""
    if stride is None:
        return
    root = Path(path).expanduser()
    if is_export(root):
        config_path, tokenizer_dir = root / "config.yaml", root / "tokenizer"
    else:
        run = RunDir(root)
        config_path, tokenizer_dir = run.config_path, run.tokenizer_dir
    cfg = Config.load_saved(config_path)
    check_window_stride(load_tokenizer(str(tokenizer_dir), folder=True), cfg.data.max_length, stride)


def to_prediction(text: str, probs: list[float]) -> Prediction:
    label_id = int(probs[1] > probs[0])
    return Prediction(text, LABEL_NAMES[label_id], label_id, probs[label_id], probs[0], probs[1])


def base_model_of_an_export(path: str | Path) -> UserError:
    return UserError(
        f"--base-model applies to run directories only; {path} is an export (the base model is folded into it)"
    )


def base_model_of_a_full_run(path: str | Path) -> UserError:
    return UserError(
        f"--base-model applies to LoRA runs only; {path} was fully fine-tuned "
        "(its model/ folder holds the whole model)"
    )


def adapter_base(run: RunDir, cfg: Config, base_model: str | None, base_flag: bool = True) -> str:
    """Where a LoRA run's base model loads from: --base-model, else the random base saved in the run,
    else config.yaml's model (a hub id, or a local folder's absolute path, which a move breaks: said in
    one line). base_flag=False: the command has no --base-model (select, bench), so the line says where
    the flag is and the other way out."""
    saved_base = run.path / "base_model"
    base = base_model or (str(saved_base) if saved_base.is_dir() else cfg.model.name)
    if base_model is None and is_local(base) and not Path(base).is_dir():
        how = (
            "pass --base-model with where it is now"
            if base_flag
            else "put it back there (a symlink will do); predict, evaluate, serve, score and export take "
            "--base-model with where it is now"
        )
        raise UserError(f"the base model {run.path} was trained on, {base}, is no longer there; {how}")
    return base


def load_adapter_model(
    run: RunDir,
    cfg: Config,
    info: dict[str, Any],
    base_model: str | None,
    merge: bool,
    base_flag: bool = True,
):
    from peft import PeftModel

    base = adapter_base(run, cfg, base_model, base_flag)
    model, _ = load_base_model(base, NUM_LABELS, False, cfg.train.seed, flag="--base-model")
    set_pooling(model, cfg.model.pooling)  # before PEFT wraps it: merge_and_unload keeps the config
    fp = base_fingerprint(model)
    if fp != info.get("base_fingerprint"):
        raise UserError(
            f"the adapter in {run.path} was trained on base model {cfg.model.name!r}, "
            f"but {base!r} is a different model (fingerprint {fp} != {info.get('base_fingerprint')}); "
            "pass --base-model with the original base"
        )
    adapter = run.weights_dir("lora")
    if not (adapter / "adapter_model.safetensors").is_file():  # PEFT would fall back to a pickled .bin
        raise UserError(f"{adapter} has no adapter_model.safetensors (only safetensors weights are loaded)")
    try:
        with warnings.catch_warnings():  # check_adapter_complete says it in one line
            warnings.filterwarnings("ignore", "Found missing adapter keys", UserWarning)
            model = PeftModel.from_pretrained(model, str(adapter))
    except Exception as e:
        if is_damaged_weights(e):  # a truncated or garbled copy: one line, not safetensors' traceback
            raise UserError(f"the adapter weights in {adapter} are damaged ({first_line(e)})") from None
        problem = adapter_problem(e)
        if problem is None:
            raise
        raise UserError(f"the adapter in {adapter} is unusable ({problem}); {RESTORE}") from None
    check_adapter_complete(model, adapter / "adapter_model.safetensors")
    return model.merge_and_unload() if merge else model


RESTORE = "it was damaged or edited: restore it from a good copy, or train the run again"


def adapter_problem(e: Exception) -> str | None:
    """What PEFT's error on a damaged adapter folder means, in a few words; None for anything else.
    An adapter_config.json that is not JSON, or whose values have the wrong type (`"r": "8"`), and
    weights of the wrong shape (or a config whose r no longer matches them) fail inside PEFT and torch;
    a weight missing from the head fails in PEFT's lookup (KeyError)."""
    if isinstance(e, json.JSONDecodeError):
        return f"adapter_config.json is not valid JSON: {e.msg}"
    if isinstance(e, KeyError):
        return f"adapter_model.safetensors lacks {e.args[0] if e.args else 'a tensor'}"
    if isinstance(e, RuntimeError) and "size mismatch for " in str(e):
        first = next(line for line in str(e).splitlines() if "size mismatch for " in line)
        return first.strip().rstrip(".")
    if isinstance(e, (TypeError, ValueError)):
        return f"adapter_config.json: {first_line(e)}"
    return None


def check_adapter_complete(model, weights: Path) -> None:
    """PEFT loads an adapter non-strictly: a LoRA tensor missing from the file keeps its random
    initialisation, and every prediction is silently wrong. Every tensor the model saves must be there."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:  # the header only: names, not tensors
        saved = set(f.keys())
    # False: "auto" looks up the base's config by the adapter's ./NAME and warns when it is not found
    # there; imdb-lora never resizes the vocabulary, so no embedding layer is ever saved whole
    expected = get_peft_model_state_dict(model, save_embedding_layers=False)
    missing = sorted(set(expected) - saved)
    if missing:
        raise UserError(
            f"{weights} lacks {counted(len(missing), 'tensor')} of the adapter "
            f"({missing[0]}{', ...' if len(missing) > 1 else ''}); {RESTORE}"
        )

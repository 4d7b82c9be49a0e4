"""The training recipe: setup (run directory, data, model) then train (loop, evaluation, checkpoints).

Resumable by construction: everything the loop's future depends on (trainable weights, optimizer
moments, RNG state, position in the epoch, history so far) is written to one safetensors file with an
atomic rename, every `checkpoint_every` steps and at each epoch's end. The data order of an epoch is a
function of (seed, epoch) alone, so a resumed run takes exactly the steps an uninterrupted one takes.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import __version__
from .config import Config
from .data import load_splits
from .errors import UserError
from .model import (
    batched_logits,
    build_model,
    check_model_source,
    compile_encoder,
    forward_logits,
    load_tokenizer,
    resolve_device,
)
from .packing import use_packing
from .rundir import RunDir
from .tokcache import cached_encode

CHECKPOINT = "checkpoint.safetensors"
POSTFIX_EVERY = 25  # steps between reading the running loss back from the device (progress bar)
# Settings a resumed run may change: where and how it computes, not what it computes.
RESUME_MAY_CHANGE = {"train.device", "train.compile", "data.token_cache"}


@dataclass
class Progress:
    """Where the loop stands; saved in the checkpoint's metadata."""

    epoch: int = 1  # epoch being trained (1-based)
    step_in_epoch: int = 0  # optimizer steps done in this epoch
    global_step: int = 0
    loss_sum: float = 0.0  # running train loss x examples, this epoch
    correct: int = 0
    seen: int = 0
    epoch_train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    best_epoch: int = 0
    best_val_accuracy: float = -1.0


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up to `peak`, then linear decay to 0 at `total` steps."""
    warmup = int(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "GPU (torch max allocated)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "CPU (process peak RSS)"


class Trainer:
    """`Trainer(cfg, out).setup(); trainer.train()` runs (or resumes) one run into its directory."""

    def __init__(
        self, cfg: Config, output_dir: str | os.PathLike, overwrite: bool = False, resume: bool = False
    ):
        self.cfg = cfg
        self.run = RunDir(output_dir)
        self.overwrite = overwrite
        self.resume = resume

    # ------------------------------------------------------------ setup

    def setup(self) -> Trainer:
        """Check everything that can fail (paths, model, data) before the run directory is created."""
        cfg, run = self.cfg, self.run
        self._check_directory()
        self.device = resolve_device(cfg.train.device)
        base_dir = run.path / "base_model" if (cfg.model.random_init and cfg.train.method == "lora") else None
        # A resumed random-init run reloads its saved base rather than trusting RNG reproducibility.
        model_name = str(base_dir) if (self.resumed and base_dir and base_dir.is_dir()) else cfg.model.name
        check_model_source(model_name, cfg.model.random_init)  # fail before the slow data loading
        self.tokenizer = load_tokenizer(cfg.model.name if not self.resumed else str(run.tokenizer_dir))
        t0 = time.time()
        splits = load_splits(cfg.data, cfg.train.seed)
        d = cfg.data
        tok = lambda texts: cached_encode(  # noqa: E731
            self.tokenizer, texts, d.max_length, d.truncation, d.head_tokens, d.token_cache
        )
        self.train_ids, self.val_ids, self.test_ids = (
            tok(splits.train.texts),
            tok(splits.val.texts),
            tok(splits.test.texts),
        )
        self.train_y, self.val_y, self.test_y = splits.train.labels, splits.val.labels, splits.test.labels
        self.data_seconds = time.time() - t0
        if self.resumed:
            run.recover()
        else:
            self._create_directory()
        try:
            model, self.info = build_model(
                cfg,
                source=model_name,
                random_init=cfg.model.random_init and model_name == cfg.model.name,
                save_base_to=base_dir if not self.resumed else None,
            )
        except BaseException:
            if not self.resumed:  # nothing worth keeping yet; leave no half-made run behind
                shutil.rmtree(run.path, ignore_errors=True)
            raise
        if not self.resumed:
            self.tokenizer.save_pretrained(run.tokenizer_dir)
        self.model = model.to(self.device)
        self.packed = use_packing(cfg.train.batching, self.model, self.device, training=True)
        self.packed_eval = use_packing(cfg.train.batching, self.model, self.device, training=False)
        if cfg.train.compile:
            compile_encoder(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            fused=self.device.type == "cuda",
        )
        self.steps_per_epoch = math.ceil(len(self.train_ids) / cfg.train.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.state = Progress()
        if self.resumed:
            self._load_checkpoint()
        run.write_status("running", self._summary())
        return self

    def _check_directory(self) -> None:
        """Decide between a fresh run and a resumed one; refuse to lose anything silently."""
        run = self.run
        self.resumed = False
        if self.resume:
            if not run.is_resumable():
                raise UserError(f"--resume: {run.path} holds no resumable run (no {CHECKPOINT})")
            if run.status() == "finished":
                raise UserError(f"--resume: {run.path} is already finished; see {run.path / 'results.md'}")
            saved = Config.load(run.config_path)
            diff = differing_fields(saved, self.cfg, ignore=RESUME_MAY_CHANGE)
            if diff:
                raise UserError(
                    f"--resume continues {run.path} with its saved config.yaml; these settings differ: "
                    + ", ".join(diff)
                )
            self.resumed = True
        elif run.path.exists() and not run.path.is_dir():
            raise UserError(f"--output-dir {run.path} exists and is a file")
        elif run.path.exists() and any(run.path.iterdir()) and not self.overwrite:
            hint = " or --resume to continue it" if run.is_resumable() else ""
            raise UserError(
                f"--output-dir {run.path} exists and is not empty; pass --overwrite to replace it{hint}"
            )

    def _create_directory(self) -> None:
        if self.run.path.exists():
            shutil.rmtree(self.run.path)  # only reached with --overwrite (or an empty folder)
        self.run.path.mkdir(parents=True)
        self.cfg.save(self.run.config_path)

    # ------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        cfg, st = self.cfg.train, self.state
        torch.manual_seed(cfg.seed)
        if self.resumed:
            self._restore_rng()
        self.model.train()
        start = time.time()
        while st.epoch <= cfg.epochs:
            self._train_epoch()
            self._end_epoch()
        summary = self._summary(wall_seconds=time.time() - start)
        from .report import write_reports

        write_reports(self.run, self.cfg, st.history, summary)
        self.run.write_status("finished", summary)
        return summary

    def _train_epoch(self) -> None:
        cfg, st = self.cfg.train, self.state
        order = epoch_order(len(self.train_ids), cfg.seed, st.epoch)
        batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        pad_id = self.tokenizer.pad_token_id
        bar = tqdm(
            total=len(batches),
            initial=st.step_in_epoch,
            desc=f"epoch {st.epoch}/{cfg.epochs}",
            unit="step",
            dynamic_ncols=True,
            leave=False,
        )
        # Loss sums and correct counts stay on the device between flushes: reading them every step
        # would make the host wait for the GPU each step instead of queueing the next one.
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []

        def flush() -> None:
            if pending:
                totals = torch.stack([torch.stack(p) for p in pending]).sum(0).tolist()
                st.loss_sum += totals[0]
                st.correct += round(totals[1])
                pending.clear()
                bar.set_postfix(loss=f"{st.loss_sum / st.seen:.4f}", acc=f"{st.correct / st.seen:.3f}")

        t0 = time.time()
        for idx in batches[st.step_in_epoch :]:
            pending.append(self._step(idx, pad_id))
            st.seen += len(idx)
            st.step_in_epoch += 1
            st.global_step += 1
            bar.update(1)
            if len(pending) >= POSTFIX_EVERY:
                flush()
            self._after_step()
            if (
                cfg.checkpoint_every
                and st.step_in_epoch % cfg.checkpoint_every == 0
                and st.step_in_epoch < len(batches)
            ):
                flush()
                st.epoch_train_seconds += time.time() - t0
                t0 = time.time()
                self._save_checkpoint()
        flush()
        bar.close()
        st.epoch_train_seconds += time.time() - t0

    def _step(self, idx: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns the batch's summed loss and correct count, on the device."""
        cfg, st = self.cfg.train, self.state
        seqs = [self.train_ids[i] for i in idx]
        y = torch.tensor([self.train_y[i] for i in idx], device=self.device)
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(st.global_step, self.total_steps, cfg.lr, cfg.warmup_ratio)
        logits = forward_logits(
            self.model, seqs, pad_id, self.device, self.packed, row_tokens=self.cfg.data.max_length
        ).float()
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().float() * len(idx), (logits.argmax(-1) == y).sum().float()

    def _after_step(self) -> None:
        """Hook after each optimizer step (tests use it to simulate a crash)."""

    def _end_epoch(self) -> None:
        st, cfg = self.state, self.cfg.train
        t0 = time.time()
        val_loss, val_acc = self.evaluate(self.val_ids, self.val_y, "validation")
        row = {
            "epoch": st.epoch,
            "train_loss": st.loss_sum / max(1, st.seen),
            "train_accuracy": st.correct / max(1, st.seen),
            "val_loss": val_loss,
            "val_accuracy": val_acc,
        }
        if cfg.eval_test_each_epoch:
            row["test_loss"], row["test_accuracy"] = self.evaluate(self.test_ids, self.test_y, "test")
        row["train_seconds"] = st.epoch_train_seconds
        row["eval_seconds"] = time.time() - t0
        row["lr_end"] = self.optimizer.param_groups[0]["lr"]
        st.history.append(row)
        if val_acc > st.best_val_accuracy:  # strictly better: ties keep the earlier, cheaper epoch
            st.best_val_accuracy, st.best_epoch = val_acc, st.epoch
            self.run.save_weights(self.model, self.cfg.train.method)
        print(
            f"epoch {st.epoch}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
            f"val loss {val_loss:.4f} acc {val_acc:.4f}"
            + (f" | test acc {row['test_accuracy']:.4f}" if "test_accuracy" in row else "")
            + f" | {row['train_seconds']:.1f}s train, {row['eval_seconds']:.1f}s eval"
            + (" *best*" if st.best_epoch == st.epoch else ""),
            flush=True,
        )
        st.epoch += 1
        st.step_in_epoch = st.seen = st.correct = 0
        st.loss_sum = st.epoch_train_seconds = 0.0
        self.run.write_metrics(st.history)
        self._save_checkpoint()
        self.run.write_status("running", self._summary())

    def evaluate(self, seqs: list[list[int]], labels: list[int], name: str) -> tuple[float, float]:
        bar = tqdm(total=len(seqs), desc=f"eval {name}", unit="review", leave=False, dynamic_ncols=True)
        logits = batched_logits(
            self.model,
            seqs,
            self.tokenizer.pad_token_id,
            self.cfg.train.eval_batch_size,
            self.device,
            bar,
            packed=self.packed_eval,
        )
        bar.close()
        return loss_and_accuracy(logits, labels)

    # ------------------------------------------------------------ checkpoints

    def _save_checkpoint(self) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                tensors[f"param/{n}"] = p.detach().cpu().contiguous()
        opt = self.optimizer.state_dict()
        for i, s in opt["state"].items():
            for k, v in s.items():
                tensors[f"opt/{i}/{k}"] = (
                    v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
                )
        tensors["rng/cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {
            "progress": json.dumps(self.state.__dict__),
            "param_groups": json.dumps(opt["param_groups"]),
            "version": __version__,
        }
        tmp = self.run.path / (CHECKPOINT + ".tmp")
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, self.run.path / CHECKPOINT)  # atomic: the old checkpoint stays valid until here

    def _load_checkpoint(self) -> None:
        from safetensors import safe_open

        path = self.run.path / CHECKPOINT
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata()
            tensors = load_file(path)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same user-facing problem
            raise UserError(f"--resume: cannot read {path} ({e})") from None
        self.state = Progress(**json.loads(meta["progress"]))
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, value in tensors.items():
                if key.startswith("param/"):
                    params[key[len("param/") :]].copy_(value)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt/"):
                _, i, k = key.split("/", 2)
                state.setdefault(int(i), {})[k] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        self._rng = {k: v for k, v in tensors.items() if k.startswith("rng/")}
        print(
            f"resuming {self.run.path} at epoch {self.state.epoch}, step {self.state.step_in_epoch}",
            flush=True,
        )

    def _restore_rng(self) -> None:
        torch.set_rng_state(self._rng["rng/cpu"])
        if "rng/cuda" in self._rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(self._rng["rng/cuda"], self.device)

    # ------------------------------------------------------------ the record

    def _summary(self, wall_seconds: float | None = None) -> dict[str, Any]:
        st, cfg, info = self.state, self.cfg, self.info
        best = next((r for r in st.history if r["epoch"] == st.best_epoch), None)
        mem, mem_kind = peak_memory(self.device)
        out = {
            "version": __version__,
            "model": cfg.model.name,
            "random_init": cfg.model.random_init,
            "method": cfg.train.method,
            **info,
            "trainable_percent": 100 * info["trainable_parameters"] / info["total_parameters"],
            "device": str(self.device)
            if self.device.type != "cuda"
            else torch.cuda.get_device_name(self.device),
            "train_path": (
                "packed (padding-free rows, block-diagonal attention)"
                if self.packed
                else "padded (dynamic padding)"
            )
            + (", torch.compile" if self.cfg.train.compile else ""),
            "eval_path": "packed" if self.packed_eval else "padded (length-sorted)",
            "precision": "bf16 autocast" if self.device.type == "cuda" else "fp32",
            "examples": {"train": len(self.train_ids), "val": len(self.val_ids), "test": len(self.test_ids)},
            "epochs_done": len(st.history),
            "best_epoch": st.best_epoch,
            "val_accuracy": best["val_accuracy"] if best else None,
            "test_accuracy": best.get("test_accuracy") if best else None,
            "test_loss": best.get("test_loss") if best else None,
            "train_seconds": sum(r["train_seconds"] for r in st.history),
            "data_seconds": self.data_seconds,
            "peak_memory_bytes": mem,
            "peak_memory_kind": mem_kind,
            "weights_bytes": self.run.weights_bytes(cfg.train.method),
        }
        if wall_seconds is not None:
            out["wall_seconds"] = wall_seconds
        return out


def loss_and_accuracy(logits: torch.Tensor, labels: list[int]) -> tuple[float, float]:
    y = torch.tensor(labels)
    return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def differing_fields(a: Config, b: Config, ignore: set[str]) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    out = []
    for sec in da:
        for k in da[sec]:
            if f"{sec}.{k}" not in ignore and da[sec][k] != db[sec][k]:
                out.append(f"{sec}.{k} ({da[sec][k]!r} saved, {db[sec][k]!r} given)")
    return out

"""The training recipe: `Trainer(cfg, out).fit()` (setup, then train) runs (or resumes) one run into its directory.

setup() is a sequence of steps, each checking what can fail before anything slow or anything on disk
happens: the run directory (fresh, overwritten or resumed, locked against a second process), the model
source and its position limit, the data, then the model and the optimizer. A failure during setup of a
fresh run removes what it created. train() is the loop: steps, evaluation at each epoch's end, the
checkpoint kept by validation accuracy, and the reports.

Resumable by construction: everything the loop's future depends on is in checkpoint.safetensors,
written every `checkpoint_every` steps, at each epoch's end and where Ctrl-C or SIGTERM stopped the
loop (stopping.py: at the step reached, or with the epoch's steps done when the stop came during its
evaluation), and the data order of an epoch is a function of (seed, epoch) alone, so a resumed run
takes exactly the steps an uninterrupted one takes.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..config import Config, Given, differing_fields, duration_seconds, inert_settings
from ..data.batches import to_device
from ..data.splits import load_splits
from ..data.tokcache import cached_encode
from ..data.tokenize import record_max_length
from ..errors import UserError, cannot_write, make_room, write_failure
from ..metrics import machine, peak_memory
from ..modeling.flat import batching_path, flat_note, flat_options_check
from ..modeling.forward import batched_logits, compile_encoder
from ..modeling.load import (
    check_max_length,
    check_model_source,
    check_vocabulary,
    load_tokenizer,
    resolve_device,
    software_versions,
)
from ..modeling.lora import build_model, check_targets_before_data
from ..modeling.merge import frozen_weights_to_bf16
from ..runs.report import write_plots, write_reports
from ..runs.rundir import RunDir, atomic_write_text, require_creatable
from .checkpoint import CHECKPOINT, Progress, load_checkpoint, restore_rng, save_checkpoint
from .distributed import Dist
from .ema import Ema
from .fused import fused_note
from .graphs import CapturedSteps, make_optimizer
from .posthoc import KeptLogits, after_training, load_eval_files
from .progress import saved_step
from .schedule import epoch_order, lr_at
from .step import train_step
from .step_rewrites import step_extras
from .stopping import STEPS, StopAtStepBoundary, StopRequested
from .timing import Phases
from .working import working_note

POSTFIX_EVERY = 25  # steps between reading the running loss back from the device (progress bar)


TRAIN_PATHS = {
    "padded": "padded (dynamic padding)",
    "packed": "packed (padding-free rows, block-diagonal attention)",
    "flat": "flat (one padding-free row per batch, per-review varlen attention)",
}
EVAL_PATHS = {"padded": "padded (length-sorted)", "packed": "packed", "flat": "flat (LoRA merged)"}


class Trainer:
    """One run: `Trainer(cfg, out).fit()` returns the run's summary (also in run.json)."""

    def __init__(
        self,
        cfg: Config,
        output_dir: str | os.PathLike,
        overwrite: bool = False,
        resume: bool = False,
        started: float | None = None,
        given: Given | None = None,
    ):
        """`started`: when the command began (time.monotonic; the CLI's entry), else now: the start of
        run.json's `time_breakdown`. `given`: the settings the command line typed and its --config
        file set (config.Given: the notes on settings left without effect name only those, each where
        it was written, and every refusal names a setting so; None: every setting off its default, by
        its flag)."""
        self.clock = Phases(started)
        self.cfg = cfg
        self.given = given
        self.named = given or Given()  # how refusals and notes name a setting: by flag, or file and key
        self.run = RunDir(output_dir)
        self.overwrite = overwrite
        self.resume = resume
        self.created = False  # whether this process created the run directory (removed if setup fails)
        self.made_dir = False  # whether this process's mkdir made it (an empty one is removed too)
        self.replaced: Path | None = None  # the run --overwrite replaces, kept aside until setup succeeds
        # --overwrite: the old run's lock, held from the check until the new run holds its own, so that
        # no `train --resume` (or second --overwrite) starts on the old run while this one loads its data
        self.old_lock: IO[str] | None = None
        self.dist = Dist.from_env()  # torchrun's data-parallel place; rank 0 of 1 otherwise
        self.checkpoint_step: int | None = None  # global step of the resume checkpoint on disk, once known
        # Between setup's guarded block and train's: "set up" (a replaced run still aside), then "dropping"
        # (the replaced run being removed); None before and after. fit() handles a stop in that gap.
        self.between: str | None = None
        # The kept weights' logits, from the epoch evaluation that chose them: calibration reads them
        # rather than evaluating the same weights again (None: after_training evaluates, as it must after
        # a resume past the best epoch or when each data-parallel rank evaluated a shard only).
        self.kept_logits: KeptLogits | None = None

    def fit(self) -> dict[str, Any]:
        """setup() then train(), under one handler: a Ctrl-C or SIGTERM that comes after setup's own
        handler is over and before train's has begun (with --overwrite, while the replaced run is
        removed) leaves the run as a stop in either does, not a folder with nothing to resume."""
        try:
            self.setup()
            return self.train()
        except KeyboardInterrupt as e:
            if self.between is None:
                raise  # setup's or train's handler has already said (or undone) what the stop left
            if self.between == "set up" and self.replaced is not None:
                self._abandon()  # the old run still whole: put back, as a stop during setup does
                raise
            try:
                raise self._stopped(e) from None
            finally:
                self.run.unlock()
                self.dist.close()

    # ------------------------------------------------------------ setup

    def setup(self) -> Trainer:
        self.clock.since_start("startup")
        with self.clock.timed("setup"):
            return self._setup()

    def _setup(self) -> Trainer:
        self.dist.check(self.cfg, self.named)
        device = self._where("train.device")  # a --config file's device is named by the file and key
        self.device = self.dist.start(resolve_device(self.cfg.train.device, device), device)
        # before the slow work: a flag left without effect is said at once
        for note in inert_settings(self.cfg, self.given):
            self._say(note)
        try:
            self._check_directory()
            # Read now, not when run.json is written: the checkout may change (a commit, a rebase) while
            # the run trains, and the record must name the code that ran.
            self.software = software_versions()
            self.dist.barrier()  # every rank has checked the directory before rank 0 creates it
            self._check_model_source()  # fail before the slow data loading
            self._setup_data()
        except BaseException:
            self._release_old_run()
            self.run.unlock()  # a resume's, taken by the check
            raise
        try:
            self._open_directory()
            self._setup_model()
            self._setup_optimizer()
            if self.dist.main:
                self.run.write_status("running", self._summary())
            self.between = "set up"  # the last statement: a stop from here on is fit()'s to handle
        except BaseException as e:
            self.between = None
            self._abandon()
            failure = write_failure(e)
            if failure is not None:  # a full disk: what to do, in one line
                raise UserError(self._setup_write_failed(failure)) from None
            raise
        self._drop_replaced()
        return self

    def _drop_replaced(self) -> None:
        """The new run is set up: only now is the run --overwrite replaces removed (once this has begun,
        a stop finishes it: the old run can no longer be put back whole)."""
        if self.replaced is not None:
            self.between = "dropping"
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None

    def _check_directory(self) -> None:
        """Decide between a fresh run and a resumed one; refuse to lose anything silently."""
        run = self.run
        self.resumed = False
        if self.resume and self.overwrite:
            raise UserError("--overwrite and --resume contradict each other; pass one")
        if self.resume:
            if not run.path.exists():
                raise UserError(f"--resume: {run.path} does not exist; give the run directory to continue")
            if self.dist.main:
                run.lock()  # before anything is read or written: a second process must not train here too
            try:
                self._check_resumable()
            except BaseException:
                run.unlock()
                raise
            self.resumed = True
        elif run.path.exists() and not run.path.is_dir():
            raise UserError(f"--output-dir {run.path} exists and is a file")
        elif run.path.exists() and any(run.path.iterdir()):
            self._check_replaceable()
            if self.dist.main:
                # --overwrite never pulls a directory from under a running process, nor lets one start
                # on it while this one loads its data: its lock is held until the new run has its own
                run.lock()
                self.old_lock = run.hand_over_lock()
        if not self.resume:
            require_creatable(run.path, "--output-dir")  # before the slow data loading

    def _check_resumable(self) -> None:
        """--resume: a run to continue, with the same settings (read under its lock, when rank 0)."""
        run = self.run
        if not run.is_resumable():
            raise UserError(f"--resume: {run.path} holds no resumable run (no {CHECKPOINT})")
        if run.status() == "finished":
            raise UserError(f"--resume: {run.path} is already finished; see {run.path / 'results.md'}")
        saved = Config.load(run.config_path, flag=None)
        self.saved_cfg = saved
        diff = differing_fields(saved, self.cfg)
        if diff:
            raise UserError(
                f"--resume continues {run.path} with its saved config.yaml; these settings differ: "
                + ", ".join(diff)
            )
        self.dist.check_resume(run.read_status(), run.path)

    def _check_replaceable(self) -> None:
        """A non-empty --output-dir: only --overwrite of a run directory may replace it."""
        run = self.run
        if not self.overwrite:
            hint = " or --resume to continue it" if run.is_resumable() else ""
            raise UserError(
                f"--output-dir {run.path} exists and is not empty; pass --overwrite to replace it{hint}"
            )
        if not run.is_run():
            raise UserError(
                f"--overwrite: {run.path} is not an imdb-lora run directory (no config.yaml or run.json); "
                "refusing to replace it"
            )
        if Path.cwd().resolve().is_relative_to(run.path.resolve()):
            raise UserError(f"--overwrite: {run.path} holds the current directory; refusing to replace it")

    def _release_old_run(self) -> None:
        if self.old_lock is not None:
            self.old_lock.close()  # closing releases the flock
            self.old_lock = None

    def _check_model_source(self) -> None:
        cfg, run = self.cfg, self.run
        self.base_dir = (
            run.path / "base_model" if (cfg.model.random_init and cfg.train.method == "lora") else None
        )
        # A resumed random-init run reloads its saved base rather than trusting RNG reproducibility.
        resumed_base = self.resumed and self.base_dir is not None and self.base_dir.is_dir()
        self.model_source = str(self.base_dir) if resumed_base else cfg.model.name
        check_model_source(self.model_source, cfg.model.random_init, self._where("model.name"))
        check_max_length(self.model_source, cfg.data.max_length, self.named)
        check_targets_before_data(self.model_source, cfg, self.named)

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.tokenizer = (
            load_tokenizer(str(self.run.tokenizer_dir), folder=True)
            if self.resumed
            else load_tokenizer(cfg.model.name, flag=self._where("model.name"))
        )
        check_vocabulary(self.model_source, self.tokenizer, self._where("model.name"))
        self._read_data()
        self.clock.add("data", self.data_seconds)
        self._say(
            f"data ready in {self.data_seconds:.0f} s: {len(self.train_ids):,} train, "
            f"{len(self.val_ids):,} val, {len(self.test_ids):,} test reviews"
        )

    def _read_data(self) -> None:
        """The splits read, tokenized (or found in the token cache) and the --eval-file files read."""
        cfg, d = self.cfg, self.cfg.data
        t0 = time.monotonic()
        splits = load_splits(d, cfg.train.seed, announce=self._say, where=self._where)
        self.data_source = splits.source
        self.examples_available = splits.available

        def tok(texts: list[str], split: str) -> list[list[int]]:
            bar = f"tokenize {split}" if self.dist.main else None  # shown only when not in the cache
            return cached_encode(
                self.tokenizer, texts, d.max_length, d.truncation, d.head_tokens, d.token_cache, bar
            )

        self.train_ids = tok(splits.train.texts, "train")
        self.val_ids = tok(splits.val.texts, "val")
        self.test_ids = tok(splits.test.texts, "test")
        self.train_y, self.val_y, self.test_y = splits.train.labels, splits.val.labels, splits.test.labels
        # reported after training; read now to fail early
        self.eval_files = load_eval_files(d.eval_files, self._where("data.eval_files"))
        self.data_seconds = time.monotonic() - t0

    def _where(self, key: str) -> str:
        """A note's name for a setting: its flag, or the --config file and key that set it (config.Given)."""
        return self.named.where(key)

    def _say(self, line: str) -> None:
        """A startup line on stderr, like the progress bars (stdout carries the results)."""
        if self.dist.main:
            print(line, file=sys.stderr, flush=True)

    def _open_directory(self) -> None:
        run = self.run
        if not self.dist.main:
            return  # rank 0 alone writes the run directory
        if self.resumed:
            run.recover()
            # The settings a resume may change (calibration, --eval-file, device...) are recorded, so
            # config.yaml stays the recipe of what the run did; written atomically, as it is read on resume.
            if differing_fields(self.saved_cfg, self.cfg, ignore=frozenset()):
                atomic_write_text(run.config_path, self.cfg.to_yaml())
            return
        if self.old_lock is not None:  # --overwrite, the old run's lock held since the check
            # Set aside, not deleted: a setup that fails later (or Ctrl-C) puts the old run back.
            self.replaced = run.path.with_name(f"{run.path.name}.replaced-{os.getpid()}")
            os.replace(run.path, self.replaced)
        try:
            run.path.parent.mkdir(parents=True, exist_ok=True)
            # Set before mkdir, not after: a stop between the two would leave the folder it made behind.
            # A stop before `created` below removes it, if still empty (_abandon).
            self.made_dir = not run.path.exists()
            run.path.mkdir()
        except FileExistsError:
            self.made_dir = False  # made by another process meanwhile: not this one's to remove
            # an empty folder is used as it is; another process's run is found under the lock below
        except OSError as e:
            raise UserError(f"--output-dir {run.path}: cannot create it ({e.strerror})") from None
        run.lock()  # another process that started on this folder meanwhile holds it: refused, naming it
        if any(p != run.lock_path for p in run.path.iterdir()):  # one that ran and ended meanwhile
            raise UserError(
                f"--output-dir {run.path} was written by another imdb-lora process while this one "
                "loaded its data; pass --overwrite to replace it"
            )
        self.created = True
        self._release_old_run()
        self.cfg.save(run.config_path)

    def _setup_model(self) -> None:
        with self.clock.timed("model"):
            self._load_model()

    def _load_model(self) -> None:
        """The model built (or loaded), on its device, its frozen weights cast, compiled if asked."""
        cfg = self.cfg
        self._say(f"loading model {self.model_source} ...")
        model, self.info = build_model(
            cfg,
            source=self.model_source,
            random_init=cfg.model.random_init and self.model_source == cfg.model.name,
            save_base_to=self.base_dir if not self.resumed and self.dist.main else None,
            given=self.named,
        )
        if not self.resumed and self.dist.main:
            self.tokenizer.save_pretrained(self.run.tokenizer_dir)
            record_max_length(self.run.tokenizer_dir, cfg.data.max_length)
        self.model = model.to(self.device)
        batching = self._where("train.batching")
        self.path = batching_path(cfg.train.batching, self.model, self.device, training=True, flag=batching)
        self.eval_path = batching_path(
            cfg.train.batching, self.model, self.device, training=False, flag=batching
        )
        t = cfg.train
        flat_options_check(
            self.model, self.path, t.compile, t.cuda_graphs, t.bf16_working_copies, t.fused_qkv, self._where
        )
        # The fast path on CUDA stores the frozen weights in bf16 once (autocast computes with bf16
        # copies of them anyway); LoRA, the head and the optimizer state stay fp32.
        self.bf16_base = self.path == "flat" and self.device.type == "cuda" and cfg.train.method == "lora"
        if self.bf16_base:
            frozen_weights_to_bf16(self.model)
        if cfg.train.compile:
            compile_encoder(self.model, flag=self._where("train.compile"))
        self.step_model = self.dist.wrap(self.model)  # DDP around the forward when data-parallel

    def _setup_optimizer(self) -> None:
        t = self.cfg.train
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Captured steps run the flat forward: only where the path is flat (--pooling mean is padded).
        graphs = t.cuda_graphs and self.device.type == "cuda" and self.path == "flat"
        if t.cuda_graphs and not graphs:  # asked for, but nothing to capture with here: say so
            self._say(
                f"{self._where('train.cuda_graphs')}: no effect on {self.device.type} with the {self.path} path (CUDA and flat only)"
            )
        self.optimizer = make_optimizer(self.params, t, self.device, captured=graphs)
        self.global_batch = t.batch_size * self.dist.world_size  # --batch-size is per process
        self.steps_per_epoch = math.ceil(len(self.train_ids) / self.global_batch)
        self.planned_steps = self.steps_per_epoch * t.epochs  # what the epochs alone would train
        # The schedule is laid over --max-steps where it cuts, so a capped run decays to its end too.
        self.total_steps = min(t.max_steps, self.planned_steps) if t.max_steps else self.planned_steps
        self.time_budget = duration_seconds(t.max_time) if t.max_time else None
        self.state = Progress()
        self.ema = Ema.for_model(self.model, t.ema_decay)
        self._rng: dict[str, torch.Tensor] = {}
        if self.resumed:
            self.state, self._rng = load_checkpoint(self.run.path / CHECKPOINT, self.model, self.optimizer)
            self.checkpoint_step = self.state.global_step
            if self.ema is not None:  # every rank holds the same average (same weights every step)
                self.ema.load_state_dict(self._rng)
            self._rng = self.dist.own_rng(self._rng)
            if self.dist.main:
                print(
                    f"resuming {self.run.path} at epoch {self.state.epoch}, step {self.state.step_in_epoch}",
                    flush=True,
                )
        self.working, self.fused = step_extras(
            self.model, self.path, self.device, t.bf16_working_copies, t.fused_qkv, self._say, self.named
        )
        self.captured = (
            CapturedSteps(
                self.model,
                self.optimizer,
                self.params,
                t,
                self.device,
                self.tokenizer.pad_token_id,
                t.batch_size,
                self.cfg.data.max_length,
                working=self.working,
                fused=self.fused,
            )
            if graphs
            else None
        )

    def _setup_write_failed(self, e: OSError) -> str:
        """A full disk (or a read-only one) while setting the run up, after _abandon has cleaned up."""
        run = self.run.path
        if self.resumed:
            left = (
                f"its files are kept; {make_room(e)}, then continue it with: {self.dist.resume_command(run)}"
            )
        elif self.replaced is not None:
            left = f"the run that was there is back as it was; {make_room(e)} or train elsewhere"
        else:
            left = f"nothing was left there; {make_room(e)} or train elsewhere"
        return f"--output-dir {run}: {cannot_write(e)} while setting the run up; {left}"

    def _abandon(self) -> None:
        """Setup failed: a fresh run leaves nothing behind; a resumed one keeps its files, unlocked."""
        if self.created:
            shutil.rmtree(self.run.path, ignore_errors=True)
        elif self.made_dir:  # stopped between mkdir and `created` (Ctrl-C there): the folder, if still empty
            self.run.remove_if_empty()
        if self.replaced is not None:
            try:
                os.replace(self.replaced, self.run.path)
            except OSError:  # another process made a run there in the instant the old one was aside
                print(f"imdb-lora: the replaced run is kept as {self.replaced}", file=sys.stderr)
        self._release_old_run()
        self.run.unlock()
        self.dist.close()

    # ------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        cfg, st = self.cfg.train, self.state
        try:
            self.between = None  # from here a stop is this handler's
            torch.manual_seed(cfg.seed + self.dist.rank)  # each rank its own dropout masks
            if self.resumed:
                restore_rng(self._rng, self.device)
            self.model.train()
            start = time.monotonic()
            # The first Ctrl-C or SIGTERM in an epoch lets the work reach a point where a checkpoint
            # can be written, writes it, then stops (stopping.py); data-parallel ranks agree on the
            # step (_stopping), and rank 0 alone says so.
            with StopAtStepBoundary(announce=self.dist.main) as stop:
                # A budget's cut ends the loop after the cut epoch's record; a resume from a checkpoint
                # written after the cut (a stop during that evaluation) evaluates it and trains no more.
                while st.epoch <= cfg.epochs and (st.ended_by is None or st.step_in_epoch > 0):
                    self._train_epoch(stop)
                    self._end_epoch(stop)
            if not self.dist.main:  # data-parallel: rank 0 calibrates and reports alone
                return self._summary(wall_seconds=time.monotonic() - start)
            with self.clock.timed("after_training"):
                post = after_training(self)  # calibration and --eval-file report, on the kept checkpoint
            summary = {**self._summary(wall_seconds=time.monotonic() - start), **post.summary}
            with self.clock.timed("reports"):
                write_plots(self.run, st.history, summary, reliability=post.bins)
            # up to here: results.md, the model card and run.json, written next, take milliseconds
            summary["time_breakdown"] = self.clock.breakdown()
            write_reports(self.run, self.cfg, st.history, summary)
            self.run.write_status("finished", summary)
            return summary
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM as the CLI raises it (a subclass: kept)
            raise self._stopped(e) from None
        except Exception as e:
            failure = write_failure(e)
            if failure is None:
                raise
            # A full disk: the run is left as Ctrl-C leaves it (resumable from its last checkpoint, or
            # removed, which also gives the space back), and the line says so.
            stopped = f"--output-dir {self.run.path}: {cannot_write(failure)}; {make_room(failure)} first: "
            raise UserError(stopped + self._interrupted()) from None
        finally:
            self.run.unlock()
            self.dist.close()

    def _stopped(self, e: KeyboardInterrupt) -> KeyboardInterrupt:
        """The stop to raise for Ctrl-C or SIGTERM once the run is set up: its line says what it left."""
        self._drop_replaced()  # a stop that cut the removal short: the rest goes too
        self.between = None  # handled: fit() passes it on as it is
        stop = type(e)(self._interrupted())
        stop.quiet = not self.dist.main  # torchrun signals every rank; rank 0 alone says where it stood
        return stop

    def _interrupted(self) -> str:
        """What Ctrl-C or SIGTERM leaves: a run to --resume (where it stood, its last checkpoint, the
        command) or, before the first checkpoint, nothing at all."""
        run = self.run
        if run.is_resumable():
            # read back: a second Ctrl-C may have cut the stop's save short just before or after its rename
            step = saved_step(run.path / CHECKPOINT)
            step = self.checkpoint_step if step is None else step
            saved = "" if step is None else f" (step {step:,})"
            return (
                f"training was at step {self.state.global_step:,} of {self.total_steps:,}; its last "
                f"checkpoint is {run.path / CHECKPOINT}{saved}; continue it with: {self.dist.resume_command(run.path)}"
            )
        if self.dist.main:  # no checkpoint: the folder could be neither resumed nor used
            shutil.rmtree(run.path, ignore_errors=True)
        return f"no checkpoint had been written yet, so there is nothing to resume; {run.path} was removed"

    def _train_epoch(self, stop: StopAtStepBoundary) -> None:
        cfg, st = self.cfg.train, self.state
        order = epoch_order(len(self.train_ids), cfg.seed, st.epoch)
        size = self.global_batch  # each rank trains on its shard of every batch (_step)
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        bar = tqdm(
            total=len(batches),
            initial=st.step_in_epoch,
            desc=f"epoch {st.epoch}/{cfg.epochs}",
            unit="step",
            dynamic_ncols=True,
            leave=False,
            disable=not self.dist.main,
        )
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # device-side sums, read back in bulk

        def flush() -> None:
            if pending:
                rows = self.dist.all_sum(torch.stack([torch.stack(p) for p in pending])).tolist()
                self._check_diverged("training", sum(r[0] for r in rows))  # the same on every rank: all stop
                for loss, correct in rows:  # step by step: the sums do not depend on where flushes fall
                    st.loss_sum += loss
                    st.correct += round(correct)
                pending.clear()
                bar.set_postfix(loss=f"{st.loss_sum / st.seen:.4f}", acc=f"{st.correct / st.seen:.3f}")

        t0 = time.monotonic()

        def steps_took() -> None:
            """The time since t0 to the epoch's training seconds and the clock's train_steps (the same
            figure: checkpoints written meanwhile are left out of both, and timed as saving)."""
            nonlocal t0
            now = time.monotonic()
            st.epoch_train_seconds += now - t0
            self.clock.add("train_steps", now - t0)
            t0 = now

        stop.doing = STEPS  # the first Ctrl-C or SIGTERM lets the step in flight finish and saves there
        todo = [] if st.ended_by else batches[st.step_in_epoch :]  # cut by a budget: evaluated only
        cut = False  # whether a budget cut it here (said once the bar is cleared)
        try:  # the bar is cleared before an interruption's message, not after it, at exit
            for idx in todo:
                pending.append(self._step(idx))
                st.seen += len(idx)
                st.step_in_epoch += 1
                st.global_step += 1
                bar.update(1)
                if len(pending) >= POSTFIX_EVERY:
                    flush()
                mid_epoch = st.step_in_epoch < len(batches)
                if cfg.checkpoint_every and st.step_in_epoch % cfg.checkpoint_every == 0 and mid_epoch:
                    flush()
                    steps_took()
                    self._save_checkpoint()
                    t0 = time.monotonic()
                self._after_step()
                if self._budget_spent():
                    cut = True
                    break
                if self._stopping(stop):
                    break
            flush()
            if self._stopping(stop):  # at a step boundary: the resume checkpoint of the step reached
                steps_took()
                self._save_checkpoint_once()
                raise stop.exception()
        finally:
            bar.close()
        steps_took()
        if cut:
            self._say(self._cut_line())

    def _budget_spent(self) -> bool:
        """Whether --max-steps or --max-time cuts training at this step boundary (then recorded in
        `ended_by`; _train_epoch says so). Not once the epochs' last step is done: they end the run then.
        Every data-parallel rank calls this at the same boundaries: --max-steps is the same on each,
        and for --max-time rank 0's clock decides, passed to the others by the stop's collective."""
        st, t = self.state, self.cfg.train
        if st.global_step >= self.planned_steps:
            return False
        if t.max_steps and st.global_step >= t.max_steps:
            st.ended_by = "max_steps"
        elif self.time_budget is not None and self._time_is_up():
            st.ended_by = "max_time"
        else:
            return False
        # A checkpoint written at this step (--checkpoint-every) predates the cut: a stop from here on
        # writes its own, holding `ended_by`, or a resume would train past the budget.
        self.checkpoint_step = None
        return True

    def _cut_line(self) -> str:
        st, t = self.state, self.cfg.train
        key, value = (
            ("train.max_steps", t.max_steps) if st.ended_by == "max_steps" else ("train.max_time", t.max_time)
        )
        return (
            f"{self._where(key)} {value} reached at step {st.global_step:,} (epoch {st.epoch}, "
            f"{st.step_in_epoch:,} of its {self.steps_per_epoch:,} steps): evaluating it, then finishing the run"
        )

    def _time_is_up(self) -> bool:
        up = self.dist.main and self._elapsed() >= self.time_budget
        if not self.dist.enabled:
            return up
        return bool(self.dist.agree_on_stop(int(up)))  # rank 0's 1 is every rank's MAX

    def _elapsed(self) -> float:
        """Seconds since the command's start (the CLI's entry; --max-time's origin). Tests replace it."""
        return time.monotonic() - self.clock.start

    def _stopping(self, stop: StopAtStepBoundary) -> bool:
        """Whether the loop stops at this boundary. One process decides alone; data-parallel ranks
        decide together (every rank calls this at the same boundaries), so that all stop after the same
        step, whichever of them the signal reached first. Checked at every step: on the host, a reduce
        of one number between the processes (Dist.agree_on_stop), no device sync."""
        if not self.dist.enabled:
            return stop.requested
        return stop.agree(self.dist.agree_on_stop)

    def _check_diverged(self, what: str, loss: float) -> None:
        """A NaN or infinite loss: the weights are lost (calibration's LBFGS then raised a traceback)."""
        if math.isfinite(loss):
            return
        cfg, st, named = self.cfg.train, self.state, self.named
        # each setting as it was given: `--lr`, or `train.lr in my.yaml`
        alpha = (
            f" or {named.said('lora.alpha')} (it is {self.cfg.lora.alpha:g})" if cfg.method == "lora" else ""
        )
        raise UserError(
            f"training diverged: the {what} loss became {loss} by step {st.global_step:,} (epoch "
            f"{st.epoch}); try a lower {named.said('train.lr')} (it is {cfg.lr:g}){alpha}"
        )

    def _step(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg.train
        idx, loss_scale = self.dist.shard_batch(idx)  # this rank's share; (idx, 1.0) in one process
        # built on the host, sent without a sync: the host queues this step while the device runs the last
        y = to_device(torch.tensor([self.train_y[i] for i in idx]), self.device)
        lr = lr_at(self.state.global_step, self.total_steps, cfg.lr, cfg.warmup_ratio)
        seqs = [self.train_ids[i] for i in idx]
        pad_id = self.tokenizer.pad_token_id
        out = train_step(
            self.step_model,
            self.optimizer,
            self.params,
            seqs,
            y,
            pad_id,
            self.device,
            self.path,
            lr,
            cfg,
            row_tokens=self.cfg.data.max_length,
            captured=self.captured,
            loss_scale=loss_scale,
            working=self.working,
            fused=self.fused,
        )
        if self.ema is not None:
            self.ema.update()
        return out

    def _after_step(self) -> None:
        """Hook after each optimizer step and its checkpoint (tests use it to simulate a crash)."""

    def _end_epoch(self, stop: StopAtStepBoundary) -> None:
        """The epoch's evaluation, then its record (best adapter, row, end-of-epoch checkpoint).

        A stop is taken in two ways, so that the checkpoint left always matches a state the loop was
        in: during the evaluation, which changes nothing, the pass stops after its batch in flight and
        the checkpoint of the epoch's steps is written (the evaluation is redone on --resume); once the
        record has begun (the adapter replaced, the row appended: the state has moved on), the record
        is finished up to the end-of-epoch checkpoint (a few writes) and the run stops there, so no
        epoch is evaluated or appended twice. Data-parallel ranks finish the evaluation (one can have a
        batch more than another: no boundary they all reach) and stop at the epoch's checkpoint."""
        t0 = time.monotonic()
        if self.dist.enabled:
            stop.doing, check = "finishing the epoch's evaluation, its record and its checkpoint", None
        else:
            stop.doing = "ending the evaluation after its batch in flight and keeping a checkpoint of the epoch's steps"
            check = stop.check
        try:
            with self.clock.timed("evaluation"):
                row, weights, score, logits = self._evaluate_epoch(check)
        except StopRequested:
            self._save_checkpoint_once()
            raise stop.exception() from None
        if not self.dist.enabled:
            stop.doing = "finishing the epoch's record and its checkpoint"
        with self.clock.timed("saving"):
            self._record_epoch(row, weights, score, t0, logits)
        if self._stopping(stop):
            raise stop.exception()

    def _save_checkpoint_once(self) -> None:
        """The resume checkpoint of where the loop stands, unless the last one is already there (a stop
        in an epoch's last step, or a resume from one, then a stop in its evaluation)."""
        if self.checkpoint_step != self.state.global_step:
            self._save_checkpoint()

    def _evaluate_epoch(
        self, check: Callable[[], None] | None
    ) -> tuple[dict[str, Any], str, float, dict[str, torch.Tensor | None]]:
        """The epoch's row of figures, the weights that won (raw or ema), their score and their logits
        ({"val": ..., "test": ...}: a split's whole logits, None where not read or read in shards). Changes no
        state, so a stop here (`check` raising after a batch) loses nothing but the evaluation: the
        LoRA merged for a flat pass (merge.merged_lora) and the average swapped in (Ema.applied) are
        undone by their `finally` as the stop leaves them, and since the first signal only sets a flag,
        nothing can raise in the middle of those swaps; the checkpoint then holds the raw weights."""
        st, cfg = self.state, self.cfg.train
        val_loss, val_acc, val_logits = self.evaluate(self.val_ids, self.val_y, "validation", check)
        logits = {"raw": {"val": val_logits, "test": None}, "ema": {"val": None, "test": None}}
        self._check_diverged("validation", val_loss)  # a last step's update can ruin the weights alone
        row = {
            "epoch": st.epoch,
            "train_loss": st.loss_sum / max(1, st.seen),
            "train_accuracy": st.correct / max(1, st.seen),
            "val_loss": val_loss,
            "val_accuracy": val_acc,
        }
        if st.step_in_epoch < self.steps_per_epoch:  # cut by a budget: what the figures cover
            row["steps"], row["steps_in_epoch"], row["train_reviews"] = (
                st.step_in_epoch,
                self.steps_per_epoch,
                st.seen,
            )
        if cfg.eval_test_each_epoch:
            row["test_loss"], row["test_accuracy"], logits["raw"]["test"] = self.evaluate(
                self.test_ids, self.test_y, "test", check
            )
        weights, score = "raw", val_acc
        if self.ema is not None:  # the average beside the raw weights; kept only if strictly better
            with self.ema.applied():
                row["ema_val_loss"], row["ema_val_accuracy"], logits["ema"]["val"] = self.evaluate(
                    self.val_ids, self.val_y, "validation (EMA)", check
                )
                if row["ema_val_accuracy"] > val_acc:
                    weights, score = "ema", row["ema_val_accuracy"]
                row["weights"] = weights
                # the test split is read for the average only when it is what will be saved (the raw
                # weights' test figures are in every row already)
                if weights == "ema" and score > st.best_val_accuracy and cfg.eval_test_each_epoch:
                    row["ema_test_loss"], row["ema_test_accuracy"], logits["ema"]["test"] = self.evaluate(
                        self.test_ids, self.test_y, "test (EMA)", check
                    )
        if check is not None:  # a stop after the last batch (during the sums) is still one during it
            check()
        return row, weights, score, logits[weights]

    def _record_epoch(
        self,
        row: dict[str, Any],
        weights: str,
        score: float,
        t0: float,
        logits: dict[str, torch.Tensor | None],
    ) -> None:
        """The best adapter, the epoch's row, the end-of-epoch checkpoint: a stop meanwhile waits for
        the checkpoint (a resume from any earlier one would evaluate this epoch again). `logits`: the
        winning weights' (_evaluate_epoch), kept in memory with them for the calibration."""
        st = self.state
        if score > st.best_val_accuracy:  # strictly better: ties keep the earlier, cheaper epoch
            st.best_val_accuracy, st.best_epoch, st.best_weights = score, st.epoch, weights
            self._save_weights(weights)
            # replaced (or dropped) with the weights: an earlier epoch's logits must never stand in
            self.kept_logits = KeptLogits.of(st.epoch, weights, logits["val"], logits["test"])
        row["train_seconds"] = st.epoch_train_seconds
        row["eval_seconds"] = time.monotonic() - t0
        row["lr_end"] = float(self.optimizer.param_groups[0]["lr"])  # a tensor for captured steps
        st.history.append(row)
        if self.dist.main:
            self._print_epoch(row)
        st.epoch += 1
        st.step_in_epoch = st.seen = st.correct = 0
        st.loss_sum = st.epoch_train_seconds = 0.0
        if self.dist.main:
            self.run.write_metrics(st.history)
        self._save_checkpoint()
        if self.dist.main:
            self.run.write_status("running", self._summary())

    def _print_epoch(self, row: dict[str, Any]) -> None:
        st, val_loss, val_acc = self.state, row["val_loss"], row["val_accuracy"]
        print(
            f"epoch {st.epoch}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
            f"val loss {val_loss:.4f} acc {val_acc:.4f}"
            + (f" | test acc {row['test_accuracy']:.4f}" if "test_accuracy" in row else "")
            + (f" | EMA val acc {row['ema_val_accuracy']:.4f}" if "ema_val_accuracy" in row else "")
            + (f" test acc {row['ema_test_accuracy']:.4f}" if "ema_test_accuracy" in row else "")
            + f" | {row['train_seconds']:.1f}s train, {row['eval_seconds']:.1f}s eval"
            + (" *best*" if st.best_epoch == st.epoch else ""),
            flush=True,
        )

    def _save_weights(self, weights: str) -> None:
        """Save the epoch's winning weights (rank 0's: nothing is evaluated here)."""
        if not self.dist.main:
            return
        if weights == "raw":
            self.run.save_weights(self.model, self.cfg.train.method)
            return
        with self.ema.applied():
            self.run.save_weights(self.model, self.cfg.train.method)

    def evaluate(
        self,
        seqs: list[list[int]],
        labels: list[int],
        name: str,
        after_batch: Callable[[], None] | None = None,
    ) -> tuple[float, float, torch.Tensor | None]:
        """Loss and accuracy over the whole split (each rank evaluates its shard when data-parallel),
        and the split's logits (CPU, input order; None when data-parallel: this rank's shard only)."""
        seqs, labels = self.dist.shard(seqs), self.dist.shard(labels)
        logits = self.eval_logits(seqs, name, after_batch)
        loss, accuracy = self.dist.loss_and_accuracy(logits, labels)
        return loss, accuracy, None if self.dist.enabled else logits

    def eval_logits(
        self, seqs: list[list[int]], name: str, after_batch: Callable[[], None] | None = None
    ) -> torch.Tensor:
        """`after_batch`: called after each batch; what it raises ends the pass (a stop, see _end_epoch)."""
        bar = tqdm(
            total=len(seqs),
            desc=f"eval {name}",
            unit="review",
            leave=False,
            dynamic_ncols=True,
            disable=not self.dist.main,
        )
        try:  # cleared before a stop's message, not after it, at exit
            return batched_logits(
                self.model,
                seqs,
                self.tokenizer.pad_token_id,
                self.cfg.train.eval_batch_size,
                self.device,
                bar,
                packed=self.eval_path,
                after_batch=after_batch,
            )
        finally:
            bar.close()

    def _save_checkpoint(self) -> None:
        with self.clock.timed("saving"):
            others = self.dist.gather_rng(self.device)  # collective: every rank takes part
            if self.dist.main:
                extra = {**others, **(self.ema.state_dict() if self.ema is not None else {})}
                save_checkpoint(
                    self.run.path / CHECKPOINT, self.model, self.optimizer, self.state, self.device, extra
                )
        self.checkpoint_step = self.state.global_step

    # ------------------------------------------------------------ the record

    def _summary(self, wall_seconds: float | None = None) -> dict[str, Any]:
        st, cfg, info = self.state, self.cfg, self.info
        best = next((r for r in st.history if r["epoch"] == st.best_epoch), None)
        kept = "ema_" if st.best_weights == "ema" else ""  # the figures of the weights that were saved
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
            "train_path": TRAIN_PATHS[self.path]
            + (flat_note(self.model) if self.path == "flat" else "")
            + (", CUDA graphs" if self.captured is not None else "")
            + (", bf16 frozen weights" if self.bf16_base else "")
            + (f", {working_note(self.working)}" if self.working is not None else "")
            + (f", {fused_note()}" if self.fused is not None else "")
            + (", torch.compile" if self.cfg.train.compile else ""),
            "eval_path": EVAL_PATHS[self.eval_path],
            "precision": "bf16 autocast" if self.device.type == "cuda" else "fp32",
            "world_size": self.dist.world_size,
            "global_batch_size": cfg.train.batch_size * self.dist.world_size,
            "examples": {"train": len(self.train_ids), "val": len(self.val_ids), "test": len(self.test_ids)},
            "examples_available": self.examples_available,
            "epochs_done": len(st.history),
            "steps_done": st.global_step,
            "total_steps": self.total_steps,
            "ended_by": st.ended_by or "epochs",  # what ended training: epochs, max_steps or max_time
            "max_steps": cfg.train.max_steps,
            "max_time": cfg.train.max_time,
            "best_epoch": st.best_epoch,
            "kept_weights": st.best_weights,
            "ema_decay": cfg.train.ema_decay,
            "val_accuracy": best[kept + "val_accuracy"] if best else None,
            "test_accuracy": best.get(kept + "test_accuracy") if best else None,
            "test_loss": best.get(kept + "test_loss") if best else None,
            "train_seconds": sum(r["train_seconds"] for r in st.history),
            "data_seconds": self.data_seconds,
            "peak_memory_bytes": mem,
            "peak_memory_kind": mem_kind,
            "weights_bytes": self.run.weights_bytes(cfg.train.method),
            "data_source": self.data_source,
            "software": self.software,
        }
        if wall_seconds is not None:
            out["wall_seconds"] = wall_seconds
            out["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            out["machine"] = machine()
        return out

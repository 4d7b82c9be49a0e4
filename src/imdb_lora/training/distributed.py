"""Data-parallel training: one process per device under torchrun, gradients averaged by DDP.

`torchrun --nproc-per-node N -m imdb_lora train ...` starts N copies of `train` and tells each where it
stands through the environment (WORLD_SIZE, RANK, LOCAL_RANK, and MASTER_ADDR/MASTER_PORT for the
rendezvous); `accelerate launch` sets the same variables, so it works the same way. Without them (or
with WORLD_SIZE=1) everything here is a no-op and training is the plain single-process loop.

How a data-parallel run computes exactly what one process computes with the same global batch:
- every rank builds the same global batches (`--batch-size` x world size reviews, in the order that
  is a function of (seed, epoch) alone) and takes every world-size-th review of each: disjoint shards;
- each rank's loss is scaled by its share of the global batch, so DDP's average of the gradients is the
  gradient of the global batch's mean loss, also for a last batch that does not split evenly (a rank
  with no review at all steps on a stand-in review that weighs zero: DDP needs every rank in every step);
- evaluation is sharded the same way, and the sums of the loss and of the correct answers are
  all-reduced, so the figures are those of the whole split;
- only rank 0 writes (run directory, checkpoints, metrics, lock) and shows progress; the checkpoint holds
  every rank's RNG state, so a resumed run continues every rank exactly (with the same world size).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Given
from ..errors import UserError, counted
from ..metrics import loss_and_accuracy
from ..modeling.forward import forward_logits

ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass
class Dist:
    """This process's place in a data-parallel run (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started: bool = False  # whether this object initialised the process group (and must destroy it)
    device: torch.device | None = None  # this process's device, once start() has run
    local_world_size: int | None = None  # processes on this machine (torchrun's LOCAL_WORLD_SIZE)
    stop_group: Any = None  # the group agree_on_stop reduces in (None: the default one, gloo on CPU)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Dist:
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            rank, world, local = (int(env.get(k, "0")) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        except ValueError:
            raise UserError(
                "WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun); got "
                + ", ".join(f"{k}={env.get(k)!r}" for k in ENV_VARS)
            ) from None
        if world < 1 or not 0 <= rank < world or local < 0:
            raise UserError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
        local_world = env.get("LOCAL_WORLD_SIZE", "")  # not set by every launcher; only for the resume hint
        return cls(rank, world, local, local_world_size=int(local_world) if local_world.isdigit() else None)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes files and shows progress."""
        return self.rank == 0

    def resume_command(self, run_dir: Path) -> str:
        """The command that continues run_dir. A data-parallel run needs a launch with as many processes
        (its checkpoint holds each rank's RNG state): on one machine, the torchrun line that does it."""
        train = f"train --output-dir {shlex.quote(str(run_dir))} --resume"
        if not self.enabled:
            return f"imdb-lora {train}"
        if self.local_world_size == self.world_size:  # all processes on one machine
            return f"torchrun --nproc-per-node {self.world_size} -m imdb_lora {train}"
        return f"torchrun -m imdb_lora {train}, launched as before ({self.world_size} processes in all)"

    def check(self, cfg, given: Given | None = None) -> None:
        """Settings that cannot run data-parallel, refused before anything starts, each named as it was
        given (config.Given: by its flag, or by the --config file and key that set it)."""
        given = given or Given()

        def drop(key: str) -> str:  # a flag is dropped; a file's key is turned off where it is set
            return "set it false there" if given.from_file(key) else "drop the flag"

        if self.enabled and cfg.train.cuda_graphs:
            raise UserError(
                f"{given.where('train.cuda_graphs')} does not run under torchrun: DDP's gradient all-reduce "
                f"happens outside the captured graph; {drop('train.cuda_graphs')} "
                f"({given.name('train.batching', 'flat')} itself works)"
            )
        if self.enabled and cfg.train.bf16_working_copies:
            raise UserError(
                f"{given.where('train.bf16_working_copies')} does not run under torchrun: DDP's gradient "
                "all-reduce watches the fp32 parameters, and the step's gradients reach their working "
                f"copies; {drop('train.bf16_working_copies')}"
            )

    # ------------------------------------------------------------ process group

    def start(self, device: torch.device, flag: str = "--device") -> torch.device:
        """Join the process group (NCCL on CUDA, gloo on CPU); return this process's device. `flag`: the
        device setting as given (`--device`, or a --config file's `my.yaml: train.device`)."""
        if not self.enabled:
            return device
        if device.type == "cuda":
            if device.index is not None:
                fix = (
                    f"pass {flag} cuda (or auto)"
                    if flag.startswith("--")
                    else "set it to cuda (or auto) there"
                )
                raise UserError(
                    f"{flag} {device}: under torchrun each process takes the GPU of its LOCAL_RANK; {fix}"
                )
            if self.local_rank >= torch.cuda.device_count():
                raise UserError(
                    f"LOCAL_RANK {self.local_rank} but only {counted(torch.cuda.device_count(), 'GPU')} here: "
                    "start at most one process per GPU (torchrun --nproc-per-node)"
                )
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.started = True
        if dist.get_backend() != "gloo":
            # agree_on_stop runs at every step: a gloo group beside NCCL reduces a CPU tensor between
            # the hosts, where an NCCL reduce would be read back from the device, a host sync per step
            # that drains the queue of launched work (creating a group is collective: every rank, here)
            self.stop_group = dist.new_group(backend="gloo")
        self.device = device
        return device

    def close(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.started = False

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            on_gpu = self.device is not None and self.device.type == "cuda"
            dist.barrier(device_ids=[self.device.index] if on_gpu else None)

    # ------------------------------------------------------------ the model

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module a training step runs: the model itself, or DDP around its forward."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # device_ids=None: inputs are plain token lists, moved to the device by forward_logits itself.
        # Every trainable parameter (LoRA matrices, their biases, the head in modules_to_save) takes part
        # in every forward, so DDP needs no search for unused parameters (find_unused_parameters=False).
        return DistributedDataParallel(LogitsForward(model), device_ids=None)

    # ------------------------------------------------------------ the data

    def shard(self, items: list) -> list:
        """This rank's disjoint share: every world-size-th item, starting at the rank."""
        return items[self.rank :: self.world_size] if self.enabled else items

    def shard_batch(self, idx: list[int]) -> tuple[list[int], float]:
        """This rank's share of a global batch and its loss scale (1.0 when not distributed).

        DDP averages gradients over ranks; scaling each rank's mean loss by n_rank * world / n_global
        turns that average into the gradient of the global batch's mean loss, however it splits. A rank
        left without a review takes a stand-in with scale 0: it must still run the step DDP syncs on.
        """
        if not self.enabled:
            return idx, 1.0
        mine = self.shard(idx)
        if not mine:
            return idx[:1], 0.0
        return mine, len(mine) * self.world_size / len(idx)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over all ranks (on the communication device; `t` itself is unchanged)."""
        if not self.enabled:
            return t
        import torch.distributed as dist

        out = t.detach().to(self.device, torch.float64, copy=True)
        dist.all_reduce(out)
        return out.to(t.device)

    def agree_on_stop(self, signum: int) -> int:
        """The largest signal number any rank passes (0: none), returned on every rank: the stop all
        ranks take at this step boundary (training.stopping). Collective, at the same boundaries on
        every rank; on the host (a CPU tensor, in stop_group), so it never waits for the device."""
        if not self.enabled:
            return signum
        import torch.distributed as dist

        flag = torch.tensor([signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.stop_group)
        return int(flag.item())

    def loss_and_accuracy(self, logits: torch.Tensor, labels: list[int]) -> tuple[float, float]:
        """Mean loss and accuracy over the whole split, from this rank's shard of it."""
        if not self.enabled:
            return loss_and_accuracy(logits, labels)
        y = torch.tensor(labels, dtype=torch.long)
        local = torch.tensor(
            [
                F.cross_entropy(logits, y, reduction="sum").item() if len(labels) else 0.0,
                (logits.argmax(-1) == y).sum().item() if len(labels) else 0.0,
                float(len(labels)),
            ],
            dtype=torch.float64,
        )
        loss_sum, correct, n = self.all_sum(local).tolist()
        return loss_sum / n, correct / n

    # ------------------------------------------------------------ resume

    def check_resume(self, saved: dict[str, Any], path: os.PathLike) -> None:
        """A run resumes only with the world size it was trained with: it decides every step's batch."""
        try:
            was = int(saved.get("world_size", 1))
        except (TypeError, ValueError):
            raise UserError(
                f"--resume: {path}/run.json holds world_size {saved.get('world_size')!r}, not a number of processes"
            ) from None
        if was != self.world_size:
            raise UserError(
                f"--resume: {path} was trained by {counted(was, 'process', 'processes')} and this launch "
                f"has {self.world_size}; resume with the same number (torchrun --nproc-per-node x nodes = {was}), since the "
                "world size decides each step's batch"
            )

    def gather_rng(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every other rank's RNG state (`rng/rank{r}/cpu|cuda`), for rank 0's checkpoint. Collective."""
        if not self.enabled:
            return {}
        import torch.distributed as dist

        states = [torch.get_rng_state()]
        if device.type == "cuda":
            states.append(torch.cuda.get_rng_state(device))
        flat = torch.cat(states).to(self.device)  # same sizes on every rank (same torch build)
        gathered = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(gathered, flat)
        out: dict[str, torch.Tensor] = {}
        n_cpu = states[0].numel()
        for r, g in enumerate(gathered):
            if r == 0:
                continue  # rank 0's own state is the checkpoint's rng/cpu (and rng/cuda)
            g = g.cpu()
            out[f"rng/rank{r}/cpu"] = g[:n_cpu].clone()
            if len(states) > 1:
                out[f"rng/rank{r}/cuda"] = g[n_cpu:].clone()
        return out

    def own_rng(self, rng: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The saved RNG state of this rank, under the keys restore_rng reads."""
        if self.rank == 0:
            return rng
        prefix = f"rng/rank{self.rank}/"
        mine = {"rng/" + k[len(prefix) :]: v for k, v in rng.items() if k.startswith(prefix)}
        if "rng/cpu" not in mine:
            raise UserError(f"--resume: the checkpoint holds no RNG state for rank {self.rank}")
        return mine


class LogitsForward(nn.Module):
    """forward_logits as a module. DDP wraps this, not the model, so the packed forward (which calls
    the encoder directly) runs inside DDP's forward too; the parameters are the model's own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, seqs, pad_id, device, packed, row_tokens=None) -> torch.Tensor:
        return forward_logits(self.model, seqs, pad_id, device, packed, row_tokens=row_tokens)


def step_logits(model: nn.Module, seqs, pad_id, device, packed, row_tokens=None) -> torch.Tensor:
    """The training forward: through DDP when the model is wrapped by Dist.wrap, else forward_logits."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model(seqs, pad_id, device, packed, row_tokens)
    return forward_logits(model, seqs, pad_id, device, packed, row_tokens=row_tokens)

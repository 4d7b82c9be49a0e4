"""Batches of token ids: dynamic padding, length-sorted and token-budget batches, packed rows.

Batches are built on the host and sent to the device with `to_device`: from pinned memory on CUDA, so
the copy is queued behind the device's work instead of making the host wait for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host-device sync: on CUDA the tensor is staged in pinned
    memory first. A copy from pageable memory makes the host wait until the stream has finished all
    work queued before it (the previous training step), so batch preparation never overlapped the
    device; from pinned memory the copy is queued like a kernel. PyTorch's caching host allocator keeps
    the pinned block alive until the copy is done (it records an event on the copy's stream), so the
    staging tensor may be dropped at once. Elsewhere: `t.to(device)` (the tensor itself on the CPU)."""
    if device.type == "cuda":
        return pinned(t).to(device, non_blocking=True)
    return t.to(device)


def pinned(t: torch.Tensor) -> torch.Tensor:
    """`t` in pinned (page-locked) host memory: the source of an asynchronous copy to a CUDA device.
    Without a CUDA runtime (a CUDA build on a machine without a GPU, whose tests run the CUDA branches
    on fake tensors) there is nothing to pin with: `t` itself."""
    if t.is_pinned() or not can_pin():
        return t
    return t.pin_memory()


def can_pin() -> bool:
    """Whether page-locked memory can be had here: a CUDA runtime with a device."""
    return torch.cuda.is_available()


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic padding to the longest sequence of the batch: (input_ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


# Padded tokens per forward pass at inference (`--max-batch-tokens`), by device type. On a CPU a few
# thousand tokens already fill the cores, and a larger pass only adds padding and cache misses; a GPU
# needs many rows in flight to be busy.
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 2048, "cuda": 32768}


def default_max_batch_tokens(device_type: str) -> int:
    return DEFAULT_MAX_BATCH_TOKENS.get(device_type, DEFAULT_MAX_BATCH_TOKENS["cpu"])


def token_budget_batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Length-sorted batches of at most batch_size rows and max_tokens padded tokens.

    On a CPU a large batch buys little parallelism but pays for padding to its longest review; capping
    the padded size keeps long and short reviews in separate, nearly padding-free batches.
    """
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = batches[-1] if batches else None
        # the batch's first review is its longest, so its padded width is known
        if b and len(b) < batch_size and (len(b) + 1) * lengths[b[0]] <= max_tokens:
            b.append(i)
        else:
            batches.append([i])
    return batches


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (longest first), so padding is small at inference."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [rows, width]
    position_ids: torch.Tensor  # [rows, width]
    segments: torch.Tensor  # [rows, width]: index of the review in the batch, -1 for padding
    rows: torch.Tensor  # [n]: row of each review's first token, in input order
    offsets: torch.Tensor  # [n]: column of each review's first token

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(*(to_device(t, device) for t in vars(self).values()))

    @property
    def real_tokens(self) -> int:
        return int((self.segments >= 0).sum())


def pack(seqs: Sequence[Sequence[int]], row_tokens: int, pad_id: int, position_start: int) -> PackedBatch:
    """First-fit decreasing: longest reviews first, each into the first row with room."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    rows: list[list[int]] = []  # review indices per row
    room: list[int] = []
    for i in order:
        n = len(seqs[i])
        if n > row_tokens:
            raise ValueError(f"a sequence of {n} tokens does not fit rows of {row_tokens}")
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(row_tokens - n)
    width = max(row_tokens - free for free in room)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.full((len(rows), width), position_start, dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    first_row = torch.empty(len(seqs), dtype=torch.long)
    first_col = torch.empty(len(seqs), dtype=torch.long)
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            n = len(seqs[i])
            ids[r, col : col + n] = torch.tensor(seqs[i], dtype=torch.long)
            pos[r, col : col + n] = torch.arange(position_start, position_start + n)
            seg[r, col : col + n] = i
            first_row[i], first_col[i] = r, col
            col += n
    return PackedBatch(ids, pos, seg, first_row, first_col)


FLAT_BUCKET = 512  # a flat row's length is rounded up to a multiple of this, so step shapes repeat


@dataclass
class FlatBatch:
    """A batch's reviews concatenated into one row [1, width], no padding between them.

    cu_seqlens [n + 2] (int32) marks where each review starts and ends, then the padding tail that
    rounds the row up to its bucket, which is one more segment (it attends only to itself and is never
    read). starts [n]: each review's first token, in input order.
    """

    input_ids: torch.Tensor  # [1, width]
    position_ids: torch.Tensor  # [1, width]: restart at each review
    cu_seqlens: torch.Tensor  # [n + 2], int32
    starts: torch.Tensor  # [n]
    max_len: int  # longest segment (padding tail included): the kernel's max_seqlen
    real_tokens: int

    def to(self, device: torch.device) -> FlatBatch:
        t = (self.input_ids, self.position_ids, self.cu_seqlens, self.starts)
        return FlatBatch(*(to_device(x, device) for x in t), self.max_len, self.real_tokens)

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]


def flat_width(tokens: int, bucket: int = FLAT_BUCKET) -> int:
    """The bucket a row of `tokens` real tokens goes to: the next multiple of bucket above it, so the
    padding tail always has at least one token (an empty segment is not given to the kernel)."""
    return (tokens // bucket + 1) * bucket


def flatten(
    seqs: Sequence[Sequence[int]], pad_id: int, position_start: int, bucket: int = FLAT_BUCKET
) -> FlatBatch:
    """Concatenate reviews in input order into one row; positions restart at position_start for each."""
    lengths = [len(s) for s in seqs]
    total = sum(lengths)
    width = flat_width(total, bucket)
    ids = torch.full((1, width), pad_id, dtype=torch.long)
    ids[0, :total] = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    bounds = torch.tensor([0, *lengths, width - total], dtype=torch.long).cumsum(0)
    # position of token j: j minus the start of its segment, plus the model's first position
    segment = torch.repeat_interleave(torch.arange(len(lengths) + 1), torch.tensor([*lengths, width - total]))
    pos = torch.arange(width) - bounds[segment] + position_start
    pos[total:] = position_start  # the tail is never read; a constant stays inside any position table
    return FlatBatch(
        ids,
        pos.unsqueeze(0),
        bounds.to(torch.int32),
        bounds[:-2].clone(),
        max(max(lengths), width - total),
        total,
    )


def flat_token_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive index batches of at most max_tokens real tokens (at least one review each), in input
    order: flat rows have no padding to save by sorting, and near-full rows fall into few buckets."""
    batches: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if batches[-1] and used + n > max_tokens:
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += n
    return [b for b in batches if b]

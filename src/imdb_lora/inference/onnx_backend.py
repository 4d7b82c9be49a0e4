"""The ONNX backend: an onnxruntime session with the torch model's batched_logits interface."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.batches import default_max_batch_tokens, pad_batch, token_budget_batches
from ..errors import UserError
from ..extras import require

if TYPE_CHECKING:
    import torch


# ---------------------------------------------------------------- the ONNX backend


class OnnxModel:
    """An onnxruntime session that turns token-id sequences into fp32 logits, like model.batched_logits."""

    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        require("onnx", f"the ONNX export {path.parent}", ("onnxruntime",))
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Default: onnxruntime's own choice (one thread per physical core); env override for shared hosts.
        threads = threads or int(os.environ.get("IMDB_LORA_ORT_THREADS", "0"))
        if threads > 0:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad or missing files
            raise UserError(
                f"cannot load ONNX model {path.name}: {type(e).__name__}; export the run again"
            ) from None
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        import numpy as np
        import torch

        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        (logits,) = self.session.run(["logits"], {k: v for k, v in feed.items() if k in self.inputs})
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))

    def batched_logits(
        self,
        seqs: list[list[int]],
        pad_id: int,
        batch_size: int,
        progress=None,
        max_tokens: int | None = None,
    ) -> torch.Tensor:
        """fp32 logits in input order; length-sorted batches of at most max_tokens padded tokens (default:
        the CPU's): on a 2-core CPU, 4 full-length reviews already fill the cores, and smaller calls of
        similar length waste no compute on padding."""
        import torch

        out: torch.Tensor | None = None
        budget = max_tokens or default_max_batch_tokens("cpu")
        for idx in token_budget_batches([len(s) for s in seqs], batch_size, budget):
            ids, mask = pad_batch([seqs[i] for i in idx], pad_id)
            logits = self(ids, mask)
            if out is None:
                out = torch.empty((len(seqs), logits.shape[-1]), dtype=torch.float32)
            out[idx] = logits
            if progress is not None:
                progress.update(len(idx))
        return out if out is not None else torch.empty((0, 2))

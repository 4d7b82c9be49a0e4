"""ONNX export of a merged model folder: trace, fuse (onnxruntime's transformer optimizer), int8."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..inference.exported import ONNX_FILE

if TYPE_CHECKING:
    import torch

OPSET = 17

log = logging.getLogger(__name__)

# onnxruntime's transformer optimizer knows BERT-style graphs; roberta and mpnet share that layout
# (mpnet's relative attention bias simply does not fuse, and the rest still does).
_ORT_MODEL_TYPE = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "camembert": "bert",
    "mpnet": "bert",
}

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- ONNX


def export_onnx(
    merged: Path,
    stage: Path,
    quantize: str | None,
    pooling: str = "cls",
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """model.onnx in `stage` from the merged folder: export, fuse, and optionally quantize.

    The traced forward is the project's own (padded_logits), so --pooling mean is part of the graph.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    from ..modeling.forward import padded_logits
    from ..modeling.pooling import set_pooling

    class LogitsOnly(torch.nn.Module):
        """The classifier with a plain (input_ids, attention_mask) -> logits signature for tracing."""

        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return padded_logits(self.model, input_ids, attention_mask)

    # Eager attention traces to the MatMul/Softmax pattern that onnxruntime fuses into one Attention op;
    # the SDPA graph does not fuse (measured: no Attention fusion, and slower).
    model = AutoModelForSequenceClassification.from_pretrained(
        merged, attn_implementation="eager", use_safetensors=True, trust_remote_code=False
    ).eval()
    set_pooling(model, pooling)
    raw, fused = stage / "raw.onnx", stage / "fused.onnx"
    say("exporting to ONNX ...")
    exporter = _torch_export(LogitsOnly(model), raw)
    say("fusing attention, LayerNorm and GELU (onnxruntime transformer optimizer) ...")
    fusions = _fuse(raw, fused, model.config)
    current = fused if fusions is not None else raw
    info: dict[str, Any] = {"exporter": exporter, "opset": OPSET, "fusions": fusions or {}}
    if quantize == "int8":
        say("quantizing the weight MatMuls to int8 ...")
        info["quantization"] = _quantize_int8(current, stage / ONNX_FILE)
    else:
        os.replace(current, stage / ONNX_FILE)
    for tmp in (raw, fused):
        tmp.unlink(missing_ok=True)
    return info


def _dummy_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    # Two rows of different length, so the mask really masks and no shape is traced as a constant.
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 9, 2, 1]], dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.long)
    return ids, mask


def _torch_export(module: torch.nn.Module, path: Path) -> str:
    """The TorchScript exporter first (fast, and its graphs fuse); the dynamo exporter where it is gone."""
    import torch

    args = _dummy_inputs()
    common = dict(input_names=["input_ids", "attention_mask"], output_names=["logits"], opset_version=OPSET)
    # Deprecation and tracer warnings are about the exporter, not the model: keep them off the console.
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
            torch.onnx.export(
                module, args, str(path), dynamo=False, dynamic_axes={**axes, "logits": {0: "batch"}}, **common
            )
            return "torchscript"
        except Exception as e:  # a torch without the TorchScript exporter: use the dynamo one
            log.info("TorchScript ONNX export failed (%s); trying the dynamo exporter", e)
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        torch.onnx.export(
            module, args, str(path), dynamo=True, external_data=False, dynamic_shapes=shapes, **common
        )
        return "dynamo"


def _fuse(raw: Path, out: Path, config) -> dict[str, int] | None:
    """onnxruntime's transformer fusions (Attention, SkipLayerNorm, BiasGelu); None if not applicable."""
    ort_type = _ORT_MODEL_TYPE.get(config.model_type)
    if ort_type is None:
        return None
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        with _quiet():
            opt = optimize_model(
                str(raw),
                model_type=ort_type,
                num_heads=config.num_attention_heads,
                hidden_size=config.hidden_size,
            )
    except Exception as e:  # an unfamiliar graph: the unfused model is still correct, only slower
        log.warning("onnxruntime transformer optimizer failed (%s); keeping the unfused graph", e)
        return None
    opt.save_model_to_file(str(out))
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


def _quantize_int8(src: Path, dest: Path) -> dict[str, Any]:
    """Dynamic int8 of the weight MatMuls (per output channel); activations are quantized per batch.

    The fused Attention op and the classifier head stay fp32. Measured on 1,000 IMDB test reviews with a
    MiniLM run (docs/performance.md): quantizing Attention too (QAttention) cost 0.8-1.2 accuracy
    points, the MatMuls alone 0.3 or less. The embedding lookup is left alone: it costs no compute.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    head = [n.name for n in graph.node if "classifier" in n.name]
    with _quiet(), _full_disk_as_oserror(src):
        quantize_dynamic(
            str(src),
            str(dest),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=head,
            extra_options={
                # Fused ops (Attention, SkipLayerNormalization) have no ONNX type inference: fp32 outputs.
                "DefaultTensorType": onnx.TensorProto.FLOAT,
                "MatMulConstBOnly": True,  # weights only, never activation x activation products
            },
        )
    return {"method": "dynamic", "weights": "int8 per channel", "ops": ["MatMul"], "excluded": head}


def annotate(path: Path, metadata: dict[str, str]) -> None:
    """Write `metadata` into the graph's metadata_props, where onnxruntime users read it
    (`session.get_modelmeta().custom_metadata_map`): the labels, the cut and the temperature that plain
    onnxruntime cannot otherwise know. The file is rewritten in place, atomically."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    kept = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


@contextmanager
def _full_disk_as_oserror(src: Path) -> Iterator[None]:
    """onnx's shape inference writes a copy of `src` beside it and, on a full disk, writes it truncated
    without a word; reading it back then fails as a corrupt model (protobuf's DecodeError, or a ValueError).
    Where there is no longer room for such a copy, that is the full disk's ENOSPC, said as such."""
    try:
        yield
    except Exception:
        if shutil.disk_usage(src.parent).free < src.stat().st_size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        raise


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence onnxruntime's tool logging (fusion notes, a generic pre-processing hint) for one step."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)

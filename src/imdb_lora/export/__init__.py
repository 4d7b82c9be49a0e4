"""Export a finished run for CPU serving: a merged Hugging Face folder, or ONNX (optionally int8).

An export folder is self-contained, so `predict`, `evaluate`, `serve` and `bench` take it like a run:

    imdb_lora_export.json  marker: format, quantization, exporter, the check against the run, the
                           temperature, and the sha256 of each model and tokenizer file (checked on load)
    config.yaml, run.json  the run's recipe and figures (data settings for evaluate, /info)
    calibration.json       the run's temperature, if it has one (applied by Classifier on every backend)
    tokenizer/             the run's tokenizer
    model/                 merged format: config.json + model.safetensors (LoRA folded into the base)
    model.onnx             onnx format: logits from input_ids + attention_mask, dynamic batch and length

Why these steps make CPU inference faster: folding LoRA removes the adapter's extra matmuls; the ONNX
graph is exported with eager attention so onnxruntime's transformer optimizer can fuse attention,
LayerNorm and GELU into single kernels; int8 dynamic quantization runs the large matmuls in integer
arithmetic (about 4x less memory traffic for the weights).
"""

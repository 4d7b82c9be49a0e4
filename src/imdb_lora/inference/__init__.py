"""Inference: one Classifier over a run directory or an export (torch or onnxruntime backend)."""

"""Modeling: loading base models and tokenizers, LoRA by role, the forward pass."""

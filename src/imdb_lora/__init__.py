"""imdb-lora: IMDB sentiment analysis by LoRA fine-tuning of encoder models."""

__version__ = "0.1.0"

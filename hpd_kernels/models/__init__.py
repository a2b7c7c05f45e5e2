"""Models the trainer can distil: a small built-in decoder (plain PyTorch)."""

from .decoder import DecoderConfig, DecoderLM, KVCache  # noqa: F401

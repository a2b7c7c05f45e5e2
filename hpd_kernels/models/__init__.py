"""Models the trainer can distil: a small built-in decoder (plain PyTorch), and Hugging Face
causal LMs through `HFCausalLM` (the `hf` extra)."""

from .decoder import DecoderConfig, DecoderLM, KVCache  # noqa: F401
from .hf import HFCausalLM  # noqa: F401  (imports transformers only when loading a model)

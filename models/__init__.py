"""Flax NNX Mistral / Qwen2 / Qwen3 / Llama decoders built on `pallas_kernels`."""

from models.causal_lm import CausalLM, DecoderLayer
from models.config import (ModelConfig, llama_tiny, mistral_tiny, qwen2_tiny,
                           qwen3_tiny)

__all__ = [
    "CausalLM",
    "DecoderLayer",
    "ModelConfig",
    "llama_tiny",
    "mistral_tiny",
    "qwen2_tiny",
    "qwen3_tiny",
]

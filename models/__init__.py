"""Flax NNX decoders of the `hf_config.FAMILIES` model types (Mistral, Qwen2,
Qwen3, Llama, Gemma 2 / 3, Ministral, Phi-3, Starcoder2, Olmo 3, SmolLM3,
Cohere2, Mixtral, gpt-oss) built on `pallas_kernels`."""

from models.causal_lm import CausalLM, DecoderLayer
from models.config import (ModelConfig, cohere2_tiny, gemma2_tiny, gemma3_tiny,
                           gpt_oss_tiny, llama_tiny, ministral_tiny,
                           mistral_tiny, mixtral_tiny, olmo3_tiny,
                           phi3_tiny, qwen2_tiny, qwen3_tiny, smollm3_tiny,
                           starcoder2_tiny)

__all__ = [
    "CausalLM",
    "DecoderLayer",
    "ModelConfig",
    "cohere2_tiny",
    "gemma2_tiny",
    "gemma3_tiny",
    "gpt_oss_tiny",
    "llama_tiny",
    "ministral_tiny",
    "mistral_tiny",
    "mixtral_tiny",
    "olmo3_tiny",
    "phi3_tiny",
    "qwen2_tiny",
    "qwen3_tiny",
    "smollm3_tiny",
    "starcoder2_tiny",
]

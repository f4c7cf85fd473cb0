"""swajax: exact sliding-window attention for JAX, and the models built on it.

Users import from here; `pallas_kernels` (the op) and `models` (Flax NNX
modules) sit below and never import this package.
"""

from models import (CausalLM, ModelConfig, llama_tiny, mistral_tiny, qwen2_tiny,
                    qwen3_tiny)
from models.kv_cache import KVCache, LayerCache, init_cache
from pallas_kernels import (Band, DecodeBlockSizes, FlashBlockSizes,
                            XlaBlockSizes, decode_attention, kv_block_range,
                            reference_attention, sliding_window_attention,
                            visited_blocks, window_mask)
from pallas_kernels import context_parallel_attention
from swajax.data import ByteTokenizer, pack_sequences
from swajax.generation import generate, generate_stream
from swajax.hf_io import load_hf, save_hf
from swajax.lora import LoraSpec, add_lora, merged_model
from swajax.peft_io import load_adapter, save_adapter
from swajax.sampling import sample_next_token
from swajax.train_config import TrainConfig
from swajax.training import train

__all__ = [
    "Band",
    "ByteTokenizer",
    "CausalLM",
    "DecodeBlockSizes",
    "FlashBlockSizes",
    "KVCache",
    "LayerCache",
    "ModelConfig",
    "TrainConfig",
    "XlaBlockSizes",
    "context_parallel_attention",
    "decode_attention",
    "generate",
    "generate_stream",
    "init_cache",
    "kv_block_range",
    "llama_tiny",
    "load_hf",
    "mistral_tiny",
    "pack_sequences",
    "qwen2_tiny",
    "qwen3_tiny",
    "reference_attention",
    "sample_next_token",
    "save_hf",
    "sliding_window_attention",
    "train",
    "visited_blocks",
    "window_mask",
    # LoRA / QLoRA and PEFT adapters
    "LoraSpec",
    "add_lora",
    "load_adapter",
    "merged_model",
    "save_adapter",
]

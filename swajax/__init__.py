"""swajax: exact sliding-window attention for JAX, and the models built on it.

Users import from here; `pallas_kernels` (the op) and `models` (Flax NNX
modules) sit below and never import this package.
"""

from models import (CausalLM, ModelConfig, cohere2_tiny, gemma2_tiny, gemma3_tiny,
                    gpt_oss_tiny, llama_tiny, ministral_tiny, mistral_tiny,
                    mixtral_tiny, olmo3_tiny, phi3_tiny, qwen2_tiny, qwen3_tiny,
                    smollm3_tiny, starcoder2_tiny)
from models.kv_cache import KVCache, LayerCache, init_cache
from models.lora import LoraSpec, add_lora, merged_model
from pallas_kernels import (Band, DecodeBlockSizes, FlashBlockSizes,
                            MosaicBlockSizes, SplashBlockSizes,
                            XlaBlockSizes, context_parallel_attention,
                            decode_attention, kv_block_range,
                            reference_attention, sliding_window_attention,
                            visited_blocks, window_mask)
from swajax.infer.generation import generate, generate_stream
from swajax.infer.sampling import sample_next_token
from swajax.io.gguf import gguf_tokenizer, load_gguf
from swajax.io.hf import load_hf, save_hf
from swajax.io.peft import load_adapter, save_adapter
from swajax.text.chat import ChatEncoder
from swajax.text.tokenizers import ByteTokenizer
from swajax.training.config import TrainConfig
from swajax.training.data import pack_sequences
from swajax.training.loop import train

__all__ = [
    "Band",
    "ByteTokenizer",
    "CausalLM",
    "ChatEncoder",
    "DecodeBlockSizes",
    "FlashBlockSizes",
    "KVCache",
    "LayerCache",
    "LoraSpec",
    "ModelConfig",
    "MosaicBlockSizes",
    "SplashBlockSizes",
    "TrainConfig",
    "XlaBlockSizes",
    "add_lora",
    "cohere2_tiny",
    "context_parallel_attention",
    "decode_attention",
    "gemma2_tiny",
    "gemma3_tiny",
    "gguf_tokenizer",
    "gpt_oss_tiny",
    "generate",
    "generate_stream",
    "init_cache",
    "kv_block_range",
    "llama_tiny",
    "load_adapter",
    "load_gguf",
    "load_hf",
    "merged_model",
    "ministral_tiny",
    "mistral_tiny",
    "mixtral_tiny",
    "olmo3_tiny",
    "pack_sequences",
    "phi3_tiny",
    "qwen2_tiny",
    "qwen3_tiny",
    "reference_attention",
    "sample_next_token",
    "save_adapter",
    "save_hf",
    "sliding_window_attention",
    "smollm3_tiny",
    "starcoder2_tiny",
    "train",
    "visited_blocks",
    "window_mask",
]

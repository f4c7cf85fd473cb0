"""Flax NNX Mistral / Qwen2 / Qwen3 / Llama decoders built on `pallas_kernels`."""

"""`ModelConfig`: one frozen dataclass for the decoder families and its presets.

The families (`models.hf_config.FAMILIES`) differ only in a few switches:
q/k/v biases (Qwen2), q/k RMSNorm (Qwen3), and how windows are spread over
the layers. `ModelConfig.from_hf` / `to_hf` read and write a Hugging Face
`config.json` through `models.hf_config`, the one place of those rules.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from models.hf_config import (FAMILIES, check_model_type, check_rope_scaling,
                              config_to_hf, fields_from_hf)
from pallas_kernels.validation import check_positive_int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer: RMSNorm, RoPE, GQA attention, SwiGLU MLP.

  Dimension letters: V vocab, D hidden_size, F intermediate_size, N query heads,
  K kv heads, H head_dim, W window.
  """

  # Family: "mistral" | "qwen2" | "qwen3" | "llama" (`hf_config.FAMILIES`).
  model_type: str
  # Sizes.
  vocab_size: int          # V
  hidden_size: int         # D
  intermediate_size: int   # F
  num_layers: int
  num_q_heads: int         # N
  num_kv_heads: int        # K, N % K == 0
  head_dim: int            # H, even (RoPE rotates pairs of halves)
  # Attention pattern: one entry per layer, None = full causal, W = the last W
  # keys (itself included), as HF `sliding_window=W`.
  layer_windows: tuple[int | None, ...]
  # Positions: RoPE base and optional scaling, a sorted tuple of HF's
  # `rope_parameters` items without rope_theta, e.g. (("factor", 8.0), ...,
  # ("rope_type", "linear")); None for plain RoPE.
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  max_position_embeddings: int = 4096
  # Normalisation and output head.
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  # Family switches (must match `hf_config.FAMILIES[model_type]`).
  attention_bias: bool = False   # q/k/v projections have a bias (Qwen2)
  qk_norm: bool = False          # RMSNorm over H on q and k before RoPE (Qwen3)
  # Initialisation: normal(0, initializer_range) for projections and embedding.
  initializer_range: float = 0.02

  def __post_init__(self):
    family = check_model_type(self.model_type)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_q_heads", "num_kv_heads", "head_dim",
                 "max_position_embeddings"):
      check_positive_int(name, getattr(self, name))
    if self.num_q_heads % self.num_kv_heads:
      raise ValueError(
          f"num_q_heads={self.num_q_heads}, num_kv_heads={self.num_kv_heads}: "
          "expected num_q_heads to be a multiple of num_kv_heads")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim}: expected an even int (RoPE)")
    windows = tuple(self.layer_windows)
    object.__setattr__(self, "layer_windows", windows)
    if len(windows) != self.num_layers:
      raise ValueError(
          f"layer_windows={windows!r}: expected {self.num_layers} entries, one "
          "per layer (None = full causal)")
    for w in windows:
      if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
        raise ValueError(
            f"layer_windows={windows!r}: expected entries None or int >= 1")
    if (self.attention_bias, self.qk_norm) != (family.attention_bias,
                                               family.qk_norm):
      raise ValueError(
          f"attention_bias={self.attention_bias}, qk_norm={self.qk_norm} with "
          f"model_type={self.model_type!r}: expected attention_bias="
          f"{family.attention_bias}, qk_norm={family.qk_norm} (the "
          f"{family.architecture} layout)")
    if self.rope_scaling is not None:
      object.__setattr__(self, "rope_scaling",
                         tuple(sorted(dict(self.rope_scaling).items())))
      check_rope_scaling(dict(self.rope_scaling))

  @property
  def rope_scaling_dict(self) -> dict | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  def with_full_attention(self) -> "ModelConfig":
    """The same model with every window removed (negative controls, benchmarks)."""
    return dataclasses.replace(self, layer_windows=(None,) * self.num_layers)

  # ----- Hugging Face config.json ---------------------------------------------

  @classmethod
  def from_hf(cls, config) -> "ModelConfig":
    """From a HF config dict, a `config.json` path, or a checkpoint directory,
    as transformers 5.24 reads it; ValueError for anything it cannot honour
    exactly. The rules, one `Family` per model type: `models.hf_config`.
    """
    return cls(**fields_from_hf(config))

  def to_hf(self) -> dict:
    """The `config.json` dict transformers loads as this exact model;
    ValueError when the family cannot express `layer_windows`
    (`models.hf_config.config_to_hf`).
    """
    return config_to_hf(self)


# ----- Presets ----------------------------------------------------------------

_TINY = dict(vocab_size=264, hidden_size=256, intermediate_size=768,
             num_layers=4, num_q_heads=8, num_kv_heads=2, head_dim=32,
             max_position_embeddings=4096)


def _preset(model_type, windows, overrides):
  fields = {**_TINY, "model_type": model_type,
            "attention_bias": FAMILIES[model_type].attention_bias,
            "qk_norm": FAMILIES[model_type].qk_norm, **overrides}
  if "layer_windows" not in overrides:
    fields["layer_windows"] = windows(fields["num_layers"])
  return ModelConfig(**fields)


def mistral_tiny(**overrides) -> ModelConfig:
  """Small sliding-window Mistral for CPU training: 256 bytes + 8 specials,
  D 256, 4 layers, 8 q / 2 kv heads of 32, window 128 on every layer."""
  return _preset("mistral", lambda n: (128,) * n, overrides)


def qwen2_tiny(**overrides) -> ModelConfig:
  """As `mistral_tiny`, Qwen2 layout: q/k/v biases; the first half of the
  layers full causal, the rest window 128 (max_window_layers = n // 2)."""
  return _preset("qwen2", lambda n: (None,) * (n // 2) + (128,) * (n - n // 2),
                 overrides)


def qwen3_tiny(**overrides) -> ModelConfig:
  """As `qwen2_tiny`, Qwen3 layout: q/k RMSNorm instead of biases."""
  return _preset("qwen3", lambda n: (None,) * (n // 2) + (128,) * (n - n // 2),
                 overrides)


def llama_tiny(**overrides) -> ModelConfig:
  """As `mistral_tiny`, Llama layout: full causal attention on every layer."""
  return _preset("llama", lambda n: (None,) * n, overrides)

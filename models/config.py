"""`ModelConfig`: one frozen dataclass for the four decoder families, its presets,
and the one mapping from and to Hugging Face `config.json`.

Families differ only in a few switches (see `FAMILIES`):
  mistral  one `sliding_window` for every layer (None: full causal)
  qwen2    q/k/v biases; `use_sliding_window` + `max_window_layers`, or `layer_types`
  qwen3    per-head RMSNorm on q and k before RoPE; windows as qwen2
  llama    no window; RoPE scaling "llama3" (Llama 3.1+)
RoPE scaling ("linear", "llama3", "yarn") is open to every family.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from pallas_kernels.validation import check_positive_int

# model_type -> (HF architecture, q/k/v bias, q/k norm). The one place that says
# which switches each family has; `__post_init__` enforces it so that every
# config can be written back to a `config.json` that transformers reads the same.
FAMILIES = {
    "mistral": ("MistralForCausalLM", False, False),
    "qwen2": ("Qwen2ForCausalLM", True, False),
    "qwen3": ("Qwen3ForCausalLM", False, True),
    "llama": ("LlamaForCausalLM", False, False),
}

# RoPE variants -> (required keys, optional keys) of HF `rope_parameters` /
# `rope_scaling`; the math is `models.layers.rope_frequencies`, checked against
# transformers' own rope init functions in tests/test_hf_parity.py.
ROPE_TYPES = {
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim", "truncate")),
}
# Types whose original_max_position_embeddings transformers fills in (see
# `_rope_from_hf`).
_ROPE_TYPES_WITH_ORIGINAL_LENGTH = ("llama3", "yarn")

# Defaults transformers 5.24 uses when a key is absent from config.json
# (the class defaults of {Mistral,Qwen2,Qwen3,Llama}Config).
_HF_DEFAULTS = {
    "mistral": dict(num_key_value_heads=8, sliding_window=4096,
                    max_position_embeddings=131072),
    "qwen2": dict(num_key_value_heads=32, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28,
                  max_position_embeddings=32768),
    "qwen3": dict(num_key_value_heads=32, head_dim=128, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28,
                  max_position_embeddings=32768),
    "llama": dict(max_position_embeddings=2048),
}
_REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads")
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer: RMSNorm, RoPE, GQA attention, SwiGLU MLP.

  Dimension letters: V vocab, D hidden_size, F intermediate_size, N query heads,
  K kv heads, H head_dim, W window.
  """

  # Family: "mistral" | "qwen2" | "qwen3" | "llama" (see FAMILIES).
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
  # Family switches (must match FAMILIES[model_type]).
  attention_bias: bool = False   # q/k/v projections have a bias (Qwen2)
  qk_norm: bool = False          # RMSNorm over H on q and k before RoPE (Qwen3)
  # Initialisation: normal(0, initializer_range) for projections and embedding.
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.model_type not in FAMILIES:
      raise ValueError(
          f"model_type={self.model_type!r}: expected one of {sorted(FAMILIES)}")
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
    _, bias, qk_norm = FAMILIES[self.model_type]
    if (self.attention_bias, self.qk_norm) != (bias, qk_norm):
      raise ValueError(
          f"attention_bias={self.attention_bias}, qk_norm={self.qk_norm} with "
          f"model_type={self.model_type!r}: expected attention_bias={bias}, "
          f"qk_norm={qk_norm} (the {FAMILIES[self.model_type][0]} layout)")
    if self.rope_scaling is not None:
      object.__setattr__(self, "rope_scaling",
                         tuple(sorted(dict(self.rope_scaling).items())))
      _check_rope_scaling(dict(self.rope_scaling))

  @property
  def rope_scaling_dict(self) -> dict | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  def with_full_attention(self) -> "ModelConfig":
    """The same model with every window removed (negative controls, benchmarks)."""
    return dataclasses.replace(self, layer_windows=(None,) * self.num_layers)

  # ----- Hugging Face config.json ---------------------------------------------

  @classmethod
  def from_hf(cls, config) -> "ModelConfig":
    """From a HF config dict, a `config.json` path, or a checkpoint directory.

    Follows transformers 5.24: absent keys take the family's class defaults;
    Mistral windows every layer with `sliding_window`; Qwen2/Qwen3 take
    `layer_types` when given, else layer i slides iff `use_sliding_window` and
    i >= `max_window_layers`. Raises ValueError for anything it cannot honour
    exactly (other model types, activations, dropout, biases, RoPE variants).
    """
    if isinstance(config, (str, os.PathLike)):
      path = os.fspath(config)
      if os.path.isdir(path) or not path.endswith(".json"):
        path = os.path.join(path, "config.json")
      if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no such file (expected a HF checkpoint directory or "
            "its config.json)")
      try:
        with open(path) as f:
          config = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
      raise TypeError(f"config: expected a dict or a path, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
      raise ValueError(
          f"model_type={model_type!r}: expected one of {sorted(FAMILIES)}")
    hf = {**_HF_DEFAULTS[model_type], **config}
    missing = [k for k in _REQUIRED_HF_KEYS if k not in hf]
    if missing:
      raise ValueError(f"config.json lacks {missing[0]!r} (model_type={model_type!r})")
    _check_unsupported(model_type, hf)
    num_layers = hf["num_hidden_layers"]
    num_q_heads = hf["num_attention_heads"]
    theta, scaling = _rope_from_hf(hf)
    return cls(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=num_layers,
        num_q_heads=num_q_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_q_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_q_heads,
        layer_windows=_windows_from_hf(model_type, hf, num_layers),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=hf["max_position_embeddings"],
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=FAMILIES[model_type][1],
        qk_norm=FAMILIES[model_type][2],
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )

  def to_hf(self) -> dict:
    """The `config.json` dict transformers loads as this exact model.

    Raises ValueError when the family cannot express `layer_windows` (Mistral:
    one window for all layers; Qwen: one window size; Llama: none).
    """
    architecture = FAMILIES[self.model_type][0]
    sizes = {w for w in self.layer_windows if w is not None}
    if len(sizes) > 1:
      raise ValueError(
          f"layer_windows={self.layer_windows!r}: HF {architecture} has one "
          "sliding_window size for all sliding layers")
    window = sizes.pop() if sizes else None
    rope = {"rope_type": "default", **(self.rope_scaling_dict or {}),
            "rope_theta": self.rope_theta}
    out = {
        "architectures": [architecture],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_q_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "rope_theta": self.rope_theta,
        "rope_parameters": rope,
        "attention_dropout": 0.0,
        "initializer_range": self.initializer_range,
    }
    if self.model_type == "mistral":
      if window is not None and None in self.layer_windows:
        raise ValueError(
            f"layer_windows={self.layer_windows!r}: HF MistralForCausalLM "
            "applies sliding_window to every layer or to none")
      out["sliding_window"] = window
    elif self.model_type in ("qwen2", "qwen3"):
      sliding = [w is not None for w in self.layer_windows]
      out["use_sliding_window"] = window is not None
      out["sliding_window"] = window
      out["max_window_layers"] = sliding.index(True) if window else self.num_layers
      out["layer_types"] = [SLIDING if s else FULL for s in sliding]
      if self.model_type == "qwen3":
        out["attention_bias"] = False
    else:
      if window is not None:
        raise ValueError(
            f"layer_windows={self.layer_windows!r}: HF LlamaForCausalLM has no "
            "sliding window; use model_type='mistral' or 'qwen2'")
      out.update(attention_bias=False, mlp_bias=False)
    return out


def _check_unsupported(model_type, hf):
  """Raises for HF settings this implementation would not reproduce exactly."""
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"hidden_act={act!r}: only 'silu' (SwiGLU) is implemented")
  dropout = hf.get("attention_dropout", 0.0) or 0.0
  if dropout != 0:
    raise ValueError(
        f"attention_dropout={dropout!r}: swajax attention has no dropout; "
        "expected 0.0")
  if model_type in ("llama", "qwen3") and hf.get("attention_bias", False):
    raise ValueError(
        f"attention_bias=True with model_type={model_type!r}: adds biases to "
        "q/k/v and o_proj, which swajax does not implement")
  if hf.get("mlp_bias", False):
    raise ValueError("mlp_bias=True: MLP biases are not implemented")
  if model_type == "llama" and hf.get("sliding_window") is not None:
    raise ValueError(
        f"sliding_window={hf['sliding_window']!r} with model_type='llama': "
        "transformers ignores it for Llama; use model_type='mistral'")


def _windows_from_hf(model_type, hf, num_layers):
  """Per-layer windows with transformers' rules (see `ModelConfig.from_hf`)."""
  window = hf.get("sliding_window")
  layer_types = hf.get("layer_types")
  if model_type == "llama":
    return (None,) * num_layers
  if model_type == "mistral":
    windows = (window,) * num_layers
    # MistralModel ignores layer_types; refuse a config that says otherwise.
    if layer_types is not None and list(layer_types) != [
        SLIDING if window is not None else FULL] * num_layers:
      raise ValueError(
          f"layer_types={layer_types!r} with model_type='mistral': "
          "MistralForCausalLM ignores layer_types and uses "
          f"sliding_window={window!r} on every layer")
    return windows
  if not hf.get("use_sliding_window", False):
    window = None
  if layer_types is None:
    first = hf.get("max_window_layers", 28)
    layer_types = [SLIDING if window is not None and i >= first else FULL
                   for i in range(num_layers)]
  if len(layer_types) != num_layers or set(layer_types) - {SLIDING, FULL}:
    raise ValueError(
        f"layer_types={layer_types!r}: expected {num_layers} entries of "
        f"{SLIDING!r} / {FULL!r}")
  if SLIDING in layer_types and window is None:
    raise ValueError(
        f"layer_types={layer_types!r} has sliding layers but no window "
        f"(use_sliding_window={hf.get('use_sliding_window')!r}, "
        f"sliding_window={hf.get('sliding_window')!r})")
  return tuple(window if t == SLIDING else None for t in layer_types)


def _rope_from_hf(hf):
  """(rope_theta, rope_scaling) from `rope_scaling` / `rope_parameters` (HF 4 / 5).

  As transformers 5: `rope_scaling` wins over `rope_parameters`; rope_theta
  comes from the dict, else the top level, else 10000; llama3 and yarn take
  original_max_position_embeddings from the top level, else the dict, else
  max_position_embeddings.
  """
  params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = params.pop("rope_type", params.pop("type", "default"))
  factor = params.pop("partial_rotary_factor", 1.0)
  if factor != 1.0:
    raise ValueError(f"partial_rotary_factor={factor!r}: expected 1.0")
  if rope_type == "default":
    if params:
      raise ValueError(f"rope parameters {params!r}: unexpected for default RoPE")
    return theta, None
  if rope_type in _ROPE_TYPES_WITH_ORIGINAL_LENGTH:
    params["original_max_position_embeddings"] = hf.get(
        "original_max_position_embeddings",
        params.get("original_max_position_embeddings",
                   hf["max_position_embeddings"]))
  scaling = {"rope_type": rope_type, **params}
  _check_rope_scaling(scaling)
  return theta, tuple(sorted(scaling.items()))


def _check_rope_scaling(scaling: dict):
  rope_type = scaling.get("rope_type")
  if rope_type not in ROPE_TYPES:
    raise ValueError(
        f"rope_type={rope_type!r}: expected 'default' or one of "
        f"{sorted(ROPE_TYPES)} (others are not verified against transformers)")
  required, optional = ROPE_TYPES[rope_type]
  keys = set(scaling) - {"rope_type"}
  if not set(required) <= keys <= set(required) | set(optional):
    raise ValueError(
        f"rope_scaling={scaling!r}: rope_type={rope_type!r} expects the keys "
        f"{sorted(required)}" + (f" and optionally {sorted(optional)}"
                                 if optional else ""))


# ----- Presets ----------------------------------------------------------------

_TINY = dict(vocab_size=264, hidden_size=256, intermediate_size=768,
             num_layers=4, num_q_heads=8, num_kv_heads=2, head_dim=32,
             max_position_embeddings=4096)


def _preset(model_type, windows, overrides):
  fields = {**_TINY, "model_type": model_type,
            "attention_bias": FAMILIES[model_type][1],
            "qk_norm": FAMILIES[model_type][2], **overrides}
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

"""The one mapping between Hugging Face `config.json` and `ModelConfig` fields.

`FAMILIES` holds one `Family` row per transformers model type: its
architecture, the `ModelConfig` switches it fixes, transformers' class
defaults, and its rule for per-layer windows in each direction. A new family
is a row (and, if its window keys differ, one pair of window rules).
  mistral  one `sliding_window` for every layer (None: full causal)
  qwen2    q/k/v biases; `use_sliding_window` + `max_window_layers`, or `layer_types`
  qwen3    per-head RMSNorm on q and k before RoPE; windows as qwen2
  llama    no window; RoPE scaling "llama3" (Llama 3.1+)
RoPE scaling ("linear", "llama3", "yarn", see `ROPE_TYPES`) is open to every
family.

This module imports nothing of `models`: `ModelConfig.from_hf` builds itself
from `fields_from_hf`, and `ModelConfig.to_hf` calls `config_to_hf`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"  # HF layer_types entries
Windows = tuple[int | None, ...]  # `ModelConfig.layer_windows`

# Keys without a transformers default: a config.json must give them.
_REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads")

# RoPE variants -> (required keys, optional keys) of HF `rope_parameters` /
# `rope_scaling`; the math is `models.rope.rope_frequencies`, checked against
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


# ----- Window rules: config.json <-> layer_windows ----------------------------
# from_hf(model_type, hf, num_layers) -> layer_windows, with hf the config.json
# dict over the family's defaults; to_hf(architecture, layer_windows) -> the
# family's window keys of config.json, or ValueError if it cannot express them.

def _window_size(architecture: str, windows: Windows) -> int | None:
  """The one sliding window size of `windows` (None: no sliding layer)."""
  sizes = {w for w in windows if w is not None}
  if len(sizes) > 1:
    raise ValueError(
        f"layer_windows={windows!r}: HF {architecture} has one "
        "sliding_window size for all sliding layers")
  return sizes.pop() if sizes else None


def _every_layer_windows_from_hf(model_type, hf, num_layers) -> Windows:
  """`sliding_window` on every layer; `layer_types` must agree (Mistral
  ignores it)."""
  window = hf.get("sliding_window")
  layer_types = hf.get("layer_types")
  if layer_types is not None and list(layer_types) != [
      SLIDING if window is not None else FULL] * num_layers:
    raise ValueError(
        f"layer_types={layer_types!r} with model_type={model_type!r}: "
        f"{FAMILIES[model_type].architecture} ignores layer_types and uses "
        f"sliding_window={window!r} on every layer")
  return (window,) * num_layers


def _every_layer_windows_to_hf(architecture, windows) -> dict:
  window = _window_size(architecture, windows)
  if window is not None and None in windows:
    raise ValueError(
        f"layer_windows={windows!r}: HF {architecture} applies sliding_window "
        "to every layer or to none")
  return {"sliding_window": window}


def _qwen_windows_from_hf(model_type, hf, num_layers) -> Windows:
  """`layer_types` when given, else layer i slides iff `use_sliding_window`
  and i >= `max_window_layers`; the window is None unless use_sliding_window."""
  window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
  layer_types = hf.get("layer_types")
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


def _qwen_windows_to_hf(architecture, windows) -> dict:
  window = _window_size(architecture, windows)
  sliding = [w is not None for w in windows]
  return {"use_sliding_window": window is not None,
          "sliding_window": window,
          "max_window_layers": sliding.index(True) if window else len(windows),
          "layer_types": [SLIDING if s else FULL for s in sliding]}


def _no_windows_from_hf(model_type, hf, num_layers) -> Windows:
  """Full causal on every layer; a `sliding_window` key is refused (the
  family's transformers class ignores it)."""
  if hf.get("sliding_window") is not None:
    raise ValueError(
        f"sliding_window={hf['sliding_window']!r} with model_type="
        f"{model_type!r}: transformers ignores it for "
        f"{FAMILIES[model_type].architecture}; use model_type='mistral'")
  return (None,) * num_layers


def _no_windows_to_hf(architecture, windows) -> dict:
  if _window_size(architecture, windows) is not None:
    raise ValueError(
        f"layer_windows={windows!r}: HF {architecture} has no sliding window; "
        "use model_type='mistral' or 'qwen2'")
  return {}


# ----- The family table ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Family:
  """How one transformers model type maps to `ModelConfig`."""

  architecture: str  # config.json "architectures": [architecture]
  # transformers 5.24's class defaults for keys absent from config.json.
  defaults: Mapping[str, Any]
  windows_from_hf: Callable[[str, dict, int], Windows]
  windows_to_hf: Callable[[str, Windows], dict]
  # The ModelConfig switches the family fixes (`ModelConfig.__post_init__`
  # enforces them, so every config writes back to a config.json that
  # transformers reads the same).
  attention_bias: bool = False  # q/k/v projections have a bias
  qk_norm: bool = False         # RMSNorm over H on q and k before RoPE
  # HF bias switches the class reads that swajax lacks: written False by
  # `config_to_hf`, refused when True by `fields_from_hf`.
  bias_switches: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {
    "mistral": Family(
        "MistralForCausalLM",
        dict(num_key_value_heads=8, sliding_window=4096,
             max_position_embeddings=131072),
        _every_layer_windows_from_hf, _every_layer_windows_to_hf),
    "qwen2": Family(
        "Qwen2ForCausalLM",
        dict(num_key_value_heads=32, use_sliding_window=False,
             sliding_window=4096, max_window_layers=28,
             max_position_embeddings=32768),
        _qwen_windows_from_hf, _qwen_windows_to_hf, attention_bias=True),
    "qwen3": Family(
        "Qwen3ForCausalLM",
        dict(num_key_value_heads=32, head_dim=128, use_sliding_window=False,
             sliding_window=4096, max_window_layers=28,
             max_position_embeddings=32768),
        _qwen_windows_from_hf, _qwen_windows_to_hf, qk_norm=True,
        bias_switches=("attention_bias",)),
    "llama": Family(
        "LlamaForCausalLM",
        dict(max_position_embeddings=2048),
        _no_windows_from_hf, _no_windows_to_hf,
        bias_switches=("attention_bias", "mlp_bias")),
}


def check_model_type(model_type) -> Family:
  """`FAMILIES[model_type]`, or ValueError naming the known types."""
  if model_type not in FAMILIES:
    raise ValueError(
        f"model_type={model_type!r}: expected one of {sorted(FAMILIES)}")
  return FAMILIES[model_type]


# ----- config.json -> ModelConfig fields --------------------------------------

def fields_from_hf(config) -> dict[str, Any]:
  """`ModelConfig` keyword arguments from a HF config dict, a `config.json`
  path, or a checkpoint directory.

  Follows transformers 5.24: absent keys take the family's class defaults;
  windows follow the family's rule (`FAMILIES`). Raises ValueError for
  anything it cannot honour exactly (other model types, activations,
  dropout, biases, RoPE variants).
  """
  if isinstance(config, (str, os.PathLike)):
    config = _read_config_json(os.fspath(config))
  if not isinstance(config, dict):
    raise TypeError(f"config: expected a dict or a path, got {type(config).__name__}")
  model_type = config.get("model_type")
  family = check_model_type(model_type)
  hf = {**family.defaults, **config}
  missing = [k for k in _REQUIRED_HF_KEYS if k not in hf]
  if missing:
    raise ValueError(f"config.json lacks {missing[0]!r} (model_type={model_type!r})")
  _check_unsupported(model_type, hf)
  num_layers = hf["num_hidden_layers"]
  num_q_heads = hf["num_attention_heads"]
  theta, scaling = _rope_from_hf(hf)
  return dict(
      model_type=model_type,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=num_layers,
      num_q_heads=num_q_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_q_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_q_heads,
      layer_windows=family.windows_from_hf(model_type, hf, num_layers),
      rope_theta=float(theta),
      rope_scaling=scaling,
      max_position_embeddings=hf["max_position_embeddings"],
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=family.attention_bias,
      qk_norm=family.qk_norm,
      initializer_range=float(hf.get("initializer_range", 0.02)),
  )


def _read_config_json(path: str) -> dict:
  """The dict of `path`: a config.json, or a directory holding one."""
  if os.path.isdir(path) or not path.endswith(".json"):
    path = os.path.join(path, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path}: no such file (expected a HF checkpoint directory or "
        "its config.json)")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e


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
  if ("attention_bias" in FAMILIES[model_type].bias_switches
      and hf.get("attention_bias", False)):
    raise ValueError(
        f"attention_bias=True with model_type={model_type!r}: adds biases to "
        "q/k/v and o_proj, which swajax does not implement")
  if hf.get("mlp_bias", False):  # refused whichever family reads it
    raise ValueError("mlp_bias=True: MLP biases are not implemented")


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
  check_rope_scaling(scaling)
  return theta, tuple(sorted(scaling.items()))


def check_rope_scaling(scaling: dict):
  """Raises unless `scaling` is a `ROPE_TYPES` variant with exactly its keys
  (`rope_type` plus the required and any optional ones)."""
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


# ----- ModelConfig -> config.json ---------------------------------------------

def config_to_hf(config) -> dict:
  """The `config.json` dict transformers loads as `config` (a `ModelConfig`)
  exactly.

  Raises ValueError when the family cannot express `layer_windows` (Mistral:
  one window for all layers; Qwen: one window size; Llama: none).
  """
  family = FAMILIES[config.model_type]
  windows = family.windows_to_hf(family.architecture, config.layer_windows)
  rope = {"rope_type": "default", **(config.rope_scaling_dict or {}),
          "rope_theta": config.rope_theta}
  return {
      "architectures": [family.architecture],
      "model_type": config.model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_q_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      "tie_word_embeddings": config.tie_word_embeddings,
      "rope_theta": config.rope_theta,
      "rope_parameters": rope,
      "attention_dropout": 0.0,
      "initializer_range": config.initializer_range,
      **windows,
      **{key: False for key in family.bias_switches},
  }

"""The one mapping between Hugging Face `config.json` and `ModelConfig` fields.

`FAMILIES` holds one `Family` row per transformers model type: its
architecture, the `ModelConfig` switches it fixes (block layout, norm and MLP
kind, biases, fused projections, ...), transformers' class defaults, its rule
for per-layer windows in each direction, and the family's own config keys
(softcaps, scales, per-layer RoPE). A new family is a row (and, if its keys
differ, a pair of small rules).
  mistral     one `sliding_window` for every layer (None: full causal)
  qwen2       q/k/v biases; `use_sliding_window` + `max_window_layers`, or `layer_types`
  qwen3       per-head RMSNorm on q and k before RoPE; windows as qwen2
  llama       no window; RoPE scaling "llama3" (Llama 3.1+)
  gemma2      sandwich norms (1 + w), GeGLU, sqrt(D) embedding scale,
              query_pre_attn_scalar, attention and final logit softcaps,
              `layer_types` (default: alternating sliding / full)
  gemma3_text gemma2 + q/k norms, a local RoPE base on sliding layers
  ministral   the Mistral block with `layer_types`
  phi3        fused qkv_proj and gate_up_proj; `sliding_window` on every layer
  starcoder2  LayerNorm with bias, biased projections, GELU MLP; every layer
  olmo3       post-norm block, q/k RMSNorm over all heads, `layer_types`
  smollm3     NoPE layers (`no_rope_layers`), `use_sliding_window` + `layer_types`
  cohere2     parallel block on one bias-free LayerNorm, interleaved RoPE on
              sliding layers, NoPE full layers, `logit_scale`
  mixtral     the Mistral block with a mixture of SwiGLU experts (softmax,
              then top k renormalised)
  gpt_oss     attention sinks, biased q/k/v/o, `layer_types`, YaRN; experts
              with biases and a clamped SwiGLU, routed top k then softmax;
              MXFP4 experts (`mxfp4_expert_layers`), no other quantization
RoPE scaling ("linear", "llama3", "yarn", see `ROPE_TYPES`) is open to every
family (on full layers where the RoPE is per layer type).

The rules themselves (windows, default `layer_types`, family keys) are
`models.hf_rules`. This module imports nothing else of `models`:
`ModelConfig.from_hf` builds itself from `fields_from_hf`, and
`ModelConfig.to_hf` calls `config_to_hf`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from models.hf_rules import (FULL, LOCAL_ROPE, NOPE, ROPE, SLIDING, Windows,
                             all_sliding_if_window, cohere2_from_hf,
                             cohere2_to_hf, every_layer_windows_from_hf,
                             every_layer_windows_to_hf, every_nth_full,
                             gemma_from_hf, gemma_to_hf, gpt_oss_from_hf,
                             gpt_oss_to_hf,
                             layer_types_windows_from_hf,
                             layer_types_windows_to_hf, mixtral_from_hf,
                             mixtral_to_hf, no_keys_from_hf,
                             no_keys_to_hf, no_windows_from_hf,
                             no_windows_to_hf, qwen_windows_from_hf,
                             qwen_windows_to_hf, smollm3_from_hf,
                             smollm3_layer_types, smollm3_to_hf)

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
# `_rope_params`).
_ROPE_TYPES_WITH_ORIGINAL_LENGTH = ("llama3", "yarn")


# ----- The family table ------------------------------------------------------

# The `ModelConfig` switches a family fixes, with the values most families
# use (`Family.switches` overrides some).
SWITCH_DEFAULTS = dict(
    block="pre_norm",         # `ModelConfig.block`
    norm="rms",               # `ModelConfig.norm`
    norm_bias=False,
    mlp="swiglu",             # `ModelConfig.mlp`
    mlp_bias=False,
    fused_projections=False,  # qkv_proj and gate_up_proj (Phi-3)
    attention_bias=False,     # q/k/v biases
    attention_out_bias=False,  # o_proj bias
    qk_norm=None,             # None | "head" | "all_heads"
    rope_interleaved=False,
    scale_embeddings=False,   # embedding times sqrt(D)
    attn_sinks=False,         # a learned sink logit per query head
    router_bias=False,
)
# MLP kind -> the HF activation it computes (gpt-oss's config says "silu";
# its experts' clamped SwiGLU is fixed by the class).
MLP_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh",
                   "gelu": "gelu_pytorch_tanh", "clamped_swiglu": "silu"}


@dataclasses.dataclass(frozen=True)
class Family:
  """How one transformers model type maps to `ModelConfig`."""

  architecture: str  # config.json "architectures": [architecture]
  # transformers 5.24's class defaults for keys absent from config.json.
  defaults: Mapping[str, Any]
  windows_from_hf: Callable[[str, dict, int], Windows]
  windows_to_hf: Callable[[str, Windows], dict]
  # The ModelConfig switches the family fixes, over SWITCH_DEFAULTS
  # (`ModelConfig.__post_init__` enforces them, so every config writes back
  # to a config.json that transformers reads the same).
  switches: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # HF bias switches the class reads that swajax lacks: written False by
  # `config_to_hf`, refused when True by `fields_from_hf`.
  bias_switches: tuple[str, ...] = ()
  # HF bool switches that must hold the given value (None reads as False;
  # written so by `config_to_hf`).
  fixed_keys: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # `layer_types` when config.json has none (layer_types families).
  default_layer_types: Callable[[dict, int], list] | None = None
  # The family's own keys (`gemma_from_hf`, ...).
  extras_from_hf: Callable[[dict, int, Windows], dict] = no_keys_from_hf
  extras_to_hf: Callable[[Any], dict] = no_keys_to_hf
  # Key names: the activation and the norms' epsilon.
  activation_key: str = "hidden_act"
  eps_key: str = "rms_norm_eps"
  # `rope_parameters` per layer type ({"full_attention": ..., "sliding_attention":
  # ...}): (legacy top-level key of the sliding layers' base or None, the
  # default base of the sliding layers).
  rope_per_layer_type: tuple[str, float] | None = None

  @property
  def all_switches(self) -> dict[str, Any]:
    return {**SWITCH_DEFAULTS, **self.switches}


_GEMMA = dict(block="sandwich", norm="rms_one_plus", mlp="geglu",
              scale_embeddings=True)
_GEMMA_DEFAULTS = dict(num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, query_pre_attn_scalar=256,
                       sliding_window=4096, hidden_activation="gelu_pytorch_tanh")

FAMILIES: dict[str, Family] = {
    "mistral": Family(
        "MistralForCausalLM",
        dict(num_key_value_heads=8, sliding_window=4096,
             max_position_embeddings=131072),
        every_layer_windows_from_hf, every_layer_windows_to_hf),
    "qwen2": Family(
        "Qwen2ForCausalLM",
        dict(num_key_value_heads=32, use_sliding_window=False,
             sliding_window=4096, max_window_layers=28,
             max_position_embeddings=32768),
        qwen_windows_from_hf, qwen_windows_to_hf,
        switches=dict(attention_bias=True)),
    "qwen3": Family(
        "Qwen3ForCausalLM",
        dict(num_key_value_heads=32, head_dim=128, use_sliding_window=False,
             sliding_window=4096, max_window_layers=28,
             max_position_embeddings=32768),
        qwen_windows_from_hf, qwen_windows_to_hf,
        switches=dict(qk_norm="head"), bias_switches=("attention_bias",)),
    "llama": Family(
        "LlamaForCausalLM",
        dict(max_position_embeddings=2048),
        no_windows_from_hf, no_windows_to_hf,
        bias_switches=("attention_bias", "mlp_bias")),
    "gemma2": Family(
        "Gemma2ForCausalLM",
        dict(_GEMMA_DEFAULTS, max_position_embeddings=8192,
             final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
        layer_types_windows_from_hf, layer_types_windows_to_hf,
        switches=_GEMMA, bias_switches=("attention_bias",),
        fixed_keys=dict(use_bidirectional_attention=False),
        default_layer_types=every_nth_full(2),
        extras_from_hf=gemma_from_hf, extras_to_hf=gemma_to_hf,
        activation_key="hidden_activation"),
    "gemma3_text": Family(
        "Gemma3ForCausalLM",
        dict(_GEMMA_DEFAULTS, max_position_embeddings=131072, rope_theta=1e6,
             final_logit_softcapping=None, attn_logit_softcapping=None),
        layer_types_windows_from_hf, layer_types_windows_to_hf,
        switches=dict(_GEMMA, qk_norm="head"), bias_switches=("attention_bias",),
        fixed_keys=dict(use_bidirectional_attention=False),
        default_layer_types=every_nth_full(6, "sliding_window_pattern"),
        extras_from_hf=gemma_from_hf, extras_to_hf=gemma_to_hf,
        activation_key="hidden_activation",
        rope_per_layer_type=("rope_local_base_freq", 10000.0)),
    "ministral": Family(
        "MinistralForCausalLM",
        dict(num_key_value_heads=8, sliding_window=4096,
             max_position_embeddings=131072),
        layer_types_windows_from_hf, layer_types_windows_to_hf,
        default_layer_types=all_sliding_if_window),
    "phi3": Family(
        "Phi3ForCausalLM",
        dict(sliding_window=None, rms_norm_eps=1e-5, max_position_embeddings=4096),
        every_layer_windows_from_hf, every_layer_windows_to_hf,
        switches=dict(fused_projections=True)),
    "starcoder2": Family(
        "Starcoder2ForCausalLM",
        dict(num_key_value_heads=2, sliding_window=None, norm_epsilon=1e-5,
             hidden_act="gelu_pytorch_tanh", max_position_embeddings=4096,
             tie_word_embeddings=True, initializer_range=0.018042),
        every_layer_windows_from_hf, every_layer_windows_to_hf,
        switches=dict(norm="layer_norm", norm_bias=True, mlp="gelu",
                      mlp_bias=True, attention_bias=True,
                      attention_out_bias=True),
        fixed_keys=dict(use_bias=True), eps_key="norm_epsilon"),
    "olmo3": Family(
        "Olmo3ForCausalLM",
        dict(rms_norm_eps=1e-5, rope_theta=500000.0, sliding_window=4096,
             max_position_embeddings=2048),
        layer_types_windows_from_hf, layer_types_windows_to_hf,
        switches=dict(block="post_norm", qk_norm="all_heads"),
        bias_switches=("attention_bias",),
        default_layer_types=every_nth_full(4),
        rope_per_layer_type=(None, 500000.0)),
    "smollm3": Family(
        "SmolLM3ForCausalLM",
        dict(num_key_value_heads=4, rope_theta=2e6, use_sliding_window=False,
             sliding_window=None, max_position_embeddings=32768,
             tie_word_embeddings=True),
        layer_types_windows_from_hf, layer_types_windows_to_hf,
        bias_switches=("attention_bias", "mlp_bias"),
        default_layer_types=smollm3_layer_types,
        extras_from_hf=smollm3_from_hf, extras_to_hf=smollm3_to_hf),
    "cohere2": Family(
        "Cohere2ForCausalLM",
        dict(layer_norm_eps=1e-5, logit_scale=0.0625, sliding_window=4096,
             max_position_embeddings=8192, tie_word_embeddings=True),
        layer_types_windows_from_hf, layer_types_windows_to_hf,
        switches=dict(block="parallel", norm="layer_norm", rope_interleaved=True),
        bias_switches=("attention_bias",),
        default_layer_types=every_nth_full(4, "sliding_window_pattern"),
        extras_from_hf=cohere2_from_hf, extras_to_hf=cohere2_to_hf,
        eps_key="layer_norm_eps"),
    "mixtral": Family(
        "MixtralForCausalLM",
        dict(num_key_value_heads=8, sliding_window=None, rope_theta=1e6,
             rms_norm_eps=1e-5, max_position_embeddings=131072,
             num_local_experts=8, num_experts_per_tok=2,
             router_aux_loss_coef=0.001, router_jitter_noise=0.0),
        every_layer_windows_from_hf, every_layer_windows_to_hf,
        extras_from_hf=mixtral_from_hf, extras_to_hf=mixtral_to_hf),
    "gpt_oss": Family(
        "GptOssForCausalLM",
        dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880,
             num_hidden_layers=36, num_attention_heads=64,
             num_key_value_heads=8, head_dim=64, sliding_window=128,
             rms_norm_eps=1e-5, max_position_embeddings=131072,
             rope_theta=150000.0,
             rope_parameters=dict(rope_type="yarn", factor=32.0,
                                  beta_fast=32.0, beta_slow=1.0,
                                  truncate=False,
                                  original_max_position_embeddings=4096),
             num_local_experts=128, num_experts_per_tok=4, swiglu_alpha=1.702,
             swiglu_limit=7.0, router_aux_loss_coef=0.001),
        layer_types_windows_from_hf, layer_types_windows_to_hf,
        switches=dict(mlp="clamped_swiglu", mlp_bias=True, attention_bias=True,
                      attention_out_bias=True, attn_sinks=True,
                      router_bias=True),
        fixed_keys=dict(attention_bias=True),
        default_layer_types=every_nth_full(2),
        extras_from_hf=gpt_oss_from_hf, extras_to_hf=gpt_oss_to_hf),
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
  dropout, biases, RoPE variants), naming the field.
  """
  if isinstance(config, (str, os.PathLike)):
    config = read_config_json(os.fspath(config))
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
  windows = family.windows_from_hf(family, hf, num_layers)
  rope = (_per_layer_type_rope_from_hf(family, hf, windows)
          if family.rope_per_layer_type else _flat_rope_from_hf(hf))
  fields = dict(
      model_type=model_type,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=num_layers,
      num_q_heads=num_q_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_q_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_q_heads,
      layer_windows=windows,
      max_position_embeddings=hf["max_position_embeddings"],
      rms_norm_eps=float(hf.get(family.eps_key, 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      initializer_range=float(hf.get("initializer_range", 0.02)),
      **rope,
      **family.all_switches,
  )
  return {**fields, **family.extras_from_hf(hf, num_layers, windows)}


def read_config_json(path: str) -> dict:
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


# Dropout keys of the families' configs: swajax has no dropout.
_DROPOUT_KEYS = ("attention_dropout", "resid_pdrop", "embd_pdrop",
                 "residual_dropout", "embedding_dropout")


def _check_unsupported(model_type, hf):
  """Raises for HF settings this implementation would not reproduce exactly."""
  family = FAMILIES[model_type]
  expected_act = MLP_ACTIVATIONS[family.all_switches["mlp"]]
  act = hf.get(family.activation_key, "silu")
  if act != expected_act:
    raise ValueError(
        f"{family.activation_key}={act!r}: only {expected_act!r} is "
        f"implemented for {family.architecture}")
  if hf.get("quantization_config"):
    _check_quantization(model_type, hf)
  for key in _DROPOUT_KEYS:
    dropout = hf.get(key, 0.0) or 0.0
    if dropout != 0:
      raise ValueError(
          f"{key}={dropout!r}: swajax has no dropout; expected 0.0")
  if "attention_bias" in family.bias_switches and hf.get("attention_bias", False):
    raise ValueError(
        f"attention_bias=True with model_type={model_type!r}: adds biases to "
        "q/k/v and o_proj, which swajax does not implement for this family")
  if hf.get("mlp_bias", False):  # refused whichever family reads it
    raise ValueError("mlp_bias=True: MLP biases are not implemented")
  for key, value in family.fixed_keys.items():
    if bool(hf.get(key, value)) != value:
      raise ValueError(f"{key}={hf[key]!r} with model_type={model_type!r}: "
                       f"expected {value!r}")


# ----- Quantized checkpoints --------------------------------------------------

# MXFP4, the one quantization read (gpt-oss's released checkpoints store their
# experts so; `swajax.io.mxfp4` dequantizes them as transformers does): values per
# shared scale, along a projection's input axis.
MXFP4_BLOCK = 32
# The keys of an MXFP4 quantization_config (transformers' `Mxfp4Config`);
# `dequantize` chooses how transformers runs it, not what is stored.
_MXFP4_KEYS = ("quant_method", "modules_to_not_convert", "dequantize")


def mxfp4_expert_layers(config: dict, num_layers: int) -> frozenset[int]:
  """The layers (of `num_layers`) whose experts the checkpoint of the HF
  config dict `config` stores in MXFP4; `config` is one `fields_from_hf`
  accepted (which refuses any other quantization and a malformed MXFP4 one).

  No layer without a quantization_config. With gpt-oss's MXFP4 one, every layer
  whose `model.layers.{i}.mlp.experts` no `modules_to_not_convert` pattern
  names: transformers' rule (`should_convert_module`), a pattern names a
  module when it matches as a regex from the start of the name up to a
  module boundary ("model.layers.1" names "model.layers.1.mlp", not
  "model.layers.11.mlp"; "model.layers.*.mlp" names every layer's), or when
  the name ends with it.
  """
  if not config.get("quantization_config"):
    return frozenset()
  patterns = config["quantization_config"].get("modules_to_not_convert") or []
  names = lambda module: any(
      re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", module) or module.endswith(p)
      for p in patterns)
  return frozenset(i for i in range(num_layers)
                   if not names(f"model.layers.{i}.mlp.experts"))


def _check_quantization(model_type, hf) -> None:
  """ValueError for a quantization_config other than gpt-oss's MXFP4, an
  unknown key of it (it might change the math), a malformed
  `modules_to_not_convert`, or expert sizes MXFP4 blocks do not divide."""
  quantization = hf["quantization_config"]
  method = quantization.get("quant_method") if isinstance(quantization, dict) else None
  if method != "mxfp4" or model_type != "gpt_oss":
    raise ValueError(
        f"quantization_config (quant_method={method!r}) with model_type="
        f"{model_type!r}: swajax reads float32 / bfloat16 / float16 weights, "
        "and gpt-oss's MXFP4 experts (quant_method 'mxfp4'); dequantize it "
        "first (transformers: from_pretrained, then save_pretrained)")
  unknown = sorted(set(quantization) - set(_MXFP4_KEYS))
  if unknown:
    raise ValueError(f"quantization_config[{unknown[0]!r}]: unknown MXFP4 key; "
                     f"expected only {list(_MXFP4_KEYS)}")
  if not isinstance(quantization.get("dequantize", False), bool):
    raise ValueError(f"quantization_config['dequantize']="
                     f"{quantization['dequantize']!r}: expected a bool")
  patterns = quantization.get("modules_to_not_convert") or []
  if not (isinstance(patterns, list) and all(isinstance(p, str) for p in patterns)):
    raise ValueError(f"quantization_config['modules_to_not_convert']={patterns!r}: "
                     "expected a list of module names or regexes")
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"quantization_config['modules_to_not_convert'] pattern "
                       f"{p!r}: not a regex ({e})") from e
  for key in ("hidden_size", "intermediate_size"):
    if hf[key] % MXFP4_BLOCK:
      raise ValueError(f"{key}={hf[key]!r} with MXFP4 experts: expected a "
                       f"multiple of {MXFP4_BLOCK} (values per scale)")


def _flat_rope_from_hf(hf) -> dict:
  """One RoPE for every layer: `rope_scaling` / `rope_parameters` (HF 4 / 5).

  As transformers 5: `rope_scaling` wins over `rope_parameters`; rope_theta
  comes from the dict, else the top level, else 10000 (the family's default
  when it has one); llama3 and yarn take original_max_position_embeddings
  from the top level, else the dict, else max_position_embeddings.
  """
  params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  theta, scaling = _rope_params(params, hf, hf.get("rope_theta", 10000.0))
  return dict(rope_theta=float(theta), rope_scaling=scaling)


def _per_layer_type_rope_from_hf(family, hf, windows) -> dict:
  """Gemma 3 / Olmo 3: `rope_parameters` {"full_attention": {...},
  "sliding_attention": {...}} as transformers 5 writes it, or the legacy
  keys: rope_theta (+ rope_scaling) for full layers, the family's local key
  (Gemma 3: rope_local_base_freq; Olmo 3: none, as transformers 5.24 gives
  its sliding layers 500000 whatever rope_theta says) for sliding layers. Sliding layers take
  default RoPE of their own base (`LOCAL_ROPE`), full ones the (scaled) RoPE.
  """
  local_key, local_default = family.rope_per_layer_type
  params = hf.get("rope_parameters") or {}
  if set(params) - {FULL, SLIDING}:
    raise ValueError(
        f"rope_parameters={params!r}: {family.architecture} expects a dict per "
        f"layer type ({FULL!r}, {SLIDING!r}); transformers ignores other keys")
  full = dict(params.get(FULL) or {})
  full.update(hf.get("rope_scaling") or {})
  theta, scaling = _rope_params(full, hf, hf.get("rope_theta", family.defaults.get(
      "rope_theta", 10000.0)))
  sliding = dict(params.get(SLIDING) or {})
  local_theta, local_scaling = _rope_params(
      sliding, hf, hf.get(local_key, local_default) if local_key else local_default)
  if local_scaling is not None:
    raise ValueError(
        f"rope_parameters[{SLIDING!r}]={params[SLIDING]!r}: sliding layers "
        "support default RoPE only")
  return dict(rope_theta=float(theta), rope_scaling=scaling,
              local_rope_theta=float(local_theta),
              layer_rope=tuple(ROPE if w is None else LOCAL_ROPE for w in windows))


def _rope_params(params: dict, hf: dict, default_theta):
  """(rope_theta, rope_scaling items or None) from one RoPE dict (see
  `_flat_rope_from_hf`)."""
  params = dict(params)
  theta = params.pop("rope_theta", default_theta)
  rope_type = params.pop("rope_type", params.pop("type", "default"))
  factor = params.pop("partial_rotary_factor",
                      hf.get("partial_rotary_factor", 1.0))
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
  one window for all layers; Qwen: one window size; Llama: none) or its
  `layer_rope`.
  """
  family = FAMILIES[config.model_type]
  windows = family.windows_to_hf(family.architecture, config.layer_windows)
  rope = {"rope_type": "default", **(config.rope_scaling_dict or {}),
          "rope_theta": config.rope_theta}
  if family.rope_per_layer_type:
    expected = tuple(ROPE if w is None else LOCAL_ROPE
                     for w in config.layer_windows)
    if config.layer_rope_kinds != expected:
      raise ValueError(
          f"layer_rope={config.layer_rope!r}: HF {family.architecture} has "
          f"the local RoPE on exactly the sliding layers, expected {expected!r}")
    rope = {FULL: rope, SLIDING: {"rope_type": "default",
                                  "rope_theta": config.local_rope_theta}}
  elif LOCAL_ROPE in config.layer_rope_kinds:
    raise ValueError(f"layer_rope={config.layer_rope!r}: HF "
                     f"{family.architecture} has one RoPE base")
  elif NOPE in config.layer_rope_kinds and family.extras_to_hf is no_keys_to_hf:
    raise ValueError(f"layer_rope={config.layer_rope!r}: HF "
                     f"{family.architecture} applies RoPE to every layer")
  hf = {
      "architectures": [family.architecture],
      "model_type": config.model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_q_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      family.activation_key: MLP_ACTIVATIONS[config.mlp],
      "max_position_embeddings": config.max_position_embeddings,
      family.eps_key: config.rms_norm_eps,
      "tie_word_embeddings": config.tie_word_embeddings,
      "rope_parameters": rope,
      "attention_dropout": 0.0,
      "initializer_range": config.initializer_range,
      # swajax's embedding has no padding row; some class defaults (Phi-3:
      # 32000, SmolLM3: 128004) lie outside a smaller vocab, which torch refuses.
      "pad_token_id": None,
      **windows,
      **{key: False for key in family.bias_switches},
      **family.fixed_keys,
      **family.extras_to_hf(config),
  }
  if not family.rope_per_layer_type:
    hf["rope_theta"] = config.rope_theta
  return hf

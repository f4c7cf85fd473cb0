"""The per-family rules of `models.hf_config`: HF config.json keys <-> the
`ModelConfig` fields they set, one small pair of functions per rule.

Window rules (layer_windows from `sliding_window`, `use_sliding_window` +
`max_window_layers`, or `layer_types`, and back), default `layer_types` of
each family, and family-specific keys (Gemma's scale and softcaps, Cohere2's
logit scale and NoPE full layers, SmolLM3's `no_rope_layers`, the experts of
Mixtral and gpt-oss). `FAMILIES`
rows in `models.hf_config` name which rules a family uses; this module
imports nothing of `models`.
"""

from __future__ import annotations

SLIDING, FULL = "sliding_attention", "full_attention"  # HF layer_types entries
Windows = tuple[int | None, ...]  # `ModelConfig.layer_windows`
# `ModelConfig.layer_rope` entries: the layer's positional embedding (RoPE of
# rope_theta / rope_scaling, default RoPE of local_rope_theta, or none).
ROPE, LOCAL_ROPE, NOPE = "rope", "local_rope", "nope"


# ----- Window rules: config.json <-> layer_windows ----------------------------
# from_hf(family, hf, num_layers) -> layer_windows, with family the `Family`
# row and hf the config.json dict over the family's defaults;
# to_hf(architecture, layer_windows) -> the family's window keys of
# config.json, or ValueError if it cannot express them.

def _window_size(architecture: str, windows: Windows) -> int | None:
  """The one sliding window size of `windows` (None: no sliding layer)."""
  sizes = {w for w in windows if w is not None}
  if len(sizes) > 1:
    raise ValueError(
        f"layer_windows={windows!r}: HF {architecture} has one "
        "sliding_window size for all sliding layers")
  return sizes.pop() if sizes else None


def every_layer_windows_from_hf(family, hf, num_layers) -> Windows:
  """`sliding_window` on every layer; `layer_types` must agree (Mistral
  ignores it)."""
  window = hf.get("sliding_window")
  layer_types = hf.get("layer_types")
  if layer_types is not None and list(layer_types) != [
      SLIDING if window is not None else FULL] * num_layers:
    raise ValueError(
        f"layer_types={layer_types!r}: "
        f"{family.architecture} ignores layer_types and uses "
        f"sliding_window={window!r} on every layer")
  return (window,) * num_layers


def every_layer_windows_to_hf(architecture, windows) -> dict:
  window = _window_size(architecture, windows)
  if window is not None and None in windows:
    raise ValueError(
        f"layer_windows={windows!r}: HF {architecture} applies sliding_window "
        "to every layer or to none")
  return {"sliding_window": window}


def qwen_windows_from_hf(family, hf, num_layers) -> Windows:
  """`layer_types` when given, else layer i slides iff `use_sliding_window`
  and i >= `max_window_layers`; the window is None unless use_sliding_window."""
  window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
  layer_types = hf.get("layer_types")
  if layer_types is None:
    first = hf.get("max_window_layers", 28)
    layer_types = [SLIDING if window is not None and i >= first else FULL
                   for i in range(num_layers)]
  _check_layer_types(layer_types, num_layers)
  if SLIDING in layer_types and window is None:
    raise ValueError(
        f"layer_types={layer_types!r} has sliding layers but no window "
        f"(use_sliding_window={hf.get('use_sliding_window')!r}, "
        f"sliding_window={hf.get('sliding_window')!r})")
  return tuple(window if t == SLIDING else None for t in layer_types)


def qwen_windows_to_hf(architecture, windows) -> dict:
  window = _window_size(architecture, windows)
  sliding = [w is not None for w in windows]
  return {"use_sliding_window": window is not None,
          "sliding_window": window,
          "max_window_layers": sliding.index(True) if window else len(windows),
          "layer_types": [SLIDING if s else FULL for s in sliding]}


def no_windows_from_hf(family, hf, num_layers) -> Windows:
  """Full causal on every layer; a `sliding_window` key is refused (the
  family's transformers class ignores it)."""
  if hf.get("sliding_window") is not None:
    raise ValueError(
        f"sliding_window={hf['sliding_window']!r}: transformers ignores it "
        f"for {family.architecture}; use model_type='mistral'")
  return (None,) * num_layers


def no_windows_to_hf(architecture, windows) -> dict:
  if _window_size(architecture, windows) is not None:
    raise ValueError(
        f"layer_windows={windows!r}: HF {architecture} has no sliding window; "
        "use model_type='mistral' or 'qwen2'")
  return {}


def layer_types_windows_from_hf(family, hf, num_layers) -> Windows:
  """`layer_types` (absent: the family's `default_layer_types`) with one
  `sliding_window` on the sliding layers. A family with a
  `use_sliding_window` switch (SmolLM3) must have it on for sliding layers:
  transformers' eager mask and its flash path disagree otherwise."""
  layer_types = hf.get("layer_types")
  if layer_types is None:
    layer_types = family.default_layer_types(hf, num_layers)
  _check_layer_types(layer_types, num_layers)
  window = hf.get("sliding_window")
  if SLIDING in layer_types and (window is None
                                 or not hf.get("use_sliding_window", True)):
    raise ValueError(
        f"layer_types={list(layer_types)!r} has sliding layers but "
        f"sliding_window={window!r}, use_sliding_window="
        f"{hf.get('use_sliding_window', True)!r}: expected a window, switched on")
  return tuple(window if t == SLIDING else None for t in layer_types)


def layer_types_windows_to_hf(architecture, windows) -> dict:
  window = _window_size(architecture, windows)
  return {"sliding_window": window,
          "layer_types": [FULL if w is None else SLIDING for w in windows]}


def _check_layer_types(layer_types, num_layers):
  if len(layer_types) != num_layers or set(layer_types) - {SLIDING, FULL}:
    raise ValueError(
        f"layer_types={layer_types!r}: expected {num_layers} entries of "
        f"{SLIDING!r} / {FULL!r}")


def every_nth_full(default_period: int, key: str | None = None):
  """Default `layer_types`: layer i is full iff (i + 1) % period == 0, the
  period read from `key` (HF's legacy `sliding_window_pattern`) if given."""
  def layer_types(hf, num_layers):
    period = hf.get(key, default_period) if key else default_period
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(num_layers)]
  return layer_types


def all_sliding_if_window(hf, num_layers):
  """Ministral: every layer slides when `sliding_window` is set."""
  return [SLIDING if hf.get("sliding_window") is not None else FULL] * num_layers


def smollm3_layer_types(hf, num_layers):
  """SmolLM3: a layer slides iff use_sliding_window, a window is set and the
  layer has no RoPE (transformers 5.24's rule)."""
  uses_rope = _smollm3_rope_flags(hf, num_layers)
  slides = hf.get("use_sliding_window") and hf.get("sliding_window") is not None
  return [SLIDING if slides and not rope else FULL for rope in uses_rope]


# ----- Family-specific keys: config.json <-> ModelConfig fields ---------------
# Each pair reads (hf, num_layers, layer_windows) -> ModelConfig fields and
# writes a ModelConfig -> config.json keys.

def gemma_from_hf(hf, num_layers, windows) -> dict:
  return dict(query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
              attn_softcap=_optional_float(hf.get("attn_logit_softcapping")),
              final_logit_softcap=_optional_float(hf.get("final_logit_softcapping")))


def gemma_to_hf(config) -> dict:
  scalar = config.query_pre_attn_scalar  # an int in transformers' config class
  return {"query_pre_attn_scalar": int(scalar) if float(scalar).is_integer()
          else scalar,
          "attn_logit_softcapping": config.attn_softcap,
          "final_logit_softcapping": config.final_logit_softcap,
          "hidden_activation": "gelu_pytorch_tanh"}


def cohere2_from_hf(hf, num_layers, windows) -> dict:
  """Full-attention layers have no positional embedding (NoPE); head_dim is
  always D / N (transformers overrides a config.json `head_dim`)."""
  return dict(logit_scale=float(hf["logit_scale"]),
              head_dim=hf["hidden_size"] // hf["num_attention_heads"],
              layer_rope=tuple(NOPE if w is None else ROPE for w in windows))


def cohere2_to_hf(config) -> dict:
  nope = tuple(NOPE if w is None else ROPE for w in config.layer_windows)
  if config.layer_rope_kinds != nope:
    raise ValueError(
        f"layer_rope={config.layer_rope!r}: HF Cohere2ForCausalLM has RoPE "
        f"on exactly the sliding layers, expected {nope!r}")
  if config.head_dim * config.num_q_heads != config.hidden_size:
    raise ValueError(
        f"head_dim={config.head_dim}: HF Cohere2ForCausalLM uses hidden_size "
        f"/ num_attention_heads = {config.hidden_size / config.num_q_heads}")
  return {"logit_scale": config.logit_scale}


def _smollm3_rope_flags(hf, num_layers) -> list[int]:
  """`no_rope_layers`: 1 = the layer uses RoPE (absent: every
  `no_rope_layer_interval`-th layer has none)."""
  flags = hf.get("no_rope_layers")
  if flags is None:
    interval = hf.get("no_rope_layer_interval", 4)
    flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
  if len(flags) != num_layers or set(flags) - {0, 1}:
    raise ValueError(f"no_rope_layers={flags!r}: expected {num_layers} "
                     "entries of 0 (NoPE) / 1 (RoPE)")
  return list(flags)


def smollm3_from_hf(hf, num_layers, windows) -> dict:
  return dict(layer_rope=tuple(ROPE if rope else NOPE for rope in
                               _smollm3_rope_flags(hf, num_layers)))


def smollm3_to_hf(config) -> dict:
  if LOCAL_ROPE in config.layer_rope_kinds:
    raise ValueError(f"layer_rope={config.layer_rope!r}: HF SmolLM3 has one "
                     f"RoPE base; expected {ROPE!r} / {NOPE!r} entries")
  return {"no_rope_layers": [int(k == ROPE) for k in config.layer_rope_kinds],
          "use_sliding_window": any(w is not None for w in config.layer_windows)}


def _experts_from_hf(hf) -> dict:
  """The mixture-of-experts keys Mixtral and gpt-oss share."""
  return dict(num_experts=hf["num_local_experts"],
              experts_per_token=hf["num_experts_per_tok"],
              router_aux_loss_coef=float(hf["router_aux_loss_coef"]))


def _experts_to_hf(config) -> dict:
  return {"num_local_experts": config.num_experts,
          "num_experts_per_tok": config.experts_per_token,
          "router_aux_loss_coef": config.router_aux_loss_coef,
          "output_router_logits": False}


def mixtral_from_hf(hf, num_layers, windows) -> dict:
  """Experts; `router_jitter_noise` (multiplicative noise on the router's
  input in training) must be 0: swajax does not add it."""
  jitter = hf.get("router_jitter_noise") or 0.0
  if jitter != 0:
    raise ValueError(f"router_jitter_noise={jitter!r}: swajax's router adds "
                     "no noise; expected 0.0")
  return _experts_from_hf(hf)


def mixtral_to_hf(config) -> dict:
  return {**_experts_to_hf(config), "router_jitter_noise": 0.0}


def gpt_oss_from_hf(hf, num_layers, windows) -> dict:
  """Experts and the clamped SwiGLU's alpha and limit."""
  return dict(_experts_from_hf(hf), swiglu_alpha=float(hf["swiglu_alpha"]),
              swiglu_limit=float(hf["swiglu_limit"]))


def gpt_oss_to_hf(config) -> dict:
  return {**_experts_to_hf(config), "swiglu_alpha": config.swiglu_alpha,
          "swiglu_limit": config.swiglu_limit}


def no_keys_from_hf(hf, num_layers, windows) -> dict:
  return {}


def no_keys_to_hf(config) -> dict:
  return {}


def _optional_float(x):
  return None if x is None else float(x)

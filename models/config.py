"""`ModelConfig`: one frozen dataclass for the decoder families and its presets.

The families (`models.hf_config.FAMILIES`) differ only in named variant
fields: the block layout (pre-norm, Gemma's sandwich, Olmo's post-norm,
Cohere's parallel block), the norm kind, the MLP kind, biases, fused
projections, q/k norms, RoPE per layer (or none), the embedding scale, the
attention scale and softcap, and the logit scale and softcap; and in how
windows are spread over the layers. `ModelConfig.from_hf` / `to_hf` read and
write a Hugging Face `config.json` through `models.hf_config`, the one place
of those rules.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from models.hf_config import (FAMILIES, LOCAL_ROPE, NOPE, ROPE,
                              check_model_type, check_rope_scaling,
                              config_to_hf, fields_from_hf)
from pallas_kernels.validation import check_positive_int


# Variant values (`ModelConfig` fields of the same name).
BLOCKS = {
    # x + attn(n1(x)); x + mlp(n2(x))  (Llama, Mistral, Qwen, Phi-3, ...)
    "pre_norm": ("input_norm", "post_attn_norm"),
    # x + n2(attn(n1(x))); x + n4(mlp(n3(x)))  (Gemma 2 / 3)
    "sandwich": ("input_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm"),
    # x + n2(attn(x)); x + n4(mlp(x))  (Olmo 2 / 3)
    "post_norm": ("post_attn_norm", "post_mlp_norm"),
    # x + attn(n1(x)) + mlp(n1(x))  (Cohere)
    "parallel": ("input_norm",),
}  # block -> the DecoderLayer norms it has, in order
NORMS = ("rms", "rms_one_plus", "layer_norm")  # see `models.layers.Norm`
MLPS = ("swiglu", "geglu", "gelu", "clamped_swiglu")  # see `models.layers.MLP`
QK_NORMS = (None, "head", "all_heads")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer: norms, RoPE, GQA attention, gated MLP.

  Dimension letters: V vocab, D hidden_size, F intermediate_size, N query heads,
  K kv heads, H head_dim, W window.
  """

  # Family: a key of `hf_config.FAMILIES` ("mistral", "gemma2", ...).
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
  # Per layer: "rope" (rope_theta, rope_scaling), "local_rope" (default RoPE
  # of base local_rope_theta: Gemma 3's sliding layers) or "nope" (no
  # positional embedding: Cohere2's full layers, SmolLM3); None = all "rope".
  layer_rope: tuple[str, ...] | None = None
  local_rope_theta: float | None = None
  rope_interleaved: bool = False  # rotate pairs (2i, 2i+1), not (i, i + H/2) (Cohere)
  # Normalisation (eps of every norm) and output head.
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  # Attention math: scores q·k * query_pre_attn_scalar**-0.5 (None: H**-0.5),
  # then softcap * tanh(scores / softcap) if attn_softcap (Gemma 2).
  query_pre_attn_scalar: float | None = None
  attn_softcap: float | None = None
  # Logits: times logit_scale (Cohere), then softcapped (Gemma 2).
  logit_scale: float | None = None
  final_logit_softcap: float | None = None
  # Family switches (must match `hf_config.FAMILIES[model_type].switches`).
  block: str = "pre_norm"        # a key of BLOCKS
  norm: str = "rms"              # NORMS: RMSNorm, RMSNorm times (1 + w) (Gemma), LayerNorm
  norm_bias: bool = False        # LayerNorm with a bias (Starcoder2)
  mlp: str = "swiglu"            # MLPS: SwiGLU, GeGLU (Gemma), GELU (Starcoder2)
  mlp_bias: bool = False         # MLP projections have biases (Starcoder2)
  fused_projections: bool = False  # one qkv_proj and one gate_up_proj (Phi-3)
  attention_bias: bool = False   # q/k/v projections have a bias (Qwen2)
  attention_out_bias: bool = False  # o_proj has a bias (Starcoder2)
  qk_norm: str | None = None     # norm q and k per head (Qwen3, Gemma 3) or over all heads (Olmo 3)
  scale_embeddings: bool = False  # embedding times sqrt(D), in the compute dtype (Gemma)
  attn_sinks: bool = False       # one learned sink logit per query head (gpt-oss)
  router_bias: bool = False      # the router's linear has a bias (gpt-oss)
  # Mixture of experts (Mixtral, gpt-oss): with num_experts E > 0 every
  # layer's MLP is E experts of intermediate_size F, of which the router
  # picks experts_per_token (k) per token, weighted by the softmax of their
  # logits (`models.moe.route`: Mixtral's and gpt-oss's rule alike).
  # router_aux_loss_coef weighs the load-balancing loss in training (HF's
  # key; `models.moe.load_balancing_loss`).
  num_experts: int = 0           # E (0: a dense MLP)
  experts_per_token: int = 0     # k, 1 <= k <= E
  router_aux_loss_coef: float = 0.0
  # "clamped_swiglu" (gpt-oss): (clip(up, ±limit) + 1) * g * sigmoid(alpha *
  # g), g = min(gate, limit).
  swiglu_alpha: float | None = None
  swiglu_limit: float | None = None
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
    for name, expected in family.all_switches.items():
      if getattr(self, name) != expected:
        raise ValueError(
            f"{name}={getattr(self, name)!r} with model_type="
            f"{self.model_type!r}: expected {expected!r} (the "
            f"{family.architecture} layout)")
    for name, allowed in (("block", tuple(BLOCKS)), ("norm", NORMS),
                          ("mlp", MLPS), ("qk_norm", QK_NORMS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name}={getattr(self, name)!r}: expected one of "
                         f"{allowed}")
    if self.layer_rope is not None:
      object.__setattr__(self, "layer_rope", tuple(self.layer_rope))
      if (len(self.layer_rope) != self.num_layers
          or set(self.layer_rope) - {ROPE, LOCAL_ROPE, NOPE}):
        raise ValueError(
            f"layer_rope={self.layer_rope!r}: expected {self.num_layers} "
            f"entries of {ROPE!r} / {LOCAL_ROPE!r} / {NOPE!r}")
    if (LOCAL_ROPE in self.layer_rope_kinds) != (self.local_rope_theta is not None):
      raise ValueError(
          f"local_rope_theta={self.local_rope_theta!r}, layer_rope="
          f"{self.layer_rope!r}: expected a base exactly when some layer is "
          f"{LOCAL_ROPE!r}")
    for name in ("query_pre_attn_scalar", "attn_softcap", "logit_scale",
                 "final_logit_softcap"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"{name}={value!r}: expected None or a float > 0")
    self._check_experts()
    if (self.mlp == "clamped_swiglu") != (self.swiglu_alpha is not None
                                          and self.swiglu_limit is not None):
      raise ValueError(
          f"swiglu_alpha={self.swiglu_alpha!r}, swiglu_limit="
          f"{self.swiglu_limit!r} with mlp={self.mlp!r}: expected both "
          "exactly when mlp='clamped_swiglu'")
    if self.rope_scaling is not None:
      object.__setattr__(self, "rope_scaling",
                         tuple(sorted(dict(self.rope_scaling).items())))
      check_rope_scaling(dict(self.rope_scaling))

  def _check_experts(self):
    """num_experts and experts_per_token: both set (MoE) or both 0."""
    for name in ("num_experts", "experts_per_token"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r}: expected an int >= 0")
    if (self.num_experts > 0 and not 1 <= self.experts_per_token <= self.num_experts
        ) or (self.num_experts == 0 and self.experts_per_token):
      raise ValueError(
          f"num_experts={self.num_experts}, experts_per_token="
          f"{self.experts_per_token}: expected num_experts > 0 and 1 <= "
          "experts_per_token <= num_experts (a mixture of experts), or both 0 "
          "(a dense MLP)")
    if self.router_bias and not self.num_experts:
      raise ValueError("router_bias=True without experts: expected num_experts > 0")
    if not self.router_aux_loss_coef >= 0:
      raise ValueError(f"router_aux_loss_coef={self.router_aux_loss_coef!r}: "
                       "expected a float >= 0")

  @property
  def rope_scaling_dict(self) -> dict | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def layer_rope_kinds(self) -> tuple[str, ...]:
    """`layer_rope` with None spelled out: one entry per layer."""
    return self.layer_rope or (ROPE,) * self.num_layers

  @property
  def attn_scale(self) -> float | None:
    """The attention scale the op applies (None: its H**-0.5 default)."""
    if self.query_pre_attn_scalar is None:
      return None
    return self.query_pre_attn_scalar ** -0.5

  def with_full_attention(self) -> "ModelConfig":
    """The same model with every window removed (negative controls,
    benchmarks); each layer keeps its RoPE (`layer_rope`)."""
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


def _preset(model_type, windows, overrides, **family_fields):
  """A tiny config of `model_type`: its switches, `windows(num_layers)` and
  `family_fields` (which may also be functions of num_layers), overridden."""
  fields = {**_TINY, "model_type": model_type,
            **FAMILIES[model_type].all_switches, **overrides}
  num_layers = fields["num_layers"]
  derived = {"layer_windows": windows, **family_fields}
  for name, value in derived.items():
    if name not in overrides:
      fields[name] = value(num_layers) if callable(value) else value
  return ModelConfig(**fields)


def _alternating(period, window=128):
  """Layer i full iff (i + 1) % period == 0, the others window `window`."""
  return lambda n: tuple(None if (i + 1) % period == 0 else window
                         for i in range(n))


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


def gemma2_tiny(**overrides) -> ModelConfig:
  """As `mistral_tiny`, Gemma 2 layout: sliding (128) and full layers
  alternating, query_pre_attn_scalar 32, softcaps 50 / 30, tied embedding."""
  return _preset("gemma2", _alternating(2), overrides, query_pre_attn_scalar=32.0,
                 attn_softcap=50.0, final_logit_softcap=30.0,
                 tie_word_embeddings=True)


def gemma3_tiny(**overrides) -> ModelConfig:
  """As `gemma2_tiny`, Gemma 3 layout: q/k norms, no softcaps, every 6th
  layer full with RoPE base 1e6, sliding layers base 1e4."""
  return _preset("gemma3_text", _alternating(6), overrides,
                 query_pre_attn_scalar=32.0, tie_word_embeddings=True,
                 rope_theta=1e6, local_rope_theta=1e4,
                 layer_rope=lambda n: tuple(
                     ROPE if w is None else LOCAL_ROPE
                     for w in overrides.get("layer_windows",
                                            _alternating(6)(n))))


def ministral_tiny(**overrides) -> ModelConfig:
  """As `mistral_tiny`, Ministral layout: every 4th layer full."""
  return _preset("ministral", _alternating(4), overrides)


def phi3_tiny(**overrides) -> ModelConfig:
  """As `mistral_tiny`, Phi-3 layout: fused qkv / gate_up projections."""
  return _preset("phi3", lambda n: (128,) * n, overrides)


def starcoder2_tiny(**overrides) -> ModelConfig:
  """As `mistral_tiny`, Starcoder2 layout: LayerNorm and biases, GELU MLP,
  tied embedding."""
  return _preset("starcoder2", lambda n: (128,) * n, overrides,
                 tie_word_embeddings=True)


def olmo3_tiny(**overrides) -> ModelConfig:
  """As `mistral_tiny`, Olmo 3 layout: post-norm block, q/k norm over all
  heads, every 4th layer full."""
  windows = _alternating(4)
  return _preset("olmo3", windows, overrides, rope_theta=5e5,
                 local_rope_theta=5e5, layer_rope=lambda n: tuple(
                     ROPE if w is None else LOCAL_ROPE
                     for w in overrides.get("layer_windows", windows(n))))


def smollm3_tiny(**overrides) -> ModelConfig:
  """As `mistral_tiny`, SmolLM3 layout: every 4th layer without RoPE and
  sliding (128), the others full; tied embedding."""
  return _preset("smollm3", lambda n: tuple(
      128 if (i + 1) % 4 == 0 else None for i in range(n)), overrides,
      tie_word_embeddings=True, layer_rope=lambda n: tuple(
          NOPE if (i + 1) % 4 == 0 else ROPE for i in range(n)))


def mixtral_tiny(**overrides) -> ModelConfig:
  """As `mistral_tiny`, Mixtral layout: 4 SwiGLU experts of F 384, 2 per
  token, window 128 on every layer."""
  return _preset("mixtral", lambda n: (128,) * n,
                 {"intermediate_size": 384, "num_experts": 4,
                  "experts_per_token": 2, **overrides},
                 router_aux_loss_coef=0.02)


def gpt_oss_tiny(**overrides) -> ModelConfig:
  """As `mistral_tiny`, gpt-oss layout: attention sinks and biases, sliding
  (128) and full layers alternating, 4 clamped-SwiGLU experts of F 384 with
  biases, 2 per token (top-k then softmax), YaRN RoPE."""
  return _preset("gpt_oss", _alternating(2),
                 {"intermediate_size": 384, "num_experts": 4,
                  "experts_per_token": 2, **overrides},
                 swiglu_alpha=1.702, swiglu_limit=7.0,
                 router_aux_loss_coef=0.001, rope_theta=150000.0,
                 rope_scaling=(("beta_fast", 32.0), ("beta_slow", 1.0),
                               ("factor", 32.0),
                               ("original_max_position_embeddings", 4096),
                               ("rope_type", "yarn"), ("truncate", False)),
                 max_position_embeddings=131072, rms_norm_eps=1e-5)


def cohere2_tiny(**overrides) -> ModelConfig:
  """As `mistral_tiny`, Cohere2 layout: parallel block, interleaved RoPE on
  the sliding layers, every 4th layer full without RoPE, logit_scale 0.25."""
  windows = _alternating(4)
  return _preset("cohere2", windows, overrides, logit_scale=0.25,
                 tie_word_embeddings=True, layer_rope=lambda n: tuple(
                     NOPE if w is None else ROPE
                     for w in overrides.get("layer_windows", windows(n))))

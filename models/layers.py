"""Building blocks: norms (RMS, Gemma's 1 + w RMS, LayerNorm), the gated
activations (`gated_activation`, shared with the experts of `models.moe`), the
MLP (SwiGLU, GeGLU, clamped SwiGLU, GELU), parameter initialisers (RoPE:
`models.rope`).

Dimension letters: B batch, T sequence, D model dim, F MLP dim. Parameter
sharding names: "fsdp" (and None = replicated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig


def sharded(init, sharding: tuple):
  """`init` annotated with `sharding` (mesh axis names), as metadata only.

  Variables are created unsharded even inside a mesh context; place them with
  `nnx.get_partition_spec(nnx.state(model))` (e.g. as jit out_shardings).
  """
  return nnx.with_partitioning(init, sharding, eager_sharding=False)


def param_init(config: ModelConfig, sharding: tuple):
  """normal(0, initializer_range), annotated with `sharding`."""
  return sharded(nnx.initializers.normal(config.initializer_range), sharding)


class Norm(nnx.Module):
  """One norm over the last axis of size `dim`, in fp32, cast to `dtype`:
  [..., dim] -> [..., dim].

  kind "rms": x / sqrt(mean(x²) + eps) * w, w initialised to ones;
  "rms_one_plus" (Gemma): the same times (1 + w), w initialised to zeros;
  "layer_norm": (x - mean) / sqrt(var + eps) * w (+ bias if `bias`).
  """

  def __init__(self, dim: int, *, kind: str, eps: float, dtype, param_dtype,
               bias: bool = False, rngs: nnx.Rngs):
    init = nnx.initializers.zeros if kind == "rms_one_plus" else nnx.initializers.ones
    self.weight = nnx.Param(sharded(init, (None,))(rngs.params(), (dim,),
                                                   param_dtype))
    self.bias = (nnx.Param(sharded(nnx.initializers.zeros, (None,))(
        rngs.params(), (dim,), param_dtype)) if bias else None)
    self.kind = kind
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    if self.kind == "layer_norm":
      xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    weight = self.weight[...].astype(jnp.float32)
    if self.kind == "rms_one_plus":
      weight = 1.0 + weight
    xf = xf * weight
    if self.bias is not None:
      xf = xf + self.bias[...].astype(jnp.float32)
    return xf.astype(self.dtype)


def norm(config: ModelConfig, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs,
         bias: bool | None = None) -> Norm:
  """A `Norm` of `config`'s kind and eps over `dim` (bias: config.norm_bias)."""
  return Norm(dim, kind=config.norm, eps=config.rms_norm_eps, dtype=dtype,
              param_dtype=param_dtype,
              bias=config.norm_bias if bias is None else bias, rngs=rngs)


GATED_ACTIVATIONS = ("swiglu", "geglu", "clamped_swiglu")


def gated_activation(kind: str, gate, up, *, alpha: float | None = None,
                     limit: float | None = None):
  """The gated MLP activation `kind` of `gate` and `up` (same shape [..., F]),
  in their dtype:

    "swiglu"          silu(gate) * up
    "geglu"           gelu_tanh(gate) * up
    "clamped_swiglu"  (u + 1) * g * sigmoid(alpha * g), g = min(gate, limit),
                      u = clip(up, -limit, limit) (gpt-oss)

  `alpha` and `limit` are clamped_swiglu's (`ModelConfig.swiglu_alpha`,
  `swiglu_limit`); the other kinds ignore them.
  """
  if kind == "swiglu":
    return jax.nn.silu(gate) * up
  if kind == "geglu":
    return jax.nn.gelu(gate, approximate=True) * up
  if kind == "clamped_swiglu":
    if alpha is None or limit is None:
      raise ValueError(f"alpha={alpha!r}, limit={limit!r}: clamped_swiglu "
                       "needs both")
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1) * gate * jax.nn.sigmoid(alpha * gate)
  raise ValueError(f"kind={kind!r}: expected one of {GATED_ACTIVATIONS}")


class MLP(nnx.Module):
  """`config.mlp`: [B, T, D] -> [B, T, D].

  A gated kind: down(gated_activation(kind, gate(x), up(x))) ("swiglu",
  "geglu", "clamped_swiglu"); "gelu": down(gelu_tanh(up(x))) (Starcoder2's
  c_fc / c_proj). With `config.fused_projections` gate and up are one
  gate_up_proj [D, 2, F] (Phi-3); with `config.mlp_bias` every projection has
  a bias.
  """

  def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.kind = config.mlp
    self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
    bias = sharded(nnx.initializers.zeros, (None,))
    common = dict(dtype=dtype, param_dtype=param_dtype, bias_init=bias, rngs=rngs)
    reads_d = dict(kernel_init=param_init(config, ("fsdp", None)), **common)
    with_bias = lambda shape: shape if config.mlp_bias else None
    fused, gated = config.fused_projections, self.kind != "gelu"
    self.gate_up_proj = nnx.Einsum(
        "BTD,DGF->BTGF", (d, 2, f), with_bias((2, f)),
        **{**reads_d, "kernel_init": param_init(config, ("fsdp", None, None))}
    ) if fused else None
    self.gate_proj = nnx.Einsum("BTD,DF->BTF", (d, f), with_bias((f,)),
                                **reads_d) if gated and not fused else None
    self.up_proj = nnx.Einsum("BTD,DF->BTF", (d, f), with_bias((f,)),
                              **reads_d) if not fused else None
    self.down_proj = nnx.Einsum(
        "BTF,FD->BTD", (f, d), with_bias((d,)),
        kernel_init=param_init(config, (None, "fsdp")), **common)

  def __call__(self, x):
    if self.gate_up_proj is not None:
      gate_up = self.gate_up_proj(x)  # (B, T, 2, F)
      gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
    elif self.kind == "gelu":
      return self.down_proj(jax.nn.gelu(self.up_proj(x), approximate=True))
    else:
      gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(gated_activation(self.kind, gate, up,
                                           alpha=self.alpha, limit=self.limit))

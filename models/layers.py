"""Building blocks: RMSNorm, SwiGLU MLP, parameter initialisers (RoPE:
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


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x², last axis) + eps) * weight, in fp32, cast to `dtype`.

  Applies over the last axis of size `dim`: [..., dim] -> [..., dim].
  """

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    init = sharded(nnx.initializers.ones, (None,))
    self.weight = nnx.Param(init(rngs.params(), (dim,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (xf * self.weight[...].astype(jnp.float32)).astype(self.dtype)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); [B, T, D] -> [B, T, D]."""

  def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    reads_d = dict(kernel_init=param_init(config, ("fsdp", None)),
                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = nnx.Einsum("BTD,DF->BTF", (d, f), **reads_d)
    self.up_proj = nnx.Einsum("BTD,DF->BTF", (d, f), **reads_d)
    self.down_proj = nnx.Einsum(
        "BTF,FD->BTD", (f, d), kernel_init=param_init(config, (None, "fsdp")),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))

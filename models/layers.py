"""Building blocks: RMSNorm, rotary position embedding, SwiGLU MLP.

Dimension letters: B batch, T sequence, D model dim, F MLP dim, N heads,
H head dim. Parameter sharding names: "fsdp" (and None = replicated).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
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


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """RoPE inverse frequencies [H / 2] float32, with `config.rope_scaling` applied.

  Computed in float32 numpy as transformers does in torch, so the angles match
  bit for bit up to the cos/sin implementation.
  """
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta
                    ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  scaling = config.rope_scaling_dict
  if scaling is None:
    return inv_freq
  factor = scaling["factor"]
  if scaling["rope_type"] == "linear":
    return inv_freq / np.float32(factor)
  # "llama3": wavelengths above low_freq_wavelen are divided by `factor`,
  # below high_freq_wavelen kept, and interpolated smoothly in between.
  old_len = scaling["original_max_position_embeddings"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x, positions, inv_freq):
  """Rotates x [B, T, N, H] by angles positions [B, T] x inv_freq [H / 2].

  HF "rotate_half" convention: dimension h pairs with h + H/2 (not interleaved).
  Angles, cos and sin in fp32; the result in x.dtype.
  """
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # (B, T, H/2)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # (B, T, 1, H)
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


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

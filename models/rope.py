"""Rotary position embedding: the frequencies of `ModelConfig`'s RoPE (plain,
or scaled "linear" / "llama3" / "yarn", or the local base of "local_rope"
layers) and their rotation of q and k (halves, or interleaved pairs).

`rope_frequencies` is the one place RoPE frequencies are computed (float32
numpy, static per model); `apply_rope` rotates [B, T, N, H] activations by
them inside the model.

Dimension letters: B batch, T sequence, N heads, H head dim.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig


def rope_frequencies(config: ModelConfig, *, local: bool = False
                     ) -> tuple[np.ndarray, float]:
  """(inv_freq [H / 2] float32, attention_factor) for `config`'s RoPE.

  The one place RoPE frequencies are computed: plain RoPE, or
  `config.rope_scaling` ("linear", "llama3", "yarn") applied as transformers 5
  does; local=True: the plain RoPE of `config.local_rope_theta` (the
  "local_rope" layers of `config.layer_rope`). attention_factor multiplies
  cos and sin (yarn; 1.0 otherwise). Float32 numpy in the order of
  transformers' torch code, so the angles match bit for bit up to the cos/sin
  implementation.
  """
  dim = config.head_dim
  theta = config.local_rope_theta if local else config.rope_theta
  # theta^(2i / H), i < H / 2.
  pos_freqs = theta ** (
      np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
  inv_freq = 1.0 / pos_freqs
  scaling = None if local else config.rope_scaling_dict
  if scaling is None:
    return inv_freq, 1.0
  if scaling["rope_type"] == "linear":
    return inv_freq / np.float32(scaling["factor"]), 1.0
  if scaling["rope_type"] == "llama3":
    return _llama3_inv_freq(inv_freq, scaling), 1.0
  return _yarn(pos_freqs, inv_freq, scaling, config)


def _llama3_inv_freq(inv_freq, scaling):
  """Wavelengths above low_freq_wavelen are divided by `factor`, below
  high_freq_wavelen kept, and interpolated smoothly in between."""
  factor = scaling["factor"]
  old_len = scaling["original_max_position_embeddings"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(pos_freqs, inv_freq, scaling, config):
  """YaRN (arXiv 2309.00071): (inv_freq, attention_factor).

  Dimensions that turn more than beta_fast times over the original context
  keep their frequency, those turning less than beta_slow times are divided
  by `factor`, with a linear ramp between; attention_factor defaults to
  0.1 ln(factor) + 1 (or the ratio of the mscale / mscale_all_dim forms).
  Absent keys take transformers' defaults (beta_fast 32, beta_slow 1,
  truncate True; factor None = max_position / original_max_position).
  """
  dim, base = config.head_dim, config.rope_theta
  old_len = scaling["original_max_position_embeddings"]
  factor = scaling["factor"]
  if factor is None:
    factor = config.max_position_embeddings / old_len
  attention_factor = scaling.get("attention_factor")
  if attention_factor is None:
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
      attention_factor = (_yarn_mscale(factor, mscale)
                          / _yarn_mscale(factor, mscale_all_dim))
    else:
      attention_factor = _yarn_mscale(factor)

  def dimension_of(rotations):  # the dimension turning `rotations` times
    return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low = dimension_of(scaling.get("beta_fast") or 32)
  high = dimension_of(scaling.get("beta_slow") or 1)
  if scaling.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # as transformers: avoids dividing by zero
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
  interpolated = 1.0 / (factor * pos_freqs)
  return (interpolated * (1 - keep) + inv_freq * keep).astype(np.float32), float(
      attention_factor)


def _yarn_mscale(factor, mscale=1.0):
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def apply_rope(x, positions, inv_freq, attention_factor: float = 1.0, *,
               interleaved: bool = False):
  """Rotates x [B, T, N, H] by angles positions [B, T] x inv_freq [H / 2].

  HF "rotate_half" convention: dimension h pairs with h + H/2, rotated in
  x.dtype; interleaved=True (Cohere): dimension 2i pairs with 2i + 1, rotated
  in fp32. Angles, cos and sin in fp32, cos and sin times `attention_factor`
  (see `rope_frequencies`); the result in x.dtype.
  """
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # (B, T, H/2)
  if interleaved:
    angles = jnp.repeat(angles, 2, axis=-1)[:, :, None, :]  # (B, T, 1, H): a a b b ...
    cos = (jnp.cos(angles) * attention_factor).astype(x.dtype).astype(jnp.float32)
    sin = (jnp.sin(angles) * attention_factor).astype(x.dtype).astype(jnp.float32)
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)  # (B, T, N, H/2, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (xf * cos + rotated * sin).astype(x.dtype)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # (B, T, 1, H)
  cos = (jnp.cos(angles) * attention_factor).astype(x.dtype)
  sin = (jnp.sin(angles) * attention_factor).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin

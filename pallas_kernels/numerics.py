"""Numeric conventions every implementation shares: matmul precision, softcap."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def matmul_precision(dtype) -> lax.Precision:
  """HIGHEST for float32 inputs, DEFAULT for 16-bit ones.

  On GPU, DEFAULT on float32 operands would be TF32 (XLA and Triton dots
  alike), which the op never uses: float32 in means float32 dots. For bf16 /
  fp16 operands DEFAULT is the native dot (accumulated in fp32 where the
  caller asks for it).
  """
  if jnp.dtype(dtype) == jnp.float32:
    return lax.Precision.HIGHEST
  return lax.Precision.DEFAULT


def soft_cap(s, softcap: float | None):
  """`c * tanh(s / c)` of scaled scores, and the tanh (None without a cap).

  The tanh t is what a backward pass needs: d(c·tanh(s/c))/ds = 1 - t².
  Returns (s, None) unchanged when `softcap` is None.
  """
  if softcap is None:
    return s, None
  t = jnp.tanh(s / softcap)
  return softcap * t, t

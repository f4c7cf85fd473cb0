"""Numeric conventions every implementation shares: matmul precision, softcap,
the attention sink's gradient."""

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


def sink_gradient(sinks, lse, shift):
  """The gradient of the loss w.r.t. the sinks, [N] in `sinks.dtype`.

  sinks: [N]; lse: [B, N, T] fp32, each row's log-denominator with the sink
  included (`exp(sink) + sum_j exp(s_j)`); shift: [B, N, T] fp32, the
  backward's `rowsum(dO * O) - dLSE`. The sink's share of row i is
  p_i = exp(sink - lse_i); it moves out_i by -p_i * out_i and lse_i by p_i
  per unit of sink, so dsink = -sum over (b, t) of p_i * shift_i. A row with
  lse = -inf (a -inf sink and no visible key) has p = 0. A [B, N, T]
  reduction in plain jnp: no [T, S] array and no atomics.
  """
  p = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse)
  p = jnp.where(lse == -jnp.inf, 0.0, p)
  return (-jnp.sum(p * shift, axis=(0, 2))).astype(sinks.dtype)

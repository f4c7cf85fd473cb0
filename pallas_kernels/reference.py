"""Dense masked attention: the oracle every other implementation is tested against.

It builds the full `[T, S]` mask from `mask.visible`, so it is O(T·S) in time
and memory: use it for tests and small problems only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.mask import dense_mask
from pallas_kernels.validation import AttentionProblem


def reference_forward(q, k, v, segment_ids, problem: AttentionProblem):
  """Dense fp32 attention.

  q: [B, T, N, H]; k, v: [B, S, K, H]; segment_ids: [B, T] or None.
  Returns (out [B, T, N, H] in q.dtype, lse [B, N, T] fp32). Rows that see no
  key get out = 0 and lse = -inf.
  """
  p = problem
  qf = q.astype(jnp.float32).reshape(
      p.batch, p.q_len, p.num_kv_heads, p.group_size, p.head_dim)
  kf = k.astype(jnp.float32)
  vf = v.astype(jnp.float32)
  # (B, K, G, T, S)
  s = jnp.einsum("btkgh,bskh->bkgts", qf, kf,
                 precision=jax.lax.Precision.HIGHEST) * p.scale
  if p.softcap is not None:
    s = p.softcap * jnp.tanh(s / p.softcap)
  mask = dense_mask(p.q_len, p.kv_len, p.band, segment_ids)  # (T, S) | (B, T, S)
  mask = mask.reshape(-1, 1, 1, p.q_len, p.kv_len)  # (B|1, 1, 1, T, S)
  s = jnp.where(mask, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)  # (B, K, G, T); -inf on empty rows
  safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  probs = jnp.where(mask, jnp.exp(s - safe_lse[..., None]), 0.0)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, vf,
                   precision=jax.lax.Precision.HIGHEST)
  out = out.reshape(p.batch, p.q_len, p.num_q_heads, p.head_dim)
  lse = lse.reshape(p.batch, p.num_q_heads, p.q_len)
  return out.astype(q.dtype), lse


def attention(q, k, v, segment_ids, problem: AttentionProblem, *,
              block_sizes=None):
  """The impl="reference" entry of the dispatch table; takes no block sizes."""
  if block_sizes is not None:
    raise ValueError(
        f"block_sizes={block_sizes!r}: impl='reference' takes no block sizes")
  return reference_forward(q, k, v, segment_ids, problem)

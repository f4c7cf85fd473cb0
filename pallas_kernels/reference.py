"""Dense masked attention: the oracle every other implementation is tested against.

It builds the full `[T, S]` mask from `mask.visible`, so it is O(T·S) in time
and memory: use it for tests and small problems only. `dense_attention` is
also the decode op's dense path (`decode_attention.py`, masked by slot
positions instead).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.mask import dense_mask
from pallas_kernels.numerics import soft_cap
from pallas_kernels.validation import AttentionProblem

def dense_attention(q, k, v, mask, problem: AttentionProblem, *, precision,
                    probs_dtype, sinks=None):
  """Masked softmax attention over all S keys, GQA by einsum (K/V not repeated).

  q: [B, T, N, H]; k, v: [B, S, K, H]; mask: bool, broadcastable to
  [B, 1, 1, T, S] (True = visible). Scores [B, K, G, T, S] are fp32 (scaled,
  then soft-capped); the probabilities are cast to `probs_dtype` before the
  P·V product; both einsums run at `precision` and accumulate in fp32.
  sinks: [N] (any float dtype, used in fp32) or None: query head n's sink
  logit joins every row's softmax denominator and adds nothing to out.
  Returns (out [B, T, N, H] in q.dtype, lse [B, N, T] fp32, the log of the
  whole denominator); a row that sees no key gets out = 0 and lse = -inf
  (its sink with sinks).
  """
  p = problem
  q5 = q.reshape(p.batch, p.q_len, p.num_kv_heads, p.group_size, p.head_dim)
  s = jnp.einsum("btkgh,bskh->bkgts", q5, k, precision=precision,
                 preferred_element_type=jnp.float32) * p.scale
  s, _ = soft_cap(s, p.softcap)
  s = jnp.where(mask, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)  # (B, K, G, T); -inf on empty rows
  if sinks is not None:
    sink = sinks.astype(jnp.float32).reshape(p.num_kv_heads, p.group_size)
    sink = jnp.broadcast_to(sink[None, :, :, None], lse.shape)
    # A -inf sink on a row that sees no key: lse stays -inf, and the
    # gradient 0 rather than logaddexp(-inf, -inf)'s NaN.
    none = (lse == -jnp.inf) & (sink == -jnp.inf)
    lse = jnp.where(none, -jnp.inf, jnp.logaddexp(jnp.where(none, 0.0, lse),
                                                  jnp.where(none, 0.0, sink)))
  safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  probs = jnp.where(mask, jnp.exp(s - safe_lse[..., None]), 0.0)
  out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(probs_dtype), v,
                   precision=precision, preferred_element_type=jnp.float32)
  out = out.reshape(p.batch, p.q_len, p.num_q_heads, p.head_dim)
  lse = lse.reshape(p.batch, p.num_q_heads, p.q_len)
  return out.astype(q.dtype), lse


def fp32_dense_attention(q, k, v, mask, problem: AttentionProblem, *,
                         sinks=None):
  """`dense_attention` in fp32 at HIGHEST precision: the oracle's arithmetic.

  Same shapes as `dense_attention`; out is cast back to q.dtype.
  """
  f32 = lambda x: x.astype(jnp.float32)
  out, lse = dense_attention(f32(q), f32(k), f32(v), mask, problem,
                             precision=jax.lax.Precision.HIGHEST,
                             probs_dtype=jnp.float32, sinks=sinks)
  return out.astype(q.dtype), lse


def reference_forward(q, k, v, segment_ids, problem: AttentionProblem, *,
                      sinks=None):
  """Dense fp32 attention at HIGHEST precision, masked by `mask.dense_mask`.

  q: [B, T, N, H]; k, v: [B, S, K, H]; segment_ids: [B, T] or None;
  sinks: [N] or None. Returns (out [B, T, N, H] in q.dtype, lse [B, N, T]
  fp32). Rows that see no key get out = 0 and lse = -inf (the sink with sinks).
  """
  p = problem
  mask = dense_mask(p.q_len, p.kv_len, p.band, segment_ids)  # (T, S) | (B, T, S)
  mask = mask.reshape(-1, 1, 1, p.q_len, p.kv_len)  # (B|1, 1, 1, T, S)
  return fp32_dense_attention(q, k, v, mask, p, sinks=sinks)


def attention(q, k, v, segment_ids, problem: AttentionProblem, *, sinks=None,
              block_sizes=None):
  """The impl="reference" entry of the dispatch table; takes no block sizes."""
  if block_sizes is not None:
    raise ValueError(
        f"block_sizes={block_sizes!r}: impl='reference' takes no block sizes")
  return reference_forward(q, k, v, segment_ids, problem, sinks=sinks)

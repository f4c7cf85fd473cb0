"""Dense masked attention: the oracle every other implementation is tested against.

It builds the full `[T, S]` mask from `mask.visible`, so it is O(T·S) in time
and memory: use it for tests and small problems only. `dense_attention` is
also the decode op's dense path (`decode.py`, masked by slot
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
  then soft-capped). The weights exp(s - row max), cast to `probs_dtype`,
  multiply V, and the product is divided by their row sum (normalising with
  exp(s - lse) instead would turn the rounding of lse into a relative error
  in every probability); both einsums run at `precision` and accumulate in
  fp32. lse = row max + log(row sum).
  sinks: [N] (any float dtype, used in fp32) or None: query head n's sink
  logit joins every row's softmax denominator (its max and its sum) and adds
  nothing to out.
  Returns (out [B, T, N, H] in q.dtype, lse [B, N, T] fp32, the log of the
  whole denominator); a row that sees no key gets out = 0 and lse = -inf
  (its sink with sinks).
  """
  p = problem
  # Scores as one batched matmul per (b, k) over [G·T, H] x [S, H]: XLA on CPU
  # sums a 5-D "btkgh,bskh" contraction less accurately (2x the rounding).
  qm = q.reshape(p.batch, p.q_len, p.num_kv_heads, p.group_size, p.head_dim)
  qm = qm.transpose(0, 2, 3, 1, 4).reshape(p.batch, p.num_kv_heads, -1, p.head_dim)
  s = jnp.einsum("bkmh,bksh->bkms", qm, k.transpose(0, 2, 1, 3), precision=precision,
                 preferred_element_type=jnp.float32) * p.scale
  s = s.reshape(p.batch, p.num_kv_heads, p.group_size, p.q_len, p.kv_len)
  s, _ = soft_cap(s, p.softcap)
  s = jnp.where(mask, s, -jnp.inf)
  row_max = jnp.max(s, axis=-1, keepdims=True)  # (B, K, G, T, 1); -inf on empty rows
  if sinks is not None:
    sink = sinks.astype(jnp.float32).reshape(1, p.num_kv_heads, p.group_size, 1, 1)
    row_max = jnp.maximum(row_max, sink)
  # The shift cancels in out and lse: no gradient flows through it.
  safe_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  unnormalised = jnp.where(mask, jnp.exp(s - safe_max), 0.0)
  row_sum = jnp.sum(unnormalised, axis=-1)  # (B, K, G, T); 0 on empty rows
  if sinks is not None:  # exp(-inf) = 0: a -inf sink is no sink, gradient 0
    row_sum = row_sum + jnp.exp(sink - safe_max)[..., 0]
  seen = row_sum > 0
  lse = jnp.where(seen, safe_max[..., 0] + jnp.log(jnp.where(seen, row_sum, 1.0)),
                  -jnp.inf)
  out = jnp.einsum("bkgts,bskh->btkgh", unnormalised.astype(probs_dtype), v,
                   precision=precision, preferred_element_type=jnp.float32)
  denom = jnp.moveaxis(jnp.where(seen, row_sum, 1.0), 3, 1)  # (B, T, K, G)
  out = (out / denom[..., None]).reshape(p.batch, p.q_len, p.num_q_heads, p.head_dim)
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

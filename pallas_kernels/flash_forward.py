"""Forward kernel of the Pallas (Triton) sliding-window flash attention.

One program per (query block, batch, query head) walks only the key blocks of
its band (`mask.kv_block_range`), so work is O(T·W) rather than O(T·S), and
keeps an online softmax in fp32 (base 2). Interior blocks
(`mask.block_fully_visible`) skip the mask; edge blocks, partial blocks at
the sequence ends and all blocks under segment ids apply `mask.visible`.
With attention sinks the running max starts at the head's sink and the
running sum at 1, so the sink joins each row's denominator exactly once.
GQA/MQA: K/V stay [B, S, K, H]; query head n reads KV head n // G, no repeat.

Builds on `flash_tiles.py` only; `flash_attention.py` pairs it with
`flash_backward.py` in the custom VJP.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_tiles import (
    LOG2_E, KernelConfig, apply_mask, block_range, load_kv_block, load_row,
    load_tile, round_up, scores, store_tile, tile_start)
from pallas_kernels.mask import kv_block_range


def _forward_kernel(q_ref, k_ref, v_ref, seg_ref, sink_ref, out_ref, lse_ref,
                    *, config: KernelConfig):
  """One (query block, batch, query head) program.

  q_ref: [bq, Hp]; k_ref, v_ref: [S', Hp] (KV head n // G, S' = S rounded up
  to block_k); seg_ref: [S'] or None; sink_ref: [] fp32 (head n's sink) or
  None; out_ref: [bq, Hp]; lse_ref: [bq].
  """
  p = config.problem
  bq, bk = config.blocks.block_q, config.blocks.block_k
  q_block = pl.program_id(0)
  q_rows = q_block * bq + jnp.arange(bq)
  q = load_tile(q_ref, q_rows, p.q_len, p.head_dim)
  q_seg = None
  if seg_ref is not None:
    q_seg = load_row(seg_ref.at[pl.ds(tile_start(q_block, bq), bq)], q_rows,
                     p.q_len, -1)

  def body(kv_block, carry):
    acc, m, l = carry  # [bq, Hp], [bq], [bq]; m, l in base 2
    k_rows, k, v, k_seg = load_kv_block(k_ref, v_ref, seg_ref, kv_block, bk, p)
    s = scores(q, k, config)[0] * LOG2_E
    s = apply_mask(s, -jnp.inf, q_block, kv_block, q_rows, k_rows, q_seg,
                   k_seg, config, bq, bk)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    # A row that has seen no key yet keeps m = -inf; shift by 0 so that
    # exp2(-inf - shift) = 0 instead of NaN.
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - shift)
    probs = jnp.exp2(s - shift[:, None])
    l = alpha * l + jnp.sum(probs, axis=1)
    acc = alpha[:, None] * acc + plgpu.dot(probs.astype(v.dtype), v,
                                        precision=config.precision)
    return acc, m_new, l

  lo, hi = block_range(kv_block_range, q_block, bq, bk, config)
  if sink_ref is None:
    m0 = jnp.full((bq,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((bq,), jnp.float32)
  else:  # the sink as the first "key": max = sink, sum = exp2(0) = 1
    m0 = jnp.zeros((bq,), jnp.float32) + sink_ref[...] * LOG2_E
    l0 = jnp.ones((bq,), jnp.float32)
  init = (jnp.zeros((bq, config.head_dim_padded), jnp.float32), m0, l0)
  acc, m, l = lax.fori_loop(lo, hi, body, init)
  # Rows that see no key: out 0, lse -inf (with a sink: l = 1, lse = sink).
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  store_tile(out_ref, acc / l_safe[:, None], q_rows, p.q_len, p.head_dim)
  lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) / LOG2_E)
  plgpu.store(lse_ref, lse, mask=q_rows < p.q_len)


def forward(q, k, v, segment_ids, sinks, *, config: KernelConfig):
  """Runs the forward kernel: (out [B, T, N, H] q.dtype, lse [B, N, T] fp32).

  q: [B, T, N, H]; k, v: [B, S, K, H]; segment_ids: int32 [B, T] or None;
  sinks: [N] (any float dtype) or None. lse includes the sink.
  """
  p = config.problem
  bq, bk = config.blocks.block_q, config.blocks.block_k
  hp, g = config.head_dim_padded, p.group_size
  kv_rows = round_up(p.kv_len, bk)
  grid = (pl.cdiv(p.q_len, bq), p.batch, p.num_q_heads)
  kv_spec = pl.BlockSpec((None, kv_rows, None, hp),
                         lambda i, b, n: (b, 0, n // g, 0))
  in_specs = [
      pl.BlockSpec((None, bq, None, hp), lambda i, b, n: (b, i, n, 0)),
      kv_spec,
      kv_spec,
      None if segment_ids is None else pl.BlockSpec(
          (None, max(kv_rows, round_up(p.q_len, bq))),
          lambda i, b, n: (b, 0)),
      None if sinks is None else pl.BlockSpec((None,), lambda i, b, n: (n,)),
  ]
  out_specs = [
      pl.BlockSpec((None, bq, None, hp), lambda i, b, n: (b, i, n, 0)),
      pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
  ]
  out_shape = [
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((p.batch, p.num_q_heads, p.q_len), jnp.float32),
  ]
  return pl.pallas_call(
      functools.partial(_forward_kernel, config=config),
      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=config.compiler_params(), interpret=config.interpret,
      name="swa_flash_forward",
  )(q, k, v, segment_ids, None if sinks is None else sinks.astype(jnp.float32))

"""Backward kernels of the Pallas sliding-window flash attention: dQ and dK/dV.

Both recompute probabilities from the saved LSE, p = exp(s - lse), and use

  ds = p * (dp - delta),  dp = dO·Vᵀ,  delta = rowsum(dO * O) - d_lse,

where the `- d_lse` term carries the LSE output's cotangent (d lse / d s = p).
With attention sinks the kernels are unchanged: the saved LSE includes the
sink, so p already is its share of the whole denominator; dsinks is the
[B, N, T] reduction `numerics.sink_gradient` of (lse, delta), in jnp.
With a softcap s = c·tanh(u / c), ds is multiplied by 1 - tanh(u / c)² before
the chain rule through u = scale·q·kᵀ.

dQ: one program per (query block, batch, query head) walks the key blocks of
`mask.kv_block_range`, like the forward. dK/dV: one program per (key block,
batch, KV head) walks, for each of the G query heads of its group, the query
blocks of `mask.q_block_range`, so GQA gradients are summed in registers, not
by atomics or a repeated K/V.

Builds on `flash_tiles.py` only; `flash_attention.py` pairs it with
`flash_forward.py` in the custom VJP.
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
from pallas_kernels.mask import kv_block_range, q_block_range
from pallas_kernels.numerics import sink_gradient


def _probs_and_dscores(q, k, v, do, lse2, delta, masker, config: KernelConfig):
  """p [bq, bk] (masked) and ds [bq, bk], the gradient w.r.t. q·kᵀ·scale.

  lse2: the row LSE in base 2, +inf on rows that see nothing (so p = 0).
  `masker(x, fill)` zeroes what the window, segments and sequence ends hide.
  """
  s, tanh = scores(q, k, config)
  probs = masker(jnp.exp2(s * LOG2_E - lse2[:, None]), 0.0)
  dp = plgpu.dot(do, v, trans_b=True, precision=config.precision)
  ds = probs * (dp - delta[:, None])
  if tanh is not None:
    ds = ds * (1.0 - tanh * tanh)
  return probs, ds


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse2_ref, delta_ref,
               dq_ref, *, config: KernelConfig):
  """One (query block, batch, query head) program.

  q_ref, do_ref, dq_ref: [bq, Hp]; k_ref, v_ref: [S', Hp] (KV head n // G);
  seg_ref: [S'] or None; lse2_ref, delta_ref: [bq].
  """
  p = config.problem
  bq, bk = config.blocks.block_q_dq, config.blocks.block_k_dq
  q_block = pl.program_id(0)
  q_rows = q_block * bq + jnp.arange(bq)
  q = load_tile(q_ref, q_rows, p.q_len, p.head_dim)
  do = load_tile(do_ref, q_rows, p.q_len, p.head_dim)
  lse2 = load_row(lse2_ref, q_rows, p.q_len, jnp.inf)
  delta = load_row(delta_ref, q_rows, p.q_len, 0.0)
  q_seg = None
  if seg_ref is not None:
    q_seg = load_row(seg_ref.at[pl.ds(tile_start(q_block, bq), bq)], q_rows,
                     p.q_len, -1)

  def body(kv_block, dq):
    k_rows, k, v, k_seg = load_kv_block(k_ref, v_ref, seg_ref, kv_block, bk, p)
    masker = functools.partial(
        apply_mask, q_block=q_block, kv_block=kv_block, q_rows=q_rows,
        k_rows=k_rows, q_seg=q_seg, k_seg=k_seg, config=config, block_q=bq,
        block_k=bk)
    _, ds = _probs_and_dscores(q, k, v, do, lse2, delta, masker, config)
    return dq + plgpu.dot(ds.astype(k.dtype), k, precision=config.precision)

  lo, hi = block_range(kv_block_range, q_block, bq, bk, config)
  dq = lax.fori_loop(lo, hi, body,
                     jnp.zeros((bq, config.head_dim_padded), jnp.float32))
  store_tile(dq_ref, dq * p.scale, q_rows, p.q_len, p.head_dim)


def _dkv_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse2_ref, delta_ref,
                dk_ref, dv_ref, *, config: KernelConfig):
  """One (key block, batch, KV head) program, summing its G query heads.

  q_ref, do_ref: [T', G, Hp] (T' = T rounded up to block_q_dkv);
  k_ref, v_ref, dk_ref, dv_ref: [bk, Hp]; seg_ref: [T'] or None;
  lse2_ref, delta_ref: [G, T'].
  """
  p = config.problem
  bq, bk = config.blocks.block_q_dkv, config.blocks.block_k_dkv
  kv_block = pl.program_id(0)
  k_rows = kv_block * bk + jnp.arange(bk)
  k = load_tile(k_ref, k_rows, p.kv_len, p.head_dim)
  v = load_tile(v_ref, k_rows, p.kv_len, p.head_dim)
  k_seg = None
  if seg_ref is not None:
    k_seg = load_row(seg_ref.at[pl.ds(tile_start(kv_block, bk), bk)], k_rows,
                     p.kv_len, -2)
  lo, hi = block_range(q_block_range, kv_block, bq, bk, config)
  num_q_blocks = hi - lo

  # One flat loop over (query head of the group, query block) pairs.
  def body(i, carry):
    dk, dv = carry
    g = i // num_q_blocks
    q_block = lo + i % num_q_blocks
    start = tile_start(q_block, bq)
    q_rows = start + jnp.arange(bq)
    q = load_tile(q_ref.at[pl.ds(start, bq), g, :], q_rows, p.q_len,
                  p.head_dim)
    do = load_tile(do_ref.at[pl.ds(start, bq), g, :], q_rows, p.q_len,
                   p.head_dim)
    lse2 = load_row(lse2_ref.at[g, pl.ds(start, bq)], q_rows, p.q_len, jnp.inf)
    delta = load_row(delta_ref.at[g, pl.ds(start, bq)], q_rows, p.q_len, 0.0)
    q_seg = None
    if seg_ref is not None:
      q_seg = load_row(seg_ref.at[pl.ds(start, bq)], q_rows, p.q_len, -1)
    masker = functools.partial(
        apply_mask, q_block=q_block, kv_block=kv_block, q_rows=q_rows,
        k_rows=k_rows, q_seg=q_seg, k_seg=k_seg, config=config, block_q=bq,
        block_k=bk)
    probs, ds = _probs_and_dscores(q, k, v, do, lse2, delta, masker, config)
    dv = dv + plgpu.dot(probs.astype(do.dtype), do, trans_a=True,
                     precision=config.precision)
    dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True,
                     precision=config.precision)
    return dk, dv

  zeros = jnp.zeros((bk, config.head_dim_padded), jnp.float32)
  dk, dv = lax.fori_loop(0, p.group_size * num_q_blocks, body, (zeros, zeros))
  store_tile(dk_ref, dk * p.scale, k_rows, p.kv_len, p.head_dim)
  store_tile(dv_ref, dv, k_rows, p.kv_len, p.head_dim)


def backward(q, k, v, segment_ids, sinks, out, lse, d_out, d_lse, *,
             config: KernelConfig):
  """dq [B, T, N, H], dk, dv [B, S, K, H] and dsinks [N] (or None).

  From the forward's out and lse (sink included); sinks: [N] or None;
  d_out: [B, T, N, H] cotangent of out; d_lse: [B, N, T] cotangent of lse.
  """
  p = config.problem
  blocks = config.blocks
  hp, g = config.head_dim_padded, p.group_size
  # [B, N, T] fp32 row terms, computed once by XLA (elementwise + a sum).
  delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32),
                     d_out.astype(jnp.float32),
                     precision=lax.Precision.HIGHEST) - d_lse
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2_E)
  d_out = d_out.astype(q.dtype)
  params = dict(compiler_params=config.compiler_params(),
                interpret=config.interpret)

  # dQ: grid over (query block, batch, query head).
  bq, bk = blocks.block_q_dq, blocks.block_k_dq
  kv_rows = round_up(p.kv_len, bk)
  kv_spec = pl.BlockSpec((None, kv_rows, None, hp),
                         lambda i, b, n: (b, 0, n // g, 0))
  q_spec = pl.BlockSpec((None, bq, None, hp), lambda i, b, n: (b, i, n, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))
  seg_spec = None if segment_ids is None else pl.BlockSpec(
      (None, max(kv_rows, round_up(p.q_len, bq))), lambda i, b, n: (b, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, config=config),
      grid=(pl.cdiv(p.q_len, bq), p.batch, p.num_q_heads),
      in_specs=[q_spec, kv_spec, kv_spec, seg_spec, q_spec, row_spec,
                row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      name="swa_flash_backward_dq", **params,
  )(q, k, v, segment_ids, d_out, lse2, delta)

  # dK/dV: grid over (key block, batch, KV head); q, dO, lse, delta of the
  # group's G query heads come as one [T', G, ...] block.
  bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
  q_rows = round_up(p.q_len, bq)
  group_spec = pl.BlockSpec((None, q_rows, g, hp),
                            lambda j, b, h: (b, 0, h, 0))
  kv_spec = pl.BlockSpec((None, bk, None, hp), lambda j, b, h: (b, j, h, 0))
  rows_spec = pl.BlockSpec((None, g, q_rows), lambda j, b, h: (b, h, 0))
  seg_spec = None if segment_ids is None else pl.BlockSpec(
      (None, max(q_rows, round_up(p.kv_len, bk))), lambda j, b, h: (b, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, config=config),
      grid=(pl.cdiv(p.kv_len, bk), p.batch, p.num_kv_heads),
      in_specs=[group_spec, kv_spec, kv_spec, seg_spec, group_spec, rows_spec,
                rows_spec],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      name="swa_flash_backward_dkv", **params,
  )(q, k, v, segment_ids, d_out, lse2, delta)
  d_sinks = None if sinks is None else sink_gradient(sinks, lse, delta)
  return dq, dk, dv, d_sinks

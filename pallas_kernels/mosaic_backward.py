"""Backward kernels of the Mosaic GPU (Hopper) flash attention: dQ and dK/dV.

Both recompute probabilities from the saved LSE, p = exp(s - lse), and use

  ds = p * (dp - delta),  dp = dO·Vᵀ,  delta = rowsum(dO * O) - d_lse,

(the `- d_lse` term carries the LSE output's cotangent), as the Triton
backward does. With attention sinks the kernels are unchanged (the saved lse
includes the sink); dsinks is `numerics.sink_gradient`, a [B, N, T] fp32
reduction in jnp. With a softcap ds is multiplied by 1 - tanh(u / c)².

dQ: one program per (query head, query tile, batch) walks the key tiles of
`mask.kv_block_range`, K/V TMA-pipelined like the forward. dK/dV: one program
per (KV head, key tile, batch) walks, for each of the G query heads of its
group, the query tiles of `mask.q_block_range` (one flat pipelined loop over
the pairs), working on transposed scores sᵀ = k·qᵀ [bk, bq] so that dV += pᵀ·dO
and dK += dsᵀ·q are wgmmas with the accumulators in registers. GQA gradients
are summed in registers: no atomics, no repeated K/V, deterministic.

Builds on `mosaic_tiles.py` only; `mosaic_attention.py` pairs it with
`mosaic_forward.py` in the custom VJP.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.mask import kv_block_range, q_block_range
from pallas_kernels.mosaic_tiles import (
    LOG2_E, MosaicConfig, along, block_range, load_rows, pad_heads, pad_rows,
    mask_edge_tile, pipelined_loop, plgpu, round_up, row_smem, tile_smem)
from pallas_kernels.numerics import sink_gradient, soft_cap


def _probs_and_dscores(s, dp, lse2, delta, masker, q_axis: int,
                       config: MosaicConfig):
  """p (masked) and ds, the gradient w.r.t. scale·q·kᵀ, of one score tile.

  s: raw q·kᵀ (or its transpose: q_axis says which axis holds queries);
  dp: dO·Vᵀ in the same orientation; lse2, delta: row vectors along q_axis
  (lse2 in base 2, +inf on rows that see nothing, so p = 0 there).
  `masker(x, fill)` fills what the window, segments and sequence ends hide.
  """
  p = config.problem
  shape = s.shape
  s, tanh = soft_cap(s * p.scale, p.softcap)
  probs = masker(jnp.exp2(s * LOG2_E - along(lse2, shape, q_axis)), 0.0)
  ds = probs * (dp - along(delta, shape, q_axis))
  if tanh is not None:
    ds = ds * (1.0 - tanh * tanh)
  return probs, ds


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse2_ref, delta_ref,
               dq_ref, *, config: MosaicConfig, q_smem, do_smem, k_smem, v_smem,
               qseg_smem, kseg_smem, lse_smem, delta_smem, q_barriers,
               k_barriers, v_barriers, kseg_barriers):
  """One (query head, query tile, batch) program.

  GMEM: q_ref, do_ref, dq_ref [B, T', N, Hp]; k_ref, v_ref [B, S', K, Hp];
  seg_ref [B, L'] int32 or None; lse2_ref, delta_ref [B, N, T'] fp32.
  SMEM: q_smem (reused for dq), do_smem [bq, Hp]; k_smem, v_smem
  [stages, bk, Hp]; qseg_smem, lse_smem, delta_smem [bq]; kseg_smem
  [stages, bk].
  """
  p, dtype = config.problem, config.dtype
  bq, bk = config.blocks.block_q_dq, config.blocks.block_k_dq
  head = lax.axis_index("heads")
  q_tile = lax.axis_index("q_tiles")
  batch = lax.axis_index("batch")
  kv_head = lax.div(head, jnp.int32(p.group_size))
  q_start = q_tile * bq
  q_rows = pl.ds(q_start, bq)

  plgpu.copy_gmem_to_smem(q_ref.at[batch, q_rows, head], q_smem,
                          q_barriers.at[0])
  plgpu.copy_gmem_to_smem(do_ref.at[batch, q_rows, head], do_smem,
                          q_barriers.at[1])
  plgpu.copy_gmem_to_smem(lse2_ref.at[batch, head, q_rows], lse_smem,
                          q_barriers.at[2])
  plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, q_rows], delta_smem,
                          q_barriers.at[3])
  if seg_ref is not None:
    plgpu.copy_gmem_to_smem(seg_ref.at[batch, q_rows], qseg_smem,
                            q_barriers.at[4])
  for i in range(4 + (seg_ref is not None)):
    plgpu.barrier_wait(q_barriers.at[i])
  lse2 = load_rows(lse_smem, 0)
  delta = load_rows(delta_smem, 0)
  q_seg = None
  if seg_ref is not None:
    q_seg = along(load_rows(qseg_smem, 0), (bq, bk), 0)

  def fetch(step, slot):
    rows = pl.ds(step * bk, bk)
    plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, kv_head], k_smem.at[slot],
                            k_barriers.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, kv_head], v_smem.at[slot],
                            v_barriers.at[slot])
    if seg_ref is not None:
      plgpu.copy_gmem_to_smem(seg_ref.at[batch, rows], kseg_smem.at[slot],
                              kseg_barriers.at[slot])

  def compute(step, slot, dq):
    def scores(refs):
      s_ref, dp_ref = refs
      plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
      plgpu.wgmma(dp_ref, do_smem, v_smem.at[slot].transpose((1, 0)))

    zeros = plgpu.layout_cast(jnp.zeros((bq, bk), jnp.float32),
                              plgpu.Layout.WGMMA)
    s, dp = pl.run_state(scores)((plgpu.ACC.init(zeros),
                                  plgpu.ACC.init(zeros)))
    k_seg = None
    if seg_ref is not None:
      k_seg = along(load_rows(kseg_smem.at[slot], 1), (bq, bk), 1)
    masker = functools.partial(mask_edge_tile, q_tile=q_tile, k_tile=step,
                               q_seg=q_seg, k_seg=k_seg, q_axis=0, block_q=bq,
                               block_k=bk, config=config)
    _, ds = _probs_and_dscores(s, dp, lse2, delta, masker, 0, config)

    def dq_update(acc_ref):
      plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])

    return pl.run_state(dq_update)(plgpu.ACC.init(dq))

  dq0 = plgpu.layout_cast(jnp.zeros((bq, config.head_dim), jnp.float32),
                          plgpu.Layout.WGMMA)
  lo, hi = block_range(kv_block_range, q_tile, bq, bk, config)
  barriers = [k_barriers, v_barriers]
  if seg_ref is not None:
    barriers.append(kseg_barriers)
  dq = pipelined_loop(lo, hi, dq0, fetch=fetch, compute=compute,
                      barriers=barriers, num_stages=config.blocks.num_stages)
  q_smem[...] = (dq * p.scale).astype(dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, q_rows, head])
  plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse2_ref, delta_ref,
                dk_ref, dv_ref, *, config: MosaicConfig, q_smem, do_smem,
                k_smem, v_smem, qseg_smem, kseg_smem, lse_smem, delta_smem,
                k_barriers, q_barriers, do_barriers, lse_barriers,
                delta_barriers, qseg_barriers):
  """One (KV head, key tile, batch) program, summing its G query heads.

  GMEM: q_ref, do_ref [B, T', N, Hp]; k_ref, v_ref, dk_ref, dv_ref
  [B, S', K, Hp]; seg_ref [B, L'] int32 or None; lse2_ref, delta_ref
  [B, N, T'] fp32.
  SMEM: k_smem, v_smem [bk, Hp] (reused for dk, dv); kseg_smem [bk];
  q_smem, do_smem [stages, bq, Hp]; lse_smem, delta_smem, qseg_smem
  [stages, bq].
  """
  p, dtype = config.problem, config.dtype
  bq, bk = config.blocks.block_q_dkv, config.blocks.block_k_dkv
  g = p.group_size
  kv_head = lax.axis_index("kv_heads")
  k_tile = lax.axis_index("k_tiles")
  batch = lax.axis_index("batch")
  k_start = k_tile * bk
  k_rows = pl.ds(k_start, bk)

  plgpu.copy_gmem_to_smem(k_ref.at[batch, k_rows, kv_head], k_smem,
                          k_barriers.at[0])
  plgpu.copy_gmem_to_smem(v_ref.at[batch, k_rows, kv_head], v_smem,
                          k_barriers.at[1])
  if seg_ref is not None:
    plgpu.copy_gmem_to_smem(seg_ref.at[batch, k_rows], kseg_smem,
                            k_barriers.at[2])
  for i in range(2 + (seg_ref is not None)):
    plgpu.barrier_wait(k_barriers.at[i])
  k_seg = None
  if seg_ref is not None:
    k_seg = along(load_rows(kseg_smem, 0), (bk, bq), 0)

  lo, hi = block_range(q_block_range, k_tile, bq, bk, config)
  num_q_tiles = hi - lo

  def head_and_tile(step):
    """Flat step -> (query head, query tile): G heads x the band's tiles."""
    return (kv_head * g + lax.div(step, num_q_tiles),
            lo + lax.rem(step, num_q_tiles))

  def fetch(step, slot):
    head, q_tile = head_and_tile(step)
    rows = pl.ds(q_tile * bq, bq)
    plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[slot],
                            q_barriers.at[slot])
    plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[slot],
                            do_barriers.at[slot])
    plgpu.copy_gmem_to_smem(lse2_ref.at[batch, head, rows], lse_smem.at[slot],
                            lse_barriers.at[slot])
    plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows],
                            delta_smem.at[slot], delta_barriers.at[slot])
    if seg_ref is not None:
      plgpu.copy_gmem_to_smem(seg_ref.at[batch, rows], qseg_smem.at[slot],
                              qseg_barriers.at[slot])

  def compute(step, slot, carry):
    dk, dv = carry  # [bk, Hp] fp32 each
    _, q_tile = head_and_tile(step)

    def scores(refs):
      s_ref, dp_ref = refs
      plgpu.wgmma(s_ref, k_smem, q_smem.at[slot].transpose((1, 0)))
      plgpu.wgmma(dp_ref, v_smem, do_smem.at[slot].transpose((1, 0)))

    zeros = plgpu.layout_cast(jnp.zeros((bk, bq), jnp.float32),
                              plgpu.Layout.WGMMA)
    s, dp = pl.run_state(scores)((plgpu.ACC.init(zeros),
                                  plgpu.ACC.init(zeros)))
    lse2 = load_rows(lse_smem.at[slot], 1)
    delta = load_rows(delta_smem.at[slot], 1)
    q_seg = None
    if seg_ref is not None:
      q_seg = along(load_rows(qseg_smem.at[slot], 1), (bk, bq), 1)
    masker = functools.partial(mask_edge_tile, q_tile=q_tile, k_tile=k_tile,
                               q_seg=q_seg, k_seg=k_seg, q_axis=1, block_q=bq,
                               block_k=bk, config=config)
    probs, ds = _probs_and_dscores(s, dp, lse2, delta, masker, 1, config)

    def update(refs):
      dk_ref, dv_ref = refs
      plgpu.wgmma(dv_ref, probs.astype(dtype), do_smem.at[slot])
      plgpu.wgmma(dk_ref, ds.astype(dtype), q_smem.at[slot])

    return pl.run_state(update)((plgpu.ACC.init(dk), plgpu.ACC.init(dv)))

  zeros = plgpu.layout_cast(jnp.zeros((bk, config.head_dim), jnp.float32),
                            plgpu.Layout.WGMMA)
  barriers = [q_barriers, do_barriers, lse_barriers, delta_barriers]
  if seg_ref is not None:
    barriers.append(qseg_barriers)
  dk, dv = pipelined_loop(0, g * num_q_tiles, (zeros, zeros), fetch=fetch,
                          compute=compute, barriers=barriers,
                          num_stages=config.blocks.num_stages)
  k_smem[...] = (dk * p.scale).astype(dtype)
  v_smem[...] = dv.astype(dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[batch, k_rows, kv_head])
  plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[batch, k_rows, kv_head])
  plgpu.wait_smem_to_gmem(0)


def _refs(refs, has_seg: bool, num_out: int):
  """Splits (q, k, v, [seg], do, lse2, delta, *outs) kernel refs."""
  refs = list(refs)
  seg_ref = refs.pop(3) if has_seg else None
  return (*refs[:3], seg_ref, *refs[3:])


def backward(q, k, v, segment_ids, sinks, out, lse, d_out, d_lse, *,
             config: MosaicConfig):
  """dq [B, T, N, H], dk, dv [B, S, K, H] and dsinks [N] (or None).

  From the forward's out and lse (sink included); sinks: [N] or None;
  d_out: [B, T, N, H] cotangent of out; d_lse: [B, N, T] cotangent of lse.
  """
  p, blocks = config.problem, config.blocks
  hp, stages = config.head_dim, blocks.num_stages
  # [B, N, T] fp32 row terms, computed once by XLA (elementwise + a sum).
  delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32),
                     d_out.astype(jnp.float32),
                     precision=lax.Precision.HIGHEST) - d_lse
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2_E)
  # Both kernels' tiles divide the padded lengths.
  q_rows = round_up(p.q_len, math.lcm(blocks.block_q_dq, blocks.block_q_dkv))
  kv_rows = round_up(p.kv_len,
                     math.lcm(blocks.block_k_dq, blocks.block_k_dkv))
  # Padded query rows: lse2 = +inf, so they hold p = 0 everywhere.
  qp = pad_rows(pad_heads(q, hp), 1, q_rows)
  dop = pad_rows(pad_heads(d_out.astype(q.dtype), hp), 1, q_rows)
  kp = pad_rows(pad_heads(k, hp), 1, kv_rows)
  vp = pad_rows(pad_heads(v, hp), 1, kv_rows)
  lse2 = pad_rows(lse2, 2, q_rows, jnp.inf)
  delta = pad_rows(delta, 2, q_rows)
  seg = None
  if segment_ids is not None:
    seg = pad_rows(segment_ids.astype(jnp.int32), 1, max(q_rows, kv_rows), -1)
  has_seg = seg is not None
  inputs = [x for x in (qp, kp, vp, seg, dop, lse2, delta) if x is not None]

  # dQ: grid over (query head, query tile, batch).
  bq, bk = blocks.block_q_dq, blocks.block_k_dq

  def dq_kernel(*refs, **scratch_refs):
    _dq_kernel(*_refs(refs, has_seg, 1), config=config, **scratch_refs)

  dq = plgpu.kernel(
      dq_kernel,
      out_type=jax.ShapeDtypeStruct(qp.shape, q.dtype),
      scratch_types=dict(
          q_smem=tile_smem(bq, config), do_smem=tile_smem(bq, config),
          k_smem=tile_smem(bk, config, (stages,)),
          v_smem=tile_smem(bk, config, (stages,)),
          qseg_smem=row_smem(bq, jnp.int32),
          kseg_smem=row_smem(bk, jnp.int32, (stages,)),
          lse_smem=row_smem(bq, jnp.float32),
          delta_smem=row_smem(bq, jnp.float32),
          q_barriers=plgpu.Barrier(num_barriers=5),
          k_barriers=plgpu.Barrier(num_barriers=stages),
          v_barriers=plgpu.Barrier(num_barriers=stages),
          kseg_barriers=plgpu.Barrier(num_barriers=stages)),
      grid=(p.num_q_heads, pl.cdiv(p.q_len, bq), p.batch),
      grid_names=("heads", "q_tiles", "batch"),
      **config.kernel_kwargs("swa_mosaic_backward_dq"),
  )(*inputs)

  # dK/dV: grid over (KV head, key tile, batch).
  bq, bk = blocks.block_q_dkv, blocks.block_k_dkv

  def dkv_kernel(*refs, **scratch_refs):
    _dkv_kernel(*_refs(refs, has_seg, 2), config=config, **scratch_refs)

  dk, dv = plgpu.kernel(
      dkv_kernel,
      out_type=(jax.ShapeDtypeStruct(kp.shape, k.dtype),
                jax.ShapeDtypeStruct(vp.shape, v.dtype)),
      scratch_types=dict(
          k_smem=tile_smem(bk, config), v_smem=tile_smem(bk, config),
          kseg_smem=row_smem(bk, jnp.int32),
          q_smem=tile_smem(bq, config, (stages,)),
          do_smem=tile_smem(bq, config, (stages,)),
          lse_smem=row_smem(bq, jnp.float32, (stages,)),
          delta_smem=row_smem(bq, jnp.float32, (stages,)),
          qseg_smem=row_smem(bq, jnp.int32, (stages,)),
          k_barriers=plgpu.Barrier(num_barriers=3),
          q_barriers=plgpu.Barrier(num_barriers=stages),
          do_barriers=plgpu.Barrier(num_barriers=stages),
          lse_barriers=plgpu.Barrier(num_barriers=stages),
          delta_barriers=plgpu.Barrier(num_barriers=stages),
          qseg_barriers=plgpu.Barrier(num_barriers=stages)),
      grid=(p.num_kv_heads, pl.cdiv(p.kv_len, bk), p.batch),
      grid_names=("kv_heads", "k_tiles", "batch"),
      **config.kernel_kwargs("swa_mosaic_backward_dkv"),
  )(*inputs)
  d_sinks = None if sinks is None else sink_gradient(
      sinks, lse, delta[:, :, :p.q_len])
  return (dq[:, :p.q_len, :, :p.head_dim], dk[:, :p.kv_len, :, :p.head_dim],
          dv[:, :p.kv_len, :, :p.head_dim], d_sinks)

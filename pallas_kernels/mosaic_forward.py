"""Forward kernel of the Mosaic GPU (Hopper) sliding-window flash attention.

One program (one warpgroup) per (query head, query tile, batch): TMA loads its
Q tile into shared memory once, then walks only the key tiles of its band
(`mask.kv_block_range`), their K/V tiles TMA-loaded `num_stages - 1` steps
ahead (`mosaic_tiles.pipelined_loop`). Scores q·kᵀ and p·v are `wgmma`s with
fp32 accumulators in registers; the online softmax (base 2) runs in
registers. Tiles on the band's edges (and ragged or segmented ones) are
masked with `mask.visible` on their positions; interior tiles
(`mask.block_fully_visible`) skip the mask through a `lax.cond`. Tiles
outside the band are never loaded. With attention sinks the running max
starts at the head's sink and the running sum at 1. GQA/MQA: query head n
reads KV head n // G, K/V are never repeated. Out and lse leave through
shared memory by TMA.

Builds on `mosaic_tiles.py` only; `mosaic_attention.py` pairs it with
`mosaic_backward.py` in the custom VJP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.mask import kv_block_range
from pallas_kernels.mosaic_tiles import (
    LOG2_E, MosaicConfig, along, block_range, load_rows, pad_heads, pad_rows,
    mask_edge_tile, pipelined_loop, plgpu, round_up, row_smem, tile_smem)
from pallas_kernels.numerics import soft_cap


def _forward_kernel(q_ref, k_ref, v_ref, seg_ref, sink_ref, out_ref, lse_ref,
                    *, config: MosaicConfig, q_smem, k_smem, v_smem, qseg_smem,
                    kseg_smem, sink_smem, lse_smem, q_barriers, k_barriers,
                    v_barriers, kseg_barriers):
  """One (query head, query tile, batch) program.

  GMEM: q_ref, out_ref [B, T', N, Hp]; k_ref, v_ref [B, S', K, Hp];
  seg_ref [B, L'] int32 or None; sink_ref [N, bq] fp32 (each head's sink,
  repeated) or None; lse_ref [B, N, T'] fp32. (T', S': T, S rounded up to
  the tiles; L' = max(T', S').)
  SMEM: q_smem [bq, Hp] (reused for out); k_smem, v_smem [stages, bk, Hp];
  qseg_smem [bq], kseg_smem [stages, bk]; sink_smem, lse_smem [bq].
  """
  p, dtype = config.problem, config.dtype
  bq, bk = config.blocks.block_q, config.blocks.block_k
  head = lax.axis_index("heads")
  q_tile = lax.axis_index("q_tiles")
  batch = lax.axis_index("batch")
  kv_head = lax.div(head, jnp.int32(p.group_size))
  q_start = q_tile * bq
  q_rows = pl.ds(q_start, bq)

  plgpu.copy_gmem_to_smem(q_ref.at[batch, q_rows, head], q_smem,
                          q_barriers.at[0])
  if seg_ref is not None:
    plgpu.copy_gmem_to_smem(seg_ref.at[batch, q_rows], qseg_smem,
                            q_barriers.at[1])
  if sink_ref is not None:
    plgpu.copy_gmem_to_smem(sink_ref.at[head], sink_smem, q_barriers.at[2])
  plgpu.barrier_wait(q_barriers.at[0])
  q_seg = None
  if seg_ref is not None:
    plgpu.barrier_wait(q_barriers.at[1])
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

  def compute(step, slot, carry):
    acc, m, l = carry  # [bq, Hp] fp32, [bq], [bq]; m, l in base 2

    def qk(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
      return acc_ref[...]

    s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
    s = soft_cap(s * p.scale, p.softcap)[0] * LOG2_E
    k_seg = None
    if seg_ref is not None:
      k_seg = along(load_rows(kseg_smem.at[slot], 1), (bq, bk), 1)
    s = mask_edge_tile(s, -jnp.inf, q_tile, step, q_seg, k_seg, q_axis=0,
                       block_q=bq, block_k=bk, config=config)
    m_new = jnp.maximum(m, s.max(axis=1))
    # A row that has seen no key keeps m = -inf: shift by 0, so that
    # exp2(-inf - shift) = 0 rather than NaN.
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - shift)
    probs = jnp.exp2(s - along(shift, (bq, bk), 0))
    l = alpha * l + probs.sum(axis=1)
    acc = acc * along(alpha, acc.shape, 0)

    def pv(acc_ref):
      plgpu.wgmma(acc_ref, probs.astype(dtype), v_smem.at[slot])

    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    return acc, m_new, l

  row_layout = plgpu.Layout.WGMMA.reduce(1)
  if sink_ref is None:
    m0 = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout)
    l0 = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row_layout)
  else:  # the sink as the first "key": max = sink, sum = exp2(0) = 1
    plgpu.barrier_wait(q_barriers.at[2])
    m0 = load_rows(sink_smem, 0) * LOG2_E
    l0 = plgpu.layout_cast(jnp.ones((bq,), jnp.float32), row_layout)
  acc0 = plgpu.layout_cast(jnp.zeros((bq, config.head_dim), jnp.float32),
                           plgpu.Layout.WGMMA)
  lo, hi = block_range(kv_block_range, q_tile, bq, bk, config)
  barriers = [k_barriers, v_barriers]
  if seg_ref is not None:
    barriers.append(kseg_barriers)
  acc, m, l = pipelined_loop(lo, hi, (acc0, m0, l0), fetch=fetch,
                             compute=compute, barriers=barriers,
                             num_stages=config.blocks.num_stages)
  # Rows that see no key: out 0, lse -inf (with a sink: l = 1, lse = sink).
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  q_smem[...] = (acc / along(l_safe, acc.shape, 0)).astype(dtype)
  lse_smem[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) / LOG2_E)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, out_ref.at[batch, q_rows, head])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, q_rows])
  plgpu.wait_smem_to_gmem(0)


def forward(q, k, v, segment_ids, sinks, *, config: MosaicConfig):
  """Runs the forward kernel: (out [B, T, N, H] q.dtype, lse [B, N, T] fp32).

  q: [B, T, N, H]; k, v: [B, S, K, H]; segment_ids: int32 [B, T] or None;
  sinks: [N] (any float dtype) or None. lse includes the sink. Pads T, S to
  the tiles and H to 64/128/256 (only when they are not already).
  """
  p, blocks = config.problem, config.blocks
  bq, bk, hp = blocks.block_q, blocks.block_k, config.head_dim
  q_rows, kv_rows = round_up(p.q_len, bq), round_up(p.kv_len, bk)
  q = pad_rows(pad_heads(q, hp), 1, q_rows)
  k = pad_rows(pad_heads(k, hp), 1, kv_rows)
  v = pad_rows(pad_heads(v, hp), 1, kv_rows)
  seg = None
  if segment_ids is not None:
    seg = pad_rows(segment_ids.astype(jnp.int32), 1, max(q_rows, kv_rows), -1)
  sink_rows = None
  if sinks is not None:
    sink_rows = jnp.broadcast_to(sinks.astype(jnp.float32)[:, None],
                                 (p.num_q_heads, bq))
  stages = blocks.num_stages
  scratch = dict(
      q_smem=tile_smem(bq, config),
      k_smem=tile_smem(bk, config, (stages,)),
      v_smem=tile_smem(bk, config, (stages,)),
      qseg_smem=row_smem(bq, jnp.int32),
      kseg_smem=row_smem(bk, jnp.int32, (stages,)),
      sink_smem=row_smem(bq, jnp.float32),
      lse_smem=row_smem(bq, jnp.float32),
      q_barriers=plgpu.Barrier(num_barriers=3),
      k_barriers=plgpu.Barrier(num_barriers=stages),
      v_barriers=plgpu.Barrier(num_barriers=stages),
      kseg_barriers=plgpu.Barrier(num_barriers=stages),
  )
  has_seg, has_sink = seg is not None, sink_rows is not None

  def kernel(*refs, **scratch_refs):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    seg_ref = refs[3] if has_seg else None
    sink_ref = refs[3 + has_seg] if has_sink else None
    out_ref, lse_ref = refs[-2:]
    _forward_kernel(q_ref, k_ref, v_ref, seg_ref, sink_ref, out_ref, lse_ref,
                    config=config, **scratch_refs)

  out, lse = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((p.batch, p.num_q_heads, q_rows),
                                     jnp.float32)),
      scratch_types=scratch,
      grid=(p.num_q_heads, q_rows // bq, p.batch),
      grid_names=("heads", "q_tiles", "batch"),
      **config.kernel_kwargs("swa_mosaic_forward"),
  )(*(x for x in (q, k, v, seg, sink_rows) if x is not None))
  return out[:, :p.q_len, :, :p.head_dim], lse[:, :, :p.q_len]

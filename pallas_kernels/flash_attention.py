"""Sliding-window flash attention in Pallas (Triton): tiles, forward, VJP.

impl="pallas" of `sliding_window_attention`. One program per (query block,
batch, query head) walks only the key blocks of its band
(`mask.kv_block_range`), so work is O(T·W) rather than O(T·S), and keeps an
online softmax in fp32. Interior blocks (`mask.block_fully_visible`) skip the
mask; edge blocks, partial blocks at the sequence ends and all blocks under
segment ids apply `mask.visible`, the one window predicate.

GQA/MQA: K/V stay [B, S, K, H]; query head n reads KV head n // G, no repeat.
Head dims that are not a power of two (80, 96) are padded to one in the block
shape and read with masked loads (zero padding is exact for q·k and p·v);
sequence ends that are not block multiples are masked the same way. Nothing is
copied in HBM and no [T, S] array exists.

The backward kernels live in `flash_attention_backward.py`; this file holds
what both directions share: the block sizes, the static kernel config, tile
loads and the score function.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mask import (
    block_fully_visible, kv_block_range, q_block_range, visible)
from pallas_kernels.validation import AttentionProblem

LOG2_E = math.log2(math.e)
MIN_BLOCK = 16  # Triton's tensor-core dot needs every dim >= 16.


# Tile fields of `BlockSizes`: query-row tiles and key-row tiles.
Q_TILES = ("block_q", "block_q_dq", "block_q_dkv")
K_TILES = ("block_k", "block_k_dq", "block_k_dkv")


def _is_power_of_two(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and launch parameters of the three kernels.

  block_q, block_k: forward query / key tile rows.
  block_q_dq, block_k_dq: the dQ kernel's tiles.
  block_q_dkv, block_k_dkv: the dK/dV kernel's tiles.
  All are powers of two >= 16 (Triton dots need both dims >= 16). The
  kernels shrink a tile to the sequence length's next power of two (>= 16)
  when the sequence is shorter than the tile.
  num_warps (1..16, power of two) and num_stages (>= 1) go to Triton for
  every kernel.
  """

  block_q: int = 128
  block_k: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field.name}={value!r}: expected an int")
    for name in Q_TILES + K_TILES:
      value = getattr(self, name)
      if value < MIN_BLOCK or not _is_power_of_two(value):
        raise ValueError(
            f"{name}={value!r}: expected a power of two >= {MIN_BLOCK} "
            "(Triton tiles are powers of two; its dots need dims >= 16)")
    if not (_is_power_of_two(self.num_warps) and self.num_warps <= 16):
      raise ValueError(
          f"num_warps={self.num_warps!r}: expected a power of two in [1, 16]")
    if self.num_stages < 1:
      raise ValueError(f"num_stages={self.num_stages!r}: expected an int >= 1")

  @classmethod
  def default(cls, head_dim: int, dtype) -> "BlockSizes":
    """The heuristic default for a (head_dim, dtype), aimed at H100/H200.

    Tiles shrink as the padded head dim grows (registers hold a [block, H]
    fp32 accumulator, two of them in the dK/dV kernel); fp32 inputs take
    half the tiles of 16-bit ones (full-precision dots, twice the bytes).
    """
    padded = padded_head_dim(head_dim)
    wide = jnp.dtype(dtype) == jnp.float32
    if padded <= 64:
      sizes = cls(128, 64, 64, 64, 64, 64, num_warps=4, num_stages=3)
    elif padded <= 128:
      sizes = cls(128, 64, 64, 64, 64, 64, num_warps=8, num_stages=2)
    else:
      sizes = cls(64, 32, 32, 32, 32, 32, num_warps=8, num_stages=2)
    if wide:
      sizes = dataclasses.replace(sizes, **{
          f: max(MIN_BLOCK, getattr(sizes, f) // 2) for f in Q_TILES + K_TILES})
    return sizes


def padded_head_dim(head_dim: int) -> int:
  """H rounded up to a power of two >= 16: the tile width the kernels use."""
  return max(MIN_BLOCK, pl.next_power_of_2(head_dim))


def _fit(block: int, length: int) -> int:
  """A tile no longer than the sequence needs: min(block, next pow2 >= 16)."""
  return min(block, max(MIN_BLOCK, pl.next_power_of_2(length)))


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Everything static about one call: the problem and the fitted tiles.

  Hashable, so it is the custom_vjp's non-differentiable argument.
  """

  problem: AttentionProblem
  blocks: BlockSizes
  interpret: bool

  @classmethod
  def make(cls, problem: AttentionProblem, block_sizes, interpret):
    if block_sizes is None:
      block_sizes = BlockSizes.default(problem.head_dim, problem.dtype)
    elif not isinstance(block_sizes, BlockSizes):
      raise TypeError(
          f"block_sizes={block_sizes!r}: expected "
          "pallas_kernels.flash_attention.BlockSizes or None")
    fitted = {f: _fit(getattr(block_sizes, f), problem.q_len)
              for f in Q_TILES}
    fitted.update({f: _fit(getattr(block_sizes, f), problem.kv_len)
                   for f in K_TILES})
    blocks = dataclasses.replace(block_sizes, **fitted)
    if interpret is None:
      interpret = jax.default_backend() != "gpu"
    return cls(problem, blocks, bool(interpret))

  @property
  def head_dim_padded(self) -> int:
    return padded_head_dim(self.problem.head_dim)

  @property
  def precision(self):
    """fp32 inputs get full-precision dots; Triton's default would be TF32."""
    if self.problem.dtype == jnp.float32:
      return lax.Precision.HIGHEST
    return None

  def compiler_params(self):
    return plgpu.CompilerParams(num_warps=self.blocks.num_warps,
                                num_stages=self.blocks.num_stages)

  def band_kwargs(self, block_q: int, block_k: int) -> dict:
    """Keyword arguments of the `mask` block-range functions for these tiles."""
    p = self.problem
    return dict(block_q=block_q, block_k=block_k, q_len=p.q_len,
                kv_len=p.kv_len, band=p.band)


def visit_counts(problem: AttentionProblem, block_sizes=None) -> dict:
  """How many tiles each program visits, per kernel, with the kernels' tiles.

  Returns {"forward": [cdiv(T, block_q)] key blocks per query block,
  "dq": the same for the dQ kernel, "dkv": [cdiv(S, block_k_dkv)] query
  blocks per key block (per query head of the group)}. With a window these
  are bounded by the band, independent of the sequence length.
  """
  config = KernelConfig.make(problem, block_sizes, interpret=True)
  b = config.blocks
  counts = {}
  for name, bq, bk, rng, n in (
      ("forward", b.block_q, b.block_k, kv_block_range, problem.q_len),
      ("dq", b.block_q_dq, b.block_k_dq, kv_block_range, problem.q_len),
      ("dkv", b.block_q_dkv, b.block_k_dkv, q_block_range, problem.kv_len)):
    tile = bq if rng is kv_block_range else bk
    ranges = jax.jit(functools.partial(rng, **config.band_kwargs(bq, bk)))
    lo, hi = ranges(np.arange(pl.cdiv(n, tile)))
    counts[name] = np.asarray(hi - lo)
  return counts


# --- pieces shared by the forward and backward kernels ---------------------


def load_tile(ref, rows, num_rows: int, head_dim: int):
  """Loads a [len(rows), Hp] tile; rows >= num_rows and columns >= H read 0.

  `ref` is a view whose second-to-last dim is indexed by `rows` (global row
  indices) and whose last dim is the padded head dim Hp.
  """
  cols = jnp.arange(ref.shape[-1])
  mask = (rows < num_rows)[:, None] & (cols < head_dim)[None, :]
  return plgpu.load(ref, mask=mask, other=0)


def load_row(ref, rows, num_rows: int, other):
  """Loads a [len(rows)] vector; entries past num_rows read `other`."""
  return plgpu.load(ref, mask=rows < num_rows, other=other)


def load_kv_block(k_ref, v_ref, seg_ref, kv_block, block_k: int,
                  problem: AttentionProblem):
  """Key block `kv_block` of whole-sequence refs k/v [S, Hp] and seg [S].

  Returns (k_rows [bk] global row indices, k [bk, Hp], v [bk, Hp],
  k_seg [bk] or None); rows past S read 0 (segment -2, matching no query).
  """
  start = tile_start(kv_block, block_k)
  k_rows = start + jnp.arange(block_k)
  k = load_tile(k_ref.at[pl.ds(start, block_k), :], k_rows, problem.kv_len,
                problem.head_dim)
  v = load_tile(v_ref.at[pl.ds(start, block_k), :], k_rows, problem.kv_len,
                problem.head_dim)
  k_seg = None
  if seg_ref is not None:
    k_seg = load_row(seg_ref.at[pl.ds(start, block_k)], k_rows,
                     problem.kv_len, -2)
  return k_rows, k, v, k_seg


def store_tile(ref, value, rows, num_rows: int, head_dim: int):
  cols = jnp.arange(ref.shape[-1])
  mask = (rows < num_rows)[:, None] & (cols < head_dim)[None, :]
  plgpu.store(ref, value.astype(ref.dtype), mask=mask)


def scores(q, k, config: KernelConfig):
  """Scaled (and softcapped) scores q·kᵀ of a [bq, Hp] x [bk, Hp] tile pair.

  Returns (s [bq, bk] fp32, tanh [bq, bk] or None): the tanh of the softcap,
  kept for the backward's derivative c·tanh(u/c)' = 1 - tanh².
  """
  p = config.problem
  s = plgpu.dot(q, k, trans_b=True, precision=config.precision) * p.scale
  if p.softcap is None:
    return s, None
  t = jnp.tanh(s / p.softcap)
  return p.softcap * t, t


def tile_visible(q_rows, k_rows, q_seg, k_seg, config: KernelConfig):
  """[bq, bk] bool: `mask.visible` on positions, and both rows in range."""
  p = config.problem
  q_pos = q_rows + (p.kv_len - p.q_len)
  ok = visible(q_pos[:, None], k_rows[None, :], p.band,
               None if q_seg is None else q_seg[:, None],
               None if k_seg is None else k_seg[None, :])
  return ok & (q_rows < p.q_len)[:, None] & (k_rows < p.kv_len)[None, :]


def apply_mask(x, fill, q_block, kv_block, q_rows, k_rows, q_seg, k_seg,
               config: KernelConfig, block_q: int, block_k: int):
  """`where(visible, x, fill)` on edge tiles; interior tiles pass unmasked.

  Without segment ids the choice is a `lax.cond` on
  `mask.block_fully_visible`, so only tiles on the band's edges (and partial
  tiles at the sequence ends) compute the mask.
  """
  def masked(x):
    return jnp.where(tile_visible(q_rows, k_rows, q_seg, k_seg, config), x,
                     fill)

  if config.problem.has_segments:
    return masked(x)
  full = block_fully_visible(q_block, kv_block,
                             **config.band_kwargs(block_q, block_k))
  return lax.cond(full, lambda x: x, masked, x)


def tile_start(block, size: int):
  return pl.multiple_of(block * size, size)


def block_range(range_fn, block, block_q: int, block_k: int,
                config: KernelConfig):
  """`mask.kv_block_range` / `q_block_range` as strong int32 loop bounds.

  An unbounded band side gives Python-int (weak-typed) bounds; a loop index
  derived from them makes the edge tests weak-typed bools, and the
  bool -> bool conversions jnp then inserts fail Triton verification on
  jax 0.11 (seen on an H200 with causal=False, window=None).
  """
  lo, hi = range_fn(block, **config.band_kwargs(block_q, block_k))
  return (lax.convert_element_type(lo, jnp.int32),
          lax.convert_element_type(hi, jnp.int32))


# --- forward kernel ----------------------------------------------------------


def _forward_kernel(q_ref, k_ref, v_ref, seg_ref, out_ref, lse_ref, *,
                    config: KernelConfig):
  """One (query block, batch, query head) program.

  q_ref: [bq, Hp]; k_ref, v_ref: [S', Hp] (KV head n // G, S' = S rounded up
  to block_k); seg_ref: [S'] or None; out_ref: [bq, Hp]; lse_ref: [bq].
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
  init = (jnp.zeros((bq, config.head_dim_padded), jnp.float32),
          jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(lo, hi, body, init)
  empty = l == 0.0  # rows that see no key: out 0, lse -inf
  l_safe = jnp.where(empty, 1.0, l)
  store_tile(out_ref, acc / l_safe[:, None], q_rows, p.q_len, p.head_dim)
  lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) / LOG2_E)
  plgpu.store(lse_ref, lse, mask=q_rows < p.q_len)


def round_up(n: int, block: int) -> int:
  return pl.cdiv(n, block) * block


def forward(q, k, v, segment_ids, config: KernelConfig):
  """Runs the forward kernel: (out [B, T, N, H] q.dtype, lse [B, N, T] fp32)."""
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
  )(q, k, v, segment_ids)


# --- custom VJP and the dispatch entry ----------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnames=("config",))
def _flash(config: KernelConfig, q, k, v, segment_ids):
  return forward(q, k, v, segment_ids, config)


def _flash_fwd(config: KernelConfig, q, k, v, segment_ids):
  out, lse = forward(q, k, v, segment_ids, config)
  return (out, lse), (q, k, v, segment_ids, out, lse)


def _flash_bwd(config: KernelConfig, residuals, cotangents):
  # Imported here: the backward module builds on this module's helpers.
  from pallas_kernels import flash_attention_backward
  q, k, v, segment_ids, out, lse = residuals
  d_out, d_lse = cotangents
  dq, dk, dv = flash_attention_backward.backward(
      q, k, v, segment_ids, out, lse, d_out, d_lse, config)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(q, k, v, segment_ids, problem: AttentionProblem, *,
              block_sizes=None, interpret=None):
  """The impl="pallas" entry: (out [B, T, N, H] q.dtype, lse [B, N, T] fp32).

  q: [B, T, N, H]; k, v: [B, S, K, H]; segment_ids: int32 [B, T] or None;
  `problem` from `validation.check_attention_args`. block_sizes: a
  `BlockSizes` or None for `BlockSizes.default(H, dtype)`. interpret: None
  runs Pallas in interpret mode when the default backend is not a GPU.
  Differentiable in q, k, v through both outputs.
  """
  config = KernelConfig.make(problem, block_sizes, interpret)
  return _flash(config, q, k, v, segment_ids)

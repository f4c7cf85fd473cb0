"""What the Pallas flash forward and backward kernels share: tiles and scores.

`flash_forward.py` and `flash_backward.py` both build on this module and never
on each other; `flash_attention.py` joins them into the differentiable op.
Here: the block sizes (`FlashBlockSizes`), the static config of one call
(`KernelConfig`), masked tile loads and stores, the score function and the
window mask of a tile.

Head dims that are not a power of two (80, 96) are padded to one in the block
shape (`padded_head_dim`) and read with masked loads (zero padding is exact
for q·k and p·v); sequence ends that are not block multiples are masked the
same way. Nothing is copied in HBM.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mask import block_fully_visible, visible
from pallas_kernels.numerics import matmul_precision, soft_cap
from pallas_kernels.validation import AttentionProblem, check_int_fields, is_power_of_two

LOG2_E = math.log2(math.e)
MIN_BLOCK = 16  # Triton's tensor-core dot needs every dim >= 16.


# Tile fields of `FlashBlockSizes`: query-row tiles and key-row tiles.
Q_TILES = ("block_q", "block_q_dq", "block_q_dkv")
K_TILES = ("block_k", "block_k_dq", "block_k_dkv")


@dataclasses.dataclass(frozen=True)
class FlashBlockSizes:
  """Tiles and launch parameters of the three kernels (impl="pallas").

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
    check_int_fields(self)
    for name in Q_TILES + K_TILES:
      value = getattr(self, name)
      if value < MIN_BLOCK or not is_power_of_two(value):
        raise ValueError(
            f"{name}={value!r}: expected a power of two >= {MIN_BLOCK} "
            "(Triton tiles are powers of two; its dots need dims >= 16)")
    if not (is_power_of_two(self.num_warps) and self.num_warps <= 16):
      raise ValueError(
          f"num_warps={self.num_warps!r}: expected a power of two in [1, 16]")
    if self.num_stages < 1:
      raise ValueError(f"num_stages={self.num_stages!r}: expected an int >= 1")

  @classmethod
  def default(cls, problem: AttentionProblem) -> "FlashBlockSizes":
    """The heuristic default for the problem's (H, dtype), aimed at H100/H200.

    Tiles shrink as the padded head dim grows (registers hold a [block, H]
    fp32 accumulator, two of them in the dK/dV kernel); fp32 inputs take
    half the tiles of 16-bit ones (full-precision dots, twice the bytes).
    Only H and the dtype matter here; `KernelConfig.make` then fits the
    tiles to T and S.
    """
    padded = padded_head_dim(problem.head_dim)
    wide = jnp.dtype(problem.dtype) == jnp.float32
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


def round_up(n: int, block: int) -> int:
  return pl.cdiv(n, block) * block


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Everything static about one call: the problem and the fitted tiles.

  Hashable, so it is the custom_vjp's non-differentiable argument.
  """

  problem: AttentionProblem
  blocks: FlashBlockSizes
  interpret: bool

  @classmethod
  def make(cls, problem: AttentionProblem, block_sizes, interpret):
    if block_sizes is None:
      block_sizes = FlashBlockSizes.default(problem)
    elif not isinstance(block_sizes, FlashBlockSizes):
      raise TypeError(
          f"block_sizes={block_sizes!r}: expected "
          "pallas_kernels.FlashBlockSizes or None")
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
    """`numerics.matmul_precision`: fp32 inputs never get TF32 dots."""
    return matmul_precision(self.problem.dtype)

  def compiler_params(self):
    return plgpu.CompilerParams(num_warps=self.blocks.num_warps,
                                num_stages=self.blocks.num_stages)

  def band_kwargs(self, block_q: int, block_k: int) -> dict:
    """Keyword arguments of the `mask` block-range functions for these tiles."""
    p = self.problem
    return dict(block_q=block_q, block_k=block_k, q_len=p.q_len,
                kv_len=p.kv_len, band=p.band)


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
  """Stores a [len(rows), Hp] tile; rows >= num_rows and columns >= H skipped."""
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
  return soft_cap(s, p.softcap)


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

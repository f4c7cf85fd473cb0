"""What the Mosaic GPU (Hopper) forward and backward kernels share.

`mosaic_forward.py` and `mosaic_backward.py` both build on this module and
never on each other; `mosaic_attention.py` joins them into the differentiable
op (impl="mosaic"). Here: the block sizes (`MosaicBlockSizes`, their shared
memory), the static config of one call (`MosaicConfig`), the jax version
gate, the padding of ragged inputs to whole tiles, the shared-memory tile
types, the in-register window mask of a tile (`mask.visible` on
`broadcasted_iota` positions, skipped on interior tiles: `mask_edge_tile`)
and a TMA-pipelined loop over a dynamic range of tiles (`pipelined_loop`).

Tiles are multiples of 64 rows (a warpgroup's `wgmma` is 64 rows tall, and a
128-byte swizzled bf16/fp16 row is 64 elements); head dims are padded to 64,
128 or 256 (zero columns are exact for q·kᵀ and p·v). A sequence that is not
a tile multiple is padded with zero rows in the wrapper (one HBM copy, only
then); the kernels mask those rows by position, exactly like the band.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.mask import block_fully_visible, visible
from pallas_kernels.validation import AttentionProblem, check_int_fields

try:  # jax >= 0.11.2: Mosaic GPU with GPU interpret mode
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - depends on the installed jax
  plgpu = None

LOG2_E = math.log2(math.e)
TILE_ROWS = 64          # wgmma rows per warpgroup; tiles are multiples of it
HEAD_DIMS = (64, 128, 256)  # padded head dims the kernels compile for
MIN_JAX = (0, 11, 2)    # compiled for the GPU: the jax the GPU machine has
MIN_JAX_INTERPRET = (0, 12, 1)  # interpret mode with wgmma (0.11.2 lacks it)
SMEM_BYTES = 227 * 1024  # Hopper: 228 KB per SM, 227 KB per block
SMEM_ALIGN = 1024       # Pallas Mosaic GPU starts every scratch buffer here
BARRIER_BYTES = 8       # one mbarrier
# The forward's row max and row sum cross the warpgroup's warps through
# shared memory: Mosaic adds this much to the forward's scratch.
REDUCTION_BYTES = 2048

# Tile fields of `MosaicBlockSizes`: query-row tiles and key-row tiles.
Q_TILES = ("block_q", "block_q_dq", "block_q_dkv")
K_TILES = ("block_k", "block_k_dq", "block_k_dkv")


def check_jax_version(interpret: bool = True) -> None:
  """NotImplementedError unless this jax runs the kernels (compiled for a
  GPU: jax >= 0.11.2; in GPU interpret mode, which needs `wgmma` there:
  jax >= 0.12.1)."""
  need = MIN_JAX_INTERPRET if interpret else MIN_JAX
  if plgpu is None or jax.__version_info__ < need:
    mode = "in GPU interpret mode" if interpret else "compiled for a GPU"
    raise NotImplementedError(
        f"impl='mosaic' {mode} needs jax >= {'.'.join(map(str, need))} "
        f"(Pallas Mosaic GPU); this is jax {jax.__version__}. Use "
        "impl='pallas' or 'xla'")


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
  """Tiles of the three Mosaic GPU kernels (impl="mosaic").

  block_q, block_k: forward query / key tile rows.
  block_q_dq, block_k_dq: the dQ kernel's tiles.
  block_q_dkv, block_k_dkv: the dK/dV kernel's tiles.
  All are multiples of 64 in [64, 256]. num_stages (>= 2): shared-memory
  buffers of the streamed tiles (TMA loads run that many tiles ahead - 1).
  `smem_bytes(head_dim, dtype)` is the shared memory of each kernel; a block
  size that does not fit Hopper's 227 KB is refused when the call is made.
  """

  block_q: int = 64
  block_k: int = 128
  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_stages: int = 2

  def __post_init__(self):
    check_int_fields(self)
    for name in Q_TILES + K_TILES:
      value = getattr(self, name)
      if value % TILE_ROWS or not TILE_ROWS <= value <= 256:
        raise ValueError(
            f"{name}={value!r}: expected a multiple of {TILE_ROWS} in "
            f"[{TILE_ROWS}, 256] (a warpgroup's wgmma is {TILE_ROWS} rows)")
    if not 2 <= self.num_stages <= 4:
      raise ValueError(
          f"num_stages={self.num_stages!r}: expected an int in [2, 4]")

  @classmethod
  def default(cls, problem: AttentionProblem) -> "MosaicBlockSizes":
    """The default for the problem's padded head dim (bf16 and fp16 alike).

    Each fits Hopper's shared memory (`smem_bytes`; the lowering test checks
    every one). Chosen by size, not yet by measurement on an H100/H200.
    """
    return DEFAULT_BLOCK_SIZES[padded_head_dim(problem.head_dim)]

  def smem_bytes(self, head_dim: int, dtype) -> dict:
    """Shared memory of each kernel, bytes: {"forward", "dq", "dkv"}.

    head_dim: the padded head dim (64, 128 or 256). The kernels' scratch
    buffers as Pallas Mosaic GPU lays them out (each 16-bit tile and each
    fp32/int32 row vector rounded up to 1 KB), their barriers and the
    forward's reduction scratch: Mosaic's own count when it lowers (the
    lowering test holds them equal).
    """
    e = jnp.dtype(dtype).itemsize
    s = self.num_stages

    def buffers(*sizes):
      return sum(-(-n // SMEM_ALIGN) * SMEM_ALIGN for n in sizes)

    bq, bk = self.block_q, self.block_k
    fwd = (buffers(bq * head_dim * e,                  # q, reused for out
                   s * bk * head_dim * e, s * bk * head_dim * e,  # k, v
                   bq * 4, s * bk * 4,                 # q, k segment ids
                   bq * 4, bq * 4)                     # sink row, lse
           + (3 + 3 * s) * BARRIER_BYTES + REDUCTION_BYTES)
    bq, bk = self.block_q_dq, self.block_k_dq
    dq = (buffers(bq * head_dim * e, bq * head_dim * e,  # q (then dq), dO
                  s * bk * head_dim * e, s * bk * head_dim * e,  # k, v
                  bq * 4, s * bk * 4,                  # q, k segment ids
                  bq * 4, bq * 4)                      # lse, delta
          + (5 + 3 * s) * BARRIER_BYTES)
    bq, bk = self.block_q_dkv, self.block_k_dkv
    dkv = (buffers(bk * head_dim * e, bk * head_dim * e,  # k, v (dk, dv)
                   bk * 4,                             # key segment ids
                   s * bq * head_dim * e, s * bq * head_dim * e,  # q, dO
                   s * bq * 4, s * bq * 4, s * bq * 4)  # lse, delta, q seg
           + (3 + 5 * s) * BARRIER_BYTES)
    return {"forward": fwd, "dq": dq, "dkv": dkv}

  def check_fits(self, head_dim: int, dtype) -> None:
    """ValueError naming a kernel whose tiles exceed Hopper's shared memory."""
    for kernel, used in self.smem_bytes(head_dim, dtype).items():
      if used > SMEM_BYTES:
        raise ValueError(
            f"block_sizes={self!r}: the {kernel} kernel needs {used} bytes "
            f"of shared memory at head_dim={head_dim}, over Hopper's "
            f"{SMEM_BYTES}; use smaller tiles or num_stages")


# One default per padded head dim; bf16 and fp16 have the same itemsize.
# Registers bound the tiles as much as shared memory: one warpgroup holds its
# fp32 accumulators, 32 registers per thread per 64x64 (forward: s [bq, bk]
# and acc [bq, Hp]; dQ: s, dp and dq; dK/dV: s, dp, dk [bk, Hp], dv). At
# Hp = 256 dK/dV's two [64, 256] accumulators alone take 256 registers per
# thread: it compiles with spills (splitting them over two warpgroups is the
# next step, once a GPU measures it).
DEFAULT_BLOCK_SIZES = {
    64: MosaicBlockSizes(64, 128, 64, 128, 64, 64, num_stages=2),
    128: MosaicBlockSizes(64, 128, 64, 64, 64, 64, num_stages=2),
    256: MosaicBlockSizes(64, 64, 64, 64, 64, 64, num_stages=2),
}


def padded_head_dim(head_dim: int) -> int:
  """H rounded up to 64, 128 or 256; NotImplementedError above 256."""
  for padded in HEAD_DIMS:
    if head_dim <= padded:
      return padded
  raise NotImplementedError(
      f"head_dim={head_dim}: impl='mosaic' supports head dims up to "
      f"{HEAD_DIMS[-1]}; use impl='pallas' or 'xla'")


def round_up(n: int, block: int) -> int:
  return pl.cdiv(n, block) * block


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Everything static about one call: the problem, tiles, interpret params.

  Hashable, so it is the custom_vjp's non-differentiable argument.
  interpret: None compiles for the GPU, else the `InterpretGPUParams`.
  """

  problem: AttentionProblem
  blocks: MosaicBlockSizes
  interpret: object

  @classmethod
  def make(cls, problem: AttentionProblem, block_sizes, interpret):
    if interpret is None:
      interpret = jax.default_backend() != "gpu"
    check_jax_version(interpret is not False)
    head_dim = padded_head_dim(problem.head_dim)
    if block_sizes is None:
      block_sizes = MosaicBlockSizes.default(problem)
    elif not isinstance(block_sizes, MosaicBlockSizes):
      raise TypeError(
          f"block_sizes={block_sizes!r}: expected "
          "pallas_kernels.MosaicBlockSizes or None")
    block_sizes.check_fits(head_dim, problem.dtype)
    if interpret is True:
      interpret = plgpu.InterpretGPUParams()
    elif interpret is False:
      interpret = None
    elif not isinstance(interpret, plgpu.InterpretGPUParams):
      raise TypeError(
          f"interpret={interpret!r}: expected None, a bool or "
          "jax.experimental.pallas.mosaic_gpu.InterpretGPUParams")
    return cls(problem, block_sizes, interpret)

  @property
  def head_dim(self) -> int:
    """The padded head dim Hp the kernels run on."""
    return padded_head_dim(self.problem.head_dim)

  @property
  def dtype(self):
    return jnp.dtype(self.problem.dtype)

  def band_kwargs(self, block_q: int, block_k: int) -> dict:
    """Keyword arguments of the `mask` block-range functions for these tiles."""
    p = self.problem
    return dict(block_q=block_q, block_k=block_k, q_len=p.q_len,
                kv_len=p.kv_len, band=p.band)

  def kernel_kwargs(self, name: str) -> dict:
    """`plgpu.kernel` keywords shared by every kernel: name, interpret."""
    return dict(kernel_name=name, interpret=self.interpret,
                compiler_params=plgpu.CompilerParams(approx_math=False))


def pad_rows(x, axis: int, rows: int, value=0):
  """`x` padded with `value` along `axis` to `rows` (no copy if already)."""
  extra = rows - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def pad_heads(x, head_dim: int):
  """[..., H] zero-padded to [..., Hp] (no copy if H == Hp)."""
  return pad_rows(x, x.ndim - 1, head_dim)


def tile_smem(rows: int, config: MosaicConfig, leading=()):
  """A [*leading, rows, Hp] shared-memory tile, swizzled for TMA and wgmma."""
  swizzle = 128  # bytes: 64 elements of a 16-bit row, a divisor of every Hp
  elems = swizzle // config.dtype.itemsize
  return plgpu.SMEM(
      (*leading, rows, config.head_dim), config.dtype,
      transforms=(plgpu.TilingTransform((8, elems)),
                  plgpu.SwizzleTransform(swizzle)))


def row_smem(rows: int, dtype, leading=()):
  """A [*leading, rows] shared-memory row vector (fp32 or int32)."""
  return plgpu.SMEM((*leading, rows), dtype)


def load_rows(ref, axis: int):
  """A [rows] shared-memory vector in the layout of a wgmma tile's `axis`.

  axis=0: the vector runs along a tile's rows (one entry per row, broadcast
  across columns); axis=1: along its columns.
  """
  return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(1 - axis))


def along(x, shape, axis: int):
  """A row vector (from `load_rows(.., axis)`) broadcast to a tile `shape`."""
  return lax.broadcast_in_dim(x, shape, [axis])


def iota(shape, axis: int):
  """int32 indices along `axis` of a tile, in the wgmma layout."""
  return plgpu.broadcasted_iota(jnp.int32, shape, axis,
                                layout=plgpu.Layout.WGMMA)


def tile_visible(q_start, k_start, shape, q_axis: int, q_seg, k_seg,
                 config: MosaicConfig):
  """bool tile: `mask.visible` on the positions of a (query, key) tile pair.

  shape: the tile's (rows, cols); q_axis: 0 when rows are queries ([bq, bk]
  scores), 1 when they are keys ([bk, bq] transposed scores). q_start,
  k_start: the first query and key row of the tile (rows of the unpadded
  arrays); q_seg / k_seg: tiles of segment ids of that shape, or None. Rows
  past T or S are never visible.
  """
  p = config.problem
  k_axis = 1 - q_axis
  q_rows = q_start + iota(shape, q_axis)
  k_rows = k_start + iota(shape, k_axis)
  ok = visible(q_rows + (p.kv_len - p.q_len), k_rows, p.band, q_seg, k_seg)
  return ok & (q_rows < p.q_len) & (k_rows < p.kv_len)


def mask_edge_tile(x, fill, q_tile, k_tile, q_seg, k_seg, *, q_axis: int,
                   block_q: int, block_k: int, config: MosaicConfig):
  """`where(visible, x, fill)` on a tile on the band's edge; interior tiles
  (`mask.block_fully_visible`) pass unmasked, through a `lax.cond`.

  x: a [bq, bk] (q_axis=0) or [bk, bq] (q_axis=1) tile of query tile
  `q_tile` and key tile `k_tile`. With segment ids every tile is masked.
  """
  shape = x.shape

  def masked(x):
    visible = tile_visible(q_tile * block_q, k_tile * block_k, shape, q_axis,
                           q_seg, k_seg, config)
    return jnp.where(visible, x, fill)

  if config.problem.has_segments:
    return masked(x)
  full = block_fully_visible(q_tile, k_tile,
                             **config.band_kwargs(block_q, block_k))
  return lax.cond(full, lambda x: x, masked, x)


def block_range(range_fn, block, block_q: int, block_k: int,
                config: MosaicConfig):
  """`mask.kv_block_range` / `q_block_range` as int32 loop bounds."""
  lo, hi = range_fn(block, **config.band_kwargs(block_q, block_k))
  return (lax.convert_element_type(lo, jnp.int32),
          lax.convert_element_type(hi, jnp.int32))


def pipelined_loop(lo, hi, carry, *, fetch, compute, barriers, num_stages):
  """`for step in [lo, hi)`, its tiles TMA-loaded num_stages - 1 steps ahead.

  fetch(step, slot): starts the TMA copies of `step`'s tiles into buffer
  `slot`, each signalling its own barrier of `slot`. barriers: the
  per-slot barrier arrays (every copy of a step waits on its own).
  compute(step, slot, carry) -> carry: runs once the copies have landed; it
  must be done reading the slot when it returns (its wgmmas are awaited):
  the next fetch into that slot is issued at the following step, after a
  `commit_smem` (the race detector's test holds this).
  """
  for s in range(num_stages - 1):
    @pl.when(lo + s < hi)
    def _prologue():
      fetch(lo + s, s)

  def body(step, carry):
    slot = lax.rem(step - lo, num_stages)
    ahead = step + num_stages - 1

    @pl.when(ahead < hi)
    def _prefetch():
      # The slot was last read at step - 1, also by plain loads (segment
      # ids, lse rows): order those reads before the TMA overwrites it.
      plgpu.commit_smem()
      fetch(ahead, lax.rem(ahead - lo, num_stages))

    for barrier in barriers:
      plgpu.barrier_wait(barrier.at[slot])
    return compute(step, slot, carry)

  return lax.fori_loop(lo, hi, body, carry)

"""impl="splash": JAX's TPU splash attention kernel as one differentiable op.

The kernel is JAX's own (`jax.experimental.pallas.ops.tpu.splash_attention`);
nothing here is a kernel. This module maps the op's semantics onto it:

- the band: one computable mask (`band_mask_function`, checked against
  `mask.visible`) on splash's padded [Tp, Sp] grid: query row r at position
  r + S - T (bottom-right alignment), key column c, visible iff
  `c - (r + S - T)` is inside the band and c < S (padding keys never). It is
  evaluated in the kernel, so no [T, S] array exists, and splash skips the
  blocks it proves empty in the forward and both backward kernels;
- lengths: T and S are zero padded inside to multiples of the block sizes
  (splash needs whole blocks), padded query rows are dropped on the way out;
- scale: splash does not scale q, so q is multiplied by it first (and dq by
  it on the way back); softcap: splash's `attn_logits_soft_cap` caps the
  scaled scores, c·tanh(s / c), as the op does;
- GQA/MQA: splash's MHA kernel takes K/V with fewer heads (N % K == 0) and
  indexes them per group: K/V are never repeated; the batch is a `jax.vmap`;
- segment ids: splash's `SegmentIds` (padding rows get -1, masked anyway);
- sinks: splash starts each row's running max at its head's sink and its sum
  at 1 (its forward); lse is splash's saved residual;
- rows that see no key (T > S): splash leaves 0/0 there (and averages the
  masked keys where such a row shares a visited block with rows that see
  keys), so those rows are set to out = 0, lse = -inf (or the sink) here,
  from the static band alone (with T == S every row sees itself);
- the backward is our custom VJP around splash's own dQ and dK/dV kernels
  (`_splash_attention_bwd_dq` / `_splash_attention_bwd_dkv`, private names
  of the same signature in jax 0.10.2 and 0.12.1): it passes them
  di = rowsum(dO·O) − dLSE, so gradients flow through lse too (splash's own
  VJP has no lse cotangent and refuses `save_residuals=True` under AD), and
  computes dsinks with `numerics.sink_gradient` in fp32 (splash reduces it
  after a cast to the output's dtype in jax 0.10.2: bf16 loses the sum).

On TPU the kernels compile through Mosaic; elsewhere they run in Pallas
interpret mode (`interpret=None`: interpret unless the backend is a TPU), the
same results on CPU, slowly: a test path, not a fast one.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask)

from pallas_kernels.mask import Band, cdiv
from pallas_kernels.numerics import sink_gradient
from pallas_kernels.validation import AttentionProblem, check_positive_int

LANES = 128  # splash's tiles are whole multiples of the TPU's 128 lanes


@dataclasses.dataclass(frozen=True)
class SplashBlockSizes:
  """Rows per tile of splash's three kernels (impl="splash").

  Every size is a multiple of 128 (splash's rule: the TPU's lanes). T is
  padded to a multiple of every query block, S of every key block, inside
  the op. `default(problem)` picks them per length and head dim.
  """

  block_q: int = 128
  block_kv: int = 128
  block_q_dkv: int = 128
  block_kv_dkv: int = 128
  block_q_dq: int = 128
  block_kv_dq: int = 128

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      check_positive_int(field.name, value)
      if value % LANES:
        raise ValueError(
            f"{field.name}={value!r}: expected a multiple of {LANES} (splash "
            "attention's tiles are whole TPU lane groups)")

  @classmethod
  def default(cls, problem: AttentionProblem) -> "SplashBlockSizes":
    """The largest of 512 / 256 / 128 (256 / 128 for head_dim > 128, whose
    tiles need twice the VMEM) that pads each length no further than to its
    next multiple of 128. A heuristic, not a measurement (no TPU here)."""
    sizes = (512, 256, 128) if problem.head_dim <= 128 else (256, 128)

    def pick(length):
      need = cdiv(length, LANES) * LANES
      return next(b for b in sizes if need % b == 0)

    bq, bk = pick(problem.q_len), pick(problem.kv_len)
    return cls(bq, bk, bq, bk, bq, bk)

  @property
  def q_multiple(self) -> int:
    """T is padded to a multiple of this (every query block divides it)."""
    return math.lcm(self.block_q, self.block_q_dkv, self.block_q_dq)

  @property
  def kv_multiple(self) -> int:
    """S is padded to a multiple of this."""
    return math.lcm(self.block_kv, self.block_kv_dkv, self.block_kv_dq)

  def splash(self) -> splash_kernel.BlockSizes:
    """Splash's own `BlockSizes` (separate dQ and dK/dV kernels)."""
    return splash_kernel.BlockSizes(
        block_q=self.block_q, block_kv=self.block_kv,
        block_kv_compute=self.block_kv, block_q_dkv=self.block_q_dkv,
        block_kv_dkv=self.block_kv_dkv,
        block_kv_dkv_compute=self.block_kv_dkv, block_q_dq=self.block_q_dq,
        block_kv_dq=self.block_kv_dq)


def band_mask_function(q_ids, kv_ids, *, band: Band, q_offset: int,
                       kv_len: int):
  """Splash's mask function: True where query row q_ids sees key kv_ids.

  `mask.visible` at query position q_ids + q_offset, and kv_ids < kv_len (a
  padding key is never visible). Plain operators only: splash calls it on
  numpy index blocks on the host (to find empty and full blocks) and on
  int32 tiles inside the kernel. Tested equal to `mask.visible`.
  """
  ok = (kv_ids < kv_len) & (q_ids >= 0)  # q_ids >= 0 always: the tile's shape
  q_pos = q_ids + q_offset
  if band.left is not None:
    ok = ok & (kv_ids >= q_pos - band.left)
  if band.right is not None:
    ok = ok & (kv_ids <= q_pos + band.right)
  return ok


class BandMask(splash_mask.Mask):
  """The op's band on splash's padded [Tp, Sp] grid, computed in the kernel.

  Splash recognises a mask it can compute in the kernel by its `q_sequence`
  and `mask_function` attributes (as its own `LocalMask` has): no
  [T, S] mask array is ever built or loaded.
  """

  def __init__(self, shape, band: Band, q_offset: int, kv_len: int):
    self._shape = tuple(shape)
    self._key = (self._shape, band, q_offset, kv_len)
    self.q_sequence = np.arange(shape[0], dtype=np.int32)
    self.mask_function = functools.partial(
        band_mask_function, band=band, q_offset=q_offset, kv_len=kv_len)

  @property
  def shape(self):
    return self._shape

  def __getitem__(self, idx) -> np.ndarray:
    q_slice, kv_slice = idx
    rows = self.q_sequence[q_slice]
    cols = np.arange(self._shape[1])[kv_slice]
    return self.mask_function(rows[:, None], cols[None, :])

  def __eq__(self, other):
    return isinstance(other, BandMask) and self._key == other._key

  def __hash__(self):
    return hash((BandMask, self._key))


@dataclasses.dataclass(frozen=True)
class SplashConfig:
  """Static description of one call: the custom VJP's static argument."""

  problem: AttentionProblem
  blocks: SplashBlockSizes
  interpret: bool

  @property
  def q_pad(self) -> int:
    """Tp: T rounded up to whole query blocks."""
    m = self.blocks.q_multiple
    return cdiv(self.problem.q_len, m) * m

  @property
  def kv_pad(self) -> int:
    """Sp: S rounded up to whole key blocks."""
    m = self.blocks.kv_multiple
    return cdiv(self.problem.kv_len, m) * m

  def kernel(self) -> splash_kernel.SplashAttentionKernel:
    p = self.problem
    return _make_kernel((self.q_pad, self.kv_pad), p.band, p.kv_len - p.q_len,
                        p.kv_len, p.num_q_heads, p.softcap, self.blocks,
                        self.interpret)

  def rows_that_see_keys(self) -> np.ndarray:
    """bool [T]: query rows whose band holds a key (all of them when T <= S)."""
    p = self.problem
    q_pos = np.arange(p.q_len) + (p.kv_len - p.q_len)
    first = (np.zeros_like(q_pos) if p.band.left is None
             else np.maximum(q_pos - p.band.left, 0))
    last = (np.full_like(q_pos, p.kv_len - 1) if p.band.right is None
            else np.minimum(q_pos + p.band.right, p.kv_len - 1))
    return first <= last


@functools.lru_cache(maxsize=64)
def _make_kernel(shape, band, q_offset, kv_len, num_heads, softcap, blocks,
                 interpret) -> splash_kernel.SplashAttentionKernel:
  """Splash's MHA kernel for this mask (its block maps built once, eagerly,
  so a kernel made while tracing holds no tracer and can be cached)."""
  mask = BandMask(shape, band, q_offset, kv_len)
  with jax.ensure_compile_time_eval():
    kernel = splash_kernel.make_splash_mha(
        splash_mask.MultiHeadMask([mask] * num_heads),
        block_sizes=blocks.splash(), save_residuals=True,
        attn_logits_soft_cap=softcap, head_shards=1, q_seq_shards=1,
        interpret=interpret)
  # A computable mask: no partial mask blocks to load (and none to collapse).
  assert kernel.fwd_mask_info.partial_mask_blocks is None
  return kernel


def _pad_rows(x, length, axis, value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _to_heads(x, length):
  """[B, T, N, H] -> [B, N, length, H], zero padded."""
  return _pad_rows(x, length, axis=1).transpose(0, 2, 1, 3)


def _from_heads(x, length):
  """[B, N, Tp, H] -> [B, T, N, H] (padding rows dropped)."""
  return x[:, :, :length].transpose(0, 2, 1, 3)


def _segments(segment_ids, config: SplashConfig):
  """int32 [B, T] -> splash's `SegmentIds` batched over B, or None."""
  if segment_ids is None:
    return None
  return splash_kernel.SegmentIds(
      q=_pad_rows(segment_ids, config.q_pad, axis=1, value=-1),
      kv=_pad_rows(segment_ids, config.kv_pad, axis=1, value=-1))


def _scaled_q(q, config: SplashConfig):
  """q·scale in q's dtype, in splash's [B, N, Tp, H] layout."""
  q = (q.astype(jnp.float32) * config.problem.scale).astype(q.dtype)
  return _to_heads(q, config.q_pad)


def _forward(q, k, v, segment_ids, sinks, config: SplashConfig):
  """(out [B, T, N, H] in q.dtype, lse [B, N, T] fp32) from splash's forward."""
  p = config.problem
  kernel = config.kernel()

  def one(q, k, v, seg):  # q [N, Tp, H], k/v [K, Sp, H]
    out, (lse,) = kernel(q, k, v, segment_ids=seg, sinks=sinks)
    return out, lse

  out, lse = jax.vmap(one)(_scaled_q(q, config), _to_heads(k, config.kv_pad),
                           _to_heads(v, config.kv_pad),
                           _segments(segment_ids, config))
  out, lse = _from_heads(out, p.q_len), lse[:, :, :p.q_len]
  sees = config.rows_that_see_keys()
  if not sees.all():  # rows before every key: the op's empty rows
    empty = (jnp.float32(-jnp.inf) if sinks is None
             else sinks.astype(jnp.float32)[None, :, None])
    out = jnp.where(sees[None, :, None, None], out, 0).astype(q.dtype)
    lse = jnp.where(sees[None, None, :], lse, empty)
  return out.astype(q.dtype), lse.astype(jnp.float32)


def _backward(q, k, v, segment_ids, sinks, out, lse, d_out, d_lse,
              config: SplashConfig):
  """dq, dk, dv (and dsinks, or None) from splash's dQ and dK/dV kernels.

  With P from lse (the sink included), splash's kernels compute
  dS = P ∘ (dO·Vᵀ − di) times the softcap's 1 − tanh²; di = rowsum(dO ∘ O) −
  dLSE carries the lse cotangent. Rows that see no key get dO = 0, di = 0
  and lse 0 (their masked scores give P = 0).
  """
  p = config.problem
  kernel = config.kernel()
  blocks = kernel.kwargs["block_sizes"]
  common = dict(
      is_mqa=False, mask_value=kernel.kwargs["mask_value"],
      attn_logits_soft_cap=p.softcap, q_layout=blocks.q_layout,
      k_layout=blocks.k_layout, v_layout=blocks.v_layout,
      mask_function=kernel.kwargs["mask_function"], interpret=config.interpret)
  sees = jnp.asarray(config.rows_that_see_keys())[None, None, :]
  # fp32 operands at HIGHEST whatever the input dtype.
  delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32),
                     out.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  shift = delta - d_lse
  di = _pad_rows(jnp.where(sees, shift, 0.0), config.q_pad, axis=2)
  lse_rows = _pad_rows(jnp.where(sees, lse, 0.0), config.q_pad, axis=2)
  d_out = jnp.where(jnp.swapaxes(sees, 1, 2)[..., None], d_out, 0)
  d_out = _to_heads(d_out.astype(q.dtype), config.q_pad)

  def one(q, k, v, seg, lse, do, di):
    _, dk, dv = splash_kernel._splash_attention_bwd_dkv(  # pylint: disable=protected-access
        q, k, v, seg, None, lse, do, di, bq=blocks.block_q_dkv,
        bkv=blocks.block_kv_dkv, bkv_compute=blocks.block_kv_dkv_compute,
        mask_info=kernel.dkv_mask_info, use_fused_bwd_kernel=False, **common)
    dq = splash_kernel._splash_attention_bwd_dq(  # pylint: disable=protected-access
        q, k, v, seg, None, lse, do, di, bq=blocks.block_q_dq,
        bkv=blocks.block_kv_dq, mask_info=kernel.dq_mask_info, **common)
    return dq, dk, dv

  dq, dk, dv = jax.vmap(one)(
      _scaled_q(q, config), _to_heads(k, config.kv_pad),
      _to_heads(v, config.kv_pad), _segments(segment_ids, config), lse_rows,
      d_out, di)
  dq = (_from_heads(dq, p.q_len).astype(jnp.float32) * p.scale).astype(q.dtype)
  dk = _from_heads(dk, p.kv_len).astype(k.dtype)
  dv = _from_heads(dv, p.kv_len).astype(v.dtype)
  d_sinks = None if sinks is None else sink_gradient(sinks, lse, shift)
  return dq, dk, dv, d_sinks


@functools.partial(jax.custom_vjp, nondiff_argnames=("config",))
def _splash(q, k, v, segment_ids, sinks, config: SplashConfig):
  return _forward(q, k, v, segment_ids, sinks, config)


def _splash_fwd(q, k, v, segment_ids, sinks, config: SplashConfig):
  out, lse = _forward(q, k, v, segment_ids, sinks, config)
  return (out, lse), (q, k, v, segment_ids, sinks, out, lse)


def _splash_bwd(config: SplashConfig, residuals, cotangents):
  q, k, v, segment_ids, sinks, out, lse = residuals
  d_out, d_lse = cotangents
  dq, dk, dv, d_sinks = _backward(q, k, v, segment_ids, sinks, out, lse,
                                  d_out, d_lse, config)
  return dq, dk, dv, None, d_sinks


_splash.defvjp(_splash_fwd, _splash_bwd)


def attention(q, k, v, segment_ids, problem: AttentionProblem, *, sinks=None,
              block_sizes: SplashBlockSizes | None = None, interpret=None):
  """The impl="splash" entry: (out [B, T, N, H] q.dtype, lse [B, N, T] fp32).

  q: [B, T, N, H]; k, v: [B, S, K, H]; segment_ids: int32 [B, T] or None;
  sinks: [N] or None. block_sizes: a `SplashBlockSizes` or None for
  `SplashBlockSizes.default(problem)`. interpret: None interprets splash's
  kernels unless the default backend is a TPU. Differentiable in q, k, v and
  sinks through both outputs.
  """
  if block_sizes is None:
    block_sizes = SplashBlockSizes.default(problem)
  elif not isinstance(block_sizes, SplashBlockSizes):
    raise TypeError(
        f"block_sizes={block_sizes!r}: expected "
        "pallas_kernels.SplashBlockSizes or None")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  config = SplashConfig(problem, block_sizes, bool(interpret))
  return _splash(q, k, v, segment_ids, sinks, config=config)

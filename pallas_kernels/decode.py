"""Decode attention: a few new queries against a (rolling) KV cache.

Generation writes each new key/value into a cache slot and attends the new
queries to every slot. Slots carry the absolute position they hold, so one op
serves both cache layouts:

  ring (a sliding layer with C >= W slots): token p written at p % C; slots
    hold out-of-order positions once it wraps, stale ones are masked.
  linear buffer (a full layer, or a sliding layer with C < W, i.e. a cache
    sized for max_len < W positions): token p written at p, for p < C.
The op only reads positions; which layout a layer gets, and what happens
past a linear buffer's end, is `models.kv_cache`'s business.

File order: block sizes -> Pallas kernel -> its wrapper and the split combine
-> the dense paths (`reference.dense_attention` masked by slot positions) ->
validation -> the table of implementations -> `decode_attention`.
The Pallas kernel is forward only (generation does not need a gradient).
Attention sinks join each row's denominator once, in the split combine
(`combine_splits`), never per split.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.features import default_decode_impl, resolve_impl
from pallas_kernels.flash_tiles import MIN_BLOCK, padded_head_dim
from pallas_kernels.mask import Band, cdiv, visible
from pallas_kernels.numerics import matmul_precision, soft_cap
from pallas_kernels.reference import dense_attention, fp32_dense_attention
from pallas_kernels.validation import (AttentionProblem, check_attention_args,
                                       check_positive_int, is_power_of_two)


def slot_visible(q_pos, kv_pos, band: Band):
  """Whether the cache slot holding `kv_pos` is visible to the query at `q_pos`.

  A slot with a negative position is empty; otherwise the window predicate
  `mask.visible` decides. Arguments broadcast like `visible`'s.
  """
  return (kv_pos >= 0) & visible(q_pos, kv_pos, band)


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """Tiling of the Pallas decode kernel.

  block_k: cache slots per inner step (a power of 2 >= 16).
  num_splits: programs that share one (batch, kv head) along the cache
    (flash-decoding); None picks enough to fill the GPU (`resolve_splits`).
  num_warps, num_stages: Triton compiler parameters.
  """

  block_k: int = 64
  num_splits: int | None = None
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    if (isinstance(self.block_k, bool) or not isinstance(self.block_k, int)
        or self.block_k < MIN_BLOCK or not is_power_of_two(self.block_k)):
      raise ValueError(
          f"block_k={self.block_k!r}: expected a power of 2 >= {MIN_BLOCK}")
    if self.num_splits is not None:
      check_positive_int("num_splits", self.num_splits)
    check_positive_int("num_warps", self.num_warps)
    check_positive_int("num_stages", self.num_stages)

  @classmethod
  def default(cls, problem: AttentionProblem) -> "DecodeBlockSizes":
    """64 slots per step, or fewer for a cache shorter than that."""
    return cls(block_k=max(MIN_BLOCK,
                           min(64, pl.next_power_of_2(problem.kv_len))))

  def resolve_splits(self, problem: AttentionProblem) -> int:
    """The split count: as given, or ~256 programs in all, at most one per block.

    Decode has only B * K (batch, kv head) pairs, too few to fill a GPU;
    splitting the cache gives each SM work (H100/H200: 132 SMs).
    """
    num_blocks = cdiv(problem.kv_len, self.block_k)
    if self.num_splits is not None:
      return min(self.num_splits, num_blocks)
    pairs = problem.batch * problem.num_kv_heads
    return max(1, min(num_blocks, cdiv(256, pairs)))


def _decode_kernel(q_ref, row_pos_ref, kv_pos_ref, k_ref, v_ref, o_ref, lse_ref,
                   *, band: Band, scale: float, softcap: float | None,
                   block_k: int, split_len: int, num_slots: int, precision):
  """One (batch, kv head, split) program: all R rows against one cache split.

  q_ref: [R, H] (rows r = t * G + g, padded); row_pos_ref: [R] int32 (-1 on
  padding rows); kv_pos_ref: [C] int32; k_ref, v_ref: [C, H].
  o_ref: [R, H] fp32, this split's normalised output; lse_ref: [R] fp32.
  """
  q = q_ref[...]
  row_pos = row_pos_ref[...]
  rows, head_dim = q.shape
  split_start = pl.program_id(2) * split_len
  dims = (((1,), (1,)), ((), ()))  # contract H of both: q · kᵀ

  def body(i, carry):
    start = split_start + i * block_k
    in_cache = start + jnp.arange(block_k) < num_slots
    kv_pos = plgpu.load(kv_pos_ref.at[pl.ds(start, block_k)], mask=in_cache,
                        other=-1)
    mask = slot_visible(row_pos[:, None], kv_pos[None, :], band)  # [R, bk]

    def update(carry):
      acc, m_prev, l_prev = carry
      k = plgpu.load(k_ref.at[pl.ds(start, block_k), :],
                     mask=in_cache[:, None], other=0)
      s = lax.dot_general(q, k, dims, precision=precision,
                          preferred_element_type=jnp.float32) * scale
      s, _ = soft_cap(s, softcap)
      s = jnp.where(mask, s, -jnp.inf)
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
      m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # rows seeing nothing
      p = jnp.exp(s - m_safe[:, None])
      correction = jnp.exp(m_prev - m_safe)
      v = plgpu.load(v_ref.at[pl.ds(start, block_k), :],
                     mask=in_cache[:, None], other=0)
      pv = jnp.dot(p.astype(v.dtype), v, precision=precision,
                   preferred_element_type=jnp.float32)
      return (acc * correction[:, None] + pv, m_next,
              l_prev * correction + jnp.sum(p, axis=1))

    # Skip blocks no row sees: empty slots of a partly filled linear cache.
    return lax.cond(jnp.max(mask.astype(jnp.int32)) > 0, update,
                    lambda carry: carry, carry)

  init = (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows,), -jnp.inf, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(0, split_len // block_k, body, init)
  seen = l > 0
  o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None],
                         0.0)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def combine_splits(out, lse, sinks=None):
  """Merges per-split results: out [..., S, R, H], lse [..., S, R] fp32.

  Each split's output is normalised over its own slots; weighting by
  exp(lse_split - lse) renormalises over all. sinks: fp32 broadcastable to
  [..., R] (each row's sink logit) or None; it joins the total denominator
  here, once, and so scales every split's weight down. All -inf rows give
  0, -inf (0, sink with sinks).
  """
  total = jax.nn.logsumexp(lse, axis=-2)  # [..., R]
  if sinks is not None:
    total = jnp.logaddexp(total, sinks)
  safe = jnp.where(jnp.isfinite(total), total, 0.0)
  weights = jnp.exp(lse - safe[..., None, :])  # 0 for splits that saw nothing
  return jnp.sum(weights[..., None] * out, axis=-3), total


@functools.partial(jax.jit, static_argnames=("problem", "block_sizes",
                                             "interpret"))
def _pallas_decode(q, k_cache, v_cache, q_positions, kv_positions, sinks, *,
                   problem: AttentionProblem, block_sizes: DecodeBlockSizes,
                   interpret: bool):
  """Flash-decoding: grid (B, K, splits), then `combine_splits` in jnp."""
  p = problem
  batch, q_len, num_kv, group = p.batch, p.q_len, p.num_kv_heads, p.group_size
  rows = q_len * group
  padded_rows = max(MIN_BLOCK, pl.next_power_of_2(rows))
  head_dim = padded_head_dim(p.head_dim)
  pad_h = ((0, 0),) * 3 + ((0, head_dim - p.head_dim),)
  # (B, T, K, G, H) -> (B, K, T * G, H): one tile of rows per kv head.
  q_rows = q.reshape(batch, q_len, num_kv, group, p.head_dim)
  q_rows = q_rows.transpose(0, 2, 1, 3, 4).reshape(batch, num_kv, rows,
                                                   p.head_dim)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, padded_rows - rows),
                            (0, head_dim - p.head_dim)))
  row_pos = jnp.repeat(q_positions, group, axis=1)  # (B, T * G)
  row_pos = jnp.pad(row_pos, ((0, 0), (0, padded_rows - rows)),
                    constant_values=-1)
  if head_dim != p.head_dim:  # a copy of the cache: keep H a power of 2 >= 16
    k_cache, v_cache = jnp.pad(k_cache, pad_h), jnp.pad(v_cache, pad_h)

  block_k = block_sizes.block_k
  num_splits = block_sizes.resolve_splits(p)
  split_len = cdiv(cdiv(p.kv_len, block_k), num_splits) * block_k
  num_splits = cdiv(p.kv_len, split_len)
  kernel = functools.partial(
      _decode_kernel, band=p.band, scale=p.scale, softcap=p.softcap,
      block_k=block_k, split_len=split_len, num_slots=p.kv_len,
      precision=matmul_precision(p.dtype))
  cache_spec = pl.BlockSpec((None, p.kv_len, None, head_dim),
                            lambda b, h, s: (b, 0, h, 0))
  out, lse = pl.pallas_call(
      kernel,
      grid=(batch, num_kv, num_splits),
      in_specs=[
          pl.BlockSpec((None, None, padded_rows, head_dim),
                       lambda b, h, s: (b, h, 0, 0)),
          pl.BlockSpec((None, padded_rows), lambda b, h, s: (b, 0)),
          pl.BlockSpec((None, p.kv_len), lambda b, h, s: (b, 0)),
          cache_spec,
          cache_spec,
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, padded_rows, head_dim),
                       lambda b, h, s: (b, h, s, 0, 0)),
          pl.BlockSpec((None, None, None, padded_rows),
                       lambda b, h, s: (b, h, s, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct(
              (batch, num_kv, num_splits, padded_rows, head_dim), jnp.float32),
          jax.ShapeDtypeStruct((batch, num_kv, num_splits, padded_rows),
                               jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="swa_decode",
  )(q_rows, row_pos, kv_positions, k_cache, v_cache)
  sink_rows = None
  if sinks is not None:  # [N] -> [K, R]: row t * G + g has head k * G + g
    sink_rows = jnp.tile(sinks.astype(jnp.float32).reshape(num_kv, 1, group),
                         (1, q_len, 1)).reshape(num_kv, rows)
    sink_rows = jnp.pad(sink_rows, ((0, 0), (0, padded_rows - rows)),
                        constant_values=-jnp.inf)
  out, lse = combine_splits(out, lse, sink_rows)  # (B, K, R, H), (B, K, R)
  out = out[:, :, :rows, :p.head_dim].reshape(batch, num_kv, q_len, group,
                                               p.head_dim)
  out = out.transpose(0, 2, 1, 3, 4).reshape(batch, q_len, p.num_q_heads,
                                             p.head_dim)
  lse = lse[:, :, :rows].reshape(batch, num_kv, q_len, group)
  lse = lse.transpose(0, 1, 3, 2).reshape(batch, p.num_q_heads, q_len)
  return out.astype(q.dtype), lse


def _forward_only_jvp(primals, tangents):
  del primals, tangents
  raise NotImplementedError(
      "decode_attention(impl='pallas') is forward only (no gradient rule); "
      "differentiate impl='xla' or 'reference', or train with "
      "sliding_window_attention")


def pallas_decode(q, k_cache, v_cache, q_positions, kv_positions,
                  problem: AttentionProblem, *, sinks=None, block_sizes=None,
                  interpret=None):
  """impl="pallas": the flash-decoding kernel, forward only.

  block_sizes: `DecodeBlockSizes` or None for `DecodeBlockSizes.default`;
  interpret: None interprets the kernel when no GPU is present.
  """
  if block_sizes is None:
    block_sizes = DecodeBlockSizes.default(problem)
  elif not isinstance(block_sizes, DecodeBlockSizes):
    raise TypeError(f"block_sizes={block_sizes!r}: expected a "
                    "DecodeBlockSizes or None")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  forward = jax.custom_jvp(functools.partial(
      _pallas_decode, problem=problem, block_sizes=block_sizes,
      interpret=bool(interpret)))
  forward.defjvp(_forward_only_jvp)
  return forward(q, k_cache, v_cache, q_positions, kv_positions, sinks)


def _slot_mask(q_positions, kv_positions, problem: AttentionProblem):
  """[B, 1, 1, T, C] bool: `slot_visible`, laid out for `dense_attention`."""
  return slot_visible(q_positions[:, :, None], kv_positions[:, None, :],
                      problem.band)[:, None, None]


def xla_decode(q, k_cache, v_cache, q_positions, kv_positions,
               problem: AttentionProblem, *, sinks=None):
  """impl="xla": input-dtype matmuls with fp32 accumulation (fp32: no TF32)."""
  return dense_attention(
      q, k_cache, v_cache, _slot_mask(q_positions, kv_positions, problem),
      problem, precision=matmul_precision(problem.dtype),
      probs_dtype=v_cache.dtype, sinks=sinks)


def reference_decode(q, k_cache, v_cache, q_positions, kv_positions,
                     problem: AttentionProblem, *, sinks=None):
  """impl="reference": the same masked softmax in fp32 at HIGHEST precision."""
  return fp32_dense_attention(q, k_cache, v_cache,
                              _slot_mask(q_positions, kv_positions, problem),
                              problem, sinks=sinks)


def _check_positions(name, positions, shape):
  if not hasattr(positions, "shape") or not hasattr(positions, "dtype"):
    raise TypeError(f"{name}: expected an int32 array of shape {shape}, got "
                    f"{type(positions).__name__}")
  if tuple(positions.shape) != shape:
    raise ValueError(f"{name}.shape={tuple(positions.shape)}: expected {shape}")
  if positions.dtype != jnp.int32:
    raise TypeError(f"{name}.dtype={positions.dtype}: expected int32")


def check_decode_args(q, k_cache, v_cache, q_positions, kv_positions, *,
                      window, softcap, scale, sinks=None) -> AttentionProblem:
  """Validates a decode call; returns the problem (kv_len = C cache slots).

  Array checks are those of the prefill op (`check_attention_args`, where
  k, v name the caches); positions must be int32 [B, T] and [B, C]; sinks
  float [N] or None.
  """
  try:
    problem = check_attention_args(
        q, k_cache, v_cache, window=window, causal=True, segment_ids=None,
        softcap=softcap, scale=scale, sinks=sinks)
  except (TypeError, ValueError) as e:
    raise type(e)(f"decode_attention (k = k_cache, v = v_cache): {e}") from None
  _check_positions("q_positions", q_positions, (problem.batch, problem.q_len))
  _check_positions("kv_positions", kv_positions,
                   (problem.batch, problem.kv_len))
  return problem


# impl -> entry (q, k_cache, v_cache, q_positions, kv_positions, problem, *,
# sinks) -> (out, lse); only "pallas" takes block_sizes= and interpret=.
DECODE_IMPLS = {
    "pallas": pallas_decode,
    "xla": xla_decode,
    "reference": reference_decode,
}


def decode_attention(q, k_cache, v_cache, *, q_positions, kv_positions,
                     window=None, softcap=None, scale=None, impl="auto",
                     block_sizes=None, interpret=None, return_lse=False,
                     sinks=None):
  """Causal (sliding-window) attention of new queries to a KV cache.

  Shapes (B batch, T new queries, C cache slots, N query heads, K kv heads,
  H head dim):
    q: [B, T, N, H]; k_cache, v_cache: [B, C, K, H], N % K == 0, one float
      dtype for all three.
    q_positions: int32 [B, T], the absolute position of each query.
    kv_positions: int32 [B, C], the absolute position held by each slot;
      negative (-1) marks an empty slot.
    Returns out [B, T, N, H] in q.dtype, and with `return_lse=True` also
    lse [B, N, T] fp32 (natural-log logsumexp of each row's scores, the
    sink included).

  Slot c is visible to query t iff kv_positions[b, c] >= 0 and
  `mask.visible(q_positions[b, t], kv_positions[b, c], band)` with the causal
  band of `window`: window=None (full causal) sees every position <= its own;
  window=W (int >= 1) sees q - W < position <= q, as `sliding_window_attention`.
  Visibility depends on positions only, never on slot order, so the cache may
  be a ring buffer (token p in slot p % C, C >= W) or a linear buffer. Write
  the new tokens' keys into the cache before calling. With T > 1 and a ring
  buffer, C >= W + T - 1 keeps every query's window in the cache (a slot
  overwritten by a later new token is no longer there to see).

  sinks: float [N] or None, one learned sink logit per query head, as in
    `sliding_window_attention`: it joins every row's softmax denominator
    and adds nothing to out.
  Rows that see no slot return out = 0, lse = -inf (the sink with sinks),
  never NaN.
  softcap: c > 0 maps each scaled score s to c * tanh(s / c).
  scale: multiplies q·k before the softcap; default 1 / sqrt(H).
  impl: "auto" (pallas on GPU, xla elsewhere, TPU too), "pallas" (flash-decoding
    Triton kernel), "xla" (dense jnp), "reference" (dense fp32, HIGHEST).
  block_sizes: `DecodeBlockSizes` for impl="pallas", else None.
  interpret: pallas only; None interprets the kernel when no GPU is present.
  Gradients: impl="pallas" is forward only (differentiating it raises
  NotImplementedError); "xla" and "reference" are plain jnp.
  """
  problem = check_decode_args(q, k_cache, v_cache, q_positions, kv_positions,
                              window=window, softcap=softcap, scale=scale,
                              sinks=sinks)
  impl = resolve_impl(impl, list(DECODE_IMPLS), auto=default_decode_impl)
  pallas_args = dict(block_sizes=block_sizes, interpret=interpret)
  if impl != "pallas":
    for name, value in pallas_args.items():
      if value is not None:
        raise ValueError(f"{name}={value!r}: only impl='pallas' takes it")
    pallas_args = {}
  out, lse = DECODE_IMPLS[impl](q, k_cache, v_cache, q_positions, kv_positions,
                                problem, sinks=sinks, **pallas_args)
  return (out, lse) if return_lse else out

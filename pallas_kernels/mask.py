"""The window predicate and the block band: the one place where visibility is defined.

Every implementation of the op (dense reference, Pallas kernels, blockwise XLA,
decode kernels) decides which keys a query sees through `visible` below, and
decides which key blocks to visit through `kv_block_range` / `q_block_range`.

Positions: query row t of a `[B, T, ...]` query array sits at absolute position
`t + q_offset`, key row s of `[B, S, ...]` sits at position `s`. The op uses
bottom-right alignment, `q_offset = S - T` (the last query is the last key), as
FlashAttention does; with T == S the offset is 0.

A `Band(left, right)` says: key j is visible to query i iff
`i - left <= j <= i + right`; `None` means unbounded on that side.

  causal=True,  window=W     -> Band(W - 1, 0)       (HF sliding_window=W)
  causal=True,  window=None  -> Band(None, 0)        (full causal)
  causal=False, window=(l,r) -> Band(l, r)           (local bidirectional)
  causal=False, window=None  -> Band(None, None)     (full bidirectional)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Band:
  """Visible keys of query i: `i - left <= j <= i + right`; None = unbounded."""

  left: int | None
  right: int | None

  @classmethod
  def from_window(cls, window, causal: bool) -> "Band":
    """Normalises the public (window, causal) pair; assumes it was validated."""
    if causal:
      return cls(None if window is None else window - 1, 0)
    if window is None:
      return cls(None, None)
    left, right = window
    return cls(left, right)


def visible(q_pos, k_pos, band: Band, q_segment=None, k_segment=None):
  """The window predicate: bool, True where query position sees key position.

  `q_pos` and `k_pos` broadcast against each other (e.g. `[T, 1]` and `[1, S]`);
  segments, when given, broadcast the same way and must be equal to be visible.
  Works on Python ints, numpy/jax arrays, and inside Pallas kernels.
  """
  ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos)), bool)
  if band.left is not None:
    ok = ok & (k_pos >= q_pos - band.left)
  if band.right is not None:
    ok = ok & (k_pos <= q_pos + band.right)
  if q_segment is not None:
    ok = ok & (q_segment == k_segment)
  return ok


def positions(q_len: int, kv_len: int):
  """Bottom-right aligned positions: (q_pos [T, 1], k_pos [1, S]) int32."""
  q_pos = jnp.arange(q_len, dtype=jnp.int32)[:, None] + (kv_len - q_len)
  return q_pos, jnp.arange(kv_len, dtype=jnp.int32)[None, :]


def dense_mask(q_len: int, kv_len: int, band: Band, segment_ids=None):
  """The full boolean mask, [T, S] (or [B, T, S] with segment_ids [B, T]).

  O(T·S): for the reference, tests and pictures, never for the fast paths.
  """
  q_pos, k_pos = positions(q_len, kv_len)
  if segment_ids is None:
    return visible(q_pos, k_pos, band)
  return visible(q_pos[None], k_pos[None], band,
                 segment_ids[:, :, None], segment_ids[:, None, :])


def cdiv(a, b):
  """ceil(a / b) for non-negative ints, Python or traced."""
  return (a + b - 1) // b


def kv_block_range(q_block, *, block_q: int, block_k: int, q_len: int,
                   kv_len: int, band: Band):
  """Key blocks `[lo, hi)` that query block `q_block` must visit.

  `q_block` may be a Python int, a traced int (a Pallas program id) or an int
  array of block indices (the result broadcasts like it); query block i holds
  queries i·block_q ... i·block_q + block_q - 1 of a [T] query axis, bottom-right
  aligned to the [S] key axis (T = q_len, S = kv_len). Returns (lo, hi): the key
  blocks that intersect the band of at least one query of the block, clipped
  to `[0, cdiv(kv_len, block_k))`; it can be empty (lo == hi). An unbounded
  side of the band gives a Python int. `visited_blocks` draws it as a map.
  """
  q_offset = kv_len - q_len
  num_kv_blocks = cdiv(kv_len, block_k)
  first_q = q_block * block_q + q_offset
  last_q = jnp.minimum(q_block * block_q + block_q, q_len) - 1 + q_offset
  lo = 0 if band.left is None else jnp.maximum(first_q - band.left, 0) // block_k
  if band.right is None:
    hi = num_kv_blocks
  else:
    hi = jnp.minimum(last_q + band.right, kv_len - 1) // block_k + 1
    hi = jnp.clip(hi, 0, num_kv_blocks)
  lo = jnp.minimum(lo, num_kv_blocks)
  return lo, jnp.maximum(hi, lo)


def q_block_range(kv_block, *, block_q: int, block_k: int, q_len: int,
                  kv_len: int, band: Band):
  """Query blocks `[lo, hi)` whose band intersects key block `kv_block`.

  The transpose of `kv_block_range`, for the dK/dV pass.
  """
  q_offset = kv_len - q_len
  num_q_blocks = cdiv(q_len, block_q)
  first_k = kv_block * block_k
  last_k = jnp.minimum(kv_block * block_k + block_k, kv_len) - 1
  # Query i sees key j iff j - right <= i <= j + left (positions).
  if band.right is None:
    lo = 0
  else:
    lo = jnp.maximum(first_k - band.right - q_offset, 0) // block_q
  if band.left is None:
    hi = num_q_blocks
  else:
    hi = jnp.minimum(last_k + band.left - q_offset, q_len - 1)
    hi = jnp.clip(jnp.maximum(hi, -1) // block_q + 1, 0, num_q_blocks)
  lo = jnp.minimum(lo, num_q_blocks)
  return lo, jnp.maximum(hi, lo)


def block_fully_visible(q_block, kv_block, *, block_q: int, block_k: int,
                        q_len: int, kv_len: int, band: Band):
  """True where every (query, key) pair of the two blocks is inside the band.

  Such interior blocks skip the mask; only blocks on the band's edges (or past
  the end of a sequence that is not a block multiple) pay for masking.
  Segment ids are not considered here: with segments every block is masked.
  """
  q_offset = kv_len - q_len
  q_first = q_block * block_q + q_offset
  q_last = q_block * block_q + block_q - 1 + q_offset
  k_first = kv_block * block_k
  k_last = kv_block * block_k + block_k - 1
  ok = (q_block * block_q + block_q <= q_len) & (k_last < kv_len)
  if band.left is not None:
    ok = ok & (k_first >= q_last - band.left)
  if band.right is not None:
    ok = ok & (k_last <= q_first + band.right)
  return ok

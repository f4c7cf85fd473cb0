"""KV cache for generation: a rolling ring buffer per sliding layer, a linear
buffer per full-attention layer, and attention of new tokens against it.

Design: an explicit pytree (frozen dataclasses registered with
`jax.tree_util.register_dataclass`), not an nnx variable collection. The cache
is passed into and returned from the model call, so prefill and decode are pure
functions of (parameters, cache, tokens) with static shapes: `jax.jit` traces
the decode step once and can donate the cache buffers.

Every slot stores its token's absolute position (-1 = empty), and token p is
written to slot p % C. One layout rule serves both kinds of layer:
  sliding layer (window W): C = W slots whatever max_len is (a ring: once
    wrapped, slots hold out-of-order positions; memory O(W));
  full layer: C = max_len slots, so p % C = p (a linear buffer).
Which slots a query sees is decided from positions only, by
`pallas_kernels.decode_attention` (`mask.visible`, the one window rule), so
neither slot order nor padding needs to be tracked.

Dimension letters: B batch, T new tokens, C cache slots, K kv heads, N query
heads, H head dim, W window.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import decode_attention
from pallas_kernels.decode_attention import IMPLS as DECODE_IMPLS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
  """One layer's keys and values with the position each slot holds.

  k, v: [B, C, K, H] (keys after RoPE); positions: int32 [B, C], -1 = empty.
  """

  k: jax.Array
  v: jax.Array
  positions: jax.Array

  @property
  def num_slots(self) -> int:
    return self.k.shape[1]

  def write(self, k_new, v_new, positions) -> "LayerCache":
    """Writes new tokens k_new, v_new [B, T, K, H] at positions [B, T] int32.

    Token (b, t) goes to slot positions[b, t] % C. Tokens with a negative
    position (padding) are not written; of a row's tokens only the last C
    (by position) are, so no slot is written twice. Positions must increase
    along each row, as a sequence's do.
    """
    num_slots = self.num_slots
    last = jnp.max(positions, axis=1, keepdims=True)  # (B, 1)
    kept = (positions >= 0) & (positions > last - num_slots)
    slot = jnp.where(kept, positions % num_slots, num_slots)  # C: dropped
    row = jnp.arange(positions.shape[0])[:, None]  # (B, 1)

    def put(buffer, new):
      return buffer.at[row, slot].set(new.astype(buffer.dtype), mode="drop")

    return LayerCache(put(self.k, k_new), put(self.v, v_new),
                      put(self.positions, positions))

  def attend(self, q, k_new, v_new, positions, *, window, impl):
    """Writes the new tokens and attends their queries to everything visible.

    q [B, T, N, H], k_new, v_new [B, T, K, H] (after RoPE), positions int32
    [B, T] (-1: a padding token: not written, its output row is 0).
    window: None (full causal) or W; impl: the model's attn_impl, passed to
    `decode_attention` for a single token (T = 1; "cudnn", a prefill-only
    impl, becomes "auto"). Chunks (T > 1, prefill) run the dense "xla" path
    ("reference" if asked): the Pallas decode kernel holds all T * N / K
    query rows of a kv head in one tile, a size meant for decoding.
    Returns (out [B, T, N, H], the updated cache).

    Full layer: the new tokens are written first, then attended with the
    cache. A query at a position >= C (past max_len) returns NaN: a linear
    buffer never drops keys silently. Sliding layer with T = 1: written
    first (the overwritten slot held position p - W, out of the window).
    Sliding layer with T > 1: the queries attend to the cache's previous
    contents concatenated with the new tokens (C + T keys), then only the
    last W are written, so a chunk of any length sees all its in-window keys.
    """
    if window is not None and self.num_slots < window:
      raise ValueError(
          f"cache slots C={self.num_slots} < window={window}: a sliding "
          "layer's ring must hold the whole window (use init_cache)")
    if q.shape[1] > 1:
      impl = "reference" if impl == "reference" else "xla"
    elif impl != "auto" and impl not in DECODE_IMPLS:
      impl = "auto"
    attend = lambda keys, values, kv_pos: decode_attention(
        q, keys, values, q_positions=positions, kv_positions=kv_pos,
        window=window, impl=impl)
    if window is not None and q.shape[1] > 1:
      out = attend(jnp.concatenate([self.k, k_new.astype(self.k.dtype)], 1),
                   jnp.concatenate([self.v, v_new.astype(self.v.dtype)], 1),
                   jnp.concatenate([self.positions, positions], 1))
      return out, self.write(k_new, v_new, positions)
    cache = self.write(k_new, v_new, positions)
    out = attend(cache.k, cache.v, cache.positions)
    if window is None:
      overflow = (positions >= self.num_slots)[:, :, None, None]
      out = jnp.where(overflow, jnp.nan, out)
    return out, cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """The cache of every decoder layer, in layer order."""

  layers: tuple[LayerCache, ...]


def cache_slots(window: int | None, max_len: int) -> int:
  """Slots of one layer's cache: W for a sliding layer, max_len for a full one."""
  return max_len if window is None else window


def init_cache(config, batch_size: int, max_len: int, dtype) -> KVCache:
  """An empty cache (k, v zeros, positions -1) for `config`'s layers.

  config: a `ModelConfig`; batch_size: B; max_len: the longest sequence
  (prompt + generated tokens) a full-attention layer must hold; dtype: k, v.
  """
  for name, value in (("batch_size", batch_size), ("max_len", max_len)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r}: expected an int >= 1")
  shape = (batch_size, config.num_kv_heads, config.head_dim)  # (B, K, H)

  def layer(window):
    slots = cache_slots(window, max_len)
    kv_shape = (batch_size, slots, *shape[1:])  # (B, C, K, H)
    return LayerCache(jnp.zeros(kv_shape, dtype), jnp.zeros(kv_shape, dtype),
                      jnp.full((batch_size, slots), -1, jnp.int32))

  return KVCache(tuple(layer(w) for w in config.layer_windows))


def cache_bytes(cache: KVCache) -> int:
  """Bytes of every array of `cache` (works on `jax.eval_shape` results too)."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(cache))

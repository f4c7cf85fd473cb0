"""KV cache for generation: a rolling ring buffer per sliding layer, a linear
buffer per full-attention layer (or sliding layer longer than the
generation), and attention of new tokens against it.

Design: an explicit pytree (frozen dataclasses registered with
`jax.tree_util.register_dataclass`), not an nnx variable collection. The cache
is passed into and returned from `CausalLM.forward_with_cache`, so prefill and
decode are pure functions of (parameters, cache, tokens) with static shapes:
`jax.jit` traces the decode step once and can donate the cache buffers.

Every slot stores its token's absolute position (-1 = empty), and token p is
written to slot p % C, with C = `cache_slots(window, max_len)`: min(W, max_len)
for a sliding layer of window W, max_len for a full layer. Two layouts follow:
  ring (C >= W): once wrapped, slots hold out-of-order positions, and the
    slot a token overwrites held position p - C, already out of the window;
    no length limit, memory O(W);
  linear buffer (full layer, or C < W): p % C = p for the positions 0..C-1 it
    holds exactly; a query at a position >= C would miss in-window keys, so
    its output is NaN (never a silently truncated attention).
`position_limit` is the one place of that distinction. Which slots a query
sees is decided from positions only, by `pallas_kernels.decode.decode_attention`
(`mask.visible`, the one window rule), so neither slot order nor padding
needs to be tracked.

Dimension letters: B batch, T new tokens, C cache slots, K kv heads, N query
heads, H head dim, W window.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import DECODE_IMPLS, decode_attention
from pallas_kernels.validation import check_positive_int


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

  def attend(self, q, k_new, v_new, positions, *, window, impl, softcap=None,
             scale=None, sinks=None):
    """Writes the new tokens and attends their queries to everything visible.

    q [B, T, N, H], k_new, v_new [B, T, K, H] (after RoPE), positions int32
    [B, T] (-1: a padding token: its output row is 0, and it is no key: k,
    v zeroed, not written, so even NaN padding activations never reach a
    real query).
    window: None (full causal) or W; softcap, scale, sinks ([N] or None):
    the layer's (as `decode_attention`'s); impl: the model's attn_impl, passed to
    `decode_attention` for a single token (T = 1; "cudnn" and "splash",
    prefill-only impls, become "auto"). Chunks (T > 1, prefill) run the dense "xla" path
    ("reference" if asked): the Pallas decode kernel holds all T * N / K
    query rows of a kv head in one tile, a size meant for decoding.
    Returns (out [B, T, N, H] in q.dtype, the updated cache). The attention
    runs in the cache's dtype (`init_cache(dtype=)`, e.g. bfloat16 keys for a
    float32 model).

    Linear buffer (`position_limit` not None): the new tokens are written
    first (token p to slot p, which no other position shares), then
    attended with the cache. A query at a position >= C returns NaN, as it
    would miss in-window keys, which are never dropped silently; its token
    is dropped as a key (k, v zeroed, not written), so the buffer keeps
    positions 0..C-1 and the earlier queries of a chunk stay exact (only NaN
    queries could see it, and its k, v may be NaN already, from the layer
    below).
    Ring (C >= W): one token (T = 1) is written first, then attended (the
    overwritten slot held position p - C, out of the window). A chunk
    (T > 1) could overwrite keys its own earlier queries still see, so its
    queries attend to the ring's previous contents concatenated with the
    new tokens (C + T keys), and only then are the last C written.
    """
    if q.shape[1] > 1:
      impl = "reference" if impl == "reference" else "xla"
    elif impl != "auto" and impl not in DECODE_IMPLS:
      impl = "auto"
    q_positions = positions
    limit = position_limit(window, self.num_slots)
    if limit is not None:
      past = positions >= limit  # (B, T)
      positions = jnp.where(past, -1, positions)
    # Tokens that are no key (padding, past the limit): k, v zeroed, as their
    # activations may be NaN and a masked key still enters P·V as 0 * v.
    unused = (positions < 0)[:, :, None, None]
    k_new, v_new = (jnp.where(unused, 0, x) for x in (k_new, v_new))
    # In the cache's dtype (which may be narrower than the model's), out in q's.
    attend = lambda keys, values, kv_pos: decode_attention(
        q.astype(self.k.dtype), keys, values, q_positions=q_positions,
        kv_positions=kv_pos, window=window, softcap=softcap, scale=scale,
        impl=impl, sinks=sinks).astype(q.dtype)
    if q.shape[1] > 1 and limit is None:
      out = attend(jnp.concatenate([self.k, k_new.astype(self.k.dtype)], 1),
                   jnp.concatenate([self.v, v_new.astype(self.v.dtype)], 1),
                   jnp.concatenate([self.positions, positions], 1))
      cache = self.write(k_new, v_new, positions)
    else:
      cache = self.write(k_new, v_new, positions)
      out = attend(cache.k, cache.v, cache.positions)
    if limit is not None:
      out = jnp.where(past[:, :, None, None], jnp.nan, out)
    return out, cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """The cache of every decoder layer: `layers`, one `LayerCache` per decoder
  layer in order (from `init_cache` / `CausalLM.init_cache`)."""

  layers: tuple[LayerCache, ...]


def cache_slots(window: int | None, max_len: int) -> int:
  """Slots C of one layer's cache for sequences of up to max_len positions:
  min(W, max_len) for a sliding layer of window W, max_len for a full one."""
  return max_len if window is None else min(window, max_len)


def position_limit(window: int | None, num_slots: int) -> int | None:
  """Positions a layer's cache of C = num_slots slots holds exactly.

  None (no limit) for a ring, C >= W; C for a linear buffer (window None, or
  C < W), whose queries at positions >= C would miss in-window keys.
  """
  return None if window is not None and num_slots >= window else num_slots


def init_cache(config, batch_size: int, max_len: int, dtype) -> KVCache:
  """An empty cache (k, v zeros, positions -1) for `config`'s layers.

  config: a `ModelConfig`; batch_size: B; max_len: the longest sequence
  (prompt + generated tokens) to generate; dtype: k, v. Each layer gets
  `cache_slots(window, max_len)` slots: a layer with fewer slots than its
  window (every full layer, and a sliding one when max_len < W) holds
  positions 0..max_len-1 only (`position_limit`).
  """
  check_positive_int("batch_size", batch_size)
  check_positive_int("max_len", max_len)
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

"""The rolling KV cache: prefill + decode logits equal the full forward's.

Tiny random Mistral (every layer sliding) and Qwen2 (full + sliding layers)
models run sequences of more than 3 windows (each ring wraps several times);
one left-padded batch holds prompts shorter than, equal to and longer than
the window, prefilled in one shot or in chunks, then decoded token by token.
The same with a window longer than the sequences (WIDE: max_len < W, so the
sliding layers get linear buffers of max_len slots). Weights are drawn at
scale 0.1 (not the 0.02 init) so that attention to a wrong key moves the
logits well past the tolerance (the negative control).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import CausalLM, mistral_tiny, qwen2_tiny
from models.kv_cache import (KVCache, LayerCache, cache_bytes, init_cache,
                             position_limit)

W = 8
WIDE = 64  # a window longer than every test sequence
DECODE_STEPS = 3 * W + 4  # every row decodes past 3 windows
PROMPT_LENGTHS = (W - 3, W, 2 * W + 3)  # below, equal to and above W
TOLERANCE = 1e-4  # fp32 logits
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96,
             num_q_heads=4, num_kv_heads=2, head_dim=16)
CONFIGS = {
    "mistral": lambda w: mistral_tiny(**SMALL, num_layers=2,
                                      layer_windows=(w, w)),
    "qwen2": lambda w: qwen2_tiny(**SMALL, num_layers=3,
                                  layer_windows=(None, w, w)),
}


@functools.lru_cache(maxsize=None)
def tiny_model(family, *, window=W, attn_impl="xla", full_attention=False):
  """A random model: weights N(0, 0.1²), norm weights 1 + N(0, 0.1²).

  Cached: tests only read it.
  """
  config = CONFIGS[family](window)
  if full_attention:
    config = config.with_full_attention()
  model = CausalLM(config, attn_impl=attn_impl, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  leaves = [(1.0 if "norm" in path else 0.0)
            + 0.1 * jax.random.normal(key, x.shape, x.dtype)
            for path, key, x in zip(paths, keys, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


@functools.partial(jax.jit, static_argnames="graphdef")
def full_forward(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids)


@functools.partial(jax.jit, static_argnames="graphdef")
def cached_forward(graphdef, state, cache, ids, positions):
  return nnx.merge(graphdef, state).forward_with_cache(ids, positions=positions,
                                                      cache=cache)


def make_batch(seed=0):
  """Sequences [B, P_max + DECODE_STEPS] (row b real up to P_b + DECODE_STEPS)."""
  rng = np.random.default_rng(seed)
  length = max(PROMPT_LENGTHS) + DECODE_STEPS
  return rng.integers(0, SMALL["vocab_size"], (len(PROMPT_LENGTHS), length),
                      dtype=np.int32)


def incremental_logits(model, seqs, *, chunk):
  """Left-padded prefill (chunks of `chunk` columns), then one token per step.

  Returns logits [B, P_max + DECODE_STEPS, V] in each row's own position
  order (row b's position p at column p; columns past its end are zero).
  """
  lengths = np.asarray(PROMPT_LENGTHS)
  batch, width = len(lengths), -(-max(lengths) // chunk) * chunk
  prompts = np.zeros((batch, width), np.int32)
  positions = np.full((batch, width), -1, np.int32)
  for b, n in enumerate(lengths):
    prompts[b, width - n:] = seqs[b, :n]
    positions[b, width - n:] = np.arange(n)
  graphdef, state = nnx.split(model)
  cache = model.init_cache(batch, seqs.shape[1])
  out = np.zeros((*seqs.shape, model.config.vocab_size), np.float32)
  for start in range(0, width, chunk):
    logits, cache = cached_forward(graphdef, state, cache,
                                   prompts[:, start:start + chunk],
                                   positions[:, start:start + chunk])
    for b, n in enumerate(lengths):
      cols = np.arange(start, start + chunk)
      real = cols >= width - n
      out[b, cols[real] - (width - n)] = np.asarray(logits[b])[real]
  rows = np.arange(batch)
  for step in range(DECODE_STEPS):
    pos = lengths + step
    logits, cache = cached_forward(graphdef, state, cache,
                                   seqs[rows, pos][:, None],
                                   pos[:, None].astype(np.int32))
    out[rows, pos] = np.asarray(logits[:, 0])
  return out


def reference_logits(model, seqs):
  """Full-sequence forward; row b compared only up to P_b + DECODE_STEPS."""
  graphdef, state = nnx.split(model)
  return np.asarray(full_forward(graphdef, state, seqs))


def compare(incremental, reference):
  """Max |difference| over each row's real positions."""
  errors = [np.abs(incremental[b, :n + DECODE_STEPS]
                   - reference[b, :n + DECODE_STEPS]).max()
            for b, n in enumerate(PROMPT_LENGTHS)]
  return max(errors)


@pytest.mark.parametrize("window", [W, WIDE])
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_prefill_and_decode_equal_full_forward(family, window):
  """One-shot prefill, and chunks of 5 (a chunk boundary inside the window).

  window W: rings that wrap; WIDE: linear buffers of max_len < W slots.
  """
  model = tiny_model(family, window=window)
  seqs = make_batch()
  slots = {layer.num_slots for layer in model.init_cache(1, seqs.shape[1]).layers}
  assert slots == ({seqs.shape[1]} if window == WIDE else
                   {W, seqs.shape[1]} if family == "qwen2" else {W})
  reference = reference_logits(model, seqs)
  for chunk in (max(PROMPT_LENGTHS), 5):
    error = compare(incremental_logits(model, seqs, chunk=chunk), reference)
    print(f"{family} chunk={chunk}: max |logits error| {error:.2e}")
    assert error <= TOLERANCE, chunk


def test_pallas_decode_equals_full_forward():
  """impl="pallas" (interpreted on CPU) for the single-token decode steps."""
  seqs = make_batch()
  error = compare(
      incremental_logits(tiny_model("qwen2", attn_impl="pallas"), seqs,
                         chunk=max(PROMPT_LENGTHS)),
      reference_logits(tiny_model("qwen2"), seqs))
  assert error <= TOLERANCE


def test_negative_control_window_matters():
  """The same weights without windows disagree: the sequences are long
  enough, and the weights large enough, for the window to show."""
  seqs = make_batch()
  windowed = reference_logits(tiny_model("mistral"), seqs)
  unwindowed = reference_logits(tiny_model("mistral", full_attention=True),
                                seqs)
  assert compare(unwindowed, windowed) > 100 * TOLERANCE


def test_ring_buffer_literal():
  """Writing positions 0..10 one at a time into 4 slots keeps 8, 9, 10, 7."""
  cache = LayerCache(jnp.zeros((1, 4, 1, 1)), jnp.zeros((1, 4, 1, 1)),
                     jnp.full((1, 4), -1, jnp.int32))
  for p in range(11):
    value = jnp.full((1, 1, 1, 1), float(p))
    cache = cache.write(value, -value, jnp.asarray([[p]], jnp.int32))
  chex.assert_trees_all_equal(cache.positions, jnp.asarray([[8, 9, 10, 7]]))
  chex.assert_trees_all_equal(cache.k[0, :, 0, 0], jnp.asarray([8., 9, 10, 7]))


def test_chunk_write_keeps_last_slots_and_skips_padding():
  """A chunk longer than the ring writes only its last C tokens; padding
  (position -1) is never written."""
  cache = LayerCache(jnp.zeros((2, 4, 1, 1)), jnp.zeros((2, 4, 1, 1)),
                     jnp.full((2, 4), -1, jnp.int32))
  positions = jnp.asarray([[0, 1, 2, 3, 4, 5, 6], [-1, -1, -1, -1, -1, 0, 1]],
                          jnp.int32)
  values = positions.astype(jnp.float32)[:, :, None, None]
  cache = cache.write(values, values, positions)
  chex.assert_trees_all_equal(cache.positions,
                              jnp.asarray([[4, 5, 6, 3], [0, 1, -1, -1]]))


def test_padding_with_nan_keys_does_not_reach_real_queries():
  """Padding tokens (position -1) are neither written nor attended, even when
  their k, v are NaN (here: an id past the vocab, whose embedding is NaN):
  a masked key's NaN value would otherwise give 0 * NaN in P·V."""
  model = tiny_model("qwen2")
  graphdef, state = nnx.split(model)
  ids = np.asarray([[0, 0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8]],
                   np.int32)
  positions = np.asarray([[-1, -1, -1, 0, 1, 2, 3, 4], list(range(8))],
                         np.int32)
  logits = {}
  for pad in (0, model.config.vocab_size):
    padded = np.where(positions >= 0, ids, pad)
    logits[pad], _ = cached_forward(graphdef, state, model.init_cache(2, 12),
                                    padded, positions)
  real = positions >= 0
  assert np.isfinite(np.asarray(logits[0])[real]).all()
  np.testing.assert_array_equal(np.asarray(logits[model.config.vocab_size])[real],
                                np.asarray(logits[0])[real])


@pytest.mark.parametrize("max_len, slots", [(3, 3), (W - 1, W - 1), (W, W),
                                             (10 * W, W), (1000 * W, W)])
def test_sliding_layer_has_min_of_window_and_max_len_slots(max_len, slots):
  cache = jax.eval_shape(lambda: init_cache(CONFIGS["qwen2"](W), 3, max_len,
                                            jnp.bfloat16))
  chex.assert_shape(cache.layers[0].k, (3, max_len, 2, 16))  # full layer
  for layer in cache.layers[1:]:  # sliding layers
    chex.assert_shape([layer.k, layer.v], (3, slots, 2, 16))
    chex.assert_shape(layer.positions, (3, slots))


@pytest.mark.parametrize("window, slots, limit", [
    (None, 5, 5), (W, W - 1, W - 1), (W, W, None), (W, W + 1, None)])
def test_position_limit(window, slots, limit):
  """Linear buffers (full layer, or fewer slots than the window) are limited."""
  assert position_limit(window, slots) == limit


def test_cache_bytes_for_4096_tokens_window_256():
  """mistral_tiny (4 layers, K=2, H=32) with W=256, bf16, batch 1, 4096 tokens.

  Rolling, per layer: k + v 2 * 256 * 2 * 32 * 2 B = 65536, positions
  256 * 4 B = 1024 -> 66560; 4 layers: 266240. A full-length cache:
  2 * 4096 * 2 * 32 * 2 + 4096 * 4 = 1064960 per layer, 4259840 in all (16x).
  """
  config = mistral_tiny(layer_windows=(256,) * 4)
  assert (config.num_layers, config.num_kv_heads, config.head_dim) == (4, 2, 32)
  rolling = jax.eval_shape(lambda: init_cache(config, 1, 4096, jnp.bfloat16))
  full = jax.eval_shape(lambda: init_cache(config.with_full_attention(), 1,
                                           4096, jnp.bfloat16))
  assert cache_bytes(rolling) == 266240
  assert cache_bytes(full) == 4259840


@pytest.mark.parametrize("max_len, expected", [
    # max_len < W: 4 * (2 * 100 * 2 * 32 * 2 + 100 * 4), as a full cache
    (100, 104000),
    # max_len = W: 4 * (2 * 256 * 2 * 32 * 2 + 256 * 4), the ring
    (256, 266240),
    # max_len > W: the ring again, whatever max_len
    (300, 266240),
])
def test_cache_bytes_around_the_window(max_len, expected):
  """mistral_tiny (4 layers, K=2, H=32) with W=256, bf16, batch 1: a short
  generation allocates no more than it needs (min(W, max_len) slots)."""
  config = mistral_tiny(layer_windows=(256,) * 4)
  rolling = jax.eval_shape(lambda: init_cache(config, 1, max_len, jnp.bfloat16))
  full = jax.eval_shape(lambda: init_cache(config.with_full_attention(), 1,
                                           max_len, jnp.bfloat16))
  assert cache_bytes(rolling) == expected
  assert cache_bytes(rolling) == min(cache_bytes(full), 266240)


@pytest.mark.parametrize("window", [W, WIDE])
def test_linear_buffer_past_max_len_is_nan_not_truncated(window):
  """max_len=4: qwen2's full layer (W=8), and every layer (W=64) are linear
  buffers of 4 slots; a query at position 4 would miss in-window keys."""
  model = tiny_model("qwen2", window=window)
  graphdef, state = nnx.split(model)
  cache = model.init_cache(1, 4)
  ids = jnp.zeros((1, 1), jnp.int32)
  logits, cache = cached_forward(graphdef, state, cache, ids,
                                 jnp.asarray([[3]], jnp.int32))
  assert np.isfinite(np.asarray(logits)).all()
  logits, _ = cached_forward(graphdef, state, cache, ids,
                             jnp.asarray([[4]], jnp.int32))
  assert np.isnan(np.asarray(logits)).all()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_chunk_past_max_len_is_exact_then_nan(family):
  """A 7-token chunk into linear buffers of 4 slots (W=64): the queries at
  positions 0..3 equal the full forward (their keys are not lost to the
  chunk's later writes), those at 4..6 are NaN; the buffers keep 0..3."""
  model = tiny_model(family, window=WIDE)
  graphdef, state = nnx.split(model)
  ids = make_batch()[:1, :7]
  positions = jnp.arange(7, dtype=jnp.int32)[None]
  logits, cache = cached_forward(graphdef, state, model.init_cache(1, 4), ids,
                                 positions)
  reference = reference_logits(model, ids)
  logits = np.asarray(logits)
  assert np.abs(logits[:, :4] - reference[:, :4]).max() <= TOLERANCE
  assert np.isnan(logits[:, 4:]).all()
  for layer in cache.layers:
    chex.assert_trees_all_equal(layer.positions, jnp.asarray([[0, 1, 2, 3]]))
    assert np.isfinite(np.asarray(layer.v)).all()


def test_cache_in_another_dtype_than_the_model():
  """`init_cache(dtype=bfloat16)` for a float32 model (half the memory): the
  attention runs on the bfloat16 keys, the logits stay close to float32's."""
  model = tiny_model("qwen2")
  graphdef, state = nnx.split(model)
  seqs = make_batch()[:1, :2 * W + 3]
  positions = jnp.arange(seqs.shape[1], dtype=jnp.int32)[None]
  cache = model.init_cache(1, seqs.shape[1] + 1, dtype=jnp.bfloat16)
  prefill, cache = cached_forward(graphdef, state, cache, seqs[:, :-1],
                                  positions[:, :-1])
  decode, cache = cached_forward(graphdef, state, cache, seqs[:, -1:],
                                 positions[:, -1:])
  chex.assert_type([prefill, decode, cache.layers[0].k], [jnp.float32] * 2
                   + [jnp.bfloat16])
  logits = np.concatenate([prefill, decode], axis=1)
  assert np.abs(logits - reference_logits(model, seqs)).max() < 5e-2


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(), TypeError, "positions"),  # a required argument of the cached call
    (dict(positions=None), ValueError, "positions=None"),
    (dict(positions=jnp.zeros((1, 2), jnp.int32),
          segment_ids=jnp.zeros((1, 2), jnp.int32)), TypeError, "segment_ids"),
    (dict(positions=jnp.zeros((1, 2), jnp.int32), layers=1), ValueError,
     "KVCache of 3"),
])
def test_cached_call_errors(kwargs, error, match):
  model = tiny_model("qwen2")
  cache = model.init_cache(1, 16)
  if "layers" in kwargs:
    cache = KVCache(cache.layers[:kwargs.pop("layers")])
  with pytest.raises(error, match=match):  # raised while tracing
    jax.eval_shape(lambda: model.forward_with_cache(
        jnp.zeros((1, 2), jnp.int32), cache=cache, **kwargs))


def test_uncached_call_takes_no_cache():
  """`model(...)` returns logits only; the cache goes to `forward_with_cache`."""
  model = tiny_model("qwen2")
  with pytest.raises(TypeError, match="cache"):
    model(jnp.zeros((1, 2), jnp.int32), cache=model.init_cache(1, 16))

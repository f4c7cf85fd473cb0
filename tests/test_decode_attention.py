"""Decode attention against KV caches: every impl vs the fp32 decode reference.

Caches are built from full key/value sequences the way generation fills them:
a ring buffer (token p in slot p % C; once wrapped, slots hold out-of-order
positions) or a linear buffer (token p in slot p, -1 past the end). Empty
slots hold large garbage, so a leak past the mask shows. The reference itself
is tied to `reference_attention` by `test_ring_buffer_decode_equals_full_attention`.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from pallas_kernels import (DecodeBlockSizes, decode_attention,
                            reference_attention)
from tests.attention_cases import make_sinks, tolerance
from tests.cuda_lowering import lowered_cuda_text

DECODE_IMPLS = ["xla", "pallas"]
# Several splits and blocks per split; C not a block multiple in some cases.
SMALL_BLOCKS = DecodeBlockSizes(block_k=16, num_splits=2)


def ring_positions(last, num_slots):
  """Slot c of a ring buffer after writing tokens 0..last[b]: int32 [B, C]."""
  last = np.asarray(last)[:, None]
  pos = last - (last - np.arange(num_slots)[None, :]) % num_slots
  return np.where(pos >= 0, pos, -1).astype(np.int32)


def linear_positions(last, num_slots):
  """Slot c of a linear buffer after writing tokens 0..last[b]: int32 [B, C]."""
  slots = np.arange(num_slots)[None, :]
  return np.where(slots <= np.asarray(last)[:, None], slots, -1).astype(np.int32)


def random_qkv(seed, *, batch, q_len, kv_len, num_q_heads, num_kv_heads,
               head_dim):
  """Numpy fp32 q [B, T, N, H], k/v [B, S, K, H] (numpy: no eager compiles)."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, q_len, num_q_heads, head_dim), np.float32)
  k, v = rng.standard_normal((2, batch, kv_len, num_kv_heads, head_dim),
                             np.float32)
  return q, k, v


def fill_cache(k, v, kv_positions):
  """Gathers the cache from full k, v [B, L, K, H]; empty slots get garbage."""
  index = np.maximum(kv_positions, 0)[:, :, None, None]
  empty = (kv_positions < 0)[:, :, None, None]
  k_cache = np.where(empty, 50.0, np.take_along_axis(k, index, axis=1))
  v_cache = np.where(empty, -50.0, np.take_along_axis(v, index, axis=1))
  return k_cache.astype(np.float32), v_cache.astype(np.float32)


def make_decode_case(seed, *, layout, last, q_len, num_slots, num_q_heads,
                     num_kv_heads, head_dim, dtype):
  """q [B, T, N, H] at positions last-T+1..last, and the filled cache."""
  last = np.asarray(last)
  q, k, v = random_qkv(
      seed, batch=len(last), q_len=q_len, kv_len=int(last.max()) + 1,
      num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
  positions = {"ring": ring_positions, "linear": linear_positions}[layout]
  kv_positions = positions(last, num_slots)
  k_cache, v_cache = fill_cache(k, v, kv_positions)
  q_positions = (last[:, None] - q_len + 1 + np.arange(q_len)).astype(np.int32)
  return (jnp.asarray(q, dtype), jnp.asarray(k_cache, dtype),
          jnp.asarray(v_cache, dtype), jnp.asarray(q_positions),
          jnp.asarray(kv_positions))


@functools.lru_cache(maxsize=None)
def jitted_decode(impl, **kwargs):
  """One jitted function per option set, so equal shapes reuse a compile."""
  return jax.jit(functools.partial(decode_attention, impl=impl,
                                   return_lse=True, **kwargs))


def decode(impl, q, k_cache, v_cache, q_positions, kv_positions, *,
           sinks=None, **kwargs):
  """`decode_attention(..., return_lse=True)`; sinks is traced, the rest static."""
  if impl == "pallas":
    kwargs.setdefault("block_sizes", SMALL_BLOCKS)
  return jitted_decode(impl, **kwargs)(q, k_cache, v_cache,
                                       q_positions=q_positions,
                                       kv_positions=kv_positions, sinks=sinks)


def assert_matches_decode_reference(impl, q, k_cache, v_cache, q_positions,
                                    kv_positions, **kwargs):
  """Output and LSE of `impl` vs the fp32 reference; returns the max errors."""
  out, lse = decode(impl, q, k_cache, v_cache, q_positions, kv_positions,
                    **kwargs)
  kwargs.pop("block_sizes", None)
  f32 = lambda x: np.asarray(x, np.float32)
  out_ref, lse_ref = decode("reference", f32(q), f32(k_cache), f32(v_cache),
                            q_positions, kv_positions, **kwargs)
  batch, q_len, num_q_heads, _ = q.shape
  chex.assert_shape(out, q.shape)
  chex.assert_type(out, q.dtype)
  chex.assert_shape(lse, (batch, num_q_heads, q_len))
  chex.assert_type(lse, jnp.float32)
  out, lse, out_ref, lse_ref = map(f32, (out, lse, out_ref, lse_ref))
  np.testing.assert_allclose(out, out_ref, **tolerance(q.dtype, "out"))
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_ref))
  finite = np.isfinite(lse_ref)
  lse, lse_ref = np.where(finite, lse, 0.0), np.where(finite, lse_ref, 0.0)
  np.testing.assert_allclose(lse, lse_ref, **tolerance(q.dtype, "lse"))
  return (float(np.max(np.abs(out - out_ref))),
          float(np.max(np.abs(lse - lse_ref))))


# (layout, last positions per batch row, T, C, N, K, H, window, softcap, dtype)
# Each row runs with and without sinks (`make_sinks`).
GRID = [
    # GQA 1, window == C, one ring wrapped 3x and one partly filled
    ("ring", [100, 20], 1, 32, 2, 2, 32, 32, None, jnp.float32),
    ("ring", [100, 20], 1, 32, 2, 2, 32, 32, None, jnp.bfloat16),
    # GQA 4, T = 3, window < C, C not a block multiple
    ("ring", [137, 5], 3, 40, 8, 2, 32, 20, None, jnp.float32),
    ("ring", [137, 5], 3, 40, 8, 2, 32, 20, None, jnp.bfloat16),
    # GQA 8, window > C: the cache bounds what is seen
    ("ring", [90, 30], 3, 24, 8, 1, 64, 40, None, jnp.float32),
    # linear caches (full layers), partly filled, full causal and windowed
    ("linear", [9, 63], 1, 64, 8, 1, 32, None, None, jnp.bfloat16),
    ("linear", [2, 44], 3, 50, 4, 2, 32, 16, 5.0, jnp.float32),
    # softcap on a wrapped ring, window 1
    ("ring", [77, 12], 3, 18, 4, 1, 32, 1, 3.0, jnp.bfloat16),
]


@pytest.mark.parametrize("impl", DECODE_IMPLS)
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize(
    "layout, last, q_len, num_slots, num_q_heads, num_kv_heads, head_dim, "
    "window, softcap, dtype", GRID)
def test_matches_decode_reference(impl, with_sinks, layout, last, q_len,
                                  num_slots, num_q_heads, num_kv_heads,
                                  head_dim, window, softcap, dtype):
  args = make_decode_case(
      0, layout=layout, last=last, q_len=q_len, num_slots=num_slots,
      num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
      dtype=dtype)
  sinks = make_sinks(num_q_heads) if with_sinks else None
  assert_matches_decode_reference(impl, *args, window=window, softcap=softcap,
                                  sinks=sinks)


@given(seed=st.integers(0, 2**16), wraps=st.integers(0, 5))
def test_pallas_random_ring_and_linear_caches(seed, wraps):
  """Random fill levels and wrap counts; slots are shuffled (order-free op).

  Shapes and window are fixed so one compiled kernel serves every example.
  """
  rng = np.random.default_rng(seed)
  num_slots = 24
  last = rng.integers(0, num_slots * (wraps + 1), size=2)
  q, k_cache, v_cache, q_pos, kv_pos = make_decode_case(
      seed, layout=("ring", "linear")[seed % 2], last=last, q_len=2,
      num_slots=num_slots, num_q_heads=4, num_kv_heads=2, head_dim=16,
      dtype=jnp.float32)
  perm = rng.permutation(num_slots)
  assert_matches_decode_reference(
      "pallas", q, k_cache[:, perm], v_cache[:, perm], q_pos, kv_pos[:, perm],
      window=7, block_sizes=SMALL_BLOCKS)


@pytest.mark.parametrize("impl", ["reference", *DECODE_IMPLS])
@pytest.mark.parametrize("layout, window, q_len, num_slots, with_sinks", [
    ("ring", 16, 1, 16, False),     # a ring of exactly W slots
    ("ring", 16, 3, 18, False),     # T > 1 needs W + T - 1 slots
    ("ring", 16, 3, 18, True),      # gpt-oss: a sliding layer with sinks
    ("linear", None, 2, 96, False),  # a full layer's linear buffer, partly filled
    ("linear", None, 2, 96, True),
])
def test_ring_buffer_decode_equals_full_attention(impl, layout, window, q_len,
                                                  num_slots, with_sinks):
  """The last T rows of the full-sequence op equal decoding them from the cache."""
  seq_len = 77  # a ring of 16 or 18 slots wraps 4x
  q, k, v = random_qkv(3, batch=2, q_len=seq_len, kv_len=seq_len,
                       num_q_heads=8, num_kv_heads=2, head_dim=32)
  sinks = make_sinks(8) if with_sinks else None
  out_full, lse_full = reference_attention(q, k, v, window=window,
                                           return_lse=True, sinks=sinks)
  positions = {"ring": ring_positions, "linear": linear_positions}[layout]
  kv_positions = positions([seq_len - 1] * 2, num_slots)
  k_cache, v_cache = fill_cache(k, v, kv_positions)
  q_positions = np.broadcast_to(np.arange(seq_len - q_len, seq_len),
                                (2, q_len)).astype(np.int32)
  out, lse = decode(impl, q[:, -q_len:], k_cache, v_cache,
                    jnp.asarray(q_positions), jnp.asarray(kv_positions),
                    window=window, sinks=sinks)
  tol = tolerance(jnp.float32, "out")
  np.testing.assert_allclose(out, out_full[:, -q_len:], **tol)
  np.testing.assert_allclose(lse, lse_full[:, :, -q_len:], **tol)


def test_ring_of_exactly_w_slots_misses_keys_for_t_greater_than_1():
  """Negative control for the C >= W + T - 1 rule: with C = W the first of
  3 new queries has lost its 2 oldest keys, and the rows differ."""
  seq_len, window, q_len = 40, 8, 3
  q, k, v = random_qkv(4, batch=1, q_len=seq_len, kv_len=seq_len,
                       num_q_heads=2, num_kv_heads=1, head_dim=16)
  out_full = reference_attention(q, k, v, window=window)
  kv_positions = ring_positions([seq_len - 1], window)
  k_cache, v_cache = fill_cache(k, v, kv_positions)
  q_positions = np.arange(seq_len - q_len, seq_len, dtype=np.int32)[None]
  out, _ = decode("reference", q[:, -q_len:], k_cache, v_cache,
                  jnp.asarray(q_positions), jnp.asarray(kv_positions),
                  window=window)
  tol = tolerance(jnp.float32, "out")
  np.testing.assert_allclose(out[:, -1], out_full[:, -1], **tol)
  assert np.max(np.abs(np.asarray(out[:, 0] - out_full[:, -q_len]))) > 1e-2


@pytest.mark.parametrize("impl", ["reference", *DECODE_IMPLS])
def test_rows_seeing_nothing_are_zero(impl):
  """Row 0: an empty cache. Row 1: only positions older than the window."""
  q, k_cache, v_cache, _, _ = make_decode_case(
      5, layout="ring", last=[40, 40], q_len=2, num_slots=16, num_q_heads=4,
      num_kv_heads=2, head_dim=32, dtype=jnp.float32)
  kv_positions = jnp.asarray(np.stack([np.full(16, -1), np.arange(16)]),
                             jnp.int32)
  q_positions = jnp.asarray([[3, 4], [90, 91]], jnp.int32)
  out, lse = decode(impl, q, k_cache, v_cache, q_positions, kv_positions,
                    window=10)
  np.testing.assert_array_equal(out, np.zeros(out.shape, np.float32))
  assert np.all(np.isneginf(lse))
  # With sinks: still out 0, and lse = each head's sink (added once, also
  # across the pallas kernel's splits).
  sinks = make_sinks(4)
  out, lse = decode(impl, q, k_cache, v_cache, q_positions, kv_positions,
                    window=10, sinks=sinks)
  np.testing.assert_array_equal(out, np.zeros(out.shape, np.float32))
  np.testing.assert_array_equal(
      lse, np.broadcast_to(np.asarray(sinks)[None, :, None], lse.shape))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_sink_gradient_matches_the_prefill_op(impl):
  """d/d sinks of decoding the last rows equals that of the full-sequence op
  restricted to those rows (the dense decode paths are plain jnp)."""
  seq_len, window, q_len = 30, 8, 2
  q, k, v = random_qkv(9, batch=1, q_len=seq_len, kv_len=seq_len,
                       num_q_heads=4, num_kv_heads=2, head_dim=16)
  kv_positions = ring_positions([seq_len - 1], window + q_len - 1)
  k_cache, v_cache = fill_cache(k, v, kv_positions)
  q_positions = np.arange(seq_len - q_len, seq_len, dtype=np.int32)[None]

  def full(sinks):
    out, lse = reference_attention(q, k, v, window=window, sinks=sinks,
                                   return_lse=True)
    return jnp.sum(jnp.sin(out[:, -q_len:])) + jnp.sum(lse[:, :, -q_len:])

  def cached(sinks):
    out, lse = decode_attention(
        q[:, -q_len:], k_cache, v_cache, q_positions=jnp.asarray(q_positions),
        kv_positions=jnp.asarray(kv_positions), window=window, sinks=sinks,
        impl=impl, return_lse=True)
    return jnp.sum(jnp.sin(out)) + jnp.sum(lse)

  sinks = make_sinks(4)
  np.testing.assert_allclose(jax.grad(cached)(sinks), jax.grad(full)(sinks),
                             atol=1e-5)


def test_pallas_default_block_sizes_and_odd_head_dim():
  """Default tiling (heuristic splits), H = 40 padded inside the wrapper."""
  args = make_decode_case(6, layout="ring", last=[300, 150], q_len=1,
                          num_slots=100, num_q_heads=4, num_kv_heads=2,
                          head_dim=40, dtype=jnp.bfloat16)
  assert_matches_decode_reference("pallas", *args, window=128,
                                  block_sizes=None)


@pytest.mark.parametrize("with_sinks", [False, True])
def test_lowers_to_a_triton_kernel_for_gpu(with_sinks):
  """Compiled (not interpreted) Pallas path lowers for CUDA: bf16, H 128, GQA 8."""
  batch, num_slots, num_kv_heads = 2, 512, 2
  q = jax.ShapeDtypeStruct((batch, 1, 8 * num_kv_heads, 128), jnp.bfloat16)
  cache = jax.ShapeDtypeStruct((batch, num_slots, num_kv_heads, 128),
                               jnp.bfloat16)
  q_pos = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
  kv_pos = jax.ShapeDtypeStruct((batch, num_slots), jnp.int32)
  sinks = (jax.ShapeDtypeStruct((8 * num_kv_heads,), jnp.bfloat16)
           if with_sinks else None)
  fn = functools.partial(decode_attention, window=256, softcap=30.0,
                         impl="pallas", interpret=False)
  text = lowered_cuda_text(fn, q, cache, cache, q_positions=q_pos,
                           kv_positions=kv_pos, sinks=sinks)
  assert "__gpu$xla.gpu.triton" in text
  assert 'name = "swa_decode"' in text


def test_pallas_has_no_gradient():
  args = make_decode_case(7, layout="ring", last=[20], q_len=1, num_slots=16,
                          num_q_heads=2, num_kv_heads=1, head_dim=16,
                          dtype=jnp.float32)
  q, k_cache, v_cache, q_pos, kv_pos = args
  loss = lambda q: decode_attention(q, k_cache, v_cache, q_positions=q_pos,
                                    kv_positions=kv_pos, impl="pallas").sum()
  with pytest.raises(NotImplementedError, match="forward only"):
    jax.grad(loss)(q)


def _good_args():
  q = jnp.zeros((2, 1, 4, 16), jnp.float32)
  cache = jnp.zeros((2, 8, 2, 16), jnp.float32)
  return dict(q=q, k_cache=cache, v_cache=cache,
              q_positions=jnp.zeros((2, 1), jnp.int32),
              kv_positions=jnp.zeros((2, 8), jnp.int32))


@pytest.mark.parametrize("change, error, message", [
    (dict(q=jnp.zeros((2, 4, 16))), ValueError, r"q.shape=\(2, 4, 16\)"),
    (dict(k_cache=jnp.zeros((2, 8, 3, 16))), ValueError,
     r"k.shape=.*v.shape"),
    (dict(k_cache=jnp.zeros((2, 8, 3, 16)), v_cache=jnp.zeros((2, 8, 3, 16))),
     ValueError, "multiple of num_kv_heads"),
    (dict(k_cache=jnp.zeros((2, 8, 2, 16), jnp.bfloat16)), TypeError,
     "k.dtype=bfloat16"),
    (dict(window=0), ValueError, "window=0"),
    (dict(window=(4, 0)), ValueError, r"window=\(4, 0\)"),
    (dict(softcap=-1.0), ValueError, "softcap=-1.0"),
    (dict(q_positions=jnp.zeros((2, 1), jnp.float32)), TypeError,
     "q_positions.dtype=float32"),
    (dict(q_positions=jnp.zeros((2, 3), jnp.int32)), ValueError,
     r"q_positions.shape=\(2, 3\): expected \(2, 1\)"),
    (dict(kv_positions=jnp.zeros((2, 9), jnp.int32)), ValueError,
     r"kv_positions.shape=\(2, 9\): expected \(2, 8\)"),
    (dict(kv_positions=[0] * 8), TypeError, "kv_positions: expected"),
    (dict(impl="cudnn"), ValueError, "impl='cudnn'"),
    (dict(impl="xla", interpret=True), ValueError, "only impl='pallas'"),
    (dict(impl="reference", block_sizes=DecodeBlockSizes()), ValueError,
     "only impl='pallas'"),
    (dict(impl="pallas", block_sizes=(16, 2)), TypeError,
     r"block_sizes=\(16, 2\)"),
    (dict(sinks=jnp.zeros((2,))), ValueError,
     r"decode_attention .*sinks.shape=\(2,\): expected"),
    (dict(sinks=jnp.zeros((4,), jnp.int32)), ValueError, "sinks.dtype=int32"),
])
def test_bad_inputs_raise(change, error, message):
  args = _good_args()
  args.update(change)
  q, k_cache, v_cache = args.pop("q"), args.pop("k_cache"), args.pop("v_cache")
  with pytest.raises(error, match=message):
    decode_attention(q, k_cache, v_cache, **args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_k=24), "block_k=24"),
    (dict(block_k=8), "block_k=8"),
    (dict(num_splits=0), "num_splits=0"),
    (dict(num_warps=0), "num_warps=0"),
])
def test_bad_block_sizes_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    DecodeBlockSizes(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("layout, last, q_len, num_slots, window, with_sinks", [
    ("ring", [10_000, 3000], 1, 4096, 4096, False),
    ("ring", [9000, 20], 4, 4099, 4000, False),
    ("ring", [9000, 20], 1, 128, 128, True),  # gpt-oss's sliding layers
    ("linear", [5000, 32_767], 1, 32_768, None, False),
])
def test_compiled_kernel_at_model_sizes(dtype, layout, last, q_len, num_slots,
                                        window, with_sinks):
  """The compiled Triton kernel with default tiling, H 128, GQA 8 (GPU only)."""
  args = make_decode_case(8, layout=layout, last=last, q_len=q_len,
                          num_slots=num_slots, num_q_heads=32, num_kv_heads=4,
                          head_dim=128, dtype=dtype)
  assert_matches_decode_reference("pallas", *args, window=window,
                                  softcap=30.0 if q_len > 1 else None,
                                  block_sizes=None,
                                  sinks=make_sinks(32) if with_sinks else None)

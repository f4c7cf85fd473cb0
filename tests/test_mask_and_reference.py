"""The window predicate, the block band, input validation and the dense reference."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.test_util import check_grads

from pallas_kernels import (Band, reference_attention, sliding_window_attention,
                            visited_blocks, window_mask)
from pallas_kernels.mask import block_fully_visible, kv_block_range, q_block_range, visible
from pallas_kernels.validation import MAX_WINDOW, check_window
from tests.attention_cases import make_inputs


def dense_mask(band, q_len, kv_len, q_seg=None, k_seg=None):
  """Mask of `visible` on plain numpy positions (an independent spelling)."""
  q_pos = np.arange(q_len)[:, None] + kv_len - q_len
  k_pos = np.arange(kv_len)[None, :]
  seg = (None, None) if q_seg is None else (np.asarray(q_seg)[:, None],
                                             np.asarray(k_seg)[None, :])
  return np.asarray(visible(q_pos, k_pos, band, *seg)).astype(int)


def test_causal_window_3_literal():
  expected = np.array([
      [1, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0],
      [0, 1, 1, 1, 0, 0],
      [0, 0, 1, 1, 1, 0],
      [0, 0, 0, 1, 1, 1],
  ])
  np.testing.assert_array_equal(
      dense_mask(check_window(3, True), 6, 6), expected)


def test_window_1_sees_only_itself():
  np.testing.assert_array_equal(dense_mask(check_window(1, True), 6, 6),
                                np.eye(6, dtype=int))


def test_full_causal_literal():
  np.testing.assert_array_equal(dense_mask(check_window(None, True), 6, 6),
                                np.tril(np.ones((6, 6), int)))


def test_bidirectional_local_literal():
  expected = np.array([
      [1, 1, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0],
      [1, 1, 1, 1, 0, 0],
      [0, 1, 1, 1, 1, 0],
      [0, 0, 1, 1, 1, 1],
      [0, 0, 0, 1, 1, 1],
  ])
  np.testing.assert_array_equal(
      dense_mask(check_window((2, 1), False), 6, 6), expected)


def test_packed_segments_with_window_literal():
  seg = [0, 0, 0, 1, 1, 1]
  expected = np.array([
      [1, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [0, 1, 1, 0, 0, 0],
      [0, 0, 0, 1, 0, 0],
      [0, 0, 0, 1, 1, 0],
      [0, 0, 0, 0, 1, 1],
  ])
  np.testing.assert_array_equal(
      dense_mask(check_window(2, True), 6, 6, seg, seg), expected)


def test_bottom_right_alignment_literal():
  # 2 queries against 6 keys: they sit at positions 4 and 5.
  expected = np.array([
      [0, 0, 1, 1, 1, 0],
      [0, 0, 0, 1, 1, 1],
  ])
  np.testing.assert_array_equal(dense_mask(check_window(3, True), 2, 6), expected)


def test_hf_and_flash_attention_conventions_agree():
  """HF sliding_window=W == FlashAttention window_size=(W-1, 0) == our window=W."""
  for w in (1, 2, 5):
    assert check_window(w, True) == Band(w - 1, 0) == check_window((w - 1, 0), False)


@given(q_len=st.integers(1, 70), kv_len=st.integers(1, 70),
       block_q=st.sampled_from([1, 4, 16]), block_k=st.sampled_from([1, 8, 16]),
       left=st.one_of(st.none(), st.integers(0, 40)),
       right=st.one_of(st.none(), st.integers(0, 40)))
def test_block_ranges_are_exactly_the_blocks_with_visible_pairs(
    q_len, kv_len, block_q, block_k, left, right):
  band = Band(left, right)
  mask = dense_mask(band, q_len, kv_len)
  nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
  args = dict(block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len,
              band=band)
  touched = np.zeros((nq, nk), bool)
  for i in range(nq):
    for j in range(nk):
      touched[i, j] = mask[i * block_q:(i + 1) * block_q,
                           j * block_k:(j + 1) * block_k].any()
      if block_fully_visible(i, j, **args):
        assert mask[i * block_q:(i + 1) * block_q,
                    j * block_k:(j + 1) * block_k].all()
  for i in range(nq):
    lo, hi = (int(x) for x in kv_block_range(i, **args))
    cols = np.flatnonzero(touched[i])
    if cols.size:
      assert (lo, hi) == (cols[0], cols[-1] + 1)
    else:
      assert lo == hi
  for j in range(nk):
    lo, hi = (int(x) for x in q_block_range(j, **args))
    rows = np.flatnonzero(touched[:, j])
    if rows.size:
      assert (lo, hi) == (rows[0], rows[-1] + 1)
    else:
      assert lo == hi


@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_band_width_is_independent_of_sequence_length(seq_len):
  args = dict(block_q=64, block_k=64, q_len=seq_len, kv_len=seq_len,
              band=check_window(128, True))
  visits = [int(hi - lo) for lo, hi in
            (kv_block_range(i, **args) for i in range(seq_len // 64))]
  # Window 128 over 64-wide blocks: query block i spans keys back to
  # 64 i - 127, i.e. 3 key blocks, except where the sequence starts.
  assert visits == [1, 2] + [3] * (seq_len // 64 - 2)


# (window, causal) of the four patterns: causal window, full causal, local
# bidirectional (either side may be 0), full bidirectional.
WINDOWS = st.one_of(
    st.tuples(st.integers(1, 40), st.just(True)),
    st.tuples(st.none(), st.booleans()),
    st.tuples(st.tuples(st.integers(0, 40), st.integers(0, 40)), st.just(False)))


@given(q_len=st.integers(1, 70), kv_len=st.integers(1, 70),
       block_q=st.integers(1, 17), block_k=st.integers(1, 17),
       window_causal=WINDOWS)
def test_visited_blocks_are_the_tiles_with_a_visible_pair(
    q_len, kv_len, block_q, block_k, window_causal):
  window, causal = window_causal
  mask = dense_mask(check_window(window, causal), q_len, kv_len)
  nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
  brute = np.array([[mask[i * block_q:(i + 1) * block_q,
                          j * block_k:(j + 1) * block_k].any()
                     for j in range(nk)] for i in range(nq)]).reshape(nq, nk)
  visited = visited_blocks(q_len, kv_len, window=window, causal=causal,
                           block_q=block_q, block_k=block_k)
  assert visited.dtype == bool
  np.testing.assert_array_equal(visited, brute)


def test_visited_blocks_literal_and_window_skips_tiles():
  expected = np.array([[1, 0, 0, 0],
                       [1, 1, 0, 0],
                       [0, 1, 1, 0],
                       [0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(
      visited_blocks(8, window=3, block_q=2, block_k=2), expected)
  # Negative control: full causal visits the whole lower triangle of tiles.
  np.testing.assert_array_equal(
      visited_blocks(8, window=None, block_q=2, block_k=2),
      np.tril(np.ones((4, 4), bool)))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(block_q=0), ValueError, "block_q=0"),
    (dict(block_k=2.0), ValueError, "block_k=2.0"),
    (dict(q_len=0), ValueError, "q_len=0"),
    (dict(window=0), ValueError, "window=0"),
    (dict(window=(2, 1)), ValueError, "causal=True"),
    (dict(window=3, causal=False), ValueError, "causal=False"),
    (dict(causal=1), TypeError, "causal=1"),
])
def test_visited_blocks_rejects_bad_arguments(kwargs, error, message):
  args = {"q_len": 8, "window": 3, "block_q": 2, "block_k": 2, **kwargs}
  with pytest.raises(error, match=re.escape(message)):
    visited_blocks(args.pop("q_len"), **args)


@pytest.mark.parametrize("window", [1, 3, 8, 100])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_reference_matches_jax_dot_product_attention(window, num_kv_heads):
  q, k, v, _ = make_inputs(0, q_len=20, num_q_heads=4,
                           num_kv_heads=num_kv_heads)
  expected = jax.nn.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=(window - 1, 0),
      implementation="xla")
  got = reference_attention(q, k, v, window=window)
  chex.assert_trees_all_close(got, expected, atol=1e-5, rtol=0)


def test_reference_empty_rows_are_zero_not_nan():
  # 4 queries against 2 keys, causal: queries at positions -2 and -1 see nothing.
  q, k, v, _ = make_inputs(1, q_len=4, kv_len=2)
  out, lse = reference_attention(q, k, v, return_lse=True)
  np.testing.assert_array_equal(np.asarray(out[:, :2]), 0.0)
  assert np.all(np.isneginf(lse[:, :, :2]))
  grads = jax.grad(lambda q, k, v: reference_attention(q, k, v).sum(),
                   argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(np.asarray(grads[0][:, :2]), 0.0)


def numpy_sink_attention(q, k, v, sinks, mask, scale):
  """The sink formula spelled directly in float64: the sink is one more
  column of the score matrix that is in every row's softmax and has a zero
  value vector. q: [T, N, H], k, v: [S, K, H], mask: [T, S] bool."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[1] // k.shape[1]
  out = np.zeros(q.shape)
  lse = np.zeros((q.shape[1], q.shape[0]))
  for n in range(q.shape[1]):
    s = q[:, n] @ k[:, n // group].T * scale  # [T, S]
    s = np.where(mask, s, -np.inf)
    s = np.concatenate([s, np.full((len(s), 1), float(sinks[n]))], axis=1)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    lse[n] = np.log(p.sum(axis=1)) + s.max(axis=1)
    p /= p.sum(axis=1, keepdims=True)
    out[:, n] = p[:, :-1] @ v[:, n // group]
  return out, lse


@pytest.mark.parametrize("q_len, kv_len, window", [
    (10, 10, 1),   # the sink against a single key
    (10, 10, 4),
    (12, 8, 3),    # the first 4 queries see no key: out 0, lse = sink
])
def test_reference_with_sinks_matches_the_formula_in_float64(q_len, kv_len,
                                                             window):
  q, k, v, _ = make_inputs(7, q_len=q_len, kv_len=kv_len, num_q_heads=4,
                           num_kv_heads=2, head_dim=8)
  sinks = jnp.array([-2.0, 0.0, 1.5, 4.0])
  out, lse = reference_attention(q, k, v, window=window, sinks=sinks,
                                 return_lse=True)
  mask = dense_mask(check_window(window, True), q_len, kv_len).astype(bool)
  out64, lse64 = numpy_sink_attention(q[0], k[0], v[0], sinks, mask, 8**-0.5)
  np.testing.assert_allclose(out[0], out64, atol=1e-6, rtol=0)
  np.testing.assert_allclose(lse[0], lse64, atol=1e-6, rtol=0)
  empty = ~mask.any(axis=1)
  np.testing.assert_array_equal(np.asarray(out[0])[empty], 0.0)
  np.testing.assert_array_equal(
      np.asarray(lse[0])[:, empty],
      np.broadcast_to(np.asarray(sinks)[:, None], (4, int(empty.sum()))))


def test_reference_sink_gradient_matches_finite_differences():
  q, k, v, _ = make_inputs(8, q_len=9, num_q_heads=2, num_kv_heads=1,
                           head_dim=8)
  sinks = jnp.array([0.5, 2.0])

  def loss(sinks):
    out, lse = reference_attention(q, k, v, window=3, sinks=sinks,
                                   return_lse=True)
    return jnp.sum(out * jnp.cos(out)) + 0.5 * jnp.sum(lse)

  check_grads(loss, (sinks,), order=1, modes=("rev",), eps=1e-2, atol=1e-3,
              rtol=1e-3)


Q, K, V, _ = make_inputs(2, q_len=8, num_q_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(window=0), ValueError, "window=0"),
    (dict(window=-3), ValueError, "window=-3"),
    (dict(window=2.5), TypeError, "window=2.5"),
    (dict(window=(2, 0)), ValueError, "causal=True"),
    (dict(window=3, causal=False), ValueError, "causal=False"),
    (dict(window=(-1, 2), causal=False), ValueError, "left"),
    (dict(window=(1, 2, 3), causal=False), ValueError, "(left, right)"),
    (dict(causal=1), TypeError, "causal=1"),
    (dict(softcap=0.0), ValueError, "softcap=0.0"),
    (dict(softcap=-1.0), ValueError, "softcap=-1.0"),
    (dict(softcap="big"), TypeError, "softcap='big'"),
    (dict(impl="flash"), ValueError, "impl='flash'"),
    (dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), ValueError, "segment_ids.shape"),
    (dict(segment_ids=jnp.zeros((1, 8), jnp.float32)), TypeError, "segment_ids.dtype"),
    (dict(segment_ids=[0] * 8), TypeError, "segment_ids"),
    (dict(scale="x"), TypeError, "scale='x'"),
    # Non-finite numbers would give NaN everywhere.
    (dict(softcap=float("inf")), ValueError, "softcap=inf"),
    (dict(scale=float("nan")), ValueError, "scale=nan"),
    (dict(scale=float("-inf")), ValueError, "scale=-inf"),
    # Past MAX_WINDOW, int32 position arithmetic would overflow.
    (dict(window=2**31), ValueError, "window=2147483648"),
    (dict(window=(0, 2**31 - 1), causal=False), ValueError, "right"),
    # One float sink logit per query head (N = 4 here).
    (dict(sinks=jnp.zeros((2,))), ValueError, "sinks.shape=(2,): expected"),
    (dict(sinks=jnp.zeros((1, 4))), ValueError, "sinks.shape=(1, 4)"),
    (dict(sinks=jnp.zeros((4,), jnp.int32)), ValueError,
     "sinks.dtype=int32: expected a float dtype"),
    (dict(sinks=[0.0] * 4), TypeError, "sinks: expected a float array"),
])
def test_bad_arguments_raise_clearly(kwargs, error, message):
  with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
    sliding_window_attention(Q, K, V, **kwargs)


@pytest.mark.parametrize("q, k, v, error, message", [
    (Q[0], K, V, ValueError, "q.shape"),
    (Q, K[:, :, :1], V, ValueError, "k.shape"),
    (Q, K, V.astype(jnp.bfloat16), TypeError, "v.dtype"),
    (Q.astype(jnp.int32), K, V, TypeError, "q.dtype"),
    (Q, K[..., :16], V[..., :16], ValueError, "head_dim"),
    (Q[:, :, :3], K, V, ValueError, "multiple of num_kv_heads"),
    (Q, jnp.concatenate([K, K]), jnp.concatenate([V, V]), ValueError, "batch"),
    (np.zeros(3).tolist(), K, V, TypeError, "q: expected an array"),
])
def test_bad_arrays_raise_clearly(q, k, v, error, message):
  with pytest.raises(error, match=message):
    sliding_window_attention(q, k, v)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("window, causal, same", [
    (MAX_WINDOW, True, None),
    ((MAX_WINDOW, MAX_WINDOW), False, None),
    ((MAX_WINDOW, 2), False, (16, 2)),  # T = 12, S = 5: |i - j| <= 11
    ((0, MAX_WINDOW), False, (0, 16)),
])
def test_largest_windows_are_exact(impl, window, causal, same):
  """MAX_WINDOW on either side overflows no int32 position, for queries
  before the first key (T > S: negative positions) or after it."""
  q, k, v, _ = make_inputs(4, q_len=12, kv_len=5)
  np.testing.assert_array_equal(window_mask(12, 5, window=window, causal=causal),
                                window_mask(12, 5, window=same, causal=causal))
  chex.assert_trees_all_close(
      sliding_window_attention(q, k, v, window=window, causal=causal, impl=impl),
      sliding_window_attention(q, k, v, window=same, causal=causal, impl=impl),
      atol=1e-6)


def test_segment_ids_need_equal_lengths():
  q, k, v, _ = make_inputs(3, q_len=4, kv_len=8)
  with pytest.raises(ValueError, match="q_len=4 != kv_len=8"):
    sliding_window_attention(q, k, v, segment_ids=jnp.zeros((1, 4), jnp.int32))


def test_validation_runs_before_tracing():
  """Errors come from Python checks, also under jit, not from a traced op."""
  with pytest.raises(ValueError, match="window=0"):
    jax.jit(lambda q, k, v: sliding_window_attention(q, k, v, window=0))(Q, K, V)


def test_window_mask_is_the_public_picture_of_the_op():
  seg = jnp.array([[0, 0, 0, 1, 1, 1]], jnp.int32)
  np.testing.assert_array_equal(
      window_mask(6, window=2, segment_ids=seg)[0],
      dense_mask(check_window(2, True), 6, 6, seg[0], seg[0]))
  np.testing.assert_array_equal(window_mask(2, 6, window=3),
                                dense_mask(check_window(3, True), 2, 6))
  with pytest.raises(ValueError, match="q_len=0"):
    window_mask(0)
  with pytest.raises(ValueError, match="window=0"):
    window_mask(4, window=0)

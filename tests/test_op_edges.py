"""The op's edges (issue 16 point 12, 12b): batch 0 on every impl, integer-like
and traced windows, and the fp32 oracle checked against a float64 truth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sliding_window_attention

CPU_IMPLS = ("reference", "xla", "pallas", "splash")  # pallas, splash interpreted


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("window, causal", [(4, True), (None, True), ((2, 1), False)])
def test_batch_zero_returns_the_empty_result(impl, window, causal):
  q = jnp.zeros((0, 16, 4, 16), jnp.float32)
  k = v = jnp.zeros((0, 16, 2, 16), jnp.float32)
  out, lse = sliding_window_attention(q, k, v, window=window, causal=causal, impl=impl,
                                      return_lse=True)
  assert (out.shape, out.dtype, lse.shape) == ((0, 16, 4, 16), jnp.float32, (0, 4, 16))
  grads = jax.grad(lambda q, k, v: sliding_window_attention(
      q, k, v, window=window, causal=causal, impl=impl).sum(), argnums=(0, 1, 2))(q, k, v)
  assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


@pytest.mark.parametrize("window", [np.int64(5), np.int32(5), jnp.asarray(5)])
def test_integer_like_windows_are_accepted(window):
  q = jax.random.normal(jax.random.key(0), (1, 12, 2, 16))
  expected = sliding_window_attention(q, q, q, window=5, impl="xla")
  np.testing.assert_array_equal(
      sliding_window_attention(q, q, q, window=window, impl="xla"), expected)
  np.testing.assert_array_equal(
      sliding_window_attention(q, q, q, window=(window, np.int64(0)), causal=False,
                               impl="xla"),
      sliding_window_attention(q, q, q, window=(5, 0), causal=False, impl="xla"))


def test_a_traced_window_says_it_must_be_static():
  q = jnp.ones((1, 8, 2, 16))
  with pytest.raises(TypeError, match=r"window=.*: expected a static Python int, not a "
                     "traced value"):
    jax.jit(lambda w: sliding_window_attention(q, q, q, window=w))(4)
  with pytest.raises(TypeError, match=r"window=2\.5: expected an int"):
    sliding_window_attention(q, q, q, window=2.5)


def float64_attention(q, k, v):
  """Bidirectional softmax attention in float64 numpy: [B, T, N, H] x [B, S, N, H]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v)


def test_the_reference_is_as_accurate_as_the_paths_it_judges():
  """q [2, 256, 4, 64] vs kv [2, 8, 4, 64], uniform(1, 2), bidirectional: the
  oracle's relative error against float64 is fp32 rounding (< 6e-7; it was
  2.5e-6 with exp(s - lse)), and no more than the xla path's."""
  rng = np.random.default_rng(0)
  q = rng.uniform(1, 2, (2, 256, 4, 64)).astype(np.float32)
  k, v = (rng.uniform(1, 2, (2, 8, 4, 64)).astype(np.float32) for _ in range(2))
  truth = float64_attention(q, k, v)
  error = {impl: np.max(np.abs(np.asarray(sliding_window_attention(
      q, k, v, causal=False, impl=impl), np.float64) - truth) / np.abs(truth))
           for impl in ("reference", "xla")}
  assert error["reference"] < 6e-7, error
  assert error["reference"] <= error["xla"] * 1.01, error

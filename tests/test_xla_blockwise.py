"""impl="xla" beyond the shared grid: many blocks per row, block sizes, memory.

The grid (tests/test_attention_grid.py) runs the default block sizes, which
cover its short sequences with one or two blocks; here small blocks force
many chunks, partial last blocks and band edges that cut blocks anywhere.
"""

import contextlib

import chex
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels import XlaBlockSizes, sliding_window_attention
from tests.attention_cases import (assert_matches_reference, jaxpr_equations,
                                   make_inputs)


@contextlib.contextmanager
def _with_blocks(block_q, block_k):
  """Makes impl="xla" use these block sizes by default (the shared helper
  passes the same kwargs to the reference, which takes none)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(XlaBlockSizes, "default",
                  classmethod(lambda cls, problem: cls(block_q, block_k)))
    yield


@settings(max_examples=4)
@given(data=st.data())
def test_small_blocks_match_reference(data):
  q_len = data.draw(st.integers(1, 48), "q_len")
  kv_len = data.draw(st.sampled_from([q_len, max(1, q_len - 7), q_len + 11]),
                     "kv_len")
  causal = data.draw(st.booleans(), "causal")
  if causal:
    window = data.draw(st.one_of(st.none(), st.integers(1, 20)), "window")
  else:
    window = data.draw(st.one_of(
        st.none(), st.tuples(st.integers(0, 12), st.integers(0, 12))), "window")
  segments = None
  if kv_len == q_len and q_len > 3:
    segments = data.draw(st.one_of(st.none(), st.integers(2, 3)), "segments")
  softcap = data.draw(st.one_of(st.none(), st.just(4.0)), "softcap")
  blocks = data.draw(st.tuples(st.sampled_from([3, 8, 16]),
                               st.sampled_from([4, 8, 13])), "blocks")
  q, k, v, seg = make_inputs(data.draw(st.integers(0, 999), "seed"),
                             q_len=q_len, kv_len=kv_len, num_q_heads=4,
                             num_kv_heads=2, head_dim=16, num_segments=segments)
  with _with_blocks(*blocks):
    assert_matches_reference(q, k, v, impl="xla", window=window, causal=causal,
                             segment_ids=seg, softcap=softcap)


def test_explicit_block_sizes_give_the_same_result():
  q, k, v, _ = make_inputs(3, q_len=50, num_q_heads=4, num_kv_heads=1)
  outs = [sliding_window_attention(q, k, v, window=9, impl="xla",
                                   block_sizes=bs)
          for bs in (None, XlaBlockSizes(7, 16))]
  chex.assert_trees_all_close(outs[0], outs[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_q=0), "block_q=0"),
    (dict(block_k=-4), "block_k=-4"),
    (dict(block_q=True), "block_q=True"),
    (dict(block_k=8.0), "block_k=8.0"),
])
def test_block_sizes_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    XlaBlockSizes(**kwargs)


def test_foreign_block_sizes_type_is_refused():
  q, k, v, _ = make_inputs(0)
  with pytest.raises(TypeError, match="pallas_kernels.XlaBlockSizes"):
    sliding_window_attention(q, k, v, window=4, impl="xla",
                             block_sizes=(16, 16))


def _temp_bytes(seq, window, *, causal=True):
  """XLA's temp allocation for jit(grad) of the op at [1, seq, 4, 32] fp32."""
  spec = jax.ShapeDtypeStruct((1, seq, 4, 32), jnp.float32)

  def loss(q, k, v):
    out = sliding_window_attention(q, k, v, window=window, causal=causal,
                                   impl="xla")
    return jnp.sum(out)

  compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(spec, spec, spec).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("window", [64, None])
def test_memory_is_linear_in_seq_len(window):
  # A [T, T] score matrix per head would be 4·T²·4 bytes (64 MiB at T=2048);
  # the blockwise path keeps O(T·N·H) residuals and one tile per head, also
  # for the unbounded band.
  small, large = _temp_bytes(1024, window), _temp_bytes(2048, window)
  assert large < 2.5 * small, (small, large)
  assert large < 4 * 2048 * 2048 * 4 / 8, large


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fp32_dots_request_full_precision(dtype):
  # On GPU an fp32 dot at DEFAULT precision may run in TF32: every dot with
  # fp32 operands, forward and backward (delta = rowsum(dO * O) included),
  # must ask for HIGHEST, as the Pallas kernels do.
  q, k, v, _ = make_inputs(0, q_len=32, head_dim=16, dtype=dtype)

  def loss(q, k, v):
    out, lse = sliding_window_attention(q, k, v, window=8, impl="xla",
                                        return_lse=True)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  closed = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  dots = [e for e in jaxpr_equations(closed.jaxpr)
          if e.primitive.name == "dot_general"
          and all(x.aval.dtype == jnp.float32 for x in e.invars)]
  assert dots
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  assert all(e.params["precision"] == highest for e in dots), [
      e.params["precision"] for e in dots]


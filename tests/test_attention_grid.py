"""One correctness grid, run on every implementation available here.

Each case compares forward, LSE and dq/dk/dv (and dsinks, with attention
sinks) against the fp32 dense reference (tests/attention_cases.py holds the
tolerances). Pallas, Mosaic and splash run in interpret mode
on CPU; on a GPU (TPU) machine the same grid runs the compiled kernels.
impl="mosaic" takes 16-bit inputs only: every fp32 case runs it in bf16
(with bf16's tolerances), and on a jax without its interpret mode (< 0.12.1)
its cases skip, naming the version they need.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels import (FlashBlockSizes, MosaicBlockSizes,
                            sliding_window_attention)
from tests.attention_cases import (MOSAIC, assert_matches_reference,
                                   make_inputs, make_sinks)

IMPLS = ["reference", "xla", "pallas", MOSAIC, "splash"]
# In fp32 impl="reference" is the oracle itself (the same code, the same
# inputs): a comparison that cannot fail. The fp32 grid and the hypothesis
# draws run the others; tests/test_mask_and_reference.py checks the oracle
# against independent spellings (literal masks, float64 formulas, finite
# differences, jax's dot_product_attention).
KERNEL_IMPLS = IMPLS[1:]
# Small tiles for the short sequences here, so every case spans several
# blocks: band edges, interior tiles and ragged last blocks. Others: defaults.
# Mosaic's smallest tiles are 64 rows: the grid's short rows are mostly one
# or two tiles (tests/test_mosaic_kernels.py holds its multi-tile checks);
# splash's are at least 128 rows: every grid case is one padded tile
# (tests/test_splash.py holds its multi-tile cases).
BLOCK_SIZES = {"pallas": FlashBlockSizes(16, 16, 16, 16, 16, 16),
               "mosaic": MosaicBlockSizes(64, 64, 64, 64, 64, 64)}
# The widest dtype each impl takes: the "fp32" grid runs it in that.
WIDEST = {"mosaic": jnp.bfloat16}

# (q_len, kv_len, num_q_heads, num_kv_heads, head_dim, window, causal,
#  num_segments, softcap, with_sinks). Each row runs once; about half with
# sinks, so both paths of every impl meet windows, GQA, segments, softcap,
# both directions and T != S (the hypothesis draws mix them further).
CASES = [
    # windows: 1 (with a sink: it competes with a single key), small, not a
    # block multiple, >= seq_len, full causal
    (40, 40, 2, 1, 32, 1, True, None, None, True),
    (40, 40, 2, 2, 32, 5, True, None, None, False),
    (70, 70, 4, 2, 64, 19, True, None, None, False),
    (33, 33, 2, 1, 32, 64, True, None, None, False),
    (45, 45, 2, 1, 32, None, True, None, None, True),
    # GQA ratios 4, 8 and MQA
    (37, 37, 8, 2, 32, 9, True, None, None, True),
    (37, 37, 8, 1, 32, 9, True, None, None, False),
    # packed segments, softcap, both
    (50, 50, 4, 2, 32, 12, True, 3, None, True),
    (50, 50, 2, 1, 32, 12, True, None, 5.0, True),
    (50, 50, 4, 1, 32, None, True, 4, 3.0, False),
    # bidirectional local and full
    (41, 41, 2, 1, 32, (3, 7), False, None, None, True),
    (41, 41, 2, 1, 32, (0, 0), False, 2, None, False),
    (30, 30, 2, 1, 32, None, False, None, None, False),
    # bottom-right alignment: fewer queries than keys (with and without
    # sinks), and more (the first 31 rows see no key: with a sink, out 0 and
    # lse = the sink)
    (9, 40, 2, 1, 32, 6, True, None, None, False),
    (9, 40, 2, 1, 32, 6, True, None, None, True),
    (40, 9, 2, 1, 32, 6, True, None, None, True),
]


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize(
    "q_len, kv_len, num_q_heads, num_kv_heads, head_dim, window, causal, "
    "num_segments, softcap, with_sinks", CASES)
def test_fp32_matches_reference(impl, q_len, kv_len, num_q_heads, num_kv_heads,
                                head_dim, window, causal, num_segments, softcap,
                                with_sinks):
  q, k, v, seg = make_inputs(
      0, batch=2, q_len=q_len, kv_len=kv_len, num_q_heads=num_q_heads,
      num_kv_heads=num_kv_heads, head_dim=head_dim, num_segments=num_segments,
      dtype=WIDEST.get(impl, jnp.float32))
  sinks = make_sinks(num_q_heads) if with_sinks else None
  errors = assert_matches_reference(
      q, k, v, impl=impl, window=window, causal=causal, segment_ids=seg,
      softcap=softcap, sinks=sinks, block_sizes=BLOCK_SIZES.get(impl))
  assert ("dsinks" in errors) == with_sinks


# Impls whose interpreted kernels cost seconds of compile per case on CPU:
# the dtype sweeps below run them on a subset (every grid case above runs).
SLOW_ON_CPU = ("mosaic", "splash")


def _with_impls(values, slow_values):
  """(impl, *value) params: every impl on `values`, those of `SLOW_ON_CPU`
  on `slow_values` only."""
  return [pytest.param(impl, *value,
                       marks=MOSAIC.marks if impl == "mosaic" else ())
          for impl in ("reference", "xla", "pallas", "mosaic", "splash")
          for value in (slow_values if impl in SLOW_ON_CPU else values)]


# bf16 on every head dim (80 and 96: not powers of two); fp16 on 80 and
# on the widest, 256.
HEAD_DIM_CASES = ([(jnp.bfloat16, head_dim) for head_dim in (64, 80, 96, 128, 256)]
                  + [(jnp.float16, 80), (jnp.float16, 256)])
# The slow impls: each padded head dim (64, 128, 256) once, a padded one in fp16.
SLOW_HEAD_DIM_CASES = [(jnp.bfloat16, 64), (jnp.bfloat16, 128),
                         (jnp.bfloat16, 256), (jnp.float16, 80)]


@pytest.mark.parametrize("impl, dtype, head_dim",
                         _with_impls(HEAD_DIM_CASES, SLOW_HEAD_DIM_CASES))
def test_low_precision_head_dims(impl, dtype, head_dim):
  q, k, v, seg = make_inputs(1, q_len=48, num_q_heads=4, num_kv_heads=2,
                             head_dim=head_dim, dtype=dtype, num_segments=2)
  assert_matches_reference(q, k, v, impl=impl, window=13, segment_ids=seg,
                           block_sizes=BLOCK_SIZES.get(impl))


SINK_DTYPES = [
    (jnp.bfloat16, jnp.float32), (jnp.float16, jnp.float32),
    (jnp.bfloat16, jnp.bfloat16),  # dsinks comes back in the sinks' dtype
]


@pytest.mark.parametrize("impl, dtype, sinks_dtype",
                         _with_impls(SINK_DTYPES, SINK_DTYPES[-1:]))
def test_low_precision_with_sinks(impl, dtype, sinks_dtype):
  q, k, v, seg = make_inputs(1, batch=2, q_len=48, num_q_heads=4,
                             num_kv_heads=2, head_dim=64, dtype=dtype,
                             num_segments=2)
  assert_matches_reference(q, k, v, impl=impl, window=13, segment_ids=seg,
                           softcap=10.0, sinks=make_sinks(4, sinks_dtype),
                           block_sizes=BLOCK_SIZES.get(impl))


@pytest.mark.parametrize(
    "impl, dtype", _with_impls([(jnp.bfloat16,), (jnp.float16,)],
                               [(jnp.float16,)]))
def test_low_precision_large_gradients(impl, dtype):
  # A cotangent 64x the usual gives gradients in the hundreds, where one
  # 16-bit ulp exceeds the absolute tolerance: the relative term carries it.
  q, k, v, _ = make_inputs(6, q_len=64, num_q_heads=4, num_kv_heads=1,
                           head_dim=64, dtype=dtype)
  errors = assert_matches_reference(q, k, v, impl=impl, window=24,
                                    cotangent_scale=64.0,
                                    block_sizes=BLOCK_SIZES.get(impl))
  assert errors["grad_max"] > 64, errors


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_hypothesis_shapes_and_windows(impl):
  # Every impl draws the profile's examples (conftest: 8, derandomized);
  # the slow interpreted ones (mosaic, splash) 3 examples.
  @settings(max_examples=3 if impl in SLOW_ON_CPU else
            settings.default.max_examples)
  @given(data=st.data())
  def check(data):
    seq = data.draw(st.integers(1, 80), "seq")
    kv_heads = data.draw(st.sampled_from([1, 2]), "kv_heads")
    group = data.draw(st.sampled_from([1, 2, 4]), "group")
    causal = data.draw(st.booleans(), "causal")
    if causal:
      window = data.draw(st.one_of(st.none(), st.integers(1, 90)), "window")
    else:
      window = data.draw(st.one_of(
          st.none(), st.tuples(st.integers(0, 40), st.integers(0, 40))),
          "window")
    segments = data.draw(st.one_of(st.none(), st.integers(1, 4)), "segments")
    if segments is not None and segments > seq:
      segments = None
    softcap = data.draw(st.one_of(st.none(), st.floats(1.0, 30.0)),
                        "softcap")
    sinks = data.draw(st.one_of(st.none(), st.lists(
        st.floats(-5.0, 5.0), min_size=kv_heads * group,
        max_size=kv_heads * group)), "sinks")
    q, k, v, seg = make_inputs(data.draw(st.integers(0, 2**16), "seed"),
                               q_len=seq, num_q_heads=kv_heads * group,
                               num_kv_heads=kv_heads, head_dim=32,
                               num_segments=segments,
                               dtype=WIDEST.get(impl, jnp.float32))
    assert_matches_reference(
        q, k, v, impl=impl, window=window, causal=causal, segment_ids=seg,
        softcap=softcap, sinks=None if sinks is None else jnp.asarray(sinks),
        block_sizes=BLOCK_SIZES.get(impl))

  check()


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_that_see_nothing_give_zeros_and_finite_grads(impl):
  # Queries at positions -3..-1 (more queries than keys) see no key.
  q, k, v, _ = make_inputs(4, q_len=12, kv_len=9, num_q_heads=2, num_kv_heads=1,
                           dtype=WIDEST.get(impl, jnp.float32))
  errors = assert_matches_reference(q, k, v, impl=impl, window=4,
                                    block_sizes=BLOCK_SIZES.get(impl))
  assert errors["out"] < (1e-5 if q.dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_that_see_nothing_with_sinks_give_zeros_and_the_sink(impl):
  # Queries at positions -3..-1 see no key: out 0 and lse = their head's
  # sink; d lse / d sink = 1 there, so those rows add d_lse to dsinks.
  q, k, v, _ = make_inputs(4, q_len=12, kv_len=9, num_q_heads=2, num_kv_heads=1,
                           dtype=WIDEST.get(impl, jnp.float32))
  sinks = make_sinks(2)
  errors = assert_matches_reference(q, k, v, impl=impl, window=4, sinks=sinks,
                                    block_sizes=BLOCK_SIZES.get(impl))
  assert errors["dsinks"] < (1e-4 if q.dtype == jnp.float32 else 2e-2), errors
  out, lse = sliding_window_attention(q, k, v, window=4, sinks=sinks, impl=impl,
                                      return_lse=True,
                                      block_sizes=BLOCK_SIZES.get(impl))
  np.testing.assert_array_equal(np.asarray(out[:, :3]), 0.0)
  np.testing.assert_array_equal(np.asarray(lse[:, :, :3]),
                                np.broadcast_to(np.asarray(sinks)[None, :, None],
                                                (1, 2, 3)))


@pytest.mark.parametrize("impl", IMPLS)
def test_minus_infinity_sinks_are_no_sinks(impl):
  # exp(-inf) = 0 joins no denominator: the op without sinks, also on rows
  # that see no key (lse -inf), with zero sink gradients and no NaN.
  q, k, v, _ = make_inputs(5, q_len=12, kv_len=9, num_q_heads=2, num_kv_heads=1,
                           dtype=WIDEST.get(impl, jnp.float32))
  kwargs = dict(window=4, impl=impl, return_lse=True,
                block_sizes=BLOCK_SIZES.get(impl))
  sinks = jnp.full((2,), -jnp.inf)
  chex.assert_trees_all_close(
      sliding_window_attention(q, k, v, sinks=sinks, **kwargs),
      sliding_window_attention(q, k, v, **kwargs), atol=1e-6)

  def loss(sinks):
    out, lse = sliding_window_attention(q, k, v, sinks=sinks, **kwargs)
    return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  np.testing.assert_array_equal(jax.grad(loss)(sinks), 0.0)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_an_eager_call_compiles_once(impl, caplog):
  """A call outside any jit (an eager `model(ids)`) compiles its program
  once per shape and config: a second identical call compiles nothing (each
  impl's op once re-traced and compiled its kernels or block scan on every
  call)."""
  q, k, v, _ = make_inputs(3, q_len=40, num_q_heads=2, num_kv_heads=1, head_dim=32,
                           dtype=WIDEST.get(impl, jnp.float32))
  def call():
    return sliding_window_attention(q, k, v, window=9, impl=impl,
                                    block_sizes=BLOCK_SIZES.get(impl))
  first = call()
  with jax.log_compiles(True), caplog.at_level("WARNING"):
    second = call()
  compiles = [r.getMessage() for r in caplog.records if "ompil" in r.getMessage()]
  assert not compiles, compiles
  chex.assert_trees_all_equal(first, second)

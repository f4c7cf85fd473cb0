"""One correctness grid, run on every implementation available here.

Each case compares forward, LSE and dq/dk/dv against the fp32 dense reference
(tests/attention_cases.py holds the tolerances). Pallas runs in interpret mode
on CPU; on a GPU machine the same grid runs the compiled kernels.
"""

import jax.numpy as jnp
import pytest
from hypothesis import given, strategies as st

from pallas_kernels import FlashBlockSizes
from tests.attention_cases import assert_matches_reference, make_inputs

IMPLS = ["reference", "xla", "pallas"]
# Small tiles for the short sequences here, so every case spans several
# blocks: band edges, interior tiles and ragged last blocks. Others: defaults.
BLOCK_SIZES = {"pallas": FlashBlockSizes(16, 16, 16, 16, 16, 16)}

# (q_len, kv_len, num_q_heads, num_kv_heads, head_dim, window, causal,
#  num_segments, softcap)
GRID = [
    # windows: 1, small, not a block multiple, >= seq_len, full causal
    (40, 40, 2, 1, 32, 1, True, None, None),
    (40, 40, 2, 2, 32, 5, True, None, None),
    (70, 70, 4, 2, 64, 19, True, None, None),
    (33, 33, 2, 1, 32, 64, True, None, None),
    (45, 45, 2, 1, 32, None, True, None, None),
    # GQA ratios 4, 8 and MQA
    (37, 37, 8, 2, 32, 9, True, None, None),
    (37, 37, 8, 1, 32, 9, True, None, None),
    # packed segments, softcap, both
    (50, 50, 4, 2, 32, 12, True, 3, None),
    (50, 50, 2, 1, 32, 12, True, None, 5.0),
    (50, 50, 4, 1, 32, None, True, 4, 3.0),
    # bidirectional local and full
    (41, 41, 2, 1, 32, (3, 7), False, None, None),
    (41, 41, 2, 1, 32, (0, 0), False, 2, None),
    (30, 30, 2, 1, 32, None, False, None, None),
    # bottom-right alignment: fewer queries than keys, and more
    (9, 40, 2, 1, 32, 6, True, None, None),
    (40, 9, 2, 1, 32, 6, True, None, None),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "q_len, kv_len, num_q_heads, num_kv_heads, head_dim, window, causal, "
    "num_segments, softcap", GRID)
def test_fp32_matches_reference(impl, q_len, kv_len, num_q_heads, num_kv_heads,
                                head_dim, window, causal, num_segments, softcap):
  q, k, v, seg = make_inputs(
      0, batch=2, q_len=q_len, kv_len=kv_len, num_q_heads=num_q_heads,
      num_kv_heads=num_kv_heads, head_dim=head_dim, num_segments=num_segments)
  assert_matches_reference(q, k, v, impl=impl, window=window, causal=causal,
                           segment_ids=seg, softcap=softcap,
                           block_sizes=BLOCK_SIZES.get(impl))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_low_precision_head_dims(impl, dtype, head_dim):
  q, k, v, seg = make_inputs(1, q_len=48, num_q_heads=4, num_kv_heads=2,
                             head_dim=head_dim, dtype=dtype, num_segments=2)
  assert_matches_reference(q, k, v, impl=impl, window=13, segment_ids=seg,
                           block_sizes=BLOCK_SIZES.get(impl))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_large_gradients(impl, dtype):
  # A cotangent 64x the usual gives gradients in the hundreds, where one
  # 16-bit ulp exceeds the absolute tolerance: the relative term carries it.
  q, k, v, _ = make_inputs(6, q_len=64, num_q_heads=4, num_kv_heads=1,
                           head_dim=64, dtype=dtype)
  errors = assert_matches_reference(q, k, v, impl=impl, window=24,
                                    cotangent_scale=64.0,
                                    block_sizes=BLOCK_SIZES.get(impl))
  assert errors["grad_max"] > 64, errors


@pytest.mark.parametrize("impl", IMPLS)
def test_hypothesis_shapes_and_windows(impl):
  # Every impl draws the profile's examples (conftest: 8, derandomized).
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
    q, k, v, seg = make_inputs(data.draw(st.integers(0, 2**16), "seed"),
                               q_len=seq, num_q_heads=kv_heads * group,
                               num_kv_heads=kv_heads, head_dim=32,
                               num_segments=segments)
    assert_matches_reference(q, k, v, impl=impl, window=window, causal=causal,
                             segment_ids=seg, softcap=softcap,
                             block_sizes=BLOCK_SIZES.get(impl))

  check()


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_that_see_nothing_give_zeros_and_finite_grads(impl):
  # Queries at positions -3..-1 (more queries than keys) see no key.
  q, k, v, _ = make_inputs(4, q_len=12, kv_len=9, num_q_heads=2, num_kv_heads=1)
  errors = assert_matches_reference(q, k, v, impl=impl, window=4,
                                    block_sizes=BLOCK_SIZES.get(impl))
  assert errors["out"] < 1e-5

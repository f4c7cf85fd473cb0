"""Pallas flash-attention kernels: GPU lowering, block skips, grads, tiles.

Numerical agreement with the reference over the feature grid lives in
tests/test_attention_grid.py (impl="pallas"); this file checks what is
specific to the kernels. Lowering tests build the Triton kernels for CUDA on
this CPU-only machine (interpret=False), so a kernel that the Triton backend
cannot lower fails here, not first on the GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels import FlashBlockSizes, sliding_window_attention
from pallas_kernels.flash_attention import visit_counts
from pallas_kernels.flash_tiles import KernelConfig
from pallas_kernels.mask import visible
from pallas_kernels.validation import check_attention_args
from tests.attention_cases import (assert_matches_reference, jaxpr_equations,
                                   make_inputs, make_sinks)
from tests.cuda_lowering import lowered_cuda_text

TRITON_CALL = "__gpu$xla.gpu.triton"
SMALL = FlashBlockSizes(16, 16, 16, 16, 16, 16)
HEAD_DIMS = [64, 80, 96, 128, 256]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize("head_dim, q_len, num_segments, softcap, with_sinks", [
    (128, 256, None, None, False),  # block multiples, power-of-two head dim
    (80, 200, 3, 30.0, False),   # padded head dim, ragged ends, segments, softcap
    (128, 256, None, None, True),   # sinks: one scalar per program, and dsinks
])
def test_kernels_lower_to_triton_for_gpu(head_dim, q_len, num_segments,
                                         softcap, with_sinks):
  q, k, v, seg = make_inputs(0, q_len=q_len, num_q_heads=4, num_kv_heads=2,
                             head_dim=head_dim, dtype=jnp.bfloat16,
                             num_segments=num_segments)
  sinks = make_sinks(4, jnp.bfloat16) if with_sinks else None

  def attend(q, k, v, sinks):
    return sliding_window_attention(
        q, k, v, window=64, segment_ids=seg, softcap=softcap, impl="pallas",
        return_lse=True, interpret=False, sinks=sinks)

  def loss(q, k, v, sinks):
    out, lse = attend(q, k, v, sinks)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  if num_segments is None and head_dim == 128:
    forward = lowered_cuda_text(attend, q, k, v, sinks)
    assert forward.count(TRITON_CALL) == 1
    assert "swa_flash_forward" in forward
  argnums = (0, 1, 2, 3) if with_sinks else (0, 1, 2)
  grads = lowered_cuda_text(jax.grad(loss, argnums=argnums), q, k, v, sinks)
  # Forward (residuals), dQ, dK/dV; dsinks is a jnp reduction, no kernel.
  assert grads.count(TRITON_CALL) == 3
  for name in ("swa_flash_forward", "swa_flash_backward_dq",
               "swa_flash_backward_dkv"):
    assert name in grads, name


def test_fp32_dots_request_full_precision():
  # Triton dots default to TF32; fp32 inputs must ask for IEEE (HIGHEST).
  q, k, v, _ = make_inputs(0, q_len=32, head_dim=16)
  closed = jax.make_jaxpr(lambda q, k, v: sliding_window_attention(
      q, k, v, window=8, impl="pallas", block_sizes=SMALL))(q, k, v)
  precisions = [e.params["precision"] for e in jaxpr_equations(closed.jaxpr)
                if e.primitive.name == "dot_general"]
  assert len(precisions) == 2, precisions  # q·kᵀ and p·v
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  assert all(p == highest for p in precisions), precisions


@pytest.mark.parametrize("window, causal", [(None, False), (5, True)])
def test_kernels_have_no_bool_to_bool_conversions(window, causal):
  # jax 0.11's Triton lowering emits an ill-typed select for them (seen on
  # an H200); weak-typed loop bounds used to create them when a band side
  # is unbounded.
  q, k, v, _ = make_inputs(0, q_len=32, head_dim=16)

  def loss(q, k, v):
    out, lse = sliding_window_attention(
        q, k, v, window=window, causal=causal, softcap=2.0,
        impl="pallas", block_sizes=SMALL, return_lse=True)
    return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  closed = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  bad = [e for e in jaxpr_equations(closed.jaxpr)
         if e.primitive.name == "convert_element_type"
         and e.params["new_dtype"] == jnp.bool_
         and e.invars[0].aval.dtype == jnp.bool_]
  assert not bad, bad


def _problem(q_len, kv_len, window, causal=True, head_dim=128,
             dtype=jnp.bfloat16):
  q = jax.ShapeDtypeStruct((1, q_len, 4, head_dim), dtype)
  k = jax.ShapeDtypeStruct((1, kv_len, 2, head_dim), dtype)
  return check_attention_args(q, k, k, window=window, causal=causal,
                              segment_ids=None, softcap=None, scale=None)


def _dense_block_visits(problem, block_q, block_k):
  """Per (q block, kv block): does any visible pair exist? From `visible`."""
  q_pos = np.arange(problem.q_len)[:, None] + problem.kv_len - problem.q_len
  k_pos = np.arange(problem.kv_len)[None, :]
  mask = np.asarray(visible(q_pos, k_pos, problem.band))
  nq, nk = -(-problem.q_len // block_q), -(-problem.kv_len // block_k)
  padded = np.zeros((nq * block_q, nk * block_k), bool)
  padded[:problem.q_len, :problem.kv_len] = mask
  return padded.reshape(nq, block_q, nk, block_k).any(axis=(1, 3))


@pytest.mark.parametrize("q_len, kv_len, window, causal", [
    (1024, 1024, 256, True),
    (1000, 1000, 100, True),
    (1024, 1024, (64, 200), False),
    (300, 1024, 256, True),
])
def test_visit_counts_equal_the_band(q_len, kv_len, window, causal):
  problem = _problem(q_len, kv_len, window, causal)
  blocks = FlashBlockSizes.default(problem)
  counts = visit_counts(problem)
  for name, bq, bk in (("forward", blocks.block_q, blocks.block_k),
                       ("dq", blocks.block_q_dq, blocks.block_k_dq),
                       ("dkv", blocks.block_q_dkv, blocks.block_k_dkv)):
    dense = _dense_block_visits(problem, bq, bk)
    expected = dense.sum(axis=1) if name != "dkv" else dense.sum(axis=0)
    np.testing.assert_array_equal(counts[name], expected, err_msg=name)


def test_visits_do_not_grow_with_sequence_length():
  maxima = {}
  for seq in (1024, 4096, 16384):
    counts = visit_counts(_problem(seq, seq, 256))
    maxima[seq] = {name: int(c.max()) for name, c in counts.items()}
  assert maxima[1024] == maxima[4096] == maxima[16384], maxima
  blocks = FlashBlockSizes.default(_problem(1024, 1024, 256))
  # A 256-key window spans at most (256 - 1 + block_q) / block_k + 1 blocks.
  assert maxima[1024]["forward"] <= (255 + blocks.block_q) // blocks.block_k + 1
  # Full causal, by contrast, grows with the sequence.
  full = visit_counts(_problem(4096, 4096, None))["forward"].max()
  assert full == 4096 // blocks.block_k


def test_check_grads_tiny_fp32_with_softcap_and_lse():
  q, k, v, _ = make_inputs(2, q_len=20, num_q_heads=2, num_kv_heads=1,
                           head_dim=16)

  @jax.jit
  def attend(q, k, v):
    out, lse = sliding_window_attention(
        q, k, v, window=7, softcap=4.0, impl="pallas", block_sizes=SMALL,
        return_lse=True)
    return out, lse

  check_grads(attend, (q, k, v), order=1, modes=("rev",), atol=1e-2,
              rtol=1e-2)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_default_block_sizes_are_valid(head_dim, dtype):
  sizes = FlashBlockSizes.default(_problem(64, 64, 8, head_dim=head_dim,
                                          dtype=dtype))
  assert isinstance(sizes, FlashBlockSizes)
  if dtype == jnp.float32:
    narrow = FlashBlockSizes.default(_problem(64, 64, 8, head_dim=head_dim))
    assert sizes.block_q <= narrow.block_q and sizes.block_k <= narrow.block_k


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(block_q=48), ValueError, r"block_q=48: expected a power of two"),
    (dict(block_k=8), ValueError, r"block_k=8: expected a power of two >= 16"),
    (dict(block_q_dkv=0), ValueError, r"block_q_dkv=0"),
    (dict(block_k_dq=32.0), TypeError, r"block_k_dq=32.0: expected an int"),
    (dict(num_warps=3), ValueError, r"num_warps=3"),
    (dict(num_stages=0), ValueError, r"num_stages=0"),
    (dict(num_warps=True), TypeError, r"num_warps=True"),
])
def test_block_sizes_validation(kwargs, error, match):
  with pytest.raises(error, match=match):
    FlashBlockSizes(**kwargs)


def test_block_sizes_wrong_type_is_a_type_error():
  q = jnp.zeros((1, 16, 2, 32), jnp.float32)
  k = jnp.zeros((1, 16, 1, 32), jnp.float32)
  with pytest.raises(TypeError, match=r"block_sizes=\(16, 16\): expected"):
    sliding_window_attention(q, k, k, impl="pallas", block_sizes=(16, 16))


def test_none_means_the_default_fitted_to_the_sequence():
  problem = _problem(40, 40, 8, head_dim=80, dtype=jnp.float16)
  fitted = KernelConfig.make(problem, None, interpret=True).blocks
  explicit = KernelConfig.make(
      problem, FlashBlockSizes.default(problem), interpret=True).blocks
  assert fitted == explicit
  # Tiles shrink to the sequence's next power of two (>= 16), no further.
  assert fitted.block_q == 64 and fitted.block_k == 64
  assert KernelConfig.make(_problem(5, 5, 2), SMALL, True).blocks == SMALL


@pytest.mark.parametrize("head_dim", [64, 96, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_default_blocks_multi_block_sequences(dtype, head_dim):
  # Default (large) tiles on sequences that span several of them. A
  # bidirectional band keeps every row >= 64 keys wide, so gradients stay
  # O(1) and the absolute 16-bit tolerances stay above one ulp.
  q, k, v, seg = make_inputs(5, q_len=300, num_q_heads=4, num_kv_heads=1,
                             head_dim=head_dim, dtype=dtype, num_segments=2)
  errors = assert_matches_reference(q, k, v, impl="pallas", causal=False,
                                    window=(64, 63), segment_ids=seg,
                                    softcap=20.0)
  print(jnp.dtype(dtype).name, head_dim, errors)

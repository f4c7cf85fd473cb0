"""impl="splash" beyond the shared grid: the band as splash's mask, window
edges, several blocks, tile skipping, block sizes, and the TPU lowering.

The grid (tests/test_attention_grid.py) runs splash in interpret mode on
every case; its lengths fit in one 128-row tile, so the cases here span
several tiles. The TPU lowering tests build the Mosaic kernels on this
CPU-only machine (interpret=False): a kernel Mosaic cannot lower fails here.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (SplashBlockSizes, decode_attention,
                            sliding_window_attention)
from pallas_kernels.features import default_decode_impl, default_impl
from pallas_kernels.mask import Band, dense_mask
from pallas_kernels.splash import band_mask_function
from pallas_kernels.validation import check_attention_args
from tests.attention_cases import (assert_matches_reference, make_inputs,
                                   make_sinks)

SMALL = SplashBlockSizes(128, 128, 128, 128, 128, 128)


@pytest.mark.parametrize("band", [
    Band(None, 0), Band(0, 0), Band(4, 0), Band(None, None), Band(3, 7),
    Band(0, 5), Band(None, 2)])
@pytest.mark.parametrize("q_len, kv_len", [(7, 7), (5, 9), (9, 5)])
def test_band_mask_function_is_the_window_predicate(band, q_len, kv_len):
  # On the padded grid: `mask.visible` on the real rows and keys, and no
  # padding key ever (rows past T are dropped by the op).
  rows, cols = np.arange(q_len + 3)[:, None], np.arange(kv_len + 4)[None, :]
  got = band_mask_function(rows, cols, band=band, q_offset=kv_len - q_len,
                           kv_len=kv_len)
  np.testing.assert_array_equal(got[:q_len, :kv_len],
                                np.asarray(dense_mask(q_len, kv_len, band)))
  assert not got[:, kv_len:].any()


def test_window_one_sees_only_itself_and_window_t_is_full_causal():
  # Splash's local windows are inclusive on both sides: window=W is
  # (W - 1, 0). W=1: each row's only key is its own, out = its v exactly.
  # W=T: the whole causal triangle; W=T-1 drops key 0 from the last row.
  q, k, v, _ = make_inputs(3, q_len=130, num_q_heads=4, num_kv_heads=2)
  run = lambda w: sliding_window_attention(q, k, v, window=w, impl="splash",
                                           block_sizes=SMALL)
  chex.assert_trees_all_close(run(1), jnp.repeat(v, 2, axis=2), atol=1e-6)
  full = sliding_window_attention(q, k, v, impl="splash", block_sizes=SMALL)
  chex.assert_trees_all_close(run(130), full, atol=1e-6)
  shorter = run(129)
  chex.assert_trees_all_close(shorter[:, :129], full[:, :129], atol=1e-6)
  assert float(jnp.max(jnp.abs(shorter[:, 129] - full[:, 129]))) > 1e-3


@pytest.mark.parametrize("q_len, kv_len, window, causal, segments, softcap", [
    # several 128-row tiles, ragged last one: band edges, skipped tiles
    (300, 300, 100, True, 3, 5.0),
    # bidirectional local band: padding keys right of the last query masked
    (260, 260, (40, 70), False, None, None),
    # bottom-right alignment across tiles, both ways
    (140, 300, 64, True, None, None),
    (300, 140, 64, True, None, 3.0),
])
def test_several_tiles_match_the_reference(q_len, kv_len, window, causal,
                                           segments, softcap):
  q, k, v, seg = make_inputs(2, q_len=q_len, kv_len=kv_len, num_q_heads=4,
                             num_kv_heads=2, num_segments=segments)
  errors = assert_matches_reference(
      q, k, v, impl="splash", window=window, causal=causal, segment_ids=seg,
      softcap=softcap, sinks=make_sinks(4), block_sizes=SMALL)
  assert "dsinks" in errors


def test_tiles_outside_the_band_are_never_read():
  # NaN in keys 0..127 (key tile 0): with W = 64 and 128-row tiles, query
  # tiles 2 and 3 (rows 256..511) never visit key tile 0 in the forward or
  # dQ kernels, and the dK/dV kernel never visits query tiles 0..1 (whose
  # outputs are NaN) for key tiles 2..3. Those rows and keys must equal a
  # clean run bit for bit. (Inside a visited tile splash masks scores after
  # the load: a NaN value there would reach P·V as 0·NaN, like any flash
  # kernel; rows 128..255 are NaN for that reason, not checked here.)
  q, k, v, _ = make_inputs(7, q_len=512, num_q_heads=2, num_kv_heads=1)
  bad = jnp.arange(512)[None, :, None, None] < 128
  k_nan, v_nan = jnp.where(bad, jnp.nan, k), jnp.where(bad, jnp.nan, v)
  d_out = jax.random.normal(jax.random.key(1), q.shape)

  def run(k, v):
    out, vjp = jax.vjp(lambda q, k, v: sliding_window_attention(
        q, k, v, window=64, impl="splash", block_sizes=SMALL), q, k, v)
    return out, *vjp(d_out)

  clean, poisoned = run(k, v), run(k_nan, v_nan)
  assert np.isnan(np.asarray(poisoned[0][:, :64])).all()  # the probe bites
  for name, got, want in zip(("out", "dq", "dk", "dv"), poisoned, clean):
    np.testing.assert_array_equal(np.asarray(got[:, 256:]),
                                  np.asarray(want[:, 256:]), err_msg=name)


@pytest.mark.parametrize("q_len, head_dim, expected", [
    (40, 64, 128), (1000, 64, 512), (600, 64, 128), (768, 128, 256),
    (1024, 256, 256), (4096, 128, 512)])
def test_default_block_sizes_pad_only_to_the_next_128(q_len, head_dim, expected):
  q = jnp.zeros((1, q_len, 2, head_dim))
  problem = check_attention_args(q, q, q, window=8, causal=True,
                                 segment_ids=None, softcap=None, scale=None)
  blocks = SplashBlockSizes.default(problem)
  assert blocks == SplashBlockSizes(*[expected] * 6)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(block_q=100), ValueError, r"block_q=100: expected a multiple of 128"),
    (dict(block_kv_dq=0), ValueError, r"block_kv_dq=0: expected an int >= 1"),
    (dict(block_q_dkv=128.0), ValueError, r"block_q_dkv=128\.0"),
])
def test_block_sizes_are_validated(kwargs, error, match):
  with pytest.raises(error, match=match):
    SplashBlockSizes(**kwargs)


def test_wrong_block_sizes_and_interpret_are_refused():
  q = jnp.zeros((1, 16, 2, 32))
  with pytest.raises(TypeError, match="expected pallas_kernels.SplashBlockSizes"):
    sliding_window_attention(q, q, q, window=4, impl="splash",
                             block_sizes=(128, 128))
  with pytest.raises(ValueError, match="only impl='pallas', 'mosaic' and 'splash'"):
    sliding_window_attention(q, q, q, window=4, impl="xla", interpret=True)


def test_auto_is_splash_on_tpu_and_decode_stays_xla(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert default_impl() == "splash"
  assert default_decode_impl() == "xla"  # splash has no decode kernel
  q = jax.random.normal(jax.random.key(0), (1, 1, 2, 16))
  cache = jax.random.normal(jax.random.key(1), (1, 8, 1, 16))
  kwargs = dict(q_positions=jnp.array([[7]]), kv_positions=jnp.arange(8)[None],
                window=4)
  np.testing.assert_array_equal(decode_attention(q, cache, cache, **kwargs),
                                decode_attention(q, cache, cache, impl="xla",
                                                 **kwargs))


def lowered_tpu_text(fn, *args):
  """`jax.jit(fn)` lowered for TPU on this machine (Mosaic kernels, nothing runs)."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float16])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_lowers_for_tpu_forward_and_backward(dtype, with_sinks):
  """GQA 2, H 128, window, segments, softcap, lse: compiled (not interpreted)."""
  q = jax.ShapeDtypeStruct((2, 256, 4, 128), dtype)
  k = jax.ShapeDtypeStruct((2, 256, 2, 128), dtype)
  seg = jax.ShapeDtypeStruct((2, 256), jnp.int32)
  sinks = jax.ShapeDtypeStruct((4,), jnp.float32) if with_sinks else None

  def loss(q, k, v, seg, sinks):
    out, lse = sliding_window_attention(
        q, k, v, window=100, segment_ids=seg, softcap=5.0, sinks=sinks,
        impl="splash", interpret=False, return_lse=True)
    return out.astype(jnp.float32).sum() + lse.sum()

  forward = lowered_tpu_text(loss, q, k, k, seg, sinks)
  assert re.findall(r'kernel_name = "(\w+)"', forward) == [
      "splash_mha_fwd_segmented_residuals"]
  argnums = (0, 1, 2, 4) if with_sinks else (0, 1, 2)
  backward = lowered_tpu_text(jax.grad(loss, argnums=argnums), q, k, k, seg,
                              sinks)
  assert sorted(set(re.findall(r'kernel_name = "(\w+)"', backward))) == [
      "splash_mha_dkv_segmented_no_residuals",
      "splash_mha_dq_segmented_no_residuals",
      "splash_mha_fwd_segmented_residuals"]

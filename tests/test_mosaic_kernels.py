"""Mosaic GPU (Hopper) kernels, impl="mosaic": tile skipping, CUDA lowering,
races, block sizes, refusals.

Numerical agreement over the feature grid lives in tests/test_attention_grid.py
(impl="mosaic" in bf16). Here:
- NaN probes prove tile skipping: NaN planted in the K/V rows a query tile can
  never see (before and after its band, whole 64-row tiles) must leave that
  tile's out, lse and dq finite and bit-equal to a clean run; NaN in the Q
  and dO rows that never see a key tile must leave its dk and dv so. The
  Triton (`pallas`) and `xla` paths pass the same probes; the dense
  `reference`, which multiplies every row by a zero weight, fails them (the
  control: the probe can fail).
- CUDA lowering (interpret=False, on any machine) of the forward, the
  backward and the sinks variant at every head dim: one Mosaic GPU custom
  call per kernel and no Triton call.
- The interpret mode's race detector on a forward and a backward.
The interpret-mode tests need jax >= 0.12.1 and skip, saying so, on older
jax; the lowering tests need jax >= 0.11.2.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (Band, FlashBlockSizes, MosaicBlockSizes,
                            XlaBlockSizes, sliding_window_attention,
                            window_mask)
from pallas_kernels.mask import block_fully_visible
from pallas_kernels.mosaic_attention import check_gpu
from pallas_kernels.mosaic_tiles import (DEFAULT_BLOCK_SIZES, MIN_JAX,
                                         SMEM_BYTES, check_jax_version, plgpu)
from pallas_kernels.validation import check_attention_args
from tests.attention_cases import (MOSAIC, MOSAIC_SKIP,
                                   assert_matches_reference, make_inputs,
                                   make_sinks)
from tests.cuda_lowering import lowered_cuda_text

try:  # the lowering tests' jax (>= 0.11.2) has it; they skip on older jax
  from jax.experimental.mosaic.gpu import core as mosaic_gpu_core
except ImportError:
  mosaic_gpu_core = None

TILE = 64  # the probes' tile: every impl below runs with tiles dividing it
PROBE_BLOCK_SIZES = {
    "mosaic": MosaicBlockSizes(TILE, TILE, TILE, TILE, TILE, TILE),
    "pallas": FlashBlockSizes(TILE, TILE, TILE, TILE, TILE, TILE),
    "xla": XlaBlockSizes(TILE, TILE),
    "reference": None,
}
MOSAIC_CALL = "custom_call @mosaic_gpu"
TRITON_CALL = "__gpu$xla.gpu.triton"
runs_here = pytest.mark.skipif(MOSAIC_SKIP is not None,
                               reason=MOSAIC_SKIP or "")


def _interpret_skip_reason():
  try:
    check_jax_version(interpret=True)
  except NotImplementedError as e:
    return str(e)
  return None


needs_interpret = pytest.mark.skipif(_interpret_skip_reason() is not None,
                                     reason=_interpret_skip_reason() or "")


def _lowering_skip_reason():
  try:
    check_jax_version(interpret=False)
  except NotImplementedError as e:
    return str(e)
  return None


needs_lowering = pytest.mark.skipif(_lowering_skip_reason() is not None,
                                    reason=_lowering_skip_reason() or "")

# (T, window, causal, probed query tile (out, lse, dq), probed key tile (dk,
# dv)): each has unseen whole tiles before and after the rows it meets.
PROBES = [
    (256, 64, True, 2, 1),           # causal window: past and future rows
    (320, (40, 40), False, 2, 2),    # local bidirectional band
]


def _unseen_rows(seen):
  """bool [L]: rows outside the whole tiles that cover the `seen` rows."""
  idx = np.nonzero(seen)[0]
  lo = idx.min() // TILE * TILE
  hi = -(-(idx.max() + 1) // TILE) * TILE
  unseen = np.ones(seen.shape, bool)
  unseen[lo:hi] = False
  return unseen


def _run(impl, q, k, v, d_out, d_lse, window, causal):
  """out, lse, and (dq, dk, dv) for cotangents (d_out, d_lse)."""
  def attend(q, k, v):
    return sliding_window_attention(
        q, k, v, window=window, causal=causal, impl=impl, return_lse=True,
        block_sizes=PROBE_BLOCK_SIZES[impl])

  def run(q, k, v, d_out, d_lse):
    (out, lse), vjp = jax.vjp(attend, q, k, v)
    return out, lse, vjp((d_out, d_lse))

  return jax.jit(run)(q, k, v, d_out, d_lse)


def _probe(impl, q_len, window, causal, q_tile, k_tile):
  """Runs both probes; returns {name: (all finite, equal to the clean run)}."""
  q, k, v, _ = make_inputs(3, q_len=q_len, num_q_heads=2, num_kv_heads=1,
                           head_dim=64, dtype=jnp.bfloat16)
  d_out = jax.random.normal(jax.random.key(1), q.shape, q.dtype)
  d_lse = jax.random.normal(jax.random.key(2), (1, 2, q_len), jnp.float32)
  mask = np.asarray(window_mask(q_len, window=window, causal=causal))
  rows = slice(q_tile * TILE, (q_tile + 1) * TILE)
  nan = jnp.float32(jnp.nan)
  clean = _run(impl, q, k, v, d_out, d_lse, window, causal)
  results = {}

  # Forward probe: NaN in the K/V rows query tile `tile` never sees.
  unseen = _unseen_rows(mask[rows].any(axis=0))
  assert unseen[:rows.start].any() and unseen[rows.stop:].any()
  bad = jnp.asarray(unseen)[None, :, None, None]
  probed = _run(impl, q, jnp.where(bad, nan, k).astype(k.dtype),
                jnp.where(bad, nan, v).astype(v.dtype), d_out, d_lse, window,
                causal)
  for name, got, want in (
      ("out", probed[0][:, rows], clean[0][:, rows]),
      ("lse", probed[1][:, :, rows], clean[1][:, :, rows]),
      ("dq", probed[2][0][:, rows], clean[2][0][:, rows])):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    results[name] = (bool(np.isfinite(got).all()),
                     bool(np.array_equal(got, want)))

  # Backward probe: NaN in the Q, dO and dLSE rows that never see key tile
  # `k_tile`.
  rows = slice(k_tile * TILE, (k_tile + 1) * TILE)
  unseen = _unseen_rows(mask[:, rows].any(axis=1))
  assert unseen[:rows.start].any() and unseen[rows.stop:].any()
  bad = jnp.asarray(unseen)[None, :, None, None]
  probed = _run(impl, jnp.where(bad, nan, q).astype(q.dtype), k, v,
                jnp.where(bad, nan, d_out).astype(d_out.dtype),
                jnp.where(jnp.asarray(unseen)[None, None, :], nan, d_lse),
                window, causal)
  for name, i in (("dk", 1), ("dv", 2)):
    got = np.asarray(probed[2][i][:, rows], np.float32)
    want = np.asarray(clean[2][i][:, rows], np.float32)
    results[name] = (bool(np.isfinite(got).all()),
                     bool(np.array_equal(got, want)))
  return results


@pytest.mark.parametrize("impl", [MOSAIC, "pallas", "xla"])
@pytest.mark.parametrize("q_len, window, causal, q_tile, k_tile", PROBES)
def test_nan_probes_prove_tile_skipping(impl, q_len, window, causal, q_tile,
                                        k_tile):
  results = _probe(impl, q_len, window, causal, q_tile, k_tile)
  assert results == {name: (True, True) for name in results}, results


def test_nan_probes_fail_the_dense_reference():
  # The control: the dense path weighs every row (by 0 outside the band), and
  # 0 * NaN = NaN, so out and every gradient turn non-finite (its lse, a
  # reduction over masked scores, does not).
  results = _probe("reference", *PROBES[0])
  assert results.pop("lse") == (True, True)
  assert all(not finite for finite, _ in results.values()), results


@pytest.mark.parametrize("impl", [MOSAIC])
@pytest.mark.parametrize("window, causal, kv_len", [
    (None, True, 256),        # full causal: the tiles below the diagonal
    (150, True, 256),         # a window wider than two tiles
    ((100, 80), False, 320),  # local band, T != S (bottom-right)
])
def test_interior_tiles_skip_the_mask_exactly(impl, window, causal, kv_len):
  # Multi-tile rows (the grid's are mostly one or two 64-row tiles): some
  # visited tile pairs are fully inside the band and skip the mask
  # (`mask.block_fully_visible`), the edges are masked.
  band = Band.from_window(window, causal)
  kwargs = dict(block_q=TILE, block_k=TILE, q_len=256, kv_len=kv_len,
                band=band)
  interior = [(i, j) for i in range(4) for j in range(kv_len // TILE)
              if block_fully_visible(i, j, **kwargs)]
  assert interior
  q, k, v, _ = make_inputs(7, q_len=256, kv_len=kv_len, num_q_heads=4,
                           num_kv_heads=2, head_dim=64, dtype=jnp.bfloat16)
  assert_matches_reference(q, k, v, impl=impl, window=window, causal=causal,
                           softcap=20.0, sinks=make_sinks(4),
                           block_sizes=PROBE_BLOCK_SIZES["mosaic"])


def _lower(head_dim, *, grad, sinks, segments=False, softcap=None,
           block_sizes=None):
  """The CUDA text of impl="mosaic" (forward, or forward + backward)."""
  q = jax.ShapeDtypeStruct((1, 256, 4, head_dim), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 256, 2, head_dim), jnp.bfloat16)
  seg = jnp.zeros((1, 256), jnp.int32) if segments else None
  s = jax.ShapeDtypeStruct((4,), jnp.float32) if sinks else None

  def attend(q, k, v, s):
    return sliding_window_attention(
        q, k, v, window=100, segment_ids=seg, softcap=softcap, sinks=s,
        impl="mosaic", return_lse=True, interpret=False,
        block_sizes=block_sizes)

  def loss(q, k, v, s):
    out, lse = attend(q, k, v, s)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  argnums = (0, 1, 2, 3) if sinks else (0, 1, 2)
  fn = jax.grad(loss, argnums=argnums) if grad else attend
  return lowered_cuda_text(fn, q, k, k, s)


@needs_lowering
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("variant", ["forward", "backward", "sinks"])
def test_kernels_lower_to_mosaic_gpu(head_dim, variant):
  if variant == "forward":
    text = _lower(head_dim, grad=False, sinks=False)
    kernels = 1
  elif variant == "backward":
    text = _lower(head_dim, grad=True, sinks=False, segments=True,
                  softcap=20.0)
    kernels = 3  # forward (residuals), dQ, dK/dV
  else:  # sinks: the forward's sink rows; dsinks is a jnp reduction
    text = _lower(head_dim, grad=True, sinks=True)
    kernels = 3
  assert text.count(MOSAIC_CALL) == kernels
  assert TRITON_CALL not in text and "triton" not in text.lower()


@pytest.mark.parametrize("head_dim", sorted(DEFAULT_BLOCK_SIZES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_default_block_sizes_fit_hopper_shared_memory(head_dim, dtype):
  q = jax.ShapeDtypeStruct((1, 4096, 8, head_dim), dtype)
  problem = check_attention_args(q, q, q, window=1024, causal=True,
                                 segment_ids=None, softcap=None, scale=None,
                                 sinks=None)
  blocks = MosaicBlockSizes.default(problem)
  used = blocks.smem_bytes(head_dim, dtype)
  assert max(used.values()) <= SMEM_BYTES, used
  blocks.check_fits(head_dim, dtype)


@needs_lowering
@pytest.mark.parametrize("head_dim, blocks", [
    *sorted(DEFAULT_BLOCK_SIZES.items()),
    (64, MosaicBlockSizes(192, 128, 64, 192, 128, 64, num_stages=4)),
])
def test_block_sizes_lower_using_the_shared_memory_they_count(
    head_dim, blocks, monkeypatch):
  # The defaults (and one larger set) lower with segments and sinks, the
  # largest variant of each kernel, and Mosaic's own count of each kernel's
  # shared memory (checked against Hopper's limit as it lowers) is exactly
  # `smem_bytes`, so `check_fits` refuses what Mosaic would.
  counted = []
  count = mosaic_gpu_core._smem_tree_size  # pylint: disable=protected-access

  def recording(tree):
    counted.append(count(tree))
    return counted[-1]

  monkeypatch.setattr(mosaic_gpu_core, "_smem_tree_size", recording)
  text = _lower(head_dim, grad=True, sinks=True, segments=True,
                block_sizes=blocks)
  assert text.count(MOSAIC_CALL) == 3
  used = blocks.smem_bytes(head_dim, jnp.bfloat16)
  assert counted == [used["forward"], used["dq"], used["dkv"]], counted


@needs_interpret
@pytest.mark.parametrize("num_segments", [2, None])  # masked / interior tiles
def test_race_detector_finds_no_race_forward_and_backward(num_segments):
  q, k, v, seg = make_inputs(0, q_len=192, num_q_heads=2, num_kv_heads=1,
                             head_dim=64, dtype=jnp.bfloat16,
                             num_segments=num_segments)
  # A race raises (on_race="raise") while the kernel is interpreted.
  params = plgpu.InterpretGPUParams(detect_races=True, on_race="raise")

  def loss(q, k, v, sinks):
    out, lse = sliding_window_attention(
        q, k, v, window=70, segment_ids=seg, sinks=sinks, impl="mosaic",
        return_lse=True, interpret=params,
        block_sizes=PROBE_BLOCK_SIZES["mosaic"])
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v,
                                                        make_sinks(2))
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


def test_block_sizes_are_validated():
  with pytest.raises(ValueError, match="block_q=48"):
    MosaicBlockSizes(block_q=48)
  with pytest.raises(ValueError, match="block_k_dkv=320"):
    MosaicBlockSizes(block_k_dkv=320)
  with pytest.raises(ValueError, match="num_stages=1"):
    MosaicBlockSizes(num_stages=1)
  with pytest.raises(TypeError, match="block_k=64.0"):
    MosaicBlockSizes(block_k=64.0)
  big = MosaicBlockSizes(256, 256, 256, 256, 256, 256, num_stages=4)
  with pytest.raises(ValueError, match="shared memory"):
    big.check_fits(256, jnp.bfloat16)


@runs_here
def test_refusals_are_not_implemented_errors():
  q, k, v, _ = make_inputs(0, q_len=8, head_dim=64)
  with pytest.raises(NotImplementedError, match="impl='mosaic'.*float32"):
    sliding_window_attention(q, k, v, impl="mosaic")
  q, k, v, _ = make_inputs(0, q_len=8, head_dim=320, dtype=jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="head_dim=320"):
    sliding_window_attention(q, k, v, impl="mosaic")
  q, k, v, _ = make_inputs(0, q_len=8, head_dim=64, dtype=jnp.bfloat16)
  with pytest.raises(TypeError, match="MosaicBlockSizes"):
    sliding_window_attention(q, k, v, impl="mosaic",
                             block_sizes=FlashBlockSizes())


@pytest.mark.parametrize("kind, capability, refused", [
    ("NVIDIA H100 80GB HBM3", "9.0", False),
    ("NVIDIA A100-SXM4-80GB", "8.0", True),   # no wgmma before Hopper
    ("NVIDIA B200", "10.0", True),            # nor after it (tcgen05)
])
def test_gpus_other_than_hopper_are_refused(kind, capability, refused):
  # A device as jax describes one: its kind and compute capability.
  device = types.SimpleNamespace(device_kind=kind,
                                 compute_capability=capability)
  if not refused:
    check_gpu(device)
    return
  sm = "sm" + capability.replace(".", "")
  with pytest.raises(NotImplementedError, match=f"Hopper.*{kind}.*{sm}"):
    check_gpu(device)


def test_old_jax_is_refused_naming_the_version(monkeypatch):
  monkeypatch.setattr(jax, "__version_info__", (0, 10, 2))
  need = ".".join(map(str, MIN_JAX))
  with pytest.raises(NotImplementedError, match=f"jax >= {need}"):
    check_jax_version(interpret=False)
  with pytest.raises(NotImplementedError, match="jax >= 0.12.1"):
    check_jax_version(interpret=True)

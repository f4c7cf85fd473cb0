"""Shared pieces of the attention test grid: inputs, tolerances, comparisons.

Every implementation's tests compare against `reference_attention`, which
runs in fp32 at HIGHEST precision. Tolerances live here and nowhere else.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference_attention, sliding_window_attention
from pallas_kernels.mosaic_tiles import check_jax_version


def _mosaic_skip_reason():
  """Why impl="mosaic" cannot run here (None where it can): compiled on a
  GPU, else in GPU interpret mode."""
  try:
    check_jax_version(interpret=jax.default_backend() != "gpu")
  except NotImplementedError as e:
    return str(e)
  return None


MOSAIC_SKIP = _mosaic_skip_reason()
# impl="mosaic" as a parametrize value: skipped, with the jax it needs, where
# this jax cannot run it (on CPU: no Mosaic GPU interpret mode before 0.12.1,
# e.g. the 3.11 / jax 0.10 leg).
MOSAIC = pytest.param("mosaic", id="mosaic", marks=pytest.mark.skipif(
    MOSAIC_SKIP is not None, reason=MOSAIC_SKIP or ""))

# Why these numbers (atol, rtol), compared as |x - ref| <= atol + rtol |ref|:
# - float32: kernels and the blockwise path accumulate in fp32 like the
#   reference, but sum in a different order (online softmax over blocks) and
#   the CPU matmul may use a different blocking: errors seen are ~1e-6; 2e-5
#   leaves headroom for longer rows and gradients summed over GQA groups.
#   No relative term: every fp32 quantity is held to the absolute bound.
# - bfloat16 / float16: inputs are rounded to 8 (resp. 11) mantissa bits and
#   probabilities are cast to the input dtype before the P·V matmul, as flash
#   kernels do; outputs are O(1), so an absolute 2e-2 (bf16: 2^-8 ≈ 4e-3
#   per element, summed over rows) and 5e-3 (fp16) bound them with margin.
#   Gradients accumulate more of these roundings: twice the forward
#   tolerance, plus a relative term of about five ulps (bf16 2e-2, fp16
#   5e-3), since a gradient of magnitude g is rounded to g * 2^-8 (2^-11)
#   and the absolute bound alone falls below one ulp once |g| >= 8.
# - LSE is computed in fp32 in every impl, from dtype-rounded scores.
TOLERANCES = {
    jnp.float32: dict(out=(2e-5, 0.0), lse=(2e-5, 0.0), grad=(5e-5, 0.0)),
    jnp.bfloat16: dict(out=(2e-2, 0.0), lse=(2e-2, 0.0), grad=(4e-2, 2e-2)),
    jnp.float16: dict(out=(5e-3, 0.0), lse=(5e-3, 0.0), grad=(1e-2, 5e-3)),
}


def tolerance(dtype, what) -> dict:
  """{"atol", "rtol"} for quantity `what` ("out", "lse", "grad") in `dtype`."""
  atol, rtol = TOLERANCES[jnp.dtype(dtype).type][what]
  return dict(atol=atol, rtol=rtol)


def make_inputs(seed, *, batch=1, q_len=16, kv_len=None, num_q_heads=2,
                num_kv_heads=1, head_dim=32, dtype=jnp.float32,
                num_segments=None):
  """Random q [B, T, N, H], k/v [B, S, K, H] and optional segment ids [B, T].

  Segments are contiguous runs of random lengths (packed documents).
  """
  kv_len = q_len if kv_len is None else kv_len
  kq, kk, kv, ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (batch, q_len, num_q_heads, head_dim), dtype)
  k = jax.random.normal(kk, (batch, kv_len, num_kv_heads, head_dim), dtype)
  v = jax.random.normal(kv, (batch, kv_len, num_kv_heads, head_dim), dtype)
  segment_ids = None
  if num_segments:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
      cuts = np.sort(rng.choice(np.arange(1, q_len), num_segments - 1,
                                replace=False))
      rows.append(np.searchsorted(cuts, np.arange(q_len), side="right"))
    segment_ids = jnp.asarray(np.stack(rows), jnp.int32)
  return q, k, v, segment_ids


def make_sinks(num_q_heads, dtype=jnp.float32):
  """Sink logits [N] spread over [-1, 3]: from a weak sink to one that takes
  most of a short row's mass (scores of these inputs are about N(0, 1))."""
  return jnp.linspace(-1.0, 3.0, num_q_heads).astype(dtype)


def assert_matches_reference(q, k, v, *, impl, cotangent_scale=1.0, **kwargs):
  """Forward, LSE and dq/dk/dv (and dsinks) of `impl` against the fp32 reference.

  Gradients go through `jax.vjp` with a random normal cotangent on both
  outputs, times `cotangent_scale` (> 1 gives large gradients). Gradients
  are linear in the cotangent, and so are the kernels' accumulated rounding
  errors: the absolute gradient tolerance is scaled by it too. With
  `sinks=` the sink gradient is compared too (it comes back in the sinks'
  dtype); the oracle gets the same sink values in fp32.
  Returns the largest absolute errors seen, per quantity, and the largest
  reference gradient magnitude ("grad_max").
  """
  dtype = q.dtype
  seg = kwargs.pop("segment_ids", None)
  block_sizes = kwargs.pop("block_sizes", None)  # the impl's, not the oracle's
  sinks = kwargs.pop("sinks", None)

  def fn(q, k, v, seg, sinks):
    return sliding_window_attention(q, k, v, impl=impl, return_lse=True,
                                    segment_ids=seg, block_sizes=block_sizes,
                                    sinks=sinks, **kwargs)

  def ref(q, k, v, seg, sinks):
    return reference_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
        return_lse=True, segment_ids=seg,
        sinks=None if sinks is None else sinks.astype(jnp.float32), **kwargs)

  def fwd_and_grads(f, q, k, v, seg, sinks, d_out, d_lse):
    (out, lse), vjp = jax.vjp(lambda q, k, v, sinks: f(q, k, v, seg, sinks),
                              q, k, v, sinks)
    return out, lse, vjp((d_out.astype(out.dtype), d_lse))

  # One compiled program per side: forward and gradients together.
  kd, kl = jax.random.split(jax.random.key(123))
  d_out = cotangent_scale * jax.random.normal(kd, q.shape, jnp.float32)
  d_lse = cotangent_scale * jax.random.normal(
      kl, (q.shape[0], q.shape[2], q.shape[1]))
  run = jax.jit(fwd_and_grads, static_argnums=0)
  out, lse, (*grads, d_sinks) = run(fn, q, k, v, seg, sinks, d_out, d_lse)
  out_ref, lse_ref, (*grads_ref, d_sinks_ref) = run(ref, q, k, v, seg, sinks,
                                                    d_out, d_lse)
  chex.assert_shape(out, q.shape)
  chex.assert_type(out, dtype)
  chex.assert_shape(lse, (q.shape[0], q.shape[2], q.shape[1]))
  chex.assert_type(lse, jnp.float32)
  errors = {}
  chex.assert_trees_all_close(out.astype(jnp.float32), out_ref,
                              **tolerance(dtype, "out"))
  errors["out"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - out_ref)))
  # -inf rows (nothing visible) must agree exactly; finite rows closely.
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_ref))
  finite = jnp.isfinite(lse_ref)
  chex.assert_trees_all_close(jnp.where(finite, lse, 0.0),
                              jnp.where(finite, lse_ref, 0.0),
                              **tolerance(dtype, "lse"))
  errors["lse"] = float(jnp.max(jnp.abs(jnp.where(finite, lse - lse_ref, 0.0))))
  for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
    g = g.astype(jnp.float32)
    assert np.all(np.isfinite(g)), f"{name} has non-finite values"
    tol = tolerance(dtype, "grad")
    chex.assert_trees_all_close(g, g_ref.astype(jnp.float32),
                                atol=tol["atol"] * cotangent_scale,
                                rtol=tol["rtol"],
                                custom_message=name)
    errors[name] = float(jnp.max(jnp.abs(g - g_ref)))
  errors["grad_max"] = max(float(jnp.max(jnp.abs(g))) for g in grads_ref)
  if sinks is not None:
    chex.assert_type(d_sinks, sinks.dtype)
    errors["dsinks"] = assert_sink_gradient_close(
        d_sinks, d_sinks_ref, dtype=dtype, rows=q.shape[0] * q.shape[1],
        cotangent_scale=cotangent_scale)
  return errors


def assert_sink_gradient_close(d_sinks, d_sinks_ref, *, dtype, rows,
                               cotangent_scale=1.0):
  """dsinks [N] vs the oracle's; returns the largest absolute error.

  dsinks[n] sums `rows` = B·T per-row terms p_sink·(rowsum(dO·O) − dLSE),
  each off by about the "grad" tolerance in `dtype` (O is rounded to it),
  with independent signs: the absolute bound grows as sqrt(rows).
  """
  tol = tolerance(dtype, "grad")
  d_sinks = d_sinks.astype(jnp.float32)
  chex.assert_trees_all_close(
      d_sinks, d_sinks_ref.astype(jnp.float32),
      atol=tol["atol"] * cotangent_scale * np.sqrt(rows), rtol=tol["rtol"],
      custom_message="dsinks")
  return float(jnp.max(jnp.abs(d_sinks - d_sinks_ref)))


def jaxpr_equations(jaxpr):
  """Every equation of a jaxpr, those of nested jaxprs (kernels, loops) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          yield from jaxpr_equations(sub)

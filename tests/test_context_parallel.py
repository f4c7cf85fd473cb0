"""`context_parallel_attention` on 8 simulated CPU devices equals the one-device op.

The device count must be set before JAX starts, so one worker process (a fresh
interpreter with `--xla_force_host_platform_device_count=8`) runs every case
and prints JSON: per case the largest |difference| of out and dq/dk/dv (a
random cotangent) against `sliding_window_attention(impl="reference")` on
one device, and what the compiled programs contain. The tests below assert
on that report.
"""

import json
import textwrap

import pytest

from tests.test_sharding import FAST_COMPILE, result_of, run_worker

T = 64           # tokens; 8 devices hold T/P = 8 each
FP32_ATOL = 1e-5

# name -> (window, causal, segments?, impl, mesh shape (data, context), softcap)
CASES = {
    "halo_shorter_than_block": (3, True, False, "xla", (1, 8), None),     # W-1 < T/P
    "halo_equal_to_block": (9, True, False, "xla", (1, 8), None),         # W-1 = T/P
    "multi_hop": (20, True, False, "xla", (1, 8), None),                  # W-1 > T/P
    "reach_past_device_0": (60, True, False, "xla", (1, 8), None),        # 7 hops
    "segments_across_devices": (20, True, True, "xla", (1, 8), None),
    "softcap": (9, True, True, "xla", (1, 8), 5.0),
    "reference_impl": (20, True, True, "reference", (1, 8), None),
    "pallas_impl": (9, True, True, "pallas", (1, 8), None),
    "batch_over_data_axis": (20, True, True, "xla", (2, 4), None),
    "bidirectional_halos": ((5, 3), False, True, "xla", (1, 8), None),
    "bidirectional_multi_hop": ((20, 11), False, False, "xla", (1, 8), None),
    "full_causal_gathered": (None, True, True, "xla", (1, 8), None),
    "full_bidirectional_gathered": (None, False, True, "xla", (1, 8), None),
}

WORKER = textwrap.dedent("""
    import json, re, sys
    import jax, jax.numpy as jnp
    from jax.sharding import AxisType
    from pallas_kernels import context_parallel_attention, sliding_window_attention
    from tests.attention_cases import make_inputs
    from tests.test_context_parallel import CASES, T

    def mesh_of(shape):
      return jax.make_mesh(shape, ("data", "context"), axis_types=(AxisType.Auto,) * 2)

    def collectives(fn, *args):
      text = jax.jit(fn).lower(*args).compile().as_text()
      return sorted(set(re.findall(
          r"(all-gather|all-to-all|all-reduce|reduce-scatter|collective-permute)", text)))

    q, k, v, seg = make_inputs(0, batch=2, q_len=T, num_q_heads=4, num_kv_heads=2,
                               head_dim=8, num_segments=6)
    cot = jax.random.normal(jax.random.key(1), q.shape)
    report = {}
    for name, (window, causal, segments, impl, shape, softcap) in CASES.items():
      window = tuple(window) if isinstance(window, list) else window
      options = dict(window=window, causal=causal, softcap=softcap,
                     segment_ids=seg if segments else None)
      mesh = mesh_of(tuple(shape))
      parallel = jax.jit(lambda q, k, v: context_parallel_attention(
          q, k, v, mesh=mesh, axis="context", impl=impl, **options))
      single = lambda q, k, v: sliding_window_attention(q, k, v, impl="reference", **options)
      got, got_vjp = jax.vjp(parallel, q, k, v)
      want, want_vjp = jax.vjp(single, q, k, v)
      errors = [float(jnp.max(jnp.abs(a - b)))
                for a, b in zip((got, *got_vjp(cot)), (want, *want_vjp(cot)))]
      report[name] = {"errors": errors}
      if name in ("multi_hop", "full_causal_gathered"):
        loss = lambda q, k, v: jnp.sum(parallel(q, k, v) * cot)
        report[name]["collectives"] = collectives(
            jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    try:
      context_parallel_attention(q[:, :60], k[:, :60], v[:, :60], mesh=mesh_of((1, 8)),
                                 window=9)
    except ValueError as e:
      report["ragged_error"] = str(e)
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def report():
  return result_of(run_worker(
      {}, {"XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"},
      WORKER))


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_grads_equal_one_device(report, name):
  out, dq, dk, dv = report[name]["errors"]
  assert max(out, dq, dk, dv) <= FP32_ATOL, report[name]


def test_sliding_layer_exchanges_by_collective_permute_only(report):
  """Forward and backward of a multi-hop sliding layer: ppermutes and nothing
  else; the full layer (the control) all-gathers."""
  assert report["multi_hop"]["collectives"] == ["collective-permute"]
  assert "all-gather" in report["full_causal_gathered"]["collectives"]


def test_ragged_sequence_is_a_clear_error(report):
  assert "q.shape[1]=60: expected a multiple of the 'context' axis size 8" in (
      report["ragged_error"])

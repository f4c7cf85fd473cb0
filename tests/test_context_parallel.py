"""`context_parallel_attention` on 8 simulated CPU devices equals the one-device op.

The device count must be set before JAX starts, so one worker process (a fresh
interpreter with `--xla_force_host_platform_device_count=8`) runs every case
and prints JSON: per case the largest |difference| of out and dq/dk/dv (and
dsinks in the cases with sinks; a random cotangent) against
`sliding_window_attention(impl="reference")` on one device, and what the
compiled programs contain. The tests below assert on that report. Then
training: 8 devices (fsdp x context) and 2 processes (the context axis across
them) reproduce the one-device losses.
"""

import json
import textwrap

import jax
import numpy as np
import pytest

from swajax import sharding
from swajax.training import loop as loop_lib
from swajax.cli import bench
from swajax.cli.bench import context as context_bench
from tests.test_sharding import (FAST_COMPILE, free_port, result_of, results_of,
                                 run_worker,
                                 single_device_losses)  # noqa: F401 (a fixture)
from tests.test_train import TINY_MODEL, tiny_train_config

T = 64           # tokens; 8 devices hold T/P = 8 each
FP32_ATOL = 1e-5

# name -> (window, causal, segments?, impl, mesh shape (data, context), softcap, sinks?)
CASES = {
    "halo_shorter_than_block": (3, True, False, "xla", (1, 8), None, False),     # W-1 < T/P
    "halo_equal_to_block": (9, True, False, "xla", (1, 8), None, False),         # W-1 = T/P
    "multi_hop": (20, True, False, "xla", (1, 8), None, False),                  # W-1 > T/P
    "reach_past_device_0": (60, True, False, "xla", (1, 8), None, False),        # 7 hops
    "segments_across_devices": (20, True, True, "xla", (1, 8), None, False),
    "softcap": (9, True, True, "xla", (1, 8), 5.0, False),
    "reference_impl": (20, True, True, "reference", (1, 8), None, False),
    "pallas_impl": (9, True, True, "pallas", (1, 8), None, False),
    "batch_over_data_axis": (20, True, True, "xla", (2, 4), None, False),
    "bidirectional_halos": ((5, 3), False, True, "xla", (1, 8), None, False),
    "bidirectional_multi_hop": ((20, 11), False, False, "xla", (1, 8), None, False),
    "full_causal_ring": (None, True, True, "xla", (1, 8), None, False),
    "full_bidirectional_ring": (None, False, True, "xla", (1, 8), None, False),
    "full_ring_softcap": (None, True, False, "xla", (2, 4), 5.0, False),
    "full_ring_query_tiles": (None, True, True, "xla", (1, 8), None, False),  # RING_TILE = 4
    "sinks_sliding": (9, True, True, "xla", (2, 4), None, True),  # dsinks over data x context
    "sinks_multi_hop": (20, True, False, "xla", (1, 8), None, True),
    "sinks_bidirectional": ((5, 3), False, True, "xla", (1, 8), None, True),
    "sinks_pallas_impl": (9, True, True, "pallas", (1, 8), None, True),
    "sinks_full_ring": (None, True, True, "xla", (2, 4), None, True),  # dsinks over data x context
    "sinks_bidirectional_ring_softcap": (None, False, False, "xla", (1, 8), 5.0, True),
    # the local op of each device is JAX's splash kernel (interpreted here)
    "splash_impl": (9, True, True, "splash", (1, 8), None, False),
    "sinks_splash_impl": (20, True, False, "splash", (2, 4), 5.0, True),
}
# Cases that run a second time on `jax.make_mesh`'s default mesh (Explicit
# axes since jax 0.7; the others use Auto axes): halo and ring, with and
# without segment ids, batch over data, sinks, splash.
EXPLICIT = ("halo_shorter_than_block", "multi_hop", "segments_across_devices",
            "bidirectional_halos", "full_causal_ring", "full_ring_softcap",
            "sinks_sliding", "sinks_full_ring", "splash_impl")

WORKER = textwrap.dedent("""
    import json, re, sys
    import jax, jax.numpy as jnp
    from jax.sharding import AxisType
    from pallas_kernels import context_parallel, context_parallel_attention
    from pallas_kernels import sliding_window_attention
    from tests.attention_cases import make_inputs, make_sinks
    from tests.test_context_parallel import CASES, EXPLICIT, T

    def mesh_of(shape, explicit=False):
      if explicit:  # jax.make_mesh's default axis types
        return jax.make_mesh(shape, ("data", "context"))
      return jax.make_mesh(shape, ("data", "context"), axis_types=(AxisType.Auto,) * 2)

    def collectives(fn, *args):
      text = jax.jit(fn).lower(*args).compile().as_text()
      return sorted(set(re.findall(
          r"(all-gather|all-to-all|all-reduce|reduce-scatter|collective-permute)", text)))

    q, k, v, seg = make_inputs(0, batch=2, q_len=T, num_q_heads=4, num_kv_heads=2,
                               head_dim=8, num_segments=6)
    sinks = make_sinks(q.shape[2])
    cot = jax.random.normal(jax.random.key(1), q.shape)
    report = {}
    ring_tile = context_parallel.RING_TILE
    runs = [(name, False) for name in CASES] + [(name, True) for name in EXPLICIT]
    for name, explicit in runs:
      window, causal, segments, impl, shape, softcap, with_sinks = CASES[name]
      context_parallel.RING_TILE = 4 if name == "full_ring_query_tiles" else ring_tile
      window = tuple(window) if isinstance(window, list) else window
      options = dict(window=window, causal=causal, softcap=softcap,
                     segment_ids=seg if segments else None)
      mesh = mesh_of(tuple(shape), explicit)
      args = (q, k, v, sinks) if with_sinks else (q, k, v)  # sinks: an argument, differentiated
      parallel = jax.jit(lambda q, k, v, sinks=None: context_parallel_attention(
          q, k, v, mesh=mesh, axis="context", impl=impl, sinks=sinks, **options))
      single = lambda q, k, v, sinks=None: sliding_window_attention(
          q, k, v, impl="reference", sinks=sinks, **options)
      got, got_vjp = jax.vjp(parallel, *args)
      want, want_vjp = jax.vjp(single, *args)
      errors = [float(jnp.max(jnp.abs(a - b)))
                for a, b in zip((got, *got_vjp(cot)), (want, *want_vjp(cot)))]
      key = f"{name}@explicit" if explicit else name
      report[key] = {"errors": errors, "out_spec": list(got.sharding.spec),
                     "axis_types": [t.name for t in mesh.axis_types]}
      if name in ("multi_hop", "full_causal_ring", "sinks_multi_hop", "sinks_full_ring"):
        loss = lambda *args: jnp.sum(parallel(*args) * cot)
        report[key]["collectives"] = collectives(
            jax.grad(loss, argnums=tuple(range(len(args)))), *args)
    # The issue's call, as a new user writes it: a 1-D default mesh, no
    # segment ids, eager, and inside jit under jax.set_mesh.
    mesh = jax.make_mesh((4,), ("context",))
    want = sliding_window_attention(q, k, v, window=64, impl="reference")
    eager = context_parallel_attention(q, k, v, mesh=mesh, axis="context", window=64)
    with jax.set_mesh(mesh):
      traced = jax.jit(lambda q, k, v: context_parallel_attention(
          q, k, v, mesh=jax.sharding.get_abstract_mesh(), window=64))(q, k, v)
    report["default_mesh_1d"] = {
        "errors": [float(jnp.max(jnp.abs(x - want))) for x in (eager, traced)],
        "axis_types": [t.name for t in mesh.axis_types],
        "out_spec": list(eager.sharding.spec)}
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


@pytest.mark.parametrize("name", sorted(CASES) + [f"{n}@explicit" for n in EXPLICIT])
def test_forward_and_grads_equal_one_device(report, name):
  errors = report[name]["errors"]  # out, dq, dk, dv (, dsinks)
  assert len(errors) == 5 if CASES[name.split("@")[0]][-1] else 4, report[name]
  assert max(errors) <= FP32_ATOL, report[name]
  explicit = name.endswith("@explicit")
  assert report[name]["axis_types"] == ["Explicit" if explicit else "Auto"] * 2
  if explicit:  # out is sharded as q: the sequence over "context"
    assert report[name]["out_spec"][1] == "context", report[name]


def test_the_default_one_dimensional_mesh_works(report):
  """`jax.make_mesh((4,), ("context",))` (Explicit axes), no segment ids: eager
  and inside jit under `jax.set_mesh` (the mesh as `get_abstract_mesh()`)."""
  got = report["default_mesh_1d"]
  assert got["axis_types"] == ["Explicit"]
  assert max(got["errors"]) <= FP32_ATOL, got
  assert got["out_spec"] == [None, "context", None, None], got


def test_layers_exchange_by_collective_permute_only(report):
  """Forward and backward of a multi-hop sliding layer and of a full (ring)
  layer: ppermutes, no all-gather / all-to-all of K/V, no reductions.
  (`tests/test_bench.py` checks that the halo's bytes do not grow with T.)"""
  for name in ("multi_hop", "full_causal_ring"):
    for key in (name, f"{name}@explicit"):  # on both kinds of mesh
      assert report[key]["collectives"] == ["collective-permute"], key


def test_sinks_add_one_reduction_of_their_gradient(report):
  """With sinks, the backward also sums each device's dsinks [N] (shard_map's
  transpose of the replicated input): one all-reduce, still no gather."""
  for name in ("sinks_multi_hop", "sinks_full_ring"):
    assert report[name]["collectives"] == ["all-reduce", "collective-permute"], name


def test_ragged_sequence_is_a_clear_error(report):
  assert "q.shape[1]=60: expected a multiple of the 'context' axis size 8" in (
      report["ragged_error"])


# ----- training: the sequence split over the "context" mesh axis ----------------

HYBRID_MODEL = dict(TINY_MODEL, num_layers=2, layer_windows=(16, None))

# Trains with --fsdp 2 --context-parallel 4 on 8 devices (the tiny model, and a
# hybrid one with a full layer), counting the traced calls of the context-
# parallel op (the loss alone would match if the models never called it).
TRAIN_WORKER = textwrap.dedent("""
    import json, sys
    import models.attention
    from tests.test_context_parallel import HYBRID_MODEL
    from swajax.training import loop as loop_lib
    from tests.test_train import tiny_train_config
    args = json.loads(sys.argv[1])
    calls = []
    op = models.attention.context_parallel_attention
    def counted(*a, **kw):
      calls.append(kw["window"])
      return op(*a, **kw)
    models.attention.context_parallel_attention = counted
    report = {}
    for name, overrides in (("tiny", {}), ("hybrid", {"model_overrides": HYBRID_MODEL})):
      result = loop_lib.train(tiny_train_config(f"{args['out']}/{name}", fsdp=2,
                                                 context_parallel=4, **overrides))
      report[name] = [r["loss"] for r in result.history]
    report["windows_called"] = sorted(set(map(str, calls)))
    print(json.dumps(report))
""")

# One of 2 processes (1 device each) training with the context axis across them.
PROCESS_WORKER = textwrap.dedent("""
    import json, sys
    from swajax import sharding
    args = json.loads(sys.argv[1])
    sharding.maybe_initialize_distributed(args["coordinator"], 2, args["process_id"])
    from swajax.training import loop as loop_lib
    from tests.test_train import tiny_train_config
    result = loop_lib.train(tiny_train_config(args["out"], context_parallel=2))
    print(json.dumps({"losses": [r["loss"] for r in result.history],
                      "mesh": dict(result.model.embed.embedding[...].sharding.mesh.shape)}))
""")


def test_eight_devices_fsdp_by_context_train_like_one_device(tmp_path, single_device_losses):
  got = result_of(run_worker(
      {"out": str(tmp_path)},
      {"XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"},
      TRAIN_WORKER))
  assert got["windows_called"] == ["16", "None"]  # both layer kinds went context-parallel
  np.testing.assert_allclose(got["tiny"], single_device_losses, rtol=1e-5, atol=1e-5)
  hybrid = loop_lib.train(tiny_train_config(tmp_path / "one",
                                             model_overrides=HYBRID_MODEL))
  np.testing.assert_allclose(got["hybrid"], [r["loss"] for r in hybrid.history],
                             rtol=1e-5, atol=1e-5)


def test_two_processes_split_the_sequence(tmp_path, single_device_losses):
  if "jax_cpu_collectives_implementation" not in jax.config.values:
    pytest.skip(f"jaxlib {jax.__version__} has no CPU collectives option")
  coordinator = f"localhost:{free_port()}"
  env = {"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}"}
  results = results_of([
      run_worker({"out": str(tmp_path / "run"), "coordinator": coordinator,
                  "process_id": i}, env, PROCESS_WORKER) for i in range(2)])
  for got in results:
    assert got["mesh"] == {"data": 1, "fsdp": 1, "context": 2}
    np.testing.assert_allclose(got["losses"], single_device_losses, rtol=1e-5, atol=1e-5)


def test_context_mesh_and_its_errors():
  with pytest.raises(ValueError, match="context=3: expected an int >= 1 with fsdp·context"):
    sharding.make_mesh(1, context=3)
  mesh = sharding.make_mesh(1, context=1)
  assert mesh.axis_names == ("data", "fsdp") and sharding.context_size(mesh) == 1
  with pytest.raises(ValueError, match="context_parallel=0: expected an int >= 1"):
    tiny_train_config("unused", context_parallel=0)


# ----- swajax bench context --------------------------------------------------------

def test_collective_bytes_reads_permute_shapes():
  hlo = ("  %p = f32[1,32,2,16]{3,2,1,0} collective-permute(%a), channel_id=1\n"
         "  %s = s32[1,32]{1,0} collective-permute(%b), channel_id=2\n"
         "  %g = bf16[8,4]{1,0} all-gather(%c), dimensions={0}\n")
  assert context_bench.collective_bytes(hlo, 8) == {
      "collective-permute": 32 * 2 * 16 * 4 + 32 * 4, "all-gather": 8 * 4 * 2 * 7 // 8}


def test_bench_context_halo_bytes_are_flat_in_t(tmp_path):
  """The bench reruns itself on 8 host devices: the halo sends the same bytes
  at T = 128 and 256 (W - 1 = 15 keys of K/V and their segment ids, and their
  dK/dV back), the ring twice as many at twice the T; only permutes."""
  out = tmp_path / "context.json"
  assert bench.main(["context", "--seq-lens", "128", "256", "--window", "16",
                     "--heads", "2", "--kv-heads", "1", "--head-dim", "8",
                     "--out", str(out), "--plot", str(tmp_path / "c.png")]) == 0
  small, large = json.loads(out.read_text())["rows"]
  row_bytes = 8 * 4  # K·H fp32
  assert small["halo_fwd_bytes"] == large["halo_fwd_bytes"] == 15 * (2 * row_bytes + 4)
  assert small["halo_train_bytes"] == 15 * (4 * row_bytes + 4)
  assert large["ring_fwd_bytes"] == 2 * small["ring_fwd_bytes"] == 7 * 32 * (2 * row_bytes + 4)
  for row in (small, large):
    for scheme in ("halo", "ring"):
      assert list(row[f"{scheme}_train_collectives"]) == ["collective-permute"]
  assert (tmp_path / "c.png").stat().st_size > 0

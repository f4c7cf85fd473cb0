"""Mesh and shardings; 8 simulated devices and 2 joined processes train like 1 device;
a HF checkpoint loads straight onto a 2 x 4 mesh."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from swajax import sharding
from tests.test_train import tiny_train_config, train_lib

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
# Workers compile at a low XLA optimisation level: compile time dominates.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def test_make_mesh_shape_and_errors():
  mesh = sharding.make_mesh(1)
  assert mesh.axis_names == ("data", "fsdp") and mesh.devices.shape == (1, 1)
  assert sharding.make_mesh(1) is mesh  # a static jit argument: one object
  with pytest.raises(ValueError, match="fsdp=3: expected a divisor"):
    sharding.make_mesh(3)


def test_fit_spec_drops_axes_that_do_not_divide():
  fake = type("Mesh", (), {"shape": {"data": 2, "fsdp": 4}})()
  assert sharding.fit_spec(P("fsdp", None), (8, 3), fake) == P("fsdp", None)
  assert sharding.fit_spec(P(None, "fsdp"), (8, 259), fake) == P(None, None)
  assert sharding.fit_spec(P(("data", "fsdp")), (16,), fake) == P(("data", "fsdp"))
  assert sharding.fit_spec(P(("data", "fsdp")), (4,), fake) == P(None)
  assert sharding.fit_spec(P(), (4, 4), fake) == P(None, None)


def test_distributed_is_a_no_op_without_a_coordinator(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  assert sharding.maybe_initialize_distributed() is False
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two': expected an integer"):
    sharding.maybe_initialize_distributed()


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
  """The reference: the same run (8 rows per step) on this process's one device."""
  result = train_lib.train(tiny_train_config(tmp_path_factory.mktemp("one")))
  return [r["loss"] for r in result.history]


# Runs in a fresh interpreter: the device count and jax.distributed must be set
# before JAX starts. Prints one JSON line.
WORKER = textwrap.dedent("""
    import json, sys
    from swajax import sharding
    from tests.test_train import tiny_train_config, train_lib
    args = json.loads(sys.argv[1])
    if args.get("coordinator"):
      sharding.maybe_initialize_distributed(args["coordinator"], 2, args["process_id"],
                                            timeout_s=60)
    import jax
    result = train_lib.train(tiny_train_config(args["out"], fsdp=args["fsdp"]))
    kernel = result.model.layers[0].mlp.gate_proj.kernel[...]
    print(json.dumps({
        "losses": [r["loss"] for r in result.history],
        "devices": jax.device_count(),
        "spec": list(kernel.sharding.spec) + [None] * (kernel.ndim - len(kernel.sharding.spec)),
        "mesh": dict(kernel.sharding.mesh.shape),
        "shard_shapes": sorted({tuple(s.data.shape) for s in kernel.addressable_shards}),
        "kernel_shape": list(kernel.shape),
    }))
""")


def run_worker(args: dict, env: dict, script: str = WORKER) -> subprocess.Popen:
  env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
  return subprocess.Popen([sys.executable, "-c", script, json.dumps(args)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def result_of(proc: subprocess.Popen) -> dict:
  try:
    out, err = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"worker timed out after {TIMEOUT_S}s:\n{err[-3000:]}")
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def test_eight_devices_data_by_fsdp_match_one_device(tmp_path, single_device_losses):
  proc = run_worker({"out": str(tmp_path / "run"), "fsdp": 4},
                    {"XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"})
  got = result_of(proc)
  assert got["devices"] == 8 and got["mesh"] == {"data": 2, "fsdp": 4}
  # gate_proj reads D: [D, F] split 4 ways along D, replicated over "data".
  assert got["spec"] == ["fsdp", None]
  d, f = got["kernel_shape"]
  assert got["shard_shapes"] == [[d // 4, f]]
  np.testing.assert_allclose(got["losses"], single_device_losses, rtol=1e-5, atol=1e-5)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, single_device_losses):
  if "jax_cpu_collectives_implementation" not in jax.config.values:
    pytest.skip(f"jaxlib {jax.__version__} has no CPU collectives option "
                "(jax_cpu_collectives_implementation): processes cannot all-reduce on CPU")
  coordinator = f"localhost:{free_port()}"
  env = {"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}"}
  procs = [run_worker({"out": str(tmp_path / "run"), "fsdp": 2,
                       "coordinator": coordinator, "process_id": i}, env)
           for i in range(2)]
  results = [result_of(p) for p in procs]
  for got in results:
    assert got["devices"] == 2 and got["mesh"] == {"data": 1, "fsdp": 2}
    assert got["spec"] == ["fsdp", None]
    np.testing.assert_allclose(got["losses"], single_device_losses, rtol=1e-5, atol=1e-5)


# Loads one HF checkpoint unsharded and onto a 2 x 4 ("data", "fsdp") mesh.
HF_WORKER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from swajax import sharding
    from swajax.hf_io import load_hf
    from tests.test_hf_io import forward, ids
    directory = json.loads(sys.argv[1])["directory"]
    mesh = sharding.make_mesh(4)
    single, sharded = load_hf(directory), load_hf(directory, mesh=mesh)
    params = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))
    x = ids(24)
    shards = lambda a: sorted({tuple(s.data.shape) for s in a.addressable_shards})
    kernel = sharded.layers[0].mlp.gate_proj.kernel[...]
    print(json.dumps({
        "logits_diff": float(np.max(np.abs(np.asarray(forward(single, x))
                                           - np.asarray(forward(sharded, x))))),
        "params_equal": all(np.array_equal(np.asarray(a), np.asarray(b))
                            for a, b in zip(params(single), params(sharded))),
        "meshes": sorted({str(dict(a.sharding.mesh.shape)) for a in params(sharded)}),
        "kernel_shape": list(kernel.shape),
        "kernel_shards": shards(kernel),
        "split_params": sum(shards(a) != [tuple(a.shape)] for a in params(sharded)),
        "params": len(params(sharded)),
    }))
""")


def test_hf_checkpoint_loads_onto_a_data_by_fsdp_mesh(tmp_path):
  from swajax.hf_io import save_hf
  from tests.test_hf_io import CONFIGS, random_model

  directory = save_hf(random_model(CONFIGS["qwen2"]), tmp_path / "ckpt",
                      max_shard_size="20KB")  # several files
  proc = run_worker({"directory": str(directory)},
                    {"XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"},
                    script=HF_WORKER)
  got = result_of(proc)
  assert got["params_equal"] and got["logits_diff"] <= 1e-5, got
  assert got["meshes"] == [str({"data": 2, "fsdp": 4})]
  # gate_proj [D, F]: D split 4 ways over "fsdp", replicated over "data".
  d, f = got["kernel_shape"]
  assert got["kernel_shards"] == [[d // 4, f]]
  # Every weight matrix is split (only norms and biases are replicated).
  assert got["split_params"] == 2 * 7 + 1  # 7 per layer, the tied embedding

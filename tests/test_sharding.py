"""Mesh and shardings; 8 simulated devices and 2 joined processes train like 1 device
(the 2 processes through `swajax train`: checkpoints, HF export, resume); a HF checkpoint
loads straight onto a 2 x 4 mesh."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from swajax import sharding
from swajax.training import loop as loop_lib
from tests.test_train import TINY_MODEL, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
# Workers whose XLA_FLAGS set a device count keep the compile flags
# tests/conftest.py set (compile time dominates on CPU).
FAST_COMPILE = os.environ.get("XLA_FLAGS", "")


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
  result = loop_lib.train(tiny_train_config(tmp_path_factory.mktemp("one")))
  return [r["loss"] for r in result.history]


def describe(result) -> dict:
  """What a worker reports of its run: losses, devices, and how the trained
  gate_proj kernel is laid out."""
  kernel = result.model.layers[0].mlp.gate_proj.kernel[...]
  return {
      "losses": [r["loss"] for r in result.history],
      "devices": jax.device_count(),
      "spec": list(kernel.sharding.spec) + [None] * (kernel.ndim - len(kernel.sharding.spec)),
      "mesh": dict(kernel.sharding.mesh.shape),
      "shard_shapes": sorted({tuple(s.data.shape) for s in kernel.addressable_shards}),
      "kernel_shape": list(kernel.shape),
  }


def param_checksums(model) -> dict[str, float]:
  """{parameter path: position-weighted sum} over this process's shards with
  replica_id 0: summed over the processes, each parameter's weighted sum
  (unequal weights, so a transposed or misplaced block changes it)."""
  sums = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    x = var.get_value()
    weights = 1.0 + np.arange(x.size).reshape(x.shape) % 7
    sums["/".join(map(str, path))] = sum(
        float(np.sum(np.asarray(s.data, np.float64) * weights[s.index]))
        for s in x.addressable_shards if s.replica_id == 0)
  return sums


# Runs in a fresh interpreter: the device count and jax.distributed must be set
# before JAX starts. Prints one JSON line.
WORKER = textwrap.dedent("""
    import json, sys
    from tests.test_sharding import describe
    from swajax.training import loop as loop_lib
    from tests.test_train import tiny_train_config
    args = json.loads(sys.argv[1])
    print(json.dumps(describe(loop_lib.train(tiny_train_config(args["out"],
                                                                fsdp=args["fsdp"])))))
""")

# One process of `swajax train` run by 2 processes (--fsdp 2: 1 device each),
# then --resume one step further. Prints one JSON line.
CLI_WORKER = textwrap.dedent("""
    import json, os, sys, traceback
    def exit_at_once(*exc_info):  # jax.distributed's exit barrier would wait for the other
      traceback.print_exception(*exc_info)
      sys.stderr.flush()
      os._exit(1)
    sys.excepthook = exit_at_once
    from swajax.cli import train as train_cli
    from tests.test_sharding import describe, param_checksums
    from tests.test_train import tiny_train_config
    from tests.test_train_cli import as_flags
    args = json.loads(sys.argv[1])
    results, report = [], train_cli.report
    def keep_result(result, *rest):  # the trained model, for describe()
      results.append(result)
      report(result, *rest)
    train_cli.report = keep_result
    config = tiny_train_config(args["out"], fsdp=2)
    assert train_cli.main(as_flags(config) + [
        "--sample-tokens", "4", "--coordinator-address", args["coordinator"],
        "--num-processes", "2", "--process-id", str(args["process_id"])]) == 0
    # Joined already: the resumed run (same processes) takes no coordinator.
    assert train_cli.main(["--resume", args["out"], "--steps", str(config.steps + 1),
                           "--sample-tokens", "0"]) == 0
    print(json.dumps({**describe(results[0]), "resumed": describe(results[1])["losses"],
                      "checksums": param_checksums(results[1].model)}))
""")


def run_worker(args: dict, env: dict, script: str = WORKER) -> subprocess.Popen:
  env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
  return subprocess.Popen([sys.executable, "-c", script, json.dumps(args)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def results_of(procs: list[subprocess.Popen]) -> list[dict]:
  """Each worker's last stdout line as JSON. The first worker to fail, or the
  timeout, kills them all (the others would wait for it in a collective)."""
  deadline = time.monotonic() + TIMEOUT_S
  outputs = {}
  while len(outputs) < len(procs):
    for i, proc in enumerate(procs):
      if i in outputs:
        continue
      try:
        out, err = proc.communicate(timeout=0.5)
      except subprocess.TimeoutExpired:
        if time.monotonic() < deadline:
          continue
        proc.kill()
        out, err = proc.communicate()
        err += f"\n(killed: timed out after {TIMEOUT_S}s)"
      if proc.returncode != 0:
        for other in procs:
          other.kill()
        pytest.fail(f"worker {i} exited with {proc.returncode}:\n{err[-3000:]}")
      outputs[i] = out
  return [json.loads(outputs[i].strip().splitlines()[-1]) for i in range(len(procs))]


def result_of(proc: subprocess.Popen) -> dict:
  return results_of([proc])[0]


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


def test_two_processes_train_like_one_and_export_through_the_cli(
    tmp_path, single_device_losses):
  """`swajax train` in 2 processes, parameters split across them: the losses of
  1 device, orbax checkpoints, an HF export equal to the trained parameters
  (gathered by both processes), a sample, and --resume continuing the run."""
  if "jax_cpu_collectives_implementation" not in jax.config.values:
    pytest.skip(f"jaxlib {jax.__version__} has no CPU collectives option "
                "(jax_cpu_collectives_implementation): processes cannot all-reduce on CPU")
  from swajax import load_hf

  run = tmp_path / "run"
  coordinator = f"localhost:{free_port()}"
  env = {"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}"}
  procs = [run_worker({"out": str(run), "coordinator": coordinator, "process_id": i},
                      env, script=CLI_WORKER)
           for i in range(2)]
  results = results_of(procs)
  for got in results:
    assert got["devices"] == 2 and got["mesh"] == {"data": 1, "fsdp": 2}
    assert got["spec"] == ["fsdp", None]
    np.testing.assert_allclose(got["losses"], single_device_losses, rtol=1e-5, atol=1e-5)
  records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, len(single_device_losses) + 2))
  np.testing.assert_allclose([r["loss"] for r in records[:-1]], single_device_losses,
                             rtol=1e-5, atol=1e-5)
  assert records[-1]["loss"] == pytest.approx(results[0]["resumed"][0])
  last = len(records)
  assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
      last - 1, last]
  assert (run / "sample.txt").read_text().startswith("def ")
  # The export of the resumed run holds its parameters: the checksums of the
  # two processes' shards add up to those of the loaded (one-device) model.
  trained = {name: sum(got["checksums"][name] for got in results)
             for name in results[0]["checksums"]}
  loaded = param_checksums(load_hf(run / "hf"))
  assert loaded.keys() == trained.keys()
  for name, value in trained.items():
    assert loaded[name] == pytest.approx(value, rel=1e-9), name


# The checkpoint onto meshes from `jax.make_mesh` with its defaults (Explicit
# axes): eager, jitted, under `jax.set_mesh` (logits, the cached forward of
# generation, gradients), and a ("data", "fsdp", "context") mesh whose
# attention runs context-parallel; each against the one-device model.
EXPLICIT_MESH_REPORT = """
    def explicit_mesh_report(single, directory):
      import jax.numpy as jnp
      from jax.sharding import NamedSharding, PartitionSpec as P
      want = np.asarray(forward(single, ids(24)))
      diff = lambda got, want=want: float(np.max(np.abs(np.asarray(got) - want)))
      loss = lambda m, x: jnp.mean(m(x) ** 2)
      grads = lambda m, x: jax.tree.leaves(nnx.state(nnx.grad(loss)(m, x), nnx.Param))
      positions = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))
      cached = nnx.jit(lambda m, x, p, c: m.forward_with_cache(x, positions=p, cache=c)[0])
      mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
      model = load_hf(directory, mesh=mesh)
      x = jax.device_put(ids(24), NamedSharding(mesh, P("data")))  # B = 2
      report = {"axis_types": [t.name for t in mesh.axis_types],
                "eager": diff(model(ids(24))),
                "jit": diff(nnx.jit(lambda m, x: m(x))(model, x))}
      with jax.set_mesh(mesh):
        report["set_mesh"] = diff(nnx.jit(lambda m, x: m(x))(model, x))
        report["cached"] = diff(cached(model, x, positions, model.init_cache(2, 24)))
        got = grads(model, x)
      report["grads"] = max(diff(g, np.asarray(w))
                            for g, w in zip(got, grads(single, ids(24))))
      mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "context"))
      model = load_hf(directory, mesh=mesh)
      with jax.set_mesh(mesh):
        x = jax.device_put(ids(24), NamedSharding(mesh, P("data", "context")))
        report["context"] = diff(nnx.jit(lambda m, x: m(x))(model, x))
      return report
"""

# Loads one HF checkpoint unsharded, onto a 2 x 4 ("data", "fsdp") mesh with
# Auto axes, and onto the default meshes above.
HF_WORKER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from swajax import sharding
    from swajax.io.hf import load_hf
    from tests.test_hf_io import forward, ids
""") + textwrap.dedent(EXPLICIT_MESH_REPORT) + textwrap.dedent("""
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
        "explicit": explicit_mesh_report(single, directory),
    }))
""")


def test_hf_checkpoint_loads_onto_a_data_by_fsdp_mesh(tmp_path):
  from swajax.io.hf import save_hf
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
  explicit = got["explicit"]  # jax.make_mesh's default meshes
  assert explicit.pop("axis_types") == ["Explicit", "Explicit"]
  assert max(explicit.values()) <= 1e-5, explicit


# ----- Experts on the "fsdp" axis ------------------------------------------------

TINY_MOE = dict(TINY_MODEL, num_experts=4, experts_per_token=2)

# Loads a Mixtral and a gpt-oss checkpoint onto a 2 x 4 mesh, then trains the
# tiny gpt-oss with --fsdp 4. Prints one JSON line.
MOE_WORKER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from swajax import sharding
    from swajax.io.hf import load_hf
    from tests.test_hf_io import forward, ids
    from tests.test_sharding import TINY_MOE
    from swajax.training import loop as loop_lib
    from tests.test_train import tiny_train_config
    args = json.loads(sys.argv[1])
    params = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))
    shards = lambda a: sorted({tuple(s.data.shape) for s in a.addressable_shards})
    report = {}
    for family, directory in args["checkpoints"].items():
      single = load_hf(directory)
      sharded = load_hf(directory, mesh=sharding.make_mesh(4))
      report[family] = {
          "params_equal": all(np.array_equal(np.asarray(a), np.asarray(b))
                              for a, b in zip(params(single), params(sharded))),
          "logits_diff": float(np.max(np.abs(np.asarray(forward(single, ids(24)))
                                             - np.asarray(forward(sharded, ids(24)))))),
          "gate_up_shards": shards(sharded.layers[0].mlp.gate_up[...]),
          "down_shards": shards(sharded.layers[0].mlp.down[...])}
    result = loop_lib.train(tiny_train_config(
        args["out"], model="gpt_oss_tiny", model_overrides=TINY_MOE, fsdp=4))
    report["losses"] = [r["loss"] for r in result.history]
    report["aux"] = [r["router_aux_loss"] for r in result.history]
    report["trained_gate_up_shards"] = shards(result.model.layers[0].mlp.gate_up[...])
    print(json.dumps(report))
""")


def test_experts_shard_over_fsdp_in_loading_and_training(tmp_path):
  """Expert weights [E, ...] are split over "fsdp" along E: a Mixtral (per-
  expert tensors) and a gpt-oss (fused, interleaved) checkpoint load onto a
  2 x 4 mesh equal to the unsharded load, and `--fsdp 4` training of a MoE
  model matches one device."""
  from swajax.io.hf import save_hf
  from tests.test_hf_io import CONFIGS, random_model

  checkpoints = {family: str(save_hf(random_model(CONFIGS[family]),
                                     tmp_path / family, max_shard_size="40KB"))
                 for family in ("mixtral", "gpt_oss")}
  one = loop_lib.train(tiny_train_config(
      tmp_path / "one", model="gpt_oss_tiny", model_overrides=TINY_MOE))
  proc = run_worker({"checkpoints": checkpoints, "out": str(tmp_path / "run")},
                    {"XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"},
                    script=MOE_WORKER)
  got = result_of(proc)
  for family in checkpoints:
    config = CONFIGS[family]
    e, d, f = config.num_experts, config.hidden_size, config.intermediate_size
    assert got[family]["params_equal"] and got[family]["logits_diff"] <= 1e-5, got
    assert got[family]["gate_up_shards"] == [[e // 4, d, 2, f]], got
    assert got[family]["down_shards"] == [[e // 4, f, d]], got
  e, d, f = 4, TINY_MOE["hidden_size"], TINY_MOE["intermediate_size"]
  assert got["trained_gate_up_shards"] == [[e // 4, d, 2, f]]
  np.testing.assert_allclose(got["losses"], [r["loss"] for r in one.history],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["aux"], [r["router_aux_loss"] for r in one.history],
                             rtol=1e-5, atol=1e-5)

"""`save_hf` / `load_hf`: round trips (one file or split by max_shard_size), the
tensor table, block reads for mesh loading, and clear errors on bad checkpoints
(corrupt, truncated, missing shard, misshaped, unexpected tensors, unsupported
config) and bad arguments, with nothing half-written on a failed save. Loading
onto an 8-device mesh: tests/test_sharding.py."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from models import (CausalLM, gpt_oss_tiny, llama_tiny, mistral_tiny,
                    mixtral_tiny, qwen2_tiny, qwen3_tiny)
from swajax import sharding
from swajax.io import hf as hf_io, hf_folder, hf_tensors
from swajax.io.hf import load_hf, save_hf
from swajax.io.hf_tensors import tensor_table

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
             num_q_heads=4, num_kv_heads=2, head_dim=16)
CONFIGS = {
    "mistral": mistral_tiny(**SMALL, layer_windows=(8, 8)),
    "qwen2": qwen2_tiny(**SMALL, layer_windows=(None, 8), tie_word_embeddings=True),
    "qwen3": qwen3_tiny(**SMALL, layer_windows=(8, None)),
    "llama": llama_tiny(**SMALL, layer_windows=(None, None)),
    # Experts: Mixtral's per-expert tensors fill parts of our stacked ones;
    # gpt-oss's fused gate_up interleaves gate and up; sinks.
    "mixtral": mixtral_tiny(**SMALL, layer_windows=(8, 8)),
    "gpt_oss": gpt_oss_tiny(**SMALL, layer_windows=(8, None)),
}


def random_model(config, seed=0, dtype=jnp.float32):
  """A CausalLM with every parameter random (norm weights and biases too)."""
  model = CausalLM(config, dtype=dtype, param_dtype=dtype, attn_impl="reference",
                   rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
           for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, noisy))
  return model


@nnx.jit
def forward(model, ids):
  return model(ids)


def ids(seq=24):
  return jax.random.randint(jax.random.key(9), (2, seq), 0, 128, jnp.int32)


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("tied", [False, True])
def test_table_covers_every_parameter(family, tied):
  import dataclasses
  config = dataclasses.replace(CONFIGS[family], tie_word_embeddings=tied)
  model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
  ours = {path: var.get_value().shape
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  table = tensor_table(config)
  assert {spec.path for spec in table} == set(ours)
  # Each element of each parameter comes from exactly one HF tensor (one
  # whole, or Mixtral's per-expert parts), with the element count it holds.
  covered = {path: np.zeros(shape, int) for path, shape in ours.items()}
  for spec in table:
    part = spec.select(covered[spec.path])  # a view
    assert part.size == np.prod(spec.hf_shape), spec
    part += 1
  assert all((c == 1).all() for c in covered.values())


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_save_then_transformers_gives_same_logits(family, tmp_path):
  model = random_model(CONFIGS[family])
  save_hf(model, tmp_path / "ckpt")
  assert not (tmp_path / "ckpt" / hf_folder.INDEX_FILE).exists()  # one file
  _assert_transformers_logits(model, tmp_path / "ckpt")


def _assert_transformers_logits(model, directory):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      directory, attn_implementation="eager").eval()
  x = ids(40)
  with torch.no_grad():
    expected = hf(torch.tensor(np.asarray(x), dtype=torch.long)).logits.numpy()
  # x is 5 windows long: equal logits mean transformers slides where we do.
  assert float(np.max(np.abs(np.asarray(forward(model, x)) - expected))) <= 1e-4


def test_save_splits_files_above_max_shard_size(tmp_path):
  model = random_model(CONFIGS["mistral"])
  table = tensor_table(model.config)
  sizes = {spec.hf_name: 4 * int(np.prod(spec.hf_shape)) for spec in table}
  limit = sum(sizes.values()) // 3
  directory = save_hf(model, tmp_path / "ckpt", max_shard_size=limit)
  index = json.loads((directory / "model.safetensors.index.json").read_text())
  assert index["metadata"]["total_size"] == sum(sizes.values())
  assert list(index["weight_map"]) == [spec.hf_name for spec in table]
  files = sorted(set(index["weight_map"].values()))
  n = len(files)
  assert n >= 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors"
                              for i in range(1, n + 1)]
  assert not (directory / "model.safetensors").exists()
  for file in files:
    stored = load_file(directory / file)
    assert sorted(stored) == sorted(
        name for name, f in index["weight_map"].items() if f == file)
    # Within the limit, unless a single tensor exceeds it on its own.
    assert sum(x.nbytes for x in stored.values()) <= limit or len(stored) == 1
  chex.assert_trees_all_equal(nnx.state(load_hf(directory), nnx.Param),
                              nnx.state(model, nnx.Param))
  _assert_transformers_logits(model, directory)


@pytest.mark.parametrize("size, expected", [
    (123, 123), ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), (" 1.5 kb", 1500),
    ("2GiB", 2 * 2**30)])
def test_parse_size(size, expected):
  assert hf_folder.parse_size(size, "max_shard_size") == expected


@pytest.mark.parametrize("size, error", [
    ("5XB", ValueError), ("GB", ValueError), ("-1GB", ValueError), (0, ValueError),
    (1.5, TypeError), (True, TypeError), (None, TypeError)])
def test_bad_max_shard_size_writes_nothing(tmp_path, size, error):
  with pytest.raises(error, match="max_shard_size="):
    save_hf(random_model(CONFIGS["llama"]), tmp_path / "ckpt", max_shard_size=size)
  assert _leftovers(tmp_path) == []


QWEN2_UNTIED = qwen2_tiny(**SMALL, layer_windows=(None, 8))  # biases and lm_head


@settings(max_examples=40)
@given(data=st.data())
def test_read_block_is_the_block_of_the_converted_tensor(data):
  """Any block of any tensor, read alone, equals that block of the whole
  converted tensor; cutting only the first dimension of each HF dimension's
  run (how shardings cut) reads exactly the block's elements."""
  table = tensor_table(QWEN2_UNTIED)
  spec = table[data.draw(st.integers(0, len(table) - 1))]
  model = nnx.eval_shape(lambda: CausalLM(QWEN2_UNTIED, rngs=nnx.Rngs(0)))
  shape = _variable_shape(model, spec.path)
  stored = np.random.default_rng(0).normal(size=spec.hf_shape).astype(np.float32)
  whole = (stored.T if spec.transposed else stored).reshape(shape)
  index = []
  for size in shape:
    start = data.draw(st.integers(0, size - 1))
    index.append(slice(start, data.draw(st.integers(start + 1, size))))
  index = tuple(index)
  reads = []
  class Recorder:
    def __getitem__(self, hf_index):
      reads.append(stored[hf_index].size)
      return stored[hf_index]
  block = hf_tensors.read_block(Recorder(), spec, shape, index)
  np.testing.assert_array_equal(block, whole[index])
  # Sharding-like cut: one dimension, the first of its run.
  dim = data.draw(st.integers(0, len(shape) - 1))
  runs_first = {run[0] for run in hf_tensors._runs(shape, (
      spec.hf_shape[::-1] if spec.transposed else spec.hf_shape))}
  if dim in runs_first:
    cut = tuple(index[d] if d == dim else slice(None) for d in range(len(shape)))
    reads.clear()
    np.testing.assert_array_equal(
        hf_tensors.read_block(Recorder(), spec, shape, cut), whole[cut])
    assert reads == [whole[cut].size]


@settings(max_examples=40)
@given(data=st.data())
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_expert_parameters_read_back_block_by_block(family, data):
  """The experts' layouts (parts of a stacked parameter, interleaved gate /
  up): any block of a parameter read from its HF tensors, as `_to_hf` wrote
  them from a random parameter, is that block of the parameter."""
  config = CONFIGS[family]
  model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
  by_path = {}
  for spec in tensor_table(config):
    if spec.path[-2] not in ("attn", "embed") and "mlp" in spec.path:
      by_path.setdefault(spec.path, []).append(spec)
  path = data.draw(st.sampled_from(sorted(by_path, key=str)))
  shape = _variable_shape(model, path)
  ours = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  stored = {spec: ("file", hf_tensors.to_hf(spec, spec.select(ours)))
            for spec in by_path[path]}
  for spec, (_, tensor) in stored.items():
    assert tensor.shape == spec.hf_shape
  index = []
  for size in shape:
    start = data.draw(st.integers(0, size - 1))
    index.append(slice(start, data.draw(st.integers(start + 1, size))))
  index = tuple(index)
  np.testing.assert_array_equal(
      hf_tensors.read_parameter_block(stored, shape, index), ours[index])


def test_expert_layouts_are_transformers_layouts():
  """Negative control of the layouts: gpt-oss's gate / up are interleaved
  (gate = [..., ::2]); Mixtral's w1 is the gate, w3 the up projection."""
  config = CONFIGS["gpt_oss"]
  spec = next(s for s in tensor_table(config)
              if s.hf_name.endswith("layers.0.mlp.experts.gate_up_proj"))
  ours = np.random.default_rng(0).normal(size=(4, 64, 2, 96)).astype(np.float32)
  hf = hf_tensors.to_hf(spec, ours)
  np.testing.assert_array_equal(hf[..., ::2], ours[:, :, 0])
  np.testing.assert_array_equal(hf[..., 1::2], ours[:, :, 1])
  specs = {s.hf_name.rsplit(".", 2)[-2]: s for s in tensor_table(CONFIGS["mixtral"])
           if ".experts.3." in s.hf_name and "layers.1." in s.hf_name}
  assert specs["w1"].part == (3, None, 0, None) and specs["w3"].part == (3, None, 1, None)
  assert specs["w2"].part == (3, None, None) and specs["w2"].path[-1] == "down"


def _variable_shape(model, path):
  return hf_tensors.variable_at(model, path).get_value().shape


def test_load_onto_a_one_device_mesh_and_bad_meshes(tmp_path):
  model = random_model(CONFIGS["qwen3"])
  directory = save_hf(model, tmp_path / "ckpt")
  mesh = sharding.make_mesh(1)
  loaded = load_hf(directory, mesh=mesh)
  chex.assert_trees_all_equal(nnx.state(loaded, nnx.Param),
                              nnx.state(model, nnx.Param))
  kernel = loaded.layers[0].mlp.gate_proj.kernel[...]
  assert kernel.sharding == jax.sharding.NamedSharding(mesh, P("fsdp", None))
  with pytest.raises(ValueError, match=r"mesh.axis_names=\('x',\).*missing \['data', 'fsdp'\]"):
    load_hf(directory, mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",)))
  with pytest.raises(TypeError, match="mesh: expected a jax.sharding.Mesh"):
    load_hf(directory, mesh="data,fsdp")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
  model = random_model(CONFIGS["qwen3"], dtype=dtype)
  loaded = load_hf(save_hf(model, tmp_path / "ckpt"), attn_impl="reference")
  assert loaded.config == model.config
  chex.assert_trees_all_equal(nnx.state(loaded, nnx.Param),
                              nnx.state(model, nnx.Param))
  chex.assert_type(loaded.layers[0].attn.q_proj.kernel[...], dtype)
  converted = load_hf(tmp_path / "ckpt", dtype=jnp.float32)
  chex.assert_type(converted.layers[0].attn.q_proj.kernel[...], jnp.float32)


def test_sharded_checkpoint_loads_and_missing_shard_raises(tmp_path):
  model = random_model(CONFIGS["mistral"])
  directory = save_hf(model, tmp_path / "ckpt")
  tensors = load_file(directory / "model.safetensors")
  (directory / "model.safetensors").unlink()
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
  for shard, shard_names in shards.items():
    save_file({n: tensors[n] for n in shard_names}, directory / shard,
              metadata={"format": "pt"})
  index = {"metadata": {}, "weight_map": {
      n: shard for shard, shard_names in shards.items() for n in shard_names}}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index))
  chex.assert_trees_all_equal(nnx.state(load_hf(directory), nnx.Param),
                              nnx.state(model, nnx.Param))
  (directory / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
    load_hf(directory)


@pytest.fixture
def saved(tmp_path):
  """A saved qwen2 checkpoint directory and its tensors."""
  directory = save_hf(random_model(CONFIGS["qwen2"]), tmp_path / "ckpt")
  return directory, load_file(directory / "model.safetensors")


def _rewrite(directory, tensors):
  save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_misshaped_tensor(saved):
  directory, tensors = saved
  name = "model.layers.1.self_attn.k_proj.weight"
  _rewrite(directory, {**tensors, name: tensors[name][:-1]})
  with pytest.raises(ValueError, match=f"{name}.*shape \\(31, 64\\).*\\(32, 64\\)"):
    load_hf(directory)


def test_unexpected_tensor(saved):
  directory, tensors = saved
  name = "model.layers.0.mlp.extra.weight"
  _rewrite(directory, {**tensors, name: tensors["model.norm.weight"]})
  with pytest.raises(ValueError, match=f"unexpected tensor '{name}'"):
    load_hf(directory)


def test_tensors_transformers_ignores_are_skipped(saved):
  # RoPE buffers of older checkpoints, and a tied lm_head stored anyway.
  directory, tensors = saved
  original = forward(load_hf(directory), ids())
  embed = tensors["model.embed_tokens.weight"]
  _rewrite(directory, {
      **tensors, "lm_head.weight": embed.copy(),
      "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)})
  np.testing.assert_array_equal(forward(load_hf(directory), ids()), original)


def test_tied_lm_head_that_differs_raises(saved):
  # transformers would untie them: a model the config does not describe.
  directory, tensors = saved
  embed = tensors["model.embed_tokens.weight"]
  _rewrite(directory, {**tensors, "lm_head.weight": embed + 1})
  with pytest.raises(ValueError, match="'lm_head.weight' differs"):
    load_hf(directory)


def test_missing_tensor(saved):
  directory, tensors = saved
  name = "model.layers.0.self_attn.q_proj.bias"
  _rewrite(directory, {k: v for k, v in tensors.items() if k != name})
  with pytest.raises(ValueError, match=f"'{name}' is missing"):
    load_hf(directory)


def test_integer_tensor(saved):
  directory, tensors = saved
  name = "model.norm.weight"
  _rewrite(directory, {**tensors, name: tensors[name].astype(np.int32)})
  with pytest.raises(ValueError, match=f"'{name}' has dtype I32"):
    load_hf(directory)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(saved, damage):
  directory, _ = saved
  file = directory / "model.safetensors"
  data = file.read_bytes()
  if damage == "truncate":
    file.write_bytes(data[: len(data) // 2])
  else:
    file.write_bytes(b"\xff" * 16 + data[16:])
  with pytest.raises(ValueError, match="model.safetensors: not a readable"):
    load_hf(directory)


def test_missing_files(saved, tmp_path):
  directory, _ = saved
  (directory / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    load_hf(directory)
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_hf(tmp_path / "nowhere")


def test_unsupported_config(saved):
  directory, _ = saved
  config = json.loads((directory / "config.json").read_text())
  (directory / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
  with pytest.raises(ValueError, match="hidden_act='gelu'"):
    load_hf(directory)


def _leftovers(parent):
  return sorted(p.name for p in parent.iterdir())


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
  # A config HF cannot express fails before writing.
  model = random_model(llama_tiny(**SMALL, layer_windows=(None, 4)))
  with pytest.raises(ValueError, match="no sliding window"):
    save_hf(model, tmp_path / "a")
  assert _leftovers(tmp_path) == []
  # A failure while writing removes the temporary directory.
  def broken_save(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(hf_folder, "save_file", broken_save)
  with pytest.raises(OSError, match="disk full"):
    save_hf(random_model(CONFIGS["llama"]), tmp_path / "b")
  assert _leftovers(tmp_path) == []


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
  first, second = random_model(CONFIGS["llama"], 0), random_model(CONFIGS["llama"], 1)
  save_hf(first, tmp_path / "ckpt")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_hf(second, tmp_path / "ckpt")
  save_hf(second, tmp_path / "ckpt", overwrite=True)
  assert _leftovers(tmp_path) == ["ckpt"]
  chex.assert_trees_all_equal(nnx.state(load_hf(tmp_path / "ckpt"), nnx.Param),
                              nnx.state(second, nnx.Param))

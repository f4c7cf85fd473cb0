"""gpt-oss checkpoints with MXFP4 experts (as OpenAI released them): `load_hf`
dequantizes them exactly as transformers 5.24 does (its own function, and its
`Mxfp4Config(dequantize=True)` load), block by block onto a mesh, and saves
them back as plain floats; negative controls of the nibble order and the
scale bias; clear errors for broken or other quantized checkpoints."""

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from models import ModelConfig
from models.hf_config import mxfp4_expert_layers
from swajax.io import hf_folder, hf_tensors, mxfp4
from swajax.io.hf import load_hf, save_hf
from swajax.io.hf_tensors import tensor_table
from tests.test_hf_io import (CONFIGS, _assert_transformers_logits, forward, ids,
                              random_model)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

CONFIG = CONFIGS["gpt_oss"]  # D 64, F 96, 4 experts, 2 layers
# The released checkpoints' list: only the experts are quantized.
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                 "model.embed_tokens", "lm_head"]
PROJECTIONS = ("gate_up_proj", "down_proj")
# Scale bytes 2 ** -9 .. 2 ** -3 (weights up to 0.75): finite, forward O(1).
SCALES = (118, 125)


def write_mxfp4_checkpoint(directory, *, seed=0, not_converted=NOT_CONVERTED):
  """A tiny gpt-oss checkpoint in `directory` whose experts are random MXFP4
  blocks and scales in the released layout (the other tensors float, from a
  random model); returns its tensors."""
  save_hf(random_model(CONFIG, seed), directory)
  tensors = load_file(directory / hf_folder.SINGLE_FILE)
  quantization = {"quant_method": "mxfp4", "modules_to_not_convert": not_converted}
  layers = mxfp4_expert_layers({**CONFIG.to_hf(), "quantization_config": quantization},
                               CONFIG.num_layers)
  rng = np.random.default_rng(seed)
  for spec in tensor_table(CONFIG, layers):
    if spec.mxfp4:
      (blocks, b_shape), (scales, s_shape) = spec.stored_tensors().items()
      del tensors[spec.hf_name]
      tensors[blocks] = rng.integers(0, 256, b_shape, dtype=np.uint8)
      tensors[scales] = rng.integers(*SCALES, s_shape, dtype=np.uint8)
  save_file(tensors, directory / hf_folder.SINGLE_FILE, metadata={"format": "pt"})
  _set_quantization(directory, quantization)
  return tensors


def _set_quantization(directory, quantization):
  config = json.loads((directory / "config.json").read_text())
  (directory / "config.json").write_text(
      json.dumps({**config, "quantization_config": quantization}))


@pytest.fixture
def checkpoint(tmp_path):
  directory = tmp_path / "mxfp4"
  return directory, write_mxfp4_checkpoint(directory)


def transformers_dequantized(tensors, name, dtype=torch.float32) -> np.ndarray:
  """transformers' own dequantization of `name`'s blocks and scales, fp32."""
  return convert_moe_packed_tensors(
      torch.from_numpy(tensors[name + "_blocks"]),
      torch.from_numpy(tensors[name + "_scales"]), dtype=dtype).float().numpy()


def ours_in_hf_layout(model, name) -> np.ndarray:
  """Our loaded parameter of HF tensor `name` in transformers' layout, fp32."""
  spec = next(s for s in tensor_table(model.config) if s.hf_name == name)
  return hf_tensors.to_hf(spec, np.asarray(
      hf_tensors.variable_at(model, spec.path)[...].astype(jnp.float32)))


def expert_names(layers=range(CONFIG.num_layers)):
  return [f"model.layers.{i}.mlp.experts.{p}" for i in layers for p in PROJECTIONS]


@pytest.mark.parametrize("dtype, torch_dtype", [(jnp.float32, torch.float32),
                                                (jnp.bfloat16, torch.bfloat16)])
def test_dequantized_experts_equal_transformers_bit_for_bit(checkpoint, dtype,
                                                            torch_dtype):
  directory, tensors = checkpoint
  model = load_hf(directory, dtype=dtype)
  for name in expert_names():
    expected = transformers_dequantized(tensors, name, torch_dtype)
    np.testing.assert_array_equal(ours_in_hf_layout(model, name), expected)
    assert 0 < np.abs(expected).max() <= 6 * 2.0 ** (SCALES[1] - 1 - 127)
  # The float tensors are read as they are (the biases, the router).
  bias = "model.layers.1.mlp.experts.gate_up_proj_bias"
  np.testing.assert_array_equal(ours_in_hf_layout(model, bias),
                                tensors[bias].astype(dtype).astype(np.float32))


@pytest.mark.parametrize("wrong", ["high_nibble_first", "scale_bias_126", "scale_bias_128"])
def test_wrong_conventions_fail_the_comparison(checkpoint, wrong):
  """Negative controls: reading byte j's high nibble as element 2j (the
  bytes' nibbles swapped), or another scale bias (the scales shifted by one)
  is far from transformers' dequantization."""
  _, tensors = checkpoint
  name = expert_names()[0]
  blocks, scales = tensors[name + "_blocks"], tensors[name + "_scales"].astype(np.int32)
  if wrong == "high_nibble_first":
    blocks = (blocks << 4) | (blocks >> 4)
  else:
    scales = scales + (1 if wrong == "scale_bias_126" else -1)
  ours = mxfp4.dequantize(blocks, scales.astype(np.uint8))
  expected = transformers_dequantized(tensors, name)
  assert ours.shape == expected.shape
  assert np.mean(ours != expected) > 0.5


def test_transformers_loads_the_same_model(checkpoint):
  """transformers' own load with Mxfp4Config(dequantize=True) on CPU has the
  same expert weights and logits."""
  directory, _ = checkpoint
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      directory, attn_implementation="eager", dtype=torch.float32,
      quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
  ours = load_hf(directory, dtype=jnp.float32)
  for i in range(CONFIG.num_layers):
    experts = hf.model.layers[i].mlp.experts
    for p in PROJECTIONS:
      np.testing.assert_array_equal(
          ours_in_hf_layout(ours, f"model.layers.{i}.mlp.experts.{p}"),
          getattr(experts, p).detach().numpy())
  x = ids(40)
  with torch.no_grad():
    expected = hf(torch.tensor(np.asarray(x), dtype=torch.long)).logits.numpy()
  assert float(np.max(np.abs(np.asarray(forward(ours, x)) - expected))) <= 1e-4


def test_save_writes_plain_floats_that_transformers_loads(checkpoint, tmp_path):
  directory, _ = checkpoint
  model = load_hf(directory)
  saved = save_hf(model, tmp_path / "float")
  config = json.loads((saved / "config.json").read_text())
  assert "quantization_config" not in config
  stored = load_file(saved / hf_folder.SINGLE_FILE)
  assert sorted(stored) == sorted(spec.hf_name for spec in tensor_table(model.config))
  assert all(x.dtype == np.float32 for x in stored.values())
  chex.assert_trees_all_equal(nnx.state(load_hf(saved), nnx.Param),
                              nnx.state(model, nnx.Param))
  _assert_transformers_logits(model, saved)


def test_expert_blocks_are_read_by_experts(checkpoint):
  """A block of experts (what one device of an "fsdp" mesh reads) reads the
  blocks and scales of those experts only, one expert at a time, and equals
  that block of the whole dequantized parameter."""
  directory, tensors = checkpoint
  model = load_hf(directory, dtype=jnp.float32)
  spec = next(s for s in tensor_table(CONFIG, frozenset({0}))
              if s.hf_name == "model.layers.0.mlp.experts.gate_up_proj")
  assert spec.mxfp4
  reads = []

  class Recorder:
    def __init__(self, name):
      self.name = name

    def __getitem__(self, index):
      reads.append((self.name, index))
      return tensors[self.name][index]

  (blocks, _), (scales, _) = spec.stored_tensors().items()
  stored = {spec: ("file", mxfp4.Mxfp4Tensor(Recorder(blocks), Recorder(scales),
                                             spec.hf_shape, np.float32))}
  whole = np.asarray(model.layers[0].mlp.gate_up[...])
  index = (slice(1, 3), slice(None), slice(None), slice(None))
  np.testing.assert_array_equal(
      hf_tensors.read_parameter_block(stored, whole.shape, index), whole[index])
  assert reads == [(name, slice(e, e + 1)) for e in (1, 2) for name in (blocks, scales)]


# Loads the MXFP4 checkpoint unsharded and onto a 2 x 4 ("data", "fsdp") mesh.
MESH_WORKER = """
import json, sys
import jax, numpy as np
from flax import nnx
from swajax import sharding
from swajax.io.hf import load_hf
directory = json.loads(sys.argv[1])["directory"]
single, sharded = load_hf(directory), load_hf(directory, mesh=sharding.make_mesh(4))
params = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))
shards = lambda a: sorted({tuple(s.data.shape) for s in a.addressable_shards})
print(json.dumps({
    "params_equal": all(np.array_equal(np.asarray(a), np.asarray(b))
                        for a, b in zip(params(single), params(sharded))),
    "gate_up_shards": shards(sharded.layers[0].mlp.gate_up[...]),
    "down_shards": shards(sharded.layers[1].mlp.down[...])}))
"""


def test_loads_onto_an_eight_device_mesh_like_unsharded(checkpoint):
  from tests.test_sharding import FAST_COMPILE, result_of, run_worker
  directory, _ = checkpoint
  got = result_of(run_worker(
      {"directory": str(directory)},
      {"XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"},
      script=MESH_WORKER))
  e, d, f = CONFIG.num_experts, CONFIG.hidden_size, CONFIG.intermediate_size
  assert got == {"params_equal": True, "gate_up_shards": [[e // 4, d, 2, f]],
                 "down_shards": [[e // 4, f, d]]}, got


@pytest.mark.parametrize("patterns, layers", [
    (NOT_CONVERTED, {0, 1}), (None, {0, 1}), (["model.layers.1"], {0}),
    (["model.layers.1.mlp.experts"], {0}), ([r"model\.layers\.\d+\.mlp"], set()),
    (["experts"], set()), (["model.layers.1.mlp.exp"], {0, 1})])
def test_modules_to_not_convert_as_transformers(patterns, layers):
  """Which layers' experts are MXFP4: transformers' `should_convert_module`
  rule (the experts it would replace), e.g. "model.layers.1" names layer 1's
  modules, "model.layers.1.mlp.exp" no module."""
  from transformers.quantizers.quantizers_utils import should_convert_module
  hf = {**CONFIG.to_hf(), "quantization_config": {
      "quant_method": "mxfp4", "modules_to_not_convert": patterns}}
  ModelConfig.from_hf(hf)  # accepted
  assert mxfp4_expert_layers(hf, CONFIG.num_layers) == layers
  assert layers == {i for i in range(CONFIG.num_layers) if should_convert_module(
      f"model.layers.{i}.mlp.experts", patterns)}


def test_experts_not_converted_stay_float(tmp_path):
  """modules_to_not_convert naming layer 1's MLP: its experts are stored as
  floats and read as they are, layer 0's dequantized."""
  directory = tmp_path / "mixed"
  tensors = write_mxfp4_checkpoint(directory, not_converted=["model.layers.1.mlp"])
  model = load_hf(directory)
  for name in expert_names([0]):
    assert name not in tensors
    np.testing.assert_array_equal(ours_in_hf_layout(model, name),
                                  transformers_dequantized(tensors, name))
  for name in expert_names([1]):
    assert name + "_blocks" not in tensors
    np.testing.assert_array_equal(ours_in_hf_layout(model, name), tensors[name])


def _rewrite(directory, tensors):
  save_file(tensors, directory / hf_folder.SINGLE_FILE, metadata={"format": "pt"})


SCALES_0 = "model.layers.0.mlp.experts.gate_up_proj_scales"
BLOCKS_1 = "model.layers.1.mlp.experts.down_proj_blocks"


@pytest.mark.parametrize("damage, match", [
    (lambda t: {k: v for k, v in t.items() if k != SCALES_0},
     f"'{SCALES_0}' is missing"),
    (lambda t: {**t, BLOCKS_1: t[BLOCKS_1][:, :, :2]},
     rf"'{BLOCKS_1}' has shape \(4, 64, 2, 16\): expected \(4, 64, 3, 16\)"),
    (lambda t: {**t, SCALES_0: t[SCALES_0].astype(np.float32)},
     f"'{SCALES_0}' has dtype F32: expected U8"),
    (lambda t: {**t, "model.layers.0.mlp.experts.gate_up_proj": np.zeros(
        (4, 64, 192), np.float32)},
     "unexpected tensor 'model.layers.0.mlp.experts.gate_up_proj'"),
    (lambda t: {**t, SCALES_0: np.full_like(t[SCALES_0], 255)},
     r"'model.layers.0.mlp.experts.gate_up_proj' \(MXFP4, dequantized\) has non-finite"),
])
def test_broken_mxfp4_checkpoint(checkpoint, damage, match):
  directory, tensors = checkpoint
  _rewrite(directory, damage(tensors))
  with pytest.raises(ValueError, match=match):
    load_hf(directory)


@pytest.mark.parametrize("quantization, match", [
    ({"quant_method": "fp8"}, "quant_method='fp8'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method='bitsandbytes'"),
    ({"quant_method": "mxfp4", "group_size": 64}, r"\['group_size'\]: unknown MXFP4 key"),
    ({"quant_method": "mxfp4", "modules_to_not_convert": "lm_head"},
     "modules_to_not_convert'\\]='lm_head'"),
    ({"quant_method": "mxfp4", "modules_to_not_convert": ["model.("]}, "not a regex"),
    ({"quant_method": "mxfp4", "dequantize": "yes"}, "expected a bool"),
])
def test_other_quantizations_are_refused(checkpoint, quantization, match):
  directory, _ = checkpoint
  _set_quantization(directory, quantization)
  with pytest.raises(ValueError, match=match):
    load_hf(directory)


def test_mxfp4_needs_gpt_oss_and_sizes_of_whole_blocks():
  hf = {**CONFIGS["mixtral"].to_hf(), "quantization_config": {"quant_method": "mxfp4"}}
  with pytest.raises(ValueError, match="quant_method='mxfp4'.*model_type='mixtral'"):
    ModelConfig.from_hf(hf)
  hf = {**CONFIG.to_hf(), "intermediate_size": 80,
        "quantization_config": {"quant_method": "mxfp4"}}
  with pytest.raises(ValueError, match="intermediate_size=80 with MXFP4.*multiple of 32"):
    ModelConfig.from_hf(hf)

"""Hugging Face checkpoints: `load_hf` and `save_hf` (safetensors, no torch).

`tensor_table(config)` is the one map between HF tensor names and our
parameters; `_read_block` (HF -> ours) and `_to_hf` hold every transpose.
Loading builds the model abstractly (`nnx.eval_shape`) and fills it one tensor
at a time, each device reading only its own block when a mesh is given, so
the host never holds two copies of the weights. Saving gathers one tensor at
a time and splits the files above `max_shard_size`, as transformers does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from models import CausalLM, ModelConfig
from models.config import BLOCKS
from models.hf_config import mxfp4_expert_layers, read_config_json
from swajax import mxfp4
from swajax import sharding as sharding_lib
from swajax.dtypes import DTYPES
from swajax.peft_io import load_adapter

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F32": jnp.float32, "BF16": jnp.bfloat16, "F16": jnp.float16}
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5's save_pretrained default
PROGRESS_MIN_BYTES = 10**9  # load_hf / save_hf show progress on stderr from here
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor: its name and shape, our parameter path, and the layout.

  transposed: HF stores nn.Linear weights [out, in]; ours read [in, ...] (e.g.
  q_proj [N*H, D] <-> kernel [D, N, H]). Otherwise only a reshape (biases
  [N*H] <-> [N, H], norms and the embedding as they are).
  interleaved: the last HF axis interleaves our last two (gpt-oss's fused
  experts): our [..., 2, F] (gate, up) is HF [..., F * 2], index 2f + g.
  part: the HF tensor fills only this index of our parameter (Mixtral's
  per-expert tensors in our stacked experts): an int selects along an axis,
  None keeps it whole; None: the whole parameter.
  mxfp4: the checkpoint stores this float tensor [E, In, Out] in MXFP4, as
  `{hf_name}_blocks` and `{hf_name}_scales` (uint8, `swajax.mxfp4`; gpt-oss's
  released experts).
  """

  hf_name: str
  path: tuple
  hf_shape: tuple[int, ...]
  transposed: bool
  interleaved: bool = False
  part: tuple[int | None, ...] | None = None
  mxfp4: bool = False

  def stored_tensors(self) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensors holding this one: name -> shape."""
    if not self.mxfp4:
      return {self.hf_name: self.hf_shape}
    blocks, scales = mxfp4.stored_shapes(self.hf_shape)
    return {f"{self.hf_name}_blocks": blocks, f"{self.hf_name}_scales": scales}

  def select(self, x):
    """The part of our whole parameter `x` this tensor holds."""
    if self.part is None:
      return x
    return x[tuple(slice(None) if p is None else p for p in self.part)]


# Our DecoderLayer norm -> its HF module name (`models.config.BLOCKS`).
NORM_HF_NAMES = {"input_norm": "input_layernorm",
                 "post_attn_norm": "post_attention_layernorm",
                 "pre_mlp_norm": "pre_feedforward_layernorm",
                 "post_mlp_norm": "post_feedforward_layernorm"}
# Our MLP projection -> its HF name, where it differs (Starcoder2's GELU MLP).
MLP_HF_NAMES = {"gelu": {"up_proj": "c_fc", "down_proj": "c_proj"}}


def _mixtral_experts(hf: str, ours: tuple, config: ModelConfig) -> list[TensorSpec]:
  """Mixtral's `block_sparse_moe`: gate [E, D]; per expert e, w1 (gate) and
  w3 (up) [F, D] and w2 [D, F], each filling expert e of our stacked
  gate_up [E, D, 2, F] and down [E, F, D]."""
  d, f = config.hidden_size, config.intermediate_size
  hf, moe = hf + "block_sparse_moe.", (*ours, "mlp")
  specs = [TensorSpec(hf + "gate.weight", (*moe, "router", "kernel"),
                      (config.num_experts, d), True)]
  for e in range(config.num_experts):
    expert = f"{hf}experts.{e}."
    specs += [
        TensorSpec(expert + "w1.weight", (*moe, "gate_up"), (f, d), True,
                   part=(e, None, 0, None)),
        TensorSpec(expert + "w2.weight", (*moe, "down"), (d, f), True,
                   part=(e, None, None)),
        TensorSpec(expert + "w3.weight", (*moe, "gate_up"), (f, d), True,
                   part=(e, None, 1, None))]
  return specs


def _gpt_oss_experts(hf: str, ours: tuple, config: ModelConfig) -> list[TensorSpec]:
  """gpt-oss's `mlp`: router [E, D] + bias; experts' gate_up_proj [E, D, 2F]
  (gate and up interleaved) + bias [E, 2F], down_proj [E, F, D] + bias [E, D],
  as our gate_up [E, D, 2, F], down [E, F, D] and their biases."""
  d, f, e = config.hidden_size, config.intermediate_size, config.num_experts
  hf, moe = hf + "mlp.", (*ours, "mlp")
  return [
      TensorSpec(hf + "router.weight", (*moe, "router", "kernel"), (e, d), True),
      TensorSpec(hf + "router.bias", (*moe, "router", "bias"), (e,), False),
      TensorSpec(hf + "experts.gate_up_proj", (*moe, "gate_up"), (e, d, 2 * f),
                 False, interleaved=True),
      TensorSpec(hf + "experts.gate_up_proj_bias", (*moe, "gate_up_bias"),
                 (e, 2 * f), False, interleaved=True),
      TensorSpec(hf + "experts.down_proj", (*moe, "down"), (e, f, d), False),
      TensorSpec(hf + "experts.down_proj_bias", (*moe, "down_bias"), (e, d),
                 False)]


# Model type -> its experts' HF tensors (a `models.moe.MoE` at layer `ours`).
EXPERT_LAYOUTS = {"mixtral": _mixtral_experts, "gpt_oss": _gpt_oss_experts}


def tensor_table(config: ModelConfig, mxfp4_layers=frozenset()) -> list[TensorSpec]:
  """Every tensor of a HF checkpoint of `config`, in file order.

  mxfp4_layers: the layers whose experts' gate_up and down projections are
  stored in MXFP4 (`TensorSpec.mxfp4`; `models.hf_config.mxfp4_expert_layers`);
  their biases stay float.
  """
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  n, k, h = config.num_q_heads, config.num_kv_heads, config.head_dim
  qd, kd = n * h, k * h

  def norm_specs(hf_name, path, dim=d, bias=config.norm_bias):
    return [TensorSpec(f"{hf_name}.weight", (*path, "weight"), (dim,), False)] + (
        [TensorSpec(f"{hf_name}.bias", (*path, "bias"), (dim,), False)]
        if bias else [])

  def linear_specs(hf_name, path, out_in, bias):
    """An nn.Linear [out, in] (and its bias [out]) <-> our Einsum at `path`."""
    return [TensorSpec(f"{hf_name}.weight", (*path, "kernel"), out_in, True)] + (
        [TensorSpec(f"{hf_name}.bias", (*path, "bias"), out_in[:1], False)]
        if bias else [])

  attention = (("qkv", qd + 2 * kd),) if config.fused_projections else (
      ("q", qd), ("k", kd), ("v", kd))
  mlp_names = MLP_HF_NAMES.get(config.mlp, {})
  mlp = [("down_proj", (d, f))]
  if config.fused_projections:
    mlp.insert(0, ("gate_up_proj", (2 * f, d)))
  else:
    mlp[:0] = [(name, (f, d)) for name in (
        ("up_proj",) if config.mlp == "gelu" else ("gate_proj", "up_proj"))]
  block_norms = BLOCKS[config.block]
  table = [TensorSpec("model.embed_tokens.weight", ("embed", "embedding"),
                      (v, d), False)]
  for i in range(config.num_layers):
    hf, ours = f"model.layers.{i}.", ("layers", i)
    layer = []
    if "input_norm" in block_norms:
      layer += norm_specs(hf + "input_layernorm", (*ours, "input_norm"))
    for name, size in attention:
      layer += linear_specs(hf + f"self_attn.{name}_proj",
                            (*ours, "attn", f"{name}_proj"), (size, d),
                            config.attention_bias)
    layer += linear_specs(hf + "self_attn.o_proj", (*ours, "attn", "o_proj"),
                          (d, qd), config.attention_out_bias)
    if config.qk_norm is not None:
      per_head = config.qk_norm == "head"
      for name, size in (("q", qd), ("k", kd)):
        layer += norm_specs(hf + f"self_attn.{name}_norm",
                            (*ours, "attn", f"{name}_norm"),
                            h if per_head else size, bias=False)
    if config.attn_sinks:
      layer.append(TensorSpec(hf + "self_attn.sinks", (*ours, "attn", "sinks"),
                              (n,), False))
    for name in block_norms[1:] if "input_norm" in block_norms else block_norms:
      layer += norm_specs(hf + NORM_HF_NAMES[name], (*ours, name))
    if config.num_experts:
      layer += [dataclasses.replace(spec, mxfp4=i in mxfp4_layers and spec.path[-1]
                                    in ("gate_up", "down"))
                for spec in EXPERT_LAYOUTS[config.model_type](hf, ours, config)]
    for name, out_in in mlp if not config.num_experts else ():
      layer += linear_specs(hf + "mlp." + mlp_names.get(name, name),
                            (*ours, "mlp", name), out_in, config.mlp_bias)
    table += layer
  table += norm_specs("model.norm", ("norm",))
  if not config.tie_word_embeddings:
    table.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), (v, d), True))
  return table


def _to_hf(spec: TensorSpec, x: np.ndarray) -> np.ndarray:
  """Our (part of a) parameter `x` in the HF layout of `spec`."""
  if spec.interleaved:
    x = np.swapaxes(x, -1, -2)  # [..., 2, F] -> [..., F, 2]
  if spec.transposed:
    return np.ascontiguousarray(x.reshape(spec.hf_shape[::-1]).T)
  return x.reshape(spec.hf_shape)


def _variable(model, path) -> nnx.Variable:
  node = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


# ----- Loading ------------------------------------------------------------------

def _tensor_files(directory: Path) -> dict[str, Path]:
  """HF tensor name -> the safetensors file holding it (single or sharded)."""
  index = directory / INDEX_FILE
  single = directory / SINGLE_FILE
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index}: expected JSON with a 'weight_map' ({e!r})") from e
    files = {name: directory / shard for name, shard in weight_map.items()}
    for shard in sorted(set(files.values())):
      if not shard.is_file():
        raise FileNotFoundError(f"{shard}: shard listed in {index} is missing")
    return files
  if single.is_file():
    with _open(single) as f:
      return {name: single for name in f.keys()}
  raise FileNotFoundError(
      f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors "
      "checkpoints are read; convert .bin files with transformers first)")


def _open(file: Path):
  try:
    return safe_open(os.fspath(file), framework="numpy")
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def load_hf(path, *, dtype=None, attn_impl: str = "auto", mesh=None,
            adapter=None) -> CausalLM:
  """A `CausalLM` from a HF checkpoint directory (config.json + safetensors).

  path: the folder (config.json, and model.safetensors or
  model-*-of-*.safetensors with model.safetensors.index.json).
  dtype: parameter and compute dtype; None keeps the checkpoint's (the dtype of
  model.embed_tokens.weight).
  attn_impl: the model's attention impl ("auto", "pallas", "xla", "reference").
  mesh: None puts every parameter on the default device (uncommitted, as
  `jnp.asarray`). A ("data", "fsdp") `jax.sharding.Mesh`
  (`swajax.sharding.make_mesh`) places each parameter directly with the
  NamedSharding of its partition annotation (`swajax.sharding.state_shardings`,
  the rule training uses): tensor by tensor, each device's block is read on
  its own with safetensors' `get_slice` from the memory-mapped file, so
  neither the host nor any device ever holds a whole tensor it does not own
  (a column block of a row-major tensor is a strided read: every row is
  visited, only its block copied; a block replicated over "data" is read once
  per device holding it).
  adapter: a PEFT LoRA adapter folder (adapter_config.json +
  adapter_model.safetensors, written by PEFT or by swajax) to add onto the
  base (`swajax.peft_io.load_adapter`; the adapters go to the default device).

  gpt-oss checkpoints with MXFP4 experts (quantization_config quant_method
  "mxfp4", as OpenAI released them) load dequantized into `dtype` (None: the
  embedding's dtype), value for value as transformers'
  `Mxfp4Config(dequantize=True)` (`swajax.mxfp4`): the model is a float
  model (`save_hf` writes it as plain float tensors). The blocks and scales
  are read by experts, those of a device's block on their own with `mesh=`.

  Raises FileNotFoundError (with the path) for a missing config or shard,
  TypeError for a mesh that is not a jax Mesh, ValueError for one without the
  ("data", "fsdp") axes, an unsupported config, an unreadable file, or the
  first missing, unexpected, misshaped, non-float or non-finite (NaN/inf,
  checked per tensor as it is read) tensor. Extra tensors
  transformers also ignores are skipped: RoPE `rotary_emb.inv_freq` buffers,
  and a tied lm_head.weight equal to the embedding (`_ignorable`).
  """
  directory = Path(path)
  if mesh is not None:
    sharding_lib.check_mesh(mesh)
  hf_config = read_config_json(os.fspath(directory))
  config = ModelConfig.from_hf(hf_config)
  files = _tensor_files(directory)
  table = tensor_table(config, mxfp4_expert_layers(hf_config, config.num_layers))
  expected = {name for spec in table for name in spec.stored_tensors()}
  for spec in table:
    for name in spec.stored_tensors():
      if name not in files:
        raise ValueError(f"{directory}: tensor {name!r} is missing")
  for name in files:
    if name not in expected and not _ignorable(name, files, config):
      raise ValueError(
          f"{files[name]}: unexpected tensor {name!r} for this "
          f"{config.model_type} config")
  if dtype is None:
    first = table[0].hf_name
    with _open(files[first]) as f:
      dtype = _stored_dtype(files[first], f.get_slice(first), first)
  dtype = _check_float(dtype, "dtype")
  model = nnx.eval_shape(lambda: CausalLM(
      config, dtype=dtype, param_dtype=dtype, attn_impl=attn_impl,
      rngs=nnx.Rngs(0)))
  shardings = {} if mesh is None else _param_shardings(model, mesh)
  by_path = {}  # our parameter -> its HF tensors (several: Mixtral's experts)
  for spec in table:
    by_path.setdefault(spec.path, []).append(spec)
  progress = Progress(f"load_hf {directory}", sum(
      math.prod(spec.hf_shape) * dtype.itemsize for spec in table))
  with contextlib.ExitStack() as stack:
    opened = {}  # file -> (open safetensors file, its tensor names)

    def stored(spec):
      slices = []
      for name, shape in spec.stored_tensors().items():
        file = files[name]
        if file not in opened:
          f = stack.enter_context(_open(file))
          opened[file] = (f, set(f.keys()))
        f, names = opened[file]
        if name not in names:
          raise ValueError(f"{file}: tensor {name!r} is missing")
        slices.append(_checked_slice(file, f, name, shape, spec.mxfp4))
      if spec.mxfp4:
        return file, mxfp4.Mxfp4Tensor(*slices, spec.hf_shape, dtype)
      return file, slices[0]

    for path, specs in by_path.items():
      var = _variable(model, path)
      var.set_value(_read({spec: stored(spec) for spec in specs},
                          var.get_value().shape, dtype, shardings.get(path)))
      progress.add(sum(math.prod(spec.hf_shape) for spec in specs) * dtype.itemsize)
  progress.close()
  if adapter is not None:
    load_adapter(model, adapter)
  return model


class Progress:
  """Bytes done of `total` on stderr, for checkpoints of PROGRESS_MIN_BYTES
  or more: one rewritten line on a terminal, else a line per 10%."""

  def __init__(self, label: str, total: int):
    self.label, self.total, self.done, self.shown = label, total, 0, -1
    self.on = total >= PROGRESS_MIN_BYTES and jax.process_index() == 0

  def add(self, nbytes: int) -> None:
    self.done += nbytes
    if not self.on:
      return
    tty = sys.stderr.isatty()
    tenth = 10 * self.done // max(self.total, 1)
    if tty or tenth > self.shown:
      self.shown = tenth
      line = f"{self.label}: {self.done / 1e9:.1f}/{self.total / 1e9:.1f} GB"
      sys.stderr.write(("\r" + line) if tty else line + "\n")
      sys.stderr.flush()

  def close(self) -> None:
    if self.on and sys.stderr.isatty():
      sys.stderr.write("\n")


# RoPE inverse frequencies older transformers versions saved as buffers: they
# follow from the config, and transformers ignores them too.
ROTARY_BUFFER = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _ignorable(name: str, files: dict[str, Path], config: ModelConfig) -> bool:
  """Whether an extra tensor `name` may be left unread.

  RoPE buffers may. So may lm_head.weight under tie_word_embeddings when it
  equals model.embed_tokens.weight; when it differs, transformers unties the
  two (a different model than the config names), so that raises here.
  """
  if ROTARY_BUFFER.search(name):
    return True
  if name != "lm_head.weight" or not config.tie_word_embeddings:
    return False
  embed = "model.embed_tokens.weight"
  if embed not in files:
    return False  # reported as missing
  with _open(files[name]) as f, _open(files[embed]) as g:
    if np.array_equal(f.get_tensor(name), g.get_tensor(embed)):
      return True
  raise ValueError(
      f"{files[name]}: 'lm_head.weight' differs from {embed!r} but the "
      "config says tie_word_embeddings=true (transformers would untie them: "
      "set tie_word_embeddings to false in config.json to load it untied)")


def _param_shardings(model, mesh) -> dict[tuple, jax.sharding.NamedSharding]:
  """Parameter path -> its NamedSharding on `mesh`."""
  params = nnx.state(model, nnx.Param)
  return {path: var.get_value() for path, var in
          nnx.to_flat_state(sharding_lib.state_shardings(params, mesh))}


def _stored_dtype(file: Path, stored, name: str):
  dtype = stored.get_dtype()
  if dtype not in SAFETENSORS_DTYPES:
    raise ValueError(f"{file}: {name!r} has dtype {dtype}: expected one of "
                     f"{sorted(SAFETENSORS_DTYPES)}")
  return SAFETENSORS_DTYPES[dtype]


def _checked_slice(file: Path, f, name: str, shape, quantized: bool):
  """Tensor `name` of the open file `f` (a lazy safetensors slice), its shape
  and dtype (float, or uint8 when `quantized`: MXFP4 blocks and scales)
  checked."""
  stored = f.get_slice(name)
  if tuple(stored.get_shape()) != shape:
    raise ValueError(
        f"{file}: tensor {name!r} has shape {tuple(stored.get_shape())}: "
        f"expected {shape}")
  if not quantized:
    _stored_dtype(file, stored, name)
  elif stored.get_dtype() != "U8":
    raise ValueError(f"{file}: {name!r} has dtype {stored.get_dtype()}: "
                     "expected U8 (MXFP4 blocks and scales)")
  return stored


def _read(stored: dict, shape, dtype, sharding) -> jax.Array:
  """Our parameter of `shape` in `dtype` from its HF tensors `stored`
  ({spec: (file, slice)}): on the default device (sharding None), or placed
  with `sharding`, each device's block read on its own (`_read_block`)."""

  def read(index):  # MXFP4 blocks come dequantized into dtype: no copy
    return _read_parameter_block(stored, shape, index).astype(dtype, copy=False)

  try:
    if sharding is None:
      return jnp.asarray(read((slice(None),) * len(shape)))
    return jax.make_array_from_callback(shape, sharding, read)
  except SafetensorError as e:
    names = ", ".join(repr(spec.hf_name) for spec in stored)
    raise ValueError(f"cannot read {names} ({e})") from e


def _read_parameter_block(stored: dict, shape, index) -> np.ndarray:
  """Block `index` of our parameter of `shape`, assembled from the blocks of
  its HF tensors that fall in it (one tensor, or `TensorSpec.part`s), each
  checked finite as it is read."""
  bounds = [i.indices(size)[:2] for i, size in zip(index, shape)]
  out = None
  for spec, (file, tensor) in stored.items():
    part = spec.part or (None,) * len(shape)
    if any(p is not None and not lo <= p < hi for p, (lo, hi) in zip(part, bounds)):
      continue
    free = [axis for axis, p in enumerate(part) if p is None]
    block = _read_block(tensor, spec, tuple(shape[a] for a in free),
                        tuple(index[a] for a in free))
    if not np.isfinite(block).all():
      raise ValueError(f"{file}: tensor {spec.hf_name!r}"
                       f"{' (MXFP4, dequantized)' if spec.mxfp4 else ''} has non-finite values "
                       f"({int(np.sum(~np.isfinite(block)))} NaN/inf): a broken checkpoint")
    if spec.part is None:
      return block
    if out is None:
      out = np.empty([hi - lo for lo, hi in bounds], block.dtype)
    out[tuple(slice(None) if p is None else p - lo
              for p, (lo, _) in zip(part, bounds))] = block
  return out


def _read_block(stored, spec: TensorSpec, shape, index) -> np.ndarray:
  """Block `index` (slices of our `shape`) of a HF tensor, read from `stored`.

  stored: anything numpy-sliceable in the HF layout (a safetensors slice,
  an `mxfp4.Mxfp4Tensor`).
  Our shape reshapes the HF tensor (transposed first when spec.transposed):
  each HF dimension splits into a run of our dimensions (q_proj: N*H -> N, H).
  A run is read as whole rows of its first dimension, [start * rest,
  stop * rest) along the HF dimension, and its other dimensions are cut from
  what was read. Only the first dimension of a run is ever sharded in
  `models/`, so exactly the block is read.
  """
  oriented = spec.hf_shape[::-1] if spec.transposed else spec.hf_shape
  hf_index, read_shape, local_index = [], [], []
  runs = _runs(shape, oriented)
  for run in runs:
    if spec.interleaved and run is runs[-1]:  # [2, F] as F * 2: read whole
      hf_index.append(slice(None))
      read_shape += [shape[d] for d in run]
      local_index += [index[d] for d in run]
      continue
    start, stop, _ = index[run[0]].indices(shape[run[0]])
    rest = [shape[d] for d in run[1:]]
    hf_index.append(slice(start * math.prod(rest), stop * math.prod(rest)))
    read_shape += [stop - start, *rest]
    local_index += [slice(None), *(index[d] for d in run[1:])]
  if spec.transposed:
    hf_index.reverse()
  x = np.asarray(stored[tuple(hf_index)])
  x = x.T if spec.transposed else x
  if spec.interleaved:  # [..., F * 2] -> [..., 2, F]
    x = np.swapaxes(x.reshape(*x.shape[:-1], -1, 2), -1, -2)
  return x.reshape(read_shape)[tuple(local_index)]


def _runs(shape, oriented) -> list[list[int]]:
  """Our dimensions grouped by the HF dimension they split, in order:
  [D, N, H] of [D, N*H] -> [[0], [1, 2]]."""
  runs, d = [], 0
  for size in oriented:
    run = [d]
    while math.prod(shape[i] for i in run) < size:
      run.append(run[-1] + 1)
    d = run[-1] + 1
    runs.append(run)
  return runs


def _check_float(dtype, name):
  if not any(jnp.dtype(dtype) == d for d in DTYPES.values()):
    raise ValueError(f"{name}={dtype}: expected float32, bfloat16 or float16")
  return jnp.dtype(dtype)


# ----- Saving -------------------------------------------------------------------

def save_hf(model: CausalLM, path, *, overwrite: bool = False,
            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
            tokenizer=None) -> Path:
  """Writes config.json + safetensors that transformers loads as `model`.

  Tensors keep the model's parameter dtype, in `tensor_table` order (a model
  loaded from gpt-oss's MXFP4 checkpoint is a float model: its experts are
  written as plain float tensors, config.json has no quantization_config). As
  transformers' `save_pretrained`: up to max_shard_size bytes (an int, or a
  string such as "5GB", "500MB", "2GiB") one model.safetensors; above it,
  model-00001-of-0000N.safetensors files, a new one started whenever the next
  tensor would overflow the current one (a tensor bigger than max_shard_size
  gets a file of its own), and model.safetensors.index.json with
  {"metadata": {"total_size"}, "weight_map": {tensor: file}}.

  tokenizer: a `swajax.data` tokenizer (None: none is recorded). Its
  bos/eos/pad ids go into config.json and a generation_config.json (so
  transformers' `generate` stops at eos too); an `HFTokenizer`'s
  tokenizer.json (and its tokenizer_config.json / special_tokens_map.json)
  is copied; a `ByteTokenizer` is recorded as "swajax_tokenizer": "bytes" in
  config.json (what `swajax generate` reads).

  Written like `save_pretrained`: into the folder `path` (created with the
  normal umask), replacing only the files it writes, each written to a
  temporary file and renamed over the old one; weight files of an earlier
  save that the new one does not have (other shards, a stale index) are
  removed, so shards and index stay consistent; other files (a README, your
  own files) are left alone. A failure removes the temporary files (and the
  folder when save_hf created it). A `path` that holds a checkpoint already
  raises FileExistsError unless overwrite=True; a path that is a file raises
  NotADirectoryError.

  Parameters sharded over a mesh are gathered to the host one tensor at a
  time; the host holds at most one file's tensors.

  Several processes (jax.distributed): every process must call save_hf with
  the same model and arguments. A parameter spanning devices of several
  processes is gathered by all of them together (`process_allgather`, in
  `tensor_table` order), so every host holds at most one file's tensors;
  only process 0 checks `path` and writes. No process returns before process
  0 has written the files (or failed): process 0 raises its own error, the
  others an OSError naming `path`.
  """
  path = Path(path)
  limit = parse_size(max_shard_size, "max_shard_size")
  config = model.config
  hf_config = config.to_hf()  # raises before anything is written
  table = tensor_table(config)
  arrays = {spec.hf_name: _variable(model, spec.path)[...] for spec in table}
  sizes = {spec.hf_name: math.prod(spec.hf_shape) * arrays[spec.hf_name].dtype.itemsize
           for spec in table}
  files = _split_into_files(table, sizes, limit)
  hf_config["dtype"] = str(arrays["model.embed_tokens.weight"].dtype)
  texts, copies = _tokenizer_files(tokenizer, hf_config)
  # One file's tensors at a time, gathered (on every process) when drawn.
  contents = ({spec.hf_name: _to_hf(spec, _host_array(spec.select(arrays[spec.hf_name])))
               for spec in specs} for specs in files.values())
  error = None
  if jax.process_index() == 0:
    try:
      _write_folder(path, overwrite, hf_config, files, sizes, contents, texts, copies)
    except Exception as e:  # raised below, once the other processes know
      error = e
  if jax.process_count() > 1:
    for _ in contents:  # the gathers process 0 did not draw
      pass
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if failed and error is None:
      raise OSError(f"{path}: process 0 failed to write the HF checkpoint "
                    "(its error is raised there)")
  if error is not None:
    raise error
  return path


# The files of a tokenizer folder an export carries along.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Weight files a save may leave from an earlier one (removed when not rewritten).
WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def _tokenizer_files(tokenizer, hf_config: dict) -> tuple[dict[str, str], dict[str, Path]]:
  """({file name: text} of generation_config.json, {file name: source} of the
  tokenizer files); records the special ids in `hf_config`."""
  if tokenizer is None:
    return {}, {}
  ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
         "pad_token_id": tokenizer.pad_id}
  hf_config.update(ids)
  texts = {"generation_config.json": json.dumps(ids, indent=2) + "\n"}
  source = getattr(tokenizer, "file", None)  # an HFTokenizer's tokenizer.json
  if source is None:
    hf_config["swajax_tokenizer"] = "bytes"
    return texts, {}
  return texts, {name: Path(source).parent / name for name in TOKENIZER_FILES
                 if (Path(source).parent / name).is_file()}


def _host_array(x) -> np.ndarray:
  """A parameter as one numpy array on this host. An array spanning devices
  of several processes (and not replicated on each) is gathered by all of
  them: every process must call this for it, in the same order."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return multihost_utils.process_allgather(x, tiled=True)


def _write_folder(path: Path, overwrite: bool, hf_config: dict,
                  files: dict[str, list[TensorSpec]], sizes: dict[str, int],
                  contents, texts: dict[str, str], copies: dict[str, Path]) -> None:
  """Writes `save_hf`'s files into `path`: `contents` yields each weight
  file's {name: array}, in the order of `files`; `texts` and `copies` are
  further files (their text, or a file to copy)."""
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f"{path}: is a file, not a folder (save_hf writes a folder)")
  if (not overwrite and path.is_dir()
      and any(p.name == "config.json" or WEIGHT_FILE.fullmatch(p.name)
              for p in path.iterdir())):
    raise FileExistsError(f"{path}: holds a checkpoint (pass overwrite=True to "
                          "replace its files)")
  created = not path.exists()
  path.mkdir(parents=True, exist_ok=True)
  stem = f".tmp-{os.getpid()}-{secrets.token_hex(4)}-"
  tmp = lambda name: path / (stem + name)
  written = []  # final names, in rename order: weights, index, the rest, config last
  progress = Progress(f"save_hf {path}", sum(sizes.values()))
  try:
    for file, tensors in zip(files, contents):
      save_file(tensors, tmp(file), metadata={"format": "pt"})
      written.append(file)
      progress.add(sum(sizes[spec.hf_name] for spec in files[file]))
    progress.close()
    if len(files) > 1:
      index = {"metadata": {"total_size": sum(sizes.values())},
               "weight_map": {spec.hf_name: file for file, specs in files.items()
                              for spec in specs}}
      texts = {INDEX_FILE: json.dumps(index, indent=2) + "\n", **texts}
    for name, text in texts.items():
      tmp(name).write_text(text)
      written.append(name)
    for name, source in copies.items():
      if not (path / name).exists() or not (path / name).samefile(source):
        shutil.copyfile(source, tmp(name))
        written.append(name)
    tmp("config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    written.append("config.json")
  except BaseException:
    for p in path.glob(stem + "*"):
      p.unlink()
    if created and not any(path.iterdir()):
      path.rmdir()
    raise
  stale = [p for p in path.iterdir()  # an earlier save's other weight files
           if WEIGHT_FILE.fullmatch(p.name) and p.name not in written]
  for p in stale:  # a stale index first: it would point at the old shards
    if p.name == INDEX_FILE:
      p.unlink()
  mode = 0o666 & ~_umask()  # safetensors creates its files 0600
  for name in written:
    os.chmod(tmp(name), mode)
    os.replace(tmp(name), path / name)
  for p in stale:
    p.unlink(missing_ok=True)


def _umask() -> int:
  mask = os.umask(0o022)  # reading it means setting it: set it back at once
  os.umask(mask)
  return mask


def _split_into_files(table, sizes: dict[str, int], limit: int
                      ) -> dict[str, list[TensorSpec]]:
  """File name -> its tensors, in order (see `save_hf`)."""
  groups, size = [[]], 0
  for spec in table:
    if groups[-1] and size + sizes[spec.hf_name] > limit:
      groups.append([])
      size = 0
    groups[-1].append(spec)
    size += sizes[spec.hf_name]
  if len(groups) == 1:
    return {SINGLE_FILE: groups[0]}
  return {f"model-{i:05d}-of-{len(groups):05d}.safetensors": group
          for i, group in enumerate(groups, start=1)}


def parse_size(size: int | str, name: str) -> int:
  """Bytes >= 1 from an int or a string: "5GB" = 5 * 10**9, "2GiB" = 2 * 2**30
  (units KB MB GB TB and KiB MiB GiB TiB, case-insensitive)."""
  if isinstance(size, str):
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B)\s*", size, re.IGNORECASE)
    if match is None:
      raise ValueError(f"{name}={size!r}: expected bytes as an int or a string "
                       "like '5GB', '500MB' or '2GiB'")
    size = int(float(match[1]) * SIZE_UNITS[match[2].upper()])
  elif isinstance(size, bool) or not isinstance(size, int):
    raise TypeError(f"{name}={size!r}: expected an int (bytes) or a string like '5GB'")
  if size < 1:
    raise ValueError(f"{name}={size!r}: expected at least 1 byte")
  return size

"""Hugging Face checkpoints: `load_hf` and `save_hf` (safetensors, no torch).

Loading builds the model abstractly (`nnx.eval_shape`) and fills it one tensor
at a time from `hf_tensors.tensor_table`, each device reading only its own
block when a mesh is given, so the host never holds two copies of the weights.
Saving gathers one tensor at a time and writes the folder through
`hf_folder` (files split above `max_shard_size`, as transformers does).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import SafetensorError

from models import CausalLM, ModelConfig
from models.hf_config import mxfp4_expert_layers, read_config_json
from swajax.io import mxfp4
from swajax import sharding as sharding_lib
from swajax.dtypes import DTYPES
from swajax.io.hf_folder import (DEFAULT_MAX_SHARD_SIZE, Progress,
                                 open_safetensors, parse_size, split_into_files,
                                 tensor_files, tokenizer_files, write_folder)
from swajax.io.hf_tensors import (read_parameter_block, tensor_table, to_hf,
                                  variable_at)
from swajax.io.peft import load_adapter

SAFETENSORS_DTYPES = {"F32": jnp.float32, "BF16": jnp.bfloat16, "F16": jnp.float16}


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
  base (`swajax.io.peft.load_adapter`; the adapters go to the default device).

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
  files = tensor_files(directory)
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
    with open_safetensors(files[first]) as f:
      dtype = _stored_dtype(files[first], f.get_slice(first), first)
  dtype = check_float(dtype, "dtype")
  model = nnx.eval_shape(lambda: CausalLM(
      config, dtype=dtype, param_dtype=dtype, attn_impl=attn_impl,
      rngs=nnx.Rngs(0)))
  shardings = {} if mesh is None else param_shardings(model, mesh)
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
          f = stack.enter_context(open_safetensors(file))
          opened[file] = (f, set(f.keys()))
        f, names = opened[file]
        if name not in names:
          raise ValueError(f"{file}: tensor {name!r} is missing")
        slices.append(_checked_slice(file, f, name, shape, spec.mxfp4))
      if spec.mxfp4:
        return file, mxfp4.Mxfp4Tensor(*slices, spec.hf_shape, dtype)
      return file, slices[0]

    for path, specs in by_path.items():
      var = variable_at(model, path)
      var.set_value(read_parameter({spec: stored(spec) for spec in specs},
                          var.get_value().shape, dtype, shardings.get(path)))
      progress.add(sum(math.prod(spec.hf_shape) for spec in specs) * dtype.itemsize)
  progress.close()
  if adapter is not None:
    load_adapter(model, adapter)
  return model


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
  with open_safetensors(files[name]) as f, open_safetensors(files[embed]) as g:
    if np.array_equal(f.get_tensor(name), g.get_tensor(embed)):
      return True
  raise ValueError(
      f"{files[name]}: 'lm_head.weight' differs from {embed!r} but the "
      "config says tie_word_embeddings=true (transformers would untie them: "
      "set tie_word_embeddings to false in config.json to load it untied)")


def param_shardings(model, mesh) -> dict[tuple, jax.sharding.NamedSharding]:
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


def read_parameter(stored: dict, shape, dtype, sharding) -> jax.Array:
  """Our parameter of `shape` in `dtype` from its HF tensors `stored`
  ({spec: (file, slice)}): on the default device (sharding None), or placed
  with `sharding`, each device's block read on its own (`read_block`)."""

  def read(index):  # MXFP4 blocks come dequantized into dtype: no copy
    return read_parameter_block(stored, shape, index).astype(dtype, copy=False)

  try:
    if sharding is None:
      return jnp.asarray(read((slice(None),) * len(shape)))
    return jax.make_array_from_callback(shape, sharding, read)
  except SafetensorError as e:
    names = ", ".join(repr(spec.hf_name) for spec in stored)
    raise ValueError(f"cannot read {names} ({e})") from e


def check_float(dtype, name):
  if not any(jnp.dtype(dtype) == d for d in DTYPES.values()):
    raise ValueError(f"{name}={dtype}: expected float32, bfloat16 or float16")
  return jnp.dtype(dtype)


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

  tokenizer: a `swajax.text.tokenizers` tokenizer (None: none is recorded). Its
  bos/eos/pad ids go into config.json and a generation_config.json (so
  transformers' `generate` stops at eos too); an `HFTokenizer`'s
  tokenizer.json (and its tokenizer_config.json / special_tokens_map.json)
  is written with its chat template (`hf_folder.own_tokenizer_files`: a
  chosen one as chat_template.jinja, as `save_pretrained` writes it); a
  `ByteTokenizer` is recorded as "swajax_tokenizer": "bytes" in config.json
  (what `swajax generate` reads).

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
  arrays = {spec.hf_name: variable_at(model, spec.path)[...] for spec in table}
  sizes = {spec.hf_name: math.prod(spec.hf_shape) * arrays[spec.hf_name].dtype.itemsize
           for spec in table}
  files = split_into_files(table, sizes, limit)
  hf_config["dtype"] = str(arrays["model.embed_tokens.weight"].dtype)
  texts, copies = tokenizer_files(tokenizer, hf_config)
  # One file's tensors at a time, gathered (on every process) when drawn.
  contents = ({spec.hf_name: to_hf(spec, _host_array(spec.select(arrays[spec.hf_name])))
               for spec in specs} for specs in files.values())
  error = None
  if jax.process_index() == 0:
    try:
      write_folder(path, overwrite, hf_config, files, sizes, contents, texts, copies)
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


def _host_array(x) -> np.ndarray:
  """A parameter as one numpy array on this host. An array spanning devices
  of several processes (and not replicated on each) is gathered by all of
  them: every process must call this for it, in the same order."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return multihost_utils.process_allgather(x, tiled=True)

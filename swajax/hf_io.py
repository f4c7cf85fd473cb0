"""Hugging Face checkpoints: `load_hf` and `save_hf` (safetensors, no torch).

`tensor_table(config)` is the one map between HF tensor names and our
parameters; `_to_ours` / `_to_hf` hold every transpose. Loading builds the
model abstractly (`nnx.eval_shape`) and fills it one tensor at a time, so the
host never holds two copies of the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.flax import save_file

from models import CausalLM, ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
SAFETENSORS_DTYPES = {"F32": jnp.float32, "BF16": jnp.bfloat16, "F16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor: its name and shape, our parameter path, and the layout.

  transposed: HF stores nn.Linear weights [out, in]; ours read [in, ...] (e.g.
  q_proj [N*H, D] <-> kernel [D, N, H]). Otherwise only a reshape (biases
  [N*H] <-> [N, H], norms and the embedding as they are).
  """

  hf_name: str
  path: tuple
  hf_shape: tuple[int, ...]
  transposed: bool


def tensor_table(config: ModelConfig) -> list[TensorSpec]:
  """Every tensor of a HF checkpoint of `config`, in file order."""
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  qd = config.num_q_heads * config.head_dim
  kd = config.num_kv_heads * config.head_dim
  table = [TensorSpec("model.embed_tokens.weight", ("embed", "embedding"),
                      (v, d), False)]
  for i in range(config.num_layers):
    hf, ours = f"model.layers.{i}.", ("layers", i)
    table += [
        TensorSpec(hf + "input_layernorm.weight", (*ours, "input_norm", "weight"),
                   (d,), False),
        TensorSpec(hf + "self_attn.q_proj.weight",
                   (*ours, "attn", "q_proj", "kernel"), (qd, d), True),
        TensorSpec(hf + "self_attn.k_proj.weight",
                   (*ours, "attn", "k_proj", "kernel"), (kd, d), True),
        TensorSpec(hf + "self_attn.v_proj.weight",
                   (*ours, "attn", "v_proj", "kernel"), (kd, d), True),
        TensorSpec(hf + "self_attn.o_proj.weight",
                   (*ours, "attn", "o_proj", "kernel"), (d, qd), True),
        TensorSpec(hf + "post_attention_layernorm.weight",
                   (*ours, "post_attn_norm", "weight"), (d,), False),
        TensorSpec(hf + "mlp.gate_proj.weight",
                   (*ours, "mlp", "gate_proj", "kernel"), (f, d), True),
        TensorSpec(hf + "mlp.up_proj.weight",
                   (*ours, "mlp", "up_proj", "kernel"), (f, d), True),
        TensorSpec(hf + "mlp.down_proj.weight",
                   (*ours, "mlp", "down_proj", "kernel"), (d, f), True),
    ]
    if config.attention_bias:
      table += [
          TensorSpec(hf + f"self_attn.{name}_proj.bias",
                     (*ours, "attn", f"{name}_proj", "bias"), (size,), False)
          for name, size in (("q", qd), ("k", kd), ("v", kd))]
    if config.qk_norm:
      table += [
          TensorSpec(hf + f"self_attn.{name}_norm.weight",
                     (*ours, "attn", f"{name}_norm", "weight"),
                     (config.head_dim,), False)
          for name in ("q", "k")]
  table.append(TensorSpec("model.norm.weight", ("norm", "weight"), (d,), False))
  if not config.tie_word_embeddings:
    table.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), (v, d), True))
  return table


def _to_ours(spec: TensorSpec, x, shape):
  return (x.T if spec.transposed else x).reshape(shape)


def _to_hf(spec: TensorSpec, x):
  if spec.transposed:
    return x.reshape(spec.hf_shape[::-1]).T
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
    return safe_open(os.fspath(file), framework="flax")
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def load_hf(path, *, dtype=None, attn_impl: str = "auto") -> CausalLM:
  """A `CausalLM` from a HF checkpoint directory (config.json + safetensors).

  dtype: parameter and compute dtype; None keeps the checkpoint's (the dtype of
  model.embed_tokens.weight). Raises FileNotFoundError (with the path) for a
  missing config or shard, ValueError for an unsupported config, an unreadable
  file, or the first missing, unexpected or misshaped tensor.
  """
  directory = Path(path)
  config = ModelConfig.from_hf(directory)
  files = _tensor_files(directory)
  table = tensor_table(config)
  expected = {spec.hf_name for spec in table}
  for spec in table:
    if spec.hf_name not in files:
      raise ValueError(f"{directory}: tensor {spec.hf_name!r} is missing")
  for name in files:
    if name not in expected:
      raise ValueError(
          f"{files[name]}: unexpected tensor {name!r} for this "
          f"{config.model_type} config")
  if dtype is None:
    with _open(files[table[0].hf_name]) as f:
      stored = f.get_slice(table[0].hf_name).get_dtype()
    if stored not in SAFETENSORS_DTYPES:
      raise ValueError(
          f"{files[table[0].hf_name]}: {table[0].hf_name!r} has dtype "
          f"{stored}: expected one of {sorted(SAFETENSORS_DTYPES)}")
    dtype = SAFETENSORS_DTYPES[stored]
  dtype = _check_float(dtype, "dtype")
  model = nnx.eval_shape(lambda: CausalLM(
      config, dtype=dtype, param_dtype=dtype, attn_impl=attn_impl,
      rngs=nnx.Rngs(0)))
  by_file = {}
  for spec in table:
    by_file.setdefault(files[spec.hf_name], []).append(spec)
  for file, specs in by_file.items():
    with _open(file) as f:
      names = set(f.keys())
      for spec in specs:
        if spec.hf_name not in names:
          raise ValueError(f"{file}: tensor {spec.hf_name!r} is missing")
        try:
          x = f.get_tensor(spec.hf_name)
        except SafetensorError as e:
          raise ValueError(f"{file}: cannot read {spec.hf_name!r} ({e})") from e
        if tuple(x.shape) != spec.hf_shape:
          raise ValueError(
              f"{file}: tensor {spec.hf_name!r} has shape {tuple(x.shape)}: "
              f"expected {spec.hf_shape}")
        _check_float(x.dtype, f"{spec.hf_name}.dtype")
        var = _variable(model, spec.path)
        var.set_value(_to_ours(spec, x, var.get_value().shape).astype(dtype))
  return model


def _check_float(dtype, name):
  if not any(jnp.dtype(dtype) == d for d in FLOAT_DTYPES):
    raise ValueError(f"{name}={dtype}: expected float32, bfloat16 or float16")
  return jnp.dtype(dtype)


# ----- Saving -------------------------------------------------------------------

def save_hf(model: CausalLM, path, *, overwrite: bool = False) -> Path:
  """Writes config.json + model.safetensors that transformers loads as `model`.

  Tensors keep the model's parameter dtype. Written into a temporary directory
  next to `path`, then renamed: a failure leaves no partial checkpoint. An
  existing `path` raises FileExistsError unless overwrite=True.
  """
  path = Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path}: exists (pass overwrite=True to replace it)")
  config = model.config
  hf_config = config.to_hf()  # raises before anything is written
  tensors = {spec.hf_name: _to_hf(spec, _variable(model, spec.path)[...])
             for spec in tensor_table(config)}
  hf_config["dtype"] = str(tensors["model.embed_tokens.weight"].dtype)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
  try:
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(tensors, tmp / SINGLE_FILE, metadata={"format": "pt"})
    if path.exists():
      old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
      os.replace(path, old / path.name)
      os.replace(tmp, path)
      shutil.rmtree(old)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path

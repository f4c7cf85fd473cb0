"""PEFT LoRA adapters: `save_adapter` and `load_adapter` (adapter_config.json +
adapter_model.safetensors, the files `peft.PeftModel.from_pretrained` reads).

Key names are PEFT's for a causal LM: "base_model.model." + the HF module
name (`hf_module_name`, e.g. model.layers.0.self_attn.q_proj: hf_io's
tensor names without ".weight", which tests/test_lora.py checks) +
".lora_A.weight" [r, in_features] or ".lora_B.weight" [out_features, r];
ours are lora_a [*in, r] and lora_b [r, *out] (`swajax.lora`): both are
flattened to matrices and transposed (`adapter_tensors`, `load_adapter`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

import models
from models import lora as lora_lib
from swajax.io.hf_folder import write_tokenizer

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
HF_BLOCKS = {"attn": "self_attn", "mlp": "mlp"}  # our decoder-layer blocks' HF names


def hf_module_name(path: tuple) -> str:
  """Our projection path ("layers", i, block, proj) -> its HF module name."""
  _, layer, block, proj = path
  return f"model.layers.{layer}.{HF_BLOCKS[block]}.{proj}"


def adapter_tensors(model) -> dict[str, np.ndarray]:
  """PEFT key -> array (PEFT layout) for every adapter of `model`."""
  out = {}
  for path, module in lora_lib.lora_modules(model):
    a = np.asarray(module.lora_a.get_value())
    b = np.asarray(module.lora_b.get_value())
    key = PREFIX + hf_module_name(tuple(path))
    out[key + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
    out[key + ".lora_B.weight"] = np.ascontiguousarray(b.reshape(b.shape[0], -1).T)
  return out


def save_adapter(model, path, *, base_model_name_or_path: str | None = None,
                 tokenizer=None) -> Path:
  """Writes `model`'s adapters as a PEFT LoRA adapter folder `path` (created
  or overwritten): adapter_config.json and adapter_model.safetensors (in the
  adapters' dtype). With a `tokenizer`, its files too (those `save_hf`
  writes: tokenizer.json, its config, the chat template, ...), as
  LLaMA-Factory's adapter folders carry them: the tokenizer the adapter was
  trained with travels with it (PEFT ignores them)."""
  modules = lora_lib.lora_modules(model)
  if not modules:
    raise ValueError("save_adapter: the model has no LoRA adapters (see add_lora)")
  spec = modules[0][1].spec
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
      "target_modules": list(spec.targets), "bias": "none",
      "use_rslora": spec.rslora, "use_dora": False, "fan_in_fan_out": False,
      "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
  }
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  save_file(adapter_tensors(model), path / WEIGHTS_FILE, metadata={"format": "pt"})
  if tokenizer is not None:
    write_tokenizer(tokenizer, path)
  return path


def read_adapter_config(path) -> lora_lib.LoraSpec:
  """The `LoraSpec` of a PEFT adapter folder; ValueError for what swajax
  does not implement (DoRA, bias training, modules_to_save, per-module rank
  or alpha patterns, layer subsets, regex target_modules)."""
  file = Path(path) / CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (not a PEFT adapter folder)")
  config = json.loads(file.read_text())
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{file}: peft_type={config.get('peft_type')!r}: expected 'LORA'")
  refused = {"use_dora": False, "bias": "none", "modules_to_save": None,
             "layers_to_transform": None, "fan_in_fan_out": False}
  for key, supported in refused.items():
    if config.get(key) not in (supported, None, []):
      raise ValueError(f"{file}: {key}={config[key]!r}: expected {supported!r} "
                       "(not supported by swajax)")
  for key in ("rank_pattern", "alpha_pattern"):
    if config.get(key):
      raise ValueError(f"{file}: {key}={config[key]!r}: expected none (not supported)")
  targets = config.get("target_modules")
  if targets in ("all", "all-linear"):  # PEFT's: every projection, not lm_head
    targets = lora_lib.ALL
  elif isinstance(targets, list | tuple):
    order = [t for t in lora_lib.TARGETS if t in targets]  # the models' own order
    targets = tuple(order) + tuple(t for t in targets if t not in order)
  else:
    raise ValueError(f"{file}: target_modules={config.get('target_modules')!r}: "
                     f"expected a list of names among {','.join(lora_lib.TARGETS)}")
  return lora_lib.LoraSpec(
      rank=int(config["r"]), alpha=float(config["lora_alpha"]),
      dropout=float(config.get("lora_dropout") or 0.0), targets=targets,
      rslora=bool(config.get("use_rslora", False)))


def load_adapter(model: models.CausalLM, path) -> models.CausalLM:
  """`model` with the PEFT LoRA adapter in folder `path` added (in place).

  Every tensor is checked: a missing, unexpected or misshaped one raises
  ValueError naming it.
  """
  path = Path(path)
  spec = read_adapter_config(path)
  lora_lib.add_lora(model, spec, rngs=nnx.Rngs(0))
  file = path / WEIGHTS_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}")
  with safe_open(str(file), framework="numpy") as f:
    stored = set(f.keys())
    expected = set()
    for module_path, module in lora_lib.lora_modules(model):
      key = PREFIX + hf_module_name(tuple(module_path))
      for var, suffix in ((module.lora_a, ".lora_A.weight"),
                          (module.lora_b, ".lora_B.weight")):
        name = key + suffix
        expected.add(name)
        if name not in stored:
          raise ValueError(f"{file}: tensor {name!r} is missing")
        shape = var.get_value().shape
        x = f.get_tensor(name)
        want = _peft_shape(suffix, shape)
        if tuple(x.shape) != want:
          raise ValueError(f"{file}: tensor {name!r} has shape {tuple(x.shape)}: "
                           f"expected {want}")
        var.set_value(jnp.asarray(x.T.reshape(shape), var.get_value().dtype))
    unexpected = sorted(stored - expected)
    if unexpected:
      raise ValueError(f"{file}: unexpected tensor {unexpected[0]!r} (not a LoRA "
                       f"tensor of the targets {','.join(spec.targets)})")
  return model


def _peft_shape(suffix: str, shape) -> tuple[int, int]:
  if suffix == ".lora_A.weight":  # ours [*in, r]
    return shape[-1], math.prod(shape[:-1])
  return math.prod(shape[1:]), shape[0]  # ours [r, *out]



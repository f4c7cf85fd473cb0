"""The model and train state a run starts from: a fresh model initialised into
its shardings, or an HF checkpoint read straight into them; LoRA adapters on
top; the optimizer state placed like the parameters."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import models
from models import lora as lora_lib
from swajax import sharding as sharding_lib
from swajax.dtypes import DTYPES
from swajax.io.model_source import load_model
from swajax.training.config import TrainConfig
from swajax.training.optimizer import StepOptions, make_optimizer

DEFAULT_PRESET = "mistral_tiny"  # the model of a run that names none


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """What an optimizer step updates (a pytree; a checkpoint holds all of it)."""

  params: Any     # nnx.State of the model's nnx.Param leaves
  opt_state: Any  # the optax state of `make_optimizer`
  step: jax.Array  # int32 scalar: optimizer steps done


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything that builds a fresh `CausalLM`: hashable, a static jit argument."""

  config: models.ModelConfig
  seed: int
  dtype: str        # compute, a `DTYPES` name
  param_dtype: str  # parameters, a `DTYPES` name
  attn_impl: str
  remat: str

  @classmethod
  def from_config(cls, config: TrainConfig, model_config: models.ModelConfig) -> ModelSpec:
    return cls(model_config, config.seed, config.dtype, config.param_dtype,
               config.attn_impl, config.remat)

  def create(self):
    """(graphdef, params, rest) of a new model: nnx.split(model, nnx.Param, ...)."""
    model = models.CausalLM(self.config, rngs=nnx.Rngs(self.seed),
                            dtype=DTYPES[self.dtype],
                            param_dtype=DTYPES[self.param_dtype],
                            attn_impl=self.attn_impl, remat=self.remat)
    return nnx.split(model, nnx.Param, ...)


def model_config_for(config: TrainConfig) -> models.ModelConfig:
  """The `models.ModelConfig` of a fresh run: `config.model` when it is one,
  else preset(**model_overrides) (preset `DEFAULT_PRESET` when model is None)."""
  if isinstance(config.model, models.ModelConfig):
    return config.model
  name = DEFAULT_PRESET if config.model is None else config.model
  preset = getattr(models, name, None)
  if not name.endswith("_tiny") or not callable(preset):
    presets = sorted(n for n in dir(models) if n.endswith("_tiny"))
    raise ValueError(f"model={name!r}: expected a preset, one of {presets}")
  return preset(**dict(config.model_overrides))


def init_model(config: TrainConfig, mesh):
  """(model, graphdef, rest, state): parameters and optimizer state on `mesh`.

  state: a `TrainState`; rest = the model's non-parameter state. A fresh
  model is initialised inside jit straight into its shardings; an HF
  checkpoint is read by `load_hf(mesh=)` straight into the shardings (a
  .gguf file by `load_gguf(mesh=)`, dequantized tensor by tensor).
  A LoRA run (config.lora_rank) then adds the adapters: state.params holds
  only them (and the optimizer state their shapes), rest the frozen base.
  """
  if config.init_from_hf is not None:
    # load_hf / load_gguf take one dtype: load the weights in param_dtype
    # (load_hf: each device reading its own block), then use them in a model
    # built with this run's compute dtype, remat and attn_impl.
    loaded = load_model(Path(config.init_from_hf), dtype=DTYPES[config.param_dtype],
                        attn_impl=config.attn_impl, mesh=mesh)
    spec = ModelSpec.from_config(config, loaded.config)
    graphdef = nnx.eval_shape(spec.create)[0]
    _, params, rest = nnx.split(loaded, nnx.Param, ...)
    rest = jax.tree.map(lambda x: sharding_lib.global_array(
        np.asarray(x), NamedSharding(mesh, P())), rest)
  else:
    spec = ModelSpec.from_config(config, model_config_for(config))
    graphdef = nnx.eval_shape(spec.create)[0]
    params, rest = _fresh_params(spec=spec, mesh=mesh)
  if config.lora_spec is not None:
    graphdef, params, rest = _add_adapters(nnx.merge(graphdef, params, rest),
                                           config, mesh)
  state = TrainState(
      params=params,
      opt_state=_init_opt_state(params, options=StepOptions.from_config(config),
                                mesh=mesh),
      step=jax.device_put(jnp.zeros([], jnp.int32), NamedSharding(mesh, P())))
  return nnx.merge(graphdef, params, rest), graphdef, rest, state


def _add_adapters(model, config: TrainConfig, mesh):
  """(graphdef, adapters, rest) of `model` with `config.lora_spec`'s
  adapters (seeded by config.seed), the adapters placed on `mesh`; rest holds
  the base arrays as they were (quantized under QLoRA)."""
  lora_lib.add_lora(model, config.lora_spec, rngs=nnx.Rngs(config.seed))
  graphdef, adapters, rest = nnx.split(model, lora_lib.TRAINABLE, ...)
  return graphdef, jax.device_put(
      adapters, sharding_lib.state_shardings(adapters, mesh)), rest


@functools.partial(jax.jit, static_argnames=("spec", "mesh"))
def _fresh_params(*, spec: ModelSpec, mesh):
  """(params, rest) of a fresh model, params sharded per their annotations."""
  _, params, rest = spec.create()
  replicated = NamedSharding(mesh, P())
  return (jax.lax.with_sharding_constraint(
              params, sharding_lib.state_shardings(params, mesh)),
          jax.lax.with_sharding_constraint(rest, jax.tree.map(lambda _: replicated, rest)))


def train_state_shardings(params, tx, mesh) -> TrainState:
  """The shardings of a `TrainState`: parameters per their annotations, every
  params-like optimizer subtree like the parameters, the rest (counts, step)
  replicated."""
  replicated = NamedSharding(mesh, P())
  param_shardings = sharding_lib.state_shardings(params, mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
      transform_non_params=lambda _: replicated)
  return TrainState(params=param_shardings, opt_state=opt_shardings, step=replicated)


@functools.partial(jax.jit, static_argnames=("options", "mesh"))
def _init_opt_state(params, *, options: StepOptions, mesh):
  tx = make_optimizer(options, params)
  return jax.lax.with_sharding_constraint(
      tx.init(params), train_state_shardings(params, tx, mesh).opt_state)

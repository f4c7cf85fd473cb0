"""The optimizer of a training step: AdamW with global-norm clipping and a
warmup-cosine schedule, and `StepOptions`, the config fields the jitted step
reads."""

from __future__ import annotations

import dataclasses

import jax
import optax

from swajax.training.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """The `TrainConfig` fields the jitted train step reads: the optimizer and
  its schedule (the model's own settings travel in its graphdef).

  A static jit argument: runs that differ in anything else (a resumed run,
  another folder or data set, tests, benchmarks) share compilations within a
  process. Checked by `TrainConfig`, of which `from_config` takes the values.
  """

  lr: float
  min_lr_ratio: float
  warmup_steps: int
  weight_decay: float
  beta1: float
  beta2: float
  clip_norm: float
  router_aux_loss_coef: float | None  # None: the model config's
  schedule_steps: int  # the cosine's length: config.schedule_steps or config.steps
  lora_dropout: float = 0.0  # > 0: a dropout key per step (`lora.set_dropout_key`)
  # The loss: "sft", or "dpo" with the `swajax.training.preference` settings;
  # reference: `TrainConfig.reference`.
  stage: str = "sft"
  pref_loss: str = "sigmoid"
  pref_beta: float = 0.1
  simpo_gamma: float | None = None
  pref_ftx: float = 0.0
  pref_label_smoothing: float = 0.0
  reference: str = "none"

  @classmethod
  def from_config(cls, config: TrainConfig) -> StepOptions:
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)
              if f.name != "schedule_steps"}  # `reference` is a TrainConfig property
    return cls(**values, schedule_steps=config.schedule_steps or config.steps)


def make_schedule(options: StepOptions) -> optax.Schedule:
  """Linear warmup from 0 to lr over min(warmup_steps, schedule_steps - 1)
  steps, then cosine decay to lr * min_lr_ratio at `schedule_steps`; constant
  after it."""
  warmup = min(options.warmup_steps, options.schedule_steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=options.lr, warmup_steps=warmup,
      decay_steps=options.schedule_steps, end_value=options.lr * options.min_lr_ratio)


def make_optimizer(options: StepOptions, params) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW; weight decay only on matrices (ndim >= 2)."""
  decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(options.clip_norm),
      optax.adamw(make_schedule(options), b1=options.beta1, b2=options.beta2,
                  weight_decay=options.weight_decay, mask=decay_mask))

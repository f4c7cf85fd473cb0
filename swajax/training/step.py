"""The jitted steps: the masked next-token loss (+ the routers' load-balancing
loss), one optimizer step over A gradient-accumulation micro-batches, and the
validation loss.

One optimizer step: the global batch [A, B, T] (A gradient-accumulation
micro-batches of B packed rows) is split over the ("data", "fsdp") mesh;
`lax.scan` sums the loss and gradients of the micro-batches; the mean over
all target tokens of the step is the loss; AdamW (fp32 state, like the fp32
parameters) applies the clipped update. Compute runs in `dtype` (bf16 by
default), parameters are stored in `param_dtype` (fp32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models import lora as lora_lib
from models.moe import load_balancing_loss
from swajax import sharding as sharding_lib
from swajax.training import data as data_lib
from swajax.training.optimizer import StepOptions, make_optimizer, make_schedule
from swajax.training.state import TrainState, train_state_shardings


def masked_loss_sums(logits, targets, loss_mask):
  """(sum of token losses, number of target tokens), both fp32 scalars.

  logits [B, T, V] (any float dtype, upcast to fp32); targets [B, T] int;
  loss_mask [B, T] (1 = a target). Cross-entropy of each target under the
  logits of its position; positions with mask 0 contribute nothing.
  Returning sums, not a mean, lets micro-batches and devices combine exactly.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask)


def batch_loss_sums(model, batch):
  """`masked_loss_sums` of `model` on packed rows (a dict of [B, T] arrays),
  and the router's load-balancing loss over the rows' tokens (padding
  excluded; `models.moe.load_balancing_loss`), 0 for a model without experts:
  (loss sum, target count, load-balancing loss), fp32 scalars."""
  logits, router_logits = model.forward_with_router_logits(
      batch["input_ids"], positions=batch["positions"],
      segment_ids=batch["segment_ids"])
  loss_sum, count = masked_loss_sums(logits, batch["targets"], batch["loss_mask"])
  if router_logits is None:
    return loss_sum, count, jnp.zeros([], jnp.float32)
  balance = load_balancing_loss(router_logits, model.config.experts_per_token,
                                batch["segment_ids"] != data_lib.PADDING_SEGMENT)
  return loss_sum, count, balance


@functools.partial(jax.jit, static_argnames=("graphdef", "options", "mesh"),
                   donate_argnames="state")
def train_step(state: TrainState, rest, batch, *, graphdef, options: StepOptions, mesh):
  """One optimizer step: (state, metrics); the new state keeps its shardings.

  batch: dict of [A, B, T] arrays (A micro-batches). state.params: every
  parameter, or a LoRA run's adapters (the base is in `rest`, constant here:
  no gradient is taken for it).
  metrics: loss (mean over the step's target tokens), grad_norm (before
  clipping), lr (of this step), tokens (target count); with experts also
  router_aux_loss (the load-balancing loss, micro-batches weighted by their
  targets), which times the coefficient joins the optimised loss.
  """
  params = state.params
  tx = make_optimizer(options, params)
  model_config = nnx.merge(graphdef, params, rest).config
  coef = (model_config.router_aux_loss_coef if options.router_aux_loss_coef is None
          else options.router_aux_loss_coef)

  def accumulate(carry, xs):
    micro, index = xs
    def loss_fn(p):
      model = nnx.merge(graphdef, p, rest)
      if options.lora_dropout > 0:  # a mask per step and micro-batch
        lora_lib.set_dropout_key(model, jax.random.fold_in(
            jax.random.fold_in(jax.random.key(0), state.step), index))
      loss_sum, count, balance = batch_loss_sums(model, micro)
      # Summed over micro-batches and divided by the targets below: the
      # token-mean loss plus coef times the (target-weighted) balance loss.
      return loss_sum + coef * balance * count, (loss_sum, count, balance * count)
    (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(jnp.add, carry, (grads, *sums)), None

  zeros = (jax.tree.map(jnp.zeros_like, params), *(jnp.zeros([], jnp.float32),) * 3)
  micro_batches = jax.tree.leaves(batch)[0].shape[0]
  (grads, loss_sum, count, balance_sum), _ = jax.lax.scan(
      accumulate, zeros, (batch, jnp.arange(micro_batches)))
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state.opt_state, params)
  new_state = TrainState(params=optax.apply_updates(params, updates),
                         opt_state=opt_state, step=state.step + 1)
  new_state = jax.lax.with_sharding_constraint(
      new_state, train_state_shardings(params, tx, mesh))
  metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads),
             "lr": make_schedule(options)(state.step), "tokens": count}
  if model_config.num_experts:
    metrics["router_aux_loss"] = balance_sum / denom
  return new_state, metrics


@functools.partial(jax.jit, static_argnames="graphdef")
def eval_step(params, rest, batch, *, graphdef):
  """(loss sum, target count) of the model on a batch of [B, T] rows."""
  return batch_loss_sums(nnx.merge(graphdef, params, rest), batch)[:2]


def evaluate(graphdef, params, rest, rows: dict, batch_size: int, sharding) -> float:
  """Mean target-token loss of `params` over validation rows, in batches."""
  total, count = evaluate_sums(graphdef, params, rest, rows, batch_size, sharding)
  return total / max(count, 1.0)


def evaluate_sums(graphdef, params, rest, rows: dict, batch_size: int, sharding
                  ) -> tuple[float, float]:
  """(sum of the target tokens' losses, target count) of `params` over packed
  rows (a whole number of batches of `batch_size`), batch by batch
  (`eval_step`); `evaluate` and `swajax eval` both take it."""
  total = count = 0.0
  for start in range(0, len(rows["input_ids"]), batch_size):
    batch = {k: sharding_lib.global_array(v[start:start + batch_size], sharding)
             for k, v in rows.items()}
    loss_sum, n = eval_step(params, rest, batch, graphdef=graphdef)
    total, count = total + float(loss_sum), count + float(n)
  return total, count

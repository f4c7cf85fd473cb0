"""The jitted steps: the masked next-token loss or a preference loss
(`swajax.training.preference`, with its reference log-probabilities) (+ the
routers' load-balancing loss), one optimizer step over A
gradient-accumulation micro-batches, and the validation loss.

One optimizer step: the global batch [A, B, T] (A gradient-accumulation
micro-batches of B packed rows) is split over the ("data", "fsdp") mesh;
`lax.scan` sums the loss and gradients of the micro-batches; the mean over
all target tokens (sft) or pairs (dpo) of the step is the loss; AdamW (fp32 state, like the fp32
parameters) applies the clipped update. Compute runs in `dtype` (bf16 by
default), parameters are stored in `param_dtype` (fp32).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from models import lora as lora_lib
from models.moe import load_balancing_loss
from swajax import sharding as sharding_lib
from swajax.training import data as data_lib
from swajax.training import preference as pref_lib
from swajax.training.logprobs import token_log_probs
from swajax.training.optimizer import StepOptions, make_optimizer, make_schedule
from swajax.training.state import TrainState, train_state_shardings


def masked_loss_sums(logits, targets, loss_mask):
  """(sum of token losses, number of target tokens), both fp32 scalars.

  logits [B, T, V] (any float dtype, upcast to fp32); targets [B, T] int;
  loss_mask [B, T] (1 = a target). Cross-entropy of each target under the
  logits of its position; positions with mask 0 contribute nothing.
  Returning sums, not a mean, lets micro-batches and devices combine exactly.
  """
  mask = loss_mask.astype(jnp.float32)
  return -jnp.sum(token_log_probs(logits, targets) * mask), jnp.sum(mask)


def forward_with_balance(model, batch):
  """(logits [B, T, V], load-balancing loss) of `model` on rows (a dict of
  [B, T] arrays): the router's loss over the rows' tokens (padding excluded;
  `models.moe.load_balancing_loss`), 0 for a model without experts."""
  logits, router_logits = model.forward_with_router_logits(
      batch["input_ids"], positions=batch["positions"],
      segment_ids=batch["segment_ids"])
  if router_logits is None:
    return logits, jnp.zeros([], jnp.float32)
  return logits, load_balancing_loss(router_logits, model.config.experts_per_token,
                                     batch["segment_ids"] != data_lib.PADDING_SEGMENT)


def batch_loss_sums(model, batch):
  """`masked_loss_sums` of `model` on packed rows (a dict of [B, T] arrays)
  and the load-balancing loss (`forward_with_balance`): (loss sum, target
  count, load-balancing loss), fp32 scalars."""
  logits, balance = forward_with_balance(model, batch)
  loss_sum, count = masked_loss_sums(logits, batch["targets"], batch["loss_mask"])
  return loss_sum, count, balance


def objective_sums(model, batch, options: StepOptions, ref_logps):
  """The sums of one micro-batch that add up over micro-batches and devices:
  {"loss", "count", "balance" (x count), and with stage "dpo" each
  `preference.pair_losses` metric}, fp32 scalars.

  sft: loss sums the target tokens' NLL, count counts them. dpo: the rows
  are pairs (`preference`), loss sums the per-pair losses and the metrics
  over the pairs with answers, count counts those; ref_logps [B, 2] (None
  for a reference-free loss).
  """
  logits, balance = forward_with_balance(model, batch)
  if options.stage == "sft":
    loss_sum, count = masked_loss_sums(logits, batch["targets"], batch["loss_mask"])
    sums = {"loss": loss_sum}
  else:
    logps, counts = pref_lib.pair_log_probs(logits, batch)
    losses, metrics = pref_lib.pair_losses(logps, counts, ref_logps, options)
    valid = pref_lib.valid_pairs(counts)
    count = jnp.sum(valid.astype(jnp.float32))
    sums = {name: jnp.sum(jnp.where(valid, value, 0.0))
            for name, value in {"loss": losses, **metrics}.items()}
  return {**sums, "count": count, "balance": balance * count}


def reference_log_probs(graphdef, params, rest, ref_params, batch, options: StepOptions):
  """The reference's pair log-probabilities [B, 2] (no gradient), or None
  (options.reference "none"): from batch["ref_logps"] ("precomputed"), the
  model with its adapters zeroed ("adapters_off": exactly the base, no copy
  of its weights) or `ref_params` ("frozen_copy")."""
  if options.reference == "none":
    return None
  if options.reference == "precomputed":
    return batch["ref_logps"]
  weights = (jax.tree.map(jnp.zeros_like, params) if options.reference == "adapters_off"
             else ref_params)
  logits, _ = forward_with_balance(nnx.merge(graphdef, weights, rest), batch)
  return jax.lax.stop_gradient(pref_lib.pair_log_probs(logits, batch)[0])


@functools.partial(jax.jit, static_argnames=("graphdef", "options", "mesh"),
                   donate_argnames="state")
def train_step(state: TrainState, rest, batch, *, graphdef, options: StepOptions, mesh,
               ref_params=None):
  """One optimizer step: (state, metrics); the new state keeps its shardings.

  batch: dict of [A, B, T] arrays (A micro-batches; [A, B, 2] ref_logps
  with a precomputed reference). state.params: every parameter, or a LoRA
  run's adapters (the base is in `rest`, constant here: no gradient is taken
  for it). ref_params: the frozen reference weights (options.reference
  "frozen_copy"), else None.
  metrics: loss (sft: mean over the step's target tokens; dpo: mean over
  its pairs), grad_norm (before clipping), lr (of this step), tokens (sft:
  target count) or pairs (dpo) and the `preference` metrics; with experts
  also router_aux_loss (the load-balancing loss, micro-batches weighted by
  their targets or pairs), which times the coefficient joins the optimised loss.
  """
  params = state.params
  tx = make_optimizer(options, params)
  model_config = nnx.merge(graphdef, params, rest).config
  coef = (model_config.router_aux_loss_coef if options.router_aux_loss_coef is None
          else options.router_aux_loss_coef)

  def accumulate(carry, xs):
    micro, index = xs
    ref_logps = reference_log_probs(graphdef, params, rest, ref_params, micro, options)
    def loss_fn(p):
      model = nnx.merge(graphdef, p, rest)
      if options.lora_dropout > 0:  # a mask per step and micro-batch
        lora_lib.set_dropout_key(model, jax.random.fold_in(
            jax.random.fold_in(jax.random.key(0), state.step), index))
      sums = objective_sums(model, micro, options, ref_logps)
      # Summed over micro-batches and divided by the count below: the mean
      # loss plus coef times the (count-weighted) balance loss.
      return sums["loss"] + coef * sums["balance"], sums
    (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  zeros = (jax.tree.map(jnp.zeros_like, params),
           {name: jnp.zeros([], jnp.float32) for name in _sum_names(options)})
  micro_batches = jax.tree.leaves(batch)[0].shape[0]
  (grads, sums), _ = jax.lax.scan(accumulate, zeros, (batch, jnp.arange(micro_batches)))
  denom = jnp.maximum(sums["count"], 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state.opt_state, params)
  new_state = TrainState(params=optax.apply_updates(params, updates),
                         opt_state=opt_state, step=state.step + 1)
  new_state = jax.lax.with_sharding_constraint(
      new_state, train_state_shardings(params, tx, mesh))
  metrics = {name: value / denom for name, value in sums.items()
             if name not in ("count", "balance")}
  metrics.update({"grad_norm": optax.tree.norm(grads), "lr": make_schedule(options)(state.step),
                  "tokens" if options.stage == "sft" else "pairs": sums["count"]})
  if model_config.num_experts:
    metrics["router_aux_loss"] = sums["balance"] / denom
  return new_state, metrics


def _sum_names(options: StepOptions) -> list[str]:
  """The keys of `objective_sums` under `options`."""
  names = ["loss", "count", "balance"]
  if options.stage != "sft":
    pair = jnp.zeros((1, 2))
    names += list(pref_lib.pair_losses(pair, pair + 1, pair, options)[1])
  return names


@functools.partial(jax.jit, static_argnames=("graphdef", "options"))
def eval_step(params, rest, batch, *, graphdef, options: StepOptions, ref_params=None):
  """`objective_sums` of the model on a batch of [B, T] rows (with its reference)."""
  ref_logps = reference_log_probs(graphdef, params, rest, ref_params, batch, options)
  return objective_sums(nnx.merge(graphdef, params, rest), batch, options, ref_logps)


def row_shardings(rows: dict, mesh, batch_dim: int = 0) -> dict:
  """The sharding of each field of rows: [.., B, T] token fields split over
  the batch and sequence axes, the [.., B, 2] `ref_logps` over the batch."""
  return {k: sharding_lib.batch_sharding(mesh, v.ndim, batch_dim,
                                         sequence=k != "ref_logps")
          for k, v in rows.items()}


def evaluate_totals(graphdef, params, rest, rows: dict, batch_size: int, mesh, *,
                    options: StepOptions, ref_params=None) -> dict[str, float]:
  """`objective_sums` of `params` summed over rows (a whole number of
  batches of `batch_size`), batch by batch (`eval_step`): "loss" and
  "count" (sft: the target tokens' NLL sum and their number); `evaluate`
  and `swajax eval` both take it."""
  totals: dict[str, float] = {}
  shardings = row_shardings(rows, mesh)
  for start in range(0, len(rows["input_ids"]), batch_size):
    batch = {k: sharding_lib.global_array(v[start:start + batch_size], shardings[k])
             for k, v in rows.items()}
    sums = eval_step(params, rest, batch, graphdef=graphdef, options=options,
                     ref_params=ref_params)
    totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
  return totals


def evaluate(graphdef, params, rest, rows: dict, batch_size: int, mesh, *,
             options: StepOptions, ref_params=None) -> dict[str, float]:
  """Validation of `params` over rows, in batches: {"val_loss", "val_ppl"}
  (sft: the mean target-token loss), or (dpo) {"val_loss": the mean pair
  loss, "val_rewards/accuracies", "val_rewards/margins"}."""
  totals = evaluate_totals(graphdef, params, rest, rows, batch_size, mesh,
                           options=options, ref_params=ref_params)
  count = max(totals["count"], 1.0)
  loss = totals["loss"] / count
  if options.stage == "sft":
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}
  return {"val_loss": loss, **{f"val_{name}": totals[name] / count
                               for name in ("rewards/accuracies", "rewards/margins")}}


@functools.partial(jax.jit, static_argnames=("graphdef", "options", "mesh"))
def _reference_batch(params, rest, batch, *, graphdef, options: StepOptions, mesh):
  """`reference_log_probs` [B, 2] of a batch with `params` as the reference
  weights, replicated (every process reads all of it)."""
  return jax.lax.with_sharding_constraint(
      reference_log_probs(graphdef, params, rest, params, batch, options),
      NamedSharding(mesh, P()))


def precompute_reference(graphdef, params, rest, rows: dict, batch_size: int, mesh, *,
                         options: StepOptions, lora: bool) -> np.ndarray:
  """The reference log-probabilities [R, 2] fp32 of pair rows [R, T], in
  batches (the last padded with empty rows): the model of `params` (the
  starting weights) with its adapters off (lora) or as it is (full
  fine-tuning)."""
  options = dataclasses.replace(
      options, reference="adapters_off" if lora else "frozen_copy")
  count = len(rows["input_ids"])
  padded = data_lib.pad_rows(rows, batch_size, pad_id=0)
  shardings = row_shardings(padded, mesh)
  out = []
  for start in range(0, len(padded["input_ids"]), batch_size):
    batch = {k: sharding_lib.global_array(v[start:start + batch_size], shardings[k])
             for k, v in padded.items()}
    out.append(np.asarray(jax.device_get(_reference_batch(
        params, rest, batch, graphdef=graphdef, options=options, mesh=mesh))))
  return np.concatenate(out)[:count]

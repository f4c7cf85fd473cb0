"""Preference losses (`TrainConfig.stage = "dpo"`): DPO's sigmoid, IPO,
hinge, ORPO and SimPO on the log-probabilities of a chosen and a rejected
answer, with TRL's metrics.

A pair is one packed row (`swajax.training.pref_data`): segment 1 is
prompt + chosen answer, segment 2 is prompt + rejected answer, each from
position 0 (attention never crosses them), padding after; `loss_mask` marks
the answer tokens. Per pair and side: the summed log-probability of the
answer tokens, logps [B, 2] (column 0 chosen, 1 rejected), and their count
[B, 2]. With a reference model (sigmoid, ipo, hinge), ref_logps [B, 2] is the
same sum under the reference (the same windows: it is the same model).

The losses per pair, beta = `pref_beta`, eps = `pref_label_smoothing`,
z = beta * ((c - ref_c) - (r - ref_r)) with c, r the summed logps:
  sigmoid  -(1 - eps) log sig(z) - eps log sig(-z)   (DPO; eps > 0: cDPO)
  hinge    relu(1 - z)                                (SLiC)
  ipo      (d - 1 / (2 beta))^2, d = (c - ref_c) / n_c - (r - ref_r) / n_r
           (the log-ratios averaged over the answer tokens, as TRL)
  simpo    the sigmoid form of z = beta * (c / n_c - r / n_r) - gamma
           (no reference; gamma = `simpo_gamma`)
  orpo     nll - beta * log sig(log_odds), log_odds = (a_c - a_r)
           - (log(1 - exp a_c) - log(1 - exp a_r)), a = logps / n
           (no reference; nll = -a_c, the chosen answer's mean token NLL)
plus `pref_ftx` * nll for every loss (LLaMA-Factory's SFT term). The step's
loss is the mean over its pairs.

Metrics (per pair; the step reports their mean), TRL's names: rewards/chosen
and rewards/rejected (beta * (logps - ref) with a reference, beta * mean
token logps for orpo / simpo), rewards/accuracies (chosen reward > rejected),
rewards/margins, logps/chosen and logps/rejected (the logps the loss uses:
sums, or means for orpo / simpo); orpo also log_odds_ratio (log sig(log_odds))
and log_odds_chosen (log_odds) and nll_loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from swajax.training.logprobs import token_log_probs

PREF_LOSSES = ("sigmoid", "ipo", "hinge", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")  # the losses that need no reference model
SMOOTHED = ("sigmoid", "simpo")     # the losses that take label smoothing
CHOSEN, REJECTED = 1, 2              # segment ids of a pair row's two sequences
DEFAULT_SIMPO_GAMMA = 0.5            # LLaMA-Factory's and TRL's default


def pair_log_probs(logits, batch) -> tuple[jax.Array, jax.Array]:
  """(logps [B, 2], counts [B, 2]) fp32 of pair rows.

  logits [B, T, V]; batch: the rows' targets, loss_mask and segment_ids
  [B, T]. logps[:, 0] sums log p(target) over the trained positions of
  segment CHOSEN, logps[:, 1] over those of segment REJECTED; counts are the
  numbers of those positions.
  """
  trained = batch["loss_mask"] > 0
  sides = jnp.stack([trained & (batch["segment_ids"] == CHOSEN),
                     trained & (batch["segment_ids"] == REJECTED)], axis=-1)  # [B, T, 2]
  per_token = token_log_probs(logits, batch["targets"])
  logps = jnp.sum(jnp.where(sides, per_token[..., None], 0.0), axis=1)
  return logps, jnp.sum(sides, axis=1).astype(jnp.float32)


def valid_pairs(counts) -> jax.Array:
  """bool [B]: the pairs with answer tokens on both sides (not padding)."""
  return jnp.all(counts > 0, axis=-1)


def pair_losses(logps, counts, ref_logps, options) -> tuple[jax.Array, dict]:
  """(losses [B], metrics {name: [B]}) of pairs; see the module docstring.

  logps, counts [B, 2] (`pair_log_probs`); ref_logps [B, 2], ignored by
  orpo / simpo. options: pref_loss, pref_beta, simpo_gamma, pref_ftx and
  pref_label_smoothing (a `StepOptions`). Pairs without answer tokens give
  finite values (their mean logps are taken as 0); mask them with
  `valid_pairs`.
  """
  loss, beta = options.pref_loss, options.pref_beta
  means = logps / jnp.maximum(counts, 1.0)
  nll = -means[:, 0]
  metrics = {}
  if loss in REFERENCE_FREE:
    used, rewards = means, beta * means
  else:
    used, rewards = logps, beta * (logps - ref_logps)
  if loss in ("sigmoid", "hinge"):
    z = rewards[:, 0] - rewards[:, 1]
  elif loss == "simpo":
    gamma = DEFAULT_SIMPO_GAMMA if options.simpo_gamma is None else options.simpo_gamma
    z = rewards[:, 0] - rewards[:, 1] - gamma
  if loss in SMOOTHED:
    eps = options.pref_label_smoothing
    losses = -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
  elif loss == "hinge":
    losses = jax.nn.relu(1.0 - z)
  elif loss == "ipo":
    ratios = (logps - ref_logps) / jnp.maximum(counts, 1.0)
    losses = (ratios[:, 0] - ratios[:, 1] - 1.0 / (2.0 * beta)) ** 2
  elif loss == "orpo":
    log_odds = (means[:, 0] - means[:, 1]) - (_log1mexp(means[:, 0])
                                              - _log1mexp(means[:, 1]))
    ratio = jax.nn.log_sigmoid(log_odds)
    losses = nll - beta * ratio
    metrics = {"log_odds_ratio": ratio, "log_odds_chosen": log_odds, "nll_loss": nll}
  else:
    raise ValueError(f"pref_loss={loss!r}: expected one of {PREF_LOSSES}")
  if options.pref_ftx:
    losses = losses + options.pref_ftx * nll
  return losses, {
      "rewards/chosen": rewards[:, 0], "rewards/rejected": rewards[:, 1],
      "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).astype(jnp.float32),
      "rewards/margins": rewards[:, 0] - rewards[:, 1],
      "logps/chosen": used[:, 0], "logps/rejected": used[:, 1], **metrics}


def _log1mexp(x):
  """log(1 - exp(x)) for x < 0, stable at both ends (x near 0 and x << 0)."""
  return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))

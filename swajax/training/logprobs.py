"""The one per-token log-probability rule that the SFT loss and the
preference losses share."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def token_log_probs(logits, targets):
  """log p(target) of each position, fp32 [B, T].

  logits [B, T, V] (any float dtype, upcast to fp32); targets [B, T] int: the
  token each position predicts (the next token of its sequence). Masking is
  the caller's: a position with no target still gets a (meaningless) value.
  """
  return -optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)

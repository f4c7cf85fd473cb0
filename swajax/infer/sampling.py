"""Next-token sampling for generation: greedy, temperature, top-k, top-p.

The options are static Python numbers (one compiled program per setting;
`SamplingOptions` holds them, with the stop ids, as one hashable value);
logits and the rng are traced, so `sample_next_token` runs inside `jax.jit`
and inside `generate`'s device-side `lax.while_loop`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _check_options(temperature, top_k, top_p):
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
    raise TypeError(f"temperature={temperature!r}: expected a float >= 0")
  if not temperature >= 0:  # also refuses NaN
    raise ValueError(
        f"temperature={temperature!r}: expected a float >= 0 (0 = greedy)")
  if top_k is not None:
    if isinstance(top_k, bool) or not isinstance(top_k, int):
      raise TypeError(f"top_k={top_k!r}: expected an int >= 1 or None")
    if top_k < 1:
      raise ValueError(f"top_k={top_k!r}: expected an int >= 1 or None")
  if top_p is not None:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
      raise TypeError(f"top_p={top_p!r}: expected a float in (0, 1] or None")
    if not 0 < top_p <= 1:
      raise ValueError(f"top_p={top_p!r}: expected a float in (0, 1] or None")


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How generation picks each next token: a static jit argument.

  temperature, top_k, top_p: as `sample_next_token` takes them (checked
  here; temperature and top_p stored as floats). eos_token_ids: the stop
  ids, () = never stop; a row stops at its first one and repeats
  eos_token_ids[0] from then on. `for_vocab` builds one from `generate`'s
  arguments.
  """

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None
  eos_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    _check_options(self.temperature, self.top_k, self.top_p)
    if not isinstance(self.eos_token_ids, tuple) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0
        for i in self.eos_token_ids):
      raise TypeError(f"eos_token_ids={self.eos_token_ids!r}: expected a tuple "
                      "of ints >= 0")
    object.__setattr__(self, "temperature", float(self.temperature))
    if self.top_p is not None:
      object.__setattr__(self, "top_p", float(self.top_p))

  @classmethod
  def for_vocab(cls, vocab_size: int, *, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None,
                eos_token_id: int | Sequence[int] | None = None) -> SamplingOptions:
    """The options of `generate(temperature=, top_k=, top_p=, eos_token_id=)`.

    eos_token_id: None, an id or a sequence of ids (Python, numpy or jax
    ints), each in [0, vocab_size); else a ValueError.
    """
    _check_options(temperature, top_k, top_p)
    eos = () if eos_token_id is None else (
        list(eos_token_id) if np.ndim(eos_token_id) == 1 else
        [eos_token_id] if np.ndim(eos_token_id) == 0 else None)
    if eos is None or not all(
        np.ndim(i) == 0 and np.issubdtype(np.asarray(i).dtype, np.integer)
        and not isinstance(i, bool) and 0 <= i < vocab_size for i in eos):
      raise ValueError(f"eos_token_id={eos_token_id!r}: expected None, or "
                       f"ints in [0, {vocab_size})")
    return cls(temperature, top_k, top_p, tuple(int(i) for i in eos))


def check_sampling_args(max_new_tokens, temperature, top_k, top_p):
  """Validates generation options; raises ValueError/TypeError naming the bad one.

  max_new_tokens: int >= 0. temperature: float >= 0 (0 = greedy).
  top_k: int >= 1 or None. top_p: float in (0, 1] or None.
  """
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
    raise TypeError(f"max_new_tokens={max_new_tokens!r}: expected an int >= 0")
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an int >= 0")
  _check_options(temperature, top_k, top_p)


def sample_next_token(logits, rng, *, temperature=0.0, top_k=None, top_p=None):
  """Draws one token per row of `logits` [B, V]; returns int32 [B].

  temperature == 0: greedy, the argmax (the rng is unused).
  Otherwise, in order: divide the logits by `temperature`; keep the `top_k`
  largest (None: all; ties with the k-th are kept too); keep the nucleus, the
  smallest set of most probable tokens whose probability (after top-k) sums
  to >= `top_p` (None or 1: all; the most probable token is always kept);
  sample from the softmax of what is kept.
  """
  _check_options(temperature, top_k, top_p)
  if logits.ndim != 2:
    raise ValueError(
        f"logits.shape={tuple(logits.shape)}: expected [batch, vocab]")
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = _scaled(logits, temperature)
  vocab = logits.shape[-1]
  if top_k is not None and top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if top_p is not None and top_p < 1:
    logits = _nucleus(logits, top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def sample_rows(logits, keys, temperature, top_p):
  """One token per row of `logits` [B, V], each row with its own options;
  int32 [B]. The traced twin of `sample_next_token` (no top-k) for a batch
  of unrelated requests (the serving engine's slots).

  keys: [B] jax PRNG keys; temperature: float [B] (0 = greedy, the argmax);
  top_p: float [B] in (0, 1] (1 = every token). Row b draws as
  `sample_next_token(logits[b:b+1], keys[b], temperature=temperature[b],
  top_p=top_p[b])` does.
  """
  sampled = temperature > 0
  scaled = _scaled(logits, jnp.where(sampled, temperature, 1.0)[:, None])
  nucleus = _nucleus(scaled, top_p[:, None])
  scaled = jnp.where((top_p < 1)[:, None], nucleus, scaled)
  drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row[None])[0])(
      keys, scaled)
  greedy = jnp.argmax(logits, axis=-1)
  return jnp.where(sampled, drawn, greedy).astype(jnp.int32)


def _scaled(logits, temperature):
  """logits [B, V] / temperature (a float > 0 or [B, 1]), in fp32.

  Shifted so that the largest is 0 (kept 0 where a subnormal temperature is
  flushed to zero): a tiny temperature sends the others to -inf, the greedy
  limit, never several tokens to +inf.
  """
  shifted = logits.astype(jnp.float32)
  shifted = shifted - shifted.max(axis=-1, keepdims=True)
  return jnp.where(shifted == 0, 0.0, shifted / temperature)


def _nucleus(logits, top_p):
  """logits [B, V] with every token outside the nucleus set to -inf: the
  smallest set of most probable tokens whose probability sums to >= top_p (a
  float or [B, 1]); the most probable token is always kept."""
  ranked = jnp.sort(logits, axis=-1)[:, ::-1]  # (B, V), descending
  probs = jax.nn.softmax(ranked, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  num_kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1
  cutoff = jnp.take_along_axis(ranked, num_kept - 1, axis=-1)  # (B, 1)
  return jnp.where(logits >= cutoff, logits, -jnp.inf)

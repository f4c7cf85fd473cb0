"""Token sampling: greedy, top-k / top-p sets, the sampled distribution, bad options."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from swajax.infer.sampling import SamplingOptions, check_sampling_args, sample_next_token


def random_logits(seed, batch=4, vocab=32):
  return 3.0 * jax.random.normal(jax.random.key(seed), (batch, vocab))


def allowed_tokens(logits, temperature, top_k, top_p):
  """The top-k / nucleus set of each row, in numpy: bool [B, V]."""
  z = np.asarray(logits, np.float64) / temperature
  keep = np.ones_like(z, bool)
  if top_k is not None:
    kth = -np.sort(-z, axis=-1)[:, min(top_k, z.shape[-1]) - 1]
    keep &= z >= kth[:, None]
  if top_p is not None:
    for row, (zr, kr) in enumerate(zip(z, keep)):
      p = np.where(kr, np.exp(zr - zr[kr].max()), 0.0)
      p /= p.sum()
      order = np.argsort(-p, kind="stable")
      before = np.cumsum(p[order]) - p[order]
      nucleus = order[before < top_p]
      # Tokens tied with the last kept one are kept too.
      keep[row] &= p >= p[nucleus].min() * (1 - 1e-6)
  return keep


def test_greedy_is_argmax():
  logits = random_logits(0)
  tokens = jax.jit(sample_next_token)(logits, jax.random.key(1))
  chex.assert_type(tokens, jnp.int32)
  chex.assert_shape(tokens, (4,))
  np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 10.0])
@pytest.mark.parametrize("top_k, top_p", [(1, None), (None, 1e-6), (1, 0.9)])
def test_top_k_1_or_tiny_top_p_is_greedy(temperature, top_k, top_p):
  logits = random_logits(2)
  for seed in range(5):
    tokens = sample_next_token(logits, jax.random.key(seed),
                               temperature=temperature, top_k=top_k,
                               top_p=top_p)
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-45])
@pytest.mark.parametrize("top_p", [None, 0.9])
def test_vanishing_temperature_is_greedy(temperature, top_p):
  """logits / temperature overflows to inf for several tokens (and softmax to
  NaN): the sample must still be the argmax, the temperature -> 0 limit."""
  logits = random_logits(3)
  for seed in range(3):
    tokens = sample_next_token(logits, jax.random.key(seed),
                               temperature=temperature, top_p=top_p)
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))


@given(seed=st.integers(0, 2**16),
       temperature=st.sampled_from([0.3, 1.0, 3.0]),
       top_k=st.one_of(st.none(), st.integers(1, 40)),
       top_p=st.one_of(st.none(), st.floats(0.05, 1.0)))
def test_sampled_tokens_stay_in_the_kept_set(seed, temperature, top_k, top_p):
  logits = random_logits(seed, batch=64)
  tokens = sample_next_token(logits, jax.random.key(seed),
                             temperature=temperature, top_k=top_k, top_p=top_p)
  keep = allowed_tokens(logits, temperature, top_k, top_p)
  kept = keep[np.arange(64), np.asarray(tokens)]
  assert kept.all(), f"rows {np.flatnonzero(~kept)} sampled outside the set"


def chi_square(counts, probs):
  expected = counts.sum() * probs
  return float(np.sum((counts - expected) ** 2 / expected))


# Chi-square quantile at p = 1e-4 for 3 degrees of freedom (4 tokens): a
# correct sampler exceeds it once in 10^4 seeds; the seed is fixed.
CHI2_3DOF_P1E4 = 21.1


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distribution_matches_softmax(temperature):
  logits = jnp.array([2.0, 1.0, 0.0, -1.0])
  num = 40_000
  tokens = sample_next_token(jnp.broadcast_to(logits, (num, 4)),
                             jax.random.key(7), temperature=temperature)
  counts = np.bincount(np.asarray(tokens), minlength=4)
  probs = np.asarray(jax.nn.softmax(logits / temperature), np.float64)
  assert chi_square(counts, probs) < CHI2_3DOF_P1E4, (counts, probs * num)


def test_top_k_renormalises_over_the_kept_tokens():
  logits = jnp.array([2.0, 1.0, 0.0, -1.0])
  num = 20_000
  sample = jax.jit(sample_next_token,
                   static_argnames=("temperature", "top_k", "top_p"))
  tokens = sample(jnp.broadcast_to(logits, (num, 4)), jax.random.key(8),
                  temperature=1.0, top_k=2)
  counts = np.bincount(np.asarray(tokens), minlength=4)
  assert counts[2:].sum() == 0
  probs = np.asarray(jax.nn.softmax(logits[:2]), np.float64)
  # 1 degree of freedom: the p = 1e-4 quantile is 15.1.
  assert chi_square(counts[:2], probs) < 15.1, counts


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "max_new_tokens=-1"),
    (dict(max_new_tokens=2.0), "max_new_tokens=2.0"),
    (dict(temperature=-0.1), "temperature=-0.1"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(top_k=0), "top_k=0"),
    (dict(top_k=2.5), "top_k=2.5"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
])
def test_bad_args_raise(kwargs, message):
  args = dict(max_new_tokens=4, temperature=1.0, top_k=None, top_p=None)
  args.update(kwargs)
  with pytest.raises((ValueError, TypeError), match=message):
    check_sampling_args(**args)
  if "max_new_tokens" not in kwargs:
    options = {k: args[k] for k in ("temperature", "top_k", "top_p")}
    with pytest.raises((ValueError, TypeError), match=message):
      sample_next_token(random_logits(0), jax.random.key(0), **options)


def test_bad_logits_shape_raises():
  with pytest.raises(ValueError, match=r"logits.shape=\(32,\)"):
    sample_next_token(jnp.zeros(32), jax.random.key(0))


def test_sampling_options_are_checked_and_hashable():
  """One static jit argument: equal settings are one key (0 and 0.0 alike)."""
  assert SamplingOptions(0, top_p=1) == SamplingOptions(0.0, top_p=1.0)
  assert hash(SamplingOptions(0)) == hash(SamplingOptions(0.0))
  assert SamplingOptions.for_vocab(10, eos_token_id=np.int32(3)).eos_token_ids == (3,)
  with pytest.raises(ValueError, match="top_k=0"):
    SamplingOptions(top_k=0)
  with pytest.raises(TypeError, match=r"eos_token_ids=\(True,\)"):
    SamplingOptions(eos_token_ids=(True,))
  with pytest.raises(ValueError, match=r"eos_token_id=10: expected None, or ints in \[0, 10\)"):
    SamplingOptions.for_vocab(10, eos_token_id=10)

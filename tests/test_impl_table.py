"""The feature table (pallas_kernels.IMPLS) is enforced: a missing feature is an error.

For every impl and every feature it lacks, a request that needs exactly that
feature (plus ones the impl has) raises NotImplementedError naming it, before
any kernel runs, so no impl ever drops the window, segments or softcap.
"""

import glob
import os

import chex
import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import IMPLS, sliding_window_attention
from pallas_kernels.features import (
    ALL_FEATURES, BFLOAT16, BIDIRECTIONAL, CAUSAL, CAUSAL_WINDOW, FLOAT16,
    FLOAT32, GQA, LOCAL_WINDOW, RETURN_LSE, SEGMENT_IDS, SINKS, SOFTCAP,
    UNEQUAL_LENGTHS, default_impl, required_features)
from pallas_kernels.validation import check_attention_args

MASKS = (CAUSAL, CAUSAL_WINDOW, BIDIRECTIONAL, LOCAL_WINDOW)
DTYPES = (FLOAT32, BFLOAT16, FLOAT16)


def request(features):
  """Inputs and kwargs of a call whose required features are `features`."""
  mask = next(f for f in MASKS if f in features)
  dtype = jnp.dtype(next(f for f in DTYPES if f in features))
  q_len, kv_len = 8, 12 if UNEQUAL_LENGTHS in features else 8
  heads, kv_heads = (4, 2) if GQA in features else (2, 2)
  key = jax.random.key(0)
  q = jax.random.normal(key, (1, q_len, heads, 16), dtype)
  k = v = jax.random.normal(key, (1, kv_len, kv_heads, 16), dtype)
  kwargs = {
      CAUSAL: dict(causal=True, window=None),
      CAUSAL_WINDOW: dict(causal=True, window=3),
      BIDIRECTIONAL: dict(causal=False, window=None),
      LOCAL_WINDOW: dict(causal=False, window=(2, 1)),
  }[mask]
  if SEGMENT_IDS in features:
    kwargs["segment_ids"] = jnp.array([[0] * 4 + [1] * 4], jnp.int32)
  if SOFTCAP in features:
    kwargs["softcap"] = 5.0
  if SINKS in features:
    kwargs["sinks"] = jnp.linspace(-1.0, 1.0, heads)
  kwargs["return_lse"] = RETURN_LSE in features
  return (q, k, v), kwargs


def _lacking_cases():
  for impl, entry in IMPLS.items():
    supported = entry.features
    for feature in sorted(ALL_FEATURES - supported):
      base = {feature}
      if feature not in MASKS:
        base.add(next(f for f in MASKS if f in supported))
      if feature not in DTYPES:
        base.add(next(f for f in DTYPES if f in supported))
      yield pytest.param(impl, feature, frozenset(base), id=f"{impl}-{feature}")


@pytest.mark.parametrize("impl, feature, features", list(_lacking_cases()))
def test_missing_feature_raises_naming_it(impl, feature, features):
  (q, k, v), kwargs = request(features)
  problem = check_attention_args(
      q, k, v, window=kwargs["window"], causal=kwargs["causal"],
      segment_ids=kwargs.get("segment_ids"), softcap=kwargs.get("softcap"),
      scale=None, sinks=kwargs.get("sinks"))
  # The request needs exactly these features: only `feature` is missing.
  assert required_features(problem, kwargs["return_lse"]) == features
  with pytest.raises(NotImplementedError, match=f"impl='{impl}'.*{feature}"):
    sliding_window_attention(q, k, v, impl=impl, **kwargs)


def test_every_impl_lacking_something_is_tested():
  lacking = {impl for impl, entry in IMPLS.items()
             if entry.features != ALL_FEATURES}
  assert lacking == {"cudnn", "mosaic"}, lacking  # update the docs' table


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="CPU resolution")
def test_auto_is_xla_on_cpu():
  assert default_impl() == "xla"
  (q, k, v), kwargs = request({CAUSAL_WINDOW, FLOAT32, GQA})
  chex.assert_trees_all_equal(
      sliding_window_attention(q, k, v, impl="auto", **kwargs),
      sliding_window_attention(q, k, v, impl="xla", **kwargs))


def test_unknown_impl_is_a_value_error():
  (q, k, v), kwargs = request({CAUSAL, FLOAT32})
  with pytest.raises(ValueError, match="impl='flash'"):
    sliding_window_attention(q, k, v, impl="flash", **kwargs)


def feature_table_markdown() -> str:
  """The docs' feature table, generated from `IMPLS`."""
  impls = list(IMPLS)
  order = [*MASKS, SEGMENT_IDS, SOFTCAP, GQA, UNEQUAL_LENGTHS, RETURN_LSE,
           SINKS, *DTYPES]
  lines = ["| feature | " + " | ".join(f"`{i}`" for i in impls) + " |",
           "|---|" + "---|" * len(impls)]
  for feature in order:
    marks = ["yes" if feature in IMPLS[i].features else "no" for i in impls]
    lines.append(f"| {feature} | " + " | ".join(marks) + " |")
  return "\n".join(lines)


def test_feature_table_covers_every_feature():
  table = feature_table_markdown()
  assert all(f"| {f} |" in table for f in ALL_FEATURES)


def test_docs_show_the_current_table_once():
  # docs/backends.md holds it, and no other page keeps a copy to go stale.
  root = os.path.join(os.path.dirname(__file__), os.pardir)
  pages = [os.path.join(root, "README.md"),
           *glob.glob(os.path.join(root, "docs", "*.md"))]
  showing = []
  for page in pages:
    with open(page) as f:
      text = f.read()
    if "| feature | `reference`" in text:
      showing.append(os.path.basename(page))
  assert showing == ["backends.md"], showing
  with open(os.path.join(root, "docs", "backends.md")) as f:
    assert feature_table_markdown() in f.read()

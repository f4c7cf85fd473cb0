"""Logits parity with transformers (torch CPU, eager attention) for each family.

Tiny random HF models (every weight random, norms and biases included) are
saved with `save_pretrained`, loaded with `swajax.load_hf`, and run on
sequences five times longer than the window, for every attention impl. The
negative control runs the same weights with the windows removed on our side:
it must disagree, which proves transformers applied the window.
"""

import dataclasses

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import CausalLM, ModelConfig
from models.rope import rope_frequencies
from swajax.io.hf import load_hf

from tests import hf_models
from tests.hf_models import forward, hf_logits, max_diff, transformers

WINDOW, SEQ = 8, 40
TOLERANCE = 1e-4  # fp32 logits; observed ~1e-6 (summation order only)
IMPLS = ["reference", "xla", "pallas"]
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96,
             num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-6)

# family -> (HF config class, model class, config fields). Together they cover
# GQA, tied embeddings, q/k/v biases, q/k norms, mixed full/sliding layers and
# llama3 RoPE scaling (linear and yarn: `test_rope_variants_match_transformers`).
CASES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        num_hidden_layers=2, sliding_window=WINDOW, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
        max_window_layers=1, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_hidden_layers=3, head_dim=16, use_sliding_window=True,
        sliding_window=WINDOW, layer_types=[
            "sliding_attention", "full_attention", "sliding_attention"])),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_hidden_layers=2, rope_parameters=dict(
            rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16))),
}


def random_hf_model(family, **overrides):
  """A transformers model with every parameter random (fixed seed), eager attn."""
  config_cls, model_cls, fields = CASES[family]
  return hf_models.random_hf_model(config_cls, model_cls,
                                   **{**SMALL, **fields, **overrides})


@pytest.fixture(scope="module")
def checkpoint(request, tmp_path_factory):
  """(family, directory, input ids [2, SEQ], HF logits [2, SEQ, V])."""
  family = request.param
  model = random_hf_model(family)
  directory = tmp_path_factory.mktemp(family)
  ids, logits = hf_models.saved_checkpoint(model, directory,
                                           vocab_size=SMALL["vocab_size"], seq_len=SEQ)
  return family, directory, jnp.asarray(ids, jnp.int32), logits


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("checkpoint", sorted(CASES), indirect=True)
def test_logits_match_transformers(checkpoint, impl):
  family, directory, ids, expected = checkpoint
  model = load_hf(directory, attn_impl=impl)
  logits = forward(model, ids)
  chex.assert_type(logits, jnp.float32)
  diff = max_diff(logits, expected)
  print(f"{family} {impl}: max |logits diff| = {diff:.2e}")
  assert diff <= TOLERANCE, (family, impl, diff)


@pytest.mark.parametrize("checkpoint", ["mistral", "qwen2", "qwen3"],
                         indirect=True)
def test_without_windows_logits_disagree(checkpoint):
  """Negative control: HF really slides, so our full-attention twin differs."""
  family, directory, ids, expected = checkpoint
  model = load_hf(directory, attn_impl="reference")
  assert any(w is not None for w in model.config.layer_windows)
  full = model.with_full_attention()
  diff = max_diff(forward(full, ids), expected)
  print(f"{family} window removed: max |logits diff| = {diff:.2e}")
  assert diff > 100 * TOLERANCE, (family, diff)
  # Within the first window the two agree: only the window differs.
  assert max_diff(forward(full, ids)[:, :WINDOW], expected[:, :WINDOW]) <= TOLERANCE


# YaRN: the default attention factor (0.1 ln 4 + 1), and every optional key.
YARN = dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
            original_max_position_embeddings=16)
YARN_ALL_KEYS = dict(rope_type="yarn", rope_theta=5e5, factor=8.0,
                     original_max_position_embeddings=32, beta_fast=16.0,
                     beta_slow=2.0, mscale=0.707, mscale_all_dim=1.0, truncate=False)


@pytest.mark.parametrize("family, rope", [
    ("llama", dict(rope_type="linear", factor=4.0, rope_theta=1e4)),
    ("llama", dict(rope_type="default", rope_theta=123.0)),
    ("qwen3", YARN),
    ("qwen3", YARN_ALL_KEYS),
])
def test_rope_variants_match_transformers(tmp_path, family, rope):
  model = random_hf_model(family, rope_parameters=rope)
  model.save_pretrained(tmp_path)
  ids = jnp.asarray(
      np.random.default_rng(1).integers(0, SMALL["vocab_size"], (1, SEQ)), jnp.int32)
  ours = load_hf(tmp_path, attn_impl="reference")
  expected = hf_logits(model, ids)
  diff = max_diff(forward(ours, ids), expected)
  print(f"{family} {rope}: max |logits diff| = {diff:.2e}")
  assert diff <= TOLERANCE
  if rope["rope_type"] != "default":
    # Negative control: the same weights with plain RoPE disagree.
    plain = nnx.eval_shape(lambda: CausalLM(
        dataclasses.replace(ours.config, rope_scaling=None),
        attn_impl="reference", rngs=nnx.Rngs(0)))
    nnx.update(plain, nnx.state(ours))
    plain_diff = max_diff(forward(plain, ids), expected)
    print(f"  plain RoPE instead: {plain_diff:.2e}")
    assert plain_diff > 100 * TOLERANCE


def _hf_config(fields):
  """A transformers Qwen3Config read from a config.json dict, as from_pretrained."""
  return transformers.Qwen3Config.from_dict(
      {**SMALL, "model_type": "qwen3", "num_hidden_layers": 1, **fields})


@pytest.mark.parametrize("fields", [
    dict(head_dim=16, rope_parameters=YARN),
    dict(head_dim=16, rope_parameters=YARN_ALL_KEYS),
    dict(head_dim=128, rope_parameters=dict(  # Qwen3 long-context recipe
        rope_type="yarn", rope_theta=1e6, factor=4.0,
        original_max_position_embeddings=32768)),
    dict(head_dim=64, rope_parameters=dict(  # factor None: max_position / original
        rope_type="yarn", factor=None, original_max_position_embeddings=64,
        attention_factor=0.9, beta_fast=8)),
    dict(head_dim=32, rope_scaling=dict(type="yarn", factor=3.0)),  # HF 4 form
    # A top-level original_max_position_embeddings wins over the dict's.
    dict(head_dim=32, original_max_position_embeddings=32,
         rope_parameters=dict(rope_type="yarn", factor=2.0,
                              original_max_position_embeddings=64)),
    dict(head_dim=32, rope_parameters=dict(
        rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16)),
    dict(head_dim=32, rope_parameters=dict(rope_type="linear", factor=4.0)),
])
def test_rope_frequencies_match_transformers_init(fields):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  hf_config = _hf_config(fields)
  rope_type = hf_config.rope_parameters["rope_type"]
  expected, expected_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
  config = ModelConfig.from_hf({**SMALL, "model_type": "qwen3",
                                "num_hidden_layers": 1, **fields})
  inv_freq, attention_factor = rope_frequencies(config)
  # float32 pow differs between torch and numpy by at most one ulp.
  np.testing.assert_allclose(inv_freq, expected.numpy(), rtol=2e-7, atol=0)
  assert attention_factor == expected_factor
  # to_hf writes a config transformers reads to the same frequencies.
  assert ModelConfig.from_hf(config.to_hf()) == config
  again, again_factor = ROPE_INIT_FUNCTIONS[rope_type](
      transformers.Qwen3Config.from_dict(config.to_hf()), "cpu")
  np.testing.assert_array_equal(again.numpy(), expected.numpy())
  assert again_factor == expected_factor

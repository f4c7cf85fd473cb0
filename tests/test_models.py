"""CausalLM and ModelConfig: shapes, windows, packing, remat, config mapping.

HF numerical parity lives in test_hf_parity.py; this file needs no torch.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import lora as lora_lib
from models import (CausalLM, ModelConfig, llama_tiny, mistral_tiny, qwen2_tiny,
                    qwen3_tiny)

PRESETS = {"mistral": mistral_tiny, "qwen2": qwen2_tiny, "qwen3": qwen3_tiny,
           "llama": llama_tiny}
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
             num_q_heads=4, num_kv_heads=2, head_dim=16)


def tiny(family, **overrides):
  """A 2-layer D=64 config; mistral/qwen windows of 4."""
  windows = {"mistral": (4, 4), "qwen2": (None, 4), "qwen3": (None, 4),
             "llama": (None, None)}[family]
  return PRESETS[family](**{**SMALL, "layer_windows": windows, **overrides})


def tokens(seed, batch, seq, vocab=128):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab, jnp.int32)


@nnx.jit
def forward(model, input_ids, positions=None, segment_ids=None):
  """Jitted `model(...)` (eager NNX calls are slow on CPU)."""
  return model(input_ids, positions=positions, segment_ids=segment_ids)


@pytest.mark.parametrize("family", sorted(PRESETS))
def test_presets_build_and_round_trip_hf_config(family):
  config = PRESETS[family]()
  assert config.model_type == family
  assert ModelConfig.from_hf(config.to_hf()) == config
  assert ModelConfig.from_hf(tiny(family).to_hf()) == tiny(family)


FAMILY_PRESETS = {"gemma2": "gemma2_tiny", "gemma3_text": "gemma3_tiny",
                  "ministral": "ministral_tiny", "phi3": "phi3_tiny",
                  "starcoder2": "starcoder2_tiny", "olmo3": "olmo3_tiny",
                  "smollm3": "smollm3_tiny", "cohere2": "cohere2_tiny"}


@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_family_presets_run_and_round_trip_hf_config(family):
  """The sliding-window families' presets (HF parity: test_families.py):
  6 layers so that every layer pattern has sliding and full layers."""
  config = getattr(models, FAMILY_PRESETS[family])(**{**SMALL, "num_layers": 6})
  assert config.model_type == family
  assert any(w is not None for w in config.layer_windows)
  assert ModelConfig.from_hf(config.to_hf()) == config
  assert ModelConfig.from_hf(getattr(models, FAMILY_PRESETS[family])().to_hf()) == (
      getattr(models, FAMILY_PRESETS[family])())
  model = CausalLM(config, attn_impl="reference", rngs=nnx.Rngs(0))
  logits = forward(model, tokens(0, 1, 8))
  chex.assert_shape(logits, (1, 8, config.vocab_size))
  chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("overrides, match", [
    (dict(block="sandwich"), "block='sandwich'"),
    (dict(norm="layer_norm"), "norm='layer_norm'"),
    (dict(layer_rope=("rope",)), "expected 2 entries"),
    (dict(layer_rope=("rope", "local_rope")), "local_rope_theta=None"),
    (dict(attn_softcap=0.0), "attn_softcap=0.0"),
])
def test_variant_field_validation(overrides, match):
  with pytest.raises(ValueError, match=match):
    tiny("mistral", **overrides)


@pytest.mark.parametrize("config, match", [
    (models.cohere2_tiny(num_layers=4, layer_rope=("rope",) * 4),
     "RoPE on exactly the sliding layers"),
    (models.gemma3_tiny(num_layers=2, layer_windows=(4, 4),
                        layer_rope=("rope", "local_rope")), "local RoPE on exactly"),
    (tiny("mistral", layer_rope=("rope", "nope")), "applies RoPE to every layer"),
])
def test_to_hf_refuses_inexpressible_rope(config, match):
  with pytest.raises(ValueError, match=match):
    config.to_hf()


@pytest.mark.parametrize("family, tied", [
    ("mistral", False), ("qwen2", True), ("qwen3", False), ("llama", True)])
def test_forward_shapes_and_submodules(family, tied):
  config = tiny(family, tie_word_embeddings=tied)
  model = CausalLM(config, attn_impl="reference", rngs=nnx.Rngs(0))
  logits = forward(model, tokens(0, 2, 12))
  chex.assert_shape(logits, (2, 12, config.vocab_size))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  assert hasattr(model, "lm_head") != tied
  layer = model.layers[1]
  assert layer.attn.window == config.layer_windows[1]
  assert (layer.attn.q_norm is not None) == (family == "qwen3")
  assert (layer.attn.q_proj.bias is not None) == (family == "qwen2")
  chex.assert_shape(layer.mlp.gate_proj.kernel[...], (64, 96))


def _logit_change(config, seq):
  """|logits(x) - logits(x with token 0 changed)| per position, [T]."""
  model = CausalLM(config, attn_impl="reference", rngs=nnx.Rngs(1))
  x = tokens(3, 1, seq)
  y = x.at[0, 0].set((x[0, 0] + 1) % config.vocab_size)
  diff = jnp.abs(forward(model, x) - forward(model, y)).max(axis=(0, 2))
  return np.asarray(diff)


def test_window_limits_receptive_field():
  # 2 layers of window 4: token 0 reaches positions <= 2 * (4 - 1) = 6 only.
  diff = _logit_change(tiny("mistral"), seq=16)
  assert np.all(diff[:7] > 1e-6), diff
  np.testing.assert_array_equal(diff[7:], 0.0)
  # Negative control: the same weights without windows see token 0 everywhere.
  diff_full = _logit_change(tiny("mistral").with_full_attention(), seq=16)
  assert np.all(diff_full > 1e-6), diff_full


@pytest.mark.parametrize("family, tied", [("mistral", False), ("qwen2", True)])
def test_with_full_attention_shares_params_and_drops_only_the_window(family, tied):
  config = tiny(family, tie_word_embeddings=tied)  # windows (4, 4) / (None, 4)
  model = CausalLM(config, attn_impl="reference", remat="full", rngs=nnx.Rngs(4))
  full = model.with_full_attention()
  assert full.config == config.with_full_attention()
  assert [layer.attn.window for layer in full.layers] == [None, None]
  assert [layer.attn.window for layer in model.layers] == list(config.layer_windows)
  assert (full.attn_impl, full.remat) == ("reference", "full")
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  shared = jax.tree.leaves(nnx.state(full, nnx.Param))
  assert len(shared) == len(params)
  assert all(a is b for a, b in zip(shared, params))  # the same arrays, no copy
  x = tokens(7, 2, 12)
  logits, logits_full = forward(model, x), forward(full, x)
  # Positions 0..W-1 see all their keys either way; past W the window matters.
  chex.assert_trees_all_close(logits_full[:, :4], logits[:, :4], atol=1e-6, rtol=0)
  assert float(jnp.abs(logits_full[:, 4:] - logits[:, 4:]).max()) > 1e-3


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_packed_segments_equal_separate_documents(family):
  config = tiny(family)
  model = CausalLM(config, attn_impl="reference", rngs=nnx.Rngs(2))
  doc_a, doc_b = tokens(4, 1, 7), tokens(5, 1, 9)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  segment_ids = jnp.asarray([[0] * 7 + [1] * 9], jnp.int32)
  positions = jnp.asarray([list(range(7)) + list(range(9))], jnp.int32)
  logits = forward(model, packed, positions, segment_ids)
  expected = jnp.concatenate([forward(model, doc_a), forward(model, doc_b)],
                             axis=1)
  chex.assert_trees_all_close(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lora", [False, True])
def test_remat_keeps_loss_and_grads(lora):
  """With LoRA as a LoRA run trains: the gradient of the adapters only, the
  frozen base an input of the jitted function."""
  config = tiny("qwen2")
  x = tokens(6, 2, 10)

  def loss_and_grads(remat):
    model = CausalLM(config, attn_impl="reference", remat=remat,
                     rngs=nnx.Rngs(3))
    if lora:
      model = lora_lib.add_lora(model, lora_lib.LoraSpec(rank=2, alpha=4.0),
                                rngs=nnx.Rngs(4))
    graphdef, params, rest = nnx.split(model, lora_lib.TRAINABLE if lora else nnx.Param, ...)
    loss = lambda p, rest: jnp.mean(
        jax.nn.log_softmax(nnx.merge(graphdef, p, rest)(x))[..., 0])
    return jax.jit(jax.value_and_grad(loss))(params, rest)

  expected = loss_and_grads("none")
  for remat in ("full", "dots_saveable"):
    chex.assert_trees_all_close(loss_and_grads(remat), expected, atol=1e-6)


def test_bfloat16_compute():
  config = tiny("qwen3")
  model = CausalLM(config, dtype=jnp.bfloat16, attn_impl="reference",
                   rngs=nnx.Rngs(0))
  reference = CausalLM(config, attn_impl="reference", rngs=nnx.Rngs(0))
  x = tokens(7, 1, 12)
  logits = forward(model, x)
  chex.assert_type(logits, jnp.float32)
  # Same fp32 weights, bf16 activations: logits (|x| ~ 0.6) within bf16 rounding.
  assert float(jnp.max(jnp.abs(logits - forward(reference, x)))) < 2e-2


def test_sharding_annotations():
  model = CausalLM(tiny("qwen2"), rngs=nnx.Rngs(0))
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  attn = specs["layers"][0]["attn"]
  assert attn["q_proj"]["kernel"].get_value() == jax.P("fsdp", None, None)
  assert attn["q_proj"]["bias"].get_value() == jax.P(None, None)
  assert attn["o_proj"]["kernel"].get_value() == jax.P(None, None, "fsdp")
  assert specs["layers"][0]["mlp"]["down_proj"]["kernel"].get_value() == jax.P(None, "fsdp")
  assert specs["embed"]["embedding"].get_value() == jax.P(None, "fsdp")
  assert specs["lm_head"]["kernel"].get_value() == jax.P("fsdp", None)
  assert specs["norm"]["weight"].get_value() == jax.P(None)


MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral",
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def test_real_size_shapes_without_allocating():
  config = ModelConfig.from_hf(MISTRAL_7B)
  assert config.layer_windows == (4096,) * 32 and config.head_dim == 128
  model = nnx.eval_shape(lambda: CausalLM(config, param_dtype=jnp.bfloat16,
                                          rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  count = sum(x.size for x in jax.tree.leaves(params))
  assert count == 7_241_732_096  # Mistral-7B-v0.1
  chex.assert_shape(params["layers"][31]["attn"]["k_proj"]["kernel"].get_value(),
                    (4096, 8, 128))


# ----- ModelConfig.from_hf rules ------------------------------------------------

def _hf(model_type, **fields):
  base = {"model_type": model_type, "vocab_size": 128, "hidden_size": 64,
          "intermediate_size": 96, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2}
  return {**base, **fields}


@pytest.mark.parametrize("hf, windows", [
    (_hf("mistral", sliding_window=8), (8, 8, 8, 8)),
    (_hf("mistral", sliding_window=None), (None,) * 4),
    (_hf("mistral"), (4096,) * 4),  # transformers' class default
    (_hf("qwen2", sliding_window=8), (None,) * 4),  # use_sliding_window False
    (_hf("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1),
     (None, 8, 8, 8)),
    (_hf("qwen3", use_sliding_window=True, sliding_window=8, max_window_layers=1,
         layer_types=["sliding_attention", "full_attention"] * 2),
     (8, None, 8, None)),  # layer_types wins over max_window_layers
    (_hf("llama"), (None,) * 4),
])
def test_from_hf_windows(hf, windows):
  assert ModelConfig.from_hf(hf).layer_windows == windows


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "llama"])
def test_from_hf_absent_keys_take_transformers_class_defaults(family):
  """A config.json with only the required keys reads as transformers reads it."""
  transformers = pytest.importorskip("transformers")
  required = {"vocab_size": 128, "hidden_size": 128, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 64}
  hf = transformers.AutoConfig.for_model(family, **required)
  ours = ModelConfig.from_hf({"model_type": family, **required})
  assert (ours.num_kv_heads, ours.head_dim, ours.rope_theta, ours.rms_norm_eps,
          ours.tie_word_embeddings, ours.max_position_embeddings) == (
              hf.num_key_value_heads,
              getattr(hf, "head_dim", None) or 128 // 64,
              hf.rope_parameters["rope_theta"], hf.rms_norm_eps,
              hf.tie_word_embeddings, hf.max_position_embeddings)


@pytest.mark.parametrize("hf, match", [
    (_hf("gemma"), "model_type='gemma'"),
    (_hf("mistral", hidden_act="gelu"), "hidden_act='gelu'"),
    (_hf("qwen2", attention_dropout=0.1), "attention_dropout=0.1"),
    (_hf("llama", attention_bias=True), "attention_bias=True"),
    (_hf("llama", mlp_bias=True), "mlp_bias=True"),
    (_hf("llama", sliding_window=8), "sliding_window=8"),
    (_hf("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
     "rope_type='dynamic'"),
    (_hf("llama", rope_scaling={"rope_type": "longrope", "short_factor": [1.0],
                                "long_factor": [2.0]}), "rope_type='longrope'"),
    (_hf("llama", rope_scaling={"rope_type": "linear"}), "expects the keys"),
    (_hf("qwen3", rope_parameters={"rope_type": "yarn"}), "expects the keys"),
    (_hf("qwen3", rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                   "low_freq_factor": 1.0}), "optionally"),
    (_hf("qwen2", layer_types=["sliding_attention"] * 4), "no window"),
    (_hf("mistral", sliding_window=8, layer_types=["full_attention"] * 4),
     "ignores layer_types"),
    ({k: v for k, v in _hf("qwen2").items() if k != "vocab_size"}, "vocab_size"),
])
def test_from_hf_refuses_what_it_cannot_honour(hf, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig.from_hf(hf)


def test_rope_scaling_forms():
  legacy = _hf("llama", rope_theta=5e5, rope_scaling={
      "type": "linear", "factor": 4.0})
  v5 = _hf("llama", rope_parameters={
      "rope_type": "linear", "factor": 4.0, "rope_theta": 5e5})
  config = ModelConfig.from_hf(legacy)
  assert config == ModelConfig.from_hf(v5)
  assert config.rope_theta == 5e5
  assert config.rope_scaling_dict == {"rope_type": "linear", "factor": 4.0}
  assert ModelConfig.from_hf(config.to_hf()) == config
  hash(config)


def test_yarn_round_trip_and_original_length_rule():
  yarn = {"rope_type": "yarn", "factor": 4.0, "mscale": 0.7, "truncate": False}
  config = ModelConfig.from_hf(_hf("qwen3", max_position_embeddings=512,
                                   rope_parameters=yarn))
  # As transformers: original_max_position_embeddings defaults to max_position.
  assert config.rope_scaling_dict == {**yarn, "original_max_position_embeddings": 512}
  assert ModelConfig.from_hf(config.to_hf()) == config
  hash(config)
  # A top-level original_max_position_embeddings wins over the dict's.
  top = ModelConfig.from_hf(_hf(
      "qwen3", original_max_position_embeddings=64,
      rope_parameters={**yarn, "original_max_position_embeddings": 128}))
  assert top.rope_scaling_dict["original_max_position_embeddings"] == 64


@pytest.mark.parametrize("config, match", [
    (tiny("mistral", layer_windows=(None, 4)), "every layer or to none"),
    (tiny("qwen2", layer_windows=(8, 4)), "one sliding_window size"),
    (tiny("llama", layer_windows=(None, 4)), "no sliding window"),
])
def test_to_hf_refuses_inexpressible_windows(config, match):
  with pytest.raises(ValueError, match=match):
    config.to_hf()


@pytest.mark.parametrize("overrides, match", [
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(layer_windows=(4,)), "expected 2 entries"),
    (dict(layer_windows=(0, 4)), "None or int >= 1"),
    (dict(qk_norm=True), "qk_norm"),
    (dict(head_dim=15), "even"),
])
def test_config_validation(overrides, match):
  with pytest.raises(ValueError, match=match):
    tiny("mistral", **overrides)


def test_bad_call_arguments():
  model = CausalLM(tiny("llama"), attn_impl="reference", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="input_ids"):
    model(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="positions"):
    model(jnp.zeros((1, 4), jnp.int32), positions=jnp.zeros((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="remat='some'"):
    CausalLM(tiny("llama"), remat="some", rngs=nnx.Rngs(0))

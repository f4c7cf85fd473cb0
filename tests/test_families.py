"""The sliding-window families against transformers 5 (torch CPU, eager).

For each family (`CASES`): a tiny random transformers model with mixed
sliding / full layers is saved with `save_pretrained`, loaded with
`swajax.load_hf`, and checked on sequences several windows long:
  * fp32 logits within 1e-4 of transformers for every attention impl;
  * the negative control (our windows removed) disagrees;
  * greedy `swajax.generate` equals transformers' `generate(do_sample=False)`
    for 3W + 2 new tokens (the rolling caches wrap three times);
  * `save_hf` -> `from_pretrained` gives the same logits;
  * `swajax train --init-from-hf` fine-tunes it (the loss falls);
  * `jax.eval_shape` of a real-size config has transformers' parameter count;
  * `ModelConfig.from_hf` refuses what it cannot honour, naming the field.
"""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import swajax
from models import CausalLM, ModelConfig
from swajax.cli import train as train_cli
from swajax.io.hf import load_hf, save_hf

from tests import hf_models
from tests.hf_models import forward, hf_logits, max_diff, torch, transformers

WINDOW, SEQ = 6, 20  # 3.3 windows
NEW_TOKENS = 3 * WINDOW + 2
TOLERANCE = 1e-4
IMPLS = ["reference", "xla", "pallas"]
SLIDE, FULL = "sliding_attention", "full_attention"
# vocab >= 264: the byte tokenizer of the training run.
SMALL = dict(vocab_size=272, hidden_size=64, intermediate_size=96,
             num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)

# family -> (HF config class, model class, config fields).
CASES = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_hidden_layers=3, head_dim=16, sliding_window=WINDOW,
        query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0)),  # layer_types: the default alternation
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=3, head_dim=16, sliding_window=WINDOW,
        query_pre_attn_scalar=24, layer_types=[SLIDE, FULL, SLIDE],
        rope_parameters={
            FULL: dict(rope_type="linear", factor=2.0, rope_theta=1e6),
            SLIDE: dict(rope_type="default", rope_theta=1e4)})),
    "ministral": ("MinistralConfig", "MinistralForCausalLM", dict(
        num_hidden_layers=3, head_dim=16, sliding_window=WINDOW,
        layer_types=[SLIDE, FULL, SLIDE])),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        num_hidden_layers=2, sliding_window=WINDOW)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(
        num_hidden_layers=2, sliding_window=WINDOW)),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(
        num_hidden_layers=3, sliding_window=WINDOW,
        layer_types=[SLIDE, FULL, SLIDE])),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(
        num_hidden_layers=4, use_sliding_window=True, sliding_window=WINDOW,
        no_rope_layers=[1, 0, 1, 0])),  # layer_types: sliding on the NoPE layers
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(
        num_hidden_layers=3, sliding_window=WINDOW, logit_scale=0.5,
        layer_types=[SLIDE, FULL, SLIDE])),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_hidden_layers=2, sliding_window=WINDOW, num_local_experts=4,
        num_experts_per_tok=2, experts_implementation="eager")),
    # Sinks, biases, YaRN (the class default: factor 32 from 4096, untruncated);
    # swiglu_limit 0.5 so the experts' clamp is hit.
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        num_hidden_layers=3, head_dim=16, sliding_window=WINDOW,
        num_local_experts=4, num_experts_per_tok=2, swiglu_limit=0.5,
        layer_types=[SLIDE, FULL, SLIDE], experts_implementation="eager")),
}
# Families whose every layer slides (the others mix sliding and full layers).
EVERY_LAYER_SLIDES = ("phi3", "starcoder2", "mixtral")
FAMILIES = sorted(CASES)


def random_hf_model(family):
  """A transformers model with every parameter random (fixed seed), eager attn."""
  config_cls, model_cls, fields = CASES[family]
  return hf_models.random_hf_model(config_cls, model_cls, **SMALL, **fields)


@pytest.fixture(scope="module")
def checkpoint(request, tmp_path_factory):
  """(family, directory, HF model, input ids [2, SEQ], HF logits [2, SEQ, V])."""
  family = request.param
  model = random_hf_model(family)
  directory = tmp_path_factory.mktemp(family)
  ids, logits = hf_models.saved_checkpoint(model, directory,
                                           vocab_size=SMALL["vocab_size"], seq_len=SEQ)
  return family, directory, model, jnp.asarray(ids, jnp.int32), logits


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("checkpoint", FAMILIES, indirect=True)
def test_logits_match_transformers(checkpoint, impl):
  family, directory, _, ids, expected = checkpoint
  model = load_hf(directory, attn_impl=impl)
  windows = model.config.layer_windows
  assert WINDOW in windows and (None in windows) == (
      family not in EVERY_LAYER_SLIDES), windows
  logits = forward(model, ids)
  chex.assert_type(logits, jnp.float32)
  diff = max_diff(logits, expected)
  print(f"{family} {impl}: max |logits diff| = {diff:.2e}")
  assert diff <= TOLERANCE, (family, impl, diff)


@pytest.mark.parametrize("checkpoint", ["gemma2", "gpt_oss"], indirect=True)
def test_splash_logits_match_transformers(checkpoint):
  """impl="splash" (JAX's TPU kernel, interpreted here) for a whole model:
  Gemma 2's attention softcap and gpt-oss's sinks, sliding and full layers;
  its windowless twin (splash too) disagrees past the first window."""
  family, directory, _, ids, expected = checkpoint
  model = load_hf(directory, attn_impl="splash")
  diff = max_diff(forward(model, ids), expected)
  print(f"{family} splash: max |logits diff| = {diff:.2e}")
  assert diff <= TOLERANCE, (family, diff)
  full = model.with_full_attention()
  assert full.attn_impl == "splash"
  assert max_diff(forward(full, ids), expected) > 100 * TOLERANCE, family


@pytest.mark.parametrize("checkpoint", FAMILIES, indirect=True)
def test_without_windows_logits_disagree(checkpoint):
  """Negative control: transformers really slides, so our full twin differs
  past the first window, and agrees within it."""
  family, directory, _, ids, expected = checkpoint
  full = load_hf(directory, attn_impl="reference").with_full_attention()
  diff = max_diff(forward(full, ids), expected)
  print(f"{family} window removed: max |logits diff| = {diff:.2e}")
  assert diff > 100 * TOLERANCE, (family, diff)
  assert max_diff(forward(full, ids)[:, :WINDOW], expected[:, :WINDOW]) <= TOLERANCE


def _without_sinks(model):
  for layer in model.layers:
    layer.attn.sinks[...] = jnp.full_like(layer.attn.sinks[...], -1e30)
  return model


def _plain_rope(model):
  import dataclasses
  config = dataclasses.replace(model.config, rope_scaling=None)
  twin = nnx.eval_shape(lambda: CausalLM(config, attn_impl=model.attn_impl,
                                         rngs=nnx.Rngs(0)))
  nnx.update(twin, nnx.state(model))
  return twin


@pytest.mark.parametrize("change", [_without_sinks, _plain_rope])
@pytest.mark.parametrize("checkpoint", ["gpt_oss"], indirect=True)
def test_gpt_oss_sinks_and_yarn_matter(checkpoint, change):
  """Negative controls of gpt-oss: with the sinks at -inf (out of every
  softmax) or plain RoPE instead of YaRN, the logits disagree."""
  _, directory, _, ids, expected = checkpoint
  diff = max_diff(forward(change(load_hf(directory, attn_impl="reference")), ids),
                  expected)
  print(f"gpt_oss {change.__name__}: max |logits diff| = {diff:.2e}")
  assert diff > 100 * TOLERANCE, diff


@pytest.mark.parametrize("checkpoint", FAMILIES, indirect=True)
def test_greedy_generation_matches_transformers(checkpoint):
  family, directory, hf_model, ids, _ = checkpoint
  prompt = np.asarray(ids[:, :4])
  hf_model.generation_config.eos_token_id = None
  hf_model.generation_config.pad_token_id = 0
  with torch.no_grad():
    expected = hf_model.generate(
        torch.tensor(prompt), attention_mask=torch.ones(prompt.shape),
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False).numpy()
  ours = swajax.generate(load_hf(directory, attn_impl="xla"), prompt,
                         max_new_tokens=NEW_TOKENS)
  assert expected.shape == ours.shape == (2, 4 + NEW_TOKENS)
  np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("checkpoint", FAMILIES, indirect=True)
def test_save_hf_round_trips_through_transformers(checkpoint, tmp_path):
  family, directory, _, ids, _ = checkpoint
  ours = load_hf(directory, attn_impl="reference")
  save_hf(ours, tmp_path / "out")
  again = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "out", attn_implementation="eager").eval()
  assert type(again).__name__ == CASES[family][1]
  diff = max_diff(hf_logits(again, ids), forward(ours, ids))
  assert diff <= TOLERANCE, (family, diff)
  assert ModelConfig.from_hf(tmp_path / "out") == ours.config


@pytest.mark.parametrize("checkpoint", FAMILIES, indirect=True)
def test_train_init_from_hf_end_to_end(checkpoint, tmp_path, capsys):
  """`swajax train --init-from-hf DIR`: a few steps of fine-tuning lower the
  loss, and the run exports a checkpoint of the same family."""
  family, directory, _, _, _ = checkpoint
  run = tmp_path / "run"
  argv = ["--init-from-hf", str(directory), "--out", str(run), "--steps", "6",
          "--seq-len", "32", "--batch-size", "4", "--lr", "3e-3",
          "--warmup-steps", "1", "--eval-every", "6", "--eval-batches", "1",
          "--checkpoint-every", "6", "--corpus-max-bytes", "20000",
          "--dtype", "float32", "--attn-impl", "xla", "--sample-tokens", "0",
          "--tokenizer", "bytes"]
  assert train_cli.main(argv) == 0
  capsys.readouterr()
  losses = [json.loads(line)["loss"]
            for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert len(losses) == 6 and losses[-1] < losses[0], losses
  assert json.loads((run / "hf" / "config.json").read_text())["model_type"] == family


# ----- Real sizes: parameter counts without allocating --------------------------

REAL = {
    "gemma2": dict(  # Gemma-2-9B
        vocab_size=256000, hidden_size=3584, intermediate_size=14336,
        num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
        head_dim=256, query_pre_attn_scalar=256, sliding_window=4096),
    "gemma3_text": dict(  # Gemma-3-4B (text)
        vocab_size=262208, hidden_size=2560, intermediate_size=10240,
        num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
        head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_theta=1e6,
        rope_local_base_freq=10000.0, sliding_window_pattern=6),
    "ministral": dict(  # Ministral-8B
        vocab_size=131072, hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, sliding_window=32768, rope_theta=1e8,
        layer_types=[FULL, SLIDE, SLIDE, SLIDE] * 9),
    "phi3": dict(  # Phi-3-mini-4k
        vocab_size=32064, hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        sliding_window=2047, max_position_embeddings=4096),
    "starcoder2": dict(  # StarCoder2-3B
        vocab_size=49152, hidden_size=3072, intermediate_size=12288,
        num_hidden_layers=30, num_attention_heads=24, num_key_value_heads=2,
        sliding_window=4096, max_position_embeddings=16384),
    "olmo3": dict(  # Olmo-3-7B
        vocab_size=100278, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        sliding_window=4096, max_position_embeddings=65536),
    "smollm3": dict(  # SmolLM3-3B
        vocab_size=128256, hidden_size=2048, intermediate_size=11008,
        num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=4,
        rope_theta=5e6, max_position_embeddings=65536),
    "mixtral": dict(  # Mixtral-8x7B (no window in its config)
        vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6),
    "gpt_oss": dict(  # gpt-oss-20b
        vocab_size=201088, hidden_size=2880, intermediate_size=2880,
        num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8,
        head_dim=64, num_local_experts=32, num_experts_per_tok=4,
        sliding_window=128),
    "cohere2": dict(  # Command-R7B
        vocab_size=256000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        sliding_window=4096, sliding_window_pattern=4, logit_scale=0.25,
        rope_theta=50000.0),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_real_size_parameter_counts_match_transformers(family):
  ours = ModelConfig.from_hf({"model_type": family, **REAL[family]})
  model = nnx.eval_shape(lambda: CausalLM(ours, param_dtype=jnp.bfloat16,
                                          rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  hf_config = transformers.AutoConfig.for_model(family, **REAL[family])
  with torch.device("meta"):
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
  expected = sum(p.numel() for p in hf_model.parameters())
  print(f"{family}: {count:,} parameters")
  assert count == expected, (family, count, expected)
  hf_windows = tuple(
      hf_config.sliding_window if t == SLIDE else None
      for t in getattr(hf_config, "layer_types", None) or
      [SLIDE if hf_config.sliding_window else FULL] * hf_config.num_hidden_layers)
  assert ours.layer_windows == hf_windows


# ----- from_hf: clear errors for what it cannot honour ----------------------------

def _hf(family, **fields):
  return {"model_type": family, **SMALL, **CASES[family][2], **fields}


@pytest.mark.parametrize("hf, match", [
    (_hf("gemma2", hidden_activation="gelu"), "hidden_activation='gelu'"),
    (_hf("gemma2", attention_bias=True), "attention_bias=True"),
    (_hf("gemma2", use_bidirectional_attention=True),
     "use_bidirectional_attention=True"),
    (_hf("gemma2", layer_types=[SLIDE] * 2), "expected 3 entries"),
    (_hf("gemma3_text", rope_parameters={
        FULL: dict(rope_type="default"), SLIDE: dict(rope_type="linear", factor=2.0)}),
     "default RoPE only"),
    (_hf("ministral", sliding_window=None), "sliding_window=None"),
    (_hf("phi3", rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                               "long_factor": [1.0] * 8}), "rope_type='longrope'"),
    (_hf("phi3", partial_rotary_factor=0.75), "partial_rotary_factor=0.75"),
    (_hf("phi3", resid_pdrop=0.1), "resid_pdrop=0.1"),
    (_hf("phi3", embd_pdrop=0.1), "embd_pdrop=0.1"),
    (_hf("starcoder2", use_bias=False), "use_bias=False"),
    (_hf("starcoder2", hidden_act="gelu"), "hidden_act='gelu'"),
    (_hf("starcoder2", residual_dropout=0.1), "residual_dropout=0.1"),
    (_hf("olmo3", attention_bias=True), "attention_bias=True"),
    (_hf("smollm3", use_sliding_window=False, layer_types=[SLIDE, FULL] * 2),
     "use_sliding_window=False"),
    (_hf("smollm3", no_rope_layers=[1, 0]), "no_rope_layers"),
    (_hf("smollm3", mlp_bias=True), "mlp_bias=True"),
    (_hf("cohere2", attention_bias=True), "attention_bias=True"),
    (_hf("cohere2", hidden_act="gelu"), "hidden_act='gelu'"),
    (_hf("mixtral", router_jitter_noise=0.1), "router_jitter_noise=0.1"),
    (_hf("mixtral", hidden_act="gelu"), "hidden_act='gelu'"),
    (_hf("mixtral", num_experts_per_tok=5), "experts_per_token=5"),
    (_hf("gpt_oss", attention_bias=False), "attention_bias=False"),
    (_hf("gpt_oss", quantization_config={"quant_method": "fp8"}),
     "quant_method='fp8'"),
    (_hf("mixtral", quantization_config={"quant_method": "mxfp4"}),
     "quant_method='mxfp4'.*model_type='mixtral'"),
    (_hf("gpt_oss", layer_types=[SLIDE, "chunked_attention", FULL]),
     "chunked_attention"),
])
def test_from_hf_refuses_what_it_cannot_honour(hf, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig.from_hf(hf)


@pytest.mark.parametrize("family, fields", [
    ("olmo3", dict(rope_theta=1234.0)),  # full layers only; sliding keep 5e5
    ("gemma3_text", dict(rope_theta=1234.0, rope_local_base_freq=99.0,
                         rope_scaling=dict(rope_type="linear", factor=2.0))),
    ("gemma3_text", dict(rope_parameters={FULL: dict(rope_type="default")})),
])
def test_per_layer_type_rope_reads_as_transformers(family, fields):
  hf = transformers.AutoConfig.for_model(family, num_hidden_layers=4, **fields)
  ours = ModelConfig.from_hf({"model_type": family, **SMALL,
                              "num_hidden_layers": 4, **fields})
  full, sliding = hf.rope_parameters[FULL], hf.rope_parameters[SLIDE]
  assert (ours.rope_theta, ours.local_rope_theta) == (
      full["rope_theta"], sliding["rope_theta"])
  assert (ours.rope_scaling_dict or {}).get("factor") == full.get("factor")
  assert ModelConfig.from_hf(ours.to_hf()) == ours


def test_flat_rope_parameters_refused_where_transformers_ignores_them():
  with pytest.raises(ValueError, match="a dict per layer type"):
    ModelConfig.from_hf(_hf("olmo3", rope_parameters=dict(
        rope_type="default", rope_theta=77.0)))


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_absent_keys_take_transformers_class_defaults(family):
  """A config.json with only the required keys reads as transformers reads it."""
  required = {"vocab_size": 128, "hidden_size": 128, "intermediate_size": 96,
              "num_hidden_layers": 4, "num_attention_heads": 8}
  hf = transformers.AutoConfig.for_model(family, **required)
  ours = ModelConfig.from_hf({"model_type": family, **required})
  layer_types = getattr(hf, "layer_types", None) or (
      [SLIDE if hf.sliding_window else FULL] * 4)
  assert ours.layer_windows == tuple(
      hf.sliding_window if t == SLIDE else None for t in layer_types)
  assert (ours.num_kv_heads, ours.tie_word_embeddings,
          ours.max_position_embeddings) == (
              hf.num_key_value_heads, hf.tie_word_embeddings,
              hf.max_position_embeddings)
  theta = hf.rope_parameters.get(FULL, hf.rope_parameters)["rope_theta"]
  assert ours.rope_theta == theta

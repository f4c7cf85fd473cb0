"""LoRA / QLoRA (models.lora) and PEFT adapters (swajax.io.peft).

The adapter-only training contract (optimizer state, checkpoints, untouched
base arrays, exact resume), QLoRA's base bytes, and PEFT parity both ways:
an adapter trained by swajax loaded by `peft.PeftModel.from_pretrained`, and
one created by `peft` (random non-zero B) loaded by `swajax.load_hf(adapter=)`,
both against transformers eager in fp32; the merged export against both.
"""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import lora as lora_lib
from swajax.io import peft as peft_io
from swajax import sharding as sharding_lib
from swajax.cli import train as train_cli
from swajax.training import loop as loop_lib, optimizer as optimizer_lib, state as state_lib, step as step_lib
from swajax.io.hf import load_hf
from swajax.io.hf_tensors import tensor_table
from tests.attention_cases import jaxpr_equations
from tests.test_train import TINY_MODEL, tiny_train_config

TOLERANCE = 1e-4  # fp32 logits vs torch
LORA = dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, lr=1e-2)


def tiny_model(**overrides):
  return models.CausalLM(models.mistral_tiny(**{**TINY_MODEL, **overrides}),
                         rngs=nnx.Rngs(0), attn_impl="xla")


def ids(batch=2, seq=24, vocab=256):
  return jax.random.randint(jax.random.key(1), (batch, seq), 0, vocab)


# ----- The wrapper -----------------------------------------------------------------

def test_fresh_adapter_changes_nothing_and_copies_no_base_array():
  model = tiny_model()
  before = model(ids())
  kernels = {path: var.get_value() for path, var in
             nnx.to_flat_state(nnx.state(model, nnx.Param))}
  lora_lib.add_lora(model, lora_lib.LoraSpec(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
  chex.assert_trees_all_equal(model(ids()), before)
  base = dict(nnx.to_flat_state(nnx.state(model, nnx.Not(lora_lib.TRAINABLE))))
  for path, array in kernels.items():
    assert base[path].get_value() is array, path  # the same array, not a copy
  adapters = nnx.state(model, lora_lib.TRAINABLE)
  assert len(jax.tree.leaves(adapters)) == 2 * 7  # one layer, 7 targets, A and B


def test_experts_take_no_adapter_and_attention_does():
  """A mixture of experts (gpt-oss) has no gate/up/down projections to adapt:
  asking for them is an error naming what it has; the attention adapts."""
  model = models.CausalLM(models.gpt_oss_tiny(**TINY_MODEL, num_experts=4,
                                              experts_per_token=2),
                          rngs=nnx.Rngs(0), attn_impl="xla")
  with pytest.raises(ValueError, match="no gate_proj,up_proj,down_proj projection.*"
                     "its LoRA targets: q_proj,k_proj,v_proj,o_proj"):
    lora_lib.add_lora(model, lora_lib.LoraSpec(rank=4, alpha=8.0,
                                               targets=tuple(lora_lib.TARGETS)),
                      rngs=nnx.Rngs(1))
  assert not lora_lib.lora_modules(model)  # refused before any change
  before = model(ids())
  lora_lib.add_lora(model, lora_lib.LoraSpec(rank=4, alpha=8.0),  # "all" it has
                    rngs=nnx.Rngs(1))
  assert [m.spec.targets for _, m in lora_lib.lora_modules(model)] == [
      ("q_proj", "k_proj", "v_proj", "o_proj")] * 4
  chex.assert_trees_all_equal(model(ids()), before)


def test_adapter_reaches_cached_calls_and_merging_is_exact():
  model = lora_lib.add_lora(tiny_model(), lora_lib.LoraSpec(rank=4, alpha=8.0),
                            rngs=nnx.Rngs(1))
  for _, module in lora_lib.lora_modules(model):
    module.lora_b.set_value(0.05 * jnp.ones_like(module.lora_b.get_value()))
  x = ids()
  logits = model(x)
  assert float(jnp.abs(logits - tiny_model()(x)).max()) > 1e-2
  positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape)
  cached, _ = model.forward_with_cache(x, positions=positions,
                                       cache=model.init_cache(*x.shape))
  chex.assert_trees_all_close(cached, logits, atol=1e-5)
  chex.assert_trees_all_close(lora_lib.merged_model(model)(x), logits, atol=1e-5)


@pytest.mark.parametrize("field, value, match", [
    ("lora_rank", 0, "expected an int >= 1"),
    ("lora_dropout", 1.0, r"expected a float in \[0, 1\)"),
    ("lora_targets", "q_proj,qkv", "expected 'all' or distinct names among q_proj,"),
    ("quantize_base", "fp8", "expected one of"),
])
def test_lora_settings_checked(tmp_path, field, value, match):
  with pytest.raises(ValueError, match=match):
    tiny_train_config(tmp_path, **{**LORA, field: value})


def test_quantize_without_lora_rejected(tmp_path):
  with pytest.raises(ValueError, match="without lora_rank"):
    tiny_train_config(tmp_path, quantize_base="nf4")


# ----- Training ---------------------------------------------------------------------

def test_optimizer_state_holds_adapter_shapes_only(tmp_path):
  config = tiny_train_config(tmp_path, **LORA)
  mesh = sharding_lib.make_mesh(1)
  with jax.set_mesh(mesh):
    model, _, _, state = state_lib.init_model(config, mesh)
  adapter_shapes = sorted(x.shape for x in jax.tree.leaves(nnx.state(model, lora_lib.TRAINABLE)))
  assert sorted(x.shape for x in jax.tree.leaves(state.params)) == adapter_shapes
  moments = [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert sorted(moments) == sorted(adapter_shapes * 2)  # Adam's mu and nu


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_no_base_weight_gradient_is_computed(tmp_path, lora):
  """No matmul of a LoRA step yields a base kernel gradient (the kernel's
  dimensions in any order); full fine-tuning (the control) computes one for
  every kernel."""
  config = tiny_train_config(tmp_path, **(LORA if lora else {}))
  mesh = sharding_lib.make_mesh(1)
  with jax.set_mesh(mesh):
    model, graphdef, rest, state = state_lib.init_model(config, mesh)
    batch = {k: jnp.zeros((1, 2, 32), jnp.float32 if k == "loss_mask" else jnp.int32)
             for k in ("input_ids", "targets", "segment_ids", "positions", "loss_mask")}
    jaxpr = jax.make_jaxpr(lambda s: step_lib.train_step(
        s, rest, batch, graphdef=graphdef, options=optimizer_lib.StepOptions.from_config(config),
        mesh=mesh))(state)
  kernels = {tuple(sorted(m.kernel.get_value().shape)) for _, m in nnx.iter_modules(model)
             if isinstance(m, (nnx.Einsum, lora_lib.LoraEinsum)) and hasattr(m, "kernel")}
  produced = {tuple(sorted(v.aval.shape)) for eqn in jaxpr_equations(jaxpr.jaxpr)
              if eqn.primitive.name == "dot_general" for v in eqn.outvars}
  assert (produced & kernels == set()) if lora else kernels <= produced


def test_dropout_key_masks_the_adapter_input_only_when_set():
  model = lora_lib.add_lora(tiny_model(), lora_lib.LoraSpec(rank=4, alpha=8.0, dropout=0.5),
                            rngs=nnx.Rngs(1))
  for _, module in lora_lib.lora_modules(model):
    module.lora_b.set_value(0.05 * jnp.ones_like(module.lora_b.get_value()))
  x = ids()
  plain = model(x)
  lora_lib.set_dropout_key(model, jax.random.key(3))
  dropped = model(x)
  assert float(jnp.abs(dropped - plain).max()) > 1e-3
  chex.assert_trees_all_equal(model(x), dropped)  # the same key, the same mask
  lora_lib.set_dropout_key(model, None)
  chex.assert_trees_all_equal(model(x), plain)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  return loop_lib.train(tiny_train_config(tmp_path_factory.mktemp("lora"), **LORA))


def test_lora_run_trains_adapters_and_leaves_the_base(tmp_path, lora_run):
  losses = [r["loss"] for r in lora_run.history]
  assert losses[-1] < losses[0]
  mesh = sharding_lib.make_mesh(1)
  with jax.set_mesh(mesh):
    initial, _, _, _ = state_lib.init_model(tiny_train_config(tmp_path, **LORA), mesh)
  frozen = lambda m: nnx.state(m, nnx.Not(lora_lib.TRAINABLE))
  chex.assert_trees_all_equal(frozen(lora_run.model), frozen(initial))  # bitwise
  assert all(float(jnp.abs(m.lora_b.get_value()).max()) > 0
             for _, m in lora_lib.lora_modules(lora_run.model))


def test_lora_checkpoint_holds_adapters_and_resumes_exactly(tmp_path, lora_run):
  ckpt_dir = lora_run.run_dir / "checkpoints"
  step = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  items = json.loads((ckpt_dir / str(step) / "state" / "_METADATA").read_text())
  names = list(items["tree_metadata"])  # "('params/layers/0/.../lora_a/value',)"
  assert any(k.startswith("('params/") for k in names)
  arrays = [k for k in names if not k.endswith(("/count',)", "('step',)"))]
  assert all("/lora_a/" in k or "/lora_b/" in k for k in arrays), arrays
  config = tiny_train_config(tmp_path, **LORA)
  loop_lib.train(config, until_step=3)
  resumed = loop_lib.train(config, resume=True)
  assert [r["loss"] for r in resumed.history] == [
      r["loss"] for r in lora_run.history[3:]]  # exactly


@pytest.mark.parametrize("qtype", lora_lib.QUANTIZE)
def test_qlora_quantizes_the_base_and_trains(tmp_path, qtype):
  model = tiny_model()
  before = lora_lib.base_bytes(model)
  lora_lib.add_lora(model, lora_lib.LoraSpec(rank=4, alpha=8.0, quantize=qtype),
                    rngs=nnx.Rngs(1))
  after = lora_lib.base_bytes(model)
  kernels = sum(m.base_kernel().size for _, m in lora_lib.lora_modules(model))
  bits = 8 if qtype == "int8" else 4
  # Each kernel value shrinks from 32 bits to `bits` (plus the fp32 scales).
  assert after < before - kernels * (32 - bits) / 8 + kernels // 8
  assert f"frozen base {after / 2**20:.2f} MiB ({qtype}; {before / 2**20:.2f} MiB before" in (
      lora_lib.summary(model))
  run = loop_lib.train(tiny_train_config(tmp_path, quantize_base=qtype, steps=3,
                                          eval_every=3, **LORA))
  losses = [r["loss"] for r in run.history]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


# ----- PEFT interop ------------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HF_SMALL = dict(vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=256, sliding_window=8, rms_norm_eps=1e-6)


def random_hf_mistral():
  config = transformers.MistralConfig(**HF_SMALL, attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.MistralForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name
              else 0.1 * torch.randn_like(p))
  return model


def torch_logits(model, x):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(x), dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
  folder = tmp_path_factory.mktemp("hf_base")
  random_hf_mistral().save_pretrained(folder)
  return folder


def test_swajax_adapter_loads_in_peft_and_merged_export_in_transformers(tmp_path, hf_base):
  run = loop_lib.train(tiny_train_config(
      tmp_path / "run", init_from_hf=str(hf_base), tokenizer="bytes", steps=3,
      eval_every=3, lora_targets="all", **LORA))
  hf_dir = tmp_path / "run" / "hf"
  train_cli.export_lora(run.model, hf_dir, merge=True, base_model_name_or_path=str(hf_base))
  x = ids(seq=30)
  ours = np.asarray(jax.jit(lambda m, x: m(x))(run.model, x))
  assert float(np.abs(ours - torch_logits(random_hf_mistral(), x)).max()) > 1e-3
  with_adapter = peft.PeftModel.from_pretrained(random_hf_mistral(), hf_dir / "adapter").eval()
  np.testing.assert_allclose(torch_logits(with_adapter, x), ours, atol=TOLERANCE)
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, attn_implementation="eager").eval()
  np.testing.assert_allclose(torch_logits(merged, x), ours, atol=TOLERANCE)


@pytest.mark.parametrize("targets, rslora", [
    (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    (["v_proj", "q_proj", "down_proj"], True),
])
def test_peft_adapter_loads_in_swajax(tmp_path, hf_base, targets, rslora):
  config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                           init_lora_weights=False, use_rslora=rslora)  # random B
  with_adapter = peft.get_peft_model(random_hf_mistral(), config).eval()
  with_adapter.save_pretrained(tmp_path / "adapter")
  x = ids(seq=30)
  model = load_hf(hf_base, dtype=jnp.float32, attn_impl="xla", adapter=tmp_path / "adapter")
  ours = np.asarray(jax.jit(lambda m, x: m(x))(model, x))
  theirs = torch_logits(with_adapter, x)
  assert float(np.abs(theirs - torch_logits(random_hf_mistral(), x)).max()) > 1e-3
  np.testing.assert_allclose(ours, theirs, atol=TOLERANCE)


def test_peft_module_names_are_hf_io_tensor_names():
  model = lora_lib.add_lora(tiny_model(num_layers=2, layer_windows=(16, 16)),
                            lora_lib.LoraSpec(rank=2, alpha=2.0), rngs=nnx.Rngs(0))
  hf_names = {spec.hf_name for spec in tensor_table(model.config)}
  keys = peft_io.adapter_tensors(model)
  assert len(keys) == 2 * 7 * 2
  for key in keys:
    module = key.removeprefix(peft_io.PREFIX).rsplit(".lora_", 1)[0]
    assert module + ".weight" in hf_names, key


def test_unsupported_adapter_config_is_refused(tmp_path, hf_base):
  adapter = tmp_path / "adapter"
  peft.get_peft_model(random_hf_mistral(), peft.LoraConfig(
      r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(adapter)
  with pytest.raises(ValueError, match="use_dora=True"):
    load_hf(hf_base, adapter=adapter)


def test_cli_lora_on_the_example_chat_data(tmp_path, capsys):
  """`swajax train --init-from-hf DIR --lora-rank R --merge-lora` on
  examples/chat_small.jsonl: the adapter and the merged export, the long
  conversations reported."""
  from pathlib import Path

  from swajax.io.hf import save_hf

  save_hf(tiny_model(), tmp_path / "base")
  run = tmp_path / "run"
  data_file = Path(__file__).parent.parent / "examples" / "chat_small.jsonl"
  argv = ["--init-from-hf", str(tmp_path / "base"), "--tokenizer", "bytes",
          "--data", str(data_file),
          "--lora-rank", "4", "--lora-targets", "q_proj,v_proj", "--lora-dropout", "0.1",
          "--merge-lora", "--too-long", "drop", "--seq-len", "96", "--batch-size", "4",
          "--steps", "2", "--eval-every", "2", "--dtype", "float32",
          "--sample-tokens", "4", "--out", str(run)]
  assert train_cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "documents longer than seq_len=96 tokens were dropped" in out
  assert "LoRA: 896 trainable parameters" in out  # 1 layer: q 64*4 + 4*64, v 64*4 + 4*32
  adapter = json.loads((run / "hf" / "adapter" / "adapter_config.json").read_text())
  assert adapter["r"] == 4 and adapter["target_modules"] == ["q_proj", "v_proj"]
  assert adapter["lora_dropout"] == 0.1 and adapter["lora_alpha"] == 8.0
  merged = load_hf(run / "hf")
  with_adapter = load_hf(tmp_path / "base", adapter=run / "hf" / "adapter")
  x = ids()
  chex.assert_trees_all_close(merged(x), with_adapter(x), atol=1e-5)

"""TrainConfig checks, the masked loss, the optimizer, and short training runs."""

import dataclasses
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from swajax.training import data
from swajax.training import loop as loop_lib, optimizer as optimizer_lib, state as state_lib, step as step_lib
from swajax.sharding import make_mesh
from swajax.training.config import TrainConfig

# A one-layer model whose window (16) is shorter than the rows (32).
TINY_MODEL = dict(num_layers=1, hidden_size=64, intermediate_size=128, num_q_heads=4,
                  num_kv_heads=2, head_dim=16, layer_windows=(16,))


def tiny_train_config(out, **overrides) -> TrainConfig:
  """A seconds-long fp32 run on a small slice of the stdlib corpus."""
  values = dict(model_overrides=TINY_MODEL, dtype="float32", attn_impl="auto",
                seq_len=32, batch_size=8, steps=6, lr=1e-2, warmup_steps=1,
                eval_every=3, eval_batches=1, checkpoint_every=3,
                corpus_max_bytes=40_000, out=str(out))
  if "init_from_hf" in overrides:  # the HF folder's config.json is the model
    del values["model_overrides"]
  values.update(overrides)
  return TrainConfig(**values)


# ----- TrainConfig ---------------------------------------------------------------

@pytest.mark.parametrize("field, value, match", [
    ("steps", 0, "expected an int >= 1"),
    ("steps", 2.5, "expected an int"),
    ("steps", True, "expected an int"),
    ("lr", 0.0, r"expected a float in \(0.0"),
    ("lr", "fast", "expected a float"),
    ("beta2", 1.5, r"expected a float in \[0.0, 1.0\]"),
    ("dtype", "float8", "expected one of"),
    ("remat", "some", "expected one of"),
    ("attn_impl", "flash", "expected one of"),
    ("data", 3, "expected a string or None"),
    ("train_prompt", "yes", "expected a bool"),
    ("warmup_steps", -1, "expected an int >= 0"),
    ("model_overrides", 5, "expected a mapping"),
    ("model", 5, "expected a string or a ModelConfig"),
])
def test_config_rejects_bad_values(field, value, match):
  with pytest.raises(ValueError, match=f"{field}={value!r}: {match}"):
    TrainConfig(**{field: value})


def test_config_from_dict():
  config = TrainConfig.from_dict({"lr": 1, "model_overrides": {"num_layers": 2,
                                                              "layer_windows": [8, None]}})
  assert config.lr == 1.0 and isinstance(config.lr, float)
  assert config.model_overrides == (("num_layers", 2), ("layer_windows", (8, None)))
  hash(config)  # frozen and hashable
  assert TrainConfig.from_dict(config.to_dict()) == config
  with pytest.raises(ValueError, match="stepz=10: not a TrainConfig field"):
    TrainConfig.from_dict({"stepz": 10})
  with pytest.raises(ValueError, match="model_overrides.windows=8: not a "
                     "ModelConfig field"):
    TrainConfig(model_overrides={"windows": 8})


def test_config_takes_a_model_config():
  model = models.qwen2_tiny(num_layers=2, rope_scaling={"rope_type": "linear", "factor": 2.0})
  config = TrainConfig(model=model, steps=3)
  assert state_lib.model_config_for(config) is model
  hash(config)
  # config.json holds the ModelConfig as a table of its fields (tuples as lists).
  saved = json.loads(json.dumps(config.to_dict()))
  assert saved["model"]["layer_windows"] == [None, 128]
  assert TrainConfig.from_dict(saved) == config
  with pytest.raises(ValueError, match=r"model_overrides=\{'num_layers': 1\} with a "
                     "ModelConfig model: expected none"):
    TrainConfig(model=model, model_overrides={"num_layers": 1})
  with pytest.raises(ValueError, match="model.windows=8: not a ModelConfig field"):
    TrainConfig.from_dict({"model": {**saved["model"], "windows": 8}})


def test_model_preset_checked():
  with pytest.raises(ValueError, match="model='gpt5': expected a preset"):
    state_lib.model_config_for(TrainConfig(model="gpt5"))
  config = state_lib.model_config_for(TrainConfig(model_overrides=TINY_MODEL))
  assert config.layer_windows == (16,) and config.model_type == "mistral"


# ----- loss and optimizer --------------------------------------------------------

def test_masked_loss_sums_literal():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3] * 3]]))
  targets = jnp.array([[0, 1, 2]])
  loss_sum, count = step_lib.masked_loss_sums(logits, targets, jnp.array([[1, 1, 0]]))
  chex.assert_trees_all_close(loss_sum, -math.log(0.5) - math.log(0.8), rtol=1e-6)
  assert count == 2


def test_schedule_warmup_then_cosine():
  config = TrainConfig(lr=1.0, warmup_steps=4, steps=12, min_lr_ratio=0.1)
  schedule = optimizer_lib.make_schedule(optimizer_lib.StepOptions.from_config(config))
  chex.assert_trees_all_close([float(schedule(s)) for s in (0, 2, 4, 8, 12)],
                              [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
  short = optimizer_lib.make_schedule(
      optimizer_lib.StepOptions.from_config(dataclasses.replace(config, steps=3)))
  assert float(short(2)) == 1.0  # warmup capped at steps - 1


def test_optimizer_decays_matrices_only():
  config = TrainConfig(lr=0.1, warmup_steps=0, steps=2, weight_decay=0.5)
  params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  tx = optimizer_lib.make_optimizer(optimizer_lib.StepOptions.from_config(config), params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  chex.assert_trees_all_close(updates["kernel"], -0.1 * 0.5 * params["kernel"])
  chex.assert_trees_all_close(updates["scale"], jnp.zeros((2,)))


def test_packed_loss_equals_per_document_losses():
  """Packing is invisible to the model: segments, positions and masks isolate
  each document, so the packed loss is the token mean of per-document losses."""
  model = models.CausalLM(models.mistral_tiny(**TINY_MODEL), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 256, n).astype(np.int32) for n in (20, 7, 13, 28, 3)]
  packed = data.pack_sequences(docs, 32, pad_id=256, split_documents=False)
  assert packed["segment_ids"].max() > 1  # really packed
  # Each document alone in its own row, from position 0, no segment ids:
  # right padding cannot reach earlier positions through causal attention.
  alone = {"input_ids": np.full((len(docs), 32), 256, np.int32),
           "targets": np.zeros((len(docs), 32), np.int32),
           "loss_mask": np.zeros((len(docs), 32), np.float32)}
  for i, doc in enumerate(docs):
    alone["input_ids"][i, :len(doc)] = doc
    alone["targets"][i, :len(doc) - 1] = doc[1:]
    alone["loss_mask"][i, :len(doc) - 1] = 1

  @nnx.jit
  def losses(model, packed, alone):
    logits = model(alone["input_ids"])
    return (step_lib.batch_loss_sums(model, packed),
            step_lib.masked_loss_sums(logits, alone["targets"], alone["loss_mask"]))

  (packed_sum, packed_count, balance), (alone_sum, alone_count) = losses(
      model, packed, alone)
  assert balance == 0  # no experts, no load-balancing loss
  assert packed_count == alone_count == sum(len(d) - 1 for d in docs)
  chex.assert_trees_all_close(packed_sum, alone_sum, rtol=1e-5)


def test_grad_accumulation_matches_one_big_batch():
  config = tiny_train_config("unused")
  mesh = make_mesh(1)
  rng = np.random.default_rng(1)
  docs = [rng.integers(0, 256, n) for n in rng.integers(5, 40, 12)]
  rows = {k: v[:4] for k, v in data.pack_sequences(docs, 32, pad_id=256).items()}
  results = []
  for accum in (1, 2):
    config = dataclasses.replace(config, grad_accum=accum, batch_size=4 // accum)
    with jax.set_mesh(mesh):
      _, graphdef, rest, state = state_lib.init_model(config, mesh)
      batch = {k: jnp.asarray(v.reshape(accum, 4 // accum, 32)) for k, v in rows.items()}
      state, metrics = step_lib.train_step(
          state, rest, batch, graphdef=graphdef,
          options=optimizer_lib.StepOptions.from_config(config), mesh=mesh)
    results.append((state.params, metrics["loss"], metrics["grad_norm"]))
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-6)


# ----- training runs ----------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """Six uninterrupted steps of the tiny model (seed 0)."""
  return loop_lib.train(tiny_train_config(tmp_path_factory.mktemp("full")))


def test_loss_decreases(full_run):
  losses = [r["loss"] for r in full_run.history]
  assert [r["step"] for r in full_run.history] == list(range(1, 7))
  assert np.mean(losses[-2:]) < losses[0] - 0.5, losses
  assert full_run.evals[-1]["val_loss"] < full_run.evals[0]["val_loss"]
  assert full_run.evals[-1]["val_ppl"] == pytest.approx(math.exp(full_run.evals[-1]["val_loss"]))


def test_resume_is_exact(tmp_path, full_run):
  # Stopped after step 3 (as if preempted), then resumed from its checkpoint.
  config = tiny_train_config(tmp_path)
  first = loop_lib.train(config, until_step=3)
  second = loop_lib.train(config, resume=True)
  assert second.resumed_from == 3
  assert [r["loss"] for r in first.history + second.history] == [
      r["loss"] for r in full_run.history]  # exactly
  chex.assert_trees_all_equal(nnx.state(second.model, nnx.Param),
                              nnx.state(full_run.model, nnx.Param))
  metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics] == list(range(1, 7))
  assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(metrics[0])
  assert "val_ppl" in metrics[-1]
  assert (tmp_path / "loss.png").stat().st_size > 0
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == ["3", "6"]
  with pytest.raises(ValueError, match="already holds checkpoints"):
    loop_lib.train(config)
  # The data order is fixed by the seed and the packing: a resume that changes
  # them would silently train on another stream.
  for change in (dict(seed=1), dict(seq_len=16)):
    with pytest.raises(ValueError, match=f"{next(iter(change))}=.*checkpoint"):
      loop_lib.train(dataclasses.replace(config, steps=7, **change), resume=True)


def test_model_config_run_resumes_from_its_config_json(tmp_path, full_run):
  """model=ModelConfig trains as the equal preset + overrides, and its run
  folder's config.json alone rebuilds it for a resume (`swajax train --resume`)."""
  config = dataclasses.replace(tiny_train_config(tmp_path), model_overrides=(),
                               model=models.mistral_tiny(**TINY_MODEL))
  first = loop_lib.train(config, until_step=3)
  saved = TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
  assert saved == config
  second = loop_lib.train(saved, resume=True)
  assert [r["loss"] for r in first.history + second.history] == [
      r["loss"] for r in full_run.history]  # exactly


def test_fine_tune_from_hf_checkpoint(tmp_path, full_run):
  """A HF export of the seed-0 initial model trains exactly like seed 0."""
  from swajax.io.hf import save_hf

  save_hf(models.CausalLM(models.mistral_tiny(**TINY_MODEL), rngs=nnx.Rngs(0)),
          tmp_path / "hf")
  tuned = loop_lib.train(tiny_train_config(
      tmp_path / "run", init_from_hf=str(tmp_path / "hf"), tokenizer="bytes"),
      until_step=2)
  chex.assert_trees_all_close([r["loss"] for r in tuned.history],
                              [r["loss"] for r in full_run.history[:2]], rtol=1e-6)


def test_validation_rows_are_each_counted_once(tmp_path):
  """Fewer validation rows than eval_batches * batch_size: every row (every
  target token) weighs once in the validation loss, none is repeated."""
  for folder, n_docs in (("train", 4), ("val", 3)):
    (tmp_path / folder).mkdir()
    for i in range(n_docs):
      (tmp_path / folder / f"{i}.txt").write_text(f"doc{i} " * 4)  # 22 tokens
  config = tiny_train_config(tmp_path / "run", data=str(tmp_path / "train"),
                             val_data=str(tmp_path / "val"), batch_size=4,
                             eval_batches=2)
  tokenizer = data.resolve_tokenizer(config)
  _, val_rows = data.load_data(config, tokenizer)
  docs = [data.encode_text(tokenizer, (tmp_path / "val" / f"{i}.txt").read_text())
          for i in range(3)]
  packed = data.pack_sequences(docs, 32, pad_id=tokenizer.pad_id)
  assert len(packed["input_ids"]) == 3  # < 8 rows asked for
  assert len(val_rows["input_ids"]) % config.batch_size == 0
  assert val_rows["loss_mask"].sum() == packed["loss_mask"].sum()
  np.testing.assert_array_equal(val_rows["input_ids"][:3], packed["input_ids"])


def test_moe_training_adds_the_router_load_balancing_loss(tmp_path):
  """A mixture-of-experts run logs the load-balancing loss each step, and its
  coefficient reaches the router: coefficient 0 and 1 start from the same
  loss, then train different routers."""
  overrides = dict(TINY_MODEL, num_experts=4, experts_per_token=2)
  runs = {coef: loop_lib.train(tiny_train_config(
      tmp_path / str(coef), model="gpt_oss_tiny", model_overrides=overrides,
      steps=3, eval_every=3, checkpoint_every=3, router_aux_loss_coef=coef))
      for coef in (0.0, 1.0)}
  for result in runs.values():
    aux = [r["router_aux_loss"] for r in result.history]
    assert len(aux) == 3 and all(np.isfinite(aux)) and min(aux) > 0, aux
    logged = [json.loads(line) for line in
              (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["router_aux_loss"] for r in logged] == aux
  off, on = runs[0.0], runs[1.0]
  assert off.history[0]["loss"] == on.history[0]["loss"]
  router = lambda r: np.asarray(r.model.layers[0].mlp.router.kernel[...])
  assert np.max(np.abs(router(off) - router(on))) > 1e-4

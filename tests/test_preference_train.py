"""Preference training runs (`--stage dpo`): the step-1 loss with each
reference source, a LoRA DPO run on synthetic pairs that learns the
preference on held-out pairs (also through its exported adapter in PEFT),
and the command line (a real `swajax` process; a refusal is one line, exit 2).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swajax.cli import train as train_cli
from swajax.training import loop as loop_lib, pref_data, preference
from swajax.training.config import TrainConfig
from tests.test_train import TINY_MODEL

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
GOOD, BAD = "abcdefgh", "qrstuvwx"  # chosen answers' letters; rejected answers'
HF_SMALL = dict(vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=256, sliding_window=8, rms_norm_eps=1e-6)


def write_pairs(path, count, seed):
  """Standard-format pairs: a random prompt; the chosen answer drawn from
  GOOD letters, the rejected one from BAD letters (6 each)."""
  rng = np.random.default_rng(seed)
  word = lambda letters: "".join(rng.choice(list(letters), 6))
  with open(path, "w") as f:
    for _ in range(count):
      f.write(json.dumps({"prompt": f"{word('0123456789')}: ", "chosen": word(GOOD),
                          "rejected": word(BAD)}) + "\n")
  return str(path)


def pref_config(out, data, **overrides) -> TrainConfig:
  values = dict(model_overrides=TINY_MODEL, dtype="float32", seq_len=48, batch_size=8,
                steps=1, lr=1e-2, warmup_steps=0, eval_every=100, eval_batches=1,
                checkpoint_every=100, data=data, stage="dpo", out=str(out),
                sample_tokens=0)
  values.update(overrides)
  return TrainConfig(**values)


def test_step_one_loss_is_ln2_with_a_frozen_copy_and_a_resume_is_exact(tmp_path):
  """Full fine-tuning: the reference is a copy of the starting weights, so at
  step 1 policy == reference, z = 0 and the sigmoid loss is ln 2 (rewards
  0). A resumed run takes its reference from the starting weights too (not
  from the checkpoint's): its steps equal the uninterrupted run's bitwise."""
  data = write_pairs(tmp_path / "pairs.jsonl", 24, seed=0)
  whole = loop_lib.train(pref_config(tmp_path / "whole", data, steps=3))
  first = whole.history[0]
  assert abs(first["loss"] - math.log(2)) < 1e-6
  assert first["rewards/margins"] == 0 and first["rewards/accuracies"] == 0
  assert first["logps/chosen"] < 0 and first["pairs"] == 8
  assert whole.history[-1]["loss"] < first["loss"]
  config = pref_config(tmp_path / "parts", data, steps=3, checkpoint_every=1)
  loop_lib.train(config, until_step=2)
  resumed = loop_lib.train(config, resume=True)
  assert resumed.history[0]["step"] == 3
  assert {k: v for k, v in resumed.history[0].items() if k != "tokens_per_s"} == {
      k: v for k, v in whole.history[-1].items() if k != "tokens_per_s"}


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
  folder = tmp_path_factory.mktemp("hf_base")
  random_hf_mistral().save_pretrained(folder)
  return folder


def random_hf_mistral():
  config = transformers.MistralConfig(**HF_SMALL, attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.MistralForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name
              else 0.1 * torch.randn_like(p))
  return model


def test_lora_dpo_learns_the_preference_and_its_peft_adapter_agrees(tmp_path, hf_base):
  train_file = write_pairs(tmp_path / "train.jsonl", 48, seed=1)
  held_out = write_pairs(tmp_path / "held_out.jsonl", 16, seed=2)
  config = pref_config(tmp_path / "run", train_file, init_from_hf=str(hf_base),
                       model_overrides=(), tokenizer="bytes",
                       val_data=held_out, eval_batches=2, lora_rank=8, lr=2e-2,
                       steps=16, eval_every=16, pref_beta=0.5, lora_targets="all",
                       remat="full")  # the adapters-off reference inside the remat step
  run = loop_lib.train(config)
  assert abs(run.history[0]["loss"] - math.log(2)) < 1e-6  # adapters off == policy
  final = run.evals[-1]
  assert final["val_rewards/accuracies"] >= 0.9 and final["val_rewards/margins"] > 0
  train_cli.export_lora(run.model, tmp_path / "hf", merge=False,
                        base_model_name_or_path=str(hf_base))
  # PEFT: the adapter on the HF base vs the base itself (adapter disabled),
  # as TRL's DPOTrainer takes a LoRA run's reference.
  rows = pref_data.pair_rows(
      [p for _, p in pref_data.read_pairs(held_out, run.tokenizer)], config.seq_len,
      pad_id=run.tokenizer.pad_id)
  with_adapter = peft.PeftModel.from_pretrained(random_hf_mistral(),
                                                tmp_path / "hf" / "adapter").eval()
  policy = _torch_pair_logps(with_adapter, rows)
  with with_adapter.disable_adapter():
    reference = _torch_pair_logps(with_adapter, rows)
  margins = config.pref_beta * ((policy - reference) @ np.array([1.0, -1.0]))
  assert (margins > 0).mean() >= 0.9
  np.testing.assert_allclose(margins.mean(), final["val_rewards/margins"], rtol=1e-3)


def _torch_pair_logps(model, rows) -> np.ndarray:
  """[P, 2] answer log-probs of pair rows under a torch model, each sequence
  (segment) run alone."""
  out = np.zeros((len(rows["input_ids"]), 2))
  for i in range(len(rows["input_ids"])):
    for side, segment in enumerate((preference.CHOSEN, preference.REJECTED)):
      where = rows["segment_ids"][i] == segment
      ids = torch.tensor(rows["input_ids"][i][where])[None]
      with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0].double(), -1)
      targets = torch.tensor(rows["targets"][i][where])
      picked = logps.gather(-1, targets[:, None].long())[:, 0].numpy()
      out[i, side] = (picked * rows["loss_mask"][i][where]).sum()
  return out


def _swajax(*args, cwd):
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "swajax", "train", *args],
                        capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_cli_dpo_run_with_a_precomputed_reference(tmp_path):
  data = write_pairs(tmp_path / "pairs.jsonl", 24, seed=3)
  flags = ["--model-overrides", *(f"{k}={v!r}" for k, v in TINY_MODEL.items()),
           "--dtype", "float32", "--seq-len", "48", "--batch-size", "4",
           "--steps", "2", "--warmup-steps", "0", "--data", data, "--stage", "dpo",
           "--sample-tokens", "0", "--eval-batches", "1"]
  refused = _swajax(*flags, "--simpo-gamma", "1.0", "--out", str(tmp_path / "x"),
                    cwd=tmp_path)
  assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
      "swajax train: error: simpo_gamma=1.0 with pref_loss='sigmoid': expected "
      "pref_loss='simpo' (or no simpo_gamma)"]
  done = _swajax(*flags, "--precompute-ref", "--grad-accum", "2", "--out",
                 str(tmp_path / "run"), cwd=tmp_path)
  assert done.returncode == 0, done.stderr
  assert "acc 0.00 | margin 0.000" in done.stderr  # step 1: policy == reference
  assert "validation: loss" in done.stderr and "reward accuracy" in done.stdout
  records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").open()]
  assert abs(records[0]["loss"] - math.log(2)) < 1e-6 and records[0]["pairs"] == 8
  assert set(records[-1]) >= {"rewards/chosen", "rewards/rejected", "rewards/accuracies",
                              "rewards/margins", "logps/chosen", "logps/rejected"}

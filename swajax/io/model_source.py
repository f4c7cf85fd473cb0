"""What a MODEL argument of the command line names, and its tokenizer.

A model is a Hugging Face folder (config.json + safetensors), a `swajax
train` run folder (its `hf/` export is used) or a GGUF file (`.gguf`, read by
`io.gguf`: its weights dequantized, its own tokenizer). Its tokenizer is the
one the user names, else the GGUF file's, else the folder's (or the run
folder's) tokenizer.json, else UTF-8 bytes when the export records them; with
none known it is an error, never a guess. Every command that takes a model (`generate`, and those to
come) resolves it here.
"""

from __future__ import annotations

import json
from pathlib import Path

from swajax.io.gguf import gguf_tokenizer, load_gguf
from swajax.io.hf import load_hf
from swajax.text.tokenizers import load_tokenizer


def is_gguf(path: Path) -> bool:
  return Path(path).suffix.lower() == ".gguf"


def resolve_model_dir(directory: Path) -> Path:
  """The model to load: a .gguf file as it is; else the HF folder
  `directory`, or a train run folder's `hf/`."""
  if is_gguf(directory):
    if not Path(directory).is_file():
      raise FileNotFoundError(f"{directory}: no such GGUF file")
    return Path(directory)
  if (directory / "config.json").is_file() and any(
      directory.glob("*.safetensors*")):
    return directory
  if (directory / "hf" / "config.json").is_file():
    return directory / "hf"
  hint = (" (a swajax train run folder without its hf/ export: the run has "
          "not finished)" if (directory / "checkpoints").is_dir() else "")
  raise FileNotFoundError(
      f"{directory}: expected a Hugging Face folder (config.json + "
      f"*.safetensors) or a swajax train run folder with hf/{hint}")


def load_model(model_dir: Path, **options):
  """The `CausalLM` at `model_dir` (a `resolve_model_dir` result):
  `load_gguf` for a .gguf file, else `load_hf`; `options` go to it."""
  return (load_gguf if is_gguf(model_dir) else load_hf)(model_dir, **options)


def load_tokenizer_for(model_dir: Path, run_dir: Path, choice: str | None = None):
  """The tokenizer `choice` names (a tokenizer.json path or "bytes"); else
  a GGUF file's own (`gguf_tokenizer`); else tokenizer.json from the model folder or the run folder; else bytes when the
  model's config.json records "swajax_tokenizer": "bytes" (a `swajax train`
  export); else FileNotFoundError (never a silent guess)."""
  if choice is not None:
    return load_tokenizer(None if choice == "bytes" else choice)
  if is_gguf(model_dir):
    return gguf_tokenizer(model_dir)
  for folder in (model_dir, run_dir):
    if (folder / "tokenizer.json").is_file():
      return load_tokenizer(folder / "tokenizer.json")
  config = json.loads((model_dir / "config.json").read_text())
  if config.get("swajax_tokenizer") == "bytes":
    return load_tokenizer(None)
  raise FileNotFoundError(
      f"{model_dir}: no tokenizer.json and no tokenizer recorded in config.json: "
      "pass --tokenizer FILE (or --tokenizer bytes for UTF-8 byte ids)")

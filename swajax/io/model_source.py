"""What a MODEL argument of the command line names, and its tokenizer.

A model is a Hugging Face folder (config.json + safetensors), a `swajax
train` run folder (its `hf/` export; a LoRA run without `--merge-lora`: its
PEFT adapter `hf/adapter/` on the base it was trained on), a PEFT adapter
folder (on the base its adapter_config.json names), or a GGUF file (`.gguf`,
read by `io.gguf`: its weights dequantized, its own tokenizer); `--adapter DIR`
puts an adapter on any of these (`resolve_model`). Its tokenizer is the one
the user names, else the adapter's, the GGUF file's, the model folder's or the
run folder's tokenizer.json, else UTF-8 bytes when the export records them; with none
known it is an error, never a guess. Every command that takes a model
(`generate`, `chat`, `eval`, `merge`) resolves it here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from swajax.io import peft
from swajax.io.gguf import gguf_tokenizer, load_gguf
from swajax.io.hf import load_hf
from swajax.text.tokenizers import load_tokenizer

RUN_ADAPTER = Path("hf") / "adapter"  # where `swajax train` writes a LoRA run's adapter


def is_gguf(path: Path) -> bool:
  return Path(path).suffix.lower() == ".gguf"


def resolve_model_dir(directory: Path) -> Path:
  """The model to load: a .gguf file as it is; else the HF folder
  `directory`, or a train run folder's `hf/`."""
  if is_gguf(directory):
    if not Path(directory).is_file():
      raise FileNotFoundError(f"{directory}: no such GGUF file")
    return Path(directory)
  if _is_hf_folder(directory):
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


def _is_hf_folder(directory: Path) -> bool:
  return (directory / "config.json").is_file() and any(
      directory.glob("*.safetensors*"))


def _is_adapter(directory: Path) -> bool:
  return (directory / peft.CONFIG_FILE).is_file()


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """A resolved MODEL: the HF folder whose weights load (`model_dir`), the
  PEFT adapter put on it (`adapter`, or None), and the folder the user named
  (`named`: a run folder's tokenizer.json is looked for there)."""

  model_dir: Path
  adapter: Path | None
  named: Path

  def load(self, *, dtype=None, attn_impl: str = "auto"):
    """The `CausalLM` (`load_hf(model_dir, adapter=)`); an adapter that does
    not fit the base is a ValueError naming both (and the base the adapter
    records)."""
    if self.adapter is None:
      return load_model(self.model_dir, dtype=dtype, attn_impl=attn_impl)
    try:
      if is_gguf(self.model_dir):
        return peft.load_adapter(
            load_gguf(self.model_dir, dtype=dtype, attn_impl=attn_impl), self.adapter)
      return load_hf(self.model_dir, dtype=dtype, attn_impl=attn_impl,
                     adapter=self.adapter)
    except ValueError as e:
      recorded = adapter_base(self.adapter)
      trained = f" (it was trained on {recorded})" if recorded else ""
      raise ValueError(f"adapter {self.adapter} does not fit the base "
                       f"{self.model_dir}{trained}: {e}") from e

  def load_with_tokenizer(self, choice: str | None = None, *, dtype=None,
                          attn_impl: str = "auto"):
    """(model, tokenizer): `tokenizer(choice)`, then `load`; a tokenizer with
    more ids than the model's vocab_size is a ValueError."""
    tokenizer = self.tokenizer(choice)
    model = self.load(dtype=dtype, attn_impl=attn_impl)
    if tokenizer.vocab_size > model.config.vocab_size:
      raise ValueError(
          f"tokenizer vocab {tokenizer.vocab_size} > model vocab_size="
          f"{model.config.vocab_size}: {self.model_dir} needs its tokenizer.json")
    return model, tokenizer

  def eos_ids(self) -> tuple[int, ...]:
    """The eos_token_id of the model folder's generation_config.json (an id
    or a list of ids, as transformers' `generate` stops at them); () without
    one."""
    file = self.model_dir / "generation_config.json"
    if not file.is_file():
      return ()
    try:
      eos = json.loads(file.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as e:
      raise ValueError(f"{file}: expected a JSON object ({e})") from None
    ids = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
      raise ValueError(f"{file}: eos_token_id={eos!r}: expected an id or a list of ids")
    return tuple(ids)

  def tokenizer(self, choice: str | None = None):
    """`load_tokenizer_for` this model: `choice`, else the adapter's, the
    model folder's or the named run folder's tokenizer.json, else bytes
    when config.json records them."""
    return load_tokenizer_for(self.model_dir, self.named, choice,
                              adapter_dir=self.adapter)


def adapter_base(adapter: Path) -> str | None:
  """The base_model_name_or_path an adapter folder's adapter_config.json
  records (None when it records none)."""
  try:
    config = json.loads((adapter / peft.CONFIG_FILE).read_text())
  except (OSError, json.JSONDecodeError):
    return None
  base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
  return base if isinstance(base, str) and base else None


def adapter_folder(path: Path, *, required: bool = True) -> Path | None:
  """The PEFT adapter folder `path` names: itself, or a LoRA run folder's
  `hf/adapter/`; None (FileNotFoundError when `required`) for neither."""
  path = Path(path)
  for folder in (path, path / RUN_ADAPTER):
    if _is_adapter(folder):
      return folder
  if required:
    raise FileNotFoundError(f"{path}: not a PEFT adapter folder (no {peft.CONFIG_FILE}) "
                            f"nor a LoRA run folder (no {RUN_ADAPTER / peft.CONFIG_FILE})")
  return None


def resolve_model(path: Path, adapter: Path | None = None) -> ModelSource:
  """The model `path` names, with the PEFT adapter folder `adapter` on it.

  path: an HF folder; a run folder (its `hf/` export when it holds weights,
  else its LoRA adapter `hf/adapter/` on that adapter's base); or an adapter
  folder (on its base_model_name_or_path, which must be a local HF folder).
  A second adapter on an adapter (`path` one already) is refused: one
  adapter at a time. Raises FileNotFoundError (one line) for a folder that
  is none of these, or an adapter whose base is not a local HF folder.
  """
  path = Path(path)
  if adapter is not None:
    adapter = Path(adapter)
    if not _is_adapter(adapter):
      raise FileNotFoundError(f"{adapter}: no {peft.CONFIG_FILE} (not a PEFT "
                              "adapter folder)")
  own = None  # the adapter `path` itself stands for
  if not _is_hf_folder(path) and not (path / "hf" / "config.json").is_file():
    own = adapter_folder(path, required=False)
  if own is None:
    return ModelSource(resolve_model_dir(path), adapter, path)
  if adapter is not None:
    raise ValueError(f"{path} is a LoRA adapter already ({own}): pass its base "
                     f"as MODEL to put --adapter {adapter} on it (one adapter at a time)")
  base = adapter_base(own)
  if base is None or not _is_hf_folder(Path(base)):
    raise FileNotFoundError(
        f"{own}: its base_model_name_or_path {base!r} is not a local Hugging Face "
        "folder: name the base folder and the adapter apart (MODEL --adapter "
        "ADAPTER; swajax merge ADAPTER --base DIR)")
  return ModelSource(Path(base), own, path)


def load_tokenizer_for(model_dir: Path, run_dir: Path, choice: str | None = None,
                       *, adapter_dir: Path | None = None):
  """The tokenizer `choice` names (a tokenizer.json path or "bytes"); else
  tokenizer.json from the adapter folder (when given); else a GGUF file's
  own (`gguf_tokenizer`); else the model folder's or the run folder's
  tokenizer.json; else bytes when the model's config.json records
  "swajax_tokenizer": "bytes" (a `swajax train` export); else
  FileNotFoundError (never a silent guess)."""
  if choice is not None:
    return load_tokenizer(None if choice == "bytes" else choice)
  if adapter_dir is not None and (adapter_dir / "tokenizer.json").is_file():
    return load_tokenizer(adapter_dir / "tokenizer.json")
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

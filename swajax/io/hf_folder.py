"""The files of a Hugging Face checkpoint folder, as transformers writes them:
which safetensors file holds which tensor, shard splitting and the index, the
tokenizer files an export carries (its chat template included), progress on stderr, and the folder written
like `save_pretrained` (temp files renamed, stale shards removed).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

import jax
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from swajax.io.hf_tensors import TensorSpec
from swajax.text import chat as chat_lib

SINGLE_FILE = "model.safetensors"


INDEX_FILE = "model.safetensors.index.json"


DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5's save_pretrained default


PROGRESS_MIN_BYTES = 10**9  # load_hf / save_hf show progress on stderr from here


SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def tensor_files(directory: Path) -> dict[str, Path]:
  """HF tensor name -> the safetensors file holding it (single or sharded)."""
  index = directory / INDEX_FILE
  single = directory / SINGLE_FILE
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index}: expected JSON with a 'weight_map' ({e!r})") from e
    files = {name: directory / shard for name, shard in weight_map.items()}
    for shard in sorted(set(files.values())):
      if not shard.is_file():
        raise FileNotFoundError(f"{shard}: shard listed in {index} is missing")
    return files
  if single.is_file():
    with open_safetensors(single) as f:
      return {name: single for name in f.keys()}
  raise FileNotFoundError(
      f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors "
      "checkpoints are read; convert .bin files with transformers first)")


def open_safetensors(file: Path):
  try:
    return safe_open(os.fspath(file), framework="numpy")
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


class Progress:
  """Bytes done of `total` on stderr, for checkpoints of PROGRESS_MIN_BYTES
  or more: one rewritten line on a terminal, else a line per 10%."""

  def __init__(self, label: str, total: int):
    self.label, self.total, self.done, self.shown = label, total, 0, -1
    self.on = total >= PROGRESS_MIN_BYTES and jax.process_index() == 0

  def add(self, nbytes: int) -> None:
    self.done += nbytes
    if not self.on:
      return
    tty = sys.stderr.isatty()
    tenth = 10 * self.done // max(self.total, 1)
    if tty or tenth > self.shown:
      self.shown = tenth
      line = f"{self.label}: {self.done / 1e9:.1f}/{self.total / 1e9:.1f} GB"
      sys.stderr.write(("\r" + line) if tty else line + "\n")
      sys.stderr.flush()

  def close(self) -> None:
    if self.on and sys.stderr.isatty():
      sys.stderr.write("\n")


# The files of a tokenizer folder an export carries along.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# Weight files a save may leave from an earlier one (removed when not rewritten).
WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def tokenizer_files(tokenizer, hf_config: dict) -> tuple[dict[str, str], dict[str, Path]]:
  """({file name: text}, {file name: source file}) of a checkpoint's
  tokenizer: generation_config.json and `own_tokenizer_files`; records the
  special ids in `hf_config` (and "swajax_tokenizer": "bytes" for bytes)."""
  if tokenizer is None:
    return {}, {}
  ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
         "pad_token_id": tokenizer.pad_id}
  hf_config.update(ids)
  if not hasattr(tokenizer, "file"):  # a ByteTokenizer
    hf_config["swajax_tokenizer"] = "bytes"
  texts, copies = own_tokenizer_files(tokenizer)
  return {"generation_config.json": json.dumps(ids, indent=2) + "\n", **texts}, copies


def own_tokenizer_files(tokenizer) -> tuple[dict[str, str], dict[str, Path]]:
  """({file name: text}, {file name: source file}): the files that carry
  `tokenizer` and its chat template (the one it renders chats with), as
  `save_pretrained` writes them. An `HFTokenizer`'s files are copied
  (`TOKENIZER_FILES` and a chat_template.jinja beside them); a template other
  than the one they hold (chosen, or ChatML given to a tokenizer without one)
  is written to chat_template.jinja, which transformers reads before
  tokenizer_config.json's "chat_template". A tokenizer built in memory: its
  `config_files`; bytes: the template alone."""
  template = getattr(tokenizer, "chat_template", None)
  if not hasattr(tokenizer, "file"):  # a ByteTokenizer
    return ({} if template is None else {chat_lib.TEMPLATE_FILE: template}), {}
  if tokenizer.file is None:  # built in memory (a GGUF file's): its template inside
    return tokenizer.config_files(), {}
  folder = Path(tokenizer.file).parent
  copies = {name: folder / name for name in (*TOKENIZER_FILES, chat_lib.TEMPLATE_FILE)
            if (folder / name).is_file()}
  if template is None or template == chat_lib.read_template(tokenizer.file):
    return {}, copies
  copies.pop(chat_lib.TEMPLATE_FILE, None)
  return {chat_lib.TEMPLATE_FILE: template}, copies


def write_tokenizer(tokenizer, folder: Path) -> None:
  """Writes `own_tokenizer_files(tokenizer)` into the existing `folder` (an
  adapter folder: transformers' AutoTokenizer and `swajax` read them there)."""
  texts, copies = own_tokenizer_files(tokenizer)
  for name, text in texts.items():
    (folder / name).write_text(text, encoding="utf-8")
  for name, source in copies.items():
    if not (folder / name).exists() or not (folder / name).samefile(source):
      shutil.copyfile(source, folder / name)


def write_folder(path: Path, overwrite: bool, hf_config: dict,
                  files: dict[str, list[TensorSpec]], sizes: dict[str, int],
                  contents, texts: dict[str, str], copies: dict[str, Path]) -> None:
  """Writes `save_hf`'s files into `path`: `contents` yields each weight
  file's {name: array}, in the order of `files`; `texts` and `copies` are
  further files (their text, or a file to copy)."""
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f"{path}: is a file, not a folder (save_hf writes a folder)")
  if (not overwrite and path.is_dir()
      and any(p.name == "config.json" or WEIGHT_FILE.fullmatch(p.name)
              for p in path.iterdir())):
    raise FileExistsError(f"{path}: holds a checkpoint (pass overwrite=True to "
                          "replace its files)")
  created = not path.exists()
  path.mkdir(parents=True, exist_ok=True)
  stem = f".tmp-{os.getpid()}-{secrets.token_hex(4)}-"
  tmp = lambda name: path / (stem + name)
  written = []  # final names, in rename order: weights, index, the rest, config last
  progress = Progress(f"save_hf {path}", sum(sizes.values()))
  try:
    for file, tensors in zip(files, contents):
      save_file(tensors, tmp(file), metadata={"format": "pt"})
      written.append(file)
      progress.add(sum(sizes[spec.hf_name] for spec in files[file]))
    progress.close()
    if len(files) > 1:
      index = {"metadata": {"total_size": sum(sizes.values())},
               "weight_map": {spec.hf_name: file for file, specs in files.items()
                              for spec in specs}}
      texts = {INDEX_FILE: json.dumps(index, indent=2) + "\n", **texts}
    for name, text in texts.items():
      tmp(name).write_text(text, encoding="utf-8")
      written.append(name)
    for name, source in copies.items():
      if not (path / name).exists() or not (path / name).samefile(source):
        shutil.copyfile(source, tmp(name))
        written.append(name)
    tmp("config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    written.append("config.json")
  except BaseException:
    for p in path.glob(stem + "*"):
      p.unlink()
    if created and not any(path.iterdir()):
      path.rmdir()
    raise
  stale = [p for p in path.iterdir()  # an earlier save's other weight files
           if WEIGHT_FILE.fullmatch(p.name) and p.name not in written]
  for p in stale:  # a stale index first: it would point at the old shards
    if p.name == INDEX_FILE:
      p.unlink()
  mode = 0o666 & ~_umask()  # safetensors creates its files 0600
  for name in written:
    os.chmod(tmp(name), mode)
    os.replace(tmp(name), path / name)
  for p in stale:
    p.unlink(missing_ok=True)


def _umask() -> int:
  mask = os.umask(0o022)  # reading it means setting it: set it back at once
  os.umask(mask)
  return mask


def split_into_files(table, sizes: dict[str, int], limit: int
                      ) -> dict[str, list[TensorSpec]]:
  """File name -> its tensors, in order (see `save_hf`)."""
  groups, size = [[]], 0
  for spec in table:
    if groups[-1] and size + sizes[spec.hf_name] > limit:
      groups.append([])
      size = 0
    groups[-1].append(spec)
    size += sizes[spec.hf_name]
  if len(groups) == 1:
    return {SINGLE_FILE: groups[0]}
  return {f"model-{i:05d}-of-{len(groups):05d}.safetensors": group
          for i, group in enumerate(groups, start=1)}


def parse_size(size: int | str, name: str) -> int:
  """Bytes >= 1 from an int or a string: "5GB" = 5 * 10**9, "2GiB" = 2 * 2**30
  (units KB MB GB TB and KiB MiB GiB TiB, case-insensitive)."""
  if isinstance(size, str):
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B)\s*", size, re.IGNORECASE)
    if match is None:
      raise ValueError(f"{name}={size!r}: expected bytes as an int or a string "
                       "like '5GB', '500MB' or '2GiB'")
    size = int(float(match[1]) * SIZE_UNITS[match[2].upper()])
  elif isinstance(size, bool) or not isinstance(size, int):
    raise TypeError(f"{name}={size!r}: expected an int (bytes) or a string like '5GB'")
  if size < 1:
    raise ValueError(f"{name}={size!r}: expected at least 1 byte")
  return size

"""Tokenizers: UTF-8 bytes, or a Hugging Face tokenizer.json with its specials.

Every wing that turns text into ids uses these (training data, chat
rendering, generation, the command line): `load_tokenizer(None)` is bytes,
`load_tokenizer(path)` a `HFTokenizer` (bos/eos/pad from tokenizer_config.json,
the chat template beside it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from swajax.text import chat as chat_lib


class DataError(ValueError):
  """Unreadable or malformed input: a tokenizer or training data (the CLI prints it as one line)."""


@dataclasses.dataclass
class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; the specials follow: pad 256, bos 257, eos 258.
  chat_template: a chosen template (None: `chat.DEFAULT_TEMPLATE` renders chats)."""

  pad_id: int = 256
  bos_id: int = 257
  eos_id: int = 258
  chat_template: str | None = None

  @property
  def vocab_size(self) -> int:
    return max(self.pad_id, self.bos_id, self.eos_id) + 1

  def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
    """int32 [L] byte values of the UTF-8 encoding; add_special_tokens: bos
    first (as `swajax train` starts every document)."""
    ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    return np.concatenate([[self.bos_id], ids]).astype(np.int32) if add_special_tokens else ids

  def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids [L], offsets int [L, 2]: each byte's character [start, end))."""
    ids = self.encode(text)
    char = np.repeat(np.arange(len(text)), [len(c.encode("utf-8")) for c in text])
    return ids, np.stack([char, char + 1], axis=1).reshape(-1, 2)

  def decode(self, ids: Iterable[int]) -> str:
    """Bytes back to text; special ids are dropped, broken UTF-8 replaced."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode(
        "utf-8", errors="replace")


# Special-token spellings tried when tokenizer_config.json does not name them.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer read from a local tokenizer.json.

  bos/eos/pad come from a sibling tokenizer_config.json when present, else
  from common spellings. bos_id may be None (no bos is prepended); without a
  pad token, eos doubles as pad (padding never carries loss either way).
  chat_template: the sibling chat template (`chat.read_template`) or None.
  file: the tokenizer.json, or None for one built in memory
  (`from_tokenizer`: a GGUF file's).
  `encode(text, add_special_tokens=True)` adds the specials tokenizer.json's
  post-processor adds, as transformers' tokenizer(text) does (transformers 5
  drops tokenizer_config.json's add_bos_token / add_eos_token when a
  tokenizer.json is there: the post-processor is the tokenizer's setting).
  """

  def __init__(self, path: str | Path):
    # Lazy: only this class needs `tokenizers`.
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    self.file = file
    try:
      self._tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises its own Exception types
      raise DataError(f"tokenizer={str(path)!r}: cannot read {file} ({e})") from e
    named = _configured_specials(file.parent / "tokenizer_config.json")
    self.bos_id = self._find(named.get("bos_token"), _BOS_NAMES)
    self.eos_id = self._find(named.get("eos_token"), _EOS_NAMES)
    if self.eos_id is None:
      raise DataError(f"tokenizer={str(path)!r}: no end-of-sequence token found "
                      f"(tried {', '.join(_EOS_NAMES)})")
    pad = self._find(named.get("pad_token"), _PAD_NAMES)
    self.pad_id = self.eos_id if pad is None else pad
    self.chat_template = chat_lib.read_template(file)
    self._name_specials()

  @classmethod
  def from_tokenizer(cls, tokenizer, *, bos_id: int | None, eos_id: int,
                     pad_id: int | None, chat_template: str | None) -> HFTokenizer:
    """One built in memory: a `tokenizers.Tokenizer` and its special ids
    (pad None: eos doubles as pad). `file` is None; `config_files` gives
    the files `save_hf` writes for it."""
    self = cls.__new__(cls)
    self.file, self._tok = None, tokenizer
    self.bos_id, self.eos_id = bos_id, eos_id
    self.pad_id = eos_id if pad_id is None else pad_id
    self.chat_template = chat_template
    self._name_specials()
    return self

  def _name_specials(self):
    self.bos_token = None if self.bos_id is None else self._tok.id_to_token(self.bos_id)
    self.eos_token = self._tok.id_to_token(self.eos_id)

  def config_files(self) -> dict[str, str]:
    """{file name: text}: tokenizer.json and a tokenizer_config.json naming
    the specials and the chat template, as a Hugging Face folder holds them."""
    config = {"bos_token": self.bos_token, "eos_token": self.eos_token,
              "pad_token": self._tok.id_to_token(self.pad_id)}
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template
    return {"tokenizer.json": self._tok.to_str(),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}

  def _find(self, configured, names) -> int | None:
    for name in ((configured,) if configured else ()) + names:
      token_id = self._tok.token_to_id(name)
      if token_id is not None:
        return token_id
    return None

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """The ids of `text`; add_special_tokens: with the specials the tokenizer
    adds (see the class docstring). Special tokens written in the text are
    their ids either way."""
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], np.ndarray]:
    """(ids [L], offsets int [L, 2]: each token's character [start, end))."""
    encoding = self._tok.encode(text, add_special_tokens=False)
    return encoding.ids, np.asarray(encoding.offsets, np.int64).reshape(-1, 2)

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _configured_specials(config_file: Path) -> dict:
  """{"bos_token": str, ...} from tokenizer_config.json, {} if absent."""
  if not config_file.is_file():
    return {}
  config = json.loads(config_file.read_text())
  out = {}
  for key in ("bos_token", "eos_token", "pad_token"):
    value = config.get(key)
    if isinstance(value, dict):  # {"content": "<s>", ...}
      value = value.get("content")
    if isinstance(value, str):
      out[key] = value
  return out


def load_tokenizer(path: str | Path | None):
  """None -> ByteTokenizer(); a tokenizer.json (or its folder) -> HFTokenizer."""
  if path is None:
    return ByteTokenizer()
  if not Path(path).exists():
    raise DataError(f"tokenizer={str(path)!r}: no such file or directory")
  return HFTokenizer(path)


def with_chat_template(tokenizer, choice: str):
  """`tokenizer` (changed in place, returned) with the chat template `choice`
  names (a built-in name or a Jinja file: `chat.load_template`) in place of
  its own; DataError for a bad choice."""
  try:
    tokenizer.chat_template = chat_lib.load_template(choice)
  except chat_lib.ChatDataError as e:
    raise DataError(str(e)) from e
  return tokenizer

"""Training data: documents, sequence packing and the embedded corpus.

A *document* is one token sequence (a file, a JSONL record) with a per-token
flag saying whether that token is a training target. `pack_sequences` lays
documents end to end into fixed-length rows; attention stays inside each
document piece (segment ids) and no loss crosses a document boundary.

The embedded default corpus is the Python standard library's own `.py`
sources (found via `sysconfig`), so `swajax train` needs no download.
`load_data` and `resolve_tokenizer` turn a `TrainConfig` into a run's rows
and tokenizer.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from swajax.io.model_source import is_gguf, load_tokenizer_for
from swajax.text import chat as chat_lib
from swajax.text.tokenizers import (DataError, HFTokenizer, load_tokenizer,
                                    with_chat_template)
from swajax.training.config import TOO_LONG, TrainConfig

# Row fields produced by `pack_sequences`, all [R, T].
ROW_FIELDS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")
PADDING_SEGMENT = 0  # segment id of padding; document pieces are 1, 2, ...
# Stdlib files above this size are skipped (generated tables such as
# pydoc_data/topics.py would otherwise dominate the corpus).
MAX_CORPUS_FILE_BYTES = 128 * 1024
_NOT_STDLIB = {"site-packages", "dist-packages", "__pycache__"}


# ----------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------

def print_warning(line: str) -> None:
  """A data warning's default destination: one line on stderr."""
  print(line, file=sys.stderr)


class Document(NamedTuple):
  """tokens: int32 [L]; trained: bool [L], True where the token is a target."""

  tokens: np.ndarray
  trained: np.ndarray


def encode_text(tokenizer, text: str) -> Document:
  """[bos] text [eos], every token after bos trained."""
  return encode_example(tokenizer, "", text)


def encode_example(tokenizer, prompt: str, completion: str, *,
                   train_prompt: bool = False) -> Document:
  """[bos] prompt completion [eos]; the prompt is trained only if asked."""
  head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  prompt_ids = tokenizer.encode(prompt) if prompt else []
  tokens = np.concatenate([
      np.asarray(head, np.int32), np.asarray(prompt_ids, np.int32),
      np.asarray(tokenizer.encode(completion), np.int32),
      np.asarray([tokenizer.eos_id], np.int32)])
  first_trained = len(head) if train_prompt else len(head) + len(prompt_ids)
  return Document(tokens, np.arange(len(tokens)) >= first_trained)


def _as_document(doc) -> Document:
  if isinstance(doc, Document):
    tokens, trained = np.asarray(doc.tokens), np.asarray(doc.trained)
    if tokens.ndim != 1 or trained.shape != tokens.shape:
      raise ValueError(
          f"Document: expected tokens [L] and trained [L], got tokens "
          f"{tokens.shape} and trained {trained.shape}")
    return Document(tokens.astype(np.int32), trained.astype(bool))
  tokens = np.asarray(doc, np.int32).reshape(-1)
  return Document(tokens, np.ones(tokens.shape, bool))


# ----------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------

def pack_sequences(docs: Iterable, seq_len: int, *, pad_id: int,
                   split_documents: bool = True) -> dict[str, np.ndarray]:
  """Packs documents end to end into rows of `seq_len` tokens.

  docs: `Document`s, or plain token-id sequences (every token trained).
  Returns a dict of numpy arrays [R, T] (T = seq_len):
    input_ids   int32   the tokens, `pad_id` on padding.
    targets     int32   the next token of the same document (`pad_id` where
                        there is none).
    segment_ids int32   0 on padding; the document pieces of a row are
                        numbered 1, 2, ... in order. Attention stays inside
                        a piece.
    positions   int32   offset inside the piece: 0, 1, ... restarting at
                        every piece.
    loss_mask   float32 1 where `targets` is a trained token of the same
                        document: never on padding, never across a document
                        boundary (the first token of a document is never a
                        target), never on untrained (prompt) tokens.
  A document that does not fit in the rest of a row continues in the next
  row as a new piece (positions restart; the piece's last input still
  predicts the document's next token). With split_documents=False a document
  that fits in one row is never split: it starts a new row instead (prompt
  and completion stay together); longer ones are still split.

  Example, seq_len=4, docs [a b c] and [d e]:
    input_ids   a b c d | e _ _ _      (_ = pad)
    targets     b c _ e | _ _ _ _
    segment_ids 1 1 1 2 | 1 0 0 0
    positions   0 1 2 0 | 0 0 0 0
    loss_mask   1 1 0 1 | 0 0 0 0
  """
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len={seq_len!r}: expected an int >= 1")
  rows: list[tuple[np.ndarray, ...]] = []
  row = _empty_row(seq_len, pad_id)
  fill = segment = 0
  for doc in map(_as_document, docs):
    n_tokens = len(doc.tokens)
    if not split_documents and fill and n_tokens > seq_len - fill:
      rows.append(row)
      row, fill, segment = _empty_row(seq_len, pad_id), 0, 0
    start = 0
    while start < n_tokens:
      n = min(seq_len - fill, n_tokens - start)
      segment += 1
      piece = slice(fill, fill + n)
      ids, targets, segment_ids, positions, loss_mask = row
      ids[piece] = doc.tokens[start:start + n]
      # Targets: the following n tokens of the document, the last may not exist.
      n_targets = min(n, n_tokens - start - 1)
      targets[fill:fill + n_targets] = doc.tokens[start + 1:start + 1 + n_targets]
      loss_mask[fill:fill + n_targets] = doc.trained[start + 1:start + 1 + n_targets]
      segment_ids[piece] = segment
      positions[piece] = np.arange(n)
      fill += n
      start += n
      if fill == seq_len:
        rows.append(row)
        row, fill, segment = _empty_row(seq_len, pad_id), 0, 0
  if fill:
    rows.append(row)
  if not rows:
    raise DataError("pack_sequences: no tokens to pack (empty document list)")
  return {name: np.stack([r[i] for r in rows]) for i, name in enumerate(ROW_FIELDS)}


def _empty_row(seq_len: int, pad_id: int) -> tuple[np.ndarray, ...]:
  return (np.full(seq_len, pad_id, np.int32), np.full(seq_len, pad_id, np.int32),
          np.full(seq_len, PADDING_SEGMENT, np.int32), np.zeros(seq_len, np.int32),
          np.zeros(seq_len, np.float32))


def pad_rows(rows: dict[str, np.ndarray], multiple: int, *, pad_id: int
             ) -> dict[str, np.ndarray]:
  """`rows` followed by padding rows (no loss, segment 0) up to a multiple of
  `multiple` rows: whole batches that weigh each real row once."""
  count, seq_len = rows["input_ids"].shape
  extra = -count % multiple
  empty = _empty_row(seq_len, pad_id)
  return {name: np.concatenate([rows[name], np.tile(empty[i], (extra, 1))])
          for i, name in enumerate(ROW_FIELDS)}


class PackedRows:
  """Packed rows served in a reshuffled order each epoch, addressable by position.

  `take(position, count)` returns rows `position .. position + count - 1` of
  the endless stream epoch 0, epoch 1, ...; epoch e is the rows permuted by
  numpy's generator seeded with (seed, e). The stream position (rows used)
  is all a checkpoint needs to resume the data order exactly.
  """

  def __init__(self, rows: dict[str, np.ndarray], *, seed: int, shuffle: bool = True):
    self.rows = rows
    self.num_rows = len(rows["input_ids"])
    self.seed = seed
    self.shuffle = shuffle
    self._orders: dict[int, np.ndarray] = {}

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      self._orders = {epoch: (
          np.random.default_rng((self.seed, epoch)).permutation(self.num_rows)
          if self.shuffle else np.arange(self.num_rows))}
    return self._orders[epoch]

  def take(self, position: int, count: int) -> dict[str, np.ndarray]:
    index = np.empty(count, np.int64)
    for k in range(count):
      epoch, offset = divmod(position + k, self.num_rows)
      index[k] = self._order(epoch)[offset]
    return {name: value[index] for name, value in self.rows.items()}


# ----------------------------------------------------------------------------
# Sources: the embedded corpus and user files
# ----------------------------------------------------------------------------

def is_validation(key: str, val_percent: float) -> bool:
  """The one train/validation split rule: a stable hash of the key (a path)."""
  return zlib.crc32(key.encode("utf-8")) % 10_000 < val_percent * 100


def stdlib_sources() -> list[tuple[str, Path]]:
  """(relative path, path) of the stdlib's .py files, in a stable hashed order.

  The order depends only on the relative paths, not on the filesystem, so a
  size cap picks the same files on every machine with the same Python.
  """
  root = Path(sysconfig.get_paths()["stdlib"])
  files = []
  for folder, subfolders, names in os.walk(root):
    subfolders[:] = sorted(d for d in subfolders if d not in _NOT_STDLIB)
    for name in names:
      if name.endswith(".py"):
        path = Path(folder, name)
        files.append((path.relative_to(root).as_posix(), path))
  files.sort(key=lambda item: (zlib.crc32(item[0].encode()), item[0]))
  return files


def stdlib_corpus(split: str, *, max_bytes: int, val_percent: float) -> Iterator[str]:
  """Source texts of the stdlib corpus split ("train" | "validation"), lazily.

  Files are read one at a time, in `stdlib_sources` order, as long as they
  fit in `max_bytes` (file sizes in bytes) in total.
  """
  if split not in ("train", "validation"):
    raise ValueError(f"split={split!r}: expected 'train' or 'validation'")
  want_val = split == "validation"
  total = 0
  for rel, path in stdlib_sources():
    if is_validation(rel, val_percent) != want_val:
      continue
    try:
      size = path.stat().st_size
      if size > MAX_CORPUS_FILE_BYTES or total + size > max_bytes:
        continue  # too big for the corpus, or for what is left of the cap
      text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
      continue  # an unreadable stdlib file just leaves the corpus
    total += size
    yield f"# {rel}\n{text}"


def read_documents(path: str | Path, tokenizer, *, train_prompt: bool = False,
                   log: Callable[[str], None] = print_warning
                   ) -> list[tuple[str, Document]]:
  """(key, Document) pairs from a user path; keys feed `is_validation`.

  A folder: every file under it (sorted) is one text document. A .jsonl
  file: one record per line, {"text": ...} or {"prompt": ..., "completion":
  ...} (the prompt is trained only with train_prompt=True), or a chat,
  ShareGPT or Alpaca record (`swajax.text.chat`: rendered with the tokenizer's
  chat template, the assistant turns trained; an HF tokenizer without one
  renders them with ChatML, becomes its chat_template and `log` gets a
  one-line warning). Any other file: one text document. A malformed line
  raises DataError naming its file and line.
  """
  path = Path(path)
  if not path.exists():
    raise DataError(f"data={str(path)!r}: no such file or directory")
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return [(p.relative_to(path).as_posix(), encode_text(tokenizer, read_text(p)))
            for p in files]
  if path.suffix == ".jsonl":
    return [(f"{path.name}:{n}", doc)
            for n, doc in _jsonl_documents(path, tokenizer, train_prompt, log)]
  return [(path.name, encode_text(tokenizer, read_text(path)))]


def read_text(path: Path) -> str:
  try:
    return path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"data={str(path)!r}: cannot read as UTF-8 text ({e})") from e


def _jsonl_documents(path: Path, tokenizer, train_prompt: bool, log
                     ) -> Iterator[tuple[int, Document]]:
  encoder = None  # the chat template, compiled at the first chat record
  for n, line in enumerate(read_text(path).splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"data={str(path)!r}: line {n} is not JSON ({e.msg})") from e
    try:
      messages = chat_lib.messages_of(record) if isinstance(record, dict) else None
      if messages is not None:
        encoder = encoder or chat_encoder(tokenizer, log)
        yield n, Document(*encoder.encode(messages))
        continue
    except chat_lib.ChatDataError as e:
      raise DataError(f"data={str(path)!r}: line {n}: {e}") from e
    if isinstance(record, dict) and isinstance(record.get("text"), str):
      yield n, encode_text(tokenizer, record["text"])
    elif (isinstance(record, dict) and isinstance(record.get("prompt"), str)
          and isinstance(record.get("completion"), str)):
      yield n, encode_example(tokenizer, record["prompt"], record["completion"],
                              train_prompt=train_prompt)
    else:
      raise DataError(f"data={str(path)!r}: line {n}: expected an object with "
                      "'text', or 'prompt' and 'completion' strings, or a chat "
                      "('messages'), ShareGPT ('conversations') or Alpaca "
                      "('instruction', 'output') record")


def chat_encoder(tokenizer, log: Callable[[str], None] = print_warning
                 ) -> chat_lib.ChatEncoder:
  """The `ChatEncoder` a run renders its chat records with. A tokenizer
  without a chat template gets ChatML as its chat_template (the one its
  exports then carry); for an HF tokenizer, whose model may expect another,
  `log` gets a one-line warning naming it."""
  if tokenizer.chat_template is None:
    tokenizer.chat_template = chat_lib.DEFAULT_TEMPLATE
    if isinstance(tokenizer, HFTokenizer):
      log(f"warning: {tokenizer.file or 'the tokenizer'} has no chat template: chat "
          "records are rendered with chatml (choose one with --chat-template FILE|NAME)")
  return chat_lib.ChatEncoder(tokenizer)


def split_train_val(keyed: Sequence[tuple[str, Document]], val_percent: float
                    ) -> tuple[list[Document], list[Document]]:
  """(train, validation) documents by `is_validation` on their keys.

  If the rule picks no validation document, the last document is held out
  instead; a single document cannot be split and is an error.
  """
  train = [doc for key, doc in keyed if not is_validation(key, val_percent)]
  val = [doc for key, doc in keyed if is_validation(key, val_percent)]
  if not val:
    if len(train) < 2:
      raise DataError(f"data: {len(keyed)} document(s) cannot be split into train "
                      "and validation; give more documents or --val-data")
    val = [train.pop()]
  if not train:
    raise DataError("data: every document fell into validation; lower --val-percent")
  return train, val


# ----------------------------------------------------------------------------
# A training run's data
# ----------------------------------------------------------------------------

def load_data(config: TrainConfig, tokenizer, notes: list[str] | None = None,
              log: Callable[[str], None] = print_warning) -> tuple[PackedRows, dict]:
  """(training rows, validation rows [R, T] dict) for `config`.

  Documents longer than seq_len are handled per `config.too_long` (see
  `fit_documents`); when some are, a line saying how many and what was done
  is appended to `notes` (the run reports it at the end). `log` gets
  `read_documents`' warnings at once.
  """
  if config.data is None:
    train_docs = [encode_text(tokenizer, text) for text in stdlib_corpus(
        "train", max_bytes=config.corpus_max_bytes, val_percent=config.val_percent)]
    val_docs = [encode_text(tokenizer, text) for text in stdlib_corpus(
        "validation", max_bytes=max(config.corpus_max_bytes // 10, 1),
        val_percent=config.val_percent)]
  else:
    keyed = read_documents(config.data, tokenizer, train_prompt=config.train_prompt,
                           log=log)
    if config.val_data is None:
      train_docs, val_docs = split_train_val(keyed, config.val_percent)
    else:
      train_docs = [doc for _, doc in keyed]
      val_docs = [doc for _, doc in read_documents(
          config.val_data, tokenizer, train_prompt=config.train_prompt, log=log)]
  pack = functools.partial(pack_for_loss, seq_len=config.seq_len,
                           too_long=config.too_long, pad_id=tokenizer.pad_id)
  train_rows, train_note = pack(train_docs, whole=keeps_records_whole(config.data))
  val_rows, val_note = pack(val_docs, whole=keeps_records_whole(
      config.data if config.val_data is None else config.val_data))
  if notes is not None:
    notes += [f"{split} data: {note}" for split, note in
              (("train", train_note), ("validation", val_note)) if note]
  # Validation: the first eval_batches * batch_size rows, each once (a short
  # validation set is not repeated to fill them), in whole batches.
  val_rows = {k: v[:config.eval_batches * config.batch_size] for k, v in val_rows.items()}
  return (PackedRows(train_rows, seed=config.seed),
          pad_rows(val_rows, config.batch_size, pad_id=tokenizer.pad_id))


def keeps_records_whole(path: str | Path | None) -> bool:
  """Whether documents from `path` are packed whole (JSONL records: a prompt
  and its completion stay together), not streamed end to end (text)."""
  return path is not None and str(path).endswith(".jsonl")


def pack_for_loss(docs: list[Document], *, seq_len: int, too_long: str, pad_id: int,
                  whole: bool) -> tuple[dict[str, np.ndarray], str | None]:
  """(rows [R, T], note) of `docs` as training and evaluation pack them:
  `fit_documents` (its note), then `pack_sequences` (documents that fit a
  row kept whole when `whole`)."""
  docs, note = fit_documents(docs, seq_len, too_long)
  return pack_sequences(docs, seq_len, pad_id=pad_id, split_documents=not whole), note


def file_rows(path: str | Path, tokenizer, *, seq_len: int, too_long: str,
              train_prompt: bool = False) -> tuple[dict[str, np.ndarray], str | None]:
  """(rows [R, T], note): every document of a data file (`read_documents`)
  packed as a training run packs its data (`pack_for_loss`): the rows
  `swajax eval` scores. DataError for a file without documents."""
  docs = [doc for _, doc in read_documents(path, tokenizer, train_prompt=train_prompt)]
  if not docs:
    raise DataError(f"data={str(path)!r}: no documents")
  return pack_for_loss(docs, seq_len=seq_len, too_long=too_long,
                       pad_id=tokenizer.pad_id, whole=keeps_records_whole(path))


def fit_documents(docs: list[Document], seq_len: int, too_long: str
                  ) -> tuple[list[Document], str | None]:
  """(documents, a note or None) with those longer than seq_len tokens
  "split" (kept: packing continues them in the next rows as new pieces),
  "truncate"d to their first seq_len tokens, or "drop"ped. The note counts
  them; None when every document fits."""
  if too_long not in TOO_LONG:
    raise ValueError(f"too_long={too_long!r}: expected one of {TOO_LONG}")
  long = [len(doc.tokens) > seq_len for doc in docs]
  count = sum(long)
  if not count:
    return docs, None
  if too_long == "drop":
    docs = [doc for doc, is_long in zip(docs, long) if not is_long]
  elif too_long == "truncate":
    docs = [Document(doc.tokens[:seq_len], doc.trained[:seq_len]) for doc in docs]
  verb = {"split": "split across rows", "truncate": "truncated to their first "
          f"{seq_len} tokens", "drop": "dropped"}[too_long]
  return docs, (f"{count} of {len(long)} documents longer than seq_len={seq_len} "
                f"tokens were {verb} (--too-long {too_long})")


def resolve_tokenizer(config: TrainConfig):
  """config.tokenizer (a tokenizer.json or "bytes"); else, fine-tuning an HF
  folder or GGUF file, its tokenizer as `swajax generate` finds it
  (`model_source.load_tokenizer_for`: the GGUF file's, its tokenizer.json,
  or bytes its config.json records; else FileNotFoundError, never a guess);
  else bytes.
  With config.chat_template, that template replaces the tokenizer's own."""
  if config.init_from_hf is not None:
    folder = Path(config.init_from_hf)
    if not is_gguf(folder) and not (folder / "config.json").is_file():
      raise FileNotFoundError(f"init_from_hf={config.init_from_hf!r}: no config.json "
                              "(expected a Hugging Face folder)")
    tokenizer = load_tokenizer_for(folder, folder, config.tokenizer)
  else:
    tokenizer = load_tokenizer(None if config.tokenizer == "bytes" else config.tokenizer)
  if config.chat_template is None:
    return tokenizer
  return with_chat_template(tokenizer, config.chat_template)

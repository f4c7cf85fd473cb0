"""Preference data (`TrainConfig.stage = "dpo"`): JSONL pairs read, rendered
and laid out one pair per row.

Record formats (one JSON object per line):
  standard        {"prompt": str, "chosen": str, "rejected": str}
                  -> [bos] prompt answer [eos] (as SFT's prompt/completion)
  conversational  {"prompt": [messages], "chosen": [messages],
                  "rejected": [messages]} (TRL; "chosen" / "rejected" hold the
                  assistant turn(s) that follow the prompt)
  ShareGPT        {"conversations": [{"from", "value"}, ...], "chosen":
                  {"from": "gpt", "value"}, "rejected": {...}} (LLaMA-Factory;
                  a list of turns is accepted for chosen / rejected too)
Conversations are rendered with the tokenizer's chat template
(`swajax.text.chat.ChatEncoder`); only the answer's tokens are trained
(never the prompt's, nor assistant turns inside the prompt).

A pair is one row of seq_len tokens (`pair_rows`): prompt + chosen as
segment `preference.CHOSEN`, prompt + rejected as segment
`preference.REJECTED`, each from position 0, then padding; pairs are never
packed together. A pair longer than the row (both sequences together) is
handled per `too_long` (`fit_pairs`): "truncate" cuts the sequences' ends,
"drop" leaves it out; "split" cannot apply to a pair and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from swajax.text import chat as chat_lib
from swajax.text.tokenizers import DataError
from swajax.training import data as data_lib
from swajax.training.config import TrainConfig


class Pair(NamedTuple):
  """Two `data.Document`s sharing a prompt; only their answers are trained."""

  chosen: data_lib.Document
  rejected: data_lib.Document


def read_pairs(path: str | Path, tokenizer, log: Callable[[str], None] = data_lib.print_warning
               ) -> list[tuple[str, Pair]]:
  """(key "file:line", Pair) of each record of a .jsonl file; a malformed
  record raises DataError naming the file and line. Conversations are rendered
  by `data.chat_encoder` (`log`: its warning)."""
  path = Path(path)
  if not path.is_file() or path.suffix != ".jsonl":
    raise DataError(f"data={str(path)!r}: expected a .jsonl file of preference pairs "
                    "({prompt, chosen, rejected} records)")
  encoder = None  # the chat template, compiled at the first conversation
  pairs = []
  for n, line in enumerate(data_lib.read_text(path).splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or not {"chosen", "rejected"} <= set(record):
        raise chat_lib.ChatDataError(
            "expected an object with 'chosen' and 'rejected' (and 'prompt', or "
            "ShareGPT 'conversations')")
      if isinstance(record["chosen"], str):
        pair = _standard_pair(record, tokenizer)
      else:
        encoder = encoder or data_lib.chat_encoder(tokenizer, log)
        pair = _conversation_pair(record, encoder)
    except json.JSONDecodeError as e:
      raise DataError(f"data={str(path)!r}: line {n} is not JSON ({e.msg})") from e
    except chat_lib.ChatDataError as e:
      raise DataError(f"data={str(path)!r}: line {n}: {e}") from e
    pairs.append((f"{path.name}:{n}", pair))
  if not pairs:
    raise DataError(f"data={str(path)!r}: no preference pairs")
  return pairs


def _standard_pair(record: dict, tokenizer) -> Pair:
  for key in ("prompt", "chosen", "rejected"):
    if not isinstance(record.get(key), str):
      raise chat_lib.ChatDataError(f"{key!r}: expected a string (standard format)")
  for key in ("chosen", "rejected"):
    if not record[key]:
      raise chat_lib.ChatDataError(f"{key!r}: empty answer")
  return Pair(*(data_lib.encode_example(tokenizer, record["prompt"], record[key])
                for key in ("chosen", "rejected")))


def _conversation_pair(record: dict, encoder) -> Pair:
  if "conversations" in record:
    key, prompt = "conversations", record["conversations"]
  else:
    key, prompt = "messages", record.get("prompt")
  if not isinstance(prompt, list):
    raise chat_lib.ChatDataError(
        f"{'prompt' if key == 'messages' else key!r}: expected a list of messages")
  sides = []
  for side in ("chosen", "rejected"):
    answer = record[side]
    answer = [answer] if isinstance(answer, dict) else answer
    if not isinstance(answer, list) or not answer:
      raise chat_lib.ChatDataError(f"{side!r}: expected a message or a list of messages")
    try:
      messages = chat_lib.messages_of({key: prompt + answer})
    except chat_lib.ChatDataError as e:
      raise chat_lib.ChatDataError(f"{side!r}: {e}") from e
    if any(m["role"] != "assistant" for m in messages[len(prompt):]):
      raise chat_lib.ChatDataError(f"{side!r}: expected assistant turns only")
    sides.append(data_lib.Document(*encoder.encode(messages, train_from=len(prompt))))
  return Pair(*sides)


def fit_pairs(pairs: list[Pair], seq_len: int, too_long: str
              ) -> tuple[list[Pair], str | None]:
  """(pairs, a note or None): those whose two sequences together pass
  seq_len tokens "truncate"d (the longer sequence first cut to its half of
  the row, or to what the shorter leaves; a pair left without an answer
  token on a side is dropped) or "drop"ped; "split" is a DataError (a pair
  stays in one row)."""
  long = [len(p.chosen.tokens) + len(p.rejected.tokens) > seq_len for p in pairs]
  count = sum(long)
  if not count:
    return pairs, None
  if too_long == "split":
    raise DataError(f"{count} of {len(pairs)} preference pairs are longer than "
                    f"seq_len={seq_len} tokens (chosen + rejected) and a pair cannot "
                    "be split across rows: raise --seq-len or pass --too-long "
                    "truncate or drop")
  kept, emptied = [], 0
  for pair, is_long in zip(pairs, long):
    if not is_long:
      kept.append(pair)
    elif too_long == "truncate":
      n_c, n_r = len(pair.chosen.tokens), len(pair.rejected.tokens)
      keep_c = min(n_c, max(seq_len // 2, seq_len - n_r))
      cut = Pair(*(data_lib.Document(d.tokens[:n], d.trained[:n])
                   for d, n in ((pair.chosen, keep_c), (pair.rejected, seq_len - keep_c))))
      if cut.chosen.trained[1:].any() and cut.rejected.trained[1:].any():
        kept.append(cut)
      else:
        emptied += 1
  verb = {"truncate": "truncated", "drop": "dropped"}[too_long]
  note = (f"{count} of {len(pairs)} preference pairs longer than seq_len={seq_len} "
          f"tokens were {verb} (--too-long {too_long})")
  if emptied:
    note += f"; {emptied} of them kept no answer token and were dropped"
  if not kept:
    raise DataError(note + ": no pair is left")
  return kept, note


def pair_rows(pairs: list[Pair], seq_len: int, *, pad_id: int) -> dict[str, np.ndarray]:
  """The rows [R, T] (`data.ROW_FIELDS`) of pairs that fit: one pair per row,
  chosen as segment `preference.CHOSEN` = 1, rejected as `REJECTED` = 2 (the
  pieces `data.pack_sequences` numbers in order)."""
  rows = [data_lib.pack_sequences([p.chosen, p.rejected], seq_len, pad_id=pad_id,
                                  split_documents=False) for p in pairs]
  if any(len(r["input_ids"]) != 1 for r in rows):
    raise ValueError(f"pair_rows: a pair is longer than seq_len={seq_len} (fit_pairs first)")
  return {name: np.concatenate([r[name] for r in rows]) for name in data_lib.ROW_FIELDS}


def load_pairs(config: TrainConfig, tokenizer, notes: list[str] | None = None,
               log: Callable[[str], None] = data_lib.print_warning
               ) -> tuple[data_lib.PackedRows, dict]:
  """(training rows, validation rows [R, T] dict) of a dpo run: `data.load_data`
  for pairs (the same split, validation and too-long rules; `log`: warnings)."""
  if config.data is None:
    raise DataError("data=None with stage='dpo': expected a .jsonl file of preference "
                    "pairs (--data)")
  keyed = read_pairs(config.data, tokenizer, log)
  if config.val_data is None:
    train, val = data_lib.split_train_val(keyed, config.val_percent)
  else:
    train = [pair for _, pair in keyed]
    val = [pair for _, pair in read_pairs(config.val_data, tokenizer, log)]
  train, train_note = fit_pairs(train, config.seq_len, config.too_long)
  val, val_note = fit_pairs(val, config.seq_len, config.too_long)
  if notes is not None:
    notes += [f"{split} data: {note}" for split, note in
              (("train", train_note), ("validation", val_note)) if note]
  val = val[:config.eval_batches * config.batch_size]
  return (data_lib.PackedRows(pair_rows(train, config.seq_len, pad_id=tokenizer.pad_id),
                              seed=config.seed),
          data_lib.pad_rows(pair_rows(val, config.seq_len, pad_id=tokenizer.pad_id),
                            config.batch_size, pad_id=tokenizer.pad_id))

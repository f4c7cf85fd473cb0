"""A GGUF file's tokenizer metadata as a `tokenizers.Tokenizer`.

GGUF has no tokenizer.json: llama.cpp stores the vocabulary under
`tokenizer.ggml.*` (tokens, token types, scores or merges, special ids) and
the chat template under `tokenizer.chat_template`. `build_tokenizer` turns
those values (already read from the file: `swajax.io.gguf` reads them) into
the same tokenizer transformers' GGUF loader builds, so both encode a text
to the same ids:
  "gpt2"   byte-level BPE: the file's merges, GPT-2's byte alphabet and
           pre-tokenizer (`tokenizer.ggml.pre` "default", "gpt-2", "smollm"),
           a ByteLevel decoder.
  "llama"  of a Gemma file: SentencePiece BPE with byte fallback, spaces
           as "▁" (a token of spaces respelled as "▁"s), merges recovered
           from the vocabulary in the file's token order. Other
           SentencePiece vocabularies (Llama 2, Mistral) are not supported yet.
Control tokens (type 3) become special added tokens and user-defined ones
(type 4) plain added tokens, so neither is ever split. Other tokenizer models
and pre-tokenizers are refused by name (`ValueError`).
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

# `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
CONTROL, USER_DEFINED = 3, 4
# Byte-level pre-tokenizers that split as GPT-2 does (what transformers
# applies to a "gpt2" vocabulary whose `tokenizer.ggml.pre` it has no rule for).
GPT2_PRE_TOKENIZERS = ("default", "gpt-2", "smollm")


def byte_alphabet() -> dict[int, str]:
  """GPT-2's printable spelling of each byte: printable Latin-1 bytes stand
  for themselves; the others (controls, space, ...) take the code points
  from 256 up, in byte order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  spelling, extra = {}, 256
  for byte in range(256):
    if byte in printable:
      spelling[byte] = chr(byte)
    else:
      spelling[byte] = chr(extra)
      extra += 1
  return spelling


def build_tokenizer(vocab: dict, *, gemma_style: bool) -> Tokenizer:
  """The `tokenizers.Tokenizer` of GGUF tokenizer metadata.

  vocab: {"model": tokenizer.ggml.model, "pre": tokenizer.ggml.pre (or None),
  "tokens": [str], "token_type": [int] or None, "scores": [float] or None,
  "merges": ["a b"] or None, "unk_id", "bos_id": int or None,
  "add_bos": bool}.
  gemma_style: the vocabulary is a Gemma one (`general.architecture` gemma,
  gemma2, gemma3).
  """
  model = vocab["model"]
  if model == "gpt2":
    tokenizer = _byte_level(vocab)
  elif model == "llama" and gemma_style:
    tokenizer = _gemma(vocab)
  elif model == "llama":
    raise ValueError("tokenizer.ggml.model='llama' outside a Gemma file: this "
                     "SentencePiece vocabulary is not supported yet")
  else:
    raise ValueError(f"tokenizer.ggml.model={model!r}: expected 'gpt2' or 'llama'")
  types = vocab.get("token_type") or ()
  alphabet = set(byte_alphabet().values())
  tokenizer.add_special_tokens([
      AddedToken(token, normalized=False, special=True)
      for token, kind in zip(vocab["tokens"], types)
      # A byte-level vocabulary spells every token in the byte alphabet: a
      # "control" token outside it is a mislabel, left out as transformers does.
      if kind == CONTROL and (model != "gpt2" or set(token) <= alphabet)])
  known = tokenizer.get_vocab(with_added_tokens=False)
  tokenizer.add_tokens([AddedToken(token, normalized=False, special=False)
                        for token, kind in zip(vocab["tokens"], types)
                        if kind == USER_DEFINED and token in known])
  return tokenizer


def _byte_level(vocab: dict) -> Tokenizer:
  pre = vocab.get("pre") or "default"
  if pre not in GPT2_PRE_TOKENIZERS:
    raise ValueError(f"tokenizer.ggml.pre={pre!r}: this byte-level pre-tokenizer "
                     f"is not supported (expected one of {list(GPT2_PRE_TOKENIZERS)})")
  if vocab.get("merges") is None:
    raise ValueError("tokenizer.ggml.merges: missing (a 'gpt2' vocabulary needs its merges)")
  spelling = byte_alphabet()
  alphabet = set(spelling.values())
  ids = {token if set(token) <= alphabet
         else "".join(spelling[b] for b in token.encode("utf-8")): i
         for i, token in enumerate(vocab["tokens"])}
  merges = [tuple(merge.split(" ")) for merge in vocab["merges"]]
  tokenizer = Tokenizer(BPE(ids, merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = _bos_processor(vocab)
  return tokenizer


def _gemma(vocab: dict) -> Tokenizer:
  # Gemma files store a token of n spaces as spaces; the model reads "▁"s.
  tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in vocab["tokens"]]
  ids = {token: i for i, token in enumerate(tokens)}
  if vocab.get("merges") is not None:
    merges = [tuple(merge.split(" ")) for merge in vocab["merges"]]
  else:  # Gemma's scores do not follow its merge order; the file's order does
    merges = recovered_merges(ids, {token: -i for i, token in enumerate(tokens)})
  unk = tokens[vocab["unk_id"]] if vocab.get("unk_id") is not None else None
  tokenizer = Tokenizer(BPE(ids, merges, dropout=None, unk_token=unk,
                            fuse_unk=True, byte_fallback=True))
  tokenizer.normalizer = normalizers.Replace(" ", "▁")
  tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
  tokenizer.decoder = decoders.Sequence(
      [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
  tokenizer.post_processor = _bos_processor(vocab)
  return tokenizer


def recovered_merges(ids: dict[str, int], rank: dict[str, float]) -> list[tuple[str, str]]:
  """The BPE merges a vocabulary implies: every split of a token into two
  tokens, best `rank` first (then longer left piece, longer right piece,
  then `rank`'s order and lower piece ids): transformers' rule for SentencePiece files without merges."""
  merges = []
  for position, (token, score) in enumerate(rank.items()):
    for cut in range(1, len(token)):
      left, right = token[:cut], token[cut:]
      if left in ids and right in ids:
        merges.append((-score, -len(left), -len(right), position, ids[left],
                       ids[right], left, right))
  merges.sort()
  return [(left, right) for *_, left, right in merges]


def _bos_processor(vocab: dict):
  """Prepends bos where the file says to (`tokenizer.ggml.add_bos_token`)."""
  if not vocab.get("add_bos") or vocab.get("bos_id") is None:
    return processors.TemplateProcessing(single="$A", pair="$A $B:1")
  bos = vocab["tokens"][vocab["bos_id"]]
  return processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
      special_tokens=[(bos, vocab["bos_id"])])

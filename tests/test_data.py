"""Tokenizers, packing, the embedded corpus and user data files (no model needed)."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from swajax.text import tokenizers as tokenizer_lib
from swajax.training import data

PAD = 999


def expected_triples(docs):
  """(input, target, trained) per token of each document, in order: the oracle."""
  out = []
  for doc in docs:
    doc = data._as_document(doc)
    n = len(doc.tokens)
    for i in range(n):
      has_next = i + 1 < n
      out.append((int(doc.tokens[i]), int(doc.tokens[i + 1]) if has_next else PAD,
                  float(has_next and doc.trained[i + 1])))
  return out


def documents(max_len=20):
  """Documents with random tokens and random trained flags (prompt masking)."""
  doc = st.integers(1, max_len).flatmap(lambda n: st.tuples(
      st.lists(st.integers(0, 300), min_size=n, max_size=n),
      st.lists(st.booleans(), min_size=n, max_size=n)))
  return st.lists(doc, min_size=1, max_size=8).map(lambda docs: [
      data.Document(np.asarray(t, np.int32), np.asarray(m)) for t, m in docs])


@settings(max_examples=60)  # pure numpy: cheap examples
@given(docs=documents(), seq_len=st.integers(1, 16), split=st.booleans())
def test_packing_round_trip_and_masks(docs, seq_len, split):
  rows = data.pack_sequences(docs, seq_len, pad_id=PAD, split_documents=split)
  for name in data.ROW_FIELDS:
    assert rows[name].shape == rows["input_ids"].shape
    assert rows[name].shape[1] == seq_len
  seg = rows["segment_ids"]
  real = seg != data.PADDING_SEGMENT
  # Reading the real tokens row by row gives every document's tokens, targets
  # and masks in order: nothing lost, reordered, or predicted across documents.
  got = list(zip(rows["input_ids"][real].tolist(), rows["targets"][real].tolist(),
                 rows["loss_mask"][real].tolist()))
  assert got == expected_triples(docs)
  # Padding: pad tokens, no loss, only at the end of a row.
  assert np.all(rows["input_ids"][~real] == PAD)
  assert np.all(rows["loss_mask"][~real] == 0)
  assert np.all(np.diff(real.astype(int), axis=1) <= 0)
  for r in range(len(seg)):
    ids = seg[r][real[r]]
    # Pieces are numbered 1, 2, ... in order, each contiguous ...
    assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
    # ... and positions count from 0 inside each piece.
    starts = {s: np.argmax(seg[r] == s) for s in np.unique(ids)}
    want = [t - starts[s] for t, s in enumerate(ids)]
    np.testing.assert_array_equal(rows["positions"][r][real[r]], want)
  # A document never shares a piece with another: each document starts a piece.
  flat_seg = [(r, s) for r in range(len(seg)) for s in seg[r][real[r]]]
  start = 0
  for doc in docs:
    assert start == 0 or flat_seg[start] != flat_seg[start - 1]
    start += len(doc.tokens)
  if not split:  # documents that fit in a row are never split
    for doc in (d for d in docs if len(d.tokens) <= seq_len):
      assert any(np.array_equal(rows["input_ids"][r][seg[r] == s], doc.tokens)
                 for r in range(len(seg)) for s in np.unique(seg[r][real[r]]))


def test_packing_literal_example():
  """The docstring example, literally."""
  rows = data.pack_sequences([[1, 2, 3], [4, 5]], 4, pad_id=0)
  np.testing.assert_array_equal(rows["input_ids"], [[1, 2, 3, 4], [5, 0, 0, 0]])
  np.testing.assert_array_equal(rows["targets"], [[2, 3, 0, 5], [0, 0, 0, 0]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 2], [1, 0, 0, 0]])
  np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(rows["loss_mask"], [[1, 1, 0, 1], [0, 0, 0, 0]])


def test_packing_keeps_whole_documents_when_asked():
  rows = data.pack_sequences([[1, 2, 3], [4, 5]], 4, pad_id=0, split_documents=False)
  np.testing.assert_array_equal(rows["input_ids"], [[1, 2, 3, 0], [4, 5, 0, 0]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 0], [1, 1, 0, 0]])


@pytest.mark.parametrize("seq_len", [0, -3, 2.5])
def test_packing_rejects_bad_seq_len(seq_len):
  with pytest.raises(ValueError, match="seq_len"):
    data.pack_sequences([[1, 2]], seq_len, pad_id=0)


@pytest.mark.parametrize("tokens, trained", [
    ([1, 2, 3], [True, False]),
    ([[1, 2], [3, 4]], [[True, True], [True, True]]),
])
def test_packing_rejects_mismatched_documents(tokens, trained):
  doc = data.Document(np.asarray(tokens), np.asarray(trained))
  with pytest.raises(ValueError, match="expected tokens \\[L\\] and trained"):
    data.pack_sequences([doc], 4, pad_id=0)


def test_packing_rejects_no_documents():
  with pytest.raises(tokenizer_lib.DataError, match="no tokens"):
    data.pack_sequences([], 4, pad_id=0)


@given(st.text(max_size=50))
def test_byte_tokenizer_round_trip(text):
  tok = tokenizer_lib.ByteTokenizer()
  ids = tok.encode(text)
  assert all(0 <= i < 256 for i in ids)
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text


def test_byte_tokenizer_specials():
  tok = tokenizer_lib.ByteTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
  doc = data.encode_text(tok, "ab")
  np.testing.assert_array_equal(doc.tokens, [257, 97, 98, 258])
  np.testing.assert_array_equal(doc.trained, [False, True, True, True])


@pytest.mark.parametrize("train_prompt", [False, True])
def test_prompt_masking(train_prompt):
  tok = tokenizer_lib.ByteTokenizer()
  doc = data.encode_example(tok, "Q:", "A", train_prompt=train_prompt)
  np.testing.assert_array_equal(doc.tokens, [257, ord("Q"), ord(":"), ord("A"), 258])
  np.testing.assert_array_equal(doc.trained, [False, train_prompt, train_prompt, True, True])
  rows = data.pack_sequences([doc], 8, pad_id=tok.pad_id)
  # Targets Q, :, A, eos: the prompt ones carry loss only with train_prompt.
  np.testing.assert_array_equal(rows["loss_mask"][0][:4],
                                [train_prompt, train_prompt, 1, 1])


def test_hf_tokenizer_from_local_file(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "hello": 3, "world": 4, "[UNK]": 5}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<s>", "</s>", "<pad>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  loaded = tokenizer_lib.load_tokenizer(tmp_path)
  assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (0, 1, 2, 6)
  assert loaded.encode("hello world") == [3, 4]
  assert loaded.decode([0, 3, 4, 1]) == "hello world"
  # tokenizer_config.json names the specials when present.
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": {"content": "<pad>"}, "bos_token": None}))
  assert tokenizer_lib.load_tokenizer(tmp_path / "tokenizer.json").eos_id == 2


def test_bad_tokenizer_path(tmp_path):
  with pytest.raises(tokenizer_lib.DataError, match="no such file"):
    tokenizer_lib.load_tokenizer(tmp_path / "missing.json")
  (tmp_path / "tokenizer.json").write_text("not json")
  with pytest.raises(tokenizer_lib.DataError, match="cannot read"):
    tokenizer_lib.load_tokenizer(tmp_path)


def test_stdlib_corpus_is_split_deterministically_and_capped():
  train = list(data.stdlib_corpus("train", max_bytes=200_000, val_percent=10))
  val = list(data.stdlib_corpus("validation", max_bytes=200_000, val_percent=10))
  assert train and val
  names = lambda texts: {t.split("\n", 1)[0] for t in texts}
  assert not names(train) & names(val)
  assert train == list(data.stdlib_corpus("train", max_bytes=200_000, val_percent=10))
  assert sum(len(t.split("\n", 1)[1].encode()) for t in train) <= 200_000
  for name in names(val):
    assert data.is_validation(name.removeprefix("# "), 10)


def test_stdlib_corpus_is_lazy():
  corpus = data.stdlib_corpus("train", max_bytes=10**9, val_percent=5)
  first = next(corpus)
  assert first.startswith("# ") and first.count("\n") > 1


def test_read_documents_jsonl(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"text": "ab"}\n\n{"prompt": "Q", "completion": "A"}\n')
  tok = tokenizer_lib.ByteTokenizer()
  (k1, d1), (k2, d2) = data.read_documents(path, tok)
  assert (k1, k2) == ("d.jsonl:1", "d.jsonl:3")
  np.testing.assert_array_equal(d1.trained, [False, True, True, True])
  np.testing.assert_array_equal(d2.trained, [False, False, True, True])


@pytest.mark.parametrize("line, match", [
    ("{bad", "line 1 is not JSON"),
    ('{"prompt": "only"}', "line 1: expected an object"),
    ("[1, 2]", "line 1: expected an object"),
])
def test_read_documents_rejects_bad_jsonl(tmp_path, line, match):
  path = tmp_path / "d.jsonl"
  path.write_text(line + "\n")
  with pytest.raises(tokenizer_lib.DataError, match=match):
    data.read_documents(path, tokenizer_lib.ByteTokenizer())


def test_read_documents_folder_and_split(tmp_path):
  for i in range(5):
    (tmp_path / f"f{i}.txt").write_text(f"text {i}")
  keyed = data.read_documents(tmp_path, tokenizer_lib.ByteTokenizer())
  assert [k for k, _ in keyed] == [f"f{i}.txt" for i in range(5)]
  train, val = data.split_train_val(keyed, val_percent=0.0)
  assert len(train) == 4 and len(val) == 1  # the last one held out
  (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
  with pytest.raises(tokenizer_lib.DataError, match="UTF-8"):
    data.read_documents(tmp_path, tokenizer_lib.ByteTokenizer())
  with pytest.raises(tokenizer_lib.DataError, match="cannot be split"):
    data.split_train_val(keyed[:1], val_percent=0.0)


def test_packed_rows_stream_positions():
  rows = data.pack_sequences([list(range(i, i + 3)) for i in range(0, 30, 3)], 3, pad_id=PAD)
  stream = data.PackedRows(rows, seed=1)
  assert stream.num_rows == 10
  whole = stream.take(7, 9)  # crosses into epoch 1
  parts = [stream.take(7, 4), stream.take(11, 5)]
  for name in data.ROW_FIELDS:
    np.testing.assert_array_equal(whole[name], np.concatenate([p[name] for p in parts]))
  epoch0 = stream.take(0, 10)["input_ids"][:, 0]
  epoch1 = stream.take(10, 10)["input_ids"][:, 0]
  assert sorted(epoch0) == sorted(epoch1) == list(range(0, 30, 3))
  assert list(epoch0) != list(epoch1)  # reshuffled each epoch
  ordered = data.PackedRows(rows, seed=1, shuffle=False).take(0, 10)["input_ids"][:, 0]
  assert list(ordered) == list(range(0, 30, 3))

"""Chat / ShareGPT / Alpaca data (swajax.text.chat): rendering with the tokenizer's
chat template and the assistant-only loss mask, checked token by token
against transformers' `apply_chat_template(return_assistant_tokens_mask=True)`
on a tokenizer fixture built here (BPE trained on a few lines, a ChatML
template with {% generation %} markers as Qwen's and SmolLM's use); bad records.
"""

import json

import numpy as np
import pytest

from swajax.text import chat
from swajax.text.tokenizers import ByteTokenizer, DataError, HFTokenizer
from swajax.training import data

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# Qwen2-style ChatML: a default system prompt, the assistant text and its end
# marker inside {% generation %}.
CHATML = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# The same with the newline after <|im_end|> marked too: what an unmarked
# template trains (each turn's whole addition, as LLaMA-Factory does).
CHATML_NEWLINE = CHATML.replace("{% endgeneration %}{{ '\n' }}", "{{ '\n' }}{% endgeneration %}")
UNMARKED = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["You are a helpful assistant.", "What is the capital of France?",
          "Paris is the capital of France.", "Write a haiku about the sea.",
          "Waves fold into foam, salt wind over grey water.", "def add(a, b): return a + b",
          "Translate to German: good morning", "Guten Morgen"]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Waves fold into foam,\nsalt wind."},
     {"role": "user", "content": "Now about a rock, é!"},
     {"role": "assistant", "content": "Grey stone sleeps."}],
]


def make_tokenizer(folder, template):
  """A byte-level BPE tokenizer.json + tokenizer_config.json with `template`."""
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  bpe.train_from_iterator(CORPUS, tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  folder.mkdir(parents=True, exist_ok=True)
  bpe.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
      "pad_token": "<|endoftext|>", "chat_template": template}))
  return folder


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("ours, theirs", [(CHATML, CHATML), (UNMARKED, CHATML_NEWLINE)],
                         ids=["generation-marks", "unmarked"])
def test_mask_matches_transformers_token_by_token(tmp_path, conversation, ours, theirs):
  """transformers' mask for `theirs`; ours renders `ours` (with the marks, or
  without them: then each assistant turn's whole addition is trained)."""
  assert CHATML_NEWLINE != CHATML
  reference = transformers.AutoTokenizer.from_pretrained(
      make_tokenizer(tmp_path / "theirs", theirs)).apply_chat_template(
          conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
  assert 0 < sum(reference["assistant_masks"]) < len(reference["input_ids"])
  tokenizer = HFTokenizer(make_tokenizer(tmp_path / "ours", ours))
  ids, trained = chat.ChatEncoder(tokenizer).encode(conversation)
  assert ids.tolist() == list(reference["input_ids"])
  assert trained.astype(int).tolist() == list(reference["assistant_masks"])


def test_byte_tokenizer_uses_chatml_and_trains_assistant_bytes_only():
  conversation = CONVERSATIONS[0]
  ids, trained = chat.ChatEncoder(ByteTokenizer()).encode(conversation)
  text = bytes(ids.tolist()).decode()
  assert text == ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                  "<|im_start|>assistant\nParis.<|im_end|>\n")
  assert bytes(ids[trained].tolist()).decode() == "Paris.<|im_end|>"


def test_sharegpt_and_alpaca_become_messages():
  sharegpt = {"conversations": [{"from": "system", "value": "S"},
                                {"from": "human", "value": "Q"},
                                {"from": "gpt", "value": "A"}]}
  assert chat.messages_of(sharegpt) == [
      {"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
      {"role": "assistant", "content": "A"}]
  alpaca = {"instruction": "Add", "input": "1 2", "output": "3", "system": "S",
            "history": [["hi", "hello"]]}
  assert chat.messages_of(alpaca) == [
      {"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello"},
      {"role": "user", "content": "Add\n1 2"}, {"role": "assistant", "content": "3"}]
  assert chat.messages_of({"text": "plain"}) is None


@pytest.mark.parametrize("line, match", [
    ("{not json", "line 2 is not JSON"),
    ('{"messages": [{"role": "user"}]}', "line 2: turn 0: expected an object with 'role'"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", '
     '"content": "y"}]}', r"line 2: turn 0: role='robot'"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
     '"content": " "}]}', "line 2: turn 1: empty assistant turn"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "end with an assistant turn"),
    ('{"conversations": [{"from": "bot", "value": "x"}]}', r"from='bot'"),
    ('{"instruction": "x"}', "'output' missing"),
])
def test_bad_chat_lines_name_file_and_line(tmp_path, line, match):
  good = json.dumps({"messages": CONVERSATIONS[0]})
  path = tmp_path / "chat.jsonl"
  path.write_text(good + "\n" + line + "\n")
  with pytest.raises(DataError, match=match):
    data.read_documents(path, ByteTokenizer())


@pytest.mark.parametrize("too_long, lengths", [
    ("split", [3, 9, 5]), ("truncate", [3, 5, 5]), ("drop", [3, 5])])
def test_long_documents_are_split_truncated_or_dropped_and_counted(too_long, lengths):
  docs = [data.Document(np.arange(n, dtype=np.int32), np.ones(n, bool)) for n in (3, 9, 5)]
  fitted, note = data.fit_documents(docs, 5, too_long)
  assert [len(d.tokens) for d in fitted] == lengths
  assert note.startswith("1 of 3 documents longer than seq_len=5")
  assert data.fit_documents(docs[:1], 5, too_long) == (docs[:1], None)

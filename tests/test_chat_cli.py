"""`swajax chat` against transformers: a scripted two-turn chat, greedy, token
for token as transformers' `generate` on `apply_chat_template(...,
add_generation_prompt=True)` of each turn's conversation (the window, 8, far
shorter than it), stopping at an eos id of generation_config.json; the real
command with the turns on stdin prints the same answers, `/reset` and
`/exit` included. The stop text of a multi-token end of turn; bad input.
"""

import io
import json
import subprocess

import numpy as np
import pytest

from swajax.infer.chat_session import ChatSession
from swajax.io.model_source import resolve_model
from swajax.text.stream import TextStream
from swajax.text.tokenizers import ByteTokenizer
from tests.chat_models import chat_model_folder
from tests.test_faults import swajax
from tests.test_merge_cli import one_line_error

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SYSTEM = "Be brief."
TURNS = ["What is the capital of France?", "Write a haiku about the sea."]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
  """(folder, transformers model, tokenizer, expected answers' ids per turn):
  generation_config.json's eos ids are Mistral's 2 and a token the greedy
  first answer produces at its 6th step or later, so it stops there."""
  folder = tmp_path_factory.mktemp("chat") / "model"
  model = chat_model_folder(folder)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  first = hf_answer(model, tokenizer, [{"role": "system", "content": SYSTEM},
                                       {"role": "user", "content": TURNS[0]}], eos=[])
  stop = next(t for n, t in enumerate(first) if n >= 5 and t not in first[:n])
  config = json.loads((folder / "generation_config.json").read_text())
  (folder / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [2, stop]}))
  eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), 2, stop]
  messages, answers = [{"role": "system", "content": SYSTEM}], []
  for turn in TURNS:
    messages.append({"role": "user", "content": turn})
    answers.append(hf_answer(model, tokenizer, messages, eos=eos))
    messages.append({"role": "assistant",
                     "content": tokenizer.decode(answers[-1], skip_special_tokens=True)})
  assert answers[0] == first[:first.index(stop)]  # stopped at the eos id
  return folder, tokenizer, answers


def hf_answer(model, tokenizer, messages, *, eos) -> list[int]:
  """transformers' greedy answer to `messages`, its stop token left out."""
  inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                         tokenize=True, return_dict=True, return_tensors="pt")
  assert inputs["input_ids"].shape[1] > 8  # longer than the window
  with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=eos or None, pad_token_id=0)
  new = out[0, inputs["input_ids"].shape[1]:].tolist()
  return new[:-1] if new and new[-1] in eos else new


def test_two_turns_equal_transformers_token_for_token(chat_pair):
  folder, tokenizer, answers = chat_pair
  source = resolve_model(folder)
  model, ours = source.load_with_tokenizer(attn_impl="xla")
  session = ChatSession(model, ours, system=SYSTEM, stop_ids=source.eos_ids(),
                        max_new_tokens=NEW_TOKENS)
  for turn, expected in zip(TURNS, answers):
    assert session.reply(turn, io.StringIO()) == expected
  assert len(answers[0]) < NEW_TOKENS  # the first stopped at the eos id
  assert session.prompt_ids() == tokenizer.apply_chat_template(
      session.messages, add_generation_prompt=True, tokenize=True, return_dict=True
  )["input_ids"]


def test_the_command_reads_a_turn_per_line(chat_pair):
  folder, tokenizer, answers = chat_pair
  text = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
  proc = swajax("chat", folder, "--system", SYSTEM, "--max-new-tokens", NEW_TOKENS,
                stdin=subprocess.PIPE)
  script = "\n".join([TURNS[0], TURNS[1], "/reset", TURNS[0], "/exit", TURNS[1]]) + "\n"
  out, err = proc.communicate(script, timeout=300)
  assert proc.returncode == 0, err
  expected = "".join(t + "\n" for t in [text[0], text[1], text[0]])
  # The pipe is read in text mode: universal newlines, as Python reads it.
  assert out == expected.replace("\r\n", "\n").replace("\r", "\n")


def test_a_multi_token_end_of_turn_is_a_stop_text():
  out = io.StringIO()
  stream = TextStream(ByteTokenizer(), out=out, stop="<|im_end|>")
  for n, byte in enumerate("Paris.<|im_".encode()):
    stream.add(int(byte))
    assert out.getvalue() == "Paris."[:n + 1]  # "<" onwards held back
  for byte in "end|>tail".encode():
    stream.add(int(byte))
  stream.flush(final=True)
  assert stream.stopped and out.getvalue() == stream.text == "Paris."
  stream = TextStream(ByteTokenizer(), out=io.StringIO(), stop="<|im_end|>")
  for byte in "a <|im".encode():
    stream.add(int(byte))
  stream.flush(final=True)  # never completed: printed at the end
  assert not stream.stopped and stream.text == "a <|im"


def test_chat_bad_input_is_one_line(chat_pair, tmp_path, capsys):
  folder, _, _ = chat_pair
  one_line_error(capsys, ["chat", folder, "--top-p", "0.9"],
                 "--top-p 0.9: has no effect with --temperature 0")
  one_line_error(capsys, ["chat", tmp_path / "nowhere"], "expected a Hugging Face folder")
  chat_model_folder(tmp_path / "bare", tokenizer=False)
  capsys.readouterr()  # transformers' save progress
  one_line_error(capsys, ["chat", tmp_path / "bare"], "no tokenizer.json")

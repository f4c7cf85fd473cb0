"""Chat and instruction data: conversations rendered with the tokenizer's own
chat template, trained on the assistant tokens only.

Record formats (one JSON object per JSONL line), all turned into a list of
{"role", "content"} messages (`messages_of`):
  chat      {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}
  ShareGPT  {"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]}
            ("user" / "assistant" are accepted for "from" too)
  Alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
            -> system, the history's turns, user = instruction + "\\n" + input
            (input when non-empty), assistant = output.
Every conversation needs a non-empty assistant turn last; every assistant
turn is trained (multi-turn), nothing else is.

Rendering: the template (Jinja, `chat_template` of tokenizer_config.json or a
sibling chat_template.jinja; `DEFAULT_TEMPLATE`, ChatML, for a tokenizer
without one, e.g. the byte tokenizer) is rendered with jinja2's sandbox as
transformers does (trim_blocks, lstrip_blocks, `raise_exception`, `tojson`,
bos_token / eos_token). Where the template marks assistant text with
`{% generation %} ... {% endgeneration %}`, those character spans are the
trained text; otherwise each assistant turn's span is what rendering it adds
to the conversation before it rendered with add_generation_prompt=True,
end-of-turn separators included, as LLaMA-Factory trains them (this needs a
template whose renderings extend each other: checked). The
rendered text is tokenized once; a token is trained when it lies in a span
from the token holding the span's first character to the one holding its
last (transformers' `return_assistant_tokens_mask` rule).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user",
                  "gpt": "assistant", "assistant": "assistant"}
TEMPLATE_FILE = "chat_template.jinja"
# ChatML (as Qwen's), with the assistant text and its end marker trained.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# The built-in templates a user may name instead of a file (`load_template`).
TEMPLATES = {"chatml": DEFAULT_TEMPLATE}
# Private-use characters bracketing generation blocks while rendering.
_OPEN, _CLOSE = "\U000f0000", "\U000f0001"
_PROBE = "\U000f0002"  # the assistant content `end_of_turn` looks after


class ChatDataError(ValueError):
  """A malformed chat record (`data.DataError` adds the file and line)."""


def messages_of(record: dict) -> list[dict] | None:
  """The record's messages [{"role", "content"}], None when it is not a chat,
  ShareGPT or Alpaca record; ChatDataError for a malformed one."""
  if "messages" in record:
    turns = record["messages"]
    if not isinstance(turns, list):
      raise ChatDataError("'messages': expected a list of {'role', 'content'}")
    messages = [_message(turn, "role", "content", {r: r for r in ROLES}, n)
                for n, turn in enumerate(turns)]
  elif "conversations" in record:
    turns = record["conversations"]
    if not isinstance(turns, list):
      raise ChatDataError("'conversations': expected a list of {'from', 'value'}")
    messages = [_message(turn, "from", "value", SHAREGPT_ROLES, n)
                for n, turn in enumerate(turns)]
  elif "instruction" in record or "output" in record:
    messages = _alpaca(record)
  else:
    return None
  _check_conversation(messages)
  return messages


def _message(turn, role_key: str, content_key: str, roles: dict, n: int) -> dict:
  if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str):
    raise ChatDataError(f"turn {n}: expected an object with {role_key!r} and a "
                        f"{content_key!r} string, got {turn!r:.80}")
  role = turn.get(role_key)
  if role not in roles:
    raise ChatDataError(f"turn {n}: {role_key}={role!r}: expected one of {sorted(roles)}")
  return {"role": roles[role], "content": turn[content_key]}


def _alpaca(record: dict) -> list[dict]:
  for key in ("instruction", "output"):
    if not isinstance(record.get(key), str):
      raise ChatDataError(f"Alpaca record: {key!r} missing or not a string")
  for key in ("input", "system"):
    if not isinstance(record.get(key, ""), str):
      raise ChatDataError(f"Alpaca record: {key}={record[key]!r:.80}: expected a string")
  messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
  history = record.get("history") or []
  if not isinstance(history, list) or not all(
      isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
      for pair in history):
    raise ChatDataError("Alpaca record: 'history': expected a list of [query, answer] strings")
  for query, answer in history:
    messages += [{"role": "user", "content": query},
                 {"role": "assistant", "content": answer}]
  prompt = record["instruction"]
  if record.get("input"):
    prompt += "\n" + record["input"]
  return messages + [{"role": "user", "content": prompt},
                     {"role": "assistant", "content": record["output"]}]


def _check_conversation(messages: list[dict]) -> None:
  if not messages or messages[-1]["role"] != "assistant":
    raise ChatDataError("expected the conversation to end with an assistant turn")
  for n, message in enumerate(messages):
    if message["role"] == "assistant" and not message["content"].strip():
      raise ChatDataError(f"turn {n}: empty assistant turn")
    if message["role"] == "system" and n:
      raise ChatDataError(f"turn {n}: a system message is only allowed first")


class _Generation(Extension):
  """`{% generation %}...{% endgeneration %}`: the body, bracketed by markers."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

  def _mark(self, caller):
    return _OPEN + caller() + _CLOSE


def _raise(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                    separators=separators, sort_keys=sort_keys)


def read_template(tokenizer_file: Path) -> str | None:
  """The chat template beside a tokenizer.json: chat_template.jinja, else
  tokenizer_config.json's "chat_template" (a string, or the "default" entry
  of a list of {"name", "template"}); None without one."""
  folder = Path(tokenizer_file).parent
  if (folder / TEMPLATE_FILE).is_file():
    return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
  config_file = folder / "tokenizer_config.json"
  if not config_file.is_file():
    return None
  template = json.loads(config_file.read_text()).get("chat_template")
  if isinstance(template, list):
    template = {t.get("name"): t.get("template") for t in template}.get("default")
  return template if isinstance(template, str) else None


def load_template(choice: str) -> str:
  """The chat template a user names: a built-in name (`TEMPLATES`) or a Jinja
  file (its text). ChatDataError for anything else."""
  if choice in TEMPLATES:
    return TEMPLATES[choice]
  path = Path(choice)
  if not path.is_file():
    raise ChatDataError(f"chat_template={choice!r}: expected a Jinja file or one of "
                        f"{', '.join(TEMPLATES)}")
  try:
    return path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise ChatDataError(f"chat_template={choice!r}: cannot read ({e})") from e


class ChatEncoder:
  """Renders conversations with a tokenizer's chat template and tokenizes them.

  tokenizer: `data.ByteTokenizer` or `data.HFTokenizer` (its `chat_template`,
  bos/eos token strings and `encode_with_offsets`).
  """

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    source = getattr(tokenizer, "chat_template", None) or DEFAULT_TEMPLATE
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    try:
      self.template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise ChatDataError(f"chat template: not valid Jinja ({e})") from e
    self.marked = "generation" in source and "endgeneration" in source
    self.specials = {"bos_token": getattr(tokenizer, "bos_token", None) or "",
                     "eos_token": getattr(tokenizer, "eos_token", None) or ""}

  def _render(self, messages, add_generation_prompt: bool) -> str:
    try:
      return self.template.render(messages=messages,
                                  add_generation_prompt=add_generation_prompt,
                                  **self.specials)
    except jinja2.TemplateError as e:
      raise ChatDataError(f"chat template: {e}") from e

  def prompt(self, messages: list[dict]) -> str:
    """The text a model continues to answer `messages`: the conversation
    rendered with add_generation_prompt=True, as transformers'
    `apply_chat_template(messages, add_generation_prompt=True)` renders it."""
    return _strip_marks(self._render(messages, True))[0]

  def end_of_turn(self) -> str:
    """The text the template writes right after an assistant message's
    content (its end-of-turn marker, e.g. "<|im_end|>"), whitespace
    stripped; "" for a template that writes none (or that cannot render a
    one-exchange conversation)."""
    probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _PROBE}]
    try:
      text = _strip_marks(self._render(probe, False))[0]
    except ChatDataError:
      return ""
    at = text.rfind(_PROBE)
    return "" if at < 0 else text[at + len(_PROBE):].strip()

  def render(self, messages: list[dict], train_from: int = 0
             ) -> tuple[str, list[tuple[int, int]]]:
    """(text, [(start, end) character spans of the trained text]): the
    assistant turns from message `train_from` on (a preference pair trains
    only its answer, not the assistant turns of its prompt)."""
    assistant = [n for n, m in enumerate(messages) if m["role"] == "assistant"]
    if self.marked:
      text, spans = _strip_marks(self._render(messages, False))
      if train_from:
        if len(spans) != len(assistant):
          raise ChatDataError(
              f"chat template: {len(spans)} {{% generation %}} blocks for "
              f"{len(assistant)} assistant turns; cannot tell the answer's")
        spans = [span for span, n in zip(spans, assistant) if n >= train_from]
      return text, spans
    text = _strip_marks(self._render(messages, False))[0]
    spans = []
    for n in assistant:
      if n < train_from:
        continue
      before = _strip_marks(self._render(messages[:n], True))[0]
      through = _strip_marks(self._render(messages[:n + 1], False))[0]
      if not (through.startswith(before) and text.startswith(through)):
        raise ChatDataError(
            "chat template: renderings of a conversation's prefixes do not extend "
            "each other; mark the assistant text with {% generation %}")
      spans.append((len(before), len(through)))
    return text, spans

  def encode(self, messages: list[dict], train_from: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [L], trained bool [L]) of a conversation; the trained
    tokens are those of the assistant turns from message `train_from` on."""
    text, spans = self.render(messages, train_from)
    ids, offsets = self.tokenizer.encode_with_offsets(text)
    ids = np.asarray(ids, np.int32)
    trained = np.zeros(len(ids), bool)
    starts, ends = offsets[:, 0], offsets[:, 1]
    for start, end in spans:
      if end <= start:
        continue
      first = _token_at(starts, ends, start)
      last = _token_at(starts, ends, end - 1)
      if first is None or last is None:
        continue  # a span of characters no token covers
      trained[first:last + 1] = True
    return ids, trained


def _token_at(starts: np.ndarray, ends: np.ndarray, char: int) -> int | None:
  """The index of the token whose character span holds `char`."""
  hit = np.nonzero((starts <= char) & (char < ends))[0]
  return int(hit[0]) if len(hit) else None


def _strip_marks(marked: str) -> tuple[str, list[tuple[int, int]]]:
  """(text without the generation markers, the marked spans in that text)."""
  pieces, spans, length, start = [], [], 0, 0
  for piece in re.split(f"({_OPEN}|{_CLOSE})", marked):
    if piece == _OPEN:
      start = length
    elif piece == _CLOSE:
      spans.append((start, length))
    else:
      pieces.append(piece)
      length += len(piece)
  return "".join(pieces), spans

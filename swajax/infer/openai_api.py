"""The OpenAI API's request and response shapes, as the server speaks them.

Requests are pydantic models (FastAPI validates them; a field outside the
schema, or an option this server cannot honour — n > 1, penalties, logit
bias, best_of, suffix — is a 400, never silently ignored). Defaults follow
OpenAI's: temperature 1, top_p 1, completions max_tokens 16, chat max_tokens
up to the server's max_len. Responses are plain dicts in OpenAI's schema
(`completion`, `chat_completion`, their stream chunks, `error_body`).
Tokens appear as text: each token decoded alone (`token_text`).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from swajax.infer.engine import TOP_LOGPROBS, Scored


class _Request(BaseModel):
  """What both endpoints take."""

  model_config = ConfigDict(extra="forbid")

  model: str
  max_tokens: int | None = Field(None, ge=0)
  temperature: float = Field(1.0, ge=0, le=2)
  top_p: float = Field(1.0, gt=0, le=1)
  seed: int | None = Field(None, ge=0, lt=2**31)
  stop: str | list[str] | None = Field(None, validate_default=True)
  stream: bool = False
  stream_options: dict | None = None
  user: str | None = None
  # Accepted only at the value that changes nothing.
  n: Literal[1] = 1
  presence_penalty: Literal[0] = 0
  frequency_penalty: Literal[0] = 0
  logit_bias: dict[str, float] | None = None

  @field_validator("stop")
  @classmethod
  def _stops(cls, stop):
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > 4 or not all(stops):
      raise ValueError("expected up to 4 non-empty strings")
    return stops

  @field_validator("logit_bias")
  @classmethod
  def _no_bias(cls, bias):
    if bias:
      raise ValueError("logit_bias is not supported by this server")
    return None

  @property
  def include_usage(self) -> bool:
    return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
  """POST /v1/completions. prompt: a string, token ids, or a list of either
  (one choice each); echo: the prompt is returned before the continuation
  (with logprobs: its tokens scored too, the first with null)."""

  prompt: Union[str, list[int], list[str], list[list[int]]]
  max_tokens: int | None = Field(16, ge=0)
  echo: bool = False
  logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
  best_of: Literal[1] | None = None
  suffix: None = None

  @field_validator("prompt")
  @classmethod
  def _prompts(cls, prompt):
    if isinstance(prompt, list) and (not prompt or (
        isinstance(prompt[0], list) and not all(prompt))):
      raise ValueError("expected a non-empty prompt")
    return prompt

  def prompts(self) -> list:
    """Each prompt, a string or a list of ids."""
    if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
      return [self.prompt]
    return list(self.prompt)


class ContentPart(BaseModel):
  type: Literal["text"]
  text: str


class Message(BaseModel):
  model_config = ConfigDict(extra="allow")  # name, tool_calls: the template's

  role: str
  content: str | list[ContentPart] | None = None

  def as_dict(self) -> dict:
    """{"role", "content": str, ...} as a chat template reads it."""
    content = self.content
    if isinstance(content, list):
      content = "".join(part.text for part in content)
    return {**self.model_dump(exclude_none=True), "content": content or ""}


class ChatRequest(_Request):
  """POST /v1/chat/completions: messages rendered with the model's chat
  template; logprobs / top_logprobs: the generated tokens scored."""

  messages: list[Message] = Field(min_length=1)
  max_completion_tokens: int | None = Field(None, ge=0)
  logprobs: bool = False
  top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)

  @property
  def token_limit(self) -> int | None:
    return (self.max_completion_tokens if self.max_completion_tokens is not None
            else self.max_tokens)


def error_body(message: str, kind: str = "invalid_request_error",
               param: str | None = None, code: str | None = None) -> dict:
  """OpenAI's error object."""
  return {"error": {"message": message, "type": kind, "param": param,
                    "code": code}}


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def _envelope(kind: str, ident: str, model: str, choices: list) -> dict:
  return {"id": ident, "object": kind, "created": int(time.time()),
          "model": model, "choices": choices}


def completion(ident, model, choices, usage_counts) -> dict:
  return {**_envelope("text_completion", ident, model, choices),
          "usage": usage_counts}


def completion_chunk(ident, model, index, text, logprobs=None,
                     finish_reason=None) -> dict:
  return _envelope("text_completion", ident, model, [
      {"index": index, "text": text, "logprobs": logprobs,
       "finish_reason": finish_reason}])


def chat_completion(ident, model, text, logprobs, finish_reason,
                    usage_counts) -> dict:
  choice = {"index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": logprobs, "finish_reason": finish_reason}
  return {**_envelope("chat.completion", ident, model, [choice]),
          "usage": usage_counts}


def chat_chunk(ident, model, delta, logprobs=None, finish_reason=None) -> dict:
  return _envelope("chat.completion.chunk", ident, model, [
      {"index": 0, "delta": delta, "logprobs": logprobs,
       "finish_reason": finish_reason}])


def usage_chunk(kind: str, ident, model, usage_counts) -> dict:
  """The last chunk of a stream with stream_options.include_usage."""
  return {**_envelope(kind, ident, model, []), "usage": usage_counts}


def token_text(tokenizer, token: int) -> str:
  return tokenizer.decode([token])


def completion_logprobs(tokenizer, ids: list[int], scored: list[Scored | None],
                        top: int) -> dict:
  """Completions' logprobs object of tokens `ids` scored by `scored` (None:
  no score, the echoed prompt's first token): tokens, token_logprobs, the
  `top` most probable per token as {text: logprob}, text_offset."""
  tokens, offsets, offset = [], [], 0
  for token in ids:
    offsets.append(offset)
    tokens.append(token_text(tokenizer, token))
    offset += len(tokens[-1])
  return {"tokens": tokens,
          "token_logprobs": [s.logprob if s else None for s in scored],
          "top_logprobs": [
              {token_text(tokenizer, t): lp for t, lp in s.top[:top]} if s else None
              for s in scored],
          "text_offset": offsets}


def chat_logprobs(tokenizer, scored: list[Scored], top: int) -> dict:
  """Chat's logprobs object: {"content": [{token, logprob, bytes,
  top_logprobs: [{token, logprob, bytes}]}]}."""
  def entry(token, logprob):
    text = token_text(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

  return {"content": [
      {**entry(s.token, s.logprob),
       "top_logprobs": [entry(t, lp) for t, lp in s.top[:top]]}
      for s in scored]}

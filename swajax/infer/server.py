"""The OpenAI-compatible HTTP server over an `Engine`: `create_app`.

Endpoints: GET /health (the engine's load), GET /v1/models, POST
/v1/completions, POST /v1/chat/completions (the model's chat template,
`text.chat.ChatEncoder.prompt`). A FastAPI app: request bodies are the
pydantic models of `openai_api`; every error is OpenAI's error object —
invalid JSON or fields 400, an unknown model or route 404, more waiting
requests than the engine's bound 503 with Retry-After, an engine failure
500. Streams are server-sent events of OpenAI's chunks ending with `data:
[DONE]`; a client that goes away mid-stream cancels its request (the
stream's generator is cancelled by Starlette, and cancels the engine job, so
the slot frees at once). Each request (each prompt of a completions list) is
one engine request; the engine batches them.

Text: generated ids are decoded together; a stop string ends the request at
its first occurrence (the text before it is returned, finish_reason "stop"),
and a stream holds back the text that could still become a stop string, or
a character not yet complete. A string prompt gets the special tokens the
tokenizer's own settings add (`HFTokenizer.encode`); a chat's come from its
template.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from swajax.infer import openai_api as api
from swajax.infer.engine import (EngineRequest, Finished, NewToken, Overloaded,
                                 PromptScores)
from swajax.text.chat import ChatDataError, ChatEncoder

RETRY_AFTER_S = 1  # the hint a 503 gives


class ApiError(Exception):
  """An error answer: HTTP status and OpenAI's error object."""

  def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
               param: str | None = None, code: str | None = None, headers=None):
    super().__init__(message)
    self.status, self.headers = status, headers
    self.body = api.error_body(message, kind, param, code)


class _Text:
  """Generated ids -> text, cut before the first stop string.

  `add(token)` returns the text now safe to send: not a trailing partial
  character (U+FFFD), nor a tail that may begin a stop string; `rest()` the
  text held back, once the request has ended.
  """

  def __init__(self, tokenizer, stops: list[str]):
    self.tokenizer, self.stops = tokenizer, stops
    self.ids: list[int] = []
    self.text, self.sent, self.stopped = "", 0, False

  def add(self, token: int) -> str:
    self.ids.append(token)
    text = self.tokenizer.decode(self.ids)
    hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
    if hits:
      self.stopped, text = True, text[:min(hits)]
      stable = len(text)
    else:
      stable = len(text.rstrip("\ufffd"))
      stable -= max((n for s in self.stops for n in range(len(s) - 1, 0, -1)
                     if text[:stable].endswith(s[:n])), default=0)
    self.text = text
    piece = text[self.sent:stable]
    self.sent = max(self.sent, stable)
    return piece

  def rest(self) -> str:
    piece = self.text[self.sent:]
    self.sent = len(self.text)
    return piece


def _submit(engine, requests: list[EngineRequest]) -> list:
  """Submits every request, or none: [(job, its event queue)], or the
  ApiError of the first the engine refuses (the others cancelled)."""
  loop = asyncio.get_running_loop()
  submitted = []
  try:
    for request in requests:
      queue: asyncio.Queue = asyncio.Queue()
      job = engine.submit(request, lambda e, queue=queue: loop.call_soon_threadsafe(
          queue.put_nowait, e))
      submitted.append((job, queue))
  except (Overloaded, ValueError, RuntimeError) as e:
    for job, _ in submitted:
      engine.cancel(job)
    if isinstance(e, Overloaded):
      raise ApiError(503, f"server busy: {e}; retry later", "server_error",
                     code="overloaded",
                     headers={"Retry-After": str(RETRY_AFTER_S)}) from e
    if isinstance(e, ValueError):
      raise ApiError(400, str(e)) from e
    raise ApiError(503, f"{e}: the server is shutting down", "server_error",
                   headers={"Retry-After": str(RETRY_AFTER_S)}) from e
  return submitted


async def _events(engine, job, queue: asyncio.Queue, text: _Text) -> AsyncIterator:
  """A submitted job's events, as ("prompt", scores), ("token", Scored, new
  text) and, last, ("end", finish reason, held-back text). Leaving early (a
  stop string, a cancelled task) cancels the engine job."""
  try:
    while True:
      event = await queue.get()
      if isinstance(event, PromptScores):
        yield "prompt", event.scores
      elif isinstance(event, NewToken):
        piece = text.add(event.scored.token)
        yield "token", event.scored, piece
        if text.stopped:
          yield "end", "stop", ""
          return
      elif isinstance(event, Finished):
        if event.reason == "error":
          raise ApiError(500, f"generation failed: {event.message}", "server_error")
        if event.reason == "cancelled":
          raise ApiError(503, "the server is shutting down", "server_error")
        yield "end", event.reason, text.rest()
        return
  finally:
    engine.cancel(job)


def _sse(obj) -> str:
  return f"data: {json.dumps(obj)}\n\n"


def create_app(engine, tokenizer, model_name: str,
               stop_ids: Sequence[int] = ()) -> FastAPI:
  """The FastAPI app serving `engine` (started and stopped by the caller)
  under the model id `model_name`; `tokenizer` encodes prompts and decodes
  tokens (its chat template renders chats). A request ends at the
  tokenizer's eos or any of `stop_ids` (a model's generation_config.json eos
  ids, as transformers' `generate` stops at them)."""
  app = FastAPI(title="swajax", docs_url=None, redoc_url=None)
  chat = ChatEncoder(tokenizer)
  eos = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
  stop_ids = tuple(sorted({*map(int, eos), *map(int, stop_ids)}))
  created = int(time.time())

  @app.exception_handler(ApiError)
  async def _api_error(_, e: ApiError):
    return JSONResponse(e.body, e.status, headers=e.headers)

  @app.exception_handler(RequestValidationError)
  async def _invalid(_, e: RequestValidationError):
    error = e.errors()[0]
    where = ".".join(str(x) for x in error["loc"][1:]) or "body"
    return JSONResponse(api.error_body(f"{where}: {error['msg']}", param=where), 400)

  @app.exception_handler(HTTPException)
  async def _http(_, e: HTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return JSONResponse(api.error_body(str(e.detail), kind), e.status_code)

  def check_model(name: str) -> None:
    if name != model_name:
      raise ApiError(404, f"model {name!r} does not exist; this server serves "
                     f"{model_name!r}", param="model", code="model_not_found")

  def engine_request(ids, body, max_tokens, prompt_logprobs=False):
    return EngineRequest(tuple(ids), max_tokens, temperature=body.temperature,
                         top_p=body.top_p, seed=body.seed,
                         prompt_logprobs=prompt_logprobs, stop_ids=stop_ids)

  def token_ids(text: str) -> list[int]:
    """Python ints (a byte tokenizer encodes to numpy int32)."""
    return [int(i) for i in tokenizer.encode(text)]

  def encode(prompt) -> list[int]:
    if not isinstance(prompt, str):
      return list(prompt)
    return [int(i) for i in tokenizer.encode(prompt, add_special_tokens=True)]

  @app.get("/health")
  async def health():
    return {"status": "ok", **engine.load()}

  @app.get("/v1/models")
  async def list_models():
    return {"object": "list", "data": [{"id": model_name, "object": "model",
                                        "created": created, "owned_by": "swajax"}]}

  @app.post("/v1/completions")
  async def completions(body: api.CompletionRequest):
    check_model(body.model)
    prompts = [encode(p) for p in body.prompts()]
    if body.stream and (len(prompts) > 1 or body.echo):
      raise ApiError(400, "stream: one prompt without echo at a time", param="stream")
    top = body.logprobs
    requests = [engine_request(ids, body, body.max_tokens,
                               prompt_logprobs=body.echo and top is not None)
                for ids in prompts]
    ident = api.new_id("cmpl")
    submitted = _submit(engine, requests)
    if body.stream:
      return _stream(_completion_chunks(ident, submitted[0], body, top))

    async def one(index, ids, job, queue):
      text, scored, prompt_scores = _Text(tokenizer, body.stop), [], ()
      async for event in _events(engine, job, queue, text):
        if event[0] == "prompt":
          prompt_scores = event[1]
        elif event[0] == "token":
          scored.append(event[1])
        else:
          reason = event[1]
      prefix = tokenizer.decode(ids) if body.echo else ""
      logprobs = None
      if top is not None:
        kept = scored[:len(text.ids)]
        logprobs = api.completion_logprobs(
            tokenizer, [*(ids if prompt_scores else ()), *text.ids],
            [*prompt_scores, *kept], top)
      choice = {"index": index, "text": prefix + text.text, "logprobs": logprobs,
                "finish_reason": reason}
      return choice, len(ids), len(text.ids)

    try:
      async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(i, ids, *job))
                 for i, (ids, job) in enumerate(zip(prompts, submitted))]
    except* ApiError as errors:
      raise errors.exceptions[0] from None
    finally:  # also those a failed sibling's cancellation left unstarted
      for job, _ in submitted:
        engine.cancel(job)
    results = [task.result() for task in tasks]
    return api.completion(ident, model_name, [r[0] for r in results], api.usage(
        sum(r[1] for r in results), sum(r[2] for r in results)))

  async def _completion_chunks(ident, submitted, body, top):
    (job, queue), text = submitted, _Text(tokenizer, body.stop)
    async for event in _events(engine, job, queue, text):
      if event[0] == "token":
        logprobs = (api.completion_logprobs(tokenizer, [event[1].token],
                                            [event[1]], top)
                    if top is not None else None)
        if event[2] or logprobs:
          yield api.completion_chunk(ident, model_name, 0, event[2], logprobs)
      elif event[0] == "end":
        yield api.completion_chunk(ident, model_name, 0, event[2],
                                   finish_reason=event[1])
    if body.include_usage:
      yield api.usage_chunk("text_completion", ident, model_name,
                            api.usage(len(job.request.prompt), len(text.ids)))

  @app.post("/v1/chat/completions")
  async def chat_completions(body: api.ChatRequest):
    check_model(body.model)
    try:
      ids = token_ids(chat.prompt([m.as_dict() for m in body.messages]))
    except ChatDataError as e:
      raise ApiError(400, str(e), param="messages") from e
    limit = body.token_limit
    request = engine_request(
        ids, body, max(engine.max_len - len(ids), 0) if limit is None else limit)
    top = (body.top_logprobs or 0) if body.logprobs else None
    ident = api.new_id("chatcmpl")
    (job, queue), = _submit(engine, [request])
    if body.stream:
      return _stream(_chat_chunks(ident, job, queue, body, top))
    text, scored = _Text(tokenizer, body.stop), []
    async for event in _events(engine, job, queue, text):
      if event[0] == "token":
        scored.append(event[1])
      elif event[0] == "end":
        reason = event[1]
    logprobs = (api.chat_logprobs(tokenizer, scored[:len(text.ids)], top)
                if top is not None else None)
    return api.chat_completion(ident, model_name, text.text, logprobs, reason,
                               api.usage(len(ids), len(text.ids)))

  async def _chat_chunks(ident, job, queue, body, top):
    text = _Text(tokenizer, body.stop)
    yield api.chat_chunk(ident, model_name, {"role": "assistant", "content": ""})
    async for event in _events(engine, job, queue, text):
      if event[0] == "token":
        logprobs = (api.chat_logprobs(tokenizer, [event[1]], top)
                    if top is not None else None)
        if event[2] or logprobs:
          yield api.chat_chunk(ident, model_name, {"content": event[2]}, logprobs)
      elif event[0] == "end":
        if event[2]:
          yield api.chat_chunk(ident, model_name, {"content": event[2]})
        yield api.chat_chunk(ident, model_name, {}, finish_reason=event[1])
    if body.include_usage:
      yield api.usage_chunk("chat.completion.chunk", ident, model_name,
                            api.usage(len(job.request.prompt), len(text.ids)))

  return app


def _stream(chunks: AsyncIterator[dict]) -> StreamingResponse:
  """Server-sent events of `chunks`, then `data: [DONE]`; an error after the
  stream has begun is sent as an event with OpenAI's error object."""

  async def body():
    try:
      async for chunk in chunks:
        yield _sse(chunk)
    except ApiError as e:
      yield _sse(e.body)
    yield "data: [DONE]\n\n"

  return StreamingResponse(body(), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache"})

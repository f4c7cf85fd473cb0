"""Continuous batching over one batched rolling KV cache: `Engine`.

The engine owns `max_batch` slots, each a row of one `KVCache`
(`model.init_cache(max_batch, max_len)`: a sliding layer holds min(W, max_len)
slots per row, a ring; a full layer max_len). A request gets a free slot,
its prompt is prefilled into that row chunk by chunk (`prefill_chunk` tokens
per chunk, positions from 0, the row's previous contents cleared by marking
every position -1), then it joins the decode step that advances every
decoding slot by one token. Each loop iteration runs at most one prefill
chunk and one decode step, so a long prompt never stalls the others. A
finished or cancelled request frees its slot before the next iteration.

Independence: a row's prefill runs on that row alone, and in the decode step
every row attends only to its own cache row at its own positions and samples
with its own key (fold_in(key(seed), s) for its s-th new token, as
`generate` does), so a request's tokens do not depend on what else is
running; the compiled programs have one shape whatever the load.

The model work is the jitted steps below, all calling
`generation.forward_chunk` (the call `generate` makes); the loop runs in one
background thread and reports to each request through its `emit` callback,
called from that thread.

Dimension letters: B slots (max_batch), T chunk, V vocab, K top logprobs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import random
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.kv_cache import KVCache
from pallas_kernels.validation import check_positive_int
from swajax.infer.generation import forward_chunk
from swajax.infer.sampling import sample_rows

TOP_LOGPROBS = 20  # alternatives scored per token (OpenAI's most)
SEED_LIMIT = 2**31  # seeds are ints in [0, SEED_LIMIT)
_log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
  """More requests wait for a slot than the engine's bound (`max_waiting`)."""


@dataclasses.dataclass(frozen=True)
class EngineRequest:
  """One sequence to continue.

  prompt: token ids (at least one); max_tokens: new tokens at most (0: score
  the prompt only); temperature (0 = greedy), top_p in (0, 1]; seed: the
  sampling key, key(seed); prompt_logprobs: also score every prompt token
  (`PromptScores`); stop_ids: a token that ends the request (eos).
  """

  prompt: tuple[int, ...]
  max_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int | None = None
  prompt_logprobs: bool = False
  stop_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Scored:
  """A token with its log-probability and the TOP_LOGPROBS most probable
  tokens at its position, as (id, logprob), most probable first."""

  token: int
  logprob: float
  top: tuple[tuple[int, float], ...]


@dataclasses.dataclass(frozen=True)
class PromptScores:
  """Event: the prompt's tokens scored; None for the first (no context)."""

  scores: tuple[Scored | None, ...]


@dataclasses.dataclass(frozen=True)
class NewToken:
  """Event: the next generated token."""

  scored: Scored


@dataclasses.dataclass(frozen=True)
class Finished:
  """Event, the last: "stop" (a stop id), "length" (max_tokens), "cancelled"
  or "error" (with `message`)."""

  reason: str
  message: str = ""


@dataclasses.dataclass(eq=False)
class Job:
  """A submitted request: the handle `cancel` takes."""

  request: EngineRequest
  emit: Callable[[object], None]
  seed: int
  order: int  # arrival: prefills go oldest first
  cancelled: bool = False
  slot: int | None = None
  prefilled: int = 0  # prompt tokens in the cache
  generated: int = 0
  scores: list = dataclasses.field(default_factory=list)


def _choose(logits, seeds, steps, temperature, top_p):
  """Next tokens of rows logits [B, V]: (token int32 [B], its logprob [B],
  top logprobs [B, K], their ids [B, K]); row b samples with
  fold_in(key(seeds[b]), steps[b])."""
  keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(
      seeds, steps)
  token = sample_rows(logits, keys, temperature, top_p)
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  chosen = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
  top, top_ids = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logits.shape[-1]))
  return token, chosen, top, top_ids


@functools.partial(jax.jit, static_argnames=("graphdef",),
                   donate_argnames=("cache",))
def _prefill_slot(graphdef, state, cache: KVCache, slot, fresh, ids, positions,
                  targets, last, seed, temperature, top_p):
  """One prompt chunk into cache row `slot`, and the token after it.

  ids, positions int32 [T] (-1: padding after the prompt's end), targets
  int32 [T] (the next prompt token at each position, -1 past the prompt),
  last: the chunk's last prompt token; fresh: clear the row first (every
  slot position -1); seed, temperature, top_p: the request's. Returns
  (`_choose`'s four arrays for the token after `last` (B = 1; step 0),
  cache, (targets' logprobs [T], top logprobs [T, K], their ids [T, K])).
  The scores are computed always (one program), fetched only when asked.
  """
  row = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1), cache)
  row = KVCache(tuple(
      dataclasses.replace(layer, positions=jnp.where(fresh, -1, layer.positions))
      for layer in row.layers))
  logits, row = forward_chunk(graphdef, state, row, ids[None], positions[None])
  cache = jax.tree.map(
      lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part, slot, 0),
      cache, row)
  logits = logits[0]  # (T, V)
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  target = jnp.take_along_axis(logprobs, jnp.maximum(targets, 0)[:, None],
                               axis=-1)[:, 0]
  scores = (target, *jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logits.shape[-1])))
  first = _choose(logits[last][None], seed[None], jnp.zeros((1,), jnp.int32),
                  temperature[None], top_p[None])
  return first, cache, scores


@functools.partial(jax.jit, static_argnames=("graphdef",),
                   donate_argnames=("cache",))
def _decode_slots(graphdef, state, cache: KVCache, tokens, positions, seeds,
                  steps, temperature, top_p):
  """One decode step of every slot: tokens [B] fed at positions [B] (-1: an
  idle slot, not written); returns (`_choose`'s four arrays, cache)."""
  logits, cache = forward_chunk(graphdef, state, cache, tokens[:, None],
                                positions[:, None])
  return _choose(logits[:, -1], seeds, steps, temperature, top_p), cache


def _scored(token, logprob, top, top_ids) -> Scored:
  return Scored(int(token), float(logprob),
                tuple(zip(np.asarray(top_ids).tolist(), np.asarray(top).tolist())))


class Engine:
  """Serves `EngineRequest`s from `max_batch` slots of one rolling KV cache.

  model: a `CausalLM`; max_len: the longest request, prompt + max_tokens
  (the positions a full layer's cache holds; a sliding layer holds
  min(W, max_len)); prefill_chunk: prompt tokens per prefill step;
  max_waiting: requests that may wait for a slot (beyond it `submit` raises
  `Overloaded`, never an unbounded queue).
  """

  def __init__(self, model, *, max_batch: int, max_len: int,
               prefill_chunk: int = 128, max_waiting: int = 64):
    for name, value in (("max_batch", max_batch), ("max_len", max_len),
                        ("prefill_chunk", prefill_chunk)):
      check_positive_int(name, value)
    if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or (
        max_waiting < 0):
      raise ValueError(f"max_waiting={max_waiting!r}: expected an int >= 0")
    self.max_batch, self.max_len = max_batch, max_len
    self.prefill_chunk, self.max_waiting = prefill_chunk, max_waiting
    self.vocab_size = model.config.vocab_size
    self._graphdef, self._state = nnx.split(model)
    self._cache = model.init_cache(max_batch, max_len)
    # Per slot, on the host: the next token to feed, its position (-1: the
    # slot is not decoding), the sampling key's seed and step, the options.
    self._tokens = np.zeros(max_batch, np.int32)
    self._positions = np.full(max_batch, -1, np.int32)
    self._seeds = np.zeros(max_batch, np.uint32)
    self._steps = np.zeros(max_batch, np.int32)
    self._temperature = np.zeros(max_batch, np.float32)
    self._top_p = np.ones(max_batch, np.float32)
    self._slots: list[Job | None] = [None] * max_batch
    self._waiting: collections.deque[Job] = collections.deque()
    self._wake = threading.Condition()
    self._stopping = False
    self._arrivals = itertools.count()
    self._counts = {"generated": 0, "cancelled": 0}
    self._thread = threading.Thread(target=self._run, name="swajax-engine",
                                    daemon=True)

  # -- the caller's side (any thread) ---------------------------------------

  def check(self, request: EngineRequest) -> None:
    """Raises ValueError when `request` cannot be served as asked."""
    prompt = request.prompt
    if not prompt:
      raise ValueError("prompt: expected at least one token")
    if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in prompt):
      raise ValueError(f"prompt: expected token ids in [0, {self.vocab_size})")
    if isinstance(request.max_tokens, bool) or not isinstance(
        request.max_tokens, int) or request.max_tokens < 0:
      raise ValueError(f"max_tokens={request.max_tokens!r}: expected an int >= 0")
    if len(prompt) + request.max_tokens > self.max_len:
      raise ValueError(
          f"the prompt ({len(prompt)} tokens) + max_tokens={request.max_tokens} "
          f"is more than this server's max_len={self.max_len} positions")
    if not request.temperature >= 0:
      raise ValueError(f"temperature={request.temperature!r}: expected >= 0")
    if not 0 < request.top_p <= 1:
      raise ValueError(f"top_p={request.top_p!r}: expected a float in (0, 1]")
    if request.seed is not None and not 0 <= request.seed < SEED_LIMIT:
      raise ValueError(f"seed={request.seed!r}: expected an int in [0, {SEED_LIMIT})")

  def submit(self, request: EngineRequest, emit: Callable[[object], None]) -> Job:
    """Queues `request`; `emit` receives its events (`PromptScores` when
    asked, then `NewToken`s, then one `Finished`) from the engine's thread.
    Raises ValueError (`check`), `Overloaded`, or RuntimeError once stopped."""
    self.check(request)
    seed = random.randrange(SEED_LIMIT) if request.seed is None else request.seed
    job = Job(request, emit, seed, next(self._arrivals))
    with self._wake:
      if self._stopping:
        raise RuntimeError("the engine has stopped")
      # Waiting requests take the free slots first (the engine's thread
      # admits them between steps); beyond those, at most max_waiting wait.
      if len(self._waiting) >= self._slots.count(None) + self.max_waiting:
        raise Overloaded(f"{len(self._waiting)} requests are already waiting "
                         f"for one of {self.max_batch} slots")
      self._waiting.append(job)
      self._wake.notify()
    return job

  def cancel(self, job: Job) -> None:
    """Stops `job`; its slot is free before the next step (no more events)."""
    with self._wake:
      job.cancelled = True
      self._wake.notify()

  def load(self) -> dict:
    """{"active": requests in slots, "waiting": queued, "max_batch",
    "max_waiting", "generated": tokens generated so far, "cancelled":
    requests cancelled before their end}."""
    with self._wake:
      return {"active": sum(job is not None for job in self._slots),
              "waiting": len(self._waiting), "max_batch": self.max_batch,
              "max_waiting": self.max_waiting, **self._counts}

  def start(self) -> None:
    """Starts the loop, then serves one short request through every
    program (the compiles happen here, not in a client's first request)."""
    self._thread.start()
    done = threading.Event()
    self.submit(EngineRequest((0,), 2, seed=0),
                lambda event: isinstance(event, Finished) and done.set())
    done.wait()

  def stop(self) -> None:
    """Ends the loop; requests still running or waiting finish "cancelled"."""
    with self._wake:
      self._stopping = True
      self._wake.notify()
    if self._thread.is_alive():
      self._thread.join()

  # -- the loop (the engine's thread) ---------------------------------------

  def _run(self) -> None:
    while True:
      with self._wake:
        self._admit()
        while not self._stopping and not self._waiting and all(
            job is None for job in self._slots):
          self._wake.wait()
          self._admit()
        if self._stopping:
          for job in [*self._waiting, *filter(None, self._slots)]:
            job.emit(Finished("cancelled"))
          return
      try:
        self._prefill_step()
        self._decode_step()
      except Exception as e:  # pylint: disable=broad-except
        _log.exception("engine step failed")
        with self._wake:
          for slot, job in enumerate(self._slots):
            if job is not None:
              self._finish(slot, Finished("error", f"{type(e).__name__}: {e}"))

  def _admit(self) -> None:
    """(Lock held.) Frees cancelled slots, drops cancelled waiters, and moves
    waiting requests into free slots in arrival order."""
    for slot, job in enumerate(self._slots):
      if job is not None and job.cancelled:
        self._counts["cancelled"] += 1
        self._finish(slot, Finished("cancelled"))
    self._counts["cancelled"] += sum(j.cancelled for j in self._waiting)
    self._waiting = collections.deque(j for j in self._waiting if not j.cancelled)
    for slot, job in enumerate(self._slots):
      if job is None and self._waiting:
        job = self._waiting.popleft()
        job.slot = slot
        self._slots[slot] = job

  def _finish(self, slot: int, event: Finished) -> None:
    job = self._slots[slot]
    self._slots[slot] = None
    self._positions[slot] = -1
    job.emit(event)

  def _prefill_step(self) -> None:
    """One prompt chunk of the slot waiting longest for its prefill."""
    jobs = [job for job in self._slots
            if job is not None and job.prefilled < len(job.request.prompt)]
    if not jobs:
      return
    job = min(jobs, key=lambda j: j.order)
    request, slot, chunk = job.request, job.slot, self.prefill_chunk
    prompt = np.asarray(request.prompt, np.int32)
    start, length = job.prefilled, len(prompt)
    stop = min(start + chunk, length)
    ids = np.zeros(chunk, np.int32)
    ids[:stop - start] = prompt[start:stop]
    positions = np.full(chunk, -1, np.int32)
    positions[:stop - start] = np.arange(start, stop)
    targets = np.full(chunk, -1, np.int32)
    targets[:max(0, min(stop, length - 1) - start)] = prompt[start + 1:stop + 1]
    chosen, self._cache, scores = _prefill_slot(
        self._graphdef, self._state, self._cache, np.int32(slot),
        np.bool_(start == 0), ids, positions, targets, np.int32(stop - start - 1),
        np.uint32(job.seed), np.float32(request.temperature),
        np.float32(request.top_p))
    job.prefilled = stop
    if request.prompt_logprobs:
      target, top, top_ids = (np.asarray(x) for x in scores)
      job.scores += [_scored(prompt[start + 1 + t], target[t], top[t], top_ids[t])
                     for t in range(min(stop, length - 1) - start)]
    if stop < length:
      return
    if request.prompt_logprobs:
      job.emit(PromptScores((None, *job.scores)))
    if request.max_tokens == 0:
      with self._wake:
        self._finish(slot, Finished("length"))
      return
    self._seeds[slot], self._steps[slot] = job.seed, 0
    self._temperature[slot], self._top_p[slot] = request.temperature, request.top_p
    self._positions[slot] = length - 1  # advanced by _emit_token
    self._emit_token(slot, *(np.asarray(x)[0] for x in chosen))

  def _decode_step(self) -> None:
    """One token for every decoding slot."""
    decoding = np.nonzero(self._positions >= 0)[0]
    if not len(decoding):
      return
    chosen, self._cache = _decode_slots(
        self._graphdef, self._state, self._cache, self._tokens, self._positions,
        self._seeds, self._steps, self._temperature, self._top_p)
    chosen = [np.asarray(x) for x in chosen]
    for slot in decoding:
      self._emit_token(slot, *(x[slot] for x in chosen))

  def _emit_token(self, slot, token, logprob, top, top_ids) -> None:
    """Hands the slot's new token to its request; finishes it on a stop id or
    at max_tokens, else feeds the token at the next step."""
    job = self._slots[slot]
    job.generated += 1
    self._counts["generated"] += 1
    job.emit(NewToken(_scored(token, logprob, top, top_ids)))
    self._tokens[slot] = token
    self._positions[slot] += 1
    self._steps[slot] += 1
    reason = ("stop" if int(token) in job.request.stop_ids else
              "length" if job.generated >= job.request.max_tokens else None)
    if reason is not None:
      with self._wake:
        self._finish(slot, Finished(reason))

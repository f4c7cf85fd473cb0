"""Autoregressive generation with the rolling KV cache: `generate` and
`generate_stream`.

Prompts are prefilled in chunks of at most `prefill_chunk` tokens (every chunk
of a call has one static shape, so one compile). Then one decode step
(`_step`: the model on the last token, then `_pick`) per new token:
`generate_stream` runs it as a jitted single-token program, syncing with the
host to yield each token; `generate` runs all steps in one jitted
`lax.while_loop` on the device (`decode`), writing into a
[B, max_new_tokens] buffer. Both trace once per (shapes, `SamplingOptions`)
(`TRACE_COUNTS` records the traces, for the tests) and give the same tokens.
The parts, for benchmarks and tests: `check_request` (the checked
arguments), `prefill` (the prompts into the cache, and the first token),
`decode` (the fused loop).

Padding: a batch of prompts of different lengths is LEFT-padded (the usual
choice for decoder-only generation): row b holds its prompt_lengths[b] tokens
at the right end of input_ids[b], so every row's next token is predicted from
the last column. Each row gets its own positions (0 at its first real token;
padding gets -1 and is never written to the cache nor attended to), so each
row generates exactly what it would alone.

Stopping: a row stops at its first `eos_token_id`; every later token of that
row is eos_token_id (the pad value, as transformers pads when pad_token_id is
unset). The loop ends early once every row has stopped.

Dimension letters: B batch, T prompt length, V vocab.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.kv_cache import KVCache, cache_slots, position_limit
from pallas_kernels.validation import check_positive_int
from swajax.infer.sampling import SamplingOptions, check_sampling_args, sample_next_token

# Traces of the jitted prefill chunk, single decode step and decode loop
# ("prefill", "decode", "decode_loop").
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True, eq=False)
class GenerationRequest:
  """`generate`'s arguments, checked (`check_request`)."""

  ids: np.ndarray      # int32 [B, T], prompts left-padded
  lengths: np.ndarray  # int64 [B], each row's prompt length
  max_new_tokens: int
  max_len: int         # positions the cache is sized for
  prefill_chunk: int
  rng: jax.Array       # step s samples with fold_in(rng, s)
  sampling: SamplingOptions


@dataclasses.dataclass(frozen=True, eq=False)
class DecodeState:
  """Where decoding stands after `prefill`: the carry of the decode steps."""

  graphdef: Any       # the model's nnx graphdef (static)
  state: Any          # its nnx.State
  cache: KVCache      # holds every position before `position`
  token: jax.Array    # int32 [B], the last token picked, not yet fed
  position: jax.Array  # int32 [B], the position `token` is fed at
  done: jax.Array     # bool [B], rows that have produced an eos


def forward_chunk(graphdef, state, cache: KVCache, ids, positions):
  """The model (split as graphdef, state) on ids, positions int32 [B, T]
  (-1: padding) through `cache` -> (logits [B, T, V] float32, cache).

  The one model call of every jitted step: a prefill chunk, a decode step
  here, and the serving engine's (`swajax.infer.engine`), traced inside them.
  """
  return nnx.merge(graphdef, state).forward_with_cache(
      ids, positions=positions, cache=cache)


def _pick(logits, done, key, sampling: SamplingOptions):
  """The next token [B] from last-position logits [B, V]; eos once done."""
  token = sample_next_token(logits, key, temperature=sampling.temperature,
                            top_k=sampling.top_k, top_p=sampling.top_p)
  eos = sampling.eos_token_ids
  if eos:
    token = jnp.where(done, eos[0], token)
    done = done | jnp.isin(token, jnp.asarray(eos, jnp.int32))
  return token, done


@functools.partial(jax.jit, static_argnames=("graphdef",),
                   donate_argnames=("cache",))
def _prefill_chunk(graphdef, state, cache: KVCache, ids, positions):
  """One prompt chunk ids, positions [B, T] -> (last logits [B, V], cache)."""
  TRACE_COUNTS["prefill"] += 1
  logits, cache = forward_chunk(graphdef, state, cache, ids, positions)
  return logits[:, -1], cache


_first_token = jax.jit(_pick, static_argnames=("sampling",))


def _step(graphdef, state, cache: KVCache, token, position, done, key, step,
          sampling: SamplingOptions):
  """One decode step: feeds token [B] at position [B], samples the next one
  with fold_in(key, step). Returns (next token [B], cache, position + 1,
  done [B]). Shared by `_decode_step` and the body of `_decode_loop`."""
  logits, cache = forward_chunk(graphdef, state, cache, token[:, None],
                                position[:, None])
  token, done = _pick(logits[:, -1], done, jax.random.fold_in(key, step),
                      sampling)
  return token, cache, position + 1, done


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"),
                   donate_argnames=("cache",))
def _decode_step(graphdef, state, cache: KVCache, token, position, done, key,
                 step, *, sampling: SamplingOptions):
  """`_step` as its own program: the per-token loop of `generate_stream`."""
  TRACE_COUNTS["decode"] += 1
  return _step(graphdef, state, cache, token, position, done, key, step,
               sampling)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens",
                                             "sampling"),
                   donate_argnames=("cache",))
def _decode_loop(graphdef, state, cache: KVCache, token, position, done, key,
                 *, max_new_tokens: int, sampling: SamplingOptions):
  """Every decode step of `generate` in one program (a `lax.while_loop`);
  see `decode`."""
  TRACE_COUNTS["decode_loop"] += 1
  eos = sampling.eos_token_ids
  tokens = jnp.full((token.shape[0], max_new_tokens), eos[0] if eos else 0,
                    jnp.int32).at[:, 0].set(token)

  def running(carry):
    step, *_, done, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, token, cache, position, done, tokens = carry
    token, cache, position, done = _step(graphdef, state, cache, token,
                                         position, done, key, step, sampling)
    return step + 1, token, cache, position, done, tokens.at[:, step].set(token)

  carry = (jnp.int32(1), token, cache, position, done, tokens)
  _, _, cache, _, _, tokens = jax.lax.while_loop(running, body, carry)
  return tokens, cache


def _check_prompts(input_ids, prompt_lengths, vocab_size):
  """(ids int32 [B, T], lengths int [B]) as numpy, or a ValueError/TypeError.

  Prompt tokens must be ids in [0, vocab_size); padding values are free.
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2 or 0 in ids.shape or not np.issubdtype(ids.dtype,
                                                          np.integer):
    raise ValueError(f"input_ids: expected a non-empty int array [batch, "
                     f"prompt_len], got {ids.dtype} {ids.shape}")
  batch, seq = ids.shape
  lengths = np.full((batch,), seq)
  if prompt_lengths is not None:
    lengths = np.asarray(prompt_lengths)
    if (lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer)
        or lengths.min() < 1 or lengths.max() > seq):
      raise ValueError(
          f"prompt_lengths={prompt_lengths!r}: expected {batch} ints in "
          f"[1, {seq}] (prompts are left-padded in input_ids)")
  real = np.arange(seq)[None, :] >= seq - lengths[:, None]  # (B, T)
  bad = np.argwhere(real & ((ids < 0) | (ids >= vocab_size)))
  if bad.size:
    b, t = bad[0]
    raise ValueError(f"input_ids[{b}, {t}]={ids[b, t]}: expected a token id "
                     f"in [0, {vocab_size})")
  return ids.astype(np.int32), lengths.astype(np.int64)


def check_request(model, input_ids, *, max_new_tokens: int,
                  prompt_lengths=None, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None,
                  eos_token_id: int | Sequence[int] | None = None, rng=None,
                  max_len: int | None = None,
                  prefill_chunk: int = 256) -> GenerationRequest:
  """`generate`'s arguments (see there) checked against `model`, with the
  defaults filled in; raises the ValueError/TypeError `generate` documents."""
  check_sampling_args(max_new_tokens, temperature, top_k, top_p)
  config = model.config
  ids, lengths = _check_prompts(input_ids, prompt_lengths, config.vocab_size)
  sampling = SamplingOptions.for_vocab(
      config.vocab_size, temperature=temperature, top_k=top_k, top_p=top_p,
      eos_token_id=eos_token_id)
  check_positive_int("prefill_chunk", prefill_chunk)
  if max_len is not None:
    check_positive_int("max_len", max_len)
  needed = int(lengths.max()) + max_new_tokens
  max_len = needed if max_len is None else max_len
  limited = [w for w in config.layer_windows
             if position_limit(w, cache_slots(w, max_len)) is not None]
  if limited and needed > max_len:
    raise ValueError(
        f"max_len={max_len!r}: the longest prompt ({int(lengths.max())} "
        f"tokens) + max_new_tokens={max_new_tokens} needs {needed} positions, "
        f"but the cache of {len(limited)} layer(s) (full attention, or a "
        f"window W > max_len) holds only max_len: pass max_len >= {needed}")
  return GenerationRequest(
      ids=ids, lengths=lengths, max_new_tokens=max_new_tokens, max_len=max_len,
      prefill_chunk=prefill_chunk,
      rng=jax.random.key(0) if rng is None else rng, sampling=sampling)


def prefill(model, request: GenerationRequest) -> DecodeState:
  """Prefills `request`'s prompts into a new cache and picks the first new
  token (with fold_in(rng, 0)).

  The prompts [B, T] are left-padded to a whole number of chunks of
  min(prefill_chunk, T) tokens and run chunk by chunk (one compiled program
  for every chunk); padding gets position -1 and never enters the cache.
  """
  batch, seq = request.ids.shape
  # Left-pad the prompt to a whole number of chunks; per-row positions.
  chunk = min(request.prefill_chunk, seq)
  padded = -(-seq // chunk) * chunk
  ids = np.pad(request.ids, ((0, 0), (padded - seq, 0)))
  positions = np.arange(padded)[None, :] - (padded - request.lengths[:, None])
  positions = np.where(positions >= 0, positions, -1).astype(np.int32)

  graphdef, state = nnx.split(model)
  cache = model.init_cache(batch, request.max_len)
  for start in range(0, padded, chunk):
    logits, cache = _prefill_chunk(graphdef, state, cache,
                                   jnp.asarray(ids[:, start:start + chunk]),
                                   jnp.asarray(positions[:, start:start + chunk]))
  token, done = _first_token(logits, jnp.zeros((batch,), bool),
                             jax.random.fold_in(request.rng, 0),
                             sampling=request.sampling)
  return DecodeState(graphdef, state, cache, token,
                     jnp.asarray(request.lengths, jnp.int32), done)


def decode(request: GenerationRequest, start: DecodeState) -> tuple[jax.Array, KVCache]:
  """`generate`'s decode steps after `prefill(model, request)`, in one jitted
  `lax.while_loop` on the device.

  Runs steps 1 .. max_new_tokens - 1 (step s samples with fold_in(rng, s)),
  or until every row is done. Returns (the new tokens int32 [B,
  max_new_tokens], column 0 = start.token; columns never reached hold the
  pad value: the first eos id, or 0 without eos, when the loop always runs to
  the end; the final cache). start.cache is donated: use `start` once.
  """
  return _decode_loop(start.graphdef, start.state, start.cache, start.token,
                      start.position, start.done, request.rng,
                      max_new_tokens=request.max_new_tokens,
                      sampling=request.sampling)


def generate_stream(model, input_ids, *, max_new_tokens: int,
                    prompt_lengths=None, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None,
                    eos_token_id: int | Sequence[int] | None = None, rng=None,
                    max_len: int | None = None,
                    prefill_chunk: int = 256) -> Iterator[np.ndarray]:
  """Yields each new token of every row, int32 [B], as it is decided.

  Takes `generate`'s arguments, checked when called (before iterating);
  stops after max_new_tokens steps, or as soon as every row has produced an
  eos token. One jitted decode step per token, each synced with the host
  (for streaming); `generate` runs the same steps in one device-side loop.
  """
  request = check_request(
      model, input_ids, max_new_tokens=max_new_tokens,
      prompt_lengths=prompt_lengths, temperature=temperature, top_k=top_k,
      top_p=top_p, eos_token_id=eos_token_id, rng=rng, max_len=max_len,
      prefill_chunk=prefill_chunk)
  return _stream(model, request)


def _stream(model, request: GenerationRequest) -> Iterator[np.ndarray]:
  """`generate_stream`'s loop, on a checked request."""
  if request.max_new_tokens == 0:
    return
  carry = prefill(model, request)
  token, cache, position, done = carry.token, carry.cache, carry.position, carry.done
  for step in range(1, request.max_new_tokens + 1):
    yield np.asarray(token)
    if step == request.max_new_tokens or (
        request.sampling.eos_token_ids and np.asarray(done).all()):
      return
    token, cache, position, done = _decode_step(
        carry.graphdef, carry.state, cache, token, position, done, request.rng,
        np.int32(step), sampling=request.sampling)


def generate(model, input_ids, *, max_new_tokens: int, prompt_lengths=None,
             temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, rng=None,
             max_len: int | None = None, prefill_chunk: int = 256) -> np.ndarray:
  """Continues each prompt by max_new_tokens tokens; int32 [B, T + max_new_tokens].

  model: a `CausalLM` (its attn_impl picks the decode attention impl).
  input_ids: int [B, T] prompts, LEFT-padded when prompt_lengths [B] is given
    (row b's prompt is input_ids[b, T - prompt_lengths[b]:]; the padding
    values are ignored); every row is a full-length prompt by default.
  temperature 0: greedy (argmax); > 0: sampled after top_k / top_p filtering
    (`swajax.infer.sampling.sample_next_token`), from `rng` (a jax PRNG key;
    default jax.random.key(0)); step s samples with fold_in(rng, s).
  eos_token_id: None (never stop) or an id (or ids): a row stops at its first
    eos, and its later tokens are all eos_token_id (the first, if several).
  max_len: positions the cache is sized for (default: the longest prompt +
    max_new_tokens). A sliding layer holds min(W, max_len) slots, a full
    layer max_len; a layer with fewer slots than its window cannot go past
    max_len, so max_len must cover the prompt and new tokens (a sliding layer
    of W <= max_len is a ring with no length limit).
  prefill_chunk: longest prompt chunk prefilled at once (longer prompts are
    prefilled chunk by chunk; the logits are the same).
  Returns input_ids followed by the new tokens, as a numpy array: the same
  tokens as `generate_stream`, but after the prefill all decode steps run in
  one jitted `lax.while_loop` on the device (no host sync per token), which
  ends once every row has stopped.
  Raises ValueError/TypeError for max_new_tokens < 0, temperature < 0, top_k
  < 1, top_p outside (0, 1], bad prompts, prefill_chunk or max_len < 1, or
  max_len too short for the prompt and new tokens on a model with a layer
  whose cache holds fewer slots than its window.
  """
  request = check_request(
      model, input_ids, max_new_tokens=max_new_tokens,
      prompt_lengths=prompt_lengths, temperature=temperature, top_k=top_k,
      top_p=top_p, eos_token_id=eos_token_id, rng=rng, max_len=max_len,
      prefill_chunk=prefill_chunk)
  if max_new_tokens == 0:
    return request.ids
  start = prefill(model, request)
  new = start.token[:, None] if max_new_tokens == 1 else decode(request, start)[0]
  return np.concatenate([request.ids, np.asarray(new)], axis=1)

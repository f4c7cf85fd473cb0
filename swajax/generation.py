"""Autoregressive generation with the rolling KV cache: `generate` and
`generate_stream`.

Prompts are prefilled in chunks of at most `prefill_chunk` tokens (every chunk
of a call has one static shape, so one compile). Then one decode step
(`_step`: the model on the last token, then `_pick`) per new token:
`generate_stream` runs it as a jitted single-token program, syncing with the
host to yield each token; `generate` runs all steps in one jitted
`lax.while_loop` on the device, writing into a [B, max_new_tokens] buffer.
Both trace once per (shapes, options) (`TRACE_COUNTS` records the traces, for
the tests) and give the same tokens.

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
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.kv_cache import KVCache, cache_slots, position_limit
from pallas_kernels.validation import check_positive_int
from swajax.sampling import check_sampling_args, sample_next_token

# Traces of the jitted prefill chunk, single decode step and decode loop
# ("prefill", "decode", "decode_loop").
TRACE_COUNTS: collections.Counter = collections.Counter()


def _pick(logits, done, key, *, temperature, top_k, top_p, eos):
  """The next token [B] from last-position logits [B, V]; eos once done."""
  token = sample_next_token(logits, key, temperature=temperature, top_k=top_k,
                            top_p=top_p)
  if eos:
    token = jnp.where(done, eos[0], token)
    done = done | jnp.isin(token, jnp.asarray(eos, jnp.int32))
  return token, done


@functools.partial(jax.jit, static_argnames=("graphdef",),
                   donate_argnames=("cache",))
def _prefill_chunk(graphdef, state, cache: KVCache, ids, positions):
  """One prompt chunk ids, positions [B, T] -> (last logits [B, V], cache)."""
  TRACE_COUNTS["prefill"] += 1
  logits, cache = nnx.merge(graphdef, state)(ids, positions=positions,
                                             cache=cache)
  return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p",
                                             "eos"))
def _first_token(logits, done, key, *, temperature, top_k, top_p, eos):
  return _pick(logits, done, key, temperature=temperature, top_k=top_k,
               top_p=top_p, eos=eos)


def _step(graphdef, state, cache: KVCache, token, position, done, key, step,
          *, temperature, top_k, top_p, eos):
  """One decode step: feeds token [B] at position [B], samples the next one
  with fold_in(key, step). Returns (next token [B], cache, position + 1,
  done [B]). Shared by `_decode_step` and the body of `_decode_loop`."""
  logits, cache = nnx.merge(graphdef, state)(
      token[:, None], positions=position[:, None], cache=cache)
  token, done = _pick(logits[:, -1], done, jax.random.fold_in(key, step),
                      temperature=temperature, top_k=top_k, top_p=top_p,
                      eos=eos)
  return token, cache, position + 1, done


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature",
                                             "top_k", "top_p", "eos"),
                   donate_argnames=("cache",))
def _decode_step(graphdef, state, cache: KVCache, token, position, done, key,
                 step, *, temperature, top_k, top_p, eos):
  """`_step` as its own program: the per-token loop of `generate_stream`."""
  TRACE_COUNTS["decode"] += 1
  return _step(graphdef, state, cache, token, position, done, key, step,
               temperature=temperature, top_k=top_k, top_p=top_p, eos=eos)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens",
                                             "temperature", "top_k", "top_p",
                                             "eos"),
                   donate_argnames=("cache",))
def _decode_loop(graphdef, state, cache: KVCache, token, position, done, key,
                 *, max_new_tokens, temperature, top_k, top_p, eos):
  """Every decode step of `generate` in one program (a `lax.while_loop`).

  token [B]: the first new token (from the prefill logits). Runs `_step` for
  steps 1 .. max_new_tokens - 1, or until every row is done. Returns (the new
  tokens int32 [B, max_new_tokens], columns never reached = the pad value:
  the first eos id, or 0 without eos, when the loop always runs to the end;
  the final cache, returned so that the donated one is updated in place).
  """
  TRACE_COUNTS["decode_loop"] += 1
  options = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos=eos)
  tokens = jnp.full((token.shape[0], max_new_tokens), eos[0] if eos else 0,
                    jnp.int32).at[:, 0].set(token)

  def running(carry):
    step, *_, done, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, token, cache, position, done, tokens = carry
    token, cache, position, done = _step(graphdef, state, cache, token,
                                         position, done, key, step, **options)
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


def _check_eos(eos_token_id, vocab_size) -> tuple[int, ...]:
  """None, an id or a sequence of ids (ints, numpy or jax) -> a tuple of ints."""
  if eos_token_id is None:
    return ()
  items = (list(eos_token_id) if np.ndim(eos_token_id) == 1 else
           [eos_token_id] if np.ndim(eos_token_id) == 0 else None)
  if items is None or not all(
      np.ndim(i) == 0 and np.issubdtype(np.asarray(i).dtype, np.integer)
      and not isinstance(i, bool) and 0 <= i < vocab_size for i in items):
    raise ValueError(f"eos_token_id={eos_token_id!r}: expected None, or "
                     f"ints in [0, {vocab_size})")
  return tuple(int(i) for i in items)


def _check_args(model, input_ids, *, max_new_tokens, prompt_lengths,
                temperature, top_k, top_p, eos_token_id, rng, max_len,
                prefill_chunk) -> dict:
  """`generate`'s arguments checked -> the keyword arguments of `_prefill`."""
  check_sampling_args(max_new_tokens, temperature, top_k, top_p)
  config = model.config
  ids, lengths = _check_prompts(input_ids, prompt_lengths, config.vocab_size)
  eos = _check_eos(eos_token_id, config.vocab_size)
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
  options = dict(temperature=float(temperature), top_k=top_k,
                 top_p=None if top_p is None else float(top_p), eos=eos)
  return dict(ids=ids, lengths=lengths, max_len=max_len,
              prefill_chunk=prefill_chunk,
              key=jax.random.key(0) if rng is None else rng, options=options)


def _prefill(model, *, ids, lengths, max_len, prefill_chunk, key, options):
  """Prefills the prompts and picks the first new token.

  Returns (graphdef, state, cache, token [B], position [B] of that token,
  done [B]): the carry of the decode steps.
  """
  batch, seq = ids.shape
  # Left-pad the prompt to a whole number of chunks; per-row positions.
  chunk = min(prefill_chunk, seq)
  padded = -(-seq // chunk) * chunk
  ids = np.pad(ids, ((0, 0), (padded - seq, 0)))
  positions = np.arange(padded)[None, :] - (padded - lengths[:, None])
  positions = np.where(positions >= 0, positions, -1).astype(np.int32)

  graphdef, state = nnx.split(model)
  cache = model.init_cache(batch, max_len)
  for start in range(0, padded, chunk):
    logits, cache = _prefill_chunk(graphdef, state, cache,
                                   jnp.asarray(ids[:, start:start + chunk]),
                                   jnp.asarray(positions[:, start:start + chunk]))
  done = jnp.zeros((batch,), bool)
  token, done = _first_token(logits, done, jax.random.fold_in(key, 0),
                             **options)
  return graphdef, state, cache, token, jnp.asarray(lengths, jnp.int32), done


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
  args = _check_args(
      model, input_ids, max_new_tokens=max_new_tokens,
      prompt_lengths=prompt_lengths, temperature=temperature, top_k=top_k,
      top_p=top_p, eos_token_id=eos_token_id, rng=rng, max_len=max_len,
      prefill_chunk=prefill_chunk)
  return _stream(model, max_new_tokens, args)


def _stream(model, max_new_tokens, args) -> Iterator[np.ndarray]:
  """`generate_stream`'s loop, on checked arguments."""
  if max_new_tokens == 0:
    return
  graphdef, state, cache, token, position, done = _prefill(model, **args)
  key, options = args["key"], args["options"]
  for step in range(1, max_new_tokens + 1):
    yield np.asarray(token)
    if step == max_new_tokens or (options["eos"] and np.asarray(done).all()):
      return
    token, cache, position, done = _decode_step(
        graphdef, state, cache, token, position, done, key, np.int32(step),
        **options)


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
    (`swajax.sampling.sample_next_token`), from `rng` (a jax PRNG key;
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
  args = _check_args(
      model, input_ids, max_new_tokens=max_new_tokens,
      prompt_lengths=prompt_lengths, temperature=temperature, top_k=top_k,
      top_p=top_p, eos_token_id=eos_token_id, rng=rng, max_len=max_len,
      prefill_chunk=prefill_chunk)
  ids = args["ids"]
  if max_new_tokens == 0:
    return ids
  graphdef, state, cache, token, position, done = _prefill(model, **args)
  if max_new_tokens == 1:
    new = token[:, None]
  else:
    new, _ = _decode_loop(graphdef, state, cache, token, position, done,
                          args["key"], max_new_tokens=max_new_tokens,
                          **args["options"])
  return np.concatenate([ids, np.asarray(new)], axis=1)

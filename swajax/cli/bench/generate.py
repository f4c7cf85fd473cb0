"""`swajax bench generate`: prefill and decode tokens/s (streamed and fused
decode loops), and KV cache bytes, with the rolling cache vs a full-length one.

The same random `mistral_tiny` twice: every layer windowed (a ring of W slots
per layer, or max_len slots when T + N + 1 < W), and
`config.with_full_attention()` (max_len slots per layer). Each
runs on B random prompts of T tokens, greedy, no eos. Prefill time: that of
generate(max_new_tokens=1), end to end (prefill + one sampled token, no
decode step). Decode time: the N decode steps of max_new_tokens=N + 1 alone,
timed after an untimed prefill, with `generate_stream`'s loop (one jitted
step per token, synced with the host to yield it: "stream") and with
`generate`'s (every step in one device-side while_loop: "fused"). Each time
is the median of `repeats` runs after a compiling warm-up; fused vs stream is
the ratio of the decode tokens/s.
Cache bytes are those of the `KVCache` each model allocates for T + N + 1
tokens. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

import models
from models.kv_cache import cache_bytes
from swajax.cli.bench import common
from swajax.dtypes import DTYPES
from swajax.infer.generation import (check_request, decode, generate,
                               generate_stream, prefill)

COLUMNS = [("attention", "attention"), ("window", "W"), ("prompt_len", "T"),
           ("new_tokens", "N"), ("batch", "B"), ("prefill_tokens_per_s",
                                                 "prefill tok/s"),
           ("stream_decode_tokens_per_s", "stream decode tok/s"),
           ("stream_decode_ms_per_token", "stream ms/token"),
           ("fused_decode_tokens_per_s", "fused decode tok/s"),
           ("fused_decode_ms_per_token", "fused ms/token"),
           ("fused_vs_stream", "fused vs stream"),
           ("cache_bytes", "cache bytes"), ("cache_ratio", "cache vs full")]
DTYPE_CHOICES = ("bfloat16", "float32")  # --dtype: of `DTYPES`, no float16


def parse_args(argv):
  """(the flags, (the sliding ModelConfig, its full-attention twin))."""
  parser = argparse.ArgumentParser(prog="swajax bench generate",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--prompt-len", type=int, default=1024)
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--window", type=int, default=128)
  parser.add_argument("--batch-size", type=int, default=1)
  parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32")
  parser.add_argument("--attn-impl", default="auto")
  parser.add_argument("--prefill-chunk", type=int, default=256)
  common.add_model_overrides(parser)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None,
                      help="write the results as JSON here (default: nothing is written; the table is printed)")
  args = parser.parse_args(argv)
  return args, common.sliding_and_full(parser, args.model_overrides,
                                       args.window)


def median_seconds(prepare, repeats: int) -> float:
  """prepare() (untimed) returns the function to time: one call to compile,
  then the median wall time of `repeats` calls."""
  times = []
  for _ in range(repeats + 1):
    fn = prepare()
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times[1:])


def stream_decode(model, prompts, new_tokens, **kwargs):
  """Prefills (untimed) with `generate_stream`; returns its per-token loop of
  new_tokens decode steps."""
  tokens = generate_stream(model, prompts, max_new_tokens=new_tokens + 1,
                           **kwargs)
  next(tokens)  # the prefill and the first token
  return lambda: list(tokens)


def fused_decode(model, prompts, new_tokens, *, max_len, prefill_chunk):
  """Prefills (untimed) as `generate` does; returns its while_loop of
  new_tokens decode steps, up to the tokens on the host."""
  request = check_request(model, prompts, max_new_tokens=new_tokens + 1,
                          max_len=max_len, prefill_chunk=prefill_chunk)
  start = prefill(model, request)
  jax.block_until_ready((start.cache, start.token))
  return lambda: np.asarray(decode(request, start)[0])


def measure(config, args, prompts) -> dict:
  """One row of the table for the model of `config`."""
  model = models.CausalLM(config, dtype=DTYPES[args.dtype],
                          param_dtype=DTYPES[args.dtype],
                          attn_impl=args.attn_impl, rngs=nnx.Rngs(0))
  max_len = args.prompt_len + args.new_tokens + 1
  kwargs = dict(max_len=max_len, prefill_chunk=args.prefill_chunk)
  prefill_s = median_seconds(
      lambda: lambda: generate(model, prompts, max_new_tokens=1, **kwargs),
      args.repeats)
  window = config.layer_windows[0]
  row = dict(
      attention="sliding" if window else "full", window=window,
      prompt_len=args.prompt_len, new_tokens=args.new_tokens,
      batch=args.batch_size,
      prefill_tokens_per_s=args.batch_size * args.prompt_len / prefill_s)
  for loop, decode in (("stream", stream_decode), ("fused", fused_decode)):
    decode_s = median_seconds(
        lambda: decode(model, prompts, args.new_tokens, **kwargs), args.repeats)
    row[f"{loop}_decode_tokens_per_s"] = (args.batch_size * args.new_tokens
                                         / decode_s)
    row[f"{loop}_decode_ms_per_token"] = 1e3 * decode_s / args.new_tokens
  row["fused_vs_stream"] = (row["fused_decode_tokens_per_s"]
                            / row["stream_decode_tokens_per_s"])
  cache = jax.eval_shape(lambda: model.init_cache(args.batch_size, max_len))
  return dict(row, cache_bytes=cache_bytes(cache), repeats=args.repeats)


def main(argv: list[str]) -> int:
  args, (sliding, full) = parse_args(argv)
  prompts = np.random.default_rng(0).integers(
      0, sliding.vocab_size, (args.batch_size, args.prompt_len), np.int32)
  rows = [measure(c, args, prompts) for c in (sliding, full)]
  for row in rows:
    row["cache_ratio"] = row["cache_bytes"] / rows[1]["cache_bytes"]
  print(common.format_table(rows, COLUMNS))
  if args.out:
    common.write_json(args.out, dict(
        benchmark="generate", machine=common.machine_info(),
        args=vars(args),
        model=dict(args.model_overrides, family="mistral_tiny"),
        rows=rows))
    print(f"wrote {args.out}")
  return 0

"""`swajax bench generate`: prefill and decode tokens/s, and KV cache bytes,
with the rolling cache vs a full-length one.

The same random `mistral_tiny` twice: every layer windowed (a ring of W slots
per layer), and `config.with_full_attention()` (max_len slots per layer). Each
runs `swajax.generate` end to end (host loop included) on B random prompts of
T tokens: prefill time is that of generate(max_new_tokens=1) (prefill + one
sampled token), decode time the rest of generate(max_new_tokens=N + 1), both
the median of `repeats` runs after a compiling warm-up. Cache bytes are those
of the `KVCache` each model allocates for T + N + 1 tokens. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from models.kv_cache import cache_bytes
from swajax.bench import common
from swajax.generate import generate

COLUMNS = [("attention", "attention"), ("window", "W"), ("prompt_len", "T"),
           ("new_tokens", "N"), ("batch", "B"), ("prefill_tokens_per_s",
                                                 "prefill tok/s"),
           ("decode_tokens_per_s", "decode tok/s"),
           ("decode_ms_per_token", "decode ms/token"),
           ("cache_bytes", "cache bytes"), ("cache_ratio", "cache vs full")]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="swajax bench generate",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--prompt-len", type=int, default=1024)
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--window", type=int, default=128)
  parser.add_argument("--batch-size", type=int, default=1)
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
  parser.add_argument("--attn-impl", default="auto")
  parser.add_argument("--prefill-chunk", type=int, default=256)
  parser.add_argument("--model-overrides", nargs="+", default=[],
                      metavar="KEY=INT", help="mistral_tiny fields, e.g. "
                      "num_layers=2")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="benchmarks/results/generate.json")
  return parser.parse_args(argv)


def median_seconds(fn, repeats: int) -> float:
  """fn() once to compile, then the median wall time of `repeats` calls."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(config, args, prompts) -> dict:
  """One row of the table for the model of `config`."""
  model = models.CausalLM(config, dtype=DTYPES[args.dtype],
                          param_dtype=DTYPES[args.dtype],
                          attn_impl=args.attn_impl, rngs=nnx.Rngs(0))
  max_len = args.prompt_len + args.new_tokens + 1
  run = lambda new: lambda: generate(model, prompts, max_new_tokens=new,
                                     max_len=max_len,
                                     prefill_chunk=args.prefill_chunk)
  prefill_s = median_seconds(run(1), args.repeats)
  total_s = median_seconds(run(args.new_tokens + 1), args.repeats)
  decode_s = max(total_s - prefill_s, 1e-9)
  cache = jax.eval_shape(lambda: model.init_cache(args.batch_size, max_len))
  window = config.layer_windows[0]
  return dict(
      attention="sliding" if window else "full", window=window,
      prompt_len=args.prompt_len, new_tokens=args.new_tokens,
      batch=args.batch_size,
      prefill_tokens_per_s=args.batch_size * args.prompt_len / prefill_s,
      decode_tokens_per_s=args.batch_size * args.new_tokens / decode_s,
      decode_ms_per_token=1e3 * decode_s / args.new_tokens,
      cache_bytes=cache_bytes(cache), repeats=args.repeats)


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  overrides = {}
  for item in args.model_overrides:
    key, _, value = item.partition("=")
    if not value.lstrip("-").isdigit():
      print(f"swajax bench generate: --model-overrides {item!r}: expected "
            "KEY=INT", file=sys.stderr)
      return 2
    overrides[key] = int(value)
  sliding = models.mistral_tiny(**overrides)
  sliding = models.mistral_tiny(
      **overrides, layer_windows=(args.window,) * sliding.num_layers)
  prompts = np.random.default_rng(0).integers(
      0, sliding.vocab_size, (args.batch_size, args.prompt_len), np.int32)
  rows = [measure(c, args, prompts)
          for c in (sliding, sliding.with_full_attention())]
  for row in rows:
    row["cache_ratio"] = row["cache_bytes"] / rows[1]["cache_bytes"]
  print(common.format_table(rows, COLUMNS))
  common.write_json(args.out, dict(
      benchmark="generate", machine=common.machine_info(),
      args=vars(args), model=dict(overrides, family="mistral_tiny"),
      rows=rows))
  print(f"wrote {args.out}")
  return 0

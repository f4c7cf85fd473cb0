"""`swajax bench train`: training tokens/s, sliding window vs full causal attention.

The same model twice: `mistral_tiny` with every layer windowed (W keys), and
`config.with_full_attention()` (every window removed). One jitted optimizer
step each (forward, backward, AdamW; the `swajax train` step) on one row of T
random tokens per device, timed per `swajax.cli.bench.common` (compile, warm up,
median). Prints a table and writes JSON. The sliding model's attention costs
O(T·W), the full one's O(T²/2); the MLP and projections cost the same in both,
so the speedup grows with T / W and with the attention share of the model.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import numpy as np

from swajax import sharding as sharding_lib
from swajax.cli.bench import common
from swajax.dtypes import DTYPES
from swajax.training.config import REMAT, TrainConfig
from swajax.training.optimizer import StepOptions
from swajax.training.state import init_model
from swajax.training.step import train_step

COLUMNS = [("attention", "attention"), ("window", "window"), ("seq_len", "T"),
           ("batch", "B"), ("step_ms", "step ms"), ("tokens_per_s", "tokens/s"),
           ("speedup", "speedup vs full"), ("repeats", "runs")]


def parse_args(argv):
  """(the flags, (the sliding ModelConfig, its full-attention twin))."""
  on_gpu = jax.default_backend() == "gpu"
  parser = argparse.ArgumentParser(prog="swajax bench train",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--seq-len", type=int, default=4096)
  parser.add_argument("--window", type=int, default=256)
  parser.add_argument("--batch-size", type=int, default=jax.device_count(),
                      help="rows per step (global; default one per device)")
  parser.add_argument("--dtype", choices=sorted(DTYPES),
                      default="bfloat16" if on_gpu else "float32",
                      help="compute dtype (default: bfloat16 on GPU, float32 on "
                      "CPU, where XLA emulates bf16 matmuls)")
  parser.add_argument("--attn-impl", default="auto")
  parser.add_argument("--remat", choices=REMAT, default="none")
  common.add_model_overrides(parser)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None,
                      help="write the results as JSON here (default: nothing is written; the table is printed)")
  args = parser.parse_args(argv)
  return args, common.sliding_and_full(
      parser, args.model_overrides, args.window,
      max_position_embeddings=max(args.seq_len, 4096))


def step_time(config: TrainConfig, repeats: int) -> common.Timing:
  """Median seconds of one optimizer step on [1, B, T] random tokens."""
  mesh = sharding_lib.make_mesh(config.fsdp)
  with jax.set_mesh(mesh):
    _, graphdef, rest, state = init_model(config, mesh)
    shape = (1, config.batch_size, config.seq_len)
    tokens = np.random.default_rng(0).integers(0, 256, shape, dtype=np.int32)
    rows = {"input_ids": tokens, "targets": np.roll(tokens, -1, axis=-1),
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(config.seq_len, dtype=np.int32), shape),
            "loss_mask": np.ones(shape, np.float32)}
    batch_sharding = sharding_lib.batch_sharding(mesh, 3, batch_dim=1)
    batch = {k: sharding_lib.global_array(np.ascontiguousarray(v), batch_sharding)
             for k, v in rows.items()}
    step = functools.partial(train_step, graphdef=graphdef,
                             options=StepOptions.from_config(config), mesh=mesh)
    return common.time_fn(step, state, rest, batch, repeats=repeats)


def main(argv: list[str]) -> int:
  args, (sliding, full) = parse_args(argv)
  variants = [("sliding", args.window, sliding), ("full", None, full)]
  rows = []
  for name, window, model_config in variants:
    config = TrainConfig(
        model=model_config, seq_len=args.seq_len,
        batch_size=args.batch_size, dtype=args.dtype, attn_impl=args.attn_impl,
        remat=args.remat, warmup_steps=0, steps=2)
    print(f"timing {name} attention (T={args.seq_len}, window={window})...",
          file=sys.stderr, flush=True)
    timing = step_time(config, args.repeats)
    rows.append(dict(attention=name, window=window,
                     layer_windows=list(model_config.layer_windows),
                     seq_len=args.seq_len,
                     batch=args.batch_size, step_ms=timing.median_s * 1e3,
                     tokens_per_s=args.batch_size * args.seq_len / timing.median_s,
                     repeats=timing.repeats, temp_bytes=timing.temp_bytes))
  for row in rows:
    row["speedup"] = row["tokens_per_s"] / rows[-1]["tokens_per_s"]
  print(common.format_table(rows, COLUMNS))
  if args.out:
    common.write_json(args.out, dict(
        benchmark="train", machine=common.machine_info(),
        model=dict(sliding.to_hf(), layer_windows=list(sliding.layer_windows)),
        dtype=args.dtype, attn_impl=args.attn_impl, remat=args.remat, rows=rows))
    print(f"wrote {args.out}", file=sys.stderr)
  return 0

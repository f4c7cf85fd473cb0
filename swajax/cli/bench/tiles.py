"""`swajax bench tiles`: the Pallas kernels under candidate `FlashBlockSizes`.

Tuning data for `FlashBlockSizes.default`. For one problem (T, W, dtype, N, K, H)
it times the forward and forward+backward of impl="pallas" under the default
tiles, then under variants that each change one field of the default
(a coordinate sweep over `SWEEP`), and reports every time relative to the
default's. Variants are timed in `SWEEP` order until `--budget-s` seconds
have passed (compiles included), so a GPU run has a known bound; the JSON
is rewritten after every variant, so a run cut short keeps what it measured.

Compiled kernels need a GPU: on a CPU the kernels run in interpret mode,
which times the interpreter, so only `--smoke` (tiny sizes, for the tests)
runs there.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax

from pallas_kernels import FlashBlockSizes, sliding_window_attention
from pallas_kernels.validation import check_attention_args
from swajax.cli.bench import attention, common

# Field -> values tried instead of the default's (one field at a time).
SWEEP = {
    "block_q_dkv": (32, 64, 128),
    "block_k_dkv": (32, 64, 128),
    "block_q_dq": (32, 64, 128),
    "block_k_dq": (32, 64, 128),
    "num_warps": (4, 8),
    "num_stages": (1, 2, 3, 4),
    "block_q": (64, 128),
    "block_k": (32, 64, 128),
}
SMOKE = dict(seq_len=64, window=16, heads=2, kv_heads=1, head_dim=16,
             repeats=1)
COLUMNS = [("variant", "variant"), ("fwd_ms", "fwd ms"),
           ("fwd_bwd_ms", "fwd+bwd ms"), ("bwd_over_fwd", "bwd / fwd"),
           ("fwd_bwd_vs_default", "fwd+bwd vs default"), ("skipped", "note")]


def variants(default: FlashBlockSizes) -> list[tuple[str, FlashBlockSizes]]:
  """[("default", default), ("field=value", default with that field), ...]."""
  out = [("default", default)]
  for field, values in SWEEP.items():
    for value in values:
      if value == getattr(default, field):
        continue
      out.append((f"{field}={value}",
                  dataclasses.replace(default, **{field: value})))
  return out


def time_variant(name: str, blocks: FlashBlockSizes, inputs, window: int,
                 repeats: int) -> dict:
  """One row: fwd and fwd+bwd ms of impl="pallas" with `blocks`."""
  fn = lambda q, k, v: sliding_window_attention(
      q, k, v, window=window, impl="pallas", block_sizes=blocks)
  q, k, v, d_out = inputs
  row = dict(variant=name, blocks=dataclasses.asdict(blocks))
  try:
    fwd = common.time_fn(fn, q, k, v, repeats=repeats)
    both = common.time_fn(attention.with_grad(fn), q, k, v, d_out,
                          repeats=repeats)
  except Exception as e:  # a tile the compiler rejects is a result, not a crash
    return dict(row, skipped=f"{type(e).__name__}: {e}"[:160])
  return dict(row, fwd_ms=fwd.median_s * 1e3, fwd_bwd_ms=both.median_s * 1e3,
              bwd_over_fwd=(both.median_s - fwd.median_s) / fwd.median_s)


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="swajax bench tiles",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--seq-len", type=int, default=16384)
  parser.add_argument("--window", type=int, default=4096)
  parser.add_argument("--dtype", choices=sorted(attention.DTYPES),
                      default="bfloat16")
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--kv-heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--budget-s", type=float, default=120.0,
                      help="start no new variant after this many seconds")
  parser.add_argument("--out", default=None,
                      help="write the results as JSON here (default: nothing is written; the table is printed)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes (interpret mode on a CPU), for tests")
  args = parser.parse_args(argv)
  if args.smoke:
    for name, value in SMOKE.items():
      setattr(args, name, value)
  elif jax.default_backend() != "gpu":
    parser.error("needs a GPU (on a CPU the kernels are interpreted, which "
                 "times the interpreter); --smoke runs the plumbing")
  try:  # the attention benchmark's checks of sizes, heads and dtype
    settings = attention.Settings(
        seq_lens=(args.seq_len,), windows=(args.window,), dtype=args.dtype,
        heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
        repeats=args.repeats)
  except ValueError as e:
    parser.error(str(e))
  return args, settings


def main(argv: list[str]) -> int:
  args, settings = parse_args(argv)
  inputs = attention.make_inputs(args.seq_len, settings)
  q, k, v, _ = inputs
  default = FlashBlockSizes.default(check_attention_args(
      q, k, v, window=args.window, causal=True, segment_ids=None,
      softcap=None, scale=None))
  payload = dict(benchmark="tiles", machine=common.machine_info(),
                 problem=dict(seq_len=args.seq_len, window=args.window,
                              dtype=args.dtype, heads=args.heads,
                              kv_heads=args.kv_heads, head_dim=args.head_dim),
                 rows=[])
  start = time.perf_counter()
  for name, blocks in variants(default):
    if payload["rows"] and time.perf_counter() - start > args.budget_s:
      payload["cut_at_budget_s"] = args.budget_s
      break
    row = time_variant(name, blocks, inputs, args.window, args.repeats)
    base = payload["rows"][0] if payload["rows"] else row
    if "fwd_bwd_ms" in row and "fwd_bwd_ms" in base:
      row["fwd_bwd_vs_default"] = row["fwd_bwd_ms"] / base["fwd_bwd_ms"]
    payload["rows"].append(row)
    print(common.format_table([row], COLUMNS).splitlines()[-1], flush=True)
    if args.out:  # after every variant: a cut-short run keeps what it measured
      common.write_json(args.out, payload)
  print(common.format_table(payload["rows"], COLUMNS))
  if args.out:
    common.write_json(args.out, payload)
    print(f"wrote {args.out}", file=sys.stderr)
  return 0

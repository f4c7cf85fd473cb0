"""`swajax bench mosaic`: the Mosaic GPU kernels' table (run by gpu_check.sh).

impl="mosaic" against impl="pallas" (Triton), cudnn and tokamax, bf16, batch
1, causal windows: GQA 32:8 and 64:8 (N:K), head dims 128 and 64, T 8k / 32k
/ 128k, W 128 / 1024 / 4096, forward and forward + backward. Each (N:K, H, T)
is one `attention.benchmark` call (its timing rule, in-window TFLOP/s and
skip reasons), so the rows are `swajax bench attention` rows plus `heads`,
`kv_heads`, `head_dim` and `vs_cudnn` (cuDNN's time / this row's time, the
issue's goal: >= 1.1 for mosaic). Cases run in that priority order until
`--budget-s` seconds are spent; the rest are listed with `skipped: "budget"`,
so the table fits the GPU check's time. The JSON is rewritten after every
case, so a run cut short keeps what it measured.

Like `swajax bench tiles`, the kernels need a GPU: on a CPU mosaic and pallas
are listed as "needs a GPU" (their interpret modes time the interpreter);
`--smoke` runs tiny sizes there, for the tests.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from swajax.cli.bench import attention, common

IMPLS = ("mosaic", "pallas", "cudnn", "tokamax")
GQA = ((32, 8), (64, 8))
HEAD_DIMS = (128, 64)
SEQ_LENS = (8192, 32768, 131072)
WINDOWS = (128, 1024, 4096)
SMOKE = dict(gqa=((4, 2),), head_dims=(64,), seq_lens=(128,), windows=(64,),
             repeats=1)
COLUMNS = [("impl", "impl"), ("mode", "mode"), ("heads", "N"),
           ("kv_heads", "K"), ("head_dim", "H"), ("seq_len", "T"),
           ("window", "W"), ("time_s", "time (s)"), ("tflops", "TFLOP/s"),
           ("vs_cudnn", "x cuDNN"), ("skipped", "note")]


def _with_vs_cudnn(rows: list[dict]) -> list[dict]:
  """Adds `vs_cudnn` (cuDNN's time / the row's) where both were timed."""
  cudnn = {(r["mode"], r["window"]): r["time_s"] for r in rows
           if r["impl"] == "cudnn" and r["time_s"]}
  for r in rows:
    base = cudnn.get((r["mode"], r["window"]))
    if base and r["time_s"]:
      r["vs_cudnn"] = base / r["time_s"]
  return rows


def benchmark(*, gqa=GQA, head_dims=HEAD_DIMS, seq_lens=SEQ_LENS,
              windows=WINDOWS, impls=IMPLS, repeats=3, budget_s=300.0,
              out=None) -> dict:
  """Times the table's cases in priority order; returns the JSON payload.

  gqa: (N, K) pairs; the other arguments as the module docstring says. With
  `out`, the payload is written there after every case.
  Returns {"machine", "settings", "elapsed_s", "results": rows}.
  """
  start = time.perf_counter()
  settings = dict(gqa=[list(g) for g in gqa], head_dims=list(head_dims),
                  seq_lens=list(seq_lens), windows=list(windows),
                  impls=list(impls), repeats=repeats, budget_s=budget_s)
  payload = dict(machine=common.machine_info(), settings=settings,
                 elapsed_s=0.0, results=[])
  for (heads, kv_heads), head_dim, seq_len in itertools.product(
      gqa, head_dims, seq_lens):
    shape = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    if time.perf_counter() - start > budget_s:
      rows = [dict(impl=impl, mode=mode, seq_len=seq_len, window=window,
                   time_s=None, skipped="budget")
              for window in windows for mode in attention.MODES
              for impl in impls]
    else:
      print(f"N:K={heads}:{kv_heads} H={head_dim} T={seq_len}", flush=True)
      rows = attention.benchmark(
          seq_lens=(seq_len,), windows=tuple(windows), impls=tuple(impls),
          dtype="bfloat16", repeats=repeats, **shape)["results"]
    payload["results"] += [dict(r, **shape) for r in _with_vs_cudnn(rows)]
    payload["elapsed_s"] = time.perf_counter() - start
    if out:
      common.write_json(out, payload)
  return payload


def plot(payload: dict, path: str) -> None:
  """In-window TFLOP/s vs T: a row of panels per (N:K, H, mode), a column
  per W, a line per impl."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  rows = [r for r in payload["results"] if r["time_s"]]
  panels = sorted({(r["heads"], r["kv_heads"], r["head_dim"], r["mode"])
                   for r in rows})
  windows = sorted({r["window"] for r in rows})
  if not panels:
    return
  fig = Figure(figsize=(4 * len(windows), 2.8 * len(panels)))
  axes = fig.subplots(len(panels), len(windows), squeeze=False)
  for (i, (n, k, h, mode)), (j, w) in itertools.product(enumerate(panels),
                                                        enumerate(windows)):
    ax = axes[i][j]
    for impl in payload["settings"]["impls"]:
      pts = sorted((r["seq_len"], r["tflops"]) for r in rows
                   if (r["impl"], r["heads"], r["kv_heads"], r["head_dim"],
                       r["mode"], r["window"]) == (impl, n, k, h, mode, w))
      if pts:
        ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_title(f"{mode}, N:K={n}:{k}, H={h}, W={w}", fontsize=9)
    ax.set_xlabel("T")
    ax.set_ylabel("in-window TFLOP/s")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(f"{payload['machine']['device']}, bf16, jax "
               f"{payload['machine']['jax']}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv) -> int:
  parser = argparse.ArgumentParser(prog="swajax bench mosaic",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
  parser.add_argument("--budget-s", type=float, default=300.0,
                      help="no new (N:K, H, T) case starts after this many "
                      "seconds (default: 300)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", help="write the results as JSON here")
  parser.add_argument("--plot", help="write the TFLOP/s panels as PNG here")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes (seconds), for tests")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats={args.repeats}: expected an int >= 1")
  if args.budget_s < 0:
    parser.error(f"--budget-s={args.budget_s}: expected seconds >= 0")
  kwargs = dict(SMOKE) if args.smoke else {}
  kwargs.setdefault("repeats", args.repeats)
  payload = benchmark(impls=tuple(args.impls), budget_s=args.budget_s,
                      out=args.out, **kwargs)
  print(common.format_table(payload["results"], COLUMNS))
  if args.plot:
    plot(payload, args.plot)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

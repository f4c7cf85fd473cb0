"""The Mosaic GPU kernels' timing table: mosaic vs pallas (Triton) vs cudnn vs
tokamax, bf16, on a Hopper GPU (run by benchmarks/gpu_check.sh).

  python benchmarks/mosaic_table.py --out mosaic.json --plot mosaic.png
  python benchmarks/mosaic_table.py --smoke --out x.json   # CPU, interpret mode

Cases: GQA 32:8 and 64:8 (N:K), head dims 128 and 64, T 8k / 32k / 128k,
causal windows W 128 / 1024 / 4096, forward and forward + backward (grad of
<out, cotangent> in q, k, v), batch 1. TFLOP/s count only in-window (query,
key) pairs: forward 4·pairs·H·N, forward + backward 3.5x that (as
`swajax bench attention`). Cases run in priority order (GQA 32:8, H=128
first) until `--budget-s` seconds are spent; the rest are listed as skipped
("budget"), so the table fits the GPU check's time. Each time is the median
of `--repeats` runs after one warm-up (compile excluded). cudnn runs only
what it computes exactly (the causal window, no lse); tokamax only where it is
installed. A case that cannot run is listed with the reason.

Self-contained (jax, pallas_kernels, matplotlib for --plot): it does not
import swajax.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import sliding_window_attention

IMPLS = ("mosaic", "pallas", "cudnn", "tokamax")
MODES = ("fwd", "fwd+bwd")
GQA = ((32, 8), (64, 8))
HEAD_DIMS = (128, 64)
SEQ_LENS = (8192, 32768, 131072)
WINDOWS = (128, 1024, 4096)
SMOKE = dict(gqa=((4, 2),), head_dims=(64,), seq_lens=(256,), windows=(64,),
             repeats=1)


def in_window_pairs(seq_len: int, window: int) -> int:
  """(query, key) pairs with i - W < j <= i, over T = S = seq_len."""
  w = min(window, seq_len)
  return w * seq_len - w * (w - 1) // 2


def attention_fn(impl: str, window: int):
  """(q, k, v) -> out, or a string: why it cannot run here."""
  on_gpu = jax.default_backend() == "gpu"
  if impl in ("pallas", "cudnn") and not on_gpu:
    return "needs a GPU"
  if impl in ("mosaic", "pallas", "cudnn"):
    return lambda q, k, v: sliding_window_attention(q, k, v, window=window,
                                                    impl=impl)
  if importlib.util.find_spec("tokamax") is None:
    return "tokamax not installed"
  import tokamax  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():  # tokamax reads absl flags from sys.argv
    flags.FLAGS.mark_as_parsed()
  choice = ("mosaic", "triton") if on_gpu else "xla_chunked"
  return lambda q, k, v: tokamax.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=(window - 1, 0),
      implementation=choice)


def with_grad(fn):
  def fwd_bwd(q, k, v, d_out):
    out, vjp = jax.vjp(fn, q, k, v)
    return vjp(d_out.astype(out.dtype))
  return fwd_bwd


def time_fn(fn, *args, repeats: int) -> float:
  """Median seconds of `repeats` runs of jit(fn) after compile + warm-up."""
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def cases(gqa, head_dims, seq_lens, windows):
  """(N, K, H, T, W) in priority order: the first GQA / head dim first."""
  return list(itertools.product(gqa, head_dims, seq_lens, windows))


def run(*, gqa=GQA, head_dims=HEAD_DIMS, seq_lens=SEQ_LENS, windows=WINDOWS,
        impls=IMPLS, modes=MODES, repeats=3, budget_s=300.0) -> dict:
  start = time.perf_counter()
  rows = []
  for (n, kh), h, t, w in cases(gqa, head_dims, seq_lens, windows):
    key = jax.random.key(0)
    kq, kk, kv, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, (1, t, n, h), jnp.bfloat16)
    k = jax.random.normal(kk, (1, t, kh, h), jnp.bfloat16)
    v = jax.random.normal(kv, (1, t, kh, h), jnp.bfloat16)
    d_out = jax.random.normal(kd, q.shape, jnp.bfloat16)
    for mode, impl in itertools.product(modes, impls):
      row = dict(impl=impl, mode=mode, heads=n, kv_heads=kh, head_dim=h,
                 seq_len=t, window=w)
      if time.perf_counter() - start > budget_s:
        rows.append(dict(row, time_s=None, skipped="budget"))
        continue
      fn = attention_fn(impl, w)
      if isinstance(fn, str):
        rows.append(dict(row, time_s=None, skipped=fn))
        continue
      try:
        if mode == "fwd":
          seconds = time_fn(fn, q, k, v, repeats=repeats)
        else:
          seconds = time_fn(with_grad(fn), q, k, v, d_out, repeats=repeats)
      except Exception as e:  # pylint: disable=broad-except
        rows.append(dict(row, time_s=None,
                         skipped=f"{type(e).__name__}: {e}"[:200]))
        continue
      flops = 4 * in_window_pairs(t, w) * h * n * (1.0 if mode == "fwd"
                                                   else 3.5)
      rows.append(dict(row, time_s=seconds, tflops=flops / seconds / 1e12))
      print(f"{impl:>8} {mode:>7} N:K={n}:{kh} H={h} T={t} W={w}: "
            f"{seconds * 1e3:9.3f} ms {rows[-1]['tflops']:7.1f} TFLOP/s",
            flush=True)
    del q, k, v, d_out
  device = jax.devices()[0]
  return dict(machine=dict(device=device.device_kind,
                           backend=jax.default_backend(),
                           jax=jax.__version__,
                           python=platform.python_version()),
              repeats=repeats, budget_s=budget_s,
              elapsed_s=time.perf_counter() - start, results=rows)


def plot(payload: dict, path: str) -> None:
  """TFLOP/s vs T, one panel per (mode, W), one line per impl (GQA 32:8,
  the first head dim)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = [r for r in payload["results"] if r.get("time_s")]
  if not rows:
    return
  first = rows[0]
  rows = [r for r in rows if (r["heads"], r["kv_heads"], r["head_dim"]) ==
          (first["heads"], first["kv_heads"], first["head_dim"])]
  windows = sorted({r["window"] for r in rows})
  fig, axes = plt.subplots(len(MODES), len(windows), squeeze=False,
                           figsize=(4 * len(windows), 6.5))
  for (i, mode), (j, w) in itertools.product(enumerate(MODES),
                                             enumerate(windows)):
    ax = axes[i][j]
    for impl in IMPLS:
      pts = sorted((r["seq_len"], r["tflops"]) for r in rows
                   if r["impl"] == impl and r["mode"] == mode
                   and r["window"] == w)
      if pts:
        ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_title(f"{mode}, W={w}")
    ax.set_xlabel("T")
    ax.set_ylabel("in-window TFLOP/s")
    ax.legend(fontsize=7)
  fig.suptitle(f"{payload['machine']['device']}, bf16, GQA "
               f"{first['heads']}:{first['kv_heads']}, H={first['head_dim']}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="JSON file")
  parser.add_argument("--plot", help="PNG file")
  parser.add_argument("--budget-s", type=float, default=300.0)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--impls", nargs="+", default=list(IMPLS),
                      choices=IMPLS)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes (mosaic in interpret mode on a CPU)")
  args = parser.parse_args(argv)
  kwargs = dict(impls=tuple(args.impls), repeats=args.repeats,
                budget_s=args.budget_s)
  if args.smoke:
    kwargs.update(SMOKE)
  payload = run(**kwargs)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(payload, f, indent=1)
  if args.plot:
    plot(payload, args.plot)
  return 0


if __name__ == "__main__":
  sys.exit(main())

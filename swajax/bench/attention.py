"""`swajax bench attention`: the op's impls against dense and tokamax baselines.

For each (seq_len, window) it times the forward and forward+backward (grad of
<out, cotangent> in q, k, v) of every requested impl, and reports:

- time (median; see swajax.bench.common), effective TFLOP/s counting only
  in-window (query, key) pairs: fwd 4·pairs·H·N·B, fwd+bwd 3.5x that;
- XLA's compiled temp bytes (and the GPU's peak bytes in use, cumulative);
- the speedup over the dense baseline `jax.nn.dot_product_attention(
  implementation="xla", is_causal=True, local_window_size=(W - 1, 0))`;
- the fraction of this machine's plain matmul rate (same dtype, same FLOPs as
  the forward) that each impl reaches.

Impls: xla, pallas (GPU), cudnn (GPU, bf16/fp16), reference (short sequences),
dense (the baseline above), cudnn_causal (GPU: cuDNN causal flash without a
window, the "ignore the window" speed bound), tokamax (if installed: its
chunked XLA path on CPU, its GPU kernels on GPU). A case that cannot run here
is listed with the reason instead of a time.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import jax
import jax.numpy as jnp

from pallas_kernels import sliding_window_attention
from swajax.bench import common

ALL_IMPLS = ("xla", "pallas", "cudnn", "reference", "dense", "cudnn_causal",
             "tokamax")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}


def parse_args(argv):
  on_gpu = jax.default_backend() == "gpu"
  parser = argparse.ArgumentParser(
      prog="swajax bench attention", description=__doc__.split("\n")[0])
  parser.add_argument("--seq-lens", type=int, nargs="+",
                      default=[8192, 32768, 131072] if on_gpu
                      else [2048, 8192, 32768])
  parser.add_argument("--windows", type=int, nargs="+",
                      default=[4096] if on_gpu else [512])
  parser.add_argument("--dtype", choices=sorted(DTYPES),
                      default="bfloat16" if on_gpu else "float32")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=32 if on_gpu else 8)
  parser.add_argument("--kv-heads", type=int, default=8 if on_gpu else 8)
  parser.add_argument("--head-dim", type=int, default=128 if on_gpu else 64)
  parser.add_argument("--impls", nargs="+", choices=ALL_IMPLS,
                      default=list(ALL_IMPLS))
  parser.add_argument("--modes", nargs="+", choices=("fwd", "fwd+bwd"),
                      default=["fwd", "fwd+bwd"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--max-dense-bytes", type=float, default=4 * 2**30,
                      help="skip dense/reference when one [B, N, T, S] fp32 "
                      "score array exceeds this many bytes")
  parser.add_argument("--max-reference-len", type=int, default=4096)
  parser.add_argument("--max-tokamax-cpu-len", type=int, default=8192)
  parser.add_argument("--out", help="write the results as JSON here")
  parser.add_argument("--plot", help="write a log-log time-vs-seq_len PNG here")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes (seconds): for tests")
  args = parser.parse_args(argv)
  if args.smoke:
    args.seq_lens, args.windows = [128], [16]
    args.heads, args.kv_heads, args.head_dim = 2, 1, 16
    args.repeats = 1
  return args


def in_window_pairs(seq_len: int, window: int) -> int:
  """Visible (query, key) pairs of a causal window W over T = S = seq_len."""
  w = min(window, seq_len)
  return w * (w + 1) // 2 + (seq_len - w) * w


def _tokamax_impl():
  """tokamax's implementation choice here, or None with why in `skip`."""
  if importlib.util.find_spec("tokamax") is None:
    return None
  return ("mosaic", "triton") if jax.default_backend() == "gpu" else "xla_chunked"


def attention_fn(impl: str, window: int, args):
  """(callable (q, k, v) -> out, None) or (None, reason it cannot run here)."""
  on_gpu = jax.default_backend() == "gpu"
  low_precision = args.dtype != "float32"
  if impl in ("pallas", "cudnn", "cudnn_causal") and not on_gpu:
    return None, "needs a GPU"
  if impl in ("cudnn", "cudnn_causal") and not low_precision:
    return None, "cuDNN takes bf16/fp16 only"
  if impl in ("xla", "pallas", "cudnn", "reference"):
    return (lambda q, k, v: sliding_window_attention(
        q, k, v, window=window, impl=impl)), None
  if impl == "dense":
    return (lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="xla", is_causal=True,
        local_window_size=(window - 1, 0))), None
  if impl == "cudnn_causal":
    return (lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="cudnn", is_causal=True)), None
  choice = _tokamax_impl()
  if choice is None:
    return None, "tokamax not installed (pip install tokamax)"
  import tokamax  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  # tokamax reads its absl flags from sys.argv, which holds our own flags.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return (lambda q, k, v: tokamax.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=(window - 1, 0),
      implementation=choice)), None


def _with_grad(fn):
  def fwd_bwd(q, k, v, d_out):
    out, vjp = jax.vjp(fn, q, k, v)
    return vjp(d_out.astype(out.dtype))
  return fwd_bwd


def matmul_rate(flops: float, dtype, repeats: int) -> float:
  """FLOP/s of one plain [M, 1024] x [1024, 1024] matmul of ~`flops` FLOPs."""
  m = max(128, int(flops / (2 * 1024 * 1024)))
  a = jnp.ones((m, 1024), dtype)
  b = jnp.ones((1024, 1024), dtype)
  timing = common.time_fn(lambda a, b: a @ b, a, b, repeats=repeats)
  return 2 * m * 1024 * 1024 / timing.median_s


def _too_large(impl, seq_len, args):
  """Why an O(T²) baseline is skipped at this size, or None."""
  score_bytes = 4 * args.batch * args.heads * seq_len * seq_len
  if impl == "dense" and score_bytes > args.max_dense_bytes:
    return f"skipped: one dense score array is {score_bytes / 2**30:.0f} GiB"
  if impl == "reference" and seq_len > args.max_reference_len:
    return f"skipped: reference only up to T={args.max_reference_len}"
  if (impl == "tokamax" and jax.default_backend() != "gpu"
      and seq_len > args.max_tokamax_cpu_len):
    return ("skipped: tokamax xla_chunked visits all T² chunks, "
            f"~{(seq_len / args.max_tokamax_cpu_len) ** 2:.0f}x its "
            f"T={args.max_tokamax_cpu_len} time")
  return None


def run_case(impl, mode, seq_len, window, args, inputs):
  """One row of the table (a dict); `time_s` None with `skipped` if not run."""
  row = dict(impl=impl, mode=mode, seq_len=seq_len, window=window)
  fn, reason = attention_fn(impl, window, args)
  if fn is not None:
    reason = _too_large(impl, seq_len, args)
    fn = None if reason else fn
  if fn is None:
    return dict(row, time_s=None, skipped=reason)
  q, k, v, d_out = inputs
  try:
    if mode == "fwd":
      timing = common.time_fn(fn, q, k, v, repeats=args.repeats)
    else:
      timing = common.time_fn(_with_grad(fn), q, k, v, d_out,
                              repeats=args.repeats)
  except (NotImplementedError, ValueError, RuntimeError) as e:
    return dict(row, time_s=None, skipped=f"{type(e).__name__}: {e}"[:160])
  flops = 4 * in_window_pairs(seq_len, window) * args.head_dim * args.heads
  flops *= args.batch * (1.0 if mode == "fwd" else 3.5)
  return dict(row, time_s=timing.median_s, repeats=timing.repeats,
              tflops=flops / timing.median_s / 1e12,
              temp_mib=None if timing.temp_bytes is None
              else timing.temp_bytes / 2**20,
              peak_device_mib=None if common.peak_device_bytes() is None
              else common.peak_device_bytes() / 2**20)


def make_inputs(seq_len, args):
  dtype = DTYPES[args.dtype]
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (args.batch, seq_len, args.heads,
                                  args.head_dim), dtype)
  kv_shape = (args.batch, seq_len, args.kv_heads, args.head_dim)
  k = jax.random.normal(keys[1], kv_shape, dtype)
  v = jax.random.normal(keys[2], kv_shape, dtype)
  d_out = jax.random.normal(keys[3], q.shape, dtype)
  return q, k, v, d_out


def run(args) -> dict:
  rows, rates = [], {}
  for seq_len in args.seq_lens:
    inputs = make_inputs(seq_len, args)
    for window in args.windows:
      fwd_flops = 4 * in_window_pairs(seq_len, window) * args.head_dim * (
          args.heads * args.batch)
      rate = matmul_rate(fwd_flops, DTYPES[args.dtype], args.repeats)
      rates[f"{seq_len}/{window}"] = rate
      for mode in args.modes:
        case = [run_case(impl, mode, seq_len, window, args, inputs)
                for impl in args.impls]
        dense = next((r["time_s"] for r in case if r["impl"] == "dense"), None)
        for r in case:
          if r["time_s"] is not None:
            r["matmul_fraction"] = r["tflops"] * 1e12 / rate
            if dense is not None:
              r["speedup_vs_dense"] = dense / r["time_s"]
          print(_row_line(r), flush=True)
        rows += case
  return dict(machine=common.machine_info(), config=vars(args),
              matmul_flops_per_s=rates, results=rows)


def _row_line(r):
  if r["time_s"] is None:
    return f"{r['impl']:>13} {r['mode']:>7} T={r['seq_len']} W={r['window']}: {r['skipped']}"
  return (f"{r['impl']:>13} {r['mode']:>7} T={r['seq_len']} W={r['window']}: "
          f"{r['time_s'] * 1e3:.2f} ms, {r['tflops']:.4f} TFLOP/s")


COLUMNS = [("impl", "impl"), ("mode", "mode"), ("seq_len", "T"),
           ("window", "W"), ("time_s", "time (s)"), ("tflops", "TFLOP/s"),
           ("matmul_fraction", "of matmul rate"), ("temp_mib", "temp MiB"),
           ("peak_device_mib", "device peak MiB"),
           ("speedup_vs_dense", "x dense"), ("skipped", "note")]


def plot(payload: dict, path: str) -> None:
  """Log-log fwd+bwd (else fwd) time vs seq_len, one line per impl/window."""
  # A pyplot-free Figure: no global backend switch (safe inside notebooks).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  rows = [r for r in payload["results"] if r["time_s"] is not None]
  mode = "fwd+bwd" if any(r["mode"] == "fwd+bwd" for r in rows) else "fwd"
  fig = Figure(figsize=(6, 4.5))
  ax = fig.subplots()
  lines = sorted({(r["impl"], r["window"]) for r in rows if r["mode"] == mode})
  for impl, window in lines:
    pts = sorted((r["seq_len"], r["time_s"]) for r in rows
                 if (r["impl"], r["window"], r["mode"]) == (impl, window, mode))
    ax.loglog(*zip(*pts), marker="o", label=f"{impl} (W={window})")
  m = payload["machine"]
  ax.set_xlabel("seq_len")
  ax.set_ylabel(f"{mode} time (s)")
  ax.set_title(f"attention {mode}, {payload['config']['dtype']}, "
               f"{m['device']} ({m['nproc']} cores)", fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv) -> int:
  args = parse_args(argv)
  payload = run(args)
  m = payload["machine"]
  print(f"\n{m['date']} | jax {m['jax']} | {m['backend']} {m['device']} | "
        f"{m['nproc']} cores, {m['cpu']}")
  print(f"{args.dtype}, B={args.batch}, N={args.heads}, K={args.kv_heads}, "
        f"H={args.head_dim}; matmul rate (TFLOP/s): " + ", ".join(
            f"{key}: {rate / 1e12:.3f}"
            for key, rate in payload["matmul_flops_per_s"].items()))
  print(common.format_table(payload["results"], COLUMNS))
  if args.out:
    common.write_json(args.out, payload)
  if args.plot:
    plot(payload, args.plot)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

"""`swajax bench attention`: the op's impls against dense and tokamax baselines.

For each (seq_len, window) it times the forward and forward+backward (grad of
<out, cotangent> in q, k, v) of every requested impl, and reports:

- time (median; see swajax.cli.bench.common), effective TFLOP/s counting only
  in-window (query, key) pairs: fwd 4·pairs·H·N·B, fwd+bwd 3.5x that;
- XLA's compiled temp bytes (and the GPU's peak bytes in use, cumulative);
- the speedup over the dense baseline `jax.nn.dot_product_attention(
  implementation="xla", is_causal=True, local_window_size=(W - 1, 0))`;
- the fraction of this machine's plain matmul rate (same dtype, same FLOPs as
  the forward) that each impl reaches.

Impls: xla, pallas (GPU), mosaic (GPU, bf16/fp16), cudnn (GPU, bf16/fp16),
reference (short sequences), dense (the baseline above), cudnn_causal (GPU:
cuDNN causal flash without a window, the "ignore the window" speed bound),
tokamax (if installed: its chunked XLA path on CPU, its GPU kernels on GPU).
A case that cannot run here is listed with the reason instead of a time.

From Python: `benchmark(seq_lens=..., windows=..., impls=..., ...)` returns the
payload that `swajax bench attention --out FILE` writes (the CLI is a thin
layer over it; `Settings` holds the one set of defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys

import jax
import jax.numpy as jnp

from pallas_kernels import sliding_window_attention
from swajax.cli.bench import common
from swajax.dtypes import DTYPES

ALL_IMPLS = ("xla", "pallas", "mosaic", "cudnn", "reference", "dense",
             "cudnn_causal", "tokamax")
MODES = ("fwd", "fwd+bwd")
# The sizes that depend on the backend: long bf16 sequences on a GPU, short
# fp32 ones on a CPU.
BACKEND_DEFAULTS = {
    "gpu": dict(seq_lens=(8192, 32768, 131072), windows=(4096,),
                dtype="bfloat16", heads=32, head_dim=128),
    "cpu": dict(seq_lens=(2048, 8192, 32768), windows=(512,), dtype="float32",
                heads=8, head_dim=64),
}
# `--smoke`: tiny sizes, seconds on a CPU (for tests); other flags still apply.
SMOKE = dict(seq_lens=(128,), windows=(16,), heads=2, kv_heads=1, head_dim=16,
             repeats=1)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `benchmark` measures. None: this backend's `BACKEND_DEFAULTS`.

  Inputs are q [B, T, N, H], k and v [B, T, K, H] (T = S = each seq_len),
  random normal in `dtype`; every impl runs with a causal window W.
  """

  seq_lens: tuple[int, ...] | None = None   # T
  windows: tuple[int, ...] | None = None    # W
  dtype: str | None = None                  # "float32" | "bfloat16" | "float16"
  batch: int = 1                            # B
  heads: int | None = None                  # N
  kv_heads: int = 8                         # K, N % K == 0
  head_dim: int | None = None               # H
  impls: tuple[str, ...] = ALL_IMPLS
  modes: tuple[str, ...] = MODES
  repeats: int = 3                          # timed runs (median) after warm-up
  # The O(T²) baselines are skipped (with the reason) past these sizes: one
  # fp32 [B, N, T, S] score array of dense/reference over `max_dense_bytes`;
  # reference past `max_reference_len`; tokamax on CPU past `max_tokamax_cpu_len`.
  max_dense_bytes: float = 4 * 2**30
  max_reference_len: int = 4096
  max_tokamax_cpu_len: int = 8192

  def __post_init__(self):
    backend = "gpu" if jax.default_backend() == "gpu" else "cpu"
    for name, value in BACKEND_DEFAULTS[backend].items():
      if getattr(self, name) is None:
        object.__setattr__(self, name, value)
    for name, choices in (("seq_lens", None), ("windows", None),
                          ("impls", ALL_IMPLS), ("modes", MODES)):
      value = getattr(self, name)
      if isinstance(value, (str, int)) or not value:
        raise ValueError(f"{name}={value!r}: expected a non-empty sequence")
      value = tuple(value)
      object.__setattr__(self, name, value)
      if choices is None and not all(_is_positive_int(v) for v in value):
        raise ValueError(f"{name}={value!r}: expected ints >= 1")
      if choices is not None and set(value) - set(choices):
        raise ValueError(f"{name}={value!r}: expected entries from {choices}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r}: expected one of {sorted(DTYPES)}")
    for name in ("batch", "heads", "kv_heads", "head_dim", "repeats",
                 "max_reference_len", "max_tokamax_cpu_len"):
      if not _is_positive_int(getattr(self, name)):
        raise ValueError(f"{name}={getattr(self, name)!r}: expected an int >= 1")
    if self.heads % self.kv_heads:
      raise ValueError(f"heads={self.heads}, kv_heads={self.kv_heads}: expected "
                       "heads to be a multiple of kv_heads (GQA)")
    if (isinstance(self.max_dense_bytes, bool)
        or not isinstance(self.max_dense_bytes, (int, float))
        or self.max_dense_bytes <= 0):
      raise ValueError(f"max_dense_bytes={self.max_dense_bytes!r}: expected a "
                       "number > 0")


def _is_positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _default_text(field: dataclasses.Field) -> str:
  if field.default is not None:
    return f"default: {field.default!r}"
  gpu, cpu = (BACKEND_DEFAULTS[b][field.name] for b in ("gpu", "cpu"))
  return f"default: {gpu!r} on a GPU, else {cpu!r}"


def parse_args(argv) -> tuple[dict, argparse.Namespace]:
  """(keyword arguments of `benchmark`, the namespace with `out` and `plot`).

  Every `Settings` field is a flag (`seq_lens` -> `--seq-lens`); a flag not
  given takes the field's default. Bad values exit with status 2.
  """
  parser = argparse.ArgumentParser(
      prog="swajax bench attention", description=__doc__.split("\n")[0])
  choices = {"dtype": sorted(DTYPES), "impls": ALL_IMPLS, "modes": MODES}
  for field in dataclasses.fields(Settings):
    many = field.name in ("seq_lens", "windows", "impls", "modes")
    kind = {"dtype": str, "impls": str, "modes": str,
            "max_dense_bytes": float}.get(field.name, int)
    parser.add_argument("--" + field.name.replace("_", "-"), type=kind,
                        nargs="+" if many else None,
                        choices=choices.get(field.name),
                        default=argparse.SUPPRESS, help=_default_text(field))
  parser.add_argument("--out", help="write the results as JSON here")
  parser.add_argument("--plot", help="write a log-log time-vs-seq_len PNG here")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes (seconds), for tests; the flags given "
                      "with it still apply")
  args = parser.parse_args(argv)
  names = {f.name for f in dataclasses.fields(Settings)}
  settings = {**(SMOKE if args.smoke else {}),
              **{k: v for k, v in vars(args).items() if k in names}}
  try:
    Settings(**settings)
  except ValueError as e:
    parser.error(str(e))
  return settings, args


def in_window_pairs(seq_len: int, window: int) -> int:
  """Visible (query, key) pairs of a causal window W over T = S = seq_len."""
  w = min(window, seq_len)
  return w * (w + 1) // 2 + (seq_len - w) * w


def _tokamax_impl():
  """tokamax's implementation choice here, or None with why in `skip`."""
  if importlib.util.find_spec("tokamax") is None:
    return None
  return ("mosaic", "triton") if jax.default_backend() == "gpu" else "xla_chunked"


def attention_fn(impl: str, window: int, settings):
  """(callable (q, k, v) -> out, None) or (None, reason it cannot run here)."""
  on_gpu = jax.default_backend() == "gpu"
  low_precision = settings.dtype != "float32"
  if impl in ("pallas", "mosaic", "cudnn", "cudnn_causal") and not on_gpu:
    return None, "needs a GPU"
  if impl in ("cudnn", "cudnn_causal") and not low_precision:
    return None, "cuDNN takes bf16/fp16 only"
  if impl in ("xla", "pallas", "mosaic", "cudnn", "reference"):
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
  # Lazy: tokamax is optional (the `bench` extra) and brings absl with it.
  import tokamax  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  # tokamax reads its absl flags from sys.argv, which holds our own flags.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return (lambda q, k, v: tokamax.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=(window - 1, 0),
      implementation=choice)), None


def with_grad(fn):
  """fn(q, k, v) -> out  to  (q, k, v, d_out) -> (dq, dk, dv): fwd + bwd."""
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


def _too_large(impl, seq_len, settings):
  """Why an O(T²) baseline is skipped at this size, or None."""
  score_bytes = 4 * settings.batch * settings.heads * seq_len * seq_len
  if impl == "dense" and score_bytes > settings.max_dense_bytes:
    return f"skipped: one dense score array is {score_bytes / 2**30:.0f} GiB"
  if impl == "reference" and seq_len > settings.max_reference_len:
    return f"skipped: reference only up to T={settings.max_reference_len}"
  if (impl == "tokamax" and jax.default_backend() != "gpu"
      and seq_len > settings.max_tokamax_cpu_len):
    return ("skipped: tokamax xla_chunked visits all T² chunks, "
            f"~{(seq_len / settings.max_tokamax_cpu_len) ** 2:.0f}x its "
            f"T={settings.max_tokamax_cpu_len} time")
  return None


def run_case(impl, mode, seq_len, window, settings, inputs):
  """One row of the table (a dict); `time_s` None with `skipped` if not run."""
  row = dict(impl=impl, mode=mode, seq_len=seq_len, window=window)
  fn, reason = attention_fn(impl, window, settings)
  if fn is not None:
    reason = _too_large(impl, seq_len, settings)
    fn = None if reason else fn
  if fn is None:
    return dict(row, time_s=None, skipped=reason)
  q, k, v, d_out = inputs
  try:
    if mode == "fwd":
      timing = common.time_fn(fn, q, k, v, repeats=settings.repeats)
    else:
      timing = common.time_fn(with_grad(fn), q, k, v, d_out,
                              repeats=settings.repeats)
  except Exception as e:  # pylint: disable=broad-except
    # A kernel this GPU or jax cannot compile (Pallas' LoweringError is a
    # plain Exception) is a row with its reason, not the end of the table.
    return dict(row, time_s=None, skipped=f"{type(e).__name__}: {e}"[:160])
  flops = 4 * in_window_pairs(seq_len, window) * settings.head_dim * (
      settings.heads * settings.batch * (1.0 if mode == "fwd" else 3.5))
  return dict(row, time_s=timing.median_s, repeats=timing.repeats,
              tflops=flops / timing.median_s / 1e12,
              temp_mib=None if timing.temp_bytes is None
              else timing.temp_bytes / 2**20,
              peak_device_mib=None if common.peak_device_bytes() is None
              else common.peak_device_bytes() / 2**20)


def make_inputs(seq_len, settings):
  dtype = DTYPES[settings.dtype]
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (settings.batch, seq_len, settings.heads,
                                  settings.head_dim), dtype)
  kv_shape = (settings.batch, seq_len, settings.kv_heads, settings.head_dim)
  k = jax.random.normal(keys[1], kv_shape, dtype)
  v = jax.random.normal(keys[2], kv_shape, dtype)
  d_out = jax.random.normal(keys[3], q.shape, dtype)
  return q, k, v, d_out


def benchmark(**settings) -> dict:
  """Times every (seq_len, window, mode, impl) case; returns the JSON payload.

  Keyword arguments: the fields of `Settings` (e.g. `seq_lens=(512, 1024),
  windows=(128,), impls=("xla", "dense"), modes=("fwd",), dtype="float32"`);
  the others take its defaults. Prints one line per case as it goes.

  Returns {"machine": `common.machine_info()`, "config": the resolved
  settings, "matmul_flops_per_s": {"T/W": this machine's matmul FLOP/s at the
  forward's FLOPs}, "results": one dict per case with impl, mode, seq_len,
  window and time_s (None, with the reason in `skipped`, for a case that cannot
  run here), else repeats, tflops, temp_mib, peak_device_mib,
  matmul_fraction and speedup_vs_dense}: what `--out FILE` writes.
  """
  settings = Settings(**settings)
  rows, rates = [], {}
  for seq_len in settings.seq_lens:
    inputs = make_inputs(seq_len, settings)
    for window in settings.windows:
      fwd_flops = 4 * in_window_pairs(seq_len, window) * settings.head_dim * (
          settings.heads * settings.batch)
      rate = matmul_rate(fwd_flops, DTYPES[settings.dtype], settings.repeats)
      rates[f"{seq_len}/{window}"] = rate
      for mode in settings.modes:
        case = [run_case(impl, mode, seq_len, window, settings, inputs)
                for impl in settings.impls]
        dense = next((r["time_s"] for r in case if r["impl"] == "dense"), None)
        for r in case:
          if r["time_s"] is not None:
            r["matmul_fraction"] = r["tflops"] * 1e12 / rate
            if dense is not None:
              r["speedup_vs_dense"] = dense / r["time_s"]
          print(_row_line(r), flush=True)
        rows += case
  return dict(machine=common.machine_info(),
              config=dataclasses.asdict(settings),
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
  # Lazy: matplotlib takes ~0.8 s to import, which only --plot needs (this
  # module is imported by every `swajax` command). A pyplot-free Figure: no
  # global backend switch (safe inside notebooks).
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
  settings, args = parse_args(argv)
  payload = benchmark(**settings)
  m, config = payload["machine"], payload["config"]
  print(f"\n{m['date']} | jax {m['jax']} | {m['backend']} {m['device']} | "
        f"{m['nproc']} cores, {m['cpu']}")
  print(f"{config['dtype']}, B={config['batch']}, N={config['heads']}, "
        f"K={config['kv_heads']}, H={config['head_dim']}; matmul rate "
        "(TFLOP/s): " + ", ".join(
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

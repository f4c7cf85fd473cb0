"""`swajax bench context`: what context parallelism moves and holds per device,
the halo scheme (sliding layers) vs a ring over the same axis.

For each T: one sliding layer's `context_parallel_attention` (causal window W)
over a P-device "context" mesh axis, compiled for the forward and for the
forward + backward (grads of q, k, v), once with `kv_exchange="halo"` and once
with `kv_exchange="ring"` (what ring-attention stacks do). Nothing runs: the
figures come from the compiled programs. Bytes sent per device: the sum of
the result shapes of the HLO's collective-permutes (each device sends at most
one block per permute; any all-gather / all-to-all / reduction would be
counted too and is reported per kind: there is none). Memory: XLA's
temp allocation of the per-device program (activations and scratch; the
inputs and outputs are the same for both schemes). On CPU the devices are
simulated (`--xla_force_host_platform_device_count`): the command reruns
itself in a subprocess with P host devices when the backend has fewer.
Prints a table, writes JSON and a PNG of bytes vs T.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType

from pallas_kernels import context_parallel_attention
from swajax.cli.bench import common
from swajax.dtypes import DTYPES

COLUMNS = [("seq_len", "T"), ("window", "W"), ("devices", "P"),
           ("halo_fwd_bytes", "halo fwd bytes/device"),
           ("ring_fwd_bytes", "ring fwd bytes/device"),
           ("halo_train_bytes", "halo fwd+bwd bytes"),
           ("ring_train_bytes", "ring fwd+bwd bytes"),
           ("halo_temp_mib", "halo fwd+bwd temp MiB"),
           ("ring_temp_mib", "ring fwd+bwd temp MiB")]
# "%x = f32[1,32,2,16]{...} collective-permute(" or a tuple result "(f32[..], ..)".
_COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(collective-permute|all-gather|all-to-all|all-reduce|"
    r"reduce-scatter)(-start)?\(")
_SHAPE = re.compile(r"(pred|[a-z]+\d+)\[([\d,]*)\]")
_BITS = re.compile(r"\d+$")  # f32 -> 32; pred is one byte


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="swajax bench context",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--seq-lens", type=int, nargs="+",
                      default=[8192, 16384, 32768, 65536])
  parser.add_argument("--window", type=int, default=512)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batch-size", type=int, default=1)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--head-dim", type=int, default=64)
  # float32: XLA CPU moves 16-bit collectives as float32 anyway.
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
  parser.add_argument("--impl", default="xla")
  parser.add_argument("--out", default=None,
                      help="write the table as JSON here (default: print only)")
  parser.add_argument("--plot", default=None,
                      help="write a PNG of bytes vs T here (default: none)")
  return parser.parse_args(argv)


def collective_bytes(hlo_text: str, devices: int) -> dict[str, int]:
  """Bytes one device sends, per collective kind, in a compiled HLO text.

  collective-permute: its result (the block each device sends); reduce-
  scatter: (devices - 1) results; all-gather / all-to-all / all-reduce:
  (devices - 1) / devices of the result (the least any algorithm sends).
  """
  sent: dict[str, int] = {}
  for match in _COLLECTIVE.finditer(hlo_text):
    shapes, kind, started = match.group(1), match.group(2), match.group(3)
    arrays = _SHAPE.findall(shapes)
    if started:  # (operand, result, ...) of an async start: count one
      arrays = arrays[:1]
    size = sum((1 if dtype == "pred" else int(_BITS.search(dtype).group()) // 8)
               * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
               for dtype, dims in arrays)
    if kind == "reduce-scatter":
      size *= devices - 1
    elif kind != "collective-permute":
      size = size * (devices - 1) // devices
    sent[kind] = sent.get(kind, 0) + size
  return sent


def measure(seq_len: int, args, mesh) -> dict:
  """One row: bytes and temp memory of the halo and ring schemes at seq_len."""
  dtype = DTYPES[args.dtype]
  q = jax.ShapeDtypeStruct((args.batch_size, seq_len, args.heads, args.head_dim), dtype)
  kv = jax.ShapeDtypeStruct((args.batch_size, seq_len, args.kv_heads, args.head_dim),
                            dtype)
  row = dict(seq_len=seq_len, window=args.window, devices=args.devices)
  for scheme in ("halo", "ring"):
    def forward(q, k, v, scheme=scheme):
      return context_parallel_attention(q, k, v, mesh=mesh, window=args.window,
                                        impl=args.impl, kv_exchange=scheme)

    def train(q, k, v, forward=forward):
      return jax.grad(lambda *x: jnp.sum(forward(*x).astype(jnp.float32)),
                      argnums=(0, 1, 2))(q, k, v)

    for name, fn in (("fwd", forward), ("train", train)):
      compiled = jax.jit(fn).lower(q, kv, kv).compile()
      sent = collective_bytes(compiled.as_text(), args.devices)
      row[f"{scheme}_{name}_bytes"] = sum(sent.values())
      row[f"{scheme}_{name}_collectives"] = sent
      if name == "train":
        temp = common.temp_bytes(compiled)
        row[f"{scheme}_temp_mib"] = None if temp is None else temp / 2**20
  return row


def plot(payload: dict, path: str) -> None:
  """Log-log bytes sent per device per layer (fwd) vs T, halo vs ring."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  rows, config = payload["rows"], payload["args"]
  fig = Figure(figsize=(6, 4.5))
  ax = fig.subplots()
  for scheme, label in (("halo", "halo (ppermute of W-1 keys)"),
                        ("ring", "ring (every K/V block)")):
    ax.loglog([r["seq_len"] for r in rows], [r[f"{scheme}_fwd_bytes"] for r in rows],
              marker="o", label=label)
  ax.set_xlabel("T (tokens, split over %d devices)" % config["devices"])
  ax.set_ylabel("bytes sent per device per layer (forward)")
  ax.set_title(f"context parallelism, W={config['window']}, K={config['kv_heads']}, "
               f"H={config['head_dim']}, {config['dtype']}", fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  if jax.device_count() < args.devices:
    if jax.default_backend() != "cpu":
      print(f"devices={args.devices}: this backend has {jax.device_count()}",
            file=sys.stderr)
      return 2
    flags = f"--xla_force_host_platform_device_count={args.devices}"
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}"}
    return subprocess.run([sys.executable, "-m", "swajax.cli.bench", "context", *argv],
                          env=env, check=False).returncode
  mesh = jax.make_mesh((args.devices,), ("context",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:args.devices])
  rows = [measure(t, args, mesh) for t in args.seq_lens]
  print(common.format_table(rows, COLUMNS))
  payload = dict(benchmark="context", machine=common.machine_info(), args=vars(args),
                 rows=rows)
  if args.out:
    common.write_json(args.out, payload)
    print(f"wrote {args.out}")
  if args.plot:
    plot(payload, args.plot)
    print(f"wrote {args.plot}")
  return 0

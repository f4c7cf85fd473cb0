"""`swajax bench moe`: the mixture-of-experts dispatch, `models.moe.MoE`'s
blocked einsum against three alternatives.

For each case (N tokens, D, F, E experts, k per token) one `MoE` layer of the
preset (gpt_oss_tiny: clamped SwiGLU experts with biases; or mixtral_tiny),
random normal x [1, N, D] in `dtype`, the forward and the forward + backward
(grads of <y, cotangent> in every parameter and x) of four dispatches, each
after the same router (`models.moe.route`):

- blocked: `MoE.experts` (what the model runs), the assignments sorted by
  expert, padded to whole blocks per expert, one batched einsum with each
  block's expert weights;
- ragged: the same sorted groups through `jax.lax.ragged_dot` (on CPU and
  GPU, jax 0.10-0.12 lower it to a dense dot over an [E, A, D] padded copy);
- dense: every token through every expert ([N, E, 2, F] activations), the
  outputs weighted by w (0 for the experts not picked): E/k times the FLOPs;
- capacity: each expert's rows in an [E, C, D] buffer, C = ceil(
  capacity_factor · N·k / E), the rows past C dropped (inexact: the
  dropped share is reported), then one batched einsum.

Timing per `swajax.cli.bench.common` (compile, warm up, median); temp memory
from XLA's memory analysis of the forward + backward. `max_abs_diff` is each
output against blocked's. Prints a table; writes JSON only with `--out`, a PNG
with `--plot`. From Python: `benchmark(cases=..., ...)` returns the payload.
"""

from __future__ import annotations

import argparse
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from models.layers import gated_activation
from models.moe import MoE, combine, route, sort_assignments
from swajax.cli.bench import common
from swajax.dtypes import DTYPES

DISPATCHES = ("blocked", "ragged", "dense", "capacity")
PRESETS = ("gpt_oss_tiny", "mixtral_tiny")
# (N, D, F, E, k): the preset's own sizes, then 2048 tokens at two widths of E.
DEFAULT_CASES = ((512, 256, 384, 4, 2), (2048, 512, 1024, 8, 2),
                 (2048, 512, 1024, 32, 2), (2048, 512, 1024, 32, 4))
SMOKE_CASES = ((32, 16, 8, 4, 2),)
COLUMNS = [("tokens", "N"), ("hidden", "D"), ("intermediate", "F"),
           ("experts", "E"), ("per_token", "k"), ("dispatch", "dispatch"),
           ("fwd_ms", "fwd ms"), ("fwd_bwd_ms", "fwd+bwd ms"),
           ("fwd_vs_blocked", "fwd time / blocked"),
           ("fwd_bwd_vs_blocked", "fwd+bwd time / blocked"),
           ("temp_mib", "fwd+bwd temp MiB"), ("max_abs_diff", "max abs diff vs blocked"),
           ("dropped", "dropped share"), ("repeats", "runs")]


def _params(moe: MoE):
  """The expert arrays in the compute dtype (biases None when absent)."""
  cast = lambda p: None if p is None else p[...].astype(moe.dtype)
  return (cast(moe.gate_up), cast(moe.gate_up_bias), cast(moe.down),
          cast(moe.down_bias))


def dense_experts(moe: MoE, x, weights, experts):
  """x [N, D] through all E experts, weighted by w (0 off the k picked)."""
  gate_up, gate_up_bias, down, down_bias = _params(moe)
  e = gate_up.shape[0]
  w = jnp.sum(jax.nn.one_hot(experts, e) * weights[..., None], axis=1)  # (N, E)
  h = jnp.einsum("ND,EDGF->NEGF", x, gate_up)
  if gate_up_bias is not None:
    h = h + gate_up_bias
  act = gated_activation(moe.kind, h[:, :, 0], h[:, :, 1], alpha=moe.alpha,
                         limit=moe.limit)  # (N, E, F)
  out = jnp.einsum("NEF,EFD->NED", act, down)
  if down_bias is not None:
    out = out + down_bias
  return jnp.einsum("NED,NE->ND", out.astype(jnp.float32), w).astype(moe.dtype)


def capacity_experts(moe: MoE, x, weights, experts, *, capacity: int):
  """Each expert's first `capacity` assignments (in token order) in an
  [E, C, D] buffer; the rest dropped (their output 0)."""
  gate_up, gate_up_bias, down, down_bias = _params(moe)
  e = gate_up.shape[0]
  k = experts.shape[1]
  order, expert_of, group_sizes = sort_assignments(experts, e)
  starts = jnp.cumsum(group_sizes) - group_sizes
  slot = jnp.arange(order.shape[0]) - starts[expert_of]  # row within its expert
  rows = jnp.repeat(x, k, axis=0)[order]
  buffer = jnp.zeros((e, capacity, x.shape[1]), x.dtype).at[expert_of, slot].set(
      rows, mode="drop")
  h = jnp.einsum("ECD,EDGF->ECGF", buffer, gate_up)
  if gate_up_bias is not None:
    h = h + gate_up_bias[:, None]
  act = gated_activation(moe.kind, h[:, :, 0], h[:, :, 1], alpha=moe.alpha,
                         limit=moe.limit)  # (E, C, F)
  out = jnp.einsum("ECF,EFD->ECD", act, down)
  if down_bias is not None:
    out = out + down_bias[:, None]
  out = out.at[expert_of, slot].get(mode="fill", fill_value=0)  # (A, D)
  return combine(out, order, weights).astype(moe.dtype)


def ragged_experts(moe: MoE, x, weights, experts):
  """The sorted groups through `jax.lax.ragged_dot` (group_sizes: the
  expert counts)."""
  gate_up, gate_up_bias, down, down_bias = _params(moe)
  e, d, _, f = gate_up.shape
  n, k = experts.shape
  order, expert_of, group_sizes = sort_assignments(experts, e)
  rows = jnp.repeat(x, k, axis=0)[order]  # (A, D)
  h = jax.lax.ragged_dot(rows, gate_up.reshape(e, d, 2 * f),
                         group_sizes).reshape(n * k, 2, f)
  if gate_up_bias is not None:
    h = h + gate_up_bias[expert_of]
  act = gated_activation(moe.kind, h[:, 0], h[:, 1], alpha=moe.alpha,
                         limit=moe.limit)  # (A, F)
  out = jax.lax.ragged_dot(act, down, group_sizes)  # (A, D)
  if down_bias is not None:
    out = out + down_bias[expert_of]
  return combine(out, order, weights).astype(moe.dtype)


def _check(cases, dispatches, preset, dtype, repeats, capacity_factor):
  if not cases or any(len(c) != 5 or not all(isinstance(v, int) and v >= 1
                                             for v in c) for c in cases):
    raise ValueError(f"cases={cases!r}: expected (N, D, F, E, k) tuples of "
                     "ints >= 1")
  if any(c[4] > c[3] for c in cases):
    raise ValueError(f"cases={cases!r}: expected k <= E in each (N, D, F, E, k)")
  if not dispatches or set(dispatches) - set(DISPATCHES):
    raise ValueError(f"dispatches={dispatches!r}: expected entries from "
                     f"{DISPATCHES}")
  if preset not in PRESETS:
    raise ValueError(f"preset={preset!r}: expected one of {PRESETS}")
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
  if not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f"repeats={repeats!r}: expected an int >= 1")
  if not capacity_factor > 0:
    raise ValueError(f"capacity_factor={capacity_factor!r}: expected > 0")


def measure_case(case, *, dispatches, preset, dtype, repeats,
                 capacity_factor) -> list[dict]:
  """One row per dispatch for case (N, D, F, E, k)."""
  n, d, f, e, k = case
  config = getattr(models, preset)(hidden_size=d, intermediate_size=f,
                                   num_experts=e, experts_per_token=k)
  compute = DTYPES[dtype]
  moe = MoE(config, dtype=compute, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(moe)
  keys = jax.random.split(jax.random.key(1))
  x = jax.random.normal(keys[0], (1, n, d), compute)
  cotangent = jax.random.normal(keys[1], (1, n, d), jnp.float32)
  capacity = math.ceil(capacity_factor * n * k / e)
  variants = {"blocked": MoE.experts, "ragged": ragged_experts,
              "dense": dense_experts,
              "capacity": lambda *a: capacity_experts(*a, capacity=capacity)}

  def forward_of(dispatch):
    def forward(params, x):
      module = nnx.merge(graphdef, params)
      weights, experts = route(module.router(x), k)
      return dispatch(module, x.reshape(n, d), weights.reshape(n, k),
                      experts.reshape(n, k)).reshape(1, n, d)
    return forward

  _, experts = route(moe.router(x), k)
  counts = np.bincount(np.asarray(experts).reshape(-1), minlength=e)
  dropped = float(np.maximum(counts - capacity, 0).sum() / (n * k))
  reference = jax.jit(forward_of(MoE.experts))(params, x).astype(jnp.float32)
  rows = []
  for name in dispatches:
    forward = forward_of(variants[name])

    def train(params, x, forward=forward):
      loss = lambda p, x: jnp.sum(forward(p, x).astype(jnp.float32) * cotangent)
      return jax.grad(loss, argnums=(0, 1))(params, x)

    print(f"timing {name} (N={n}, D={d}, F={f}, E={e}, k={k})...",
          file=sys.stderr, flush=True)
    fwd = common.time_fn(forward, params, x, repeats=repeats)
    fwd_bwd = common.time_fn(train, params, x, repeats=repeats)
    y = jax.jit(forward)(params, x).astype(jnp.float32)
    rows.append(dict(
        tokens=n, hidden=d, intermediate=f, experts=e, per_token=k,
        dispatch=name, fwd_ms=fwd.median_s * 1e3,
        fwd_bwd_ms=fwd_bwd.median_s * 1e3,
        temp_mib=None if fwd_bwd.temp_bytes is None else fwd_bwd.temp_bytes / 2**20,
        max_abs_diff=float(jnp.max(jnp.abs(y - reference))),
        capacity=capacity if name == "capacity" else None,
        dropped=dropped if name == "capacity" else None,
        repeats=min(fwd.repeats, fwd_bwd.repeats)))
  for row in rows:
    base = next((r for r in rows if r["dispatch"] == "blocked"), None)
    row["fwd_vs_blocked"] = None if base is None else row["fwd_ms"] / base["fwd_ms"]
    row["fwd_bwd_vs_blocked"] = (None if base is None
                                 else row["fwd_bwd_ms"] / base["fwd_bwd_ms"])
  return rows


def benchmark(*, cases=DEFAULT_CASES, dispatches=DISPATCHES,
              preset: str = "gpt_oss_tiny", dtype: str = "float32",
              repeats: int = 3, capacity_factor: float = 1.25) -> dict:
  """Measures every case × dispatch; returns the payload `--out` writes
  (machine, settings, rows). ValueError for a bad setting."""
  cases = tuple(tuple(c) for c in cases)
  dispatches = tuple(dispatches)
  _check(cases, dispatches, preset, dtype, repeats, capacity_factor)
  settings = dict(cases=cases, dispatches=dispatches, preset=preset, dtype=dtype,
                  repeats=repeats, capacity_factor=capacity_factor)
  rows = [row for case in cases for row in measure_case(
      case, **{k: v for k, v in settings.items() if k != "cases"})]
  return dict(benchmark="moe", machine=common.machine_info(), settings=settings,
              rows=rows)


def plot(payload: dict, path: str) -> None:
  """Forward + backward ms per case, one bar per dispatch (log scale)."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  rows, settings = payload["rows"], payload["settings"]
  cases = [tuple(c) for c in settings["cases"]]
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  width = 0.8 / len(settings["dispatches"])
  for i, name in enumerate(settings["dispatches"]):
    times = [next(r["fwd_bwd_ms"] for r in rows if r["dispatch"] == name
                  and (r["tokens"], r["hidden"], r["intermediate"], r["experts"],
                       r["per_token"]) == c) for c in cases]
    ax.bar(np.arange(len(cases)) + i * width, times, width, label=name)
  ax.set_xticks(np.arange(len(cases)) + width * (len(settings["dispatches"]) - 1) / 2)
  ax.set_xticklabels([f"N{n} D{d} F{f}\nE{e} k{k}" for n, d, f, e, k in cases],
                     fontsize=7)
  ax.set_yscale("log")
  ax.set_ylabel("forward + backward ms")
  ax.set_title(f"MoE dispatch, {settings['preset']}, {settings['dtype']}, "
               f"{payload['machine']['backend']}", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="swajax bench moe",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--cases", nargs="+", default=None, metavar="N,D,F,E,k",
                      type=lambda s: tuple(int(v) for v in s.split(",")),
                      help="tokens, hidden, intermediate, experts, per token "
                      f"(default: {' '.join(','.join(map(str, c)) for c in DEFAULT_CASES)})")
  parser.add_argument("--smoke", action="store_true",
                      help="one tiny case, one run (tests)")
  parser.add_argument("--dispatches", nargs="+", choices=DISPATCHES,
                      default=list(DISPATCHES))
  parser.add_argument("--preset", choices=PRESETS, default="gpt_oss_tiny")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--capacity-factor", type=float, default=1.25)
  parser.add_argument("--out", default=None,
                      help="write the results as JSON here (default: print only)")
  parser.add_argument("--plot", default=None,
                      help="write a PNG of the fwd+bwd times here (default: none)")
  return parser.parse_args(argv)


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  cases = args.cases or (SMOKE_CASES if args.smoke else DEFAULT_CASES)
  try:
    payload = benchmark(cases=cases, dispatches=args.dispatches,
                        preset=args.preset, dtype=args.dtype,
                        repeats=1 if args.smoke else args.repeats,
                        capacity_factor=args.capacity_factor)
  except ValueError as e:
    print(f"swajax bench moe: {e}", file=sys.stderr)
    return 2
  print(common.format_table(payload["rows"], COLUMNS))
  if args.out:
    common.write_json(args.out, payload)
    print(f"wrote {args.out}", file=sys.stderr)
  if args.plot:
    plot(payload, args.plot)
    print(f"wrote {args.plot}", file=sys.stderr)
  return 0

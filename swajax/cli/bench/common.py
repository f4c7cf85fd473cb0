"""Shared benchmark plumbing: timing, memory, machine description, JSON, tables.

Timing rule for every swajax benchmark: compile ahead of time, run once as a
warm-up, then take the median of `repeats` runs, each ended by
`jax.block_until_ready`. A warm-up run slower than `slow_s` is itself the one
sample (reported as `repeats: 1`), so huge baselines stay affordable.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time

import jax

import models
from swajax.cli.train import parse_override


@dataclasses.dataclass(frozen=True)
class Timing:
  """Median seconds of the timed runs, and how many there were."""

  median_s: float
  repeats: int
  temp_bytes: int | None  # XLA's temp allocation of the compiled program


def compile_fn(fn, *args):
  """AOT-compiles `jax.jit(fn)` for `args`; returns the compiled callable."""
  return jax.jit(fn).lower(*args).compile()


def temp_bytes(compiled) -> int | None:
  """Temp buffer bytes from XLA's memory analysis (None if unreported)."""
  try:
    analysis = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):  # some backends don't say
    return None
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def time_fn(fn, *args, repeats: int = 5, slow_s: float = 5.0) -> Timing:
  """Compiles, warms up and times `fn(*args)`; see the module docstring."""
  compiled = compile_fn(fn, *args)
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  first = time.perf_counter() - start
  if first > slow_s:
    return Timing(first, 1, temp_bytes(compiled))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return Timing(statistics.median(times), repeats, temp_bytes(compiled))


def peak_device_bytes() -> int | None:
  """The device's peak bytes in use so far (GPU), or None where unreported."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_info() -> dict:
  """Date, jax version, backend, device kind, CPU count and model."""
  return dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      jax=jax.__version__,
      backend=jax.default_backend(),
      device=jax.devices()[0].device_kind,
      nproc=os.cpu_count(),
      cpu=_cpu_model(),
      python=platform.python_version(),
  )


def write_json(path: str, payload: dict) -> None:
  """Writes `payload` as indented JSON, creating the parent folder."""
  folder = os.path.dirname(path)
  if folder:
    os.makedirs(folder, exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2, default=str)
    f.write("\n")


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
  """A markdown table of `rows`; `columns` is [(key, header)], None -> "-"."""
  header = "| " + " | ".join(h for _, h in columns) + " |"
  rule = "|" + "|".join("---" for _ in columns) + "|"
  lines = [header, rule]
  for row in rows:
    cells = []
    for key, _ in columns:
      value = row.get(key)
      if value is None:
        cells.append("-")
      elif isinstance(value, float):
        cells.append(f"{value:.4g}")
      else:
        cells.append(str(value))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def add_model_overrides(parser) -> None:
  """--model-overrides KEY=VALUE ...: mistral_tiny fields, parsed as by
  `swajax train` (a Python literal, else a string)."""
  parser.add_argument("--model-overrides", nargs="+", default=[],
                      type=parse_override, metavar="KEY=VALUE",
                      help="mistral_tiny fields, e.g. num_layers=2")


def sliding_and_full(parser, overrides, window: int, **defaults):
  """(mistral_tiny(**defaults, **overrides) with every layer windowed by W,
  the same config with every window removed); a bad override exits through
  `parser.error` (status 2)."""
  try:
    base = models.mistral_tiny(**{**defaults, **dict(overrides)})
  except (TypeError, ValueError) as e:
    parser.error(f"--model-overrides: {e}")
  sliding = dataclasses.replace(base, layer_windows=(window,) * base.num_layers)
  return sliding, sliding.with_full_attention()

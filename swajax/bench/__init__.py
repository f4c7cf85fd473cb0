"""`swajax bench {attention,generate,train}`: one module per benchmark.

Each module exposes `main(argv: list[str]) -> int`; they are imported only
when asked for, so `swajax bench attention` never loads the model stack.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "attention": ("swajax.bench.attention",
                  "the op's impls vs dense and tokamax baselines"),
    "generate": ("swajax.bench.generate", "generation throughput"),
    "train": ("swajax.bench.train", "training step throughput"),
}


def usage() -> str:
  lines = ["usage: swajax bench {" + ",".join(BENCHMARKS) + "} [args...]", ""]
  lines += [f"  {name:<10} {help_}" for name, (_, help_) in BENCHMARKS.items()]
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(usage())
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in BENCHMARKS:
    print(f"swajax bench: unknown benchmark {name!r}\n\n{usage()}",
          file=sys.stderr)
    return 2
  return importlib.import_module(BENCHMARKS[name][0]).main(rest)

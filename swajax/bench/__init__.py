"""`swajax bench {attention,generate,train,tiles}`: one module per benchmark.

Each module exposes `main(argv: list[str]) -> int` and is imported only when
asked for.
"""

from __future__ import annotations

import sys

from swajax import cli

BENCHMARKS = {
    "attention": ("swajax.bench.attention",
                  "the op's impls vs dense and tokamax baselines"),
    "generate": ("swajax.bench.generate", "generation throughput"),
    "train": ("swajax.bench.train", "training step throughput"),
    "tiles": ("swajax.bench.tiles", "Pallas kernel times per BlockSizes "
              "variant (GPU tuning data)"),
}


def main(argv=None) -> int:
  return cli.dispatch("swajax bench", BENCHMARKS,
                      sys.argv[1:] if argv is None else list(argv))

"""`swajax bench {attention,generate,train,tiles}`: one module per benchmark.

Each module exposes `main(argv: list[str]) -> int`.
"""

from __future__ import annotations

import sys

from swajax.bench import attention, generate, tiles, train
from swajax.commands import Table, dispatch

BENCHMARKS: Table = {
    "attention": (attention.main,
                  "the op's impls vs dense and tokamax baselines"),
    "generate": (generate.main, "generation throughput"),
    "train": (train.main, "training step throughput"),
    "tiles": (tiles.main, "Pallas kernel times per FlashBlockSizes "
              "variant (GPU tuning data)"),
}


def main(argv=None) -> int:
  return dispatch("swajax bench", BENCHMARKS,
                  sys.argv[1:] if argv is None else list(argv))

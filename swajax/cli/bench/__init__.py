"""`swajax bench {attention,generate,train,dpo,tiles,context,moe,mosaic,serve}`: one module per benchmark.

Each module exposes `main(argv: list[str]) -> int`.
"""

from __future__ import annotations

import sys

from swajax.cli.bench import (attention, context, dpo, generate, moe, mosaic,
                               serve, tiles, train)
from swajax.cli.commands import Table, dispatch

BENCHMARKS: Table = {
    "attention": (attention.main,
                  "the op's impls vs dense and tokamax baselines"),
    "context": (context.main, "context parallelism: bytes and memory per device, "
                "halo vs ring"),
    "dpo": (dpo.main, "preference-tuning step (DPO, ORPO) vs SFT step: time and "
            "memory, full and LoRA"),
    "generate": (generate.main, "generation throughput"),
    "moe": (moe.main, "mixture-of-experts dispatch: the model's blocked "
            "einsum vs ragged_dot, dense, capacity-padded"),
    "mosaic": (mosaic.main, "impl='mosaic' vs Triton, cuDNN, tokamax: the "
               "Mosaic GPU kernels' table (GPU)"),
    "serve": (serve.main, "serving: continuous batching vs one request at a "
              "time, tokens/s and latency against concurrency"),
    "train": (train.main, "training step throughput"),
    "tiles": (tiles.main, "Pallas kernel times per FlashBlockSizes "
              "variant (GPU tuning data)"),
}


def main(argv=None) -> int:
  return dispatch("swajax bench", BENCHMARKS,
                  sys.argv[1:] if argv is None else list(argv))

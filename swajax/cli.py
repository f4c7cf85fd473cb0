"""`swajax` command line: one subcommand per user job, each in its own module.

  swajax train      -> swajax.train_cli.main
  swajax generate   -> swajax.generate_cli.main
  swajax bench ...  -> swajax.bench.main   (attention | generate | train | tiles)

The subcommand modules are imported up front: `import swajax` already loads
everything they build on, and they add ~20 ms together (-X importtime).
"""

from __future__ import annotations

import sys

from swajax import bench, generate_cli, train_cli
from swajax.commands import Table, dispatch

SUBCOMMANDS: Table = {
    "train": (train_cli.main, "train a model (default: a small sliding-window "
              "Mistral on the embedded Python-stdlib corpus)"),
    "generate": (generate_cli.main, "generate text from a checkpoint directory"),
    "bench": (bench.main, "benchmarks: attention | generate | train"),
}


def main(argv=None) -> int:
  return dispatch("swajax", SUBCOMMANDS,
                  sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
  sys.exit(main())

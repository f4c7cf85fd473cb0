"""`swajax` command line: one subcommand per user job, each in its own module.

  swajax train      -> swajax.train_cli.main
  swajax generate   -> swajax.generate_cli.main
  swajax bench ...  -> swajax.bench.main   (attention | generate | train)
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "train": ("swajax.train_cli", "train a model (default: a small sliding-window "
              "Mistral on the embedded Python-stdlib corpus)"),
    "generate": ("swajax.generate_cli", "generate text from a checkpoint directory"),
    "bench": ("swajax.bench", "benchmarks: attention | generate | train"),
}


def usage() -> str:
  lines = ["usage: swajax {" + ",".join(SUBCOMMANDS) + "} [args...]", ""]
  lines += [f"  {name:<9} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(usage())
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in SUBCOMMANDS:
    print(f"swajax: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
    return 2
  module = importlib.import_module(SUBCOMMANDS[name][0])
  return module.main(rest)


if __name__ == "__main__":
  sys.exit(main())

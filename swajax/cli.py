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


def dispatch(prog: str, table: dict, argv) -> int:
  """Runs `table[argv[0]]`'s module `main(argv[1:])`; usage on no/unknown name.

  `table` maps a name to (module path, one-line help). Modules are imported
  only when asked for (the `swajax` package itself, and with it the models,
  is always imported).
  """
  usage = "\n".join(
      [f"usage: {prog} {{{','.join(table)}}} [args...]", ""]
      + [f"  {name:<10} {help_}" for name, (_, help_) in table.items()])
  if not argv or argv[0] in ("-h", "--help"):
    print(usage)
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in table:
    print(f"{prog}: unknown command {name!r}\n\n{usage}", file=sys.stderr)
    return 2
  return importlib.import_module(table[name][0]).main(rest)


def main(argv=None) -> int:
  return dispatch("swajax", SUBCOMMANDS,
                  sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
  sys.exit(main())

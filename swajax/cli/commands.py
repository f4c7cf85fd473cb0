"""Subcommand dispatch shared by `swajax` (cli.py) and `swajax bench`."""

from __future__ import annotations

import sys
from typing import Callable

# A subcommand table: name -> (its main(argv) -> exit status, one-line help).
Table = dict[str, tuple[Callable[[list[str]], int], str]]


def dispatch(prog: str, table: Table, argv: list[str]) -> int:
  """Runs `table[argv[0]]`'s main on argv[1:]; usage on no/unknown name
  (exit status 0 for -h/--help, else 2)."""
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
  return table[name][0](rest)

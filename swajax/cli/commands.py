"""What the commands share: subcommand dispatch (`swajax`, `swajax bench`)
and the arguments that name the model a command runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from pallas_kernels import IMPLS

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


def add_model_arguments(parser: argparse.ArgumentParser, model_dest: str = "model") -> None:
  """MODEL (stored as `model_dest`), --adapter, --tokenizer and --attn-impl:
  how `generate`, `chat`, `eval` and `serve` name the model they run (each
  resolved by `io.model_source.resolve_model` / `ModelSource.load_with_tokenizer`)."""
  parser.add_argument(model_dest, type=Path, metavar="MODEL",
                      help="HF folder, swajax train run folder, PEFT adapter folder "
                      "or .gguf file")
  parser.add_argument("--adapter", type=Path, default=None, metavar="DIR",
                      help="a PEFT LoRA adapter folder to put on MODEL")
  parser.add_argument("--tokenizer", default=None, metavar="FILE|bytes",
                      help="tokenizer.json (or its folder), or 'bytes' for UTF-8 bytes "
                      "(default: MODEL's own: its tokenizer.json, the GGUF file's, or "
                      "bytes when its config.json says swajax_tokenizer: bytes)")
  parser.add_argument("--attn-impl", default="auto", choices=("auto", *IMPLS),
                      help="attention implementation (default: auto, the platform's)")

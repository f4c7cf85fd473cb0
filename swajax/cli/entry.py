"""`swajax` command line: one subcommand per user job, each in its own module.

  swajax train      -> swajax.cli.train.main
  swajax generate   -> swajax.cli.generate.main
  swajax chat       -> swajax.cli.chat.main
  swajax eval       -> swajax.cli.eval.main
  swajax merge      -> swajax.cli.merge.main
  swajax serve      -> swajax.cli.serve.main
  swajax bench ...  -> swajax.cli.bench.main   (its BENCHMARKS)
  swajax --version  -> the installed swajax version

The subcommand modules are imported up front: `import swajax` already loads
everything they build on, and they add ~20 ms together (-X importtime).
"""

from __future__ import annotations

import sys
from importlib import metadata

from swajax.cli import bench, generate as generate_cli, serve as serve_cli
from swajax.cli import train as train_cli
from swajax.cli import chat as chat_cli, eval as eval_cli, merge as merge_cli
from swajax.cli.commands import Table, dispatch

SUBCOMMANDS: Table = {
    "train": (train_cli.main, "train a model (default: a small sliding-window "
              "Mistral on the embedded Python-stdlib corpus)"),
    "generate": (generate_cli.main, "generate text from a checkpoint directory"),
    "chat": (chat_cli.main, "chat with a model in its chat template (a run folder, "
             "an HF folder, an adapter)"),
    "eval": (eval_cli.main, "loss and perplexity of a model on data (training's "
             "tokenization and loss mask)"),
    "merge": (merge_cli.main, "merge a LoRA adapter into its base (a run folder "
              "or a PEFT adapter folder)"),
    "serve": (serve_cli.main, "an OpenAI-compatible server with continuous "
              "batching (chat, completions, streaming, logprobs)"),
    "bench": (bench.main, "benchmarks: " + " | ".join(bench.BENCHMARKS)),
}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv == ["--version"]:
    try:
      print(f"swajax {metadata.version('swajax')}")
    except metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
      print("swajax (not installed: version unknown)")
    return 0
  return dispatch("swajax", SUBCOMMANDS, argv)


if __name__ == "__main__":
  sys.exit(main())

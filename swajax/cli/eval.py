"""`swajax eval MODEL --data FILE`: a model's loss and perplexity on data.

MODEL is anything `swajax generate` takes (an HF folder, a run folder, a PEFT
adapter folder, a .gguf file, `--adapter DIR`). FILE is training data in any
form `swajax train --data` reads (a .txt file, a folder, JSONL text /
prompt-completion / chat records), tokenized, packed and masked exactly as
training does (`training.data.file_rows`: chat records score the assistant
tokens only, prompts only with --train-prompt; documents stay inside their
segment), and scored by training's validation loss
(`training.step.evaluate_totals`): the mean loss over the target tokens in
nats, its exp (perplexity) and the number of target tokens, printed as JSON
(and written to --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import jax
from flax import nnx

from swajax import sharding as sharding_lib
from swajax.cli.commands import add_model_arguments
from swajax.dtypes import DTYPES
from swajax.io.model_source import resolve_model
from swajax.training.config import TOO_LONG, TrainConfig
from swajax.training.data import file_rows, pad_rows
from swajax.training.optimizer import StepOptions
from swajax.training.step import evaluate_totals

DEFAULTS = TrainConfig()  # packing defaults: the same as training's


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="swajax eval", description=__doc__.split("\n\n")[0])
  add_model_arguments(parser)
  parser.add_argument("--data", type=Path, required=True, metavar="FILE",
                      help="a .txt file, a folder or a .jsonl file (as swajax train --data)")
  parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                      help="also write the JSON result here")
  parser.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len,
                      help=f"tokens per packed row (default: {DEFAULTS.seq_len})")
  parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                      help=f"rows per batch (default: {DEFAULTS.batch_size})")
  parser.add_argument("--too-long", choices=TOO_LONG, default=DEFAULTS.too_long,
                      help="documents longer than --seq-len: split across rows, truncate "
                      f"or drop (default: {DEFAULTS.too_long})")
  parser.add_argument("--train-prompt", action="store_true",
                      help="also score the prompts of {prompt, completion} records")
  parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                      help="parameter and compute dtype (default: the checkpoint's)")
  return parser


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  try:
    for name in ("seq_len", "batch_size"):
      if getattr(args, name) < 1:
        raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    source = resolve_model(args.model, args.adapter)
    model, tokenizer = source.load_with_tokenizer(
        args.tokenizer, attn_impl=args.attn_impl,
        dtype=None if args.dtype is None else DTYPES[args.dtype])
    rows, note = file_rows(args.data, tokenizer, seq_len=args.seq_len,
                           too_long=args.too_long, train_prompt=args.train_prompt)
    mesh = sharding_lib.make_mesh()
    if args.batch_size % mesh.size:
      raise ValueError(f"--batch-size {args.batch_size}: expected a multiple of the "
                       f"{mesh.size} devices")
    rows = pad_rows(rows, args.batch_size, pad_id=tokenizer.pad_id)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    with jax.set_mesh(mesh):
      totals = evaluate_totals(graphdef, params, rest, rows, args.batch_size, mesh,
                               options=StepOptions.from_config(TrainConfig()))
    total, count = totals["loss"], totals["count"]
    if not count:
      raise ValueError(f"data={str(args.data)!r}: no target tokens to score")
    loss = total / count
    result = {"loss": loss, "perplexity": math.exp(loss), "tokens": int(count)}
    text = json.dumps(result, indent=2) + "\n"
    if args.out is not None:
      args.out.write_text(text)
  except (ValueError, OSError) as e:
    if os.environ.get("SWAJAX_TRACEBACK"):
      raise
    print(f"swajax eval: error: {e}", file=sys.stderr)
    return 2
  if note:
    print(f"data: {note}", file=sys.stderr)
  sys.stdout.write(text)
  return 0

"""`swajax merge RUN|ADAPTER --out DIR`: a LoRA adapter merged into its base.

RUN is a `swajax train` LoRA run folder (its adapter `hf/adapter/`), ADAPTER
a PEFT adapter folder (swajax's or one PEFT wrote); the base is the one the
adapter records (`base_model_name_or_path`, a local HF folder), or `--base
DIR`. The output is a full Hugging Face folder: every targeted kernel W +
scale * A @ B (`models.lora.merged_model`, PEFT's `merge_and_unload`), in the
base checkpoint's dtype, with the tokenizer files (the chat template
included) of the adapter, else of the base.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from models import lora as lora_lib
from swajax.io.hf import save_hf
from swajax.io.model_source import adapter_folder, resolve_model


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="swajax merge",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("source", type=Path, metavar="RUN|ADAPTER",
                      help="swajax train LoRA run folder or PEFT adapter folder")
  parser.add_argument("--base", type=Path, default=None, metavar="DIR",
                      help="the base HF folder (default: the one the adapter records)")
  parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                      help="the merged model's HF folder (new, or empty of checkpoints)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace a checkpoint already in --out")
  parser.add_argument("--tokenizer", default=None, metavar="FILE|bytes",
                      help="tokenizer.json (or its folder), or 'bytes' (default: the "
                      "adapter's, else the base's)")
  return parser


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  try:
    adapter = adapter_folder(args.source)
    source = (resolve_model(adapter) if args.base is None
              else resolve_model(args.base, adapter))
    model, tokenizer = source.load_with_tokenizer(args.tokenizer)
    if args.out.resolve() in (source.model_dir.resolve(), adapter.resolve()):
      raise ValueError(f"--out {args.out}: is the base or the adapter folder")
    try:
      save_hf(lora_lib.merged_model(model), args.out, overwrite=args.overwrite,
              tokenizer=tokenizer)
    except FileExistsError:
      raise FileExistsError(f"--out {args.out}: holds a checkpoint (pass --overwrite "
                            "to replace its files)") from None
  except (ValueError, OSError) as e:
    if os.environ.get("SWAJAX_TRACEBACK"):
      raise
    print(f"swajax merge: error: {e}", file=sys.stderr)
    return 2
  print(f"merged {adapter} into {source.model_dir}: {args.out}")
  return 0

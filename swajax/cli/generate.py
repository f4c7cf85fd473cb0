"""`swajax generate MODEL --prompt TEXT`: stream a continuation.

MODEL is a Hugging Face folder (config.json + safetensors, read by
`swajax.load_hf`), a `swajax train` run folder, whose `hf/` export is used (a
LoRA run's adapter on its base), a PEFT adapter folder (on its base), or a
GGUF file (`swajax.load_gguf`, with the file's tokenizer); `--adapter DIR`
puts a PEFT adapter on the model (`io.model_source`).
The tokenizer is `--tokenizer` (a tokenizer.json, or `bytes`), else the
folder's tokenizer.json, else UTF-8 bytes (`ByteTokenizer`) when the export
says so (`swajax train`'s default); with none known it is an error, never a
guess. The prompt gets the special tokens the tokenizer itself adds
(tokenizer.json's post-processor, as transformers' tokenizer(prompt); bytes:
bos), none with
--no-special-tokens (for a prompt that already starts with them, e.g. a
pasted `<bos>`); generation stops at its eos.
Tokens go to stdout as they are generated; the prompt's token count and
timing go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from swajax.cli.commands import add_model_arguments
from swajax.infer.generation import generate_stream
from swajax.infer.sampling import check_sampling_args
from swajax.io.model_source import resolve_model
from swajax.text.stream import TextStream


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="swajax generate", description=__doc__.split("\n\n")[0])
  add_model_arguments(parser)
  parser.add_argument("--prompt", required=True, help="text to continue")
  parser.add_argument("--no-special-tokens", action="store_true",
                      help="encode the prompt as written: add no bos/eos (default: "
                      "those the tokenizer's settings add)")
  parser.add_argument("--max-new-tokens", type=int, default=200)
  parser.add_argument("--temperature", type=float, default=0.0,
                      help="0 = greedy (default)")
  parser.add_argument("--top-k", type=int, default=None)
  parser.add_argument("--top-p", type=float, default=None)
  parser.add_argument("--seed", type=int, default=0, help="sampling seed")
  return parser


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  try:
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k,
                        args.top_p)
    source = resolve_model(args.model, args.adapter)
    model, tokenizer = source.load_with_tokenizer(args.tokenizer,
                                                  attn_impl=args.attn_impl)
    prompt = np.asarray([list(tokenizer.encode(
        args.prompt, add_special_tokens=not args.no_special_tokens))], np.int32)
    stream = TextStream(tokenizer, context=prompt[0])
    sys.stdout.write(args.prompt)
    times = [time.perf_counter()]  # start, then after each token
    for token in generate_stream(
        model, prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        eos_token_id=tokenizer.eos_id, rng=jax.random.key(args.seed)):
      stream.add(int(token[0]))
      times.append(time.perf_counter())
    stream.flush(final=True)
    sys.stdout.write("\n")
  except (ValueError, OSError) as e:
    if os.environ.get("SWAJAX_TRACEBACK"):
      raise
    print(f"swajax generate: error: {e}", file=sys.stderr)
    return 2
  count = len(times) - 1
  summary = f"[prompt {prompt.shape[1]} tokens; {count} tokens"
  if count:
    summary += (f"; first after {times[1] - times[0]:.2f}s (prefill and "
                "compile; load excluded)")
  if count > 2:  # the 2nd token compiles the decode step: rate from there on
    rate = (count - 2) / max(times[-1] - times[2], 1e-9)
    summary += f"; then {rate:.1f} tokens/s"
  print(summary + "]", file=sys.stderr)
  return 0

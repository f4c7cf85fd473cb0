"""`swajax chat MODEL`: a multi-turn chat with the model's own chat template.

MODEL is anything `swajax generate` takes (an HF folder, a run folder, a PEFT
adapter folder, a .gguf file, `--adapter DIR`). Each answer is streamed as it
is generated (`infer.chat_session.ChatSession`) and stops at the template's
end of turn, the tokenizer's eos or an eos id of the model's
generation_config.json. Typed lines `/reset` (forget the conversation, keep
--system) and `/exit` are commands. On a terminal it prompts for each turn;
otherwise (a pipe, a file) it reads one user turn per line and prints each
answer on its own line, so a conversation is scriptable.
"""

from __future__ import annotations

import argparse
import os
import sys

from swajax.cli.commands import add_model_arguments
from swajax.infer.chat_session import ChatSession
from swajax.io.model_source import resolve_model

COMMANDS = ("/reset", "/exit")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="swajax chat", description=__doc__.split("\n\n")[0])
  add_model_arguments(parser)
  parser.add_argument("--system", default=None, metavar="TEXT",
                      help="a system message opening the conversation")
  parser.add_argument("--max-new-tokens", type=int, default=256,
                      help="longest answer, in tokens (default: 256)")
  parser.add_argument("--temperature", type=float, default=0.0,
                      help="0 = greedy (default); > 0 samples")
  parser.add_argument("--top-k", type=int, default=None,
                      help="sample from the k most likely tokens (needs --temperature > 0)")
  parser.add_argument("--top-p", type=float, default=None,
                      help="sample from the nucleus of mass p (needs --temperature > 0)")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed")
  return parser


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  try:
    for flag in ("top_k", "top_p"):
      if getattr(args, flag) is not None and args.temperature == 0:
        raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: has no "
                         "effect with --temperature 0 (greedy): give a temperature > 0")
    source = resolve_model(args.model, args.adapter)
    model, tokenizer = source.load_with_tokenizer(args.tokenizer,
                                                  attn_impl=args.attn_impl)
    session = ChatSession(
        model, tokenizer, system=args.system, stop_ids=source.eos_ids(),
        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    terminal = sys.stdin.isatty()
    if terminal:
      print(f"chat with {args.model} ({', '.join(COMMANDS)}; Ctrl-D ends)", file=sys.stderr)
    for line in _turns(terminal):
      text = line.strip()
      if text == "/exit":
        break
      if text == "/reset":
        session.reset()
        if terminal:
          print("(conversation reset)", file=sys.stderr)
        continue
      if text:
        session.reply(text, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
  except (ValueError, OSError) as e:
    if os.environ.get("SWAJAX_TRACEBACK"):
      raise
    print(f"swajax chat: error: {e}", file=sys.stderr)
    return 2
  return 0


def _turns(terminal: bool):
  """The user's lines: prompted for on a terminal (until Ctrl-D / Ctrl-C),
  else read from stdin to its end."""
  if not terminal:
    yield from sys.stdin
    return
  while True:
    try:
      yield input(">>> ")
    except (EOFError, KeyboardInterrupt):
      print(file=sys.stderr)
      return

"""`swajax serve MODEL`: an OpenAI-compatible server with continuous batching.

MODEL is anything `swajax generate` takes, resolved by `io.model_source`: a
Hugging Face folder, a `swajax train` run folder (a LoRA run without
`--merge-lora`: its adapter on its base), a PEFT adapter folder (on the base
it records), a `.gguf` file; `--adapter DIR` puts a PEFT LoRA adapter on it.
A request ends at the tokenizer's eos or an eos id of the model's
generation_config.json.

The engine (`infer.engine.Engine`) holds `--max-batch` slots of one rolling
KV cache sized for `--max-len` positions per request (prompt + new tokens)
and compiles its steps before the server accepts a connection; the HTTP app
is `infer.server.create_app`, run by uvicorn on `--host` (127.0.0.1 unless
told otherwise) and `--port` (0: a free one). Once listening it prints one
line, `swajax serve: listening on http://HOST:PORT (model NAME)`.

SIGTERM (or SIGINT): stop accepting connections, let the requests in flight
finish (at most `--shutdown-timeout` seconds, then they are cancelled), stop
the engine and exit 0 (130 after SIGINT). Bad arguments: one line, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

from swajax.cli.commands import add_model_arguments
from swajax.infer.engine import Engine
from swajax.io.model_source import resolve_model


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="swajax serve", description=__doc__.split("\n\n")[0])
  add_model_arguments(parser)
  parser.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default 127.0.0.1: this machine only)")
  parser.add_argument("--port", type=int, default=8000, help="0: any free port")
  parser.add_argument("--max-batch", type=int, default=8,
                      help="slots: requests decoded together")
  parser.add_argument("--max-len", type=int, default=4096,
                      help="positions per request, prompt + new tokens")
  parser.add_argument("--max-waiting", type=int, default=64,
                      help="requests that may wait for a slot; more get 503")
  parser.add_argument("--prefill-chunk", type=int, default=128,
                      help="prompt tokens prefilled per engine step")
  parser.add_argument("--served-model-name", default=None,
                      help="the model id clients name (default: MODEL's folder name)")
  parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                      help="seconds in-flight requests may take after SIGTERM")
  return parser


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.shutdown_timeout < 0:
      raise ValueError(f"--shutdown-timeout={args.shutdown_timeout}: expected >= 0")
    source = resolve_model(args.model, args.adapter)
    model, tokenizer = source.load_with_tokenizer(args.tokenizer,
                                                  attn_impl=args.attn_impl)
    stop_ids = source.eos_ids()
    engine = Engine(model, max_batch=args.max_batch, max_len=args.max_len,
                    prefill_chunk=args.prefill_chunk, max_waiting=args.max_waiting)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
  except (ValueError, OSError) as e:
    if os.environ.get("SWAJAX_TRACEBACK"):
      raise
    print(f"swajax serve: error: {e}", file=sys.stderr)
    return 2
  import uvicorn  # pylint: disable=import-outside-toplevel  (the serve command's alone)

  from swajax.infer.server import create_app  # pylint: disable=import-outside-toplevel

  name = args.served_model_name or args.model.resolve().name
  engine.start()
  server = uvicorn.Server(uvicorn.Config(
      create_app(engine, tokenizer, name, stop_ids), log_level=logging.WARNING,
      timeout_graceful_shutdown=args.shutdown_timeout))
  # uvicorn shuts down gracefully on these, then raises them again: handled
  # here (recorded), so the command returns its own status.
  received = []
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda number, _: received.append(number))
  host, port = sock.getsockname()[:2]
  print(f"swajax serve: listening on http://{host}:{port} (model {name})",
        flush=True)
  try:
    server.run(sockets=[sock])
  finally:
    engine.stop()
  return 130 if signal.SIGINT in received else 0

"""`swajax bench serve`: serving throughput and latency, continuous batching
(`infer.engine.Engine`) vs one request at a time (`generate_stream`).

A random sliding-window `mistral_tiny` (window W on every layer). At each
concurrency c, c clients in a closed loop (each sends its next request when
the last one has ended) send `--requests` requests in all: random prompts of
T tokens, N new tokens each, greedy, no eos. "batched": an engine of c slots;
"sequential": one worker serving the requests in arrival order with
`generate_stream`, so a request waits for those before it. Both compile and
serve one untimed request before timing. Per request: time to first token
(from its submission: queueing + prefill) and time per later token; per
level: generated tokens / wall time, p50 and p95 of both latencies, and
whether both modes gave every prompt the same tokens (greedy). The
engine path is in-process, without HTTP (the server adds the same per-token
cost to both). Prints a table; `--out FILE.json` writes JSON and a PNG
beside it (FILE.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
import time

import numpy as np
from flax import nnx

import models
from swajax.cli.bench import common
from swajax.infer.engine import Engine, EngineRequest, Finished, NewToken
from swajax.infer.generation import generate_stream

COLUMNS = [("mode", "mode"), ("concurrency", "clients"), ("requests", "requests"),
           ("tokens_per_s", "tok/s"), ("ttft_p50_ms", "TTFT p50 ms"),
           ("ttft_p95_ms", "TTFT p95 ms"), ("tpot_p50_ms", "per-token p50 ms"),
           ("tpot_p95_ms", "per-token p95 ms"), ("same_tokens", "same tokens")]


class _Engine:
  """Serves requests through an `Engine` of `slots` slots."""

  def __init__(self, model, slots: int, max_len: int, prefill_chunk: int):
    self.engine = Engine(model, max_batch=slots, max_len=max_len,
                         prefill_chunk=prefill_chunk, max_waiting=slots)
    self.engine.start()

  def run(self, prompt, new_tokens) -> tuple[list[float], list[int]]:
    """Sends one request; returns (the time each token arrived, the tokens)."""
    times, tokens, done = [], [], threading.Event()

    def emit(event):
      if isinstance(event, NewToken):
        times.append(time.perf_counter())
        tokens.append(int(event.scored.token))
      elif isinstance(event, Finished):
        done.set()

    self.engine.submit(EngineRequest(tuple(prompt), new_tokens, seed=0), emit)
    done.wait()
    return times, tokens

  def close(self):
    self.engine.stop()


class _Sequential:
  """Serves one request at a time with `generate_stream`, in arrival order."""

  def __init__(self, model, max_len: int, prefill_chunk: int):
    self.model, self.max_len, self.prefill_chunk = model, max_len, prefill_chunk
    self.lock = threading.Lock()

  def run(self, prompt, new_tokens) -> tuple[list[float], list[int]]:
    with self.lock:
      times, tokens = [], []
      for token in generate_stream(self.model, np.asarray([prompt], np.int32),
                                   max_new_tokens=new_tokens, max_len=self.max_len,
                                   prefill_chunk=self.prefill_chunk):
        times.append(time.perf_counter())
        tokens.append(int(token[0]))
      return times, tokens

  def close(self):
    pass


def run_level(server, prompts, concurrency: int, new_tokens: int):
  """c clients in a closed loop over `prompts`: (the level's figures, each
  prompt's tokens)."""
  pending = list(range(len(prompts)))
  lock = threading.Lock()
  ttft, tpot, tokens, answers = [], [], [0], [None] * len(prompts)

  def client():
    while True:
      with lock:
        if not pending:
          return
        i = pending.pop(0)
      sent = time.perf_counter()
      times, answers[i] = server.run(prompts[i], new_tokens)
      with lock:
        ttft.append(times[0] - sent)
        if len(times) > 1:
          tpot.append((times[-1] - times[0]) / (len(times) - 1))
        tokens[0] += len(times)

  start = time.perf_counter()
  threads = [threading.Thread(target=client) for _ in range(concurrency)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  wall = time.perf_counter() - start
  ms = lambda xs, q: 1e3 * float(np.percentile(xs, q))
  return dict(concurrency=concurrency, requests=len(prompts),
              tokens=tokens[0], wall_s=wall, tokens_per_s=tokens[0] / wall,
              ttft_p50_ms=ms(ttft, 50), ttft_p95_ms=ms(ttft, 95),
              tpot_p50_ms=ms(tpot, 50), tpot_p95_ms=ms(tpot, 95)), answers


def plot(payload: dict, path: str) -> None:
  """Tokens/s and p50 time to first token against concurrency, per mode."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  fig = Figure(figsize=(9, 3.8))
  left, right = fig.subplots(1, 2)
  for mode in ("batched", "sequential"):
    rows = [r for r in payload["rows"] if r["mode"] == mode]
    levels = [r["concurrency"] for r in rows]
    left.plot(levels, [r["tokens_per_s"] for r in rows], "o-", label=mode)
    right.plot(levels, [r["ttft_p50_ms"] for r in rows], "o-", label=mode)
  for ax, label in ((left, "generated tokens / s"), (right, "time to first token, p50 (ms)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
  settings = payload["settings"]
  fig.suptitle(f"swajax serve engine vs one-at-a-time generate_stream: mistral_tiny "
               f"W={settings['window']}, T={settings['prompt_len']}, "
               f"N={settings['new_tokens']}, {payload['machine']['backend']}",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="swajax bench serve",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
  parser.add_argument("--requests", type=int, default=32,
                      help="requests per concurrency level")
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--window", type=int, default=32)
  parser.add_argument("--prefill-chunk", type=int, default=64)
  common.add_model_overrides(parser)
  parser.add_argument("--out", default=None,
                      help="write JSON here and a PNG beside it (default: table only)")
  args = parser.parse_args(argv)
  if min(args.concurrency + [args.requests, args.prompt_len, args.new_tokens,
                             args.window, args.prefill_chunk]) < 1:
    parser.error("--concurrency, --requests, --prompt-len, --new-tokens, "
                 "--window and --prefill-chunk take ints >= 1")
  config, _ = common.sliding_and_full(parser, args.model_overrides, args.window)
  model = models.CausalLM(config, attn_impl="xla", rngs=nnx.Rngs(0))
  prompts = np.random.default_rng(0).integers(
      0, config.vocab_size, (args.requests, args.prompt_len)).tolist()
  max_len = args.prompt_len + args.new_tokens
  sequential = _Sequential(model, max_len, args.prefill_chunk)
  sequential.run(prompts[0], args.new_tokens)  # compiles
  rows = []
  for level in args.concurrency:
    batched = _Engine(model, level, max_len, args.prefill_chunk)
    batched.run(prompts[0], args.new_tokens)  # a first request, untimed
    level_rows, answers = [], []
    for mode, server in (("batched", batched), ("sequential", sequential)):
      row, tokens = run_level(server, prompts, level, args.new_tokens)
      level_rows.append(dict(mode=mode, **row))
      answers.append(tokens)
    batched.close()
    for row in level_rows:  # greedy: both modes must give every prompt the same tokens
      row["same_tokens"] = answers[0] == answers[1]
    rows += level_rows
  print(common.format_table(rows, COLUMNS))
  if args.out:
    payload = dict(benchmark="serve", machine=common.machine_info(),
                   settings=dict(vars(args), model=dataclasses.asdict(config)),
                   rows=rows)
    common.write_json(args.out, payload)
    plot(payload, args.out.removesuffix(".json") + ".png")
    print(f"wrote {args.out} and its .png")
  return 0

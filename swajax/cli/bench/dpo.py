"""`swajax bench dpo`: a preference-tuning step vs an SFT step, full
fine-tuning and LoRA, on the same model and the same tokens per step.

Each variant times the `swajax train` step (`training.step.train_step`:
forward, backward, AdamW) on B rows of T tokens, per
`swajax.cli.bench.common` (compile, warm up, median): "sft" on packed rows;
"dpo" (sigmoid) on pair rows (chosen and rejected, T / 2 tokens each, the
first quarter of each a prompt) with the reference computed in the step
(LoRA: the base with the adapters off; full: a frozen copy of the weights);
"dpo precomputed" with the reference log-probabilities precomputed (two
floats per pair in the batch); "orpo" without a reference. Memory: XLA's
temp bytes of the compiled step, the trained state (parameters or adapters
and AdamW's moments) and the frozen reference copy (full fine-tuning's
in-step reference only). Prints a table; `--out` writes JSON, `--plot` a PNG.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

import models
from swajax import sharding as sharding_lib
from swajax.cli.bench import common
from swajax.training import pref_data
from swajax.training.config import TrainConfig
from swajax.training.data import Document, pack_sequences
from swajax.training.optimizer import StepOptions
from swajax.training.state import init_model
from swajax.training.step import precompute_reference, row_shardings, train_step

# (label, TrainConfig fields) of each variant, timed for full and LoRA tuning.
VARIANTS = (("sft", {}), ("dpo", dict(stage="dpo")),
            ("dpo precomputed", dict(stage="dpo", precompute_ref=True)),
            ("orpo", dict(stage="dpo", pref_loss="orpo")))
COLUMNS = [("tuning", "tuning"), ("variant", "variant"), ("reference", "reference"),
           ("step_ms", "step ms"), ("vs_sft", "time vs sft"), ("temp_mib", "temp MiB"),
           ("state_mib", "trained state MiB"), ("ref_mib", "ref copy MiB"),
           ("repeats", "runs")]


def rows_for(config: TrainConfig, tokenizer_vocab: int = 256) -> dict[str, np.ndarray]:
  """[B, T] random rows: packed documents of T tokens (sft), or one pair per
  row, chosen and rejected of T / 2 tokens each with a T / 8 prompt (dpo)."""
  rng = np.random.default_rng(0)
  count, seq_len = config.batch_size, config.seq_len
  if config.stage == "sft":
    return pack_sequences([rng.integers(0, tokenizer_vocab, seq_len) for _ in range(count)],
                          seq_len, pad_id=0)
  half = seq_len // 2
  pairs = []
  for _ in range(count):
    prompt = rng.integers(0, tokenizer_vocab, half // 4)
    sides = [np.concatenate([prompt, rng.integers(0, tokenizer_vocab, half - len(prompt))])
             for _ in range(2)]
    pairs.append(pref_data.Pair(*(Document(s.astype(np.int32), np.arange(half) >= len(prompt))
                                  for s in sides)))
  return pref_data.pair_rows(pairs, seq_len, pad_id=0)


def measure(config: TrainConfig, repeats: int) -> dict:
  """One variant's step time and memory (see the module docstring)."""
  mesh = sharding_lib.make_mesh(config.fsdp)
  with jax.set_mesh(mesh):
    _, graphdef, rest, state = init_model(config, mesh)
    options = StepOptions.from_config(config)
    host = rows_for(config)
    ref_params = None
    if config.reference == "precomputed":
      host["ref_logps"] = precompute_reference(
          graphdef, state.params, rest, host, config.batch_size, mesh, options=options,
          lora=config.lora_spec is not None)
    elif config.reference == "frozen_copy":
      ref_params = jax.tree.map(lambda x: x.copy(), state.params)
    host = {k: v[None] for k, v in host.items()}  # one micro-batch: [1, B, ...]
    shardings = row_shardings(host, mesh, batch_dim=1)
    batch = {k: sharding_lib.global_array(v, shardings[k]) for k, v in host.items()}
    step = lambda state, rest, batch, ref: train_step(  # noqa: E731
        state, rest, batch, graphdef=graphdef, options=options, mesh=mesh, ref_params=ref)
    timing = common.time_fn(step, state, rest, batch, ref_params, repeats=repeats)
  mib = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree)) / 2**20
  return dict(step_ms=timing.median_s * 1e3, repeats=timing.repeats,
              temp_mib=None if timing.temp_bytes is None else timing.temp_bytes / 2**20,
              state_mib=mib((state.params, state.opt_state)),
              ref_mib=mib(ref_params) if ref_params is not None else 0.0)


def benchmark(*, seq_len: int = 256, batch_size: int = 4, window: int = 64,
              lora_rank: int = 8, model_overrides=(), dtype: str = "float32",
              repeats: int = 3) -> dict:
  """Every variant, full and LoRA; returns the payload `--out` writes."""
  overrides = dict(model_overrides)
  overrides["layer_windows"] = (window,) * models.mistral_tiny(**overrides).num_layers
  base = dict(model_overrides=overrides, seq_len=seq_len, batch_size=batch_size,
              dtype=dtype, warmup_steps=0, steps=2)
  rows = []
  for tuning, extra in (("full", {}), ("lora", dict(lora_rank=lora_rank))):
    for variant, fields in VARIANTS:
      config = TrainConfig(**base, **extra, **fields)
      print(f"timing {tuning} {variant}...", file=sys.stderr, flush=True)
      rows.append(dict(tuning=tuning, variant=variant, reference=config.reference,
                       seq_len=seq_len, batch=batch_size, **measure(config, repeats)))
    sft = rows[-len(VARIANTS)]["step_ms"]
    for row in rows[-len(VARIANTS):]:
      row["vs_sft"] = row["step_ms"] / sft
  return dict(benchmark="dpo", machine=common.machine_info(),
              settings=dict(model="mistral_tiny", model_overrides=overrides,
                            seq_len=seq_len, batch_size=batch_size, window=window,
                            lora_rank=lora_rank, dtype=dtype), rows=rows)


def plot(payload: dict, path: str) -> None:
  """Step ms per variant, full and LoRA side by side."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  rows, settings = payload["rows"], payload["settings"]
  variants = [v for v, _ in VARIANTS]
  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  for i, tuning in enumerate(("full", "lora")):
    times = [next(r["step_ms"] for r in rows if r["tuning"] == tuning and r["variant"] == v)
             for v in variants]
    ax.bar(np.arange(len(variants)) + 0.4 * i, times, 0.4, label=tuning)
  ax.set_xticks(np.arange(len(variants)) + 0.2)
  ax.set_xticklabels(variants)
  ax.set_ylabel("step ms")
  ax.set_title(f"DPO vs SFT step, T={settings['seq_len']} B={settings['batch_size']} "
               f"W={settings['window']}, {settings['dtype']}, "
               f"{payload['machine']['backend']}", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="swajax bench dpo",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--seq-len", type=int, default=256,
                      help="T: tokens per row (a pair: T / 2 per answer sequence)")
  parser.add_argument("--batch-size", type=int, default=4, help="B: rows (pairs) per step")
  parser.add_argument("--window", type=int, default=64, help="W of every layer")
  parser.add_argument("--lora-rank", type=int, default=8)
  parser.add_argument("--dtype", default="float32")
  common.add_model_overrides(parser)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--smoke", action="store_true",
                      help="a one-layer model, T=32, one run (tests)")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  parser.add_argument("--plot", default=None, help="write a PNG of the step times here")
  args = parser.parse_args(argv)
  settings = dict(seq_len=args.seq_len, batch_size=args.batch_size, window=args.window,
                  lora_rank=args.lora_rank, model_overrides=args.model_overrides,
                  dtype=args.dtype, repeats=args.repeats)
  if args.smoke:
    settings.update(seq_len=32, window=8, repeats=1, model_overrides=[
        ("num_layers", 1), ("hidden_size", 64), ("intermediate_size", 128)])
  try:
    payload = benchmark(**settings)
  except ValueError as e:
    print(f"swajax bench dpo: {e}", file=sys.stderr)
    return 2
  print(common.format_table(payload["rows"], COLUMNS))
  if args.out:
    common.write_json(args.out, payload)
    print(f"wrote {args.out}", file=sys.stderr)
  if args.plot:
    plot(payload, args.plot)
    print(f"wrote {args.plot}", file=sys.stderr)
  return 0

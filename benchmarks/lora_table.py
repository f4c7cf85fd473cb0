"""Full fine-tuning vs LoRA vs QLoRA on one model: trainable parameters,
optimizer-state bytes, frozen base bytes and step time (docs/lora.md's table).

  PYTHONPATH=. python benchmarks/lora_table.py [--steps 12] [--out FILE.json]

The model is `mistral_tiny` (the `make train` model), exported with `save_hf`
and fine-tuned from that folder on the stdlib corpus, seq_len 256, batch 8,
bf16 compute, fp32 parameters; the step time is the median of the steps after
the first (compilation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import jax
from flax import nnx

import models
from models import lora as lora_lib
from swajax import sharding as sharding_lib
from swajax.training import loop as loop_lib, state as state_lib
from swajax.io.hf import save_hf
from swajax.text.tokenizers import ByteTokenizer
from swajax.training.config import TrainConfig

MODES = {
    "full fine-tuning": {},
    "LoRA r=16, all 7 projections": dict(lora_rank=16),
    "QLoRA r=16, int8 base": dict(lora_rank=16, quantize_base="int8"),
    "QLoRA r=16, nf4 base": dict(lora_rank=16, quantize_base="nf4"),
}


def measure(base: Path, work: Path, name: str, fields: dict, steps: int) -> dict:
  config = TrainConfig(init_from_hf=str(base), steps=steps, eval_every=steps,
                       eval_batches=1, checkpoint_every=steps, warmup_steps=2,
                       corpus_max_bytes=400_000, out=str(work / f"run{len(list(work.iterdir()))}"),
                       **fields)
  mesh = sharding_lib.make_mesh(1)
  with jax.set_mesh(mesh):
    model, _, _, state = state_lib.init_model(config, mesh)
  result = loop_lib.train(config)
  times = [config.tokens_per_step / r["tokens_per_s"] for r in result.history[1:]]
  return {
      "mode": name,
      "trainable_params": sum(x.size for x in jax.tree.leaves(state.params)),
      "optimizer_state_bytes": lora_lib.param_bytes(state.opt_state),
      "frozen_base_bytes": (lora_lib.base_bytes(model) if config.lora_rank
                            else 0),
      "params_bytes_total": lora_lib.param_bytes(nnx.state(model)),
      "step_time_s": statistics.median(times),
      "final_loss": result.history[-1]["loss"],
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--out", type=Path, default=None)
  args = parser.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    work = Path(tmp)
    save_hf(models.CausalLM(models.mistral_tiny(), rngs=nnx.Rngs(0)), work / "base",
            tokenizer=ByteTokenizer())
    for name, fields in MODES.items():
      rows.append(measure(work / "base", work, name, fields, args.steps))
      print(json.dumps(rows[-1]))
  print("| mode | trainable params | optimizer state | frozen base | step time |")
  print("|---|---:|---:|---:|---:|")
  for r in rows:
    base = f"{r['frozen_base_bytes'] / 2**20:.2f} MiB" if r["frozen_base_bytes"] else "-"
    print(f"| {r['mode']} | {r['trainable_params']:,} | "
          f"{r['optimizer_state_bytes'] / 2**20:.2f} MiB | {base} | "
          f"{r['step_time_s'] * 1e3:.0f} ms |")
  if args.out is not None:
    args.out.write_text(json.dumps({"device": str(jax.devices()[0]), "rows": rows},
                                   indent=2) + "\n")


if __name__ == "__main__":
  main()

"""`--report-to`: a run's step records to TensorBoard event files and / or a
Weights & Biases run, under the names transformers' Trainer logs
(`train/loss`, `train/grad_norm`, `train/learning_rate`, `eval/loss`, ...),
beside metrics.jsonl (which stays the run's own record).

TensorBoard files are written by tensorboardX's `SummaryWriter` into
RUN_DIR/tensorboard (a resume purges the steps after its checkpoint, as
metrics.jsonl does); W&B by `wandb.init` / `log` (project $WANDB_PROJECT,
else "swajax"; the run named after the run folder; offline with
WANDB_MODE=offline). Only process 0 reports.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from swajax.training.config import TrainConfig

# metrics.jsonl keys whose Trainer twin is spelled otherwise (`trainer_name`).
RENAMES = {"lr": "learning_rate", "ppl": "perplexity", "tokens_per_s": "tokens_per_second",
           "router_aux_loss": "aux_loss"}
TENSORBOARD_DIR = "tensorboard"


def trainer_name(key: str) -> str:
  """The name Trainer logs a metrics.jsonl key under (its `rewrite_logs`):
  val_<k> -> eval/<k>, else train/<k>, `RENAMES` applied to <k> (loss ->
  train/loss, lr -> train/learning_rate, val_loss -> eval/loss, a DPO run's
  rewards/margins -> train/rewards/margins)."""
  split, name = ("eval", key[4:]) if key.startswith("val_") else ("train", key)
  return f"{split}/{RENAMES.get(name, name)}"


def check_available(config: TrainConfig) -> None:
  """ValueError (one line) when a `report_to` integration's package is missing."""
  if "wandb" in config.reporters:
    try:
      import wandb  # noqa: F401
    except ImportError:
      raise ValueError("--report-to wandb needs the wandb package (pip install wandb)"
                       ) from None


class Reporters:
  """The integrations `config.report_to` names, open for one run."""

  def __init__(self, config: TrainConfig, run_dir: Path, *, resumed_from: int | None):
    self.writer = self.run = None
    if "tensorboard" in config.reporters:
      from tensorboardX import SummaryWriter  # lazy: only a reporting run needs it

      self.writer = SummaryWriter(
          str(run_dir / TENSORBOARD_DIR),
          purge_step=None if resumed_from is None else resumed_from + 1)
    if "wandb" in config.reporters:
      import wandb

      self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "swajax"),
                            name=run_dir.name, config=config.to_dict())

  def write(self, record: dict) -> None:
    """One step's record (metrics.jsonl's keys), its finite values under
    `trainer_name`s."""
    values = {trainer_name(k): v for k, v in record.items()
              if k != "step" and v is not None and math.isfinite(v)}
    if self.writer is not None:
      for name, value in values.items():
        self.writer.add_scalar(name, value, record["step"])
      self.writer.flush()
    if self.run is not None:
      self.run.log(values, step=record["step"])

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
    if self.run is not None:
      self.run.finish()

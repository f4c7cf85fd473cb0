"""A run's metrics.jsonl (one strict-JSON record per step) and its loss.png plot."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
  """metrics.jsonl opened for writing, one record per line, flushed per record.

  On resume (`resumed_from` = the checkpoint's step) the records up to that
  step are kept: the steps after it are about to be redone.
  """

  def __init__(self, path: Path, *, resumed_from: int | None):
    kept = []
    if resumed_from is not None and path.exists():
      kept = [line for line in path.read_text().splitlines()
              if line and json.loads(line)["step"] <= resumed_from]
    self._file = path.open("w")
    self._file.writelines(line + "\n" for line in kept)

  def write(self, record: dict) -> None:
    """One line of strict JSON: a NaN or infinite value is written as null."""
    strict = {k: None if isinstance(v, float) and not math.isfinite(v) else v
              for k, v in record.items()}
    self._file.write(json.dumps(strict, allow_nan=False) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def plot_losses(metrics_path: Path, png_path: Path) -> None:
  """Train loss per step and validation loss at eval steps, from metrics.jsonl."""
  # Lazy: matplotlib takes ~0.8 s to import (-X importtime, on top of the
  # ~2.6 s of `import swajax`), which only the end of a training run needs.
  # A pyplot-free Figure: no global backend switch (safe inside notebooks).
  from matplotlib.figure import Figure

  records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  nan = float("nan")  # null (a non-finite loss) leaves a gap
  ax.plot([r["step"] for r in records], [nan if r["loss"] is None else r["loss"]
                                         for r in records],
          label="train loss", lw=1)
  val = [r for r in records if "val_loss" in r]
  ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-",
          label="validation loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(png_path, dpi=120)

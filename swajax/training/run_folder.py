"""A run's folder and its guards: claiming a new folder atomically, checking
it can be written, the resume rules, and the signals that end a run with a
checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from swajax.training.config import TrainConfig


class TrainingInterrupted(Exception):
  """SIGINT or SIGTERM stopped a run after `step`, whose checkpoint is saved."""

  def __init__(self, run_dir: Path, step: int, signum: int):
    self.run_dir, self.step, self.signum = run_dir, step, signum
    super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step} "
                     f"(checkpoint {step} saved in {run_dir / 'checkpoints'})")


def default_run_dir() -> Path:
  """runs/<timestamp>: the base name of a run folder claimed by `claim_run_dir`."""
  return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def claim_run_dir(out: str | None) -> Path:
  """Creates a new run folder and its config.json atomically; returns it.

  out None: runs/<timestamp>, or runs/<timestamp>-2, -3, ... when a run
  started in the same second holds it (os.mkdir either creates or fails).
  Else `out`, created, or taken as it is when empty. The exclusive creation
  of config.json is the claim: two runs never share a folder.
  """
  if out is None:
    base = default_run_dir()
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
      path = base if n == 1 else base.with_name(f"{base.name}-{n}")
      try:
        path.mkdir()
        break
      except FileExistsError:
        continue
  else:
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    if (path / "checkpoints").exists():
      raise ValueError(f"out={out!r} already holds checkpoints: resume it "
                       "(--resume) or choose another --out")
    if any(path.iterdir()):
      raise ValueError(f"out={out!r} is not empty: a run folder is never reused "
                       "(choose a new --out, or --resume a run)")
  try:
    (path / "config.json").open("x").close()
  except FileExistsError:
    raise ValueError(f"out={str(path)!r}: claimed by another run just now "
                     "(choose another --out)") from None
  return path


def check_writable(out: str | None) -> None:
  """Raises OSError (one line) when the run folder cannot be written: a small
  file is written (and removed) in its nearest existing ancestor."""
  folder = Path("runs" if out is None else out).absolute()
  while not folder.exists():
    folder = folder.parent
  try:
    with tempfile.TemporaryFile(dir=folder) as probe:
      probe.write(b"\0" * 4096)
      probe.flush()
      os.fsync(probe.fileno())
  except OSError as e:
    raise OSError(f"out={out!r}: cannot write in {folder} ({e.strerror})") from None


@contextlib.contextmanager
def deferred_signals():
  """While open, SIGINT and SIGTERM are recorded in the yielded list instead of
  acting; the first one restores the previous handlers, so a second one acts
  at once. A no-op (an empty list) outside the main thread."""
  received: list[int] = []
  if threading.current_thread() is not threading.main_thread():
    yield received
    return
  previous = {}

  def record(signum, frame):
    received.append(signum)
    for s, handler in previous.items():
      signal.signal(s, handler)

  for s in (signal.SIGINT, signal.SIGTERM):
    previous[s] = signal.signal(s, record)
  try:
    yield received
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def check_resume(config: TrainConfig, saved: dict,
                 checkpoint_step: int) -> tuple[TrainConfig, str | None]:
  """(the config a resume runs, a one-line note or None), or ValueError
  before anything is written.

  saved: the checkpoint's own config (its metadata). The data stream must be
  the same (`DATA_FIELDS`), `steps` beyond the checkpoint. A changed `steps`
  keeps the run's LR schedule unless schedule_steps is set: the note says which.
  """
  for name in DATA_FIELDS:
    if name in saved and saved[name] != getattr(config, name):
      raise ValueError(
          f"{name}={getattr(config, name)!r}: the checkpoint was trained with "
          f"{name}={saved[name]!r}, which fixes its data order; resume with the "
          "same value (or start a new run)")
  if config.steps <= checkpoint_step:
    raise ValueError(
        f"steps={config.steps}: the run's latest checkpoint is at step "
        f"{checkpoint_step}, so nothing would be trained; pass --steps above "
        f"{checkpoint_step} (the step to reach, not a count to add)")
  saved_steps = saved.get("steps", config.steps)
  saved_schedule = saved.get("schedule_steps") or saved_steps
  note = None
  if config.steps != saved_steps:
    if config.schedule_steps is None:
      config = dataclasses.replace(config, schedule_steps=saved_schedule)
    if config.schedule_steps == saved_schedule:
      note = (f"resume: steps {saved_steps} -> {config.steps}, the LR schedule stays the "
              f"run's (cosine over {saved_schedule} steps, then lr * min_lr_ratio); "
              "--schedule-steps N sets a new one")
    else:
      note = (f"resume: steps {saved_steps} -> {config.steps}, a new LR schedule over "
              f"{config.schedule_steps} steps (was {saved_schedule})")
  return config, note


# The fields that fix the training row stream (which rows, in which order):
# a checkpoint's data position means nothing under other values.
DATA_FIELDS = ("seed", "seq_len", "data", "val_data", "val_percent", "tokenizer",
                "chat_template", "train_prompt", "corpus_max_bytes", "too_long", "stage")

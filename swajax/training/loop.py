"""The training loop: `train(config)` builds the data, the mesh, the model
and the train state, then runs the jitted steps with evaluation, metrics and
orbax checkpoints, ending cleanly on a signal or a non-finite loss.

The settings come from a `swajax.training.config.TrainConfig`; the jitted
programs take only the parts they depend on (`StepOptions`, `ModelSpec`) as
static arguments.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models import lora as lora_lib
from swajax import sharding as sharding_lib
from swajax.text.tokenizers import HFTokenizer
from swajax.training import data as data_lib, pref_data, report
from swajax.training.config import TrainConfig
from swajax.training.metrics import MetricsLog, plot_losses
from swajax.training.optimizer import StepOptions
from swajax.training.run_folder import (TrainingInterrupted, check_resume,
                                        check_writable, claim_run_dir,
                                        deferred_signals)
from swajax.training.state import init_model
from swajax.training.step import (evaluate, precompute_reference, row_shardings,
                                  train_step)


@dataclasses.dataclass
class TrainResult:
  """What a run produced: its folder, the trained model and its figures."""

  run_dir: Path
  model: Any                # the trained CausalLM (params on the mesh)
  tokenizer: Any
  history: list[dict]       # one dict per step: step, loss, grad_norm, lr, ...
  evals: list[dict]         # step, val_loss, val_ppl (dpo: val_rewards/...)
  tokens_per_s: float       # mean over the run's steps after the first (compile)
  resumed_from: int | None  # the checkpoint step this run started from
  notes: list[str] = dataclasses.field(default_factory=list)  # long documents, LoRA sizes


class NonFiniteLoss(ValueError):
  """A step's loss or gradient norm was NaN or infinite; the run stopped."""


def train(config: TrainConfig, *, resume: bool = False, until_step: int | None = None,
          on_step: Callable[[dict], None] | None = None,
          log: Callable[[str], None] | None = None) -> TrainResult:
  """Trains per `config`; returns a `TrainResult` (run_dir, trained model, ...).

  Writes into a new run folder (`claim_run_dir(config.out)`) config.json,
  checkpoints/ (orbax, every `checkpoint_every` steps and after the last),
  metrics.jsonl (one strict-JSON line per step) and loss.png; `swajax train`
  adds hf/ and sample.txt.

  resume: continue from the latest checkpoint in `config.out` (same data
    order, optimizer state and schedule: the losses continue exactly). Every
    check (`check_resume`, the checkpoint's tensor shapes) runs before
    anything is written: a refused resume leaves the folder as it was.
  until_step: stop after this step (with a checkpoint), as if preempted.
  on_step: called on process 0 after every step with that step's metrics
    (and val_loss/val_ppl on eval steps).
  log: called on process 0 with one-line notes (the run folder, a kept
    schedule) and warnings (a chat template chosen for the data: without
    `log`, these go to stderr).

  Raises TrainingInterrupted after SIGINT/SIGTERM (the current step finishes,
  then a checkpoint, metrics.jsonl and loss.png are written), NonFiniteLoss
  at the first NaN/inf loss or gradient norm (that step is not saved: the
  last checkpoint holds the last good state), ValueError/OSError (one line)
  for bad settings, data, or a checkpoint that cannot be written.
  """
  lead = jax.process_index() == 0
  # Data warnings reach stderr without a `log` too (process 0 only).
  warn = (log or data_lib.print_warning) if lead else (lambda line: None)
  log = log or (lambda line: None)
  # Lazy: orbax takes ~0.5 s to import (-X importtime, on top of the ~2.6 s of
  # `import swajax`), which only a training run needs.
  from swajax.training.checkpoint import Checkpointer

  if lead:
    report.check_available(config)
  checkpointer, note = None, None
  if resume:
    if config.out is None:
      raise ValueError("resume=True: expected config.out, the run folder to resume")
    run_dir = Path(config.out)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.keep_checkpoints,
                                create=False)
    resumed_from = checkpointer.latest_step()
    try:
      if resumed_from is None:
        raise ValueError(f"resume: no checkpoint in {run_dir / 'checkpoints'}")
      config, note = check_resume(
          config, checkpointer.read_meta(resumed_from).get("config", {}), resumed_from)
    except ValueError:
      checkpointer.close()
      raise
  else:
    if jax.process_count() > 1 and config.out is None:
      raise ValueError("out=None: a multi-process run needs --out (one folder every "
                       "process sees)")
    if lead:
      check_writable(config.out)
  try:
    tokenizer = data_lib.resolve_tokenizer(config)
    notes: list[str] = []  # long documents, LoRA sizes: reported at the end
    if config.stage == "dpo":
      train_rows, val_rows = pref_data.load_pairs(config, tokenizer, notes, log=warn)
    else:
      train_rows, val_rows = data_lib.load_data(config, tokenizer, notes, log=warn)
    mesh = sharding_lib.make_mesh(config.fsdp, context=config.context_parallel)
    batch_ways = mesh.size // config.context_parallel  # "data" x "fsdp"
    if config.batch_size % batch_ways:
      raise ValueError(f"batch_size={config.batch_size}: expected a multiple of the "
                       f"data x fsdp devices {batch_ways} (mesh {dict(mesh.shape)})")
    if config.seq_len % config.context_parallel:
      raise ValueError(f"seq_len={config.seq_len}: expected a multiple of "
                       f"context_parallel={config.context_parallel}")
    with jax.set_mesh(mesh):
      model, graphdef, rest, state = init_model(config, mesh)
      if config.lora_spec is not None:
        notes.append(lora_lib.summary(model))
      if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"tokenizer vocab {tokenizer.vocab_size} > model vocab_size="
                         f"{model.config.vocab_size}: pick a matching tokenizer or model")
      # The reference comes from the starting weights, before a resume
      # restores the trained ones.
      ref_params = _reference_setup(config, graphdef, state, rest, train_rows,
                                    val_rows, mesh)
      position = 0
      if resume:
        state, meta = checkpointer.restore(state, resumed_from)
        position = meta["data_position"]
      elif lead:
        run_dir = claim_run_dir(config.out)
      else:
        run_dir = Path(config.out)
  except BaseException:
    if checkpointer is not None:
      checkpointer.close()
    raise
  # Every check passed: from here on the run folder is written.
  config = dataclasses.replace(config, out=str(run_dir))
  if lead:
    log(f"run folder {run_dir}")
    if note is not None:
      log(note)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    copy = run_dir / "tokenizer.json"  # `swajax generate` reads it
    if isinstance(tokenizer, HFTokenizer) and tokenizer.file is None:
      # Built in memory (a GGUF file's): tokenizer.json and its config.
      for name, text in tokenizer.config_files().items():
        (run_dir / name).write_text(text, encoding="utf-8")
    elif isinstance(tokenizer, HFTokenizer) and not (
        copy.exists() and copy.samefile(tokenizer.file)):
      shutil.copyfile(tokenizer.file, copy)
  if checkpointer is None:
    checkpointer, resumed_from = Checkpointer(run_dir / "checkpoints",
                                              keep=config.keep_checkpoints), None
  with jax.set_mesh(mesh):
    history, evals, step_times = _loop(
        config, state, graphdef, rest, train_rows, val_rows, position, mesh,
        checkpointer, run_dir, resumed_from, until_step, on_step, model, ref_params)
  timed = step_times[1:] or step_times
  tokens_per_s = config.tokens_per_step * len(timed) / max(sum(timed), 1e-9)
  return TrainResult(run_dir, model, tokenizer, history, evals, tokens_per_s, resumed_from,
                     notes)


def _reference_setup(config, graphdef, state, rest, train_rows, val_rows, mesh):
  """The reference of a dpo run (`TrainConfig.reference`): returns the frozen
  copy of the starting weights ("frozen_copy") or None; "precomputed" adds
  the reference log-probabilities of every pair as rows field ref_logps
  [R, 2] (of train_rows.rows and val_rows, in place)."""
  if config.reference == "frozen_copy":
    return jax.tree.map(jnp.copy, state.params)  # the step donates state.params
  if config.reference == "precomputed":
    options = StepOptions.from_config(config)
    for rows in (train_rows.rows, val_rows):
      rows["ref_logps"] = precompute_reference(
          graphdef, state.params, rest, rows, config.batch_size, mesh,
          options=options, lora=config.lora_spec is not None)
  return None


def _loop(config, state, graphdef, rest, train_rows, val_rows, position, mesh,
          checkpointer, run_dir, resumed_from, until_step, on_step, model, ref_params):
  """The steps of `train` from state.step + 1: (history, evals, step_times);
  the trained parameters end up in `model`."""
  lead = jax.process_index() == 0
  rows_per_step = config.grad_accum * config.batch_size
  options = StepOptions.from_config(config)
  metrics_log = (MetricsLog(run_dir / "metrics.jsonl", resumed_from=resumed_from)
                 if lead else None)
  reporters = (report.Reporters(config, run_dir, resumed_from=resumed_from)
               if lead and config.reporters else None)
  history, evals, step_times = [], [], []
  last = config.steps if until_step is None else min(until_step, config.steps)
  saved = step = int(state.step)
  stop = None  # the exception that ends the run early

  def save(step, state, position):
    checkpointer.save(step, state, {"data_position": position, "seed": config.seed,
                                    "config": config.to_dict()})

  try:
    with deferred_signals() as signals:
      for step in range(step + 1, last + 1):
        t0 = time.perf_counter()
        host = train_rows.take(position, rows_per_step)
        host = {k: v.reshape(config.grad_accum, config.batch_size, *v.shape[1:])
                for k, v in host.items()}
        shardings = row_shardings(host, mesh, batch_dim=1)
        batch = {k: sharding_lib.global_array(v, shardings[k]) for k, v in host.items()}
        state, metrics = train_step(state, rest, batch, graphdef=graphdef,
                                    options=options, mesh=mesh, ref_params=ref_params)
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        position += rows_per_step
        elapsed = time.perf_counter() - t0
        step_times.append(elapsed)
        record["tokens_per_s"] = config.tokens_per_step / elapsed
        finite = math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
        if finite and (step % config.eval_every == 0 or step == last):
          evaluation = {"step": step, **evaluate(
              graphdef, state.params, rest, val_rows, config.batch_size, mesh,
              options=options, ref_params=ref_params)}
          evals.append(evaluation)
          record.update(evaluation)
        history.append(record)
        if lead:
          metrics_log.write(record)
          if reporters is not None:
            reporters.write(record)
          if on_step is not None:
            on_step(record)
        if not finite:  # this step's state is not saved
          stop = NonFiniteLoss(
              f"step {step}: loss={record['loss']} grad_norm={record['grad_norm']} "
              "(not finite): training stopped; ")
          break
        if step % config.checkpoint_every == 0 or step == last:
          save(step, state, position)
          saved = step
        if signals:
          stop = TrainingInterrupted(run_dir, step, signals[0])
          if saved != step:
            save(step, state, position)
            saved = step
          break
  finally:
    checkpointer.close()
    if metrics_log is not None:
      metrics_log.close()
    if reporters is not None:
      reporters.close()
  if lead and history:
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
  if isinstance(stop, NonFiniteLoss):
    latest = checkpointer.latest_step()
    raise NonFiniteLoss(str(stop) + (
        "no checkpoint was saved" if latest is None else
        f"the last good checkpoint is step {latest} (resume from it with a lower "
        "--lr or --clip-norm)"))
  if stop is not None:
    raise stop
  nnx.update(model, state.params)
  return history, evals, step_times

"""Training: the masked next-token loss, AdamW, the jitted steps and the loop.

One optimizer step: the global batch [A, B, T] (A gradient-accumulation
micro-batches of B packed rows) is split over the ("data", "fsdp") mesh;
`lax.scan` sums the loss and gradients of the micro-batches; the mean over
all target tokens of the step is the loss; AdamW (fp32 state, like the fp32
parameters) applies the clipped update. Compute runs in `dtype` (bf16 by
default), parameters are stored in `param_dtype` (fp32). The settings come
from a `swajax.train_config.TrainConfig`; the jitted programs take only the
parts they depend on (`StepOptions`, `ModelSpec`) as static arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import models
from models.moe import load_balancing_loss
from swajax import data as data_lib
from swajax import lora as lora_lib
from swajax import sharding as sharding_lib
from swajax.dtypes import DTYPES
from swajax.hf_io import load_hf
from swajax.metrics import MetricsLog, plot_losses
from swajax.train_config import TrainConfig


# ----------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------

def masked_loss_sums(logits, targets, loss_mask):
  """(sum of token losses, number of target tokens), both fp32 scalars.

  logits [B, T, V] (any float dtype, upcast to fp32); targets [B, T] int;
  loss_mask [B, T] (1 = a target). Cross-entropy of each target under the
  logits of its position; positions with mask 0 contribute nothing.
  Returning sums, not a mean, lets micro-batches and devices combine exactly.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask)


def batch_loss_sums(model, batch):
  """`masked_loss_sums` of `model` on packed rows (a dict of [B, T] arrays),
  and the router's load-balancing loss over the rows' tokens (padding
  excluded; `models.moe.load_balancing_loss`), 0 for a model without experts:
  (loss sum, target count, load-balancing loss), fp32 scalars."""
  logits, router_logits = model.forward_with_router_logits(
      batch["input_ids"], positions=batch["positions"],
      segment_ids=batch["segment_ids"])
  loss_sum, count = masked_loss_sums(logits, batch["targets"], batch["loss_mask"])
  if router_logits is None:
    return loss_sum, count, jnp.zeros([], jnp.float32)
  balance = load_balancing_loss(router_logits, model.config.experts_per_token,
                                batch["segment_ids"] != data_lib.PADDING_SEGMENT)
  return loss_sum, count, balance


# ----------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepOptions:
  """The `TrainConfig` fields the jitted train step reads: the optimizer and
  its schedule (the model's own settings travel in its graphdef).

  A static jit argument: runs that differ in anything else (a resumed run,
  another folder or data set, tests, benchmarks) share compilations within a
  process. Checked by `TrainConfig`, of which `from_config` takes the values.
  """

  lr: float
  min_lr_ratio: float
  warmup_steps: int
  weight_decay: float
  beta1: float
  beta2: float
  clip_norm: float
  router_aux_loss_coef: float | None  # None: the model config's
  schedule_steps: int  # the cosine's length: config.schedule_steps or config.steps
  lora_dropout: float = 0.0  # > 0: a dropout key per step (`lora.set_dropout_key`)

  @classmethod
  def from_config(cls, config: TrainConfig) -> StepOptions:
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)
              if f.name != "schedule_steps"}
    return cls(**values, schedule_steps=config.schedule_steps or config.steps)


def make_schedule(options: StepOptions) -> optax.Schedule:
  """Linear warmup from 0 to lr over min(warmup_steps, schedule_steps - 1)
  steps, then cosine decay to lr * min_lr_ratio at `schedule_steps`; constant
  after it."""
  warmup = min(options.warmup_steps, options.schedule_steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=options.lr, warmup_steps=warmup,
      decay_steps=options.schedule_steps, end_value=options.lr * options.min_lr_ratio)


def make_optimizer(options: StepOptions, params) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW; weight decay only on matrices (ndim >= 2)."""
  decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(options.clip_norm),
      optax.adamw(make_schedule(options), b1=options.beta1, b2=options.beta2,
                  weight_decay=options.weight_decay, mask=decay_mask))


# ----------------------------------------------------------------------------
# Model and train state
# ----------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """What an optimizer step updates (a pytree; a checkpoint holds all of it)."""

  params: Any     # nnx.State of the model's nnx.Param leaves
  opt_state: Any  # the optax state of `make_optimizer`
  step: jax.Array  # int32 scalar: optimizer steps done


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything that builds a fresh `CausalLM`: hashable, a static jit argument."""

  config: models.ModelConfig
  seed: int
  dtype: str        # compute, a `DTYPES` name
  param_dtype: str  # parameters, a `DTYPES` name
  attn_impl: str
  remat: str

  @classmethod
  def from_config(cls, config: TrainConfig, model_config: models.ModelConfig) -> ModelSpec:
    return cls(model_config, config.seed, config.dtype, config.param_dtype,
               config.attn_impl, config.remat)

  def create(self):
    """(graphdef, params, rest) of a new model: nnx.split(model, nnx.Param, ...)."""
    model = models.CausalLM(self.config, rngs=nnx.Rngs(self.seed),
                            dtype=DTYPES[self.dtype],
                            param_dtype=DTYPES[self.param_dtype],
                            attn_impl=self.attn_impl, remat=self.remat)
    return nnx.split(model, nnx.Param, ...)


def model_config_for(config: TrainConfig) -> models.ModelConfig:
  """The `models.ModelConfig` of a fresh run: `config.model` when it is one,
  else preset(**model_overrides)."""
  if isinstance(config.model, models.ModelConfig):
    return config.model
  preset = getattr(models, config.model, None)
  if not config.model.endswith("_tiny") or not callable(preset):
    presets = sorted(n for n in dir(models) if n.endswith("_tiny"))
    raise ValueError(f"model={config.model!r}: expected a preset, one of {presets}")
  return preset(**dict(config.model_overrides))


def init_model(config: TrainConfig, mesh):
  """(model, graphdef, rest, state): parameters and optimizer state on `mesh`.

  state: a `TrainState`; rest = the model's non-parameter state. A fresh
  model is initialised inside jit straight into its shardings; an HF
  checkpoint is read by `load_hf(mesh=)` straight into the shardings.
  A LoRA run (config.lora_rank) then adds the adapters: state.params holds
  only them (and the optimizer state their shapes), rest the frozen base.
  """
  if config.init_from_hf is not None:
    # load_hf takes one dtype: load the weights in param_dtype, each device
    # reading its own block, then use them in a model built with this run's
    # compute dtype, remat and attn_impl.
    loaded = load_hf(config.init_from_hf, dtype=DTYPES[config.param_dtype],
                     attn_impl=config.attn_impl, mesh=mesh)
    spec = ModelSpec.from_config(config, loaded.config)
    graphdef = nnx.eval_shape(spec.create)[0]
    _, params, rest = nnx.split(loaded, nnx.Param, ...)
    rest = jax.tree.map(lambda x: sharding_lib.global_array(
        np.asarray(x), NamedSharding(mesh, P())), rest)
  else:
    spec = ModelSpec.from_config(config, model_config_for(config))
    graphdef = nnx.eval_shape(spec.create)[0]
    params, rest = _fresh_params(spec=spec, mesh=mesh)
  if config.lora_spec is not None:
    graphdef, params, rest = _add_adapters(nnx.merge(graphdef, params, rest),
                                           config, mesh)
  state = TrainState(
      params=params,
      opt_state=_init_opt_state(params, options=StepOptions.from_config(config),
                                mesh=mesh),
      step=jax.device_put(jnp.zeros([], jnp.int32), NamedSharding(mesh, P())))
  return nnx.merge(graphdef, params, rest), graphdef, rest, state


def _add_adapters(model, config: TrainConfig, mesh):
  """(graphdef, adapters, rest) of `model` with `config.lora_spec`'s
  adapters (seeded by config.seed), the adapters placed on `mesh`; rest holds
  the base arrays as they were (quantized under QLoRA)."""
  lora_lib.add_lora(model, config.lora_spec, rngs=nnx.Rngs(config.seed))
  graphdef, adapters, rest = nnx.split(model, lora_lib.TRAINABLE, ...)
  return graphdef, jax.device_put(
      adapters, sharding_lib.state_shardings(adapters, mesh)), rest


@functools.partial(jax.jit, static_argnames=("spec", "mesh"))
def _fresh_params(*, spec: ModelSpec, mesh):
  """(params, rest) of a fresh model, params sharded per their annotations."""
  _, params, rest = spec.create()
  replicated = NamedSharding(mesh, P())
  return (jax.lax.with_sharding_constraint(
              params, sharding_lib.state_shardings(params, mesh)),
          jax.lax.with_sharding_constraint(rest, jax.tree.map(lambda _: replicated, rest)))


def train_state_shardings(params, tx, mesh) -> TrainState:
  """The shardings of a `TrainState`: parameters per their annotations, every
  params-like optimizer subtree like the parameters, the rest (counts, step)
  replicated."""
  replicated = NamedSharding(mesh, P())
  param_shardings = sharding_lib.state_shardings(params, mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
      transform_non_params=lambda _: replicated)
  return TrainState(params=param_shardings, opt_state=opt_shardings, step=replicated)


@functools.partial(jax.jit, static_argnames=("options", "mesh"))
def _init_opt_state(params, *, options: StepOptions, mesh):
  tx = make_optimizer(options, params)
  return jax.lax.with_sharding_constraint(
      tx.init(params), train_state_shardings(params, tx, mesh).opt_state)


@functools.partial(jax.jit, static_argnames=("graphdef", "options", "mesh"),
                   donate_argnames="state")
def train_step(state: TrainState, rest, batch, *, graphdef, options: StepOptions, mesh):
  """One optimizer step: (state, metrics); the new state keeps its shardings.

  batch: dict of [A, B, T] arrays (A micro-batches). state.params: every
  parameter, or a LoRA run's adapters (the base is in `rest`, constant here:
  no gradient is taken for it).
  metrics: loss (mean over the step's target tokens), grad_norm (before
  clipping), lr (of this step), tokens (target count); with experts also
  router_aux_loss (the load-balancing loss, micro-batches weighted by their
  targets), which times the coefficient joins the optimised loss.
  """
  params = state.params
  tx = make_optimizer(options, params)
  model_config = nnx.merge(graphdef, params, rest).config
  coef = (model_config.router_aux_loss_coef if options.router_aux_loss_coef is None
          else options.router_aux_loss_coef)

  def accumulate(carry, xs):
    micro, index = xs
    def loss_fn(p):
      model = nnx.merge(graphdef, p, rest)
      if options.lora_dropout > 0:  # a mask per step and micro-batch
        lora_lib.set_dropout_key(model, jax.random.fold_in(
            jax.random.fold_in(jax.random.key(0), state.step), index))
      loss_sum, count, balance = batch_loss_sums(model, micro)
      # Summed over micro-batches and divided by the targets below: the
      # token-mean loss plus coef times the (target-weighted) balance loss.
      return loss_sum + coef * balance * count, (loss_sum, count, balance * count)
    (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(jnp.add, carry, (grads, *sums)), None

  zeros = (jax.tree.map(jnp.zeros_like, params), *(jnp.zeros([], jnp.float32),) * 3)
  micro_batches = jax.tree.leaves(batch)[0].shape[0]
  (grads, loss_sum, count, balance_sum), _ = jax.lax.scan(
      accumulate, zeros, (batch, jnp.arange(micro_batches)))
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state.opt_state, params)
  new_state = TrainState(params=optax.apply_updates(params, updates),
                         opt_state=opt_state, step=state.step + 1)
  new_state = jax.lax.with_sharding_constraint(
      new_state, train_state_shardings(params, tx, mesh))
  metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads),
             "lr": make_schedule(options)(state.step), "tokens": count}
  if model_config.num_experts:
    metrics["router_aux_loss"] = balance_sum / denom
  return new_state, metrics


@functools.partial(jax.jit, static_argnames="graphdef")
def eval_step(params, rest, batch, *, graphdef):
  """(loss sum, target count) of the model on a batch of [B, T] rows."""
  return batch_loss_sums(nnx.merge(graphdef, params, rest), batch)[:2]


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
  """What a run produced: its folder, the trained model and its figures."""

  run_dir: Path
  model: Any                # the trained CausalLM (params on the mesh)
  tokenizer: Any
  history: list[dict]       # one dict per step: step, loss, grad_norm, lr, ...
  evals: list[dict]         # step, val_loss, val_ppl
  tokens_per_s: float       # mean over the run's steps after the first (compile)
  resumed_from: int | None  # the checkpoint step this run started from
  notes: list[str] = dataclasses.field(default_factory=list)  # long documents, LoRA sizes


class TrainingInterrupted(Exception):
  """SIGINT or SIGTERM stopped a run after `step`, whose checkpoint is saved."""

  def __init__(self, run_dir: Path, step: int, signum: int):
    self.run_dir, self.step, self.signum = run_dir, step, signum
    super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step} "
                     f"(checkpoint {step} saved in {run_dir / 'checkpoints'})")


class NonFiniteLoss(ValueError):
  """A step's loss or gradient norm was NaN or infinite; the run stopped."""


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
  the same (`_DATA_FIELDS`), `steps` beyond the checkpoint. A changed `steps`
  keeps the run's LR schedule unless schedule_steps is set: the note says which.
  """
  for name in _DATA_FIELDS:
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
    schedule).

  Raises TrainingInterrupted after SIGINT/SIGTERM (the current step finishes,
  then a checkpoint, metrics.jsonl and loss.png are written), NonFiniteLoss
  at the first NaN/inf loss or gradient norm (that step is not saved: the
  last checkpoint holds the last good state), ValueError/OSError (one line)
  for bad settings, data, or a checkpoint that cannot be written.
  """
  log = log or (lambda line: None)
  lead = jax.process_index() == 0
  # Lazy: orbax takes ~0.5 s to import (-X importtime, on top of the ~2.6 s of
  # `import swajax`), which only a training run needs.
  from swajax.checkpoint import Checkpointer

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
    train_rows, val_rows = data_lib.load_data(config, tokenizer, notes)
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
    if isinstance(tokenizer, data_lib.HFTokenizer) and not (
        copy.exists() and copy.samefile(tokenizer.file)):
      shutil.copyfile(tokenizer.file, copy)
  if checkpointer is None:
    checkpointer, resumed_from = Checkpointer(run_dir / "checkpoints",
                                              keep=config.keep_checkpoints), None
  with jax.set_mesh(mesh):
    history, evals, step_times = _loop(
        config, state, graphdef, rest, train_rows, val_rows, position, mesh,
        checkpointer, run_dir, resumed_from, until_step, on_step, model)
  timed = step_times[1:] or step_times
  tokens_per_s = config.tokens_per_step * len(timed) / max(sum(timed), 1e-9)
  return TrainResult(run_dir, model, tokenizer, history, evals, tokens_per_s, resumed_from,
                     notes)


def _loop(config, state, graphdef, rest, train_rows, val_rows, position, mesh,
          checkpointer, run_dir, resumed_from, until_step, on_step, model):
  """The steps of `train` from state.step + 1: (history, evals, step_times);
  the trained parameters end up in `model`."""
  lead = jax.process_index() == 0
  rows_per_step = config.grad_accum * config.batch_size
  options = StepOptions.from_config(config)
  step_sharding = sharding_lib.batch_sharding(mesh, 3, batch_dim=1)
  eval_sharding = sharding_lib.batch_sharding(mesh, 2)
  metrics_log = (MetricsLog(run_dir / "metrics.jsonl", resumed_from=resumed_from)
                 if lead else None)
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
        batch = {k: sharding_lib.global_array(
            v.reshape(config.grad_accum, config.batch_size, config.seq_len), step_sharding)
            for k, v in host.items()}
        state, metrics = train_step(state, rest, batch, graphdef=graphdef,
                                    options=options, mesh=mesh)
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        position += rows_per_step
        elapsed = time.perf_counter() - t0
        step_times.append(elapsed)
        record["tokens_per_s"] = config.tokens_per_step / elapsed
        finite = math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
        if finite and (step % config.eval_every == 0 or step == last):
          val_loss = evaluate(graphdef, state.params, rest, val_rows,
                              config.batch_size, eval_sharding)
          evaluation = {"step": step, "val_loss": val_loss,
                        "val_ppl": math.exp(min(val_loss, 700.0))}
          evals.append(evaluation)
          record.update(evaluation)
        history.append(record)
        if lead:
          metrics_log.write(record)
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


# The fields that fix the training row stream (which rows, in which order):
# a checkpoint's data position means nothing under other values.
_DATA_FIELDS = ("seed", "seq_len", "data", "val_data", "val_percent", "tokenizer",
                "train_prompt", "corpus_max_bytes", "too_long")


def evaluate(graphdef, params, rest, rows: dict, batch_size: int, sharding) -> float:
  """Mean target-token loss of `params` over validation rows, in batches."""
  total = count = 0.0
  for start in range(0, len(rows["input_ids"]), batch_size):
    batch = {k: sharding_lib.global_array(v[start:start + batch_size], sharding)
             for k, v in rows.items()}
    loss_sum, n = eval_step(params, rest, batch, graphdef=graphdef)
    total, count = total + float(loss_sum), count + float(n)
  return total / max(count, 1.0)

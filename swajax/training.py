"""Training: `TrainConfig`, the masked next-token loss, AdamW, and the jitted loop.

One optimizer step: the global batch [A, B, T] (A gradient-accumulation
micro-batches of B packed rows) is split over the ("data", "fsdp") mesh;
`lax.scan` sums the loss and gradients of the micro-batches; the mean over
all target tokens of the step is the loss; AdamW (fp32 state, like the fp32
parameters) applies the clipped update. Compute runs in `dtype` (bf16 by
default), parameters are stored in `param_dtype` (fp32).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import models
from pallas_kernels import IMPLS
from swajax import data as data_lib
from swajax import sharding as sharding_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT = ("none", "full", "dots_saveable")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run depends on; every field is a `swajax train` flag."""

  # Model: the name of a preset function of `models` plus ModelConfig field
  # overrides; or a ModelConfig itself (Python, or a table of its fields in a
  # config file), which takes no overrides (use dataclasses.replace); or a
  # Hugging Face checkpoint folder to fine-tune (then `model` is ignored).
  model: str | models.ModelConfig = "mistral_tiny"
  model_overrides: tuple[tuple[str, Any], ...] = ()
  init_from_hf: str | None = None
  attn_impl: str = "auto"
  dtype: str = "bfloat16"          # compute
  param_dtype: str = "float32"     # parameters and optimizer state
  remat: str = "none"              # "none" | "full" | "dots_saveable"
  # Data: None = the embedded Python-stdlib corpus; else a folder, a text file
  # or a .jsonl ({"text"} or {"prompt", "completion"}) file.
  data: str | None = None
  val_data: str | None = None      # None: hold out val_percent of `data`
  val_percent: float = 5.0
  tokenizer: str | None = None     # tokenizer.json; None: bytes (or the HF folder's)
  train_prompt: bool = False       # also train on JSONL prompts
  corpus_max_bytes: int = 4_000_000
  seq_len: int = 256               # T
  batch_size: int = 8              # B: rows per micro-batch, global
  grad_accum: int = 1              # A: micro-batches per optimizer step
  # Optimizer: AdamW, linear warmup (capped at steps - 1) then cosine decay
  # to lr * min_lr_ratio; global-norm clipping; no decay on norms/biases.
  lr: float = 2e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 30
  weight_decay: float = 0.1
  beta1: float = 0.9
  beta2: float = 0.95
  clip_norm: float = 1.0
  # Loop.
  steps: int = 250
  seed: int = 0
  eval_every: int = 100            # also after the last step
  eval_batches: int = 8
  # Parallelism: devices on the "fsdp" mesh axis; the rest go to "data".
  fsdp: int = 1
  # Output: run folder (None: runs/<timestamp>) and checkpoints.
  out: str | None = None
  checkpoint_every: int = 100      # also after the last step
  keep_checkpoints: int = 2

  def __post_init__(self):
    hints = typing.get_type_hints(type(self))
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if hints[field.name] is float and _is_int(value):
        object.__setattr__(self, field.name, float(value))
      elif not _has_type(value, hints[field.name]):
        raise ValueError(f"{field.name}={value!r}: expected {_type_name(hints[field.name])}")
    object.__setattr__(self, "model_overrides", tuple(
        (str(k), _hashable(v)) for k, v in dict(self.model_overrides).items()))
    _check_field_names(models.ModelConfig, dict(self.model_overrides),
                       "model_overrides.")
    if isinstance(self.model, models.ModelConfig) and self.model_overrides:
      raise ValueError(
          f"model_overrides={dict(self.model_overrides)!r} with a ModelConfig "
          "model: expected none (overrides apply to a preset name; change the "
          "ModelConfig with dataclasses.replace)")
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every",
                 "eval_batches", "fsdp", "checkpoint_every", "keep_checkpoints",
                 "corpus_max_bytes"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)!r}: expected an int >= 1")
    for name in ("warmup_steps", "seed"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)!r}: expected an int >= 0")
    for name, lo, hi in (("lr", 0.0, math.inf), ("min_lr_ratio", 0.0, 1.0),
                         ("weight_decay", 0.0, math.inf), ("beta1", 0.0, 1.0),
                         ("beta2", 0.0, 1.0), ("clip_norm", 0.0, math.inf),
                         ("val_percent", 0.0, 100.0)):
      value = getattr(self, name)
      if not lo <= value <= hi or (name in ("lr", "clip_norm") and value == 0):
        raise ValueError(f"{name}={value!r}: expected a float in "
                         f"{'(' if name in ('lr', 'clip_norm') else '['}{lo}, {hi}]")
    for name, choices in (("dtype", DTYPES), ("param_dtype", DTYPES),
                          ("remat", REMAT), ("attn_impl", ("auto", *IMPLS))):
      if getattr(self, name) not in choices:
        raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {sorted(choices)}")

  @classmethod
  def from_dict(cls, values: dict) -> "TrainConfig":
    """From a TOML/YAML/JSON mapping (e.g. a run's config.json); unknown keys
    are errors. A mapping under `model` is the fields of a ModelConfig."""
    _check_field_names(cls, values, "")
    values = dict(values)
    if isinstance(values.get("model_overrides"), dict):
      values["model_overrides"] = tuple(values["model_overrides"].items())
    if isinstance(values.get("model"), dict):
      _check_field_names(models.ModelConfig, values["model"], "model.")
      values["model"] = models.ModelConfig(**values["model"])
    return cls(**values)

  def to_dict(self) -> dict:
    """JSON-ready: model_overrides as a mapping, a ModelConfig model as the
    mapping of its fields; `from_dict` rebuilds an equal config."""
    out = dataclasses.asdict(self)  # a ModelConfig model becomes its fields
    out["model_overrides"] = dict(self.model_overrides)
    return out

  @property
  def tokens_per_step(self) -> int:
    return self.grad_accum * self.batch_size * self.seq_len


def _check_field_names(cls, values: dict, prefix: str) -> None:
  """Raises ValueError for a key of `values` that is not a field of `cls`."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(f"{prefix}{unknown[0]}={values[unknown[0]]!r}: not a "
                     f"{cls.__name__} field (fields: {', '.join(sorted(names))})")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _has_type(value, hint) -> bool:
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    return any(_has_type(value, arg) for arg in typing.get_args(hint))
  if hint is type(None):
    return value is None
  if hint is int:
    return _is_int(value)
  if hint is float:
    return isinstance(value, float)
  if hint is bool:
    return isinstance(value, bool)
  if hint is str:
    return isinstance(value, str)
  if hint is models.ModelConfig:
    return isinstance(value, models.ModelConfig)
  if typing.get_origin(hint) is tuple:  # model_overrides: pairs or a dict
    try:
      return all(isinstance(k, str) for k in dict(value))
    except (TypeError, ValueError):
      return False
  raise TypeError(f"TrainConfig: no check for type {hint!r}")


def _type_name(hint) -> str:
  if typing.get_origin(hint) is tuple:
    return "a mapping of ModelConfig field names to values"
  names = {int: "an int", float: "a float", str: "a string", bool: "a bool",
           type(None): "None", models.ModelConfig: "a ModelConfig"}
  return " or ".join(names[a] for a in (typing.get_args(hint) or (hint,)))


def _hashable(value):
  return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


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
  """`masked_loss_sums` of `model` on packed rows (a dict of [B, T] arrays)."""
  logits = model(batch["input_ids"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"])
  return masked_loss_sums(logits, batch["targets"], batch["loss_mask"])


# ----------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------

def make_schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to lr over min(warmup_steps, steps - 1) steps, then
  cosine decay to lr * min_lr_ratio at `steps`."""
  warmup = min(config.warmup_steps, config.steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
      decay_steps=config.steps, end_value=config.lr * config.min_lr_ratio)


def make_optimizer(config: TrainConfig, params) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW; weight decay only on matrices (ndim >= 2)."""
  decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(make_schedule(config), b1=config.beta1, b2=config.beta2,
                  weight_decay=config.weight_decay, mask=decay_mask))


# ----------------------------------------------------------------------------
# Model and train state
# ----------------------------------------------------------------------------

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


# The fields the jitted train step reads (the model's own settings travel in
# its graphdef); everything else (data, folders, evaluation) cannot change it.
_STEP_FIELDS = ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2",
                "clip_norm", "steps")


def compile_key(config: TrainConfig) -> TrainConfig:
  """The config as a static jit argument: only the step's own fields, so runs
  that differ in anything else (a resumed run, another folder or data set,
  tests, benchmarks) share compilations within a process."""
  return TrainConfig(**{name: getattr(config, name) for name in _STEP_FIELDS})


def init_model(config: TrainConfig, mesh):
  """(model, graphdef, rest, state): parameters and optimizer state on `mesh`.

  state = {"params", "opt_state", "step"}; rest = the model's non-parameter
  state. A fresh model is initialised inside jit straight into its shardings;
  an HF checkpoint is read by `load_hf(mesh=)` straight into the shardings.
  """
  if config.init_from_hf is not None:
    # load_hf takes one dtype: load the weights in param_dtype, each device
    # reading its own block, then use them in a model built with this run's
    # compute dtype, remat and attn_impl.
    from swajax.hf_io import load_hf

    loaded = load_hf(config.init_from_hf, dtype=DTYPES[config.param_dtype],
                     attn_impl=config.attn_impl, mesh=mesh)
    spec = (loaded.config, config.seed, config.dtype, config.param_dtype,
            config.attn_impl, config.remat)
    graphdef = nnx.eval_shape(lambda: _create(spec))[0]
    _, params, rest = nnx.split(loaded, nnx.Param, ...)
    rest = jax.tree.map(lambda x: sharding_lib.global_array(
        np.asarray(x), NamedSharding(mesh, P())), rest)
  else:
    spec = (model_config_for(config), config.seed, config.dtype, config.param_dtype,
            config.attn_impl, config.remat)
    graphdef = nnx.eval_shape(lambda: _create(spec))[0]
    params, rest = _fresh_params(spec=spec, mesh=mesh)
  state = {"params": params,
           "opt_state": _init_opt_state(params, config=compile_key(config), mesh=mesh),
           "step": jax.device_put(jnp.zeros([], jnp.int32), NamedSharding(mesh, P()))}
  return nnx.merge(graphdef, params, rest), graphdef, rest, state


def _create(spec):
  """(graphdef, params, rest) of CausalLM for spec = (ModelConfig, seed, dtype,
  param_dtype, attn_impl, remat): hashable, a static jit argument."""
  model_config, seed, dtype, param_dtype, attn_impl, remat = spec
  model = models.CausalLM(model_config, rngs=nnx.Rngs(seed), dtype=DTYPES[dtype],
                          param_dtype=DTYPES[param_dtype], attn_impl=attn_impl,
                          remat=remat)
  return nnx.split(model, nnx.Param, ...)


@functools.partial(jax.jit, static_argnames=("spec", "mesh"))
def _fresh_params(*, spec, mesh):
  """(params, rest) of a fresh model, params sharded per their annotations."""
  _, params, rest = _create(spec)
  replicated = NamedSharding(mesh, P())
  return (jax.lax.with_sharding_constraint(
              params, sharding_lib.state_shardings(params, mesh)),
          jax.lax.with_sharding_constraint(rest, jax.tree.map(lambda _: replicated, rest)))


def train_state_shardings(params, tx, mesh):
  """Shardings of {"params", "opt_state", "step"}: parameters per their
  annotations, every params-like optimizer subtree like the parameters, the
  rest (counts, step) replicated."""
  replicated = NamedSharding(mesh, P())
  param_shardings = sharding_lib.state_shardings(params, mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
      transform_non_params=lambda _: replicated)
  return {"params": param_shardings, "opt_state": opt_shardings, "step": replicated}


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _init_opt_state(params, *, config: TrainConfig, mesh):
  tx = make_optimizer(config, params)
  return jax.lax.with_sharding_constraint(
      tx.init(params), train_state_shardings(params, tx, mesh)["opt_state"])


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "mesh"),
                   donate_argnames="state")
def train_step(state, rest, batch, *, graphdef, config: TrainConfig, mesh):
  """One optimizer step: (state, metrics); the new state keeps its shardings.

  batch: dict of [A, B, T] arrays (A micro-batches); config: `compile_key(...)`.
  metrics: loss (mean over the step's target tokens), grad_norm (before
  clipping), lr (of this step), tokens (target count).
  """
  params = state["params"]
  tx = make_optimizer(config, params)

  def accumulate(carry, micro):
    loss_fn = lambda p: batch_loss_sums(nnx.merge(graphdef, p, rest), micro)
    (loss_sum, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(jnp.add, carry, (grads, loss_sum, count)), None

  zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros([], jnp.float32),
           jnp.zeros([], jnp.float32))
  (grads, loss_sum, count), _ = jax.lax.scan(accumulate, zeros, batch)
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_state = {"params": optax.apply_updates(params, updates),
               "opt_state": opt_state, "step": state["step"] + 1}
  new_state = jax.lax.with_sharding_constraint(
      new_state, train_state_shardings(params, tx, mesh))
  metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads),
             "lr": make_schedule(config)(state["step"]), "tokens": count}
  return new_state, metrics


@functools.partial(jax.jit, static_argnames="graphdef")
def eval_step(params, rest, batch, *, graphdef):
  """(loss sum, target count) of the model on a batch of [B, T] rows."""
  return batch_loss_sums(nnx.merge(graphdef, params, rest), batch)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def load_data(config: TrainConfig, tokenizer) -> tuple[data_lib.PackedRows, dict]:
  """(training rows, validation rows [R, T] dict) for `config`."""
  if config.data is None:
    train_docs = [data_lib.encode_text(tokenizer, text) for text in data_lib.stdlib_corpus(
        "train", max_bytes=config.corpus_max_bytes, val_percent=config.val_percent)]
    val_docs = [data_lib.encode_text(tokenizer, text) for text in data_lib.stdlib_corpus(
        "validation", max_bytes=max(config.corpus_max_bytes // 10, 1),
        val_percent=config.val_percent)]
  else:
    keyed = data_lib.read_documents(config.data, tokenizer, train_prompt=config.train_prompt)
    if config.val_data is None:
      train_docs, val_docs = data_lib.split_documents(keyed, config.val_percent)
    else:
      train_docs = [doc for _, doc in keyed]
      val_docs = [doc for _, doc in data_lib.read_documents(
          config.val_data, tokenizer, train_prompt=config.train_prompt)]
  # Prompt/completion records stay whole; plain text streams end to end.
  whole = config.data is not None and config.data.endswith(".jsonl")
  pack = lambda docs: data_lib.pack_sequences(
      docs, config.seq_len, pad_id=tokenizer.pad_id, split_documents=not whole)
  train_rows = data_lib.PackedRows(pack(train_docs), seed=config.seed)
  # Validation: the first eval_batches * batch_size rows, each once (a short
  # validation set is not repeated to fill them), in whole batches.
  val_rows = {k: v[:config.eval_batches * config.batch_size]
              for k, v in pack(val_docs).items()}
  return train_rows, data_lib.pad_rows(val_rows, config.batch_size,
                                       pad_id=tokenizer.pad_id)


def resolve_tokenizer(config: TrainConfig):
  """config.tokenizer, else the HF folder's tokenizer.json, else bytes."""
  if config.tokenizer is None and config.init_from_hf is not None:
    candidate = Path(config.init_from_hf) / "tokenizer.json"
    return data_lib.load_tokenizer(candidate if candidate.is_file() else None)
  return data_lib.load_tokenizer(config.tokenizer)


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


def default_run_dir() -> Path:
  return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def train(config: TrainConfig, *, resume: bool = False, until_step: int | None = None,
          on_step: Callable[[dict], None] | None = None) -> TrainResult:
  """Trains per `config`; returns a `TrainResult` (run_dir, trained model, ...).

  Writes into `config.out` (None: runs/<timestamp>) config.json, checkpoints/
  (orbax, every `checkpoint_every` steps and after the last), metrics.jsonl
  (one line per step) and loss.png; `swajax train` adds hf/ and sample.txt.

  resume: continue from the latest checkpoint in `config.out` (same data
    order, optimizer state and schedule: the losses continue exactly).
  until_step: stop after this step (with a checkpoint), as if preempted.
  on_step: called on process 0 after every step with that step's metrics
    (and val_loss/val_ppl on eval steps).
  """
  run_dir = Path(config.out) if config.out is not None else default_run_dir()
  tokenizer = resolve_tokenizer(config)
  train_rows, val_rows = load_data(config, tokenizer)
  mesh = sharding_lib.make_mesh(config.fsdp)
  rows_per_step = config.grad_accum * config.batch_size
  if config.batch_size % mesh.size:
    raise ValueError(f"batch_size={config.batch_size}: expected a multiple of the "
                     f"device count {mesh.size} (mesh {dict(mesh.shape)})")
  from swajax.checkpoint import Checkpointer  # orbax: imported when training

  lead = jax.process_index() == 0
  with jax.set_mesh(mesh):
    model, graphdef, rest, state = init_model(config, mesh)
    if model.config.vocab_size < tokenizer.vocab_size:
      raise ValueError(f"tokenizer vocab {tokenizer.vocab_size} > model vocab_size="
                       f"{model.config.vocab_size}: pick a matching tokenizer or model")
    if lead:
      run_dir.mkdir(parents=True, exist_ok=True)
      (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
      copy = run_dir / "tokenizer.json"  # `swajax generate` reads it
      if isinstance(tokenizer, data_lib.HFTokenizer) and not (
          copy.exists() and copy.samefile(tokenizer.file)):
        shutil.copyfile(tokenizer.file, copy)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.keep_checkpoints)
    position, resumed_from = 0, None
    if resume:
      state, meta = checkpointer.restore(state)
      _check_same_data(config, meta, checkpointer)
      position, resumed_from = meta["data_position"], int(state["step"])
    elif checkpointer.latest_step() is not None:
      checkpointer.close()
      raise ValueError(f"out={str(run_dir)!r} already holds checkpoints: resume it "
                       "(--resume) or choose another --out")
    key = compile_key(config)
    step_sharding = sharding_lib.batch_sharding(mesh, 3, batch_dim=1)
    eval_sharding = sharding_lib.batch_sharding(mesh, 2)
    metrics_file = _open_metrics(run_dir / "metrics.jsonl", resumed_from) if lead else None
    history, evals, step_times = [], [], []
    first = int(state["step"])
    last = config.steps if until_step is None else min(until_step, config.steps)
    try:
      for step in range(first + 1, last + 1):
        t0 = time.perf_counter()
        host = train_rows.take(position, rows_per_step)
        batch = {k: sharding_lib.global_array(
            v.reshape(config.grad_accum, config.batch_size, config.seq_len), step_sharding)
            for k, v in host.items()}
        state, metrics = train_step(state, rest, batch, graphdef=graphdef, config=key,
                                    mesh=mesh)
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        position += rows_per_step
        elapsed = time.perf_counter() - t0
        step_times.append(elapsed)
        record["tokens_per_s"] = config.tokens_per_step / elapsed
        if step % config.eval_every == 0 or step == last:
          val_loss = evaluate(graphdef, state["params"], rest, val_rows,
                              config.batch_size, eval_sharding)
          evaluation = {"step": step, "val_loss": val_loss,
                        "val_ppl": math.exp(min(val_loss, 700.0))}
          evals.append(evaluation)
          record.update(evaluation)
        history.append(record)
        if lead:
          metrics_file.write(json.dumps(record) + "\n")
          metrics_file.flush()
          if on_step is not None:
            on_step(record)
        if step % config.checkpoint_every == 0 or step == last:
          checkpointer.save(step, state, {"data_position": position, "seed": config.seed,
                                          "config": config.to_dict()})
    finally:
      checkpointer.close()
      if metrics_file is not None:
        metrics_file.close()
    nnx.update(model, state["params"])
  timed = step_times[1:] or step_times
  tokens_per_s = config.tokens_per_step * len(timed) / max(sum(timed), 1e-9)
  if lead:
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
  return TrainResult(run_dir, model, tokenizer, history, evals, tokens_per_s, resumed_from)


# The fields that fix the training row stream (which rows, in which order):
# a checkpoint's data position means nothing under other values.
_DATA_FIELDS = ("seed", "seq_len", "data", "val_data", "val_percent", "tokenizer",
                "train_prompt", "corpus_max_bytes")


def _check_same_data(config: TrainConfig, meta: dict, checkpointer) -> None:
  """Raises ValueError when a resumed run would read another data stream than
  the one its checkpoint's data position counts rows of."""
  saved = meta.get("config", {})
  for name in _DATA_FIELDS:
    if name in saved and saved[name] != getattr(config, name):
      checkpointer.close()
      raise ValueError(
          f"{name}={getattr(config, name)!r}: the checkpoint was trained with "
          f"{name}={saved[name]!r}, which fixes its data order; resume with the "
          "same value (or start a new run)")


def _open_metrics(path: Path, resumed_from: int | None):
  """metrics.jsonl for writing; on resume keeps the records up to the checkpoint
  (steps after it are about to be redone)."""
  kept = []
  if resumed_from is not None and path.exists():
    kept = [line for line in path.read_text().splitlines()
            if line and json.loads(line)["step"] <= resumed_from]
  f = path.open("w")
  f.writelines(line + "\n" for line in kept)
  return f


def evaluate(graphdef, params, rest, rows: dict, batch_size: int, sharding) -> float:
  """Mean target-token loss of `params` over validation rows, in batches."""
  total = count = 0.0
  for start in range(0, len(rows["input_ids"]), batch_size):
    batch = {k: sharding_lib.global_array(v[start:start + batch_size], sharding)
             for k, v in rows.items()}
    loss_sum, n = eval_step(params, rest, batch, graphdef=graphdef)
    total, count = total + float(loss_sum), count + float(n)
  return total / max(count, 1.0)


def plot_losses(metrics_path: Path, png_path: Path) -> None:
  """Train loss per step and validation loss at eval steps, from metrics.jsonl."""
  # A pyplot-free Figure: no global backend switch (safe inside notebooks).
  from matplotlib.figure import Figure

  records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  ax.plot([r["step"] for r in records], [r["loss"] for r in records],
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

"""`TrainConfig`: every setting of a training run, each a `swajax train` flag.

A flat frozen dataclass whose fields are type-checked on construction (ints
stay ints, an int is accepted for a float, a ModelConfig or a preset name for
`model`), with `from_dict` / `to_dict` for config files and the run's
config.json.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import models
from models.causal_lm import REMAT_POLICIES
from pallas_kernels import IMPLS
from models import lora as lora_lib
from swajax.dtypes import DTYPES
from swajax.training import preference as pref_lib

REMAT = ("none", *REMAT_POLICIES)  # "none": no remat
STAGES = ("sft", "dpo")  # next-token training; preference tuning
TOO_LONG = ("split", "truncate", "drop")  # what becomes of a document > seq_len
REPORT_TO = ("tensorboard", "wandb")  # report_to's integrations (training.report)
# The fields only a LoRA run (lora_rank set) uses: set without it, an error.
LORA_ONLY = ("lora_alpha", "lora_dropout", "lora_targets", "use_rslora",
             "quantize_base", "merge_lora")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run depends on; every field is a `swajax train` flag."""

  # Model: the name of a preset function of `models` plus ModelConfig field
  # overrides (None: "mistral_tiny"); or a ModelConfig itself (Python, or a
  # table of its fields in a config file), which takes no overrides (use
  # dataclasses.replace); or a Hugging Face checkpoint folder to fine-tune
  # (init_from_hf: its config.json is the model; model and model_overrides
  # must then be unset).
  model: str | models.ModelConfig | None = None
  model_overrides: tuple[tuple[str, Any], ...] = ()
  init_from_hf: str | None = None
  attn_impl: str = "auto"
  dtype: str = "bfloat16"          # compute
  param_dtype: str = "float32"     # parameters and optimizer state
  remat: str = "none"              # "none" | "full" | "dots_saveable"
  # LoRA (models.lora): None trains every parameter; a rank R trains only
  # adapters of rank R on lora_targets (PEFT module names, comma-separated, or
  # "all"), scaled by lora_alpha / R (alpha None: 2 * R, LLaMA-Factory's
  # default; use_rslora: alpha / sqrt(R)). quantize_base (QLoRA): hold the
  # frozen base kernels as "int8", "int4" or "nf4". merge_lora: `swajax
  # train` also exports the merged model to hf/ (the adapter goes to hf/adapter/).
  lora_rank: int | None = None
  lora_alpha: float | None = None
  lora_dropout: float = 0.0
  lora_targets: str = lora_lib.ALL
  use_rslora: bool = False
  quantize_base: str | None = None
  merge_lora: bool = False
  # Data: None = the embedded Python-stdlib corpus; else a folder, a text file
  # or a .jsonl ({"text"}, {"prompt", "completion"}, or chat / ShareGPT /
  # Alpaca records: swajax.text.chat) file. too_long: documents longer than
  # seq_len are "split" across rows, "truncate"d or "drop"ped (counted and
  # reported at the end of the run either way).
  data: str | None = None
  val_data: str | None = None      # None: hold out val_percent of `data`
  val_percent: float = 5.0
  # tokenizer.json or "bytes"; None: the init_from_hf folder's (an error when
  # it has none), else bytes.
  tokenizer: str | None = None
  # Chat records' template: a built-in name (swajax.text.chat.TEMPLATES, e.g.
  # "chatml") or a Jinja file; None: the tokenizer's own (ChatML, with a
  # warning, for an HF tokenizer that has none).
  chat_template: str | None = None
  train_prompt: bool = False       # also train on JSONL prompts
  corpus_max_bytes: int = 4_000_000
  too_long: str = "split"
  seq_len: int = 256               # T
  # Stage: "sft" trains the next-token loss; "dpo" trains a preference loss
  # on JSONL {prompt, chosen, rejected} pairs (swajax.training.pref_data,
  # .preference): pref_loss "sigmoid" (DPO) | "ipo" | "hinge" | "orpo" |
  # "simpo", its beta, simpo_gamma (simpo only; None: 0.5), pref_ftx (weight
  # of the chosen answer's NLL added), pref_label_smoothing (sigmoid / simpo:
  # cDPO). The reference (sigmoid, ipo, hinge) is the base with the adapters
  # off (LoRA) or a frozen copy of the starting weights; precompute_ref:
  # its log-probabilities computed once before training instead.
  stage: str = "sft"
  pref_loss: str = "sigmoid"
  pref_beta: float = 0.1
  simpo_gamma: float | None = None
  pref_ftx: float = 0.0
  pref_label_smoothing: float = 0.0
  precompute_ref: bool = False
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
  # Mixture-of-experts models: the router's load-balancing loss (Switch
  # Transformer, as transformers computes it) times this joins the loss;
  # None: the model's `router_aux_loss_coef` (HF's, 0.001 by default); 0: off.
  router_aux_loss_coef: float | None = None
  schedule_steps: int | None = None  # the cosine's length; None: steps (a
                                     # resume keeps the run's, see `train`)
  # Loop.
  steps: int = 250
  seed: int = 0
  eval_every: int = 100            # also after the last step
  eval_batches: int = 8
  # Parallelism: devices on the "fsdp" mesh axis and on the "context" axis
  # (the sequence split over them: context parallelism); the rest go to "data".
  fsdp: int = 1
  context_parallel: int = 1
  # Output: run folder (None: runs/<timestamp>) and checkpoints.
  out: str | None = None
  checkpoint_every: int = 100      # also after the last step
  # Metrics beyond metrics.jsonl: "none", or REPORT_TO names comma-separated
  # (swajax.training.report: TensorBoard event files, a W&B run).
  report_to: str = "none"
  keep_checkpoints: int = 2
  sample_tokens: int = 200         # `swajax train`'s sample.txt length (0: none)

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
                 "eval_batches", "fsdp", "context_parallel", "checkpoint_every", "keep_checkpoints",
                 "corpus_max_bytes"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)!r}: expected an int >= 1")
    if self.router_aux_loss_coef is not None and not self.router_aux_loss_coef >= 0:
      raise ValueError(f"router_aux_loss_coef={self.router_aux_loss_coef!r}: "
                       "expected a float >= 0 or None")
    if self.schedule_steps is not None and self.schedule_steps < 1:
      raise ValueError(f"schedule_steps={self.schedule_steps!r}: expected an int >= 1 or None")
    for name in ("warmup_steps", "seed", "sample_tokens"):
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
                          ("remat", REMAT), ("attn_impl", ("auto", *IMPLS)),
                          ("too_long", TOO_LONG)):
      if getattr(self, name) not in choices:
        raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {sorted(choices)}")

    self._check_preference()
    self.reporters  # raises ValueError for a bad report_to
    if self.init_from_hf is not None and (self.model is not None or self.model_overrides):
      name = "model" if self.model is not None else "model_overrides"
      shown = self.model if self.model is not None else dict(self.model_overrides)
      raise ValueError(f"{name}={shown!r} with init_from_hf={self.init_from_hf!r}: "
                       "expected none (the HF folder's config.json is the model)")
    if self.lora_rank is not None:
      self.lora_spec  # raises ValueError for bad LoRA settings
    else:
      for name in LORA_ONLY:
        if getattr(self, name) != _DEFAULTS[name]:
          raise ValueError(f"{name}={getattr(self, name)!r} without lora_rank: "
                           "expected a LoRA run (set lora_rank)")

  def _check_preference(self) -> None:
    """The stage and preference fields: each set only where it applies."""
    defaults = {f.name: f.default for f in dataclasses.fields(self)
                if f.name.startswith("pref_") or f.name in ("simpo_gamma", "precompute_ref")}
    if self.stage not in STAGES:
      raise ValueError(f"stage={self.stage!r}: expected one of {list(STAGES)}")
    if self.stage == "sft":
      changed = [name for name, value in defaults.items() if getattr(self, name) != value]
      if changed:
        raise ValueError(f"{changed[0]}={getattr(self, changed[0])!r} with stage='sft': "
                         "expected stage='dpo' (preference tuning)")
      return
    loss = self.pref_loss
    if loss not in pref_lib.PREF_LOSSES:
      raise ValueError(f"pref_loss={loss!r}: expected one of {list(pref_lib.PREF_LOSSES)}")
    if not self.pref_beta > 0:
      raise ValueError(f"pref_beta={self.pref_beta!r}: expected a float > 0")
    if self.simpo_gamma is not None and loss != "simpo":
      raise ValueError(f"simpo_gamma={self.simpo_gamma!r} with pref_loss={loss!r}: "
                       "expected pref_loss='simpo' (or no simpo_gamma)")
    if not 0.0 <= self.pref_label_smoothing < 0.5:
      raise ValueError(f"pref_label_smoothing={self.pref_label_smoothing!r}: expected a "
                       "float in [0, 0.5)")
    if self.pref_label_smoothing and loss not in pref_lib.SMOOTHED:
      raise ValueError(f"pref_label_smoothing={self.pref_label_smoothing!r} with "
                       f"pref_loss={loss!r}: expected pref_loss in "
                       f"{list(pref_lib.SMOOTHED)}")
    if not self.pref_ftx >= 0:
      raise ValueError(f"pref_ftx={self.pref_ftx!r}: expected a float >= 0")
    if self.precompute_ref and loss in pref_lib.REFERENCE_FREE:
      raise ValueError(f"precompute_ref=True with pref_loss={loss!r}: {loss} uses no "
                       "reference model")
    if self.train_prompt:
      raise ValueError("train_prompt=True with stage='dpo': a preference loss trains "
                       "the answers only")

  @property
  def reference(self) -> str:
    """Where a run's reference log-probabilities come from: "none" (sft,
    orpo, simpo), "precomputed" (once, before training), "adapters_off" (the
    LoRA base) or "frozen_copy" (the starting weights, full fine-tuning)."""
    if self.stage == "sft" or self.pref_loss in pref_lib.REFERENCE_FREE:
      return "none"
    if self.precompute_ref:
      return "precomputed"
    return "adapters_off" if self.lora_rank is not None else "frozen_copy"

  @property
  def lora_spec(self) -> lora_lib.LoraSpec | None:
    """The run's `models.lora.LoraSpec`; None for full fine-tuning."""
    if self.lora_rank is None:
      return None
    alpha = 2.0 * self.lora_rank if self.lora_alpha is None else self.lora_alpha
    return lora_lib.LoraSpec(
        rank=self.lora_rank, alpha=alpha, dropout=self.lora_dropout,
        targets=lora_lib.parse_targets(self.lora_targets),
        quantize=self.quantize_base, rslora=self.use_rslora)

  @property
  def reporters(self) -> tuple[str, ...]:
    """report_to's integrations (() for "none")."""
    names = tuple(n.strip() for n in self.report_to.split(","))
    if names == ("none",):
      return ()
    if not all(n in REPORT_TO for n in names) or len(set(names)) != len(names):
      raise ValueError(f"report_to={self.report_to!r}: expected none or a comma-separated "
                       f"list of {', '.join(REPORT_TO)}")
    return names

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
      missing = [f.name for f in dataclasses.fields(models.ModelConfig)
                 if f.name not in values["model"] and f.default is dataclasses.MISSING
                 and f.default_factory is dataclasses.MISSING]
      if missing:
        raise ValueError(
            f"model: missing ModelConfig fields {', '.join(missing)} (a [model] table "
            "gives a whole ModelConfig; to change a few fields of a preset, set "
            "model = \"<preset>\" and a [model_overrides] table)")
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


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

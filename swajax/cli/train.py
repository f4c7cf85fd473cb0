"""`swajax train`: train (or fine-tune, or resume) a model from the command line.

With no arguments it trains `models.mistral_tiny` (a small sliding-window
Mistral) on the embedded Python-stdlib corpus, in a few minutes on a CPU.
Settings come from TrainConfig's defaults, then `--config FILE` (TOML or
YAML, keys = TrainConfig fields), then flags: every field is a flag
(`seq_len` -> `--seq-len`). Bad settings or unreadable data print one line
and exit with status 2; SIGINT/SIGTERM save a checkpoint at the current step
and exit with 128 + the signal number (130, 143), printing the --resume
command.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import shlex
import signal
import sys
import time
import tomllib
import typing
from pathlib import Path

import jax
import numpy as np
import yaml

import models
from pallas_kernels import IMPLS
from swajax.dtypes import DTYPES
from models import lora as lora_lib
from swajax.infer.generation import generate
from swajax.io.hf import save_hf
from swajax.io.model_source import load_model
from swajax.io.peft import save_adapter
from swajax.sharding import maybe_initialize_distributed
from swajax.text import chat as chat_lib
from swajax.training.config import REMAT, STAGES, TOO_LONG, TrainConfig
from swajax.training.preference import PREF_LOSSES
from swajax.training.loop import train
from swajax.training.run_folder import TrainingInterrupted

SAMPLE_PROMPT = "def "


class _Parser(argparse.ArgumentParser):
  """Usage errors as one line and exit status 2."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# One line per TrainConfig field for --help (tests/test_cli_help.py checks
# every field has one); the default is appended.
FIELD_HELP = {
    "model": "model preset (a ModelConfig table in --config); none: mistral_tiny, "
             "or with --init-from-hf that folder's model",
    "model_overrides": "ModelConfig fields of the preset, e.g. num_layers=2 "
                       "'layer_windows=(64,64)'",
    "init_from_hf": "fine-tune this Hugging Face folder (config.json + safetensors) "
                    "or .gguf file (dequantized) instead of a fresh preset (no --model / "
                    "--model-overrides: its config is the model)",
    "attn_impl": "attention implementation (auto: pallas on GPU, splash on TPU, else xla)",
    "dtype": "compute dtype",
    "param_dtype": "parameter and optimizer-state dtype",
    "remat": "recompute each decoder layer's activations in the backward pass",
    "data": "training data: a folder, a .txt file or a .jsonl file ({text}, "
            "{prompt, completion}, or chat {messages}, ShareGPT {conversations}, "
            "Alpaca {instruction, input, output} records: assistant turns trained); "
            "none: the embedded Python-stdlib corpus",
    "val_data": "validation data (same forms); none: hold out --val-percent of --data",
    "val_percent": "percent of the documents held out for validation",
    "tokenizer": "a tokenizer.json (or its folder), or 'bytes' (UTF-8 byte ids); "
                 "none: the --init-from-hf folder's (an error when it has none), "
                 "else bytes",
    "chat_template": "chat records' template: a Jinja file or a built-in name (chatml); "
                     "none: the tokenizer's own (chatml, with a warning, when it has none)",
    "train_prompt": "also train on the prompts of {prompt, completion} records",
    "too_long": "documents longer than --seq-len: split across rows, truncate or drop "
                "(counted and reported at the end)",
    "lora_rank": "LoRA: train only rank-R adapters on --lora-targets (none: full "
                 "fine-tuning)",
    "lora_alpha": "LoRA scale numerator: adapters scaled by alpha / rank (none: 2 x rank)",
    "lora_dropout": "LoRA: dropout on the adapters' input",
    "lora_targets": "LoRA: PEFT module names, comma-separated (q_proj, k_proj, v_proj, "
                    "o_proj, gate_proj, up_proj, down_proj), or all: those the model has",
    "use_rslora": "LoRA: scale by alpha / sqrt(rank) (rsLoRA)",
    "quantize_base": "QLoRA: hold every frozen projection kernel of the base (experts "
                     "included) in this format",
    "merge_lora": "LoRA: also export the merged model as a full HF checkpoint in hf/ "
                  "(QLoRA: merged into the original full-precision base, as PEFT's "
                  "merge_and_unload on the unquantized base)",
    "corpus_max_bytes": "bytes of the embedded corpus to read",
    "stage": "sft: next-token training; dpo: preference tuning on a .jsonl of "
             "{prompt, chosen, rejected} pairs (TRL standard or conversational, or "
             "ShareGPT with chosen/rejected messages), one pair per row",
    "pref_loss": "dpo: the preference loss (sigmoid: DPO; orpo, simpo: no reference model)",
    "pref_beta": "dpo: the loss's beta (DPO's KL weight; ORPO's odds-ratio weight)",
    "simpo_gamma": "dpo, simpo only: the target reward margin (none: 0.5)",
    "pref_ftx": "dpo: weight of an added SFT loss (mean NLL of the chosen answer)",
    "pref_label_smoothing": "dpo, sigmoid / simpo only: label smoothing (cDPO), in [0, 0.5)",
    "precompute_ref": "dpo with a reference (sigmoid, ipo, hinge): compute the "
                      "reference log-probabilities once before training (none kept "
                      "in memory but two floats per pair)",
    "seq_len": "tokens per packed row (T)",
    "batch_size": "rows per micro-batch, over all devices (B)",
    "grad_accum": "micro-batches per optimizer step (A)",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "the cosine ends at lr * this",
    "warmup_steps": "linear warmup steps (capped at the schedule's length - 1)",
    "weight_decay": "AdamW weight decay (matrices only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "clip_norm": "global gradient-norm clipping",
    "router_aux_loss_coef": "MoE models: weight of the router's load-balancing loss "
                            "(none: the model config's router_aux_loss_coef; 0: off)",
    "schedule_steps": "length of the warmup + cosine schedule; none: --steps (a "
                      "--resume with a new --steps keeps the run's)",
    "steps": "optimizer steps to reach (on --resume too: the total, not a count to add)",
    "seed": "initialisation and data-order seed",
    "eval_every": "validate every N steps (and after the last)",
    "eval_batches": "validation batches per evaluation",
    "fsdp": "devices on the fsdp mesh axis (parameters sharded); the rest on data",
    "context_parallel": "devices on the context mesh axis (the sequence sharded; sliding "
                        "layers exchange W-1 key halos); data x fsdp x context = devices",
    "out": "run folder; none: a new runs/<YYYYmmdd-HHMMSS> (-2, -3, ... when "
           "taken); an existing folder only when empty",
    "checkpoint_every": "checkpoint every N steps (and after the last, and on "
                        "SIGINT/SIGTERM)",
    "keep_checkpoints": "checkpoints kept (the newest)",
    "report_to": "also log the metrics (transformers Trainer's names: train/loss, "
                 "eval/loss, ...) to tensorboard (RUN/tensorboard), wandb, or both "
                 "comma-separated",
    "sample_tokens": "length of sample.txt, generated at the end (0: none)",
}


def _choices(name: str) -> tuple[str, ...] | None:
  """The values a string field takes, for --help (TrainConfig checks them)."""
  if name == "model":
    return tuple(sorted(n for n in dir(models) if n.endswith("_tiny")))
  return {"dtype": tuple(DTYPES), "param_dtype": tuple(DTYPES), "remat": REMAT,
          "attn_impl": ("auto", *IMPLS), "too_long": TOO_LONG, "stage": STAGES,
          "pref_loss": PREF_LOSSES,
          "quantize_base": lora_lib.QUANTIZE}.get(name)


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="swajax train", description=__doc__.split("\n\n")[1])
  parser.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                      help="TOML (.toml) or YAML (.yaml/.yml) file of TrainConfig fields")
  parser.add_argument("--resume", type=Path, default=argparse.SUPPRESS, metavar="RUN_DIR",
                      help="continue the run in RUN_DIR from its latest checkpoint "
                      "(its config.json, then --config and flags)")
  group = parser.add_argument_group("multi-process (jax.distributed; default: env "
                                    "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
  group.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                     help="process 0's address")
  group.add_argument("--num-processes", type=int, default=None, help="processes in all")
  group.add_argument("--process-id", type=int, default=None, help="this process's index")
  fields = parser.add_argument_group("TrainConfig fields (override --config)")
  hints = typing.get_type_hints(TrainConfig)
  defaults = TrainConfig()
  for field in dataclasses.fields(TrainConfig):
    flag = "--" + field.name.replace("_", "-")
    default = getattr(defaults, field.name)
    shown = ("none" if default is None else "none" if default == () else
             str(default).lower() if isinstance(default, bool) else str(default))
    text = f"{FIELD_HELP.get(field.name, field.name)} (default: {shown})"
    hint = hints[field.name]
    choices = _choices(field.name)
    if hint is bool:
      fields.add_argument(flag, action=argparse.BooleanOptionalAction,
                          default=argparse.SUPPRESS, help=text)
    elif field.name == "model_overrides":
      fields.add_argument(flag, nargs="+", metavar="KEY=VALUE", type=parse_override,
                          default=argparse.SUPPRESS, help=text)
    else:
      kind = next(t for t in (typing.get_args(hint) or (hint,)) if t is not type(None))
      metavar = "{" + ",".join(choices) + "}" if choices else field.name.upper()
      fields.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                          metavar=metavar, help=text)
  return parser


def parse_override(text: str) -> tuple[str, object]:
  """"key=value" -> (key, value), the value a Python literal or else a string."""
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def read_config_file(path: Path) -> dict:
  """The mapping in a TOML or YAML file."""
  if path.suffix == ".toml":
    try:
      return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
      raise ValueError(f"config={str(path)!r}: not valid TOML ({e})") from e
  if path.suffix in (".yaml", ".yml"):
    try:
      values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
      raise ValueError(f"config={str(path)!r}: not valid YAML "
                       f"({str(e).splitlines()[0]})") from e
    if not isinstance(values, dict):
      raise ValueError(f"config={str(path)!r}: expected a mapping of TrainConfig fields")
    return values
  raise ValueError(f"config={str(path)!r}: expected a .toml, .yaml or .yml file")


def resolve_config(args: argparse.Namespace) -> TrainConfig:
  """Defaults < RUN_DIR/config.json (--resume) < --config file < flags."""
  values: dict = {}
  if "resume" in args:
    saved = args.resume / "config.json"
    if not saved.is_file():
      raise ValueError(f"resume={str(args.resume)!r}: no config.json (not a run folder)")
    try:
      values.update(json.loads(saved.read_text()))
    except json.JSONDecodeError as e:
      raise ValueError(f"{saved}: not valid JSON ({e})") from None
    values["out"] = str(args.resume)
  if "config" in args:
    values.update(read_config_file(args.config))
  names = {f.name for f in dataclasses.fields(TrainConfig)}
  values.update({k: v for k, v in vars(args).items() if k in names})
  return TrainConfig.from_dict(values)


class ProgressBar:
  """Step, loss, tokens/s, ETA: one self-rewriting line on a terminal, else
  (a log file) one line every `total // 20` steps; eval results on their own
  line; `log` notes too."""

  def __init__(self, total_steps: int, stream=None):
    self.total = total_steps
    self.stream = sys.stderr if stream is None else stream
    self.tty = self.stream.isatty()
    self.every = max(1, total_steps // 20)
    self.start = None
    self.open = False  # a \r line waits for its newline

  def __call__(self, record: dict) -> None:
    now = time.perf_counter()
    if self.start is None:  # the first step includes compilation: time from its end
      self.start, self.first = now, record["step"]
    done = record["step"] - self.first
    eta = (now - self.start) / done * (self.total - record["step"]) if done else None
    line = (f"step {record['step']}/{self.total} | loss {record['loss']:.3f} | "
            + ("" if "rewards/accuracies" not in record else
               f"acc {record['rewards/accuracies']:.2f} | margin "
               f"{record['rewards/margins']:.3f} | ")
            + f"{record['tokens_per_s'] / 1e3:.1f}k tok/s | ETA {_duration(eta)}")
    if self.tty:
      self.stream.write("\r" + line.ljust(70))
      self.open = True
    elif done % self.every == 0 or record["step"] == self.total or "val_loss" in record:
      self.stream.write(line + "\n")
    if "val_loss" in record:
      self.log(f"  validation: {_validation(record)}")
    self.stream.flush()

  def log(self, line: str) -> None:
    """`line` on its own line (after an open progress line)."""
    self.stream.write(("\n" if self.open else "") + line + "\n")
    self.open = False
    self.stream.flush()


def _validation(record: dict) -> str:
  """An evaluation's figures: the loss, then the perplexity (sft) or the
  reward accuracy and margin (dpo)."""
  if "val_ppl" in record:
    return f"loss {record['val_loss']:.3f}, perplexity {record['val_ppl']:.2f}"
  return (f"loss {record['val_loss']:.3f}, reward accuracy "
          f"{record['val_rewards/accuracies']:.2f}, margin "
          f"{record['val_rewards/margins']:.3f}")


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return "?"
  minutes, seconds = divmod(int(round(seconds)), 60)
  return f"{minutes}m{seconds:02d}s"


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  progress = None
  try:
    config = resolve_config(args)
    maybe_initialize_distributed(args.coordinator_address, args.num_processes,
                                 args.process_id)
    started = time.perf_counter()
    progress = ProgressBar(config.steps)
    result = train(config, resume="resume" in args, on_step=progress,
                   log=progress.log)
  except TrainingInterrupted as e:
    progress.log(f"swajax train: {e}\nresume: swajax train --resume {e.run_dir}")
    return 128 + e.signum
  except KeyboardInterrupt:  # before the first step: nothing was trained
    print("\nswajax train: interrupted before the first step (nothing saved)",
          file=sys.stderr)
    return 128 + signal.SIGINT
  except (ValueError, OSError) as e:
    if os.environ.get("SWAJAX_TRACEBACK"):
      raise
    message = f"swajax train: error: {e}"
    progress.log(message) if progress else print(message, file=sys.stderr)
    return 2
  report(result, config, time.perf_counter() - started)
  return 0


def report(result, config: TrainConfig, seconds: float) -> None:
  """Prints the run summary, exports the model for HF and writes a sample.

  Every process of a multi-process run calls it: the export gathers the
  sharded parameters and the sample runs the sharded model on all of them
  (each computes the same tokens); process 0 prints and writes the files.
  """
  lead = jax.process_index() == 0
  run_dir = result.run_dir
  final = result.evals[-1] if result.evals else None
  lines = [f"trained {len(result.history)} steps in {_duration(seconds)} "
           f"({result.tokens_per_s / 1e3:.1f}k tokens/s)"]
  if final is not None:
    lines.append(f"validation perplexity {final['val_ppl']:.2f} (loss {final['val_loss']:.3f})"
                 if "val_ppl" in final else f"validation: {_validation(final)}")
  lines += result.notes
  lines.append(f"run folder {run_dir}: checkpoints/, metrics.jsonl, loss.png, config.json")
  # The run's Hugging Face export; a resumed run replaces the one its first
  # part wrote. Every process gathers the parameters; process 0 writes (see
  # `save_hf`).
  if config.lora_rank is None:
    save_hf(result.model, run_dir / "hf", overwrite=True, tokenizer=result.tokenizer)
    lines.append(f"Hugging Face export {run_dir / 'hf'}")
  else:
    lines += export_lora(result.model, run_dir / "hf", merge=config.merge_lora,
                         base_model_name_or_path=config.init_from_hf,
                         tokenizer=result.tokenizer)
  if config.sample_tokens > 0:
    _sample(result, sample_prompt(config, result.tokenizer), run_dir / "sample.txt",
            config.sample_tokens, lines, write=lead)
  lines += next_commands(run_dir, config)
  if lead:
    print("\n".join(lines))


def next_commands(run_dir: Path, config: TrainConfig) -> list[str]:
  """The commands a finished run suggests, each run as printed (the run
  folder is a MODEL: its hf/, or a LoRA run's adapter on its base)."""
  run = str(run_dir)
  lines = [f"generate: {shlex.join(['swajax', 'generate', run, '--prompt', SAMPLE_PROMPT])}",
           f"chat: {shlex.join(['swajax', 'chat', run])}"]
  if config.val_data is not None:  # scores what the run's validation scored
    lines.append(f"eval: {shlex.join(eval_argv(run, config))}")
  if config.lora_rank is not None and not config.merge_lora:
    lines.append(f"merge: {shlex.join(['swajax', 'merge', run, '--out', str(run_dir / 'merged')])}")
  return lines


def eval_argv(run: str, config: TrainConfig) -> list[str]:
  """`swajax eval` of the run on its validation file, packed as the run packed it."""
  argv = ["swajax", "eval", run, "--data", config.val_data, "--seq-len", str(config.seq_len),
          "--batch-size", str(config.batch_size), "--too-long", config.too_long]
  return argv + (["--train-prompt"] if config.train_prompt else [])


def export_lora(model, hf_dir, *, merge: bool, base_model_name_or_path: str | None,
                tokenizer=None) -> list[str]:
  """A LoRA run's export (`swajax train`): the PEFT adapter in hf_dir/adapter/
  (with `tokenizer`'s files and chat template) and, with merge, the merged model
  (`lora.merged_model`) as a full HF checkpoint in hf_dir (replacing its
  files; with `tokenizer`, its files and ids, as `save_hf`); a QLoRA run
  merges into its base's original full-precision weights, read again from
  `base_model_name_or_path` (not the dequantized ones it trained on). A run on a fresh
  preset (no `base_model_name_or_path`) also writes its frozen base
  (`lora.base_model`) to hf_dir/base/, the base the adapter records, so the
  adapter loads anywhere (PEFT, `swajax generate RUN`). Every process calls it
  (the saves gather parameters); process 0 writes the adapter. Returns report
  lines."""
  hf_dir = Path(hf_dir)
  lines = []
  if merge:
    original = None
    if base_model_name_or_path is not None and any(
        m.spec.quantize for _, m in lora_lib.lora_modules(model)):
      original = load_model(Path(base_model_name_or_path), dtype=model.param_dtype)
    save_hf(lora_lib.merged_model(model, original), hf_dir, overwrite=True,
            tokenizer=tokenizer)
    lines.append(f"Hugging Face export (LoRA merged) {hf_dir}")
  if base_model_name_or_path is None:
    base_model_name_or_path = hf_dir / "base"
    save_hf(lora_lib.base_model(model), base_model_name_or_path, overwrite=True,
            tokenizer=tokenizer)
    lines.append(f"the adapter's base (the fresh {model.config.model_type} it was "
                 f"trained on) {base_model_name_or_path}")
  if jax.process_index() == 0:
    save_adapter(model, hf_dir / "adapter", tokenizer=tokenizer,
                 base_model_name_or_path=str(Path(base_model_name_or_path).absolute()))
  lines.append(f"PEFT adapter {hf_dir / 'adapter'} (peft.PeftModel.from_pretrained)")
  return lines


def sample_prompt(config: TrainConfig, tokenizer) -> tuple[str, bool]:
  """(the end-of-run sample's prompt, whether it is a rendered chat). A chat
  run (the first record of a .jsonl --data is a chat, ShareGPT or Alpaca
  record): that conversation up to its last assistant turn, rendered with
  the run's chat template and its generation prompt; else SAMPLE_PROMPT."""
  if config.data is not None and config.data.endswith(".jsonl"):
    with open(config.data, encoding="utf-8") as f:
      first = next((line for line in f if line.strip()), "null")
    record = json.loads(first)
    messages = chat_lib.messages_of(record) if isinstance(record, dict) else None
    if messages is not None:
      return chat_lib.ChatEncoder(tokenizer).prompt(messages[:-1]), True
  return SAMPLE_PROMPT, False


def _sample(result, prompt: tuple[str, bool], path: Path, max_tokens: int,
            lines: list[str], *, write: bool) -> None:
  """A short continuation of `prompt` (`sample_prompt`), sampled at
  temperature 0.8; written to `path` when `write`. A rendered chat holds its
  own special tokens; a plain prompt gets the tokenizer's."""
  tokenizer = result.tokenizer
  text, chat = prompt
  prompt = list(tokenizer.encode(text, add_special_tokens=not chat))
  out = generate(result.model, np.asarray([prompt], np.int32), max_new_tokens=max_tokens,
                 temperature=0.8, top_k=40, eos_token_id=tokenizer.eos_id,
                 rng=jax.random.key(0))
  new = [int(t) for t in out[0, len(prompt):]]
  if tokenizer.eos_id in new:
    new = new[:new.index(tokenizer.eos_id)]
  text += tokenizer.decode(new)
  if write:
    path.write_text(text)
  lines.append(f"sample ({path}):\n" + "\n".join("  | " + l for l in text.splitlines()))

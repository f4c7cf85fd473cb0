"""The fine-tuning workflow of issue 23 through the real `swajax` command:
refusals instead of silently ignored flags, chat templates that survive the
export, the tokenizer's own special tokens, LoRA on a mixture of experts,
QLoRA's quantized base and its full-precision merge (against PEFT on the
original base), and `--report-to` (TensorBoard / W&B files read back).

The refusals run as one subprocess (`swajax_batch`: the real command's
`main` called once per argv, each exit status and output kept), so their
cost is one interpreter start; the training runs are subprocesses of tiny
models for 1-2 steps.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import models
import swajax
from models import lora as lora_lib
from swajax.io.hf import load_hf, save_hf
from swajax.text import chat
from swajax.text.tokenizers import ByteTokenizer, HFTokenizer
from tests import hf_models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parent.parent
# The vocabulary covers the BPE tokenizer below (< 400 ids) and the byte one.
HF_SMALL = dict(vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                max_position_embeddings=256, sliding_window=8, rms_norm_eps=1e-6)
RUN = ["--seq-len", "48", "--batch-size", "2", "--dtype", "float32", "--attn-impl", "xla",
       "--eval-batches", "1", "--warmup-steps", "1", "--corpus-max-bytes", "4000"]
SPECIALS = ["<bos>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["What is the capital of France?", "Paris is the capital of France.",
          "Write a haiku about the sea.", "Waves fold into foam.", "def add(a, b):"]
CHATS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                       {"role": "assistant", "content": f"It is {2 * i}."}]}
         for i in range(12)]
# A template of the user's own (no system prompt, '### ' turns).
TEMPLATE = ("{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}")

BATCH = textwrap.dedent("""\
    import contextlib, io, json, sys
    from swajax.cli.entry import main
    results = []
    for argv in json.loads(sys.argv[1]):
      out, err = io.StringIO(), io.StringIO()
      with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
          code = main(argv)
        except SystemExit as e:
          code = e.code
      results.append([code, out.getvalue(), err.getvalue()])
    print(json.dumps(results))
    """)


def swajax_env(**extra) -> dict:
  env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
  env.pop("SWAJAX_TRACEBACK", None)
  return env


def run_swajax(*argv, **env) -> subprocess.CompletedProcess:
  """`python -m swajax ARGV` in a subprocess."""
  return subprocess.run([sys.executable, "-m", "swajax", *map(str, argv)],
                        env=swajax_env(**env), text=True, capture_output=True, timeout=600)


def swajax_batch(*argvs, pythonpath=()) -> list[tuple[int, str, str]]:
  """(exit status, stdout, stderr) of the `swajax` command's main on each
  argv, all in one subprocess."""
  env = swajax_env()
  env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), str(REPO)])
  result = subprocess.run(
      [sys.executable, "-c", BATCH, json.dumps([[str(a) for a in argv] for argv in argvs])],
      env=env, text=True, capture_output=True, timeout=600)
  assert result.returncode == 0, result.stderr
  return [tuple(r) for r in json.loads(result.stdout.splitlines()[-1])]


def one_line_error(result, message: str, *, warnings=()) -> None:
  code, _, err = result
  lines = err.splitlines()
  assert code == 2 and "Traceback" not in err, err
  assert lines[-1].startswith("swajax ") and ": error: " in lines[-1], err
  assert message in lines[-1], err
  assert lines[:-1] == list(warnings), err


def make_tokenizer(folder: Path, *, template: str | None = None, config=None,
                   bos_post_processor: bool = False) -> Path:
  """A byte-level BPE tokenizer.json (+ tokenizer_config.json: `config`, eos
  <|im_end|>, pad <|endoftext|>, bos <bos>); `template` in chat_template.jinja
  (as transformers 5 saves it); `bos_post_processor`: tokenizer.json adds <bos>."""
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  bpe.train_from_iterator(CORPUS, tokenizers.trainers.BpeTrainer(
      vocab_size=380, special_tokens=SPECIALS,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  if bos_post_processor:
    bpe.post_processor = tokenizers.processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bpe.token_to_id("<bos>"))])
  folder.mkdir(parents=True, exist_ok=True)
  bpe.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
      "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", **(config or {})}))
  if template is not None:
    (folder / chat.TEMPLATE_FILE).write_text(template)
  return folder


def random_hf(config_cls="MistralConfig", model_cls="MistralForCausalLM", **fields):
  return hf_models.random_hf_model(config_cls, model_cls, **{**HF_SMALL, **fields})


def write_jsonl(path: Path, records) -> Path:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
  """HF folders: `plain` (no tokenizer), `untemplated` (a tokenizer without a
  chat template); a chat data file and a template file."""
  root = tmp_path_factory.mktemp("workflow")
  random_hf().save_pretrained(root / "plain")
  random_hf().save_pretrained(root / "untemplated")
  make_tokenizer(root / "untemplated")
  return {"root": root, "plain": root / "plain", "untemplated": root / "untemplated",
          "chats": write_jsonl(root / "chats.jsonl", CHATS),
          "template": _write(root / "template.jinja", TEMPLATE)}


def _write(path: Path, text: str) -> Path:
  path.write_text(text)
  return path


# ----- Refusals: one line, exit 2 ----------------------------------------------------

def test_refusals_and_warnings(folders, tmp_path):
  """Bugs 3-7, 11 and --report-to: flags that would be ignored are errors."""
  plain, untemplated = folders["plain"], folders["untemplated"]
  shadow = tmp_path / "shadow" / "wandb"  # an uninstalled wandb
  shadow.mkdir(parents=True)
  (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
  # Each would train one short step where the flag is ignored (before the fix).
  out = ["--out", tmp_path / "run", *RUN, "--steps", "1", "--sample-tokens", "0"]
  chat_run = ["train", "--init-from-hf", untemplated, "--data", folders["chats"],
              "--val-data", tmp_path / "missing.jsonl", *out]
  results = swajax_batch(
      ["train", "--lora-alpha", "8", *out],                                    # 4
      ["train", "--lora-targets", "q_proj", *out],
      ["train", "--lora-dropout", "0.1", *out],
      ["train", "--init-from-hf", plain, "--model", "gemma3_tiny", *out],       # 5
      ["train", "--init-from-hf", plain, "--model-overrides", "num_layers=2", *out],
      ["train", "--init-from-hf", plain, *out],                                 # 6
      ["train", "--lora-rank", "2", "--lora-targets", "q_proj,gate", *out],     # 3
      ["train", "--chat-template", tmp_path / "none.jinja", *out],              # 7
      chat_run,
      [*chat_run, "--chat-template", folders["template"]],
      ["train", "--report-to", "mlflow", *out],                                 # report-to
      ["train", "--report-to", "wandb", *out],
      ["--help"], ["train", "--help"],                                          # 11
      pythonpath=[shadow.parent])
  one_line_error(results[0], "lora_alpha=8.0 without lora_rank: expected a LoRA run")
  one_line_error(results[1], "lora_targets='q_proj' without lora_rank")
  one_line_error(results[2], "lora_dropout=0.1 without lora_rank")
  one_line_error(results[3], "model='gemma3_tiny' with init_from_hf=")
  one_line_error(results[4], "model_overrides={'num_layers': 2} with init_from_hf=")
  one_line_error(results[5], "no tokenizer.json and no tokenizer recorded in config.json: "
                 "pass --tokenizer FILE (or --tokenizer bytes")
  one_line_error(results[6], "lora_targets='q_proj,gate': expected 'all' or distinct "
                 "names among q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
  one_line_error(results[7], "none.jinja': expected a Jinja file or one of chatml")
  warning = (f"warning: {untemplated / 'tokenizer.json'} has no chat template: chat "
             "records are rendered with chatml (choose one with --chat-template FILE|NAME)")
  one_line_error(results[8], "missing.jsonl': no such file", warnings=[warning])
  one_line_error(results[9], "missing.jsonl': no such file")  # chosen: no warning
  one_line_error(results[10], "report_to='mlflow': expected none or a comma-separated "
                 "list of tensorboard, wandb")
  one_line_error(results[11], "--report-to wandb needs the wandb package (pip install wandb)")
  assert not (tmp_path / "run").exists()
  code, usage, _ = results[12]
  assert code == 0 and "attention | context | generate | moe | train | tiles" in usage
  code, usage, _ = results[13]
  assert code == 0 and all(word in " ".join(usage.split()) for word in (
      "chat {messages}", "ShareGPT {conversations}", "Alpaca {instruction, input, output}",
      "--chat-template", "--report-to"))


def test_readme_lora_example_runs():
  """Bug 11: README's `swajax.add_lora(...)` example, evaluated as written."""
  readme = (REPO / "README.md").read_text()
  example = re.search(r"`(swajax\.add_lora\(model, [^`]*\))`", readme)[1]
  model = models.CausalLM(models.mistral_tiny(num_layers=1, layer_windows=(16,)),
                          rngs=nnx.Rngs(0))
  eval(example, {"swajax": swajax, "nnx": nnx, "model": model})
  assert len(lora_lib.lora_modules(model)) == 7  # every projection of the layer

"""The fine-tuning workflow of issue 23 through the real `swajax` command:
refusals instead of silently ignored flags (bugs 3-7), chat templates that
survive the export (1), the tokenizer's own special tokens (10), LoRA on a
mixture of experts (3), QLoRA's quantized base (9) and its full-precision
merge against PEFT on the original base (8), the help and the documented
example (11), and `--report-to` (TensorBoard / W&B files read back).

Each group of commands runs in one subprocess (`swajax_batch`: the real
command's `main` called once per argv, each exit status and output kept), so
its cost is one interpreter start; the training runs are tiny models for
1-2 steps. Bug 2 and the chat / eval / merge commands are covered by
test_merge_cli.py, test_chat_cli.py and test_eval_cli.py.
"""

import dataclasses
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
from swajax.cli import bench
from swajax.io.hf import load_hf
from swajax.text import chat
from swajax.text.tokenizers import HFTokenizer
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
    print("\\n" + json.dumps(results))
    """)


def swajax_env(**extra) -> dict:
  env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
  env.pop("SWAJAX_TRACEBACK", None)
  return env


def swajax_batch(*argvs, pythonpath=(), **env) -> list[tuple[int, str, str]]:
  """(exit status, stdout, stderr) of the `swajax` command's main on each
  argv, all in one subprocess (environment `env` added). Text the command
  writes to sys.stdout.buffer (generate's tokens) is not kept."""
  env = swajax_env(**env)
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
  assert code == 0 and "benchmarks: " + " | ".join(bench.BENCHMARKS) in usage
  assert len(bench.BENCHMARKS) >= 6  # the help listed three
  code, usage, _ = results[13]
  assert code == 0 and all(word in " ".join(usage.split()) for word in (
      "chat {messages}", "ShareGPT {conversations}", "Alpaca {instruction, input, output}",
      "--chat-template", "--report-to"))


def test_readme_lora_example_runs():
  """Bug 11: the documentation's `swajax.add_lora(...)` example (README.md or a
  docs/ page), evaluated as written (before: TypeError, no rngs)."""
  text = "".join(p.read_text() for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")])
  example = re.search(r"`(swajax\.add_lora\(model, [^`]*\))`", text)[1]
  model = models.CausalLM(models.mistral_tiny(num_layers=1, layer_windows=(16,)),
                          rngs=nnx.Rngs(0))
  eval(example, {"swajax": swajax, "nnx": nnx, "model": model})
  assert len(lora_lib.lora_modules(model)) == 7  # every projection of the layer
  assert any(np.abs(m.lora_a.get_value()).max() > 0 for _, m in lora_lib.lora_modules(model))


# ----- The tokenizer's own special tokens (bug 10) ----------------------------------

def test_generate_adds_the_special_tokens_the_tokenizer_adds(tmp_path):
  """`swajax generate`'s prompt ids (the count on its stderr) are transformers'
  tokenizer(prompt) ids: bos only where the tokenizer adds it (tokenizer.json's
  post-processor; tokenizer_config.json's add_bos_token alone adds none in
  transformers 5), none with --no-special-tokens (before: bos always, so a
  pasted <bos> was doubled)."""
  settings = {"unset": {}, "add_bos_token": {"add_bos_token": True},
              "post_processor": None}
  model = random_hf()
  for name, config in settings.items():
    model.save_pretrained(tmp_path / name)
    make_tokenizer(tmp_path / name, config=config, bos_post_processor=config is None)
  prompt = "<bos>Paris is the"
  argvs = [["generate", tmp_path / name, "--prompt", prompt, "--max-new-tokens", "1", *flag]
           for name in settings for flag in ([], ["--no-special-tokens"])]
  results = iter(swajax_batch(*argvs))
  for name in settings:
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / name)
    bos = reference.convert_tokens_to_ids("<bos>")
    ids = reference(prompt).input_ids  # the settings differ as intended:
    assert (ids[:2] == [bos, bos]) == (name == "post_processor"), (name, ids)
    for special in (True, False):
      code, _, err = next(results)
      assert code == 0, err
      count = len(reference(prompt, add_special_tokens=special).input_ids)
      assert f"[prompt {count} tokens;" in err, (name, special, err)


# ----- QLoRA quantizes every frozen kernel (bug 9) -----------------------------------

def test_qlora_quantizes_every_frozen_kernel_experts_included():
  """gpt-oss with adapters on q_proj,v_proj only: k_proj, o_proj and the
  experts are held quantized too (before: only the targeted kernels, the
  experts never), and the summary's 'before' is the unquantized base."""
  model = models.CausalLM(models.gpt_oss_tiny(), rngs=nnx.Rngs(0), attn_impl="xla")
  full = lora_lib.base_bytes(model)
  lora_lib.add_lora(model, lora_lib.LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "v_proj"),
                                             quantize="nf4"), rngs=nnx.Rngs(1))
  frozen = ["/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(
      model.layers, nnx.All(nnx.Param, nnx.Not(lora_lib.TRAINABLE))))]
  assert [p for p in frozen if p.split("/")[-1] in ("kernel", *lora_lib.EXPERTS)
          and not p.endswith("router/kernel")] == []
  quantized = {"/".join(map(str, p)) for p, m in nnx.iter_modules(model.layers)
               if isinstance(m, lora_lib.QuantizedWeight)}
  assert {"0/mlp/gate_up", "0/mlp/down", "0/attn/k_proj/weight", "0/attn/q_proj/weight"
          } <= quantized
  after = lora_lib.base_bytes(model)
  assert after < full / 3
  assert (f"frozen base {after / 2**20:.2f} MiB (nf4; {full / 2**20:.2f} MiB before "
          "quantization)") in lora_lib.summary(model)


# ----- Two training runs: a QLoRA chat run, LoRA on a mixture of experts -------------

def wandb_history(path: Path) -> list[dict]:
  """The logged rows ({name: value}) of an offline W&B run file (run-*.wandb:
  W&B's 7-byte header, then LevelDB-log framing of 32 KiB blocks, each chunk
  a 7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last) of
  serialized `wandb_internal_pb2.Record`s); wandb 0.31 ships no reader."""
  import struct

  from wandb.proto import wandb_internal_pb2

  data, pos, chunks, rows = path.read_bytes(), 7, b"", []
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # a block's zero-filled trailer
      pos += 32768 - pos % 32768
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0:
      break
    chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record.FromString(chunks)
      chunks = b""
      if record.WhichOneof("record_type") == "history":
        rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item})
  return rows


@pytest.fixture(scope="module")
def runs(folders) -> dict:
  """Both runs, in one `swajax` process: `chat`, a QLoRA (nf4) chat run with
  --merge-lora and --report-to tensorboard,wandb (W&B offline) on a base whose
  template sits in tokenizer_config.json (as older transformers saved it);
  `moe`, gpt-oss with the default LoRA targets."""
  root = folders["root"]
  base = root / "templated_base"
  random_hf().save_pretrained(base)
  make_tokenizer(base, config={"chat_template": TEMPLATE})
  chat_run, moe_run = root / "chat_run", root / "moe_run"
  chat, moe = swajax_batch(
      ["train", "--init-from-hf", base, "--data", folders["chats"], "--lora-rank", "4",
       "--quantize-base", "nf4", "--merge-lora", "--steps", "2", "--lr", "0.05",
       "--eval-every", "2", "--sample-tokens", "2", "--report-to", "tensorboard,wandb",
       "--out", chat_run, *RUN],
      ["train", "--model", "gpt_oss_tiny", "--lora-rank", "2", "--steps", "1",
       "--sample-tokens", "0", "--out", moe_run, *RUN],
      WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true")
  assert chat[0] == 0, chat[2]
  assert moe[0] == 0, moe[2]
  return {"base": base, "chat": chat_run, "moe": moe_run, "moe_stdout": moe[1],
          "wandb": root / "wandb"}


def test_exports_carry_the_chat_template_and_the_sample_is_a_chat(runs):
  """Bug 1: hf/ and hf/adapter/ carry the template, so transformers'
  apply_chat_template renders as on the base (before: "chat_template is not
  set") and fine-tuning the export again uses it. Bug 11: the end-of-run
  sample of a chat run is a chat turn, not 'def '."""
  messages = CHATS[0]["messages"][:1]
  expected = transformers.AutoTokenizer.from_pretrained(runs["base"]).apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True)
  assert expected == "### user: What is 0 plus 0?\n### assistant: "
  for export in (runs["chat"] / "hf", runs["chat"] / "hf" / "adapter"):
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    assert tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True) == expected, export
    assert HFTokenizer(export).chat_template == TEMPLATE
  assert (runs["chat"] / "sample.txt").read_text().startswith(expected)


def test_qlora_merge_is_into_the_original_base(runs):
  """Bug 8: the QLoRA run's merged hf/ equals PEFT's merge_and_unload of its
  adapter on the original fp32 base; the same adapter merged into the
  NF4-dequantized base (what the export wrote before) is off by far more."""
  peft = pytest.importorskip("peft")
  adapter = runs["chat"] / "hf" / "adapter"
  x = np.random.default_rng(0).integers(0, 380, (2, 24))
  with torch.no_grad():
    base = transformers.AutoModelForCausalLM.from_pretrained(runs["base"],
                                                            attn_implementation="eager")
    expected = peft.PeftModel.from_pretrained(base, adapter).merge_and_unload()(
        torch.as_tensor(x)).logits.numpy()
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        runs["chat"] / "hf", attn_implementation="eager")(torch.as_tensor(x)).logits.numpy()
  np.testing.assert_allclose(merged, expected, atol=1e-5, rtol=0)
  trained = load_hf(runs["base"], adapter=adapter)
  spec = lora_lib.lora_modules(trained)[0][1].spec
  quantized = lora_lib.add_lora(load_hf(runs["base"]),
                                dataclasses.replace(spec, quantize="nf4"))
  for (_, q), (_, t) in zip(lora_lib.lora_modules(quantized), lora_lib.lora_modules(trained)):
    q.lora_a.set_value(t.lora_a.get_value())
    q.lora_b.set_value(t.lora_b.get_value())
  dequantized = np.asarray(lora_lib.merged_model(quantized)(x.astype(np.int32)))
  print(f"QLoRA merge vs PEFT merge_and_unload on the fp32 base: max |diff| "
        f"{np.abs(merged - expected).max():.2e}; merged into the NF4-dequantized base: "
        f"{np.abs(dequantized - expected).max():.2e}")
  assert np.abs(dequantized - expected).max() > 1e-3


def test_lora_default_targets_on_a_mixture_of_experts(runs):
  """Bug 3: `--lora-targets` left at `all` on gpt-oss trains the attention's
  four projections (before: exit 2, "no gate_proj")."""
  config = json.loads((runs["moe"] / "hf" / "adapter" / "adapter_config.json").read_text())
  assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
  assert "LoRA: " in runs["moe_stdout"]


def test_report_to_tensorboard_and_wandb(runs):
  """`--report-to tensorboard,wandb`: tensorboard's EventAccumulator and the
  offline W&B run read back metrics.jsonl's values under Trainer's names."""
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  records = [json.loads(line)
             for line in (runs["chat"] / "metrics.jsonl").read_text().splitlines()]
  expected = {(name, r["step"]): r[key] for r in records for key, name in (
      ("loss", "train/loss"), ("lr", "train/learning_rate"), ("grad_norm", "train/grad_norm"),
      ("val_loss", "eval/loss"), ("val_ppl", "eval/perplexity")) if r.get(key) is not None}
  assert {name for name, _ in expected} == {"train/loss", "train/learning_rate",
                                            "train/grad_norm", "eval/loss", "eval/perplexity"}
  board = event_accumulator.EventAccumulator(str(runs["chat"] / "tensorboard"))
  board.Reload()
  written = {(tag, e.step): e.value for tag in board.Tags()["scalars"]
             for e in board.Scalars(tag)}
  assert written.keys() >= expected.keys()
  np.testing.assert_allclose([written[k] for k in expected], list(expected.values()),
                             rtol=1e-6)
  [wandb_file] = runs["wandb"].glob("offline-run-*/run-*.wandb")
  logged = {(name, row["_step"]): value for row in wandb_history(wandb_file)
            if "_step" in row for name, value in row.items() if not name.startswith("_")}
  assert logged.keys() >= expected.keys()
  np.testing.assert_allclose([logged[k] for k in expected], list(expected.values()),
                             rtol=1e-12)

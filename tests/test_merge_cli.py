"""A LoRA run's printed commands and `swajax merge`, through the real command.

Issue 23, bug 2: a LoRA run without --merge-lora printed `swajax generate RUN`,
which exited 2 (its hf/ held only adapter/). Here every command such a run
prints runs as printed (chat with a turn on stdin). `swajax merge` (a run
folder, or a PEFT adapter folder on --base) against PEFT's `merge_and_unload`,
tensor by tensor in fp32; bad input is one line and exit 2.
"""

import json
import re
import shlex
import shutil
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

from swajax.cli import entry
from tests.chat_models import HF_CHAT, chat_model_folder
from tests.test_faults import TINY, run, swajax

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

MERGE_TOLERANCE = 1e-5  # fp32, the bound
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXTS = ["def f(x): return x", "import os", "class A: pass", "x = [1, 2]",
         "for i in range(3): print(i)", "while True: break", "y = {'a': 1}", "pass"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """A 2-step LoRA run (no --merge-lora) on a fresh preset with a held-out
  validation file: (run folder, its stdout)."""
  folder = tmp_path_factory.mktemp("lora")
  data, val = folder / "train.jsonl", folder / "val.jsonl"
  data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
  val.write_text(json.dumps({"text": "def g(): pass"}) + "\n"
                 + json.dumps({"text": "z = 3"}) + "\n")
  out = folder / "run"
  result = run("train", *TINY, "--steps", "2", "--lr", "0.05", "--lora-rank", "4",
               "--data", data, "--val-data", val, "--out", out)
  assert result.returncode == 0, result.stderr
  return out, result.stdout


def printed_commands(stdout: str) -> dict[str, list[str]]:
  """{name: argv} of the "name: swajax ..." lines a run prints."""
  found = re.findall(r"^(\w+): swajax (.+)$", stdout, re.M)
  return {name: shlex.split(line) for name, line in found}


@pytest.fixture
def merged_run(lora_run):
  """The run folder after its printed merge command ran (each test may run
  on its own xdist worker, so none relies on another having merged)."""
  run_dir, stdout = lora_run
  if not (run_dir / "merged" / "model.safetensors").is_file():
    result = run(*printed_commands(stdout)["merge"])
    assert result.returncode == 0, result.stderr
  return run_dir


def test_every_command_a_lora_run_prints_works(lora_run):
  """Each printed command exits 0 (chat reads one turn from stdin); eval
  scores the validation file to the run's last validation loss."""
  run_dir, stdout = lora_run
  commands = printed_commands(stdout)
  assert set(commands) == {"generate", "chat", "eval", "merge"}, stdout
  shutil.rmtree(run_dir / "merged", ignore_errors=True)  # merge runs as printed
  outputs = {}
  for name, argv in commands.items():
    proc = swajax(*argv, stdin=subprocess.PIPE)
    outputs[name], err = proc.communicate("hello\n", timeout=300)
    assert proc.returncode == 0, (name, err)
    assert "error" not in err, (name, err)
  assert (run_dir / "merged" / "config.json").is_file()
  records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  val_loss = [r["val_loss"] for r in records if "val_loss" in r][-1]
  assert json.loads(outputs["eval"])["loss"] == pytest.approx(val_loss, rel=1e-5)


def merged_by_peft(base_dir, adapter_dir) -> dict[str, np.ndarray]:
  base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  merged = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
  return {k: v.numpy() for k, v in merged.state_dict().items()}


def assert_same_tensors(ours: dict, theirs: dict) -> float:
  theirs = {k: v for k, v in theirs.items() if not k.endswith("rotary_emb.inv_freq")}
  assert set(ours) == set(theirs)
  worst = 0.0
  for name, value in ours.items():
    assert value.dtype == np.float32, name
    worst = max(worst, float(np.abs(value - theirs[name]).max()))
  assert worst <= MERGE_TOLERANCE, worst
  return worst


def test_merged_run_equals_peft_merge_and_unload(merged_run):
  run_dir = merged_run
  ours = load_file(run_dir / "merged" / "model.safetensors")
  theirs = merged_by_peft(run_dir / "hf" / "base", run_dir / "hf" / "adapter")
  base = load_file(run_dir / "hf" / "base" / "model.safetensors")
  moved = max(float(np.abs(ours[k] - base[k]).max()) for k in ours)
  assert moved > 1e-3, moved  # the adapter is not a no-op
  assert_same_tensors(ours, theirs)


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
  """(base folder with a chat tokenizer, the same without one, a PEFT adapter
  with random non-zero B on all seven targets; PEFT records no base)."""
  folder = tmp_path_factory.mktemp("peft")
  model = chat_model_folder(folder / "base")
  chat_model_folder(folder / "bare", tokenizer=False)
  config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS,
                           init_lora_weights=False)
  peft.get_peft_model(model, config).save_pretrained(folder / "adapter")
  return folder / "base", folder / "bare", folder / "adapter"


def test_merge_of_a_peft_adapter_on_base_equals_peft(peft_adapter, tmp_path):
  base, _, adapter = peft_adapter
  out = tmp_path / "merged"
  result = run("merge", adapter, "--base", base, "--out", out)
  assert result.returncode == 0, result.stderr
  ours = load_file(out / "model.safetensors")
  worst = assert_same_tensors(ours, merged_by_peft(base, adapter))
  print(f"merge vs PEFT merge_and_unload: max |diff| {worst:.2e}")
  base_weights = load_file(base / "model.safetensors")
  assert max(float(np.abs(ours[k] - base_weights[k]).max()) for k in ours) > 1e-2
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (out / name).read_bytes() == (base / name).read_bytes(), name
  merged_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert merged_tokenizer.chat_template == transformers.AutoTokenizer.from_pretrained(
      base).chat_template is not None


def one_line_error(capsys, argv, message):
  assert entry.main([str(a) for a in argv]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"swajax {argv[0]}: error: "), err
  assert message in err[0], err


def test_merge_bad_input_is_one_line(peft_adapter, merged_run, tmp_path, capsys):
  base, bare, adapter = peft_adapter
  run_dir = merged_run
  one_line_error(capsys, ["merge", tmp_path / "nowhere", "--out", tmp_path / "o"],
                 "not a PEFT adapter folder")
  one_line_error(capsys, ["merge", adapter, "--out", tmp_path / "o"],
                 "its base_model_name_or_path None is not a local Hugging Face folder")
  one_line_error(capsys, ["merge", adapter, "--base", bare, "--out", tmp_path / "o"],
                 "no tokenizer.json")
  one_line_error(capsys, ["merge", run_dir, "--base", base, "--out", tmp_path / "o"],
                 f"adapter {run_dir / 'hf' / 'adapter'} does not fit the base {base} "
                 f"(it was trained on {(run_dir / 'hf' / 'base').absolute()})")
  one_line_error(capsys, ["merge", run_dir, "--out", run_dir / "merged"],
                 "holds a checkpoint (pass --overwrite")
  one_line_error(capsys, ["generate", base, "--adapter", run_dir / "hf" / "adapter",
                          "--prompt", "x"], "does not fit the base")
  assert not (tmp_path / "o").exists()

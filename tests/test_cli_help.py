"""The command line as people expect it: --help with a line per flag and the
choices, --version, log-friendly progress, benchmarks that write only where
--out says, and progress for big HF checkpoints."""

import dataclasses
import io
import re

import pytest

from pallas_kernels import IMPLS

from swajax.cli import train as train_cli
from swajax.io import hf as hf_io, hf_folder
from swajax.training.config import TrainConfig
from tests.test_faults import run
from tests.test_hf_io import CONFIGS, random_model


def test_train_help_describes_every_flag_and_its_choices():
  result = run("train", "--help")
  assert result.returncode == 0, result.stderr
  text = re.sub(r"\s+", " ", result.stdout)
  for field in dataclasses.fields(TrainConfig):
    flag = "--" + field.name.replace("_", "-")
    assert flag in text, flag
    assert train_cli.FIELD_HELP[field.name].split()[0] in text, field.name
  presets = ("{cohere2_tiny,gemma2_tiny,gemma3_tiny,gpt_oss_tiny,llama_tiny,ministral_tiny,"
             "mistral_tiny,mixtral_tiny,olmo3_tiny,phi3_tiny,qwen2_tiny,qwen3_tiny,"
             "smollm3_tiny,starcoder2_tiny}")
  for flag, choices in [("--model", presets),
                        ("--dtype", "{float32,bfloat16,float16}"),
                        ("--attn-impl", "{" + ",".join(("auto", *IMPLS)) + "}"),
                        ("--remat", "{none,full,dots_saveable}")]:
    assert f"{flag} {choices}" in text, flag
  assert "none: a new runs/<YYYYmmdd-HHMMSS> (-2, -3, ... when taken)" in text


def test_version():
  result = run("--version")
  assert result.returncode == 0 and re.fullmatch(r"swajax \S+.*\n", result.stdout)


class FakeTerminal(io.StringIO):
  def isatty(self):
    return True


@pytest.mark.parametrize("stream", [io.StringIO(), FakeTerminal()])
def test_progress_rewrites_a_line_only_on_a_terminal(stream):
  bar = train_cli.ProgressBar(100, stream=stream)
  for step in range(1, 101):
    bar({"step": step, "loss": 1.0, "tokens_per_s": 1e3,
         **({"val_loss": 1.0, "val_ppl": 2.7} if step == 50 else {})})
  bar.log("done")
  text = stream.getvalue()
  if stream.isatty():
    assert text.count("\r") == 100 and text.endswith("\ndone\n")
  else:
    lines = text.splitlines()
    assert "\r" not in text
    assert [l.split()[1] for l in lines if l.startswith("step ")] == [
        f"{s}/100" for s in (1, 6, 11, 16, 21, 26, 31, 36, 41, 46, 50, 51, 56, 61, 66,
                             71, 76, 81, 86, 91, 96, 100)]
    assert "  validation: loss 1.000, perplexity 2.70" in lines and lines[-1] == "done"


def test_bench_writes_files_only_where_out_says(tmp_path):
  result = run("bench", "train", "--seq-len", "64", "--window", "16", "--repeats", "1",
               "--model-overrides", "num_layers=1", "hidden_size=32",
               "intermediate_size=32", "num_q_heads=2", "num_kv_heads=1", "head_dim=16",
               cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert "speedup" in result.stdout
  assert list(tmp_path.iterdir()) == []


def test_big_checkpoints_show_progress(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(hf_folder, "PROGRESS_MIN_BYTES", 0)
  folder = hf_io.save_hf(random_model(CONFIGS["llama"]), tmp_path / "ckpt",
                         max_shard_size="100KB")
  hf_io.load_hf(folder)
  lines = capsys.readouterr().err.splitlines()
  for verb in ("save_hf", "load_hf"):
    shown = [l for l in lines if l.startswith(f"{verb} {folder}: ")]
    assert 2 <= len(shown) <= 11 and shown[-1].endswith(" GB"), lines
    done, total = shown[-1].rsplit(": ", 1)[1].removesuffix(" GB").split("/")
    assert done == total

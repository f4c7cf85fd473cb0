"""`save_hf` writes like `save_pretrained` (only its own files, each atomically,
normal permissions), `load_hf` rejects non-finite weights, and a `swajax train`
export carries what generation needs (tokenizer, eos)."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from swajax.text.tokenizers import ByteTokenizer
from swajax.io.hf import load_hf, save_hf
from tests.test_faults import TINY, run as cli
from tests.test_hf_io import CONFIGS, random_model


@pytest.fixture
def saved(tmp_path):
  directory = save_hf(random_model(CONFIGS["qwen2"]), tmp_path / "ckpt")
  return directory, load_file(directory / "model.safetensors")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_load_rejects_a_non_finite_weight_naming_the_tensor(saved, bad):
  directory, tensors = saved
  name = "model.layers.1.mlp.up_proj.weight"
  broken = tensors[name].copy()
  broken[3, 5] = bad
  save_file({**tensors, name: broken}, directory / "model.safetensors",
            metadata={"format": "pt"})
  with pytest.raises(ValueError, match=f"tensor '{name}' has non-finite values "
                     r"\(1 NaN/inf\)"):
    load_hf(directory)


def test_overwrite_replaces_only_its_own_files(tmp_path):
  """Point 10: the user's files stay; a sharded save over a single-file one
  (and back) leaves exactly one consistent set of weights."""
  folder = tmp_path / "ckpt"
  folder.mkdir()
  (folder / "README.md").write_text("my notes")
  (folder / "tokenizer.json").write_text("{}")
  first, second = random_model(CONFIGS["llama"], 0), random_model(CONFIGS["llama"], 1)
  save_hf(first, folder)  # an existing folder without a checkpoint is fine
  with pytest.raises(FileExistsError, match="holds a checkpoint"):
    save_hf(second, folder)
  save_hf(second, folder, overwrite=True, max_shard_size="100KB")
  names = sorted(p.name for p in folder.iterdir())
  shards = [n for n in names if n.startswith("model-")]
  assert len(shards) >= 2 and "model.safetensors" not in names
  assert set(names) == {"README.md", "tokenizer.json", "config.json",
                        "model.safetensors.index.json", *shards}
  assert (folder / "README.md").read_text() == "my notes"
  np.testing.assert_array_equal(
      np.asarray(load_hf(folder).embed.embedding[...]),
      np.asarray(second.embed.embedding[...]))
  save_hf(first, folder, overwrite=True)
  assert sorted(p.name for p in folder.iterdir()) == [
      "README.md", "config.json", "model.safetensors", "tokenizer.json"]
  np.testing.assert_array_equal(np.asarray(load_hf(folder).embed.embedding[...]),
                                np.asarray(first.embed.embedding[...]))
  a_file = tmp_path / "weights.bin"
  a_file.write_text("keep me")
  with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
    save_hf(first, a_file, overwrite=True)
  assert a_file.read_text() == "keep me"


def test_export_uses_the_normal_umask(tmp_path):
  """Point 11: the folder and its files get the umask's modes, not 0700/0600."""
  old = os.umask(0o022)
  try:
    folder = save_hf(random_model(CONFIGS["llama"]), tmp_path / "a" / "ckpt",
                     tokenizer=ByteTokenizer())
  finally:
    os.umask(old)
  assert stat.S_IMODE(folder.stat().st_mode) == 0o755
  for file in folder.iterdir():
    assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


def word_tokenizer(folder: Path) -> Path:
  """A tiny WordLevel tokenizer.json (<s> 0, </s> 1, <pad> 2, words, [UNK])."""
  tokenizers = pytest.importorskip("tokenizers")
  words = "def return import class self if else for in".split()
  vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "[UNK]": 3,
           **{w: i + 4 for i, w in enumerate(words)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<s>", "</s>", "<pad>"])
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  return folder / "tokenizer.json"


def test_train_export_carries_its_tokenizer_and_generate_never_guesses(tmp_path):
  """Point 9 through the real commands: `swajax generate RUN/hf` of a run
  trained with --tokenizer uses it; an export without one is an error unless
  --tokenizer says which."""
  tokenizer = word_tokenizer(tmp_path / "tok")
  run = tmp_path / "run"
  result = cli("train", *TINY, "--steps", "2", "--tokenizer", tokenizer, "--out", run)
  assert result.returncode == 0, result.stderr
  hf = run / "hf"
  assert (hf / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
  config = json.loads((hf / "config.json").read_text())
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 2)
  assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == 1
  transformers = pytest.importorskip("transformers")
  assert transformers.GenerationConfig.from_pretrained(hf).eos_token_id == 1
  result = cli("generate", hf, "--prompt", "def", "--max-new-tokens", "3")
  assert result.returncode == 0, result.stderr
  assert set(result.stdout.split()) <= {"def", "return", "import", "class", "self", "if",
                                        "else", "for", "in"}, result.stdout
  # Without its tokenizer the export is refused, not read as bytes.
  (hf / "tokenizer.json").unlink()
  (run / "tokenizer.json").unlink()
  result = cli("generate", run, "--prompt", "def", "--max-new-tokens", "3")
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  assert result.stderr.startswith(f"swajax generate: error: {hf}: no tokenizer.json")
  result = cli("generate", run, "--prompt", "def", "--max-new-tokens", "3",
               "--tokenizer", tokenizer)
  assert result.returncode == 0, result.stderr

"""`load_gguf` on tiny GGUF files written here with gguf's own `GGUFWriter`
(random weights, Q8_0 matrices), per family, against transformers' GGUF
loading of the same file; and the refusals (truncated file, unknown
architecture or key, unsupported tensor type) as one clear line.

The writer follows llama.cpp's converter: its metadata keys, its tensor
names (gguf's `TensorNameMap`), the q/k row interleaving of llama files and
the `1 + w` of Gemma norms, so a loader that forgot to undo either fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from flax import nnx

import models
from swajax import load_gguf
from swajax.io.gguf import gguf_tensor_names, read_gguf
from swajax.io.hf_tensors import tensor_table, to_hf, variable_at
from tests.hf_models import forward, hf_logits, max_diff, torch, transformers

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=3,
             num_q_heads=4, num_kv_heads=2, head_dim=16)
# Gemma: transformers' GGUF config has no query_pre_attn_scalar (its class
# default 256) where llama.cpp scales by 1/sqrt(head_dim): head_dim 256 makes
# the two agree.
GEMMA = dict(SMALL, num_q_heads=2, num_kv_heads=1, head_dim=256)
# arch -> (preset, its fields); windows of 8 over T = 24 where the family has
# them (Gemma 3 is the real 270M, tests/test_real_gguf.py).
CASES = {
    "llama": (models.llama_tiny, dict(SMALL)),
    "qwen2": (models.qwen2_tiny, dict(SMALL, layer_windows=(None,) * 3)),
    # transformers' GGUF config takes no head_dim for qwen3 (its class default 128)
    "qwen3": (models.qwen3_tiny, dict(SMALL, hidden_size=256, num_q_heads=2, num_kv_heads=1,
                                      head_dim=128, layer_windows=(None,) * 3)),
    "gemma2": (models.gemma2_tiny, dict(GEMMA, layer_windows=(8, None, 8),
                                        query_pre_attn_scalar=256.0)),
}
T = 24
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def random_model(arch: str) -> models.CausalLM:
  preset, fields = CASES[arch]
  model = models.CausalLM(preset(**fields), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  for spec in tensor_table(model.config):
    var = variable_at(model, spec.path)
    var.set_value(np.float32(0.1) * rng.standard_normal(var.get_value().shape, np.float32))
  return model


def write_gguf(model: models.CausalLM, arch: str, path: Path, *, permute: bool = True,
               extra_key: str | None = None, int_tensor: str | None = None) -> Path:
  """`model` as llama.cpp's converter writes a GGUF file of it: matrices in
  Q8_0, the rest float32. permute=False skips llama's q/k interleaving;
  extra_key adds `{arch}.{extra_key}` = 1; int_tensor stores that HF tensor
  as int32 (a type no float model has)."""
  config = model.config
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_block_count(config.num_layers)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_q_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_key_length(config.head_dim)
  writer.add_value_length(config.head_dim)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  writer.add_vocab_size(config.vocab_size)
  windows = {w for w in config.layer_windows if w is not None}
  if windows:
    writer.add_sliding_window(windows.pop())
  if arch == "gemma2":
    writer.add_attn_logit_softcapping(config.attn_softcap)
    writer.add_final_logit_softcapping(config.final_logit_softcap)
  if extra_key is not None:
    writer.add_uint32(f"{arch}.{extra_key}", 1)
  names = gguf_tensor_names(config, arch)
  for spec in tensor_table(config):
    x = to_hf(spec, np.asarray(variable_at(model, spec.path).get_value(), np.float32))
    if permute and arch == "llama" and spec.hf_name.endswith(("q_proj.weight", "k_proj.weight")):
      heads = config.num_q_heads if "q_proj" in spec.hf_name else config.num_kv_heads
      x = x.reshape(heads, 2, -1, x.shape[-1]).swapaxes(1, 2).reshape(x.shape)
    if arch.startswith("gemma") and "norm" in spec.hf_name:
      x = x + 1.0
    if spec.hf_name == int_tensor:
      writer.add_tensor(names[spec.hf_name], x.astype(np.int32))
    elif x.ndim == 2:
      writer.add_tensor(names[spec.hf_name], gguf.quants.quantize(x, Q8_0), raw_dtype=Q8_0)
    else:
      writer.add_tensor(names[spec.hf_name], x)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.mark.parametrize("arch", sorted(CASES))
def test_tiny_gguf_matches_transformers_gguf_loading(arch, tmp_path):
  path = write_gguf(random_model(arch), arch, tmp_path / f"{arch}.gguf")
  ours = load_gguf(path)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, gguf_file=path.name, dtype=torch.float32,
      attn_implementation="eager").eval()
  ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, (2, T))
  expected = hf_logits(reference, ids)
  got = np.asarray(forward(ours, ids))
  np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
  if any(ours.config.layer_windows):  # negative control: the window matters
    assert max_diff(forward(ours.with_full_attention(), ids), expected) > 1e-2


def test_llama_qk_interleaving_is_undone(tmp_path):
  """load_gguf gives back the written q/k kernels (up to Q8_0 rounding) only
  when the file interleaves their rows as llama.cpp does: negative control."""
  model = random_model("llama")
  converted = load_gguf(write_gguf(model, "llama", tmp_path / "a.gguf"))
  not_permuted = load_gguf(write_gguf(model, "llama", tmp_path / "b.gguf", permute=False))
  for name in ("q_proj", "k_proj"):
    path = ("layers", 1, "attn", name, "kernel")
    written = variable_at(model, path).get_value()
    assert max_diff(variable_at(converted, path).get_value(), written) < 2e-3  # Q8_0
    assert max_diff(variable_at(not_permuted, path).get_value(), written) > 0.1


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
  return write_gguf(random_model("llama"), "llama",
                    tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_truncated_file_is_one_clear_error(tiny_llama, tmp_path):
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(tiny_llama.read_bytes()[:len(tiny_llama.read_bytes()) // 2])
  with pytest.raises(ValueError, match="cut.gguf: "):
    load_gguf(cut)
  garbage = tmp_path / "garbage.gguf"
  garbage.write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="not a readable GGUF file"):
    load_gguf(garbage)


def test_unknown_architecture_key_and_type_are_refused(tmp_path):
  model = random_model("llama")
  unknown = write_gguf(model, "llama", tmp_path / "bert.gguf")
  data = unknown.read_bytes().replace(b"llama", b"bertx")  # every llama key too
  (tmp_path / "bertx.gguf").write_bytes(data)
  with pytest.raises(ValueError, match=r"general.architecture='bertx': expected one of"):
    load_gguf(tmp_path / "bertx.gguf")
  with pytest.raises(ValueError, match=r"llama.expert_count=1 is not supported"):
    load_gguf(write_gguf(model, "llama", tmp_path / "moe.gguf", extra_key="expert_count"))
  with pytest.raises(ValueError, match=r"'output_norm.weight' has type I32: expected one of"):
    load_gguf(write_gguf(model, "llama", tmp_path / "i32.gguf", int_tensor="model.norm.weight"))


def test_cli_bad_gguf_is_one_line_exit_2(tmp_path):
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"GGUF\x03\x00\x00\x00")
  root = Path(__file__).parents[1]
  result = subprocess.run(
      [sys.executable, "-m", "swajax", "generate", str(bad), "--prompt", "x"],
      cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
      capture_output=True, text=True)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("swajax generate: error: ")
  assert "bad.gguf: not a readable GGUF file" in lines[0]

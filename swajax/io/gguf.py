"""GGUF checkpoints (llama.cpp, Ollama): `load_gguf` and `gguf_tokenizer`, no torch.

A GGUF file holds the weights (quantized or float), the architecture as
`{arch}.*` metadata and the tokenizer as `tokenizer.*` metadata. ggml's own
`gguf` package reads it (`GGUFReader`) and dequantizes each tensor
(`gguf.quants.dequantize`). The metadata becomes a Hugging Face config dict
(`hf_config`), so the one mapping `models.hf_config` turns it into a
`ModelConfig`; each GGUF tensor name is the HF name of
`hf_tensors.tensor_table` under gguf's own `TensorNameMap`, so the HF layout
rules (transposes, fused projections) stay in `hf_tensors`. What llama.cpp's
converter changed is undone here: the q/k row interleaving of llama-style
attention (`permute_qk`), and the `1 + w` it stores for Gemma's norms.
Anything it cannot honour is refused by name: an unknown architecture or
`{arch}.*` key, a quantization type outside `QUANT_TYPES`, a missing or
unexpected tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path

import numpy as np
from flax import nnx

from models import CausalLM, ModelConfig
from swajax import sharding as sharding_lib
from swajax.io.hf import check_float, param_shardings, read_parameter
from swajax.io.hf_folder import Progress
from swajax.io.hf_tensors import tensor_table, variable_at
from swajax.text import gguf_vocab
from swajax.text.tokenizers import HFTokenizer

# The tensor types loaded, by their `gguf.GGMLQuantizationType` names (each
# dequantized by gguf.quants to float32).
QUANT_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0",
                         "Q5_1", "Q4_K", "Q5_K", "Q6_K"})


def gguf_package():
  """ggml's `gguf` package, imported on first use, so that `import swajax`
  works where it is missing (the GPU image runs the kernels without it);
  reading a GGUF file needs it (a core dependency: `pip install swajax`
  brings it)."""
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading a GGUF file needs ggml's gguf package "
                      f"(pip install gguf): {e}") from e
  return gguf

# `{arch}.` keys every family reads -> the HF config key.
COMMON_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
# Keys checked, not copied: value_length must equal key_length, the rotated
# dimensions the whole head (`_check_head_dims`); rope.scaling.* form
# rope_scaling (`_rope_scaling`).
CHECKED_KEYS = ("attention.value_length", "rope.dimension_count", "rope.scaling.type",
                "rope.scaling.factor", "rope.scaling.original_context_length")


@dataclasses.dataclass(frozen=True)
class GgufFamily:
  """How one GGUF architecture maps onto a transformers model type."""

  model_type: str
  # `{arch}.` keys of this family -> HF config key, over COMMON_KEYS.
  keys: dict
  # llama.cpp's converter interleaved the rows of each head of q and k (its
  # RoPE pairs adjacent dimensions; transformers' rotate_half pairs halves).
  permute_qk: bool = False


_RMS_EPS = {"attention.layer_norm_rms_epsilon": "rms_norm_eps"}
_GEMMA = {**_RMS_EPS, "attention.sliding_window": "sliding_window",
          "attn_logit_softcapping": "attn_logit_softcapping",
          "final_logit_softcapping": "final_logit_softcapping"}

# general.architecture -> its family. Mistral's files say "llama".
GGUF_FAMILIES = {
    "llama": GgufFamily("llama", _RMS_EPS, permute_qk=True),
    "qwen2": GgufFamily("qwen2", _RMS_EPS),
    "qwen3": GgufFamily("qwen3", _RMS_EPS),
    "gemma2": GgufFamily("gemma2", _GEMMA),
    "gemma3": GgufFamily("gemma3_text", _GEMMA),
    "phi3": GgufFamily("phi3", {**_RMS_EPS, "attention.sliding_window": "sliding_window"}),
    "starcoder2": GgufFamily("starcoder2", {"attention.layer_norm_epsilon": "norm_epsilon"}),
}


@dataclasses.dataclass(frozen=True)
class GgufFile:
  """An opened GGUF file: `read_gguf(path)`; `load_gguf` and
  `gguf_tokenizer` take one (or a path) so a caller reads the file once."""

  path: Path
  reader: object  # a gguf.GGUFReader (gguf_package())

  def value(self, key: str, default=None):
    field = self.reader.fields.get(key)
    return default if field is None else field.contents()

  @property
  def architecture(self) -> str:
    arch = self.value("general.architecture")
    if arch not in GGUF_FAMILIES:
      raise ValueError(f"{self.path}: general.architecture={arch!r}: expected one "
                       f"of {sorted(GGUF_FAMILIES)}")
    return arch


def read_gguf(path) -> GgufFile:
  """Opens a GGUF file (memory-mapped; tensors are read when loaded).
  gguf's reader parses every metadata value up front (seconds for a 262k
  vocabulary), so the last few files opened are kept, keyed by path, size
  and modification time: the model and the tokenizer of one file share one
  read. FileNotFoundError for a missing file, ValueError (one line) for one
  that is not a readable GGUF file (truncated, another format)."""
  if isinstance(path, GgufFile):
    return path
  path = Path(path).absolute()
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such GGUF file")
  stat = path.stat()
  return _read(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _read(path: Path, size: int, mtime_ns: int) -> GgufFile:
  try:
    reader = gguf_package().GGUFReader(os.fspath(path))
  except Exception as e:  # the reader raises ValueError, struct / numpy errors
    raise ValueError(f"{path}: not a readable GGUF file "
                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
  return GgufFile(path, reader)


def hf_config(file: GgufFile) -> dict:
  """The Hugging Face config dict the file's `{arch}.*` metadata describes
  (the input of `ModelConfig.from_hf`). ValueError for a key it cannot
  honour."""
  arch = file.architecture
  family = GGUF_FAMILIES[arch]
  keys = {**COMMON_KEYS, **family.keys}
  config = {"model_type": family.model_type}
  for name in file.reader.fields:
    if not name.startswith(arch + "."):
      continue
    key = name[len(arch) + 1:]
    if key in keys:
      config[keys[key]] = file.value(name)
    elif key not in CHECKED_KEYS:
      raise ValueError(f"{file.path}: {name}={file.value(name)!r} is not supported")
  if isinstance(config.get("num_key_value_heads"), list):
    heads = set(config["num_key_value_heads"])
    if len(heads) != 1:
      raise ValueError(f"{file.path}: {arch}.attention.head_count_kv differs per "
                       "layer: not supported")
    config["num_key_value_heads"] = heads.pop()
  _check_head_dims(file, arch, config)
  scaling = _rope_scaling(file, arch)
  if scaling is not None:
    config["rope_scaling"] = scaling
  if "vocab_size" not in config:
    config["vocab_size"] = len(file.reader.fields["tokenizer.ggml.tokens"].data)
  names = {t.name for t in file.reader.tensors}
  config["tie_word_embeddings"] = "output.weight" not in names
  if family.model_type.startswith("gemma"):
    # llama.cpp scales Gemma's queries by 1/sqrt(head_dim) (no GGUF key).
    config["query_pre_attn_scalar"] = config.get("head_dim", 256)
  if family.model_type in ("qwen2", "qwen3") and "sliding_window" not in config:
    config["use_sliding_window"] = False
  return config


def _check_head_dims(file: GgufFile, arch: str, config: dict) -> None:
  head_dim = config.get("head_dim") or (
      config["hidden_size"] // config["num_attention_heads"])
  for key in ("attention.value_length", "rope.dimension_count"):
    value = file.value(f"{arch}.{key}")
    if value is not None and value != head_dim:
      raise ValueError(f"{file.path}: {arch}.{key}={value} differs from the head "
                       f"dimension {head_dim}: not supported")


def _rope_scaling(file: GgufFile, arch: str) -> dict | None:
  """rope_scaling from `{arch}.rope.scaling.*`: "linear" or "yarn"."""
  kind = file.value(f"{arch}.rope.scaling.type")
  if kind in (None, "none"):
    return None
  factor = file.value(f"{arch}.rope.scaling.factor")
  if kind == "linear":
    return {"rope_type": "linear", "factor": factor}
  if kind == "yarn":
    return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings":
            file.value(f"{arch}.rope.scaling.original_context_length")}
  raise ValueError(f"{file.path}: {arch}.rope.scaling.type={kind!r}: expected "
                   "'none', 'linear' or 'yarn'")


def gguf_tensor_names(config: ModelConfig, arch: str) -> dict[str, str]:
  """HF tensor name (`hf_tensors.tensor_table`) -> its GGUF name, by gguf's
  `TensorNameMap` for `arch`."""
  gguf = gguf_package()
  arch_id = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
  name_map = gguf.get_tensor_name_map(arch_id, config.num_layers)
  names = {}
  for spec in tensor_table(config):
    module, suffix = spec.hf_name.rsplit(".", 1)
    gguf_name = name_map.get_name(module)
    if gguf_name is None:
      raise ValueError(f"{arch}: no GGUF name for {spec.hf_name!r}")
    names[spec.hf_name] = f"{gguf_name}.{suffix}"
  return names


def load_gguf(path, *, dtype=None, attn_impl: str = "auto", mesh=None) -> CausalLM:
  """A `CausalLM` from a GGUF file, its tensors dequantized.

  path: a .gguf file (or a `GgufFile` from `read_gguf`).
  dtype: parameter and compute dtype; None is float32 (what every GGUF
  quantization dequantizes to exactly).
  attn_impl: the model's attention impl ("auto", "pallas", "xla", "reference").
  mesh: None puts every parameter on the default device; a ("data", "fsdp")
  mesh places each with its NamedSharding (`swajax.sharding.state_shardings`).
  A dequantized tensor is a whole host array: the host holds one at a time.

  The config comes from the `{arch}.*` metadata (`hf_config`): the window
  (`{arch}.attention.sliding_window`) on the layers the family's rule gives
  (Gemma 3: five sliding layers, then one full), heads, head dimension,
  RoPE base and linear / YaRN scaling, norm epsilon, vocabulary, tied
  output. Architectures: `GGUF_FAMILIES`; tensor types: `QUANT_TYPES`.

  Raises FileNotFoundError for a missing file; ValueError (naming the file
  and the key, tensor or type) for an unreadable file, an architecture,
  metadata key or tensor type it cannot honour, a missing, unexpected or
  misshaped tensor, or non-finite values.
  """
  file = read_gguf(path)
  if mesh is not None:
    sharding_lib.check_mesh(mesh)
  config = ModelConfig.from_hf(hf_config(file))
  arch = file.architecture
  family = GGUF_FAMILIES[arch]
  dtype = check_float("float32" if dtype is None else dtype, "dtype")
  names = gguf_tensor_names(config, arch)
  tensors = {t.name: t for t in file.reader.tensors}
  for hf_name, name in names.items():
    if name not in tensors:
      raise ValueError(f"{file.path}: tensor {name!r} ({hf_name}) is missing")
  unexpected = sorted(set(tensors) - set(names.values()))
  if unexpected:
    raise ValueError(f"{file.path}: unexpected tensor {unexpected[0]!r} for this "
                     f"{arch} config ({len(unexpected)} in all): not supported")
  model = nnx.eval_shape(lambda: CausalLM(
      config, dtype=dtype, param_dtype=dtype, attn_impl=attn_impl,
      rngs=nnx.Rngs(0)))
  shardings = {} if mesh is None else param_shardings(model, mesh)
  table = tensor_table(config)
  progress = Progress(f"load_gguf {file.path}", sum(
      math.prod(spec.hf_shape) * 4 for spec in table))
  for spec in table:
    array = _dequantized(file, tensors[names[spec.hf_name]], spec.hf_shape)
    if family.permute_qk and spec.hf_name.endswith(("q_proj.weight", "k_proj.weight")):
      heads = config.num_q_heads if "q_proj" in spec.hf_name else config.num_kv_heads
      array = unpermute_qk(array, heads)
    if config.norm == "rms_one_plus" and spec.path[-1] == "weight" and "norm" in spec.hf_name:
      array = array - 1.0  # llama.cpp stores a Gemma norm's 1 + w
    var = variable_at(model, spec.path)
    var.set_value(read_parameter({spec: (file.path, array)}, var.get_value().shape,
                                 dtype, shardings.get(spec.path)))
    progress.add(array.nbytes)
  progress.close()
  return model


def _dequantized(file: GgufFile, tensor, shape) -> np.ndarray:
  """A GGUF tensor as float32 in the HF layout `shape` (GGUF lists the
  dimensions innermost first: the reverse)."""
  kind = tensor.tensor_type
  if kind.name not in QUANT_TYPES:
    raise ValueError(f"{file.path}: tensor {tensor.name!r} has type {kind.name}: "
                     f"expected one of {sorted(QUANT_TYPES)}")
  stored = tuple(int(d) for d in reversed(tensor.shape))
  if stored != tuple(shape):
    raise ValueError(f"{file.path}: tensor {tensor.name!r} has shape {stored}: "
                     f"expected {tuple(shape)}")
  try:
    array = gguf_package().quants.dequantize(tensor.data, kind)
  except Exception as e:  # a truncated tensor: numpy reshape / index errors
    raise ValueError(f"{file.path}: cannot read tensor {tensor.name!r} ({e})") from e
  return np.asarray(array, np.float32).reshape(shape)


def unpermute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row order: within each head's H rows it stores
  rows (0, H/2, 1, H/2 + 1, ...) so adjacent rows form RoPE pairs; HF's
  rotate_half pairs row i with row i + H/2. [heads * H, D] -> same shape."""
  rows = weight.shape[0] // heads
  return (weight.reshape(heads, rows // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def gguf_tokenizer(path) -> HFTokenizer:
  """The file's tokenizer as swajax's `HFTokenizer` (encoding as transformers'
  GGUF-converted tokenizer does; `swajax.text.gguf_vocab`): bos (None when
  the file says not to add it: `tokenizer.ggml.add_bos_token`), eos, pad,
  and `tokenizer.chat_template`. ValueError for a tokenizer it cannot build."""
  file = read_gguf(path)
  arch = file.value("general.architecture")
  model = file.value("tokenizer.ggml.model")
  if model is None:
    raise ValueError(f"{file.path}: no tokenizer (tokenizer.ggml.model is missing)")
  add_bos = file.value("tokenizer.ggml.add_bos_token", model == "llama")
  vocab = {"model": model, "pre": file.value("tokenizer.ggml.pre"),
           "tokens": file.value("tokenizer.ggml.tokens"),
           "token_type": file.value("tokenizer.ggml.token_type"),
           "scores": file.value("tokenizer.ggml.scores"),
           "merges": file.value("tokenizer.ggml.merges"),
           "unk_id": file.value("tokenizer.ggml.unknown_token_id"),
           "bos_id": file.value("tokenizer.ggml.bos_token_id"), "add_bos": add_bos}
  try:
    tokenizer = gguf_vocab.build_tokenizer(
        vocab, gemma_style=str(arch).startswith("gemma"))
  except ValueError as e:
    raise ValueError(f"{file.path}: {e}") from e
  eos = file.value("tokenizer.ggml.eos_token_id")
  if eos is None:
    raise ValueError(f"{file.path}: tokenizer.ggml.eos_token_id is missing")
  return HFTokenizer.from_tokenizer(
      tokenizer, bos_id=vocab["bos_id"] if add_bos else None, eos_id=eos,
      pad_id=file.value("tokenizer.ggml.padding_token_id"),
      chat_template=file.value("tokenizer.chat_template"))

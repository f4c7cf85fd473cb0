"""The one map between Hugging Face tensor names and our parameters.

`tensor_table(config)` lists, for every variant of `ModelConfig`, each HF
tensor with its shape, our parameter path and how the layouts differ
(transposed, a part of a stacked parameter, gate/up interleaved, MXFP4
blocks); `read_block` (HF -> ours, one device's block) and `to_hf` hold every
transpose.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from flax import nnx

from models import ModelConfig
from models.config import BLOCKS
from swajax.io import mxfp4

@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor: its name and shape, our parameter path, and the layout.

  transposed: HF stores nn.Linear weights [out, in]; ours read [in, ...] (e.g.
  q_proj [N*H, D] <-> kernel [D, N, H]). Otherwise only a reshape (biases
  [N*H] <-> [N, H], norms and the embedding as they are).
  interleaved: the last HF axis interleaves our last two (gpt-oss's fused
  experts): our [..., 2, F] (gate, up) is HF [..., F * 2], index 2f + g.
  part: the HF tensor fills only this index of our parameter (Mixtral's
  per-expert tensors in our stacked experts): an int selects along an axis,
  None keeps it whole; None: the whole parameter.
  mxfp4: the checkpoint stores this float tensor [E, In, Out] in MXFP4, as
  `{hf_name}_blocks` and `{hf_name}_scales` (uint8, `swajax.mxfp4`; gpt-oss's
  released experts).
  """

  hf_name: str
  path: tuple
  hf_shape: tuple[int, ...]
  transposed: bool
  interleaved: bool = False
  part: tuple[int | None, ...] | None = None
  mxfp4: bool = False

  def stored_tensors(self) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensors holding this one: name -> shape."""
    if not self.mxfp4:
      return {self.hf_name: self.hf_shape}
    blocks, scales = mxfp4.stored_shapes(self.hf_shape)
    return {f"{self.hf_name}_blocks": blocks, f"{self.hf_name}_scales": scales}

  def select(self, x):
    """The part of our whole parameter `x` this tensor holds."""
    if self.part is None:
      return x
    return x[tuple(slice(None) if p is None else p for p in self.part)]


# Our DecoderLayer norm -> its HF module name (`models.config.BLOCKS`).
NORM_HF_NAMES = {"input_norm": "input_layernorm",
                 "post_attn_norm": "post_attention_layernorm",
                 "pre_mlp_norm": "pre_feedforward_layernorm",
                 "post_mlp_norm": "post_feedforward_layernorm"}


# Our MLP projection -> its HF name, where it differs (Starcoder2's GELU MLP).
MLP_HF_NAMES = {"gelu": {"up_proj": "c_fc", "down_proj": "c_proj"}}


def _mixtral_experts(hf: str, ours: tuple, config: ModelConfig) -> list[TensorSpec]:
  """Mixtral's `block_sparse_moe`: gate [E, D]; per expert e, w1 (gate) and
  w3 (up) [F, D] and w2 [D, F], each filling expert e of our stacked
  gate_up [E, D, 2, F] and down [E, F, D]."""
  d, f = config.hidden_size, config.intermediate_size
  hf, moe = hf + "block_sparse_moe.", (*ours, "mlp")
  specs = [TensorSpec(hf + "gate.weight", (*moe, "router", "kernel"),
                      (config.num_experts, d), True)]
  for e in range(config.num_experts):
    expert = f"{hf}experts.{e}."
    specs += [
        TensorSpec(expert + "w1.weight", (*moe, "gate_up"), (f, d), True,
                   part=(e, None, 0, None)),
        TensorSpec(expert + "w2.weight", (*moe, "down"), (d, f), True,
                   part=(e, None, None)),
        TensorSpec(expert + "w3.weight", (*moe, "gate_up"), (f, d), True,
                   part=(e, None, 1, None))]
  return specs


def _gpt_oss_experts(hf: str, ours: tuple, config: ModelConfig) -> list[TensorSpec]:
  """gpt-oss's `mlp`: router [E, D] + bias; experts' gate_up_proj [E, D, 2F]
  (gate and up interleaved) + bias [E, 2F], down_proj [E, F, D] + bias [E, D],
  as our gate_up [E, D, 2, F], down [E, F, D] and their biases."""
  d, f, e = config.hidden_size, config.intermediate_size, config.num_experts
  hf, moe = hf + "mlp.", (*ours, "mlp")
  return [
      TensorSpec(hf + "router.weight", (*moe, "router", "kernel"), (e, d), True),
      TensorSpec(hf + "router.bias", (*moe, "router", "bias"), (e,), False),
      TensorSpec(hf + "experts.gate_up_proj", (*moe, "gate_up"), (e, d, 2 * f),
                 False, interleaved=True),
      TensorSpec(hf + "experts.gate_up_proj_bias", (*moe, "gate_up_bias"),
                 (e, 2 * f), False, interleaved=True),
      TensorSpec(hf + "experts.down_proj", (*moe, "down"), (e, f, d), False),
      TensorSpec(hf + "experts.down_proj_bias", (*moe, "down_bias"), (e, d),
                 False)]


# Model type -> its experts' HF tensors (a `models.moe.MoE` at layer `ours`).
EXPERT_LAYOUTS = {"mixtral": _mixtral_experts, "gpt_oss": _gpt_oss_experts}


def tensor_table(config: ModelConfig, mxfp4_layers=frozenset()) -> list[TensorSpec]:
  """Every tensor of a HF checkpoint of `config`, in file order.

  mxfp4_layers: the layers whose experts' gate_up and down projections are
  stored in MXFP4 (`TensorSpec.mxfp4`; `models.hf_config.mxfp4_expert_layers`);
  their biases stay float.
  """
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  n, k, h = config.num_q_heads, config.num_kv_heads, config.head_dim
  qd, kd = n * h, k * h

  def norm_specs(hf_name, path, dim=d, bias=config.norm_bias):
    return [TensorSpec(f"{hf_name}.weight", (*path, "weight"), (dim,), False)] + (
        [TensorSpec(f"{hf_name}.bias", (*path, "bias"), (dim,), False)]
        if bias else [])

  def linear_specs(hf_name, path, out_in, bias):
    """An nn.Linear [out, in] (and its bias [out]) <-> our Einsum at `path`."""
    return [TensorSpec(f"{hf_name}.weight", (*path, "kernel"), out_in, True)] + (
        [TensorSpec(f"{hf_name}.bias", (*path, "bias"), out_in[:1], False)]
        if bias else [])

  attention = (("qkv", qd + 2 * kd),) if config.fused_projections else (
      ("q", qd), ("k", kd), ("v", kd))
  mlp_names = MLP_HF_NAMES.get(config.mlp, {})
  mlp = [("down_proj", (d, f))]
  if config.fused_projections:
    mlp.insert(0, ("gate_up_proj", (2 * f, d)))
  else:
    mlp[:0] = [(name, (f, d)) for name in (
        ("up_proj",) if config.mlp == "gelu" else ("gate_proj", "up_proj"))]
  block_norms = BLOCKS[config.block]
  table = [TensorSpec("model.embed_tokens.weight", ("embed", "embedding"),
                      (v, d), False)]
  for i in range(config.num_layers):
    hf, ours = f"model.layers.{i}.", ("layers", i)
    layer = []
    if "input_norm" in block_norms:
      layer += norm_specs(hf + "input_layernorm", (*ours, "input_norm"))
    for name, size in attention:
      layer += linear_specs(hf + f"self_attn.{name}_proj",
                            (*ours, "attn", f"{name}_proj"), (size, d),
                            config.attention_bias)
    layer += linear_specs(hf + "self_attn.o_proj", (*ours, "attn", "o_proj"),
                          (d, qd), config.attention_out_bias)
    if config.qk_norm is not None:
      per_head = config.qk_norm == "head"
      for name, size in (("q", qd), ("k", kd)):
        layer += norm_specs(hf + f"self_attn.{name}_norm",
                            (*ours, "attn", f"{name}_norm"),
                            h if per_head else size, bias=False)
    if config.attn_sinks:
      layer.append(TensorSpec(hf + "self_attn.sinks", (*ours, "attn", "sinks"),
                              (n,), False))
    for name in block_norms[1:] if "input_norm" in block_norms else block_norms:
      layer += norm_specs(hf + NORM_HF_NAMES[name], (*ours, name))
    if config.num_experts:
      layer += [dataclasses.replace(spec, mxfp4=i in mxfp4_layers and spec.path[-1]
                                    in ("gate_up", "down"))
                for spec in EXPERT_LAYOUTS[config.model_type](hf, ours, config)]
    for name, out_in in mlp if not config.num_experts else ():
      layer += linear_specs(hf + "mlp." + mlp_names.get(name, name),
                            (*ours, "mlp", name), out_in, config.mlp_bias)
    table += layer
  table += norm_specs("model.norm", ("norm",))
  if not config.tie_word_embeddings:
    table.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), (v, d), True))
  return table


def to_hf(spec: TensorSpec, x: np.ndarray) -> np.ndarray:
  """Our (part of a) parameter `x` in the HF layout of `spec`."""
  if spec.interleaved:
    x = np.swapaxes(x, -1, -2)  # [..., 2, F] -> [..., F, 2]
  if spec.transposed:
    return np.ascontiguousarray(x.reshape(spec.hf_shape[::-1]).T)
  return x.reshape(spec.hf_shape)


def variable_at(model, path) -> nnx.Variable:
  node = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def read_parameter_block(stored: dict, shape, index) -> np.ndarray:
  """Block `index` of our parameter of `shape`, assembled from the blocks of
  its HF tensors that fall in it (one tensor, or `TensorSpec.part`s), each
  checked finite as it is read."""
  bounds = [i.indices(size)[:2] for i, size in zip(index, shape)]
  out = None
  for spec, (file, tensor) in stored.items():
    part = spec.part or (None,) * len(shape)
    if any(p is not None and not lo <= p < hi for p, (lo, hi) in zip(part, bounds)):
      continue
    free = [axis for axis, p in enumerate(part) if p is None]
    block = read_block(tensor, spec, tuple(shape[a] for a in free),
                        tuple(index[a] for a in free))
    if not np.isfinite(block).all():
      raise ValueError(f"{file}: tensor {spec.hf_name!r}"
                       f"{' (MXFP4, dequantized)' if spec.mxfp4 else ''} has non-finite values "
                       f"({int(np.sum(~np.isfinite(block)))} NaN/inf): a broken checkpoint")
    if spec.part is None:
      return block
    if out is None:
      out = np.empty([hi - lo for lo, hi in bounds], block.dtype)
    out[tuple(slice(None) if p is None else p - lo
              for p, (lo, _) in zip(part, bounds))] = block
  return out


def read_block(stored, spec: TensorSpec, shape, index) -> np.ndarray:
  """Block `index` (slices of our `shape`) of a HF tensor, read from `stored`.

  stored: anything numpy-sliceable in the HF layout (a safetensors slice,
  an `mxfp4.Mxfp4Tensor`).
  Our shape reshapes the HF tensor (transposed first when spec.transposed):
  each HF dimension splits into a run of our dimensions (q_proj: N*H -> N, H).
  A run is read as whole rows of its first dimension, [start * rest,
  stop * rest) along the HF dimension, and its other dimensions are cut from
  what was read. Only the first dimension of a run is ever sharded in
  `models/`, so exactly the block is read.
  """
  oriented = spec.hf_shape[::-1] if spec.transposed else spec.hf_shape
  hf_index, read_shape, local_index = [], [], []
  runs = _runs(shape, oriented)
  for run in runs:
    if spec.interleaved and run is runs[-1]:  # [2, F] as F * 2: read whole
      hf_index.append(slice(None))
      read_shape += [shape[d] for d in run]
      local_index += [index[d] for d in run]
      continue
    start, stop, _ = index[run[0]].indices(shape[run[0]])
    rest = [shape[d] for d in run[1:]]
    hf_index.append(slice(start * math.prod(rest), stop * math.prod(rest)))
    read_shape += [stop - start, *rest]
    local_index += [slice(None), *(index[d] for d in run[1:])]
  if spec.transposed:
    hf_index.reverse()
  x = np.asarray(stored[tuple(hf_index)])
  x = x.T if spec.transposed else x
  if spec.interleaved:  # [..., F * 2] -> [..., 2, F]
    x = np.swapaxes(x.reshape(*x.shape[:-1], -1, 2), -1, -2)
  return x.reshape(read_shape)[tuple(local_index)]


def _runs(shape, oriented) -> list[list[int]]:
  """Our dimensions grouped by the HF dimension they split, in order:
  [D, N, H] of [D, N*H] -> [[0], [1, 2]]."""
  runs, d = [], 0
  for size in oriented:
    run = [d]
    while math.prod(shape[i] for i in run) < size:
      run.append(run[-1] + 1)
    d = run[-1] + 1
    runs.append(run)
  return runs

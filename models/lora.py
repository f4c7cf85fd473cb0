"""LoRA and QLoRA: low-rank adapters on the projections of a `CausalLM`.

`add_lora(model, spec)` replaces each targeted projection (`nnx.Einsum`,
e.g. layers[i].attn.q_proj) by a `LoraEinsum` that holds the projection's own
kernel and bias variables (the same arrays: nothing is copied) and two new
`nnx.LoRAParam`s:

  y = x @ W (+ bias) + (alpha / r) * (x @ A) @ B

with A [*in, r] (the kernel's contracted dimensions, e.g. [D, r] for q_proj
[D, N, H], [N, H, r] for o_proj [N, H, D]) drawn as PEFT draws lora_A
(uniform(+-1 / sqrt(fan_in))) and B [r, *out] zero, so a fresh adapter leaves
the model's outputs unchanged. Training splits the model with
`TRAINABLE` (= nnx.LoRAParam): the gradients and the optimizer state cover the
adapters alone; the base stays in the frozen rest of the split.

QLoRA (`spec.quantize` = "int8", "int4" or "nf4"): every frozen projection
kernel of the decoder layers is stored quantized (`QuantizedWeight`, with
`qwix.quantize`: absmax, one scale per output channel and per block of
`QUANT_BLOCK` rows of the first contracted dimension, as QLoRA's block size)
and dequantized to the compute dtype inside each call, as bitsandbytes
QLoRA quantizes every linear layer: the targeted ones under their adapters,
the others (`QuantizedEinsum`) and a mixture of experts' expert weights
(`EXPERTS`) too. Embeddings, the LM head, norms, biases and a MoE router stay
in full precision. `merged_model(model, base=)` merges into the original
full-precision weights instead of the dequantized ones (what a PEFT user
gets from `merge_and_unload` on the unquantized base).

Dropout on the adapter input (`spec.dropout` > 0) draws its mask from a key
set per step with `set_dropout_key`; without a key (evaluation, generation)
the adapter branch is deterministic.

Why not qwix's own `LoraProvider`: it intercepts only the top module's
`__call__`; measured on mistral_tiny, `forward_with_cache` (generation) gave
the base model's logits with a non-zero adapter (max |diff| 2e-7 to the base,
0.53 to `__call__`), so sampling and `swajax generate` would silently drop
the adapter. The wrapper here changes the projection itself, so every call
path sees it. qwix's quantized arrays are used for the QLoRA base.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.causal_lm import CausalLM

# PEFT `target_modules` names -> (sub-module of a decoder layer, projection).
TARGETS = {
    "q_proj": ("attn", "q_proj"), "k_proj": ("attn", "k_proj"),
    "v_proj": ("attn", "v_proj"), "o_proj": ("attn", "o_proj"),
    "gate_proj": ("mlp", "gate_proj"), "up_proj": ("mlp", "up_proj"),
    "down_proj": ("mlp", "down_proj"),
}
ALL = "all"  # LoraSpec.targets: every projection of TARGETS the model has
# A mixture of experts' expert weights (attributes of a layer's mlp, `models.moe.MoE`)
# -> their contracted axes: quantized under QLoRA like the projections.
EXPERTS = {"gate_up": (1,), "down": (1,)}
QUANTIZE = ("int8", "int4", "nf4")
QUANT_BLOCK = 64
TRAINABLE = nnx.LoRAParam  # the filter that selects a LoRA run's trained variables
_QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}
_RANK = "r"  # the einsum letter of the adapter rank (the models use upper case)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """rank r >= 1; alpha (scale = alpha / r, or alpha / sqrt(r) with rslora);
  dropout in [0, 1) on the adapter input; targets: PEFT module names (keys of
  `TARGETS`), or `ALL`: those of them the model has (`add_lora` resolves it);
  quantize: None or one of `QUANTIZE` for the frozen base."""

  rank: int
  alpha: float
  dropout: float = 0.0
  targets: tuple[str, ...] | str = ALL
  quantize: str | None = None
  rslora: bool = False

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"lora_rank={self.rank!r}: expected an int >= 1")
    if not self.alpha > 0:
      raise ValueError(f"lora_alpha={self.alpha!r}: expected a float > 0")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora_dropout={self.dropout!r}: expected a float in [0, 1)")
    if self.targets != ALL and (
        isinstance(self.targets, str) or not self.targets
        or any(t not in TARGETS for t in self.targets)
        or len(set(self.targets)) != len(self.targets)):
      shown = self.targets if isinstance(self.targets, str) else ",".join(self.targets)
      raise ValueError(f"lora_targets={shown!r}: expected {ALL!r} or distinct "
                       f"names among {','.join(TARGETS)}")
    if self.quantize is not None and self.quantize not in QUANTIZE:
      raise ValueError(f"quantize_base={self.quantize!r}: expected one of {QUANTIZE}")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def parse_targets(text: str) -> tuple[str, ...] | str:
  """"q_proj,v_proj" -> ("q_proj", "v_proj"); "all" -> `ALL`."""
  if text.strip() == ALL:
    return ALL
  return tuple(t.strip() for t in text.split(",") if t.strip())


class QuantizedBase(nnx.Variable):
  """A frozen, quantized base tensor (not an nnx.Param: never trained)."""


class QuantizedWeight(nnx.Module):
  """A frozen base weight w [...] held quantized (`quantize_kernel` over its
  `contracted` axes): `dequantize(dtype)` gives w back (default: its own
  dtype); `w[...]`, `shape` and `dtype` read as the array's (what
  `models.moe.MoE` reads of its expert weights)."""

  def __init__(self, w: jax.Array, contracted: tuple[int, ...], qtype: str):
    q = quantize_kernel(w, contracted, qtype)
    self.qvalue, self.qscale = QuantizedBase(q.qvalue), QuantizedBase(q.scale)
    self.qtype = qtype
    self.shape = tuple(w.shape)
    self.dtype = jnp.dtype(w.dtype)

  def dequantize(self, dtype=None) -> jax.Array:
    import qwix  # lazy: only QLoRA needs it
    w = qwix.dequantize(qwix.QArray(self.qvalue.get_value(), self.qscale.get_value(),
                                    qtype=_QTYPES[self.qtype]))
    return w.astype(self.dtype if dtype is None else dtype)

  def __getitem__(self, index):
    return self.dequantize()[index]

  def stored_bytes(self) -> tuple[int, int]:
    """(bytes as stored: values + scales, bytes of w in its own dtype)."""
    return (param_bytes([self.qvalue.get_value(), self.qscale.get_value()]),
            math.prod(self.shape) * self.dtype.itemsize)


class QuantizedEinsum(nnx.Module):
  """A frozen projection `nnx.Einsum` that takes no adapter, its kernel held
  as a `QuantizedWeight` (QLoRA): the same call, x [B, T, *in] -> [B, T, *out]."""

  def __init__(self, base: nnx.Einsum, qtype: str):
    self.einsum_str = base.einsum_str
    self.dtype = base.dtype
    self.bias = base.bias
    self.weight = QuantizedWeight(base.kernel.get_value(), _contracted(base.einsum_str),
                                  qtype)

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    y = jnp.einsum(self.einsum_str, x.astype(dtype), self.weight.dequantize(dtype))
    return y if self.bias is None else y + self.bias.get_value().astype(dtype)


class LoraEinsum(nnx.Module):
  """A projection `nnx.Einsum` plus a LoRA adapter; see the module docstring.

  kernel: the projection's kernel variable (nnx.Param, frozen by the split),
  or with quantization `weight` (a `QuantizedWeight`) instead.
  lora_a [*in, r], lora_b [r, *out]: nnx.LoRAParam. Same call as the
  projection: x [B, T, *in] -> [B, T, *out] in the projection's dtype.
  """

  def __init__(self, base: nnx.Einsum, spec: LoraSpec, *, rngs: nnx.Rngs):
    lhs, kernel_letters, out = _parse(base.einsum_str)
    n_in = len(_contracted(base.einsum_str))
    shape = base.kernel.get_value().shape
    in_shape, out_shape = shape[:n_in], shape[n_in:]
    self.einsum_str = base.einsum_str
    self.a_str = f"{lhs},{kernel_letters[:n_in]}{_RANK}->{lhs[:-n_in]}{_RANK}"
    self.b_str = f"{lhs[:-n_in]}{_RANK},{_RANK}{kernel_letters[n_in:]}->{out}"
    self.dtype = base.dtype
    self.bias = base.bias
    self.spec = spec
    if spec.quantize is None:
      self.kernel = base.kernel  # the same variable and array: no copy
    else:
      self.weight = QuantizedWeight(base.kernel.get_value(), tuple(range(n_in)),
                                    spec.quantize)
    param_dtype = base.kernel.get_value().dtype
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    self.lora_a = nnx.LoRAParam(jax.random.uniform(
        rngs.params(), (*in_shape, spec.rank), param_dtype, -bound, bound))
    self.lora_b = nnx.LoRAParam(jnp.zeros((spec.rank, *out_shape), param_dtype))
    self.dropout_key = nnx.data(None)

  def base_kernel(self, dtype=None) -> jax.Array:
    """The frozen kernel (dequantized under QLoRA) in `dtype` (default: stored)."""
    if self.spec.quantize is None:
      w = self.kernel.get_value()
      return w if dtype is None else w.astype(dtype)
    return self.weight.dequantize(dtype)

  def delta(self) -> jax.Array:
    """scale * A @ B in the kernel's layout and dtype: what merging adds."""
    a, b = self.lora_a.get_value(), self.lora_b.get_value()
    merged = jnp.tensordot(a, b, axes=1, precision=jax.lax.Precision.HIGHEST)
    return (self.spec.scale * merged).astype(a.dtype)

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    y = jnp.einsum(self.einsum_str, x, self.base_kernel(dtype))
    if self.bias is not None:
      y = y + self.bias.get_value().astype(dtype)
    h = x
    rate = self.spec.dropout
    if rate > 0 and self.dropout_key is not None:
      keep = jax.random.bernoulli(self.dropout_key, 1.0 - rate, x.shape)
      h = jnp.where(keep, x / (1.0 - rate), 0).astype(dtype)
    h = jnp.einsum(self.a_str, h, self.lora_a.get_value().astype(dtype))
    h = jnp.einsum(self.b_str, h, self.lora_b.get_value().astype(dtype))
    return y + (self.spec.scale * h).astype(dtype)


def _parse(einsum_str: str) -> tuple[str, str, str]:
  operands, out = einsum_str.replace(" ", "").split("->")
  lhs, kernel = operands.split(",")
  return lhs, kernel, out


def _contracted(einsum_str: str) -> tuple[int, ...]:
  """The kernel axes an `nnx.Einsum` of the models contracts (its leading ones)."""
  lhs, kernel_letters, _ = _parse(einsum_str)
  n_in = sum(c in lhs for c in kernel_letters)
  if not n_in or kernel_letters[:n_in] != lhs[-n_in:]:
    raise ValueError(f"einsum_str={einsum_str!r}: expected the contracted "
                     "dimensions last in the input and first in the kernel")
  return tuple(range(n_in))


def quantize_kernel(w: jax.Array, contracted: tuple[int, ...], qtype: str):
  """A `qwix.QArray` of w: absmax scales per channel of every axis but the
  `contracted` ones, and per QUANT_BLOCK rows of the first contracted axis
  (the whole axis when it is not a multiple of QUANT_BLOCK)."""
  import qwix  # lazy: only QLoRA needs it

  first = contracted[0]
  tile = QUANT_BLOCK if w.shape[first] % QUANT_BLOCK == 0 else w.shape[first]
  return qwix.quantize(w, _QTYPES[qtype],
                       channelwise_axes=tuple(a for a in range(w.ndim) if a not in contracted),
                       tiled_axes={first: tile})


def lora_modules(model) -> list[tuple[tuple, LoraEinsum]]:
  """(path, module) of every `LoraEinsum` of `model`, in layer order."""
  return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, LoraEinsum)]


def add_lora(model: CausalLM, spec: LoraSpec, *, rngs: nnx.Rngs | None = None
             ) -> CausalLM:
  """`model` with spec.targets of every layer wrapped by `LoraEinsum` (in
  place; returned for chaining; targets `ALL`: every projection of `TARGETS`
  the model has, e.g. only the attention's in a mixture of experts, and the
  adapters' spec names them); lora_a drawn from `rngs` (default
  nnx.Rngs(0)). Raises ValueError if it already has LoRA, or for a target
  the model lacks (naming those it has)."""
  rngs = nnx.Rngs(0) if rngs is None else rngs
  if lora_modules(model):
    raise ValueError("add_lora: the model already has LoRA adapters")
  layer = model.layers[0]
  present = [name for name, (block, proj) in TARGETS.items()
             if isinstance(getattr(getattr(layer, block), proj, None), nnx.Einsum)]
  if spec.targets == ALL:
    spec = dataclasses.replace(spec, targets=tuple(present))
  missing = [name for name in spec.targets if name not in present]
  if missing:
    raise ValueError(
        f"lora_targets={','.join(spec.targets)!r}: this {model.config.model_type} "
        f"model has no {','.join(missing)} projection (a mixture of experts or a "
        f"GELU MLP has none); its LoRA targets: {','.join(present)}")
  for layer in model.layers:
    for name in spec.targets:
      block, proj = TARGETS[name]
      parent = getattr(layer, block)
      setattr(parent, proj, LoraEinsum(getattr(parent, proj), spec, rngs=rngs))
    if spec.quantize is not None:
      _quantize_frozen(layer, spec.quantize)
  return model


def _quantize_frozen(layer, qtype: str) -> None:
  """QLoRA: the layer's projections without an adapter (`QuantizedEinsum`)
  and its expert weights (`EXPERTS`) held quantized, in place."""
  for block, proj in TARGETS.values():
    parent = getattr(layer, block)
    if isinstance(getattr(parent, proj, None), nnx.Einsum):
      setattr(parent, proj, QuantizedEinsum(getattr(parent, proj), qtype))
  for name, contracted in EXPERTS.items():
    weight = getattr(layer.mlp, name, None)
    if isinstance(weight, nnx.Param):
      setattr(layer.mlp, name, QuantizedWeight(weight.get_value(), contracted, qtype))


def set_dropout_key(model, key: jax.Array | None) -> None:
  """Sets (or with None clears) the dropout key of every adapter: each gets
  fold_in(key, its index)."""
  for i, (_, module) in enumerate(lora_modules(model)):
    module.dropout_key = None if key is None else jax.random.fold_in(key, i)


def merged_model(model: CausalLM, base: CausalLM | None = None) -> CausalLM:
  """A plain `CausalLM` (no adapters) whose kernels are W + scale * A @ B, in
  the adapters' (the parameter) dtype; the other parameters are `model`'s
  arrays (not copied), dequantized under QLoRA. base: a plain `CausalLM` of
  the same config whose arrays are W and the rest instead (under QLoRA the
  original full-precision weights, as PEFT's `merge_and_unload` on the
  unquantized base merges)."""
  return _plain_model(model, merge=True, base=base)


def base_model(model: CausalLM) -> CausalLM:
  """The frozen base of a LoRA model as a plain `CausalLM`: the kernels W
  (dequantized under QLoRA) in the adapters' dtype, the adapters left out;
  the other parameters are `model`'s arrays (not copied)."""
  return _plain_model(model, merge=False)


def _plain_model(model: CausalLM, *, merge: bool, base: CausalLM | None = None
                 ) -> CausalLM:
  if base is not None and base.config != model.config:
    raise ValueError("merged_model: base has another config than the model")
  plain = nnx.eval_shape(lambda: CausalLM(
      model.config, dtype=model.dtype, param_dtype=model.param_dtype,
      attn_impl=model.attn_impl, remat=model.remat, rngs=nnx.Rngs(0)))
  modules = dict(lora_modules(model))
  for path, _ in nnx.to_flat_state(nnx.state(plain, nnx.Param)):
    owner, leaf = tuple(path[:-1]), path[-1]
    lora = modules.get(owner) if leaf == "kernel" else None
    dtype = model.param_dtype if lora is None else lora.lora_a.get_value().dtype
    if base is not None:
      value = _get(base, path).get_value().astype(dtype)
    elif lora is not None:
      value = lora.base_kernel(dtype)
    else:
      value = _frozen_value(model, path)
    if lora is not None and merge:
      value = value + lora.delta()
    _get(plain, path).set_value(value)
  return plain


def _frozen_value(model, path) -> jax.Array:
  """The array of a plain model's parameter `path` in `model` (dequantized
  when QLoRA holds it as a `QuantizedWeight`)."""
  owner = _get(model, path[:-1])
  if isinstance(owner, QuantizedEinsum) and path[-1] == "kernel":
    return owner.weight.dequantize()
  node = getattr(owner, path[-1]) if not isinstance(path[-1], int) else owner[path[-1]]
  return node.dequantize() if isinstance(node, QuantizedWeight) else node.get_value()


def _get(node, path):
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def param_bytes(tree) -> int:
  """Bytes of the arrays of a pytree (nnx.State), sub-byte types at their
  bit width (int4 / nf4: half a byte per value)."""
  total = 0
  for x in jax.tree.leaves(tree):
    dtype = jnp.dtype(x.dtype)
    bits = (jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer)
            else dtype.itemsize * 8)
    total += math.ceil(np.prod(x.shape) * bits / 8)
  return total


def base_bytes(model) -> int:
  """Bytes of `model`'s frozen base: every variable but the adapters."""
  return param_bytes(nnx.state(model, nnx.All(nnx.Variable, nnx.Not(TRAINABLE),
                                              nnx.Not(nnx.RngState))))


def summary(model) -> str:
  """One line: trainable adapter parameters and the frozen base's bytes
  (under QLoRA: before and after quantization)."""
  trained = sum(x.size for x in jax.tree.leaves(nnx.state(model, TRAINABLE)))
  quantized = [m for _, m in nnx.iter_modules(model) if isinstance(m, QuantizedWeight)]
  base = sum(x.size for x in jax.tree.leaves(
      nnx.state(model, nnx.All(nnx.Param, nnx.Not(TRAINABLE)))))
  base += sum(math.prod(m.shape) for m in quantized)
  after = base_bytes(model)
  line = (f"LoRA: {trained:,} trainable parameters ({100 * trained / base:.2f}% of the "
          f"base's {base:,}); frozen base {after / 2**20:.2f} MiB")
  if quantized:
    stored, full = (sum(b) for b in zip(*(m.stored_bytes() for m in quantized)))
    line += (f" ({quantized[0].qtype}; {(after - stored + full) / 2**20:.2f} MiB "
             "before quantization)")
  return line

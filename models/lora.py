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

QLoRA (`spec.quantize` = "int8", "int4" or "nf4"): the frozen base kernel is
stored quantized with `qwix.quantize` (absmax, one scale per output channel
and per block of `QUANT_BLOCK` rows of the first contracted dimension, as
QLoRA's block size) and dequantized to the compute dtype inside each call.

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


class LoraEinsum(nnx.Module):
  """A projection `nnx.Einsum` plus a LoRA adapter; see the module docstring.

  kernel: the projection's kernel variable (nnx.Param, frozen by the split),
  or with quantization `qvalue` / `qscale` (`QuantizedBase`) instead.
  lora_a [*in, r], lora_b [r, *out]: nnx.LoRAParam. Same call as the
  projection: x [B, T, *in] -> [B, T, *out] in the projection's dtype.
  """

  def __init__(self, base: nnx.Einsum, spec: LoraSpec, *, rngs: nnx.Rngs):
    lhs, kernel_letters, out = _parse(base.einsum_str)
    n_in = sum(c in lhs for c in kernel_letters)
    if not n_in or kernel_letters[:n_in] != lhs[-n_in:]:
      raise ValueError(f"einsum_str={base.einsum_str!r}: expected the contracted "
                       "dimensions last in the input and first in the kernel")
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
      q = quantize_kernel(base.kernel.get_value(), n_in, spec.quantize)
      self.qvalue, self.qscale = QuantizedBase(q.qvalue), QuantizedBase(q.scale)
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
    else:
      import qwix  # lazy: only QLoRA needs it
      w = qwix.dequantize(qwix.QArray(self.qvalue.get_value(), self.qscale.get_value(),
                                      qtype=_QTYPES[self.spec.quantize]))
    return w if dtype is None else w.astype(dtype)

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


def quantize_kernel(w: jax.Array, n_in: int, qtype: str):
  """A `qwix.QArray` of kernel w [*in, *out]: absmax scales per output channel
  and per QUANT_BLOCK rows of the first input dimension (the whole dimension
  when it is not a multiple of QUANT_BLOCK)."""
  import qwix  # lazy: see `LoraEinsum.base_kernel`

  tile = QUANT_BLOCK if w.shape[0] % QUANT_BLOCK == 0 else w.shape[0]
  return qwix.quantize(w, _QTYPES[qtype], channelwise_axes=tuple(range(n_in, w.ndim)),
                       tiled_axes={0: tile})


def lora_modules(model) -> list[tuple[tuple, LoraEinsum]]:
  """(path, module) of every `LoraEinsum` of `model`, in layer order."""
  return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, LoraEinsum)]


def add_lora(model: CausalLM, spec: LoraSpec, *, rngs: nnx.Rngs) -> CausalLM:
  """`model` with spec.targets of every layer wrapped by `LoraEinsum` (in
  place; returned for chaining; targets `ALL`: every projection of `TARGETS`
  the model has, e.g. only the attention's in a mixture of experts, and the
  adapters' spec names them). Raises ValueError if it already has LoRA, or
  for a target the model lacks (naming those it has)."""
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
  return model


def set_dropout_key(model, key: jax.Array | None) -> None:
  """Sets (or with None clears) the dropout key of every adapter: each gets
  fold_in(key, its index)."""
  for i, (_, module) in enumerate(lora_modules(model)):
    module.dropout_key = None if key is None else jax.random.fold_in(key, i)


def merged_model(model: CausalLM) -> CausalLM:
  """A plain `CausalLM` (no adapters) whose kernels are W + scale * A @ B
  (W dequantized under QLoRA), in the adapters' (the parameter) dtype; the
  other parameters are `model`'s arrays (not copied)."""
  return _plain_model(model, merge=True)


def base_model(model: CausalLM) -> CausalLM:
  """The frozen base of a LoRA model as a plain `CausalLM`: the kernels W
  (dequantized under QLoRA) in the adapters' dtype, the adapters left out;
  the other parameters are `model`'s arrays (not copied)."""
  return _plain_model(model, merge=False)


def _plain_model(model: CausalLM, *, merge: bool) -> CausalLM:
  plain = nnx.eval_shape(lambda: CausalLM(
      model.config, dtype=model.dtype, param_dtype=model.param_dtype,
      attn_impl=model.attn_impl, remat=model.remat, rngs=nnx.Rngs(0)))
  modules = dict(lora_modules(model))
  for path, _ in nnx.to_flat_state(nnx.state(plain, nnx.Param)):
    owner, leaf = tuple(path[:-1]), path[-1]
    if owner in modules and leaf == "kernel":
      lora = modules[owner]
      value = lora.base_kernel(lora.lora_a.get_value().dtype)
      if merge:
        value = value + lora.delta()
    else:
      value = _get(model, path).get_value()
    _get(plain, path).set_value(value)
  return plain


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
  quantized = [m for _, m in lora_modules(model) if m.spec.quantize is not None]
  base = sum(x.size for x in jax.tree.leaves(
      nnx.state(model, nnx.All(nnx.Param, nnx.Not(TRAINABLE)))))
  base += sum(m.qvalue.get_value().size for m in quantized)
  after = base_bytes(model)
  line = (f"LoRA: {trained:,} trainable parameters ({100 * trained / base:.2f}% of the "
          f"base's {base:,}); frozen base {after / 2**20:.2f} MiB")
  if quantized:
    stored = sum(param_bytes([m.qvalue.get_value(), m.qscale.get_value()]) for m in quantized)
    full = sum(m.qvalue.get_value().size * m.lora_a.get_value().dtype.itemsize
               for m in quantized)
    line += (f" ({quantized[0].spec.quantize}; {(after - stored + full) / 2**20:.2f} MiB "
             "before quantization)")
  return line

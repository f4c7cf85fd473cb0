"""`DecoderLayer` and `CausalLM`: embedding, decoder layers, LM head.

Dimension letters: B batch, T sequence, D model dim, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from models.attention import Attention
from models.config import BLOCKS, ModelConfig
from models.kv_cache import KVCache, LayerCache, init_cache
from models.layers import MLP, norm, param_init
from models.moe import MoE

# remat= -> jax checkpoint policy for each decoder layer ("none": no remat).
REMAT_POLICIES = {
    "full": None,  # save only the layer's inputs, recompute everything
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayer(nnx.Module):
  """Attention and MLP around the residual stream, laid out as `config.block`
  (`config.BLOCKS`); [B, T, D] -> [B, T, D]:
    pre_norm   x + attn(input_norm(x)), then x + mlp(post_attn_norm(x))
    sandwich   x + post_attn_norm(attn(input_norm(x))),
               then x + post_mlp_norm(mlp(pre_mlp_norm(x)))
    post_norm  x + post_attn_norm(attn(x)), then x + post_mlp_norm(mlp(x))
    parallel   x + attn(input_norm(x)) + mlp(input_norm(x))
  Norms a layout lacks are None. With `config.num_experts` the MLP is a
  `MoE` (Mixtral, gpt-oss), whose router logits [B, T, E]
  `forward_with_router_logits` also returns (the load-balancing loss).
  """

  def __init__(self, config: ModelConfig, *, layer: int, dtype, param_dtype,
               attn_impl: str, rngs: nnx.Rngs):
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.block = config.block
    has = BLOCKS[config.block]
    make = lambda name: (norm(config, config.hidden_size, **common)
                         if name in has else None)
    self.input_norm = make("input_norm")
    self.post_attn_norm = make("post_attn_norm")
    self.pre_mlp_norm = make("pre_mlp_norm")
    self.post_mlp_norm = make("post_mlp_norm")
    self.attn = Attention(config, layer=layer, attn_impl=attn_impl, **common)
    self.mlp = (MoE if config.num_experts else MLP)(config, **common)

  def __call__(self, x, positions, segment_ids=None):
    """x [B, T, D], positions int32 [B, T], segment_ids int32 [B, T] | None
    -> [B, T, D]."""
    return self.forward_with_router_logits(x, positions, segment_ids)[0]

  def forward_with_router_logits(self, x, positions, segment_ids=None):
    """As `__call__`, and the MoE's router logits [B, T, E] float32 (None
    for a dense MLP): ([B, T, D], router logits)."""
    x, _, router_logits = self._residual(
        x, lambda h: (self.attn(h, positions, segment_ids), None))
    return x, router_logits

  def forward_with_cache(self, x, positions, cache: LayerCache):
    """x [B, T, D], positions int32 [B, T] (-1: padding), this layer's `cache`
    -> ([B, T, D], the updated cache); see `Attention.forward_with_cache`."""
    x, cache, _ = self._residual(
        x, lambda h: self.attn.forward_with_cache(h, positions, cache))
    return x, cache

  def _residual(self, x, attend):
    """The block layout around attend(h) -> (out, cache):
    (x out, cache, router logits or None)."""
    if self.block == "parallel":
      h = self.input_norm(x)
      out, cache = attend(h)
      y, router_logits = self._mlp(h)
      return x + out + y, cache, router_logits
    if self.block == "pre_norm":
      out, cache = attend(self.input_norm(x))
      x = x + out
      y, router_logits = self._mlp(self.post_attn_norm(x))
      return x + y, cache, router_logits
    if self.block == "sandwich":
      out, cache = attend(self.input_norm(x))
      x = x + self.post_attn_norm(out)
      y, router_logits = self._mlp(self.pre_mlp_norm(x))
      return x + self.post_mlp_norm(y), cache, router_logits
    out, cache = attend(x)  # post_norm
    x = x + self.post_attn_norm(out)
    y, router_logits = self._mlp(x)
    return x + self.post_mlp_norm(y), cache, router_logits

  def _mlp(self, h):
    """(mlp(h) [B, T, D], router logits [B, T, E] or None for a dense MLP)."""
    return self.mlp(h) if isinstance(self.mlp, MoE) else (self.mlp(h), None)


def _call_layer(layer, x, positions, segment_ids):
  return layer.forward_with_router_logits(x, positions, segment_ids)


def _remat_layer(layer, x, positions, segment_ids, *, policy):
  """`_call_layer` under `jax.checkpoint(policy=)`, the layer passed as its
  state: a pure function of arrays (a layer call writes no state back; nnx's
  lifted remat would, and fails where the frozen base of a LoRA model holds
  values from outside the differentiated function)."""
  graphdef, state = nnx.split(layer)

  def pure(state, x, positions, segment_ids):
    return _call_layer(nnx.merge(graphdef, state), x, positions, segment_ids)

  return jax.checkpoint(pure, policy=policy)(state, x, positions, segment_ids)


class CausalLM(nnx.Module):
  """A decoder of any `hf_config.FAMILIES` family with its LM head.

  `model(input_ids [B, T] int32, *, positions=None, segment_ids=None)`
  -> logits [B, T, V] float32. positions [B, T] int32 default to arange(T);
  with segment_ids [B, T] int32 a token attends only within its segment
  (packed documents: pass positions restarting at 0 for each document).

  dtype: compute dtype (activations, matmuls); param_dtype: stored weights.
  Norms, RoPE angles and softmax run in fp32; logits are fp32 (times
  `config.logit_scale`, then softcapped by `config.final_logit_softcap`).
  With `config.scale_embeddings` the embedding is multiplied by sqrt(D)
  rounded to the compute dtype (Gemma).
  attn_impl: passed to `sliding_window_attention` ("auto", "pallas", "splash",
  "xla", "reference", "cudnn"), and to `decode_attention` for cached single
  tokens ("cudnn" and "splash" become "auto" there: xla on TPU). remat: "none", "full" or "dots_saveable",
  per decoder layer (not applied to cached calls). rngs: initial parameters.

  Generation: `model.forward_with_cache(input_ids, positions=positions,
  cache=cache)` with a `KVCache` from `init_cache` returns (logits [B, T, V]
  float32, the updated cache); positions [B, T] int32 are required (-1 marks
  a padding token, which is neither written nor attended to); there are no
  segment_ids (padding is marked by positions -1).
  """

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, attn_impl: str = "auto",
               remat: str = "none", rngs: nnx.Rngs):
    if remat != "none" and remat not in REMAT_POLICIES:
      raise ValueError(
          f"remat={remat!r}: expected one of {['none', *REMAT_POLICIES]}")
    self.config = config
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.attn_impl = attn_impl
    self.remat = remat
    self.embed = nnx.Embed(
        config.vocab_size, config.hidden_size, dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=param_init(config, (None, "fsdp")), rngs=rngs)
    self.layers = nnx.List([
        DecoderLayer(config, layer=i, dtype=dtype, param_dtype=param_dtype,
                     attn_impl=attn_impl, rngs=rngs)
        for i in range(config.num_layers)])
    self.norm = norm(config, config.hidden_size, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
    if not config.tie_word_embeddings:
      self.lm_head = nnx.Einsum(
          "BTD,DV->BTV", (config.hidden_size, config.vocab_size),
          kernel_init=param_init(config, ("fsdp", None)), dtype=dtype,
          param_dtype=param_dtype, preferred_element_type=jnp.float32,
          rngs=rngs)

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty `KVCache` for up to max_len positions: min(W, max_len) slots
    per sliding layer, max_len per full layer (`kv_cache.cache_slots`); k and
    v in `dtype` (default: the compute dtype)."""
    return init_cache(self.config, batch_size, max_len,
                      self.dtype if dtype is None else dtype)

  def with_full_attention(self) -> "CausalLM":
    """This model with every window removed: the negative control.

    A `CausalLM` of `self.config.with_full_attention()` (every layer full
    causal) with this model's dtype, param_dtype, attn_impl and remat, whose
    variables hold this model's arrays: the same `jax.Array`s, no copy, no
    initialisation (the twin is built abstractly, then filled). Its logits
    equal this model's at positions < min(W) and differ past the window. The
    two share arrays, not variables: updating one model's parameters later
    (e.g. training it) leaves the other as it was.
    """
    config = self.config.with_full_attention()
    twin = nnx.eval_shape(lambda: CausalLM(
        config, dtype=self.dtype, param_dtype=self.param_dtype,
        attn_impl=self.attn_impl, remat=self.remat, rngs=nnx.Rngs(0)))
    nnx.update(twin, nnx.state(self))
    return twin

  def __call__(self, input_ids, *, positions=None, segment_ids=None):
    """input_ids [B, T] int -> logits [B, T, V] float32 (see the class)."""
    return self.forward_with_router_logits(
        input_ids, positions=positions, segment_ids=segment_ids)[0]

  def forward_with_router_logits(self, input_ids, *, positions=None,
                                 segment_ids=None):
    """As `__call__`: (logits [B, T, V] float32, router logits [L, B, T, E]
    float32 of the L layers, or None without experts); the input of
    `models.moe.load_balancing_loss`."""
    batch, seq = _check_tokens(input_ids, positions, segment_ids)
    mesh = _explicit_mesh(input_ids, self.embed.embedding[...])
    if mesh is not None:  # logits (and router logits) sharded like input_ids
      b, t = _spec_of(input_ids, 2)
      router = P(None, b, t, None) if self.config.num_experts else None
      with jax.sharding.use_abstract_mesh(mesh):
        return self._on_auto_axes(
            "forward_with_router_logits", (P(b, t, None), router), input_ids,
            positions=positions, segment_ids=segment_ids)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    call = _call_layer
    if self.remat != "none":
      call = functools.partial(_remat_layer, policy=REMAT_POLICIES[self.remat])
    x = self._embed(input_ids)  # (B, T, D)
    router_logits = []
    for layer in self.layers:
      x, layer_router_logits = call(layer, x, positions, segment_ids)
      router_logits.append(layer_router_logits)
    if self.config.num_experts:
      return self._logits(x), jnp.stack(router_logits)  # (L, B, T, E)
    return self._logits(x), None

  def _on_auto_axes(self, method: str, out_sharding, *args, **kwargs):
    """`getattr(self, method)(*args, **kwargs)` under a mesh with Explicit
    axes (`jax.make_mesh`'s default), run with those axes made Auto
    (`jax.sharding.auto_axes`), so the layers' shardings propagate as on an
    Auto mesh (the modules carry no explicit-sharding annotations on their
    activations). The parameters enter as an argument (a closed-over array
    would keep its Explicit type); the results come back as `out_sharding`
    (PartitionSpecs) says."""
    graphdef, state = nnx.split(self)

    def run(state, args, kwargs):
      return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)

    return jax.sharding.auto_axes(run, out_sharding=out_sharding)(
        state, args, kwargs)

  def forward_with_cache(self, input_ids, *, positions, cache: KVCache):
    """input_ids [B, T] int, positions int32 [B, T] (-1: padding), `cache`
    -> (logits [B, T, V] float32, the updated `KVCache`) (see the class)."""
    _check_tokens(input_ids, positions, None)
    _check_cache(cache, positions, len(self.layers))
    mesh = _explicit_mesh(input_ids, self.embed.embedding[...])
    if mesh is not None:  # logits like input_ids, the cache as it came
      b, t = _spec_of(input_ids, 2)
      specs = (P(b, t, None), jax.tree.map(lambda x: P(*_spec_of(x, x.ndim)), cache))
      with jax.sharding.use_abstract_mesh(mesh):
        return self._on_auto_axes("forward_with_cache", specs, input_ids,
                                  positions=positions, cache=cache)
    x = self._embed(input_ids)  # (B, T, D)
    layer_caches = []
    for layer, layer_cache in zip(self.layers, cache.layers):
      x, layer_cache = layer.forward_with_cache(x, positions, layer_cache)
      layer_caches.append(layer_cache)
    return self._logits(x), KVCache(tuple(layer_caches))

  def _embed(self, input_ids):
    """input_ids [B, T] -> x [B, T, D] (times sqrt(D) if scale_embeddings)."""
    x = self.embed(input_ids)  # (B, T, D)
    if self.config.scale_embeddings:
      x = x * jnp.asarray(self.config.hidden_size ** 0.5, self.dtype)
    return x

  def _logits(self, x):
    """The final norm and LM head: x [B, T, D] -> logits [B, T, V] float32."""
    x = self.norm(x)
    if self.config.tie_word_embeddings:
      logits = jnp.einsum("BTD,VD->BTV", x,  # (B, T, V)
                          self.embed.embedding[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = self.lm_head(x).astype(jnp.float32)  # (B, T, V)
    if self.config.logit_scale is not None:
      logits = logits * self.config.logit_scale
    cap = self.config.final_logit_softcap
    if cap is not None:
      logits = cap * jnp.tanh(logits / cap)
    return logits


def _explicit_mesh(*arrays):
  """The abstract mesh with an Explicit axis that this call runs under: the
  ambient one (`jax.set_mesh`), or else that of an array whose sharding (its
  type) is on one (e.g. parameters `load_hf(mesh=)` placed on a
  `jax.make_mesh` mesh, used without `jax.set_mesh`); None if neither."""
  def explicit(mesh):
    return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))

  ambient = jax.sharding.get_abstract_mesh()
  if explicit(ambient):
    return ambient
  for x in arrays:
    mesh = getattr(getattr(getattr(x, "aval", None), "sharding", None), "mesh",
                   None)
    if explicit(mesh):
      return getattr(mesh, "abstract_mesh", mesh)
  return None


def _spec_of(x, ndim):
  """The PartitionSpec entries of x's sharding (its type), padded to ndim."""
  spec = tuple(getattr(getattr(jax.typeof(x), "sharding", None), "spec", ()) or ())
  return (spec + (None,) * ndim)[:ndim]


def _check_cache(cache, positions, num_layers):
  """A cached call needs explicit positions and a cache per layer."""
  if not isinstance(cache, KVCache) or len(cache.layers) != num_layers:
    layers = len(getattr(cache, "layers", ()))
    raise ValueError(f"cache: expected a KVCache of {num_layers} layers "
                     f"(model.init_cache), got a {type(cache).__name__} of "
                     f"{layers}")
  if positions is None:
    raise ValueError("positions=None with a cache: expected int32 [B, T] "
                     "absolute positions (-1 for padding)")


def _check_tokens(input_ids, positions, segment_ids):
  """Checks input_ids [B, T] int and the optional [B, T] int32 companions."""
  if getattr(input_ids, "ndim", None) != 2 or not jnp.issubdtype(
      input_ids.dtype, jnp.integer):
    raise ValueError(
        f"input_ids: expected an int array [batch, seq], got "
        f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
        f"{getattr(input_ids, 'shape', '')}")
  for name, x in (("positions", positions), ("segment_ids", segment_ids)):
    if x is None:
      continue
    if tuple(getattr(x, "shape", ())) != tuple(input_ids.shape) or (
        x.dtype != jnp.int32):
      raise ValueError(
          f"{name}: expected int32 {tuple(input_ids.shape)} like input_ids, got "
          f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
  return input_ids.shape

"""GQA self-attention on `sliding_window_attention`, with this layer's window,
RoPE (or none), scale and softcap.

Dimension letters: B batch, T sequence, D model dim, N query heads, K kv heads
(N % K == 0), H head dim, M = N + 2K fused q/k/v heads.
"""

from __future__ import annotations

import jax
from flax import nnx

from models.config import ModelConfig
from models.hf_config import LOCAL_ROPE, NOPE
from models.kv_cache import LayerCache
from models.layers import norm, param_init, sharded
from models.rope import apply_rope, rope_frequencies
from pallas_kernels import context_parallel_attention, sliding_window_attention
from pallas_kernels.context_parallel import CONTEXT_AXIS


class Attention(nnx.Module):
  """q/k/v projections (or one fused qkv_proj, Phi-3), optional q/k norms
  (per head: Qwen3, Gemma 3; over all heads: Olmo 3), RoPE (unless the layer
  is NoPE), the op, o_proj. With `config.attn_sinks` (gpt-oss) a learned
  sink logit per query head, `sinks` [N], joins every softmax denominator
  (the op's `sinks=`), in training and in cached calls alike.

  `layer`: this layer's index in `config`: its window (`layer_windows`:
  None, full causal, or W, the query at position i sees keys
  i - W < j <= i) and RoPE (`layer_rope`). The window, `config.attn_scale`
  and `config.attn_softcap` are passed to the op unchanged: never dropped.
  `attn_impl` selects the op's impl. `attn(x, positions, segment_ids)` ->
  out; `attn.forward_with_cache(x, positions, cache)` -> (out, cache), for
  generation. Under a mesh
  (`jax.set_mesh`) with a "context" axis of size > 1, `attn(...)` runs
  `context_parallel_attention` over it (the sequence split over that axis);
  generation never does.
  """

  def __init__(self, config: ModelConfig, *, layer: int, dtype, param_dtype,
               attn_impl: str, rngs: nnx.Rngs):
    d, n, k, h = (config.hidden_size, config.num_q_heads, config.num_kv_heads,
                  config.head_dim)
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    zeros = nnx.initializers.zeros
    reads_d = dict(kernel_init=param_init(config, ("fsdp", None, None)),
                   bias_init=sharded(zeros, (None, None)), **common)
    bias = config.attention_bias
    fused = config.fused_projections
    projection = lambda spec, heads, unfused: nnx.Einsum(
        spec, (d, heads, h), (heads, h) if bias else None,
        **reads_d) if unfused else None
    self.qkv_proj = projection("BTD,DMH->BTMH", n + 2 * k, fused)
    self.q_proj = projection("BTD,DNH->BTNH", n, not fused)
    self.k_proj = projection("BTD,DKH->BTKH", k, not fused)
    self.v_proj = projection("BTD,DKH->BTKH", k, not fused)
    self.o_proj = nnx.Einsum("BTNH,NHD->BTD", (n, h, d),
                             (d,) if config.attention_out_bias else None,
                             kernel_init=param_init(config, (None, None, "fsdp")),
                             bias_init=sharded(zeros, (None,)), **common)
    per_head = config.qk_norm == "head"
    qk_norm = lambda heads: (None if config.qk_norm is None else norm(
        config, h if per_head else heads * h, bias=False, **common))
    self.q_norm = qk_norm(n)
    self.k_norm = qk_norm(k)
    # One learned logit per query head in every row's softmax (gpt-oss).
    self.sinks = nnx.Param(param_init(config, (None,))(
        rngs.params(), (n,), param_dtype)) if config.attn_sinks else None
    self.qk_norm = config.qk_norm
    self.num_heads = (n, k)
    rope = config.layer_rope_kinds[layer]
    self.inv_freq = None
    if rope != NOPE:
      inv_freq, self.rope_attention_factor = rope_frequencies(
          config, local=rope == LOCAL_ROPE)  # static
      self.inv_freq = tuple(inv_freq.tolist())  # static, [H / 2]
    self.rope_interleaved = config.rope_interleaved
    self.window = config.layer_windows[layer]
    self.scale = config.attn_scale
    self.softcap = config.attn_softcap
    self.attn_impl = attn_impl

  def __call__(self, x, positions, segment_ids=None):
    """x [B, T, D], positions int32 [B, T], segment_ids int32 [B, T] | None
    -> [B, T, D]: attention of the T tokens among themselves."""
    q, k, v = self._qkv(x, positions)
    options = dict(window=self.window, causal=True, segment_ids=segment_ids,
                   softcap=self.softcap, scale=self.scale, impl=self.attn_impl,
                   sinks=self._sinks())
    mesh = jax.sharding.get_abstract_mesh()
    if dict(mesh.shape).get(CONTEXT_AXIS, 1) > 1:
      out = context_parallel_attention(q, k, v, mesh=mesh, **options)  # (B, T, N, H)
    else:
      out = sliding_window_attention(q, k, v, **options)  # (B, T, N, H)
    return self.o_proj(out)  # (B, T, D)

  def forward_with_cache(self, x, positions, cache: LayerCache):
    """x [B, T, D], positions int32 [B, T] (-1: padding), this layer's `cache`
    -> ([B, T, D], the updated cache): the new tokens are written to the
    cache and attend to it (`LayerCache.attend`)."""
    q, k, v = self._qkv(x, positions)
    out, cache = cache.attend(  # out (B, T, N, H)
        q, k, v, positions, window=self.window, softcap=self.softcap,
        scale=self.scale, impl=self.attn_impl, sinks=self._sinks())
    return self.o_proj(out), cache  # (B, T, D)

  def _sinks(self):
    """The sink logits [N] (the op computes with them in fp32), or None."""
    return None if self.sinks is None else self.sinks[...]

  def _qkv(self, x, positions):
    """q [B, T, N, H], k, v [B, T, K, H]: projected, q/k normed, q/k rotated."""
    n, kv = self.num_heads
    if self.qkv_proj is not None:
      qkv = self.qkv_proj(x)  # (B, T, N + 2K, H)
      q, k, v = qkv[:, :, :n], qkv[:, :, n:n + kv], qkv[:, :, n + kv:]
    else:
      q = self.q_proj(x)  # (B, T, N, H)
      k = self.k_proj(x)  # (B, T, K, H)
      v = self.v_proj(x)  # (B, T, K, H)
    if self.qk_norm == "head":
      q, k = self.q_norm(q), self.k_norm(k)
    elif self.qk_norm == "all_heads":  # over the whole projection, N * H / K * H
      q = self.q_norm(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
      k = self.k_norm(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
    if self.inv_freq is not None:
      rope = dict(interleaved=self.rope_interleaved)
      q = apply_rope(q, positions, self.inv_freq, self.rope_attention_factor, **rope)
      k = apply_rope(k, positions, self.inv_freq, self.rope_attention_factor, **rope)
    return q, k, v

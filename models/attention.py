"""GQA self-attention on `sliding_window_attention`, with this layer's window.

Dimension letters: B batch, T sequence, D model dim, N query heads, K kv heads
(N % K == 0), H head dim.
"""

from __future__ import annotations

import jax
from flax import nnx

from models.config import ModelConfig
from models.kv_cache import LayerCache
from models.layers import RMSNorm, param_init, sharded
from models.rope import apply_rope, rope_frequencies
from pallas_kernels import context_parallel_attention, sliding_window_attention
from pallas_kernels.context_parallel import CONTEXT_AXIS


class Attention(nnx.Module):
  """q/k/v projections, optional q/k RMSNorm (Qwen3), RoPE, the op, o_proj.

  `window`: None (full causal) or W (query at position i sees keys i - W < j <= i),
  passed to the op unchanged: never dropped. `attn_impl` selects the op's impl.
  `attn(x, positions, segment_ids)` -> out; `attn.forward_with_cache(x,
  positions, cache)` -> (out, cache), for generation. Under a mesh (`jax.set_mesh`)
  with a "context" axis of size > 1, `attn(...)` runs `context_parallel_attention`
  over it (the sequence split over that axis); generation never does.
  """

  def __init__(self, config: ModelConfig, *, window: int | None, dtype,
               param_dtype, attn_impl: str, rngs: nnx.Rngs):
    d, n, k, h = (config.hidden_size, config.num_q_heads, config.num_kv_heads,
                  config.head_dim)
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    reads_d = dict(kernel_init=param_init(config, ("fsdp", None, None)),
                   bias_init=sharded(nnx.initializers.zeros, (None, None)),
                   **common)
    bias = config.attention_bias
    self.q_proj = nnx.Einsum("BTD,DNH->BTNH", (d, n, h), (n, h) if bias else None,
                             **reads_d)
    self.k_proj = nnx.Einsum("BTD,DKH->BTKH", (d, k, h), (k, h) if bias else None,
                             **reads_d)
    self.v_proj = nnx.Einsum("BTD,DKH->BTKH", (d, k, h), (k, h) if bias else None,
                             **reads_d)
    self.o_proj = nnx.Einsum("BTNH,NHD->BTD", (n, h, d),
                             kernel_init=param_init(config, (None, None, "fsdp")),
                             **common)
    if config.qk_norm:
      self.q_norm = RMSNorm(h, eps=config.rms_norm_eps, **common)
      self.k_norm = RMSNorm(h, eps=config.rms_norm_eps, **common)
    else:
      self.q_norm = self.k_norm = None
    inv_freq, self.rope_attention_factor = rope_frequencies(config)  # static
    self.inv_freq = tuple(inv_freq.tolist())  # static, [H / 2]
    self.window = window
    self.attn_impl = attn_impl

  def __call__(self, x, positions, segment_ids=None):
    """x [B, T, D], positions int32 [B, T], segment_ids int32 [B, T] | None
    -> [B, T, D]: attention of the T tokens among themselves."""
    q, k, v = self._qkv(x, positions)
    options = dict(window=self.window, causal=True, segment_ids=segment_ids,
                   impl=self.attn_impl)
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
        q, k, v, positions, window=self.window, impl=self.attn_impl)
    return self.o_proj(out), cache  # (B, T, D)

  def _qkv(self, x, positions):
    """q [B, T, N, H], k, v [B, T, K, H]: projected, q/k normed, q/k rotated."""
    q = self.q_proj(x)  # (B, T, N, H)
    k = self.k_proj(x)  # (B, T, K, H)
    v = self.v_proj(x)  # (B, T, K, H)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions, self.inv_freq, self.rope_attention_factor)
    k = apply_rope(k, positions, self.inv_freq, self.rope_attention_factor)
    return q, k, v

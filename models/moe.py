"""Mixture of experts (Mixtral, gpt-oss): a router picks k of E gated MLP
experts per token and sums their outputs, weighted; and the load-balancing
loss of the routers.

Dimension letters: B batch, T sequence, D model dim, F expert MLP dim
(`intermediate_size`), E experts, k experts per token, L MoE layers,
N = B·T tokens, A = N·k assignments (token, expert pairs), P blocks of M
rows (`MoE.experts`).

Routing (`route`): the top k of the E router logits, softmax over those k.
That is both families' rule: Mixtral's (softmax over all E, top k,
renormalised to sum 1) picks the same experts (softmax is monotone) with the
same weights (p_i / sum_topk p_j = exp(l_i) / sum_topk exp(l_j)); gpt-oss's
is the rule as written. So `ModelConfig` has no router variant field. The logits and
the weights are float32 whatever the compute dtype.

Dispatch (`MoE.experts`): the A assignments sorted by expert, each expert's
group padded to whole blocks of M rows, one batched einsum over the blocks
with each block's expert weights gathered (no loop over experts), then back
to token order and summed over k (a gather and a reshape, no scatter-add).
Exact, and the fastest exact dispatch measured on CPU at D = 512 (`swajax
bench moe`, benchmarks/results/cpu_moe_dispatch_2026-12-01.md): 3-12x faster
than `jax.lax.ragged_dot` on the same sorted groups, which jax 0.10-0.12
lower on CPU and GPU (XLA's default rewrite) to a dense dot over an
[E, A, D] zero-padded copy (only TPU has a grouped kernel), and 2-12x faster
than a dense "every token through every expert" einsum (which wins only at
E/k = 2, the tiny preset's forward + backward); a capacity-padded [E, C, D]
buffer is 1.3-4x faster again but drops the rows past C, so it cannot match
transformers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import GATED_ACTIVATIONS, gated_activation, param_init, sharded


def route(logits, k: int):
  """(weights [..., k] float32 summing to 1, experts [..., k] int32): the top
  k of `logits` [..., E] (largest first) and the softmax over them."""
  top, experts = jax.lax.top_k(logits.astype(jnp.float32), k)
  return jax.nn.softmax(top, axis=-1), experts


class MoE(nnx.Module):
  """E experts, `config.experts_per_token` per token: x [B, T, D] ->
  (y [B, T, D] in `dtype`, router_logits [B, T, E] float32).

  y[t] = sum over the k picked experts e of w_e · expert_e(x[t]) (`route`),
  expert_e(x) = down_e(gated_activation(config.mlp, gate_e(x), up_e(x))).

  Parameters (the HF IO table maps these names and layouts):
    router        nnx.Einsum, kernel [D, E] (+ bias [E] if config.router_bias),
                  computed in float32 at HIGHEST precision
    gate_up       [E, D, 2, F]: [:, :, 0] the gate, [:, :, 1] the up projection
    gate_up_bias  [E, 2, F] if config.mlp_bias else None
    down          [E, F, D]
    down_bias     [E, D] if config.mlp_bias else None
  Kernels are normal(initializer_range), biases zeros. Sharding: the expert
  axis of the expert parameters is "fsdp" (each device of `--fsdp N` holds
  E / N experts' weights; E not divisible by N falls back to replicated);
  the router is replicated: D·E is tiny next to the experts' 3·E·D·F, and an
  unsharded contraction keeps the logits, hence the top-k choice, bitwise the
  same on every mesh.
  """

  def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    if config.num_experts < 1:
      raise ValueError(f"num_experts={config.num_experts!r}: MoE needs >= 1")
    if config.mlp not in GATED_ACTIVATIONS:
      raise ValueError(f"mlp={config.mlp!r}: the experts need a gated kind, "
                       f"one of {GATED_ACTIVATIONS}")
    d, f, e = config.hidden_size, config.intermediate_size, config.num_experts
    self.kind = config.mlp
    self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
    self.experts_per_token = config.experts_per_token
    self.dtype = dtype
    zeros = nnx.initializers.zeros
    self.router = nnx.Einsum(
        "BTD,DE->BTE", (d, e), (e,) if config.router_bias else None,
        dtype=jnp.float32, param_dtype=param_dtype,
        precision=jax.lax.Precision.HIGHEST,
        kernel_init=param_init(config, (None, None)),
        bias_init=sharded(zeros, (None,)), rngs=rngs)

    def param(init, shape, sharding):
      return nnx.Param(sharded(init, sharding)(rngs.params(), shape, param_dtype))

    def bias(shape):
      return param(zeros, shape, ("fsdp",) + (None,) * (len(shape) - 1)
                   ) if config.mlp_bias else None

    normal = nnx.initializers.normal(config.initializer_range)
    self.gate_up = param(normal, (e, d, 2, f), ("fsdp", None, None, None))
    self.gate_up_bias = bias((e, 2, f))
    self.down = param(normal, (e, f, d), ("fsdp", None, None))
    self.down_bias = bias((e, d))

  def __call__(self, x):
    b, t, d = x.shape
    logits = self.router(x)  # (B, T, E) float32
    weights, experts = route(logits, self.experts_per_token)  # (B, T, k)
    y = self.experts(x.reshape(b * t, d).astype(self.dtype),
                     weights.reshape(b * t, -1), experts.reshape(b * t, -1))
    return y.reshape(b, t, d), logits

  def experts(self, x, weights, experts):
    """x [N, D], weights [N, k] float32, experts [N, k] int32 -> [N, D]: the
    weighted sum of each token's k experts.

    The A assignments sorted by expert, each expert's group padded to whole
    blocks of M rows (`block_rows`; at most A/M + E blocks, a static bound),
    then one batched einsum per projection with each block's expert weights
    gathered: exact, at most (A + E·M) / A times the FLOPs of the assigned
    rows (the padding rows are computed and never read back).
    """
    n, k = experts.shape
    e = self.gate_up.shape[0]
    a, m = n * k, block_rows(n * k, e)
    blocks = -(-(a + e * (m - 1)) // m)
    cast = lambda p: None if p is None else p[...].astype(self.dtype)
    order, expert_of, group_sizes = sort_assignments(experts, e)
    expert_blocks = -(-group_sizes // m)  # (E,) blocks of each expert
    first_block = jnp.cumsum(expert_blocks) - expert_blocks
    starts = jnp.cumsum(group_sizes) - group_sizes
    # dest: each sorted assignment's row in the padded [blocks · m] buffer.
    dest = first_block[expert_of] * m + jnp.arange(a) - starts[expert_of]
    block_expert = jnp.minimum(jnp.searchsorted(
        jnp.cumsum(expert_blocks), jnp.arange(blocks), side="right"), e - 1)
    # Each token's row repeated k times, then sorted into its slot: distinct
    # source rows and slots, so x's gradient adds no colliding rows (the
    # weights' does: the blocks of one expert sum into its gradient).
    rows = jnp.zeros((blocks * m, x.shape[1]), self.dtype).at[dest].set(
        jnp.repeat(x, k, axis=0)[order]).reshape(blocks, m, -1)  # (P, M, D)
    h = jnp.einsum("PMD,PDGF->PMGF", rows, cast(self.gate_up)[block_expert])
    if self.gate_up_bias is not None:
      h = h + cast(self.gate_up_bias)[block_expert][:, None]
    act = gated_activation(self.kind, h[:, :, 0], h[:, :, 1], alpha=self.alpha,
                           limit=self.limit)  # (P, M, F)
    out = jnp.einsum("PMF,PFD->PMD", act, cast(self.down)[block_expert])
    if self.down_bias is not None:
      out = out + cast(self.down_bias)[block_expert][:, None]
    out = out.reshape(blocks * m, -1)[dest]  # (A, D) in expert order
    return combine(out, order, weights).astype(self.dtype)


def block_rows(assignments: int, num_experts: int) -> int:
  """M, the rows of a block: about A / 2E (half an expert's share under
  uniform routing), a multiple of 8, at least 8. Smaller blocks waste fewer
  padding rows (<= E·(M - 1)), larger ones gather fewer weight copies
  (<= A/M + E blocks)."""
  share = -(-assignments // (2 * num_experts))  # ceil(A / 2E)
  return max(8, -(-share // 8) * 8)


def sort_assignments(experts, num_experts: int):
  """The assignments of experts [N, k] (assignment a = token a // k's
  (a % k)-th pick) grouped by expert: (order [A], the assignments in expert
  order, stable; expert_of [A], their experts, ascending; group_sizes [E]
  int32, the rows of each expert)."""
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return order, flat[order], group_sizes


def combine(out, order, weights):
  """out [A, D] in expert order (`sort_assignments`), weights [N, k] ->
  [N, D] float32: each token's k outputs, weighted and summed (a gather back
  to token order and a reduction over k, no scatter-add)."""
  n, k = weights.shape
  out = out[jnp.argsort(order)].reshape(n, k, -1)  # token order again
  return jnp.einsum("NKD,NK->ND", out.astype(jnp.float32), weights,
                    precision=jax.lax.Precision.HIGHEST)


def load_balancing_loss(router_logits, experts_per_token: int, mask=None):
  """The auxiliary load-balancing loss (Switch Transformer), as transformers'
  `load_balancing_loss_func`: a float32 scalar, 1 for perfectly uniform
  routing.

  router_logits: [L, B, T, E] (or a sequence of L [B, T, E]), one per MoE
  layer; mask: [B, T] bool, True for a real token (None: all), the same for
  every layer. With p = softmax(logits) over all E and, per row, its top
  `experts_per_token` experts, over the L·R counted rows (R = the real tokens):

    loss = E · sum_e (picks of e / (L·R)) · (sum of p_e / (L·R))

  Both factors are sums over every layer before their product (not a sum of
  per-layer products), as transformers computes it.
  """
  if isinstance(router_logits, (list, tuple)):
    router_logits = jnp.stack(router_logits)
  if router_logits.ndim != 4:
    raise ValueError(f"router_logits.shape={router_logits.shape}: expected "
                     "[L, B, T, E]")
  _, b, t, e = router_logits.shape
  if not 1 <= experts_per_token <= e:
    raise ValueError(f"experts_per_token={experts_per_token!r}: expected "
                     f"1 <= k <= E = {e}")
  if mask is None:
    mask = jnp.ones((b, t), bool)
  elif mask.shape != (b, t):
    raise ValueError(f"mask.shape={mask.shape}: expected [B, T] = {(b, t)}")
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  _, picked = jax.lax.top_k(probs, experts_per_token)  # (L, B, T, k)
  real = mask.astype(jnp.float32)[None, :, :, None]  # (1, B, T, 1)
  picks = jnp.sum(jax.nn.one_hot(picked, e) * real[..., None], axis=(0, 1, 2, 3))
  prob_sums = jnp.sum(probs * real, axis=(0, 1, 2))
  rows = router_logits.shape[0] * jnp.sum(real)
  return e * jnp.sum((picks / rows) * (prob_sums / rows))

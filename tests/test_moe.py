"""models.moe: parity with transformers' gpt-oss and Mixtral MoE blocks, the
load-balancing loss, gradients against a per-expert dense reference, bf16,
sharding annotations, refusals."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models.layers import gated_activation
from models.moe import MoE, load_balancing_loss, route

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.gpt_oss import modeling_gpt_oss  # noqa: E402
from transformers.models.mixtral import modeling_mixtral  # noqa: E402

D, F, E, K = 16, 12, 4, 2  # hidden, per-expert intermediate, experts, per token
FAMILIES = ("gpt_oss", "mixtral")  # topk_softmax + clamp + biases; softmax_topk, none
LIMIT = 7.0


def config(family, **overrides):
  fields = dict(hidden_size=D, intermediate_size=F, num_experts=E,
                experts_per_token=K, **overrides)
  if family == "gpt_oss":
    fields.setdefault("swiglu_limit", LIMIT)
  return getattr(models, f"{family}_tiny")(**fields)


def moe(family, dtype=jnp.float32, **overrides):
  return MoE(config(family, **overrides), dtype=dtype, param_dtype=jnp.float32,
             rngs=nnx.Rngs(0))


def randomize(module, scale=0.5, seed=0):
  """Every parameter of `module` N(0, scale²) (biases too: nonzero)."""
  graphdef, state = nnx.split(module)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  state = jax.tree.unflatten(tree, [scale * jax.random.normal(k, l.shape, l.dtype)
                                    for k, l in zip(keys, leaves)])
  return nnx.merge(graphdef, state)


def hf_block(family):
  """transformers' MoE block with random weights (eager experts), and our MoE
  holding the same weights."""
  torch.manual_seed(0)
  common = dict(hidden_size=D, intermediate_size=F, num_local_experts=E,
                num_experts_per_tok=K, experts_implementation="eager")
  ours = moe(family)
  if family == "gpt_oss":
    block = modeling_gpt_oss.GptOssMLP(transformers.GptOssConfig(
        **common, swiglu_limit=LIMIT)).eval()
    with torch.no_grad():
      for p in block.parameters():
        p.copy_(0.5 * torch.randn_like(p))
    t = {n: p.detach().numpy() for n, p in block.named_parameters()}
    # gate_up_proj [E, D, 2F]: gate and up interleaved along the last axis.
    ours.router.kernel[...] = t["router.weight"].T
    ours.router.bias[...] = t["router.bias"]
    ours.gate_up[...] = t["experts.gate_up_proj"].reshape(E, D, F, 2).transpose(0, 1, 3, 2)
    ours.gate_up_bias[...] = t["experts.gate_up_proj_bias"].reshape(E, F, 2).transpose(0, 2, 1)
    ours.down[...] = t["experts.down_proj"]
    ours.down_bias[...] = t["experts.down_proj_bias"]
  else:
    block = modeling_mixtral.MixtralSparseMoeBlock(transformers.MixtralConfig(
        **common, router_jitter_noise=0.0)).eval()
    with torch.no_grad():
      for p in block.parameters():
        p.copy_(0.5 * torch.randn_like(p))
    t = {n: p.detach().numpy() for n, p in block.named_parameters()}
    # gate_up_proj [E, 2F, D]: gate rows then up rows; down_proj [E, D, F].
    ours.router.kernel[...] = t["gate.weight"].T
    ours.gate_up[...] = t["experts.gate_up_proj"].reshape(E, 2, F, D).transpose(0, 3, 1, 2)
    ours.down[...] = t["experts.down_proj"].transpose(0, 2, 1)
  return block, ours


def hf_forward(block, x):
  """(y [B, T, D], router logits [B, T, E]) of transformers' block."""
  with torch.no_grad():
    xt = torch.tensor(np.asarray(x))
    out = block(xt)
    y = out[0] if isinstance(out, tuple) else out
    router = block.router if hasattr(block, "router") else block.gate
    logits = router(xt.reshape(-1, D))[0].reshape(*x.shape[:2], E)
  return y.numpy(), logits.numpy()


def inputs(seed=1, shape=(2, 9, D), scale=3.0):
  return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ----- parity with transformers -----------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tokens", [(2, 9), (1, 1), (1, 200)])  # + decode, many blocks
def test_matches_transformers(family, tokens):
  block, ours = hf_block(family)
  x = inputs(shape=tokens + (D,))
  expected, expected_logits = hf_forward(block, x)
  y, logits = nnx.jit(lambda m, x: m(x))(ours, x)
  chex.assert_type(logits, jnp.float32)
  chex.assert_shape((y, logits), (tokens + (D,), tokens + (E,)))
  # fp32: within 2e-6 of each output's scale (|y| reaches ~50: 1e-4 absolute).
  for ours_, theirs in ((logits, expected_logits), (y, expected)):
    scale = float(np.max(np.abs(theirs)))
    assert scale > 1.0  # not a trivially small output
    chex.assert_trees_all_close(ours_, theirs, atol=2e-6 * scale, rtol=0)


def test_gpt_oss_clamp_is_hit_and_needed():
  block, ours = hf_block("gpt_oss")
  x = inputs()
  expected, _ = hf_forward(block, x)
  # The pre-activations of the routed experts pass the limit both ways.
  _, experts = route(ours.router(x), K)
  h = jnp.einsum("BTD,EDGF->BTEGF", x, ours.gate_up[...]) + ours.gate_up_bias[...]
  picked = jnp.take_along_axis(h, experts[..., None, None], axis=2)
  assert jnp.any(picked[..., 0, :] > LIMIT)
  assert jnp.any(jnp.abs(picked[..., 1, :]) > LIMIT)
  # Negative control: the same weights without the clamp miss transformers.
  unclamped = moe("gpt_oss", swiglu_limit=1e9)
  nnx.update(unclamped, nnx.state(ours))
  y, _ = unclamped(x)
  assert float(jnp.max(jnp.abs(y - expected))) > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_router_rules_are_one_and_renormalised(family):
  """softmax over E, top k, renormalised (Mixtral) == softmax over the top k
  logits (gpt-oss); without the renormalisation transformers is missed."""
  block, ours = hf_block(family)
  x = inputs()
  expected, _ = hf_forward(block, x)
  logits = ours.router(x).reshape(-1, E)
  probs = jax.nn.softmax(logits, axis=-1)
  top, experts = jax.lax.top_k(probs, K)
  weights, picked = route(logits, K)
  np.testing.assert_array_equal(picked, experts)
  chex.assert_trees_all_close(weights, top / jnp.sum(top, -1, keepdims=True),
                              atol=1e-6, rtol=0)
  unnormalised = ours.experts(x.reshape(-1, D), top, experts).reshape(x.shape)
  assert float(jnp.max(jnp.abs(unnormalised - expected))) > 1e-2


# ----- load-balancing loss ------------------------------------------------------

@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_transformers(layers, masked):
  b, t = 3, 5
  logits = 2.0 * jax.random.normal(jax.random.key(layers), (layers, b, t, E))
  mask = (np.arange(t)[None, :] < np.array([5, 2, 4])[:, None]) if masked else None
  expected = modeling_gpt_oss.load_balancing_loss_func(
      tuple(torch.tensor(np.asarray(l).reshape(b * t, E)) for l in logits), E, K,
      None if mask is None else torch.tensor(mask.astype(np.int64)))
  mixtral = modeling_mixtral.load_balancing_loss_func(
      tuple(torch.tensor(np.asarray(l).reshape(b * t, E)) for l in logits), E, K,
      None if mask is None else torch.tensor(mask.astype(np.int64)))
  loss = jax.jit(load_balancing_loss, static_argnums=1)(logits, K, mask)
  chex.assert_shape(loss, ())
  chex.assert_type(loss, jnp.float32)
  np.testing.assert_allclose(loss, expected.item(), rtol=1e-6)
  np.testing.assert_allclose(loss, mixtral.item(), rtol=1e-6)
  # A sequence of [B, T, E] is the same; a mean of per-layer losses is not.
  np.testing.assert_allclose(load_balancing_loss(list(logits), K, mask), loss,
                             rtol=1e-6)
  per_layer = np.mean([load_balancing_loss(l[None], K, mask) for l in logits])
  assert abs(per_layer - float(loss)) > 1e-4


def test_load_balancing_loss_uniform_routing_is_one():
  logits = jnp.tile(jnp.eye(E) * 5.0, (1, 1, 2, 1)).reshape(1, 1, 2 * E, E)
  chex.assert_trees_all_close(load_balancing_loss(logits, 1), 1.0, atol=0.02)
  masked_out = jnp.arange(2 * E)[None] < E  # the padding rows would not count
  chex.assert_trees_all_close(load_balancing_loss(logits, 1, masked_out),
                              load_balancing_loss(logits[:, :, :E], 1), atol=1e-6)


# ----- gradients against a per-expert dense reference ---------------------------

def reference(state, x, cfg):
  """(y, logits) of a MoE state, one dense pass per expert (fp32, HIGHEST)."""
  dot = lambda s, a, b: jnp.einsum(s, a, b, precision=jax.lax.Precision.HIGHEST)
  logits = dot("BTD,DE->BTE", x, state["router"]["kernel"])
  if cfg.router_bias:
    logits = logits + state["router"]["bias"]
  top, picked = jax.lax.top_k(logits, K)
  weights = jnp.exp(top - top[..., :1])
  weights = weights / jnp.sum(weights, -1, keepdims=True)
  y = jnp.zeros_like(x)
  for e in range(E):
    h = dot("BTD,DGF->BTGF", x, state["gate_up"][e])
    if cfg.mlp_bias:
      h = h + state["gate_up_bias"][e]
    gate, up = h[..., 0, :], h[..., 1, :]
    if cfg.mlp == "clamped_swiglu":
      gate, up = jnp.minimum(gate, LIMIT), jnp.clip(up, -LIMIT, LIMIT)
      act = (up + 1) * gate / (1 + jnp.exp(-cfg.swiglu_alpha * gate))
    else:
      act = gate / (1 + jnp.exp(-gate)) * up
    out = dot("BTF,FD->BTD", act, state["down"][e])
    if cfg.mlp_bias:
      out = out + state["down_bias"][e]
    w = jnp.sum(jnp.where(picked == e, weights, 0.0), axis=-1)
    y = y + w[..., None] * out
  return y, logits


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_dense_reference(family):
  cfg = config(family)
  module = randomize(moe(family))
  graphdef, state = nnx.split(module)
  x = inputs(seed=2)
  ct_y, ct_l = (jax.random.normal(k, s) for k, s in zip(
      jax.random.split(jax.random.key(3)), [x.shape, x.shape[:2] + (E,)]))
  ours_fn = lambda s, x: nnx.merge(graphdef, s)(x)
  ref_fn = lambda s, x: reference(s, x, cfg)
  (y, logits), vjp = jax.vjp(jax.jit(ours_fn), state, x)
  (y_ref, logits_ref), vjp_ref = jax.vjp(ref_fn, nnx.to_pure_dict(state), x)
  chex.assert_trees_all_close((y, logits), (y_ref, logits_ref), atol=1e-5, rtol=1e-5)
  grads, grads_ref = vjp((ct_y, ct_l)), vjp_ref((ct_y, ct_l))
  grads = (nnx.to_pure_dict(grads[0]), grads[1])
  chex.assert_trees_all_equal_structs(grads, grads_ref)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    # fp32 to 1e-5 of each gradient's own scale (the router's reach ~200).
    scale = float(jnp.max(jnp.abs(g_ref)))
    assert scale > 0  # every parameter and x get a gradient
    assert float(jnp.max(jnp.abs(g - g_ref))) <= 1e-5 * scale


# ----- bf16, sharding, refusals -----------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_forward_is_close_to_fp32(family):
  fp32 = randomize(moe(family), scale=0.3)
  bf16 = moe(family, dtype=jnp.bfloat16)
  nnx.update(bf16, nnx.state(fp32))
  x = inputs().astype(jnp.bfloat16)
  y, logits = fp32(x.astype(jnp.float32))
  y16, logits16 = nnx.jit(lambda m, x: m(x))(bf16, x)
  chex.assert_type((y16, logits16), (jnp.bfloat16, jnp.float32))
  # The router runs in fp32 on the same inputs: the same logits and experts.
  chex.assert_trees_all_close(logits16, logits, atol=1e-6, rtol=0)
  # bf16 expert matmuls: within 3% of the output's scale.
  error = jnp.max(jnp.abs(y16.astype(jnp.float32) - y)) / jnp.max(jnp.abs(y))
  assert 0 < float(error) < 0.03


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_are_sharded_over_fsdp(family):
  module = moe(family)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(module)))
  expected = {"router": {"kernel": (None, None)},
              "gate_up": ("fsdp", None, None, None), "down": ("fsdp", None, None)}
  if family == "gpt_oss":
    expected["router"]["bias"] = (None,)
    expected.update(gate_up_bias=("fsdp", None, None), down_bias=("fsdp", None))
  assert jax.tree.map(tuple, specs, is_leaf=lambda s: isinstance(
      s, jax.sharding.PartitionSpec)) == expected
  shapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(module)))
  assert shapes["gate_up"] == (E, D, 2, F) and shapes["down"] == (E, F, D)


def test_refusals():
  with pytest.raises(ValueError, match="num_experts=0: MoE needs >= 1"):
    MoE(models.mistral_tiny(), dtype=jnp.float32, param_dtype=jnp.float32,
        rngs=nnx.Rngs(0))
  gate = jnp.ones((3,))
  with pytest.raises(ValueError, match="kind='gelu': expected one of"):
    gated_activation("gelu", gate, gate)
  with pytest.raises(ValueError, match="alpha=None, limit=7.0: clamped_swiglu"):
    gated_activation("clamped_swiglu", gate, gate, limit=7.0)
  logits = jnp.zeros((2, 3, 5, E))
  with pytest.raises(ValueError, match=r"router_logits.shape=\(3, 5, 4\)"):
    load_balancing_loss(logits[0], K)
  with pytest.raises(ValueError, match=r"mask.shape=\(3, 4\): expected"):
    load_balancing_loss(logits, K, jnp.ones((3, 4), bool))
  with pytest.raises(ValueError, match="experts_per_token=5: expected"):
    load_balancing_loss(logits, 5)

"""impl="cudnn": exact against the reference on GPU; clear errors elsewhere."""

import chex
import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import reference_attention, sliding_window_attention
from tests.attention_cases import make_inputs, tolerance

ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.skipif(ON_GPU, reason="checks the error raised without a GPU")
def test_without_gpu_raises_runtime_error():
  q, k, v, _ = make_inputs(0, dtype=jnp.bfloat16)
  with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
    sliding_window_attention(q, k, v, window=4, impl="cudnn")


def test_block_sizes_are_refused():
  q, k, v, _ = make_inputs(0, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="takes no block sizes"):
    sliding_window_attention(q, k, v, window=4, impl="cudnn", block_sizes=1)


def test_float32_is_refused_before_any_kernel():
  q, k, v, _ = make_inputs(0)
  with pytest.raises(NotImplementedError, match="float32"):
    sliding_window_attention(q, k, v, window=4, impl="cudnn")


def test_sinks_are_refused_naming_them():
  # JAX's cuDNN attention has no sink argument.
  q, k, v, _ = make_inputs(0, dtype=jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="impl='cudnn'.*sinks"):
    sliding_window_attention(q, k, v, window=4, impl="cudnn",
                             sinks=jnp.zeros((q.shape[2],)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("seq, heads, kv_heads, head_dim, window, causal", [
    (256, 4, 4, 64, 1, True),
    (256, 8, 2, 128, 37, True),
    (384, 8, 1, 64, 128, True),
    (200, 4, 2, 128, None, True),
    (128, 4, 2, 64, 1000, True),
    (192, 4, 2, 64, None, False),
    (256, 4, 2, 64, (31, 0), False),  # the causal band written as a tuple
])
def test_matches_reference_on_gpu(dtype, seq, heads, kv_heads, head_dim,
                                  window, causal):
  q, k, v, _ = make_inputs(2, batch=2, q_len=seq, num_q_heads=heads,
                           num_kv_heads=kv_heads, head_dim=head_dim,
                           dtype=dtype)
  d_out = jax.random.normal(jax.random.key(7), q.shape, dtype)

  def run(fn, *args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(d_out.astype(out.dtype))

  out, grads = jax.jit(lambda q, k, v: run(
      lambda q, k, v: sliding_window_attention(
          q, k, v, window=window, causal=causal, impl="cudnn"), q, k, v))(q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  out_ref, grads_ref = jax.jit(lambda q, k, v: run(
      lambda q, k, v: reference_attention(q, k, v, window=window,
                                          causal=causal), q, k, v))(*f32)
  chex.assert_type(out, dtype)
  chex.assert_trees_all_close(out.astype(jnp.float32), out_ref,
                              **tolerance(dtype, "out"))
  for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
    chex.assert_trees_all_close(g.astype(jnp.float32), g_ref,
                                **tolerance(dtype, "grad"),
                                custom_message=name)

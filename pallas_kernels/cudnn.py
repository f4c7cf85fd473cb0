"""impl="cudnn": cuDNN flash attention via `jax.nn.dot_product_attention`.

NVIDIA GPUs only. What cuDNN can express through that API (read from jax's
`jax/_src/nn/functions.py` and `jax/_src/cudnn/fused_attention_stablehlo.py`),
and hence `FEATURES`, the "cudnn" row of `api.IMPLS`:

- causal, with or without a causal window: `is_causal=True,
  local_window_size=(W - 1, 0)` becomes cuDNN's `sliding_window_length=W`,
  i.e. exactly `i - W < j <= i`;
- full bidirectional (`is_causal=False`, no mask);
- GQA/MQA natively (K/V not repeated); bfloat16 / float16 only (float32
  raises in jax), head_dim a multiple of 8 and <= 256 (Hopper) / 128;
- not: segment ids (the API has none; cuDNN's packed layout needs contiguous
  offsets, not per-token ids), softcap (no API argument), a bidirectional
  local window (jax raises for a right window without causal), q_len !=
  kv_len (cuDNN's causal mask is top-left aligned, ours bottom-right), and
  lse (`return_residual=True` gives it forward-only: the VJP drops its
  cotangent, so gradients through it would be silently wrong), and
  attention sinks (the API has no sink argument).
"""

from __future__ import annotations

import jax

from pallas_kernels.features import (BFLOAT16, BIDIRECTIONAL, CAUSAL,
                                     CAUSAL_WINDOW, FLOAT16, GQA,
                                     check_features)
from pallas_kernels.validation import AttentionProblem

FEATURES = frozenset({CAUSAL, CAUSAL_WINDOW, BIDIRECTIONAL, GQA, BFLOAT16,
                      FLOAT16})


def _window_args(problem: AttentionProblem) -> dict:
  """The band as `jax.nn.dot_product_attention` keyword arguments."""
  band = problem.band
  if band.right is None:  # full bidirectional (the only non-causal case)
    return dict(is_causal=False, local_window_size=None)
  if band.left is None:
    return dict(is_causal=True, local_window_size=None)
  return dict(is_causal=True, local_window_size=(band.left, 0))


def attention(q, k, v, segment_ids, problem: AttentionProblem, *, sinks=None,
              block_sizes=None):
  """The impl="cudnn" entry of the dispatch table.

  q: [B, T, N, H]; k, v: [B, S, K, H] (T == S), bf16/fp16. Returns
  (out [B, T, N, H], None): cuDNN gives no usable lse. sinks: always None
  here (`check_features` refuses them).
  """
  del sinks
  if block_sizes is not None:
    raise ValueError(
        f"block_sizes={block_sizes!r}: impl='cudnn' takes no block sizes")
  check_features("cudnn", FEATURES, problem, return_lse=False)
  if jax.default_backend() != "gpu":
    raise RuntimeError(
        "impl='cudnn' needs an NVIDIA GPU with cuDNN, but "
        f"jax.default_backend() is {jax.default_backend()!r}; use impl='xla' "
        "(any backend) or impl='pallas'")
  out = jax.nn.dot_product_attention(
      q, k, v, scale=problem.scale, implementation="cudnn",
      **_window_args(problem))
  return out, None

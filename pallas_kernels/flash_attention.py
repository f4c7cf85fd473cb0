"""impl="pallas": the Pallas (Triton) flash kernels as one differentiable op.

The stack points down only:

  flash_attention.py   custom VJP, the dispatch entry `attention`, `visit_counts`
    ├── flash_forward.py    the forward kernel and its pallas_call
    ├── flash_backward.py   the dQ and dK/dV kernels and their pallas_calls
    └── flash_tiles.py      `FlashBlockSizes`, `KernelConfig`, tile loads, scores
                            (imported by both kernel files, which never import
                            each other)

Work is O(T·W): every kernel visits only the blocks of the band. No [T, S]
array exists and q/k/v are never copied in HBM.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.flash_backward import backward
from pallas_kernels.flash_forward import forward
from pallas_kernels.flash_tiles import KernelConfig
from pallas_kernels.mask import kv_block_range, q_block_range
from pallas_kernels.validation import AttentionProblem


@functools.partial(jax.custom_vjp, nondiff_argnames=("config",))
def _flash(q, k, v, segment_ids, sinks, config: KernelConfig):
  return forward(q, k, v, segment_ids, sinks, config=config)


def _flash_fwd(q, k, v, segment_ids, sinks, config: KernelConfig):
  out, lse = forward(q, k, v, segment_ids, sinks, config=config)
  return (out, lse), (q, k, v, segment_ids, sinks, out, lse)


def _flash_bwd(config: KernelConfig, residuals, cotangents):
  q, k, v, segment_ids, sinks, out, lse = residuals
  d_out, d_lse = cotangents
  dq, dk, dv, d_sinks = backward(q, k, v, segment_ids, sinks, out, lse, d_out,
                                 d_lse, config=config)
  return dq, dk, dv, None, d_sinks


_flash.defvjp(_flash_fwd, _flash_bwd)
# Jitted, config static: an eager call compiles once (as xla_blockwise's op).
_flash = jax.jit(_flash, static_argnames=("config",))


def attention(q, k, v, segment_ids, problem: AttentionProblem, *, sinks=None,
              block_sizes=None, interpret=None):
  """The impl="pallas" entry: (out [B, T, N, H] q.dtype, lse [B, N, T] fp32).

  q: [B, T, N, H]; k, v: [B, S, K, H]; segment_ids: int32 [B, T] or None;
  sinks: [N] or None; `problem` from `validation.check_attention_args`.
  block_sizes: a `FlashBlockSizes` or None for
  `FlashBlockSizes.default(problem)`.
  interpret: None runs Pallas in interpret mode when the default backend is
  not a GPU. Differentiable in q, k, v and sinks through both outputs.
  """
  config = KernelConfig.make(problem, block_sizes, interpret)
  return _flash(q, k, v, segment_ids, sinks, config=config)


def visit_counts(problem: AttentionProblem, block_sizes=None) -> dict:
  """How many tiles each program visits, per kernel, with the kernels' tiles.

  Returns {"forward": [cdiv(T, block_q)] key blocks per query block,
  "dq": the same for the dQ kernel, "dkv": [cdiv(S, block_k_dkv)] query
  blocks per key block (per query head of the group)}. With a window these
  are bounded by the band, independent of the sequence length.
  """
  config = KernelConfig.make(problem, block_sizes, interpret=True)
  b = config.blocks
  counts = {}
  for name, bq, bk, rng, n in (
      ("forward", b.block_q, b.block_k, kv_block_range, problem.q_len),
      ("dq", b.block_q_dq, b.block_k_dq, kv_block_range, problem.q_len),
      ("dkv", b.block_q_dkv, b.block_k_dkv, q_block_range, problem.kv_len)):
    tile = bq if rng is kv_block_range else bk
    ranges = jax.jit(functools.partial(rng, **config.band_kwargs(bq, bk)))
    lo, hi = ranges(np.arange(pl.cdiv(n, tile)))
    counts[name] = np.asarray(hi - lo)
  return counts

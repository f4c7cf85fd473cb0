"""impl="mosaic": the Mosaic GPU (Hopper, sm90) flash kernels as one op.

The stack points down only:

  mosaic_attention.py   custom VJP, the dispatch entry `attention`, FEATURES
    ├── mosaic_forward.py    the forward kernel (`plgpu.kernel`)
    ├── mosaic_backward.py   the dQ and dK/dV kernels
    └── mosaic_tiles.py      `MosaicBlockSizes`, `MosaicConfig`, TMA pipeline,
                             the tile mask (imported by both kernel files,
                             which never import each other)

Like impl="pallas" every kernel visits only the tiles of the band
(`mask.kv_block_range` / `q_block_range`): work is O(T·W). Without a GPU the
kernels run in Mosaic GPU's interpret mode (jax >= 0.12.1); on a GPU they are
compiled for Hopper (wgmma and TMA need sm90; jax >= 0.11.2).

What it does not do (refused by `features.check_features` or here, never a
fallback): float32 inputs (wgmma takes 16-bit operands here), head dims above
256, GPUs other than Hopper (sm90: wgmma is Hopper's), jax older than 0.11.2
(0.12.1 without a GPU).
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import features
from pallas_kernels.mosaic_backward import backward
from pallas_kernels.mosaic_forward import forward
from pallas_kernels.mosaic_tiles import MosaicConfig
from pallas_kernels.validation import AttentionProblem

# Everything but float32 (see the module docstring).
FEATURES = features.ALL_FEATURES - {features.FLOAT32}


@functools.partial(jax.custom_vjp, nondiff_argnames=("config",))
def _mosaic(q, k, v, segment_ids, sinks, config: MosaicConfig):
  return forward(q, k, v, segment_ids, sinks, config=config)


def _mosaic_fwd(q, k, v, segment_ids, sinks, config: MosaicConfig):
  out, lse = forward(q, k, v, segment_ids, sinks, config=config)
  return (out, lse), (q, k, v, segment_ids, sinks, out, lse)


def _mosaic_bwd(config: MosaicConfig, residuals, cotangents):
  q, k, v, segment_ids, sinks, out, lse = residuals
  d_out, d_lse = cotangents
  dq, dk, dv, d_sinks = backward(q, k, v, segment_ids, sinks, out, lse, d_out,
                                 d_lse, config=config)
  return dq, dk, dv, None, d_sinks


_mosaic.defvjp(_mosaic_fwd, _mosaic_bwd)
# Jitted, config static: an eager call compiles once (as xla_blockwise's op).
_mosaic = jax.jit(_mosaic, static_argnames=("config",))


def check_gpu(device=None) -> None:
  """NotImplementedError unless `device` (default: the first) is a Hopper
  GPU, sm90: the kernels' wgmma exists there only (compiled mode)."""
  device = jax.devices()[0] if device is None else device
  capability = getattr(device, "compute_capability", None)
  if capability is not None and capability.split(".")[0] != "9":
    raise NotImplementedError(
        f"impl='mosaic' needs a Hopper (sm90) GPU, whose wgmma its kernels "
        f"use; this is {device.device_kind} (sm{capability.replace('.', '')})."
        " Use impl='pallas'")


def attention(q, k, v, segment_ids, problem: AttentionProblem, *, sinks=None,
              block_sizes=None, interpret=None):
  """The impl="mosaic" entry: (out [B, T, N, H] q.dtype, lse [B, N, T] fp32).

  q: [B, T, N, H]; k, v: [B, S, K, H] (bf16 or fp16); segment_ids: int32
  [B, T] or None; sinks: [N] or None; `problem` from
  `validation.check_attention_args`. block_sizes: a `MosaicBlockSizes` or
  None for `MosaicBlockSizes.default(problem)`. interpret: None runs the
  kernels in Mosaic GPU interpret mode when the default backend is not a
  GPU; True / False force it; or a `plgpu.InterpretGPUParams` (e.g. with
  `detect_races=True`). Differentiable in q, k, v and sinks.
  """
  config = MosaicConfig.make(problem, block_sizes, interpret)
  if config.interpret is None:
    check_gpu()
  return _mosaic(q, k, v, segment_ids, sinks, config=config)

"""MXFP4 expert weights (gpt-oss's released checkpoints), dequantized as
transformers 5.24 does (`Mxfp4Config(dequantize=True)`).

A float tensor [E, In, Out] (`gate_up_proj` [E, D, 2F], `down_proj`
[E, F, D]) is stored as
  `{name}_blocks` [E, Out, In / 32, 16] uint8: per expert and output row, In
    4-bit codes, two per byte, the low nibble first (element 2j of a block is
    byte j's low nibble, 2j + 1 its high one); a code is an FP4 (e2m1) value,
    `FP4_E2M1[code]` (bit 3 the sign);
  `{name}_scales` [E, Out, In / 32] uint8: each block of 32 values along In is
    multiplied by 2 ** (scale - `SCALE_BIAS`).
The product is taken in fp32 (exact: an FP4 value times a power of two, 0 *
2 ** 128 a NaN as in torch) and then cast to the loading dtype; the blocks
laid out [Out, In] are transposed to [In, Out].
"""

from __future__ import annotations

import numpy as np

from models.hf_config import MXFP4_BLOCK

# 4-bit code -> its FP4 (e2m1) value: sign, 2 exponent bits, 1 mantissa bit.
FP4_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
SCALE_BIAS = 127  # a scale byte s means 2 ** (s - 127), the E8M0 exponent
# Byte -> its two values (the low nibble's first) as one 8-byte word: one
# lookup per byte (4x faster in numpy than two lookups and a stack).
_BYTE_VALUES = np.stack([FP4_E2M1[np.arange(256) & 0x0F],
                         FP4_E2M1[np.arange(256) >> 4]], axis=-1).view(np.uint64)[:, 0]


def stored_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The shapes of the blocks and scales of a float tensor [E, In, Out]."""
  e, n_in, n_out = shape
  return (e, n_out, n_in // MXFP4_BLOCK, MXFP4_BLOCK // 2), (e, n_out, n_in // MXFP4_BLOCK)


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """[..., Out, G, 16] uint8 blocks and [..., Out, G] uint8 scales ->
  [..., G * 32, Out] fp32 (see the module docstring)."""
  values = _BYTE_VALUES[blocks].view(np.float32)  # [..., Out, G, 32]
  with np.errstate(over="ignore", invalid="ignore"):  # inf / NaN: refused later
    powers = np.ldexp(np.float32(1), scales.astype(np.int32) - SCALE_BIAS)
    values *= powers[..., None]
  return np.swapaxes(values.reshape(*scales.shape[:-1], -1), -1, -2)


class Mxfp4Tensor:
  """A float tensor [E, In, Out] stored in MXFP4, sliced as that tensor (what
  `hf_io._read_block` reads).

  blocks, scales: the stored tensors (`stored_shapes`), anything
  numpy-sliceable (safetensors slices). A slice reads the blocks and scales
  of its experts (its first axis) only, one expert at a time, and returns
  them dequantized in `dtype`: beyond the slice, the host holds one expert's
  fp32 values.
  """

  def __init__(self, blocks, scales, shape: tuple[int, ...], dtype):
    self.blocks, self.scales, self.shape, self.dtype = blocks, scales, shape, dtype

  def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
    experts = range(*index[0].indices(self.shape[0]))
    rest = index[1:]
    out = np.empty([len(experts)] + [len(range(*i.indices(n)))
                                     for i, n in zip(rest, self.shape[1:])], self.dtype)
    for row, e in enumerate(experts):
      out[row] = dequantize(np.asarray(self.blocks[e:e + 1]),
                            np.asarray(self.scales[e:e + 1]))[(0, *rest)]
    return out

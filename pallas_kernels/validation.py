"""Input checks shared by every implementation of the op.

Everything here runs on shapes and Python values only, before any tracing
work, and raises `ValueError` / `TypeError` naming the argument and the form
it should take.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import jax
import jax.numpy as jnp

from pallas_kernels.mask import Band

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Largest window (or band side): positions are int32, and position ± window
# must not overflow (window=None is unbounded).
MAX_WINDOW = 2**30


@dataclasses.dataclass(frozen=True)
class AttentionProblem:
  """Validated static description of one call: shapes, band and options."""

  batch: int
  q_len: int
  kv_len: int
  num_q_heads: int
  num_kv_heads: int
  head_dim: int
  dtype: jnp.dtype
  band: Band
  has_segments: bool
  softcap: float | None
  scale: float
  has_sinks: bool = False  # a learned sink logit per query head

  @property
  def group_size(self) -> int:
    """Query heads per KV head (1: MHA, N: MQA)."""
    return self.num_q_heads // self.num_kv_heads


def check_positive_int(name: str, value) -> None:
  """Raises ValueError unless `value` is an int >= 1 (a bool is not)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name}={value!r}: expected an int >= 1")


def check_int_fields(block_sizes) -> None:
  """Raises TypeError naming the first field of the dataclass `block_sizes`
  that is not an int (a bool is not): every block-size object's first check."""
  for field in dataclasses.fields(block_sizes):
    value = getattr(block_sizes, field.name)
    if isinstance(value, bool) or not isinstance(value, int):
      raise TypeError(f"{field.name}={value!r}: expected an int")


def is_power_of_two(value: int) -> bool:
  """True for 1, 2, 4, ...; the tile rule of the Triton kernels."""
  return value > 0 and value & (value - 1) == 0


def _check_window_int(name, value, minimum) -> int:
  """`value` as a Python int: any integer-like (int, np.int64, a concrete
  0-d int array) in [minimum, MAX_WINDOW]; a bool or a traced value is a
  TypeError (the window shapes the computation: it must be static)."""
  expected = (f"expected an int in [{minimum}, {MAX_WINDOW}] (window=None "
              "is unbounded)")
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{name}={value!r}: expected a static Python int, not a traced "
                    "value (mark it static: jax.jit(..., static_argnames=...) or "
                    "functools.partial)")
  if isinstance(value, bool):
    raise TypeError(f"{name}={value!r}: {expected}")
  try:
    as_int = operator.index(value)
  except TypeError:
    raise TypeError(f"{name}={value!r}: {expected}") from None
  if not minimum <= as_int <= MAX_WINDOW:
    raise ValueError(f"{name}={value!r}: {expected}")
  return as_int


def _check_finite(name, value, expected):
  """A real number (not bool) that is finite; returns it as a float."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise TypeError(f"{name}={value!r}: expected {expected}")
  if not math.isfinite(value):
    raise ValueError(f"{name}={value!r}: expected {expected}")
  return float(value)


def check_window(window, causal) -> Band:
  """Validates the (window, causal) pair and returns its `Band`.

  causal=True takes `window=None` (full causal) or an int W >= 1 (W keys,
  itself included). causal=False takes `window=None` (full bidirectional) or
  a tuple `(left, right)` of ints >= 0; ints are at most MAX_WINDOW = 2**30,
  so that no int32 position arithmetic overflows. The other combinations are
  refused rather than guessed: an int window is causal-only, a tuple
  bidirectional-only.
  """
  if not isinstance(causal, bool):
    raise TypeError(f"causal={causal!r}: expected True or False")
  if window is None:
    return Band.from_window(None, causal)
  if causal:
    if isinstance(window, (tuple, list)):
      raise ValueError(
          f"window={window!r} with causal=True: a causal window is one int W "
          "(key j visible to query i iff i - W < j <= i); a (left, right) "
          "tuple needs causal=False")
    window = _check_window_int("window", window, 1)
  else:
    if not isinstance(window, (tuple, list)) or len(window) != 2:
      raise ValueError(
          f"window={window!r} with causal=False: expected a tuple "
          "(left, right) of ints >= 0 (key j visible to query i iff "
          "i - left <= j <= i + right), or None")
    window = (_check_window_int("window[0] (left)", window[0], 0),
              _check_window_int("window[1] (right)", window[1], 0))
  return Band.from_window(window, causal)


def check_sinks(sinks, num_q_heads: int) -> None:
  """Raises unless `sinks` is None or a float array of shape [N] (N q heads).

  Any float dtype is accepted (the impls do the sink's math in fp32).
  """
  if sinks is None:
    return
  if not hasattr(sinks, "shape") or not hasattr(sinks, "dtype"):
    raise TypeError(
        f"sinks: expected a float array [num_q_heads] = [{num_q_heads}] or "
        f"None, got {type(sinks).__name__}")
  if tuple(sinks.shape) != (num_q_heads,):
    raise ValueError(
        f"sinks.shape={tuple(sinks.shape)}: expected [num_q_heads] = "
        f"({num_q_heads},), one sink logit per query head")
  if not jnp.issubdtype(sinks.dtype, jnp.floating):
    raise ValueError(
        f"sinks.dtype={sinks.dtype}: expected a float dtype (the sink is a "
        "logit; its math runs in float32)")


def check_attention_args(q, k, v, *, window, causal, segment_ids, softcap,
                         scale, sinks=None) -> AttentionProblem:
  """Validates the op's arguments; returns the static problem description.

  q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0; same float dtype.
  B may be 0 (every impl then returns empty results); T, S, N, K, H >= 1.
  segment_ids: int32 [B, T] (requires T == S) or None.
  sinks: float [N] or None (`check_sinks`).
  """
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(
          f"{name}.shape={tuple(x.shape)}: expected 4 dims "
          "[batch, seq, heads, head_dim]")
    if not any(x.dtype == d for d in FLOAT_DTYPES):
      raise TypeError(
          f"{name}.dtype={x.dtype}: expected float32, bfloat16 or float16")
  batch, q_len, num_q_heads, head_dim = q.shape
  if k.shape != v.shape:
    raise ValueError(
        f"k.shape={tuple(k.shape)} and v.shape={tuple(v.shape)}: expected "
        "equal shapes [batch, kv_len, num_kv_heads, head_dim]")
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(
        f"q.dtype={q.dtype}, k.dtype={k.dtype}, v.dtype={v.dtype}: expected "
        "one dtype for all three")
  kb, kv_len, num_kv_heads, kh = k.shape
  if kb != batch:
    raise ValueError(f"k.shape[0]={kb}: expected batch {batch} as in q.shape[0]")
  if kh != head_dim:
    raise ValueError(
        f"k.shape[3]={kh}: expected head_dim {head_dim} as in q.shape[3]")
  if min(q_len, kv_len, num_q_heads, num_kv_heads, head_dim) < 1:
    raise ValueError(
        f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}: expected "
        "non-empty seq, heads and head_dim")
  if num_q_heads % num_kv_heads:
    raise ValueError(
        f"num_q_heads={num_q_heads}, num_kv_heads={num_kv_heads}: expected "
        "num_q_heads to be a multiple of num_kv_heads (GQA/MQA)")
  band = check_window(window, causal)
  if segment_ids is not None:
    if not hasattr(segment_ids, "shape"):
      raise TypeError(
          f"segment_ids: expected an int32 array [batch, seq], got "
          f"{type(segment_ids).__name__}")
    if tuple(segment_ids.shape) != (batch, q_len):
      raise ValueError(
          f"segment_ids.shape={tuple(segment_ids.shape)}: expected "
          f"[batch, seq] = {(batch, q_len)}")
    if q_len != kv_len:
      raise ValueError(
          f"segment_ids with q_len={q_len} != kv_len={kv_len}: segment ids "
          "are for packed sequences where queries and keys are the same rows")
    if segment_ids.dtype != jnp.int32:
      raise TypeError(
          f"segment_ids.dtype={segment_ids.dtype}: expected int32")
  if softcap is not None:
    expected = "a finite float > 0 or None"
    if not _check_finite("softcap", softcap, expected) > 0:
      raise ValueError(f"softcap={softcap!r}: expected {expected}")
    softcap = float(softcap)
  if scale is None:
    scale = head_dim ** -0.5
  else:
    scale = _check_finite("scale", scale, "a finite float or None")
  check_sinks(sinks, num_q_heads)
  return AttentionProblem(
      batch=batch, q_len=q_len, kv_len=kv_len, num_q_heads=num_q_heads,
      num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=jnp.dtype(q.dtype),
      band=band, has_segments=segment_ids is not None, softcap=softcap,
      scale=float(scale), has_sinks=sinks is not None)

"""`sliding_window_attention`: validation, the table of implementations, `impl=`
dispatch, and the two pictures of what it computes: `window_mask` (pairs),
`visited_blocks` (tiles). The top of the package: it imports every impl."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from pallas_kernels import (cudnn, flash_attention, mosaic_attention, reference,
                            splash, xla_blockwise)
from pallas_kernels.features import (ALL_FEATURES, check_features,
                                     resolve_impl)
from pallas_kernels.mask import cdiv, dense_mask, kv_block_range
from pallas_kernels.validation import (check_attention_args,
                                       check_positive_int, check_window)


class Impl(NamedTuple):
  """One implementation of the op: its entry function and what it supports.

  attention(q, k, v, segment_ids, problem, *, sinks, block_sizes[,
  interpret]) -> (out [B, T, N, H], lse [B, N, T] or None); sinks: [N] or
  None; features: the `features` names it computes exactly.
  """

  attention: Callable
  features: frozenset


# The one table of who does what; docs/backends.md shows it, tests enforce it.
IMPLS = {
    "reference": Impl(reference.attention, ALL_FEATURES),
    "xla": Impl(xla_blockwise.attention, ALL_FEATURES),
    "pallas": Impl(flash_attention.attention, ALL_FEATURES),
    # Hopper kernels on Mosaic GPU: 16-bit inputs; see mosaic_attention.py.
    "mosaic": Impl(mosaic_attention.attention, mosaic_attention.FEATURES),
    # cuDNN also runs unmasked (full bidirectional); see pallas_kernels/cudnn.py.
    "cudnn": Impl(cudnn.attention, cudnn.FEATURES),
    # JAX's TPU splash attention kernel; see pallas_kernels/splash.py.
    "splash": Impl(splash.attention, ALL_FEATURES),
}
# The impls that take `interpret=`: their Pallas kernels run in an interpret
# mode off their own backend (GPU for pallas and mosaic, TPU for splash).
INTERPRETED = ("pallas", "mosaic", "splash")


def sliding_window_attention(q, k, v, *, window=None, causal=True,
                             segment_ids=None, softcap=None, scale=None,
                             impl="auto", block_sizes=None, return_lse=False,
                             interpret=None, sinks=None):
  """Sliding-window (local) attention, exact: the window is never dropped.

  Shapes (B batch, T query length, S key length, N query heads, K kv heads,
  H head dim):
    q: [B, T, N, H]; k, v: [B, S, K, H], N % K == 0 (GQA/MQA without
    repeating K/V). One dtype for all three: float32, bfloat16 or float16.
    Returns out [B, T, N, H] in q.dtype, and with `return_lse=True` also
    lse [B, N, T] float32, the natural-log logsumexp of each row's scores.

  Positions are bottom-right aligned: query t sits at position t + S - T, key
  s at position s (with T == S both start at 0).

  Window. With causal=True (default):
    window=None: full causal, key j visible to query i iff j <= i.
    window=W (int >= 1): key j visible iff i - W < j <= i, i.e. W keys
      including itself. Hugging Face `sliding_window=W`; FlashAttention
      `window_size=(W - 1, 0)`.
  With causal=False:
    window=None: every key is visible.
    window=(left, right) (ints >= 0): visible iff i - left <= j <= i + right.
  An int window with causal=False, or a tuple with causal=True, is an error,
  and so is a window (or side) above 2**30: positions are int32.

  Example, T = S = 6, causal=True, window=3 (row i = query, column j = key):

      1 0 0 0 0 0
      1 1 0 0 0 0
      1 1 1 0 0 0
      0 1 1 1 0 0
      0 0 1 1 1 0
      0 0 0 1 1 1

  segment_ids: int32 [B, T] (requires T == S): a query sees only keys with
    its own id, on top of the window (packed sequences).
  softcap: finite c > 0 replaces each scaled score s by c * tanh(s / c).
  scale: finite, multiplies q·k before the softcap; default 1 / sqrt(H).

  sinks: float [N] (any float dtype; the math runs in fp32) or None: a
    learned sink logit per query head (gpt-oss) that takes part in the
    softmax but adds nothing to the output. For row i of head n with visible
    keys J(i): p_ij = exp(s_ij) / (exp(sinks[n]) + sum_{k in J(i)} exp(s_ik)),
    out_i = sum_j p_ij v_j, and lse is the log of that whole denominator.
    Differentiable: the gradient w.r.t. sinks comes back in sinks.dtype.

  A batch of 0 rows (B = 0) returns empty out [0, T, N, H] and lse [0, N, T]
  from every impl. The window (each side) is a static integer: an int or any
  integer-like (np.int64, a concrete 0-d int array); a traced window is a
  TypeError.

  A query row that sees no key (e.g. with T > S the first T - S queries sit
  before every key) returns out = 0, lse = -inf and zero gradients, never NaN;
  with sinks, out = 0 and lse = sinks[n].

  impl: "auto" (pallas on GPU, splash on TPU, xla elsewhere), "pallas"
    (Triton kernels), "mosaic" (Hopper kernels on Mosaic GPU: bf16/fp16,
    head dims <= 256, jax >= 0.11.2), "splash" (JAX's TPU splash attention
    kernel), "xla", "reference" (dense masked, O(T·S)), or "cudnn" (GPU only;
    causal windows, no segments/softcap/lse/sinks). A feature an impl lacks
    raises NotImplementedError.
  block_sizes: the impl's own block-size dataclass (`FlashBlockSizes` for
    "pallas", `MosaicBlockSizes` for "mosaic", `SplashBlockSizes` for
    "splash", `XlaBlockSizes` for "xla"), or None for its default.
  interpret: pallas, mosaic and splash only; None runs the kernels in
    interpret mode when their backend (GPU, resp. TPU) is not present.
  """
  problem = check_attention_args(
      q, k, v, window=window, causal=causal, segment_ids=segment_ids,
      softcap=softcap, scale=scale, sinks=sinks)
  impl = resolve_impl(impl, sorted(IMPLS))
  check_features(impl, IMPLS[impl].features, problem, return_lse)
  if interpret is not None and impl not in INTERPRETED:
    raise ValueError(f"interpret={interpret!r}: only impl='pallas', "
                     "'mosaic' and 'splash' take it")
  kwargs = {} if interpret is None else {"interpret": interpret}
  if problem.batch == 0:  # every impl: the empty result (no kernel has work)
    out = jnp.zeros(q.shape, q.dtype)
    lse = jnp.zeros((0, problem.num_q_heads, problem.q_len), jnp.float32)
    return (out, lse) if return_lse else out
  out, lse = IMPLS[impl].attention(q, k, v, segment_ids, problem, sinks=sinks,
                                   block_sizes=block_sizes, **kwargs)
  return (out, lse) if return_lse else out


def window_mask(q_len, kv_len=None, *, window=None, causal=True,
                segment_ids=None):
  """The boolean mask the op applies: [T, S], or [B, T, S] with segment_ids.

  Entry [t, s] is True iff query t sees key s (same arguments and semantics as
  `sliding_window_attention`). Dense O(T·S): for inspection and pictures.
  """
  kv_len = q_len if kv_len is None else kv_len
  check_positive_int("q_len", q_len)
  check_positive_int("kv_len", kv_len)
  band = check_window(window, causal)
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.ndim != 2 or segment_ids.shape[1] != q_len or q_len != kv_len:
      raise ValueError(
          f"segment_ids.shape={tuple(segment_ids.shape)}: expected "
          f"[batch, {q_len}] with q_len == kv_len")
  return dense_mask(q_len, kv_len, band, segment_ids)


def visited_blocks(q_len, kv_len=None, *, window=None, causal=True, block_q,
                   block_k) -> np.ndarray:
  """Which key blocks each query block visits: bool [cdiv(T, block_q), cdiv(S, block_k)].

  Entry [i, j] is True iff key block j (keys j·block_k ... j·block_k + block_k - 1)
  holds a key that some query of query block i sees, under the same arguments
  and semantics as `sliding_window_attention` (segments aside: they only mask
  inside the visited blocks). The blockwise paths (`"xla"`, `"pallas"`) visit
  exactly these tiles and skip the rest; with a window each row has at most
  cdiv(W - 1 + block_q, block_k) + 1 True entries, whatever the length. E.g.
  T = S = 8, window=3, block_q = block_k = 2:

      [[1, 0, 0, 0],
       [1, 1, 0, 0],
       [0, 1, 1, 0],
       [0, 0, 1, 1]]
  """
  kv_len = q_len if kv_len is None else kv_len
  for name, value in (("q_len", q_len), ("kv_len", kv_len),
                      ("block_q", block_q), ("block_k", block_k)):
    check_positive_int(name, value)
  band = check_window(window, causal)
  q_blocks = np.arange(cdiv(q_len, block_q))
  lo, hi = kv_block_range(q_blocks, block_q=block_q, block_k=block_k,
                          q_len=q_len, kv_len=kv_len, band=band)
  # An unbounded side gives a Python int for every query block: broadcast it.
  lo, hi = (np.broadcast_to(np.asarray(x), q_blocks.shape)[:, None]
            for x in (lo, hi))
  kv_blocks = np.arange(cdiv(kv_len, block_k))[None, :]
  return (kv_blocks >= lo) & (kv_blocks < hi)


def reference_attention(q, k, v, *, window=None, causal=True, segment_ids=None,
                        softcap=None, scale=None, impl="reference",
                        block_sizes=None, return_lse=False, sinks=None):
  """The dense masked oracle: `sliding_window_attention(..., impl="reference")`.

  Same arguments and results; fp32 math at HIGHEST precision, O(T·S) memory.
  """
  if impl != "reference":
    raise ValueError(f"impl={impl!r}: reference_attention is impl='reference'")
  return sliding_window_attention(
      q, k, v, window=window, causal=causal, segment_ids=segment_ids,
      softcap=softcap, scale=scale, impl="reference", block_sizes=block_sizes,
      return_lse=return_lse, sinks=sinks)

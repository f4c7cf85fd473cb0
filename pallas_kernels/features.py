"""What a call needs, and choosing an impl that has it.

Below every implementation (it imports only `validation`): `api` builds its
table of implementations from these names, and an implementation that lacks
features (`cudnn`) checks a call against its own row here too.
"""

from __future__ import annotations

import jax

from pallas_kernels.validation import AttentionProblem

# Features a call may need. `required_features` derives them from the problem;
# an impl that lacks one raises NotImplementedError: it never falls back to a
# path that would ignore the window, the segments or the softcap.
CAUSAL = "causal"                      # causal=True, window=None
CAUSAL_WINDOW = "causal_window"        # causal=True, window=W
BIDIRECTIONAL = "bidirectional"        # causal=False, window=None
LOCAL_WINDOW = "local_window"          # causal=False, window=(left, right)
SEGMENT_IDS = "segment_ids"
SOFTCAP = "softcap"
GQA = "gqa"                            # num_q_heads > num_kv_heads
UNEQUAL_LENGTHS = "q_len != kv_len"    # bottom-right aligned
RETURN_LSE = "return_lse"
SINKS = "sinks"                        # a learned sink logit per query head
FLOAT32 = "float32"
BFLOAT16 = "bfloat16"
FLOAT16 = "float16"

ALL_FEATURES = frozenset({
    CAUSAL, CAUSAL_WINDOW, BIDIRECTIONAL, LOCAL_WINDOW, SEGMENT_IDS, SOFTCAP,
    GQA, UNEQUAL_LENGTHS, RETURN_LSE, SINKS, FLOAT32, BFLOAT16, FLOAT16})


def required_features(problem: AttentionProblem, return_lse: bool) -> frozenset:
  """The features of `ALL_FEATURES` that this call needs.

  Classified by the band, not by the `causal` flag: `causal=False,
  window=(W - 1, 0)` is the same mask as `causal=True, window=W`.
  """
  band = problem.band
  if band.right == 0:
    need = {CAUSAL if band.left is None else CAUSAL_WINDOW}
  else:
    need = {BIDIRECTIONAL if band.left is None else LOCAL_WINDOW}
  if problem.has_segments:
    need.add(SEGMENT_IDS)
  if problem.softcap is not None:
    need.add(SOFTCAP)
  if problem.group_size > 1:
    need.add(GQA)
  if problem.q_len != problem.kv_len:
    need.add(UNEQUAL_LENGTHS)
  if return_lse:
    need.add(RETURN_LSE)
  if problem.has_sinks:
    need.add(SINKS)
  need.add(problem.dtype.name)
  return frozenset(need)


def default_impl() -> str:
  """`impl="auto"`: the Pallas (Triton) kernels on GPU, JAX's splash
  attention kernel on TPU, the XLA path elsewhere (CPU)."""
  return {"gpu": "pallas", "tpu": "splash"}.get(jax.default_backend(), "xla")


def default_decode_impl() -> str:
  """The decode op's `impl="auto"`: its Pallas kernel on GPU, its XLA path
  elsewhere, TPU included (splash has no decode kernel: a few query rows
  against a cache of slots whose positions mask them)."""
  return "pallas" if jax.default_backend() == "gpu" else "xla"


def resolve_impl(impl: str, names, auto=default_impl) -> str:
  """`impl` with "auto" resolved by `auto()`; a ValueError unless it is one
  of `names`.

  `names`: the implementations of the op, in the order the error lists them.
  """
  if impl == "auto":
    impl = auto()
  if impl not in names:
    raise ValueError(f"impl={impl!r}: expected one of {['auto', *names]}")
  return impl


def check_features(impl: str, supported: frozenset, problem: AttentionProblem,
                   return_lse: bool) -> None:
  """Raises NotImplementedError naming what the call needs beyond `supported`."""
  missing = required_features(problem, return_lse) - supported
  if missing:
    raise NotImplementedError(
        f"impl={impl!r} does not support {', '.join(sorted(missing))}; "
        "use impl='pallas', 'xla' or 'reference', which support every "
        "feature (see the feature table in docs/backends.md)")

"""swajax: exact sliding-window attention for JAX, and the models built on it.

Users import from here; `pallas_kernels` (the op) and `models` (Flax NNX
modules) sit below and never import this package.
"""

from pallas_kernels import reference_attention, sliding_window_attention

__all__ = [
    "reference_attention",
    "sliding_window_attention",
]

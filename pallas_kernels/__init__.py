"""The sliding-window attention op: kernels, reference, XLA path and dispatch.

Depends on jax only. `sliding_window_attention` is the op; `reference_attention`
its dense oracle; `mask.visible` the one window predicate they all share.
"""

from pallas_kernels.api import (IMPLS, reference_attention,
                                sliding_window_attention, visited_blocks,
                                window_mask)
from pallas_kernels.decode_attention import DecodeBlockSizes, decode_attention
from pallas_kernels.mask import Band, kv_block_range, q_block_range, visible

__all__ = [
    "Band",
    "DecodeBlockSizes",
    "IMPLS",
    "decode_attention",
    "kv_block_range",
    "q_block_range",
    "reference_attention",
    "sliding_window_attention",
    "visible",
    "visited_blocks",
    "window_mask",
]

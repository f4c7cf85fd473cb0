"""The sliding-window attention op: kernels, reference, XLA path and dispatch.

Depends on jax only. `sliding_window_attention` is the op; `reference_attention`
its dense oracle; `mask.visible` the one window predicate they all share.
`IMPLS` / `DECODE_IMPLS` are the tables of implementations, and each impl's
block sizes are a dataclass exported here.
"""

from pallas_kernels.api import (IMPLS, reference_attention,
                                sliding_window_attention, visited_blocks,
                                window_mask)
from pallas_kernels.context_parallel import context_parallel_attention
from pallas_kernels.decode import DECODE_IMPLS, DecodeBlockSizes, decode_attention
from pallas_kernels.flash_tiles import FlashBlockSizes
from pallas_kernels.mosaic_tiles import MosaicBlockSizes
from pallas_kernels.mask import Band, kv_block_range, q_block_range, visible
from pallas_kernels.splash import SplashBlockSizes
from pallas_kernels.xla_blockwise import XlaBlockSizes

__all__ = [
    "Band",
    "DECODE_IMPLS",
    "DecodeBlockSizes",
    "FlashBlockSizes",
    "IMPLS",
    "MosaicBlockSizes",
    "SplashBlockSizes",
    "XlaBlockSizes",
    "context_parallel_attention",
    "decode_attention",
    "kv_block_range",
    "q_block_range",
    "reference_attention",
    "sliding_window_attention",
    "visible",
    "visited_blocks",
    "window_mask",
]

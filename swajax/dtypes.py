"""The one table of dtype names swajax accepts (flags, configs, benchmarks).

`pallas_kernels` never imports swajax, so it keeps its own tuple of float
dtypes (`pallas_kernels.validation.FLOAT_DTYPES`); this is swajax's.
"""

from __future__ import annotations

import jax.numpy as jnp

# name -> jnp dtype, as flags and config files spell them.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

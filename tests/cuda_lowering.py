"""Lower a function for CUDA on any machine, GPU or not: the StableHLO text.

The Pallas kernels' lowering tests build the Triton kernels for CUDA on the
CPU-only CI machine (interpret=False), so a kernel the Triton backend cannot
lower fails there, not first on a GPU. The Triton lowering needs a target GPU:
without one, jax 0.10 falls back to compute capability 9.0, while jax 0.11 and
0.12 raise "No supported GPU devices found" unless an abstract GPU device is
set. `TARGET` is that device on every version (0.10 ignores it; on a real GPU
of the same kind, jax 0.11+ uses the real one).
"""

import jax

# Compute capability 9.0 (Hopper): the GPU machine's kind, and the
# capability jax 0.10 assumes without a GPU.
TARGET = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H200", num_cores=None, platform="gpu")


def lowered_cuda_text(fn, *args, **kwargs):
  """`jax.jit(fn)` traced on `args`/`kwargs`, lowered for CUDA: its text.

  Arrays or `jax.ShapeDtypeStruct`s are both fine as arguments; nothing runs.
  """
  with jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((), (), abstract_device=TARGET)):
    traced = jax.jit(fn).trace(*args, **kwargs)
    return traced.lower(lowering_platforms=("cuda",)).as_text()

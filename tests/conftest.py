"""Shared pytest setup: CPU compile flags, hypothesis profile, GPU marker,
the order files run in."""

import gc
import importlib.metadata
import importlib.util
import os

# On CPU, compile time (not run time) dominates this suite: interpret-mode
# Pallas kernels and tiny models are compiled hundreds of times. The flags
# below change no HLO semantics and no float arithmetic (XLA CPU uses no
# fast-math either way), only how much work the compiler does:
# - LLVM -O0 compiles ~3x faster;
# - on jaxlib 0.10, XLA's older (non-MLIR) fusion emitters and one codegen
#   unit per program halve the remaining compile time (measured: 29.6 s of
#   compiling -> 12.9 s over 35 tests). jaxlib 0.12 has neither flag (XLA
#   aborts on a flag it does not know), so newer versions get -O0 only.
# Left alone where a CUDA plugin is installed, so GPU runs test the
# optimised kernels.
CPU_COMPILE_FLAGS = ["--xla_backend_optimization_level=0"]
if importlib.metadata.version("jaxlib").startswith("0.10."):
  CPU_COMPILE_FLAGS += ["--xla_cpu_use_fusion_emitters=false",
                        "--xla_cpu_parallel_codegen_split_count=1"]
if not any(importlib.util.find_spec(name) for name in
           ("jax_cuda12_plugin", "jax_cuda13_plugin")):
  os.environ["XLA_FLAGS"] = " ".join(
      filter(None, [os.environ.get("XLA_FLAGS"), *CPU_COMPILE_FLAGS]))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest
from hypothesis import HealthCheck, settings

# Interpret-mode kernels are slow per example: few examples, no deadline.
settings.register_profile(
    "swajax", max_examples=8, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("swajax")

HAS_GPU = jax.default_backend() == "gpu"


# The files that take minutes on CI's 2 cores, longest first. `make test`
# hands whole files to its 2 workers (`--dist loadfile`: a module's fixtures
# are built once) in collection order (`--no-loadscope-reorder`), so these
# start first and neither worker is left ending on one.
LONG_FILES = ("test_real_gguf.py", "test_attention_grid.py", "test_families.py",
              "test_context_parallel.py", "test_docs_commands.py", "test_sharding.py",
              "test_mosaic_kernels.py", "test_notebooks.py", "test_faults.py")


def pytest_collection_modifyitems(config, items):
  skip = pytest.mark.skip(reason="needs an NVIDIA GPU (jax.default_backend() != 'gpu')")
  for item in items:
    if "gpu" in item.keywords and not HAS_GPU:
      item.add_marker(skip)
  # A stable sort: each file's tests keep their order and stay together.
  items.sort(key=lambda item: LONG_FILES.index(item.path.name)
             if item.path.name in LONG_FILES else len(LONG_FILES))


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """Each module's compiled programs, traces and dropped arrays freed after
  it: an xdist worker runs hundreds of modules, and without this its
  memory only grows (workers reached 13-15 GB and were OOM-killed on the
  24 GB CI machine)."""
  yield
  jax.clear_caches()
  gc.collect()

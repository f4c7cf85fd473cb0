"""Shared pytest setup: hypothesis profile and the GPU marker's skip."""

import jax
import pytest
from hypothesis import HealthCheck, settings

# Interpret-mode kernels are slow per example: few examples, no deadline.
settings.register_profile(
    "swajax", max_examples=8, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("swajax")

HAS_GPU = jax.default_backend() == "gpu"


def pytest_collection_modifyitems(config, items):
  skip = pytest.mark.skip(reason="needs an NVIDIA GPU (jax.default_backend() != 'gpu')")
  for item in items:
    if "gpu" in item.keywords and not HAS_GPU:
      item.add_marker(skip)

"""The one-way layering: swajax -> models -> pallas_kernels -> jax."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "pallas_kernels": {"models", "swajax", "flax", "optax"},
    "models": {"swajax"},
}


def imported_packages(path):
  tree = ast.parse(path.read_text(), filename=str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      yield node.module.split(".")[0]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
  files = sorted((ROOT / package).rglob("*.py"))
  assert files, f"no sources found under {package}/"
  for path in files:
    bad = set(imported_packages(path)) & FORBIDDEN[package]
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"

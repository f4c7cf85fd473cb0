"""The one-way layering: swajax -> models -> pallas_kernels -> jax; no import cycles."""

import ast
import collections
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "pallas_kernels": {"models", "swajax", "flax", "optax"},
    "models": {"swajax"},
}
PACKAGES = ["pallas_kernels", "models", "swajax"]


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


# The import graph: no cycles, function-local imports included.


def module_name(path, root):
  """`root/pkg/sub/mod.py` -> "pkg.sub.mod"; a package's `__init__.py` -> "pkg.sub"."""
  parts = path.relative_to(root).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root, packages):
  """Module name -> the project modules it imports, from every file's AST.

  Every import statement counts, also one inside a function. `import a.b`
  and `from a import b` point at module `a.b` when it exists in the project
  (`from a import b` at `a` when `b` is a name defined in `a`); relative
  imports resolve against the importing file's package. Imports of modules
  outside `packages` are left out.
  """
  paths = {module_name(p, root): p for package in packages
           for p in sorted((root / package).rglob("*.py"))}

  def in_project(name):
    """The longest prefix of dotted `name` that is a project module, or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
      if ".".join(parts[:end]) in paths:
        return ".".join(parts[:end])
    return None

  graph = {}
  for module, path in paths.items():
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      if isinstance(node, ast.Import):
        targets.update(in_project(alias.name) for alias in node.names)
      elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: level 1 is this file's package
          parts = package.split(".")
          anchor = ".".join(parts[:len(parts) + 1 - node.level])
          base = f"{anchor}.{node.module}" if node.module else anchor
        else:
          base = node.module
        targets.update(in_project(f"{base}.{alias.name}")
                       for alias in node.names)
    graph[module] = targets - {None}
  return graph


def strongly_connected(graph):
  """Tarjan's algorithm: the strongly connected components of `graph`, as sets."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for succ in sorted(graph.get(node, ())):
      if succ not in index:
        visit(succ)
        low[node] = min(low[node], low[succ])
      elif succ in on_stack:
        low[node] = min(low[node], index[succ])
    if low[node] == index[node]:
      component = set()
      while node not in component:
        component.add(stack.pop())
      on_stack.difference_update(component)
      components.append(component)

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return components


def shortest_cycle(graph, start, within):
  """The shortest path `[start, ..., start]` through nodes of `within`, or None."""
  parent = {start: None}
  queue = collections.deque([start])
  while queue:
    node = queue.popleft()
    for succ in sorted(graph.get(node, ())):
      if succ == start:
        path = [node]
        while parent[path[-1]] is not None:
          path.append(parent[path[-1]])
        return path[::-1] + [start]
      if succ in within and succ not in parent:
        parent[succ] = node
        queue.append(succ)
  return None


def cycles(graph):
  """Per strongly connected component, its shortest cycle through its smallest node."""
  found = (shortest_cycle(graph, min(c), c) for c in strongly_connected(graph))
  return sorted(cycle for cycle in found if cycle)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"a"}}, [["a", "a"]]),
    ({"a": {"b"}, "b": {"a"}}, [["a", "b", "a"]]),
    # Two components; the shorter of a's two cycles; d hangs off one.
    ({"a": {"b", "x"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "x": {"a"},
      "e": {"f"}, "f": {"e"}}, [["a", "x", "a"], ["e", "f", "e"]]),
])
def test_cycles_finds_one_per_component(graph, expected):
  assert cycles(graph) == expected


def test_import_graph_follows_every_kind_of_import(tmp_path):
  sources = {
      "pkg/__init__.py": "from pkg.a import f\nimport json\n",
      "pkg/a.py": "def f():\n  from pkg import b  # a submodule, in a function\n",
      "pkg/b.py": "from . import a\nfrom .sub.c import g\n",
      "pkg/sub/__init__.py": "",
      "pkg/sub/c.py": "from .. import VERSION\nimport pkg.sub\ng = 1\n",
  }
  for name, text in sources.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  assert import_graph(tmp_path, ["pkg"]) == {
      "pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a", "pkg.sub.c"},
      "pkg.sub": set(), "pkg.sub.c": {"pkg", "pkg.sub"}}
  assert cycles(import_graph(tmp_path, ["pkg"])) == [
      ["pkg", "pkg.a", "pkg.b", "pkg.sub.c", "pkg"]]


def test_no_import_cycles():
  graph = import_graph(ROOT, PACKAGES)
  assert len(graph) > len(PACKAGES), sorted(graph)
  found = cycles(graph)
  assert not found, "import cycles:\n" + "\n".join(
      " -> ".join(cycle) for cycle in found)


# The wings of `swajax`, lowest first: a module imports only modules of its own
# wing or of a wing below it. The base holds the modules every wing shares.
WINGS = ("base", "io", "infer", "training", "cli")
BASE_MODULES = {"swajax.dtypes", "swajax.sharding", "swajax.text"}


def wing_of(module):
  """The wing of a `swajax` module ("base" for the shared modules), or None for
  the package root `swajax` (the facade: it imports every wing, none imports
  it) and `swajax.__main__` (`python -m swajax`, the command line's entry)."""
  parts = module.split(".")
  if parts[0] != "swajax" or len(parts) == 1 or parts[1] == "__main__":
    return None
  if ".".join(parts[:2]) in BASE_MODULES:
    return "base"
  assert parts[1] in WINGS, f"{module}: not in a wing {WINGS[1:]} nor the base {BASE_MODULES}"
  return parts[1]


def upward_imports(graph):
  """(importer, imported) pairs where a swajax module imports a wing above its
  own, or anything imports the facade `swajax`."""
  bad = []
  for module, targets in sorted(graph.items()):
    for target in sorted(targets):
      if target == "swajax" and module != "swajax":
        bad.append((module, target))
      low, high = wing_of(module), wing_of(target)
      if low is not None and high is not None and WINGS.index(high) > WINGS.index(low):
        bad.append((module, target))
  return bad


def test_wings_import_only_wings_below():
  graph = import_graph(ROOT, ["swajax"])
  assert {wing_of(m) for m in graph} >= set(WINGS), sorted(graph)
  bad = upward_imports(graph)
  assert not bad, "imports that point up a wing:\n" + "\n".join(
      f"{a} -> {b}" for a, b in bad)


@pytest.mark.parametrize("graph, expected", [
    ({"swajax.io.hf": {"swajax.dtypes", "swajax.text.chat"},
      "swajax.cli.train": {"swajax.training.loop", "swajax.io.hf"}}, []),
    ({"swajax.io.hf": {"swajax.training.config"}},
     [("swajax.io.hf", "swajax.training.config")]),
    ({"swajax.infer.generation": {"swajax.cli.entry"}},
     [("swajax.infer.generation", "swajax.cli.entry")]),
    ({"swajax.training.loop": {"swajax.cli.train"}},
     [("swajax.training.loop", "swajax.cli.train")]),
    ({"swajax.text.chat": {"swajax.io.hf"}}, [("swajax.text.chat", "swajax.io.hf")]),
    ({"swajax.io.hf": {"swajax"}}, [("swajax.io.hf", "swajax")]),
])
def test_upward_imports_are_found(graph, expected):
  assert upward_imports(graph) == expected


# Packages a job of swajax needs only when it runs (a GGUF file, the server,
# a tracker), absent from the GPU image the kernels and benchmarks run on
# (the device tool's KINDS.md): `import swajax` and the command's help must
# not need them.
JOB_ONLY_PACKAGES = ("gguf", "fastapi", "starlette", "uvicorn", "tensorboardX", "wandb")
_WITHOUT = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in {blocked!r}:
      raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Absent())
"""


def _run_without(packages, code):
  return subprocess.run([sys.executable, "-c", _WITHOUT.format(blocked=set(packages)) + code],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_import_and_help_need_no_job_only_package():
  result = _run_without(JOB_ONLY_PACKAGES, (
      "import swajax, swajax.cli.bench\n"
      "from swajax.cli import entry\n"
      "sys.exit(entry.main(['--help']))\n"))
  assert result.returncode == 0, result.stderr
  assert "serve" in result.stdout
  # Reading a GGUF file is what needs gguf: said by name.
  result = _run_without(["gguf"], (
      "from swajax.io import gguf\n"
      "gguf.gguf_package()\n"))
  assert result.returncode == 1 and "needs ggml's gguf package" in result.stderr, result.stderr

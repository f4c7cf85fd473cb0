"""Device mesh, parameter and batch shardings, and multi-process start-up.

The mesh has two axes: "data" (batch only) and "fsdp" (batch, and the
parameters' "fsdp"-annotated dimension: the models mark every weight with
`nnx.with_partitioning`). Parameters and optimizer state are sharded over
"fsdp", replicated over "data"; a batch is split over both. With context
parallelism a third axis, "context", splits the sequence (the dimension after
the batch of every token array); parameters are replicated over it, and the
models' attention runs `context_parallel_attention` over it.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from pallas_kernels.context_parallel import CONTEXT_AXIS

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both


def make_mesh(fsdp: int = 1, devices=None, *, context: int = 1) -> jax.sharding.Mesh:
  """A ("data", "fsdp") mesh over all (or the given) devices: data = n / fsdp;
  with `context` > 1 a ("data", "fsdp", "context") mesh, data = n / (fsdp·context).

  Axis types are Auto: shardings propagate through jit (the models are
  written without explicit-sharding annotations on their activations). The
  same arguments give the same Mesh object (it is a static jit argument).
  """
  return _mesh(fsdp, context, tuple(jax.devices() if devices is None else devices))


@functools.lru_cache(maxsize=None)
def _mesh(fsdp, context, devices: tuple) -> jax.sharding.Mesh:
  n = len(devices)
  if not isinstance(fsdp, int) or fsdp < 1 or n % fsdp:
    raise ValueError(f"fsdp={fsdp!r}: expected a divisor of the device count {n}")
  if not isinstance(context, int) or context < 1 or n % (fsdp * context):
    raise ValueError(f"context={context!r}: expected an int >= 1 with fsdp·context "
                     f"= {fsdp}·{context} dividing the device count {n}")
  axes = MESH_AXES + ((CONTEXT_AXIS,) if context > 1 else ())
  shape = (n // (fsdp * context), fsdp) + ((context,) if context > 1 else ())
  grid = np.asarray(devices, dtype=object).reshape(shape)
  return jax.sharding.Mesh(grid, axes, axis_types=(AxisType.Auto,) * len(axes))


def context_size(mesh) -> int:
  """Devices on the mesh's "context" axis (1 without one)."""
  return dict(mesh.shape).get(CONTEXT_AXIS, 1)


def check_mesh(mesh) -> jax.sharding.Mesh:
  """`mesh` if it is a jax Mesh with the axes `make_mesh` builds, else raises."""
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
  missing = [a for a in MESH_AXES if a not in mesh.axis_names]
  if missing:
    raise ValueError(
        f"mesh.axis_names={mesh.axis_names!r}: expected the axes {MESH_AXES!r} "
        f"(missing {missing!r}; see swajax.sharding.make_mesh)")
  return mesh


def fit_spec(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
  """`spec` with each mesh axis dropped where it does not divide its dimension.

  E.g. a 259-row embedding cannot be split 4 ways: that dimension stays
  replicated, which is a layout choice, not a change of the math.
  """
  dims = []
  for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    dims.append(axes if size % ways == 0 else None)
  return P(*dims)


def state_shardings(state, mesh: jax.sharding.Mesh):
  """NamedShardings for an nnx.State from its partitioning annotations.

  Leaves without annotations are replicated. The result has the structure of
  `state` (nnx.Variable nodes with NamedSharding values).
  """
  specs = nnx.get_partition_spec(state)
  return jax.tree.map(
      lambda x, spec: NamedSharding(mesh, fit_spec(spec or P(), x.shape, mesh)),
      state, specs)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, batch_dim: int = 0, *,
                   sequence: bool = True) -> NamedSharding:
  """Splits dimension `batch_dim` of an ndim-array over ("data", "fsdp"), and
  the next one (the sequence; not with sequence=False: per-row values such
  as a pair's reference log-probabilities) over "context" when the mesh has
  that axis."""
  dims = [None] * ndim
  dims[batch_dim] = BATCH_AXES
  if sequence and CONTEXT_AXIS in mesh.axis_names:
    dims[batch_dim + 1] = CONTEXT_AXIS
  return NamedSharding(mesh, P(*dims))


def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global jax.Array from a host array that every process holds in full.

  Each process fills only its own devices' shards (works with one process
  or many joined by jax.distributed).
  """
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None,
                                 *, timeout_s: int = 300) -> bool:
  """Joins a multi-process JAX job when asked to; returns whether it did.

  Arguments default to the environment: JAX_COORDINATOR_ADDRESS
  ("host:port"), JAX_NUM_PROCESSES, JAX_PROCESS_ID. With no coordinator (or
  one process) nothing happens: single-process training. Must run before
  any other JAX call touches the devices. CPU processes exchange collectives
  through gloo (`jax_cpu_collectives_implementation`).
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes or _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if coordinator_address is None or (num_processes or 1) == 1:
    return False
  if num_processes is None or process_id is None:
    raise ValueError(
        f"coordinator_address={coordinator_address!r}: also needs num_processes "
        f"and process_id (got {num_processes!r}, {process_id!r})")
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=timeout_s)
  return True


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r}: expected an integer") from None

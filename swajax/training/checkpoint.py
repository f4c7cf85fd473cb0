"""Resumable training checkpoints (orbax).

A checkpoint holds the whole train state pytree (parameters, optimizer state,
step) as one flat {path: array} dict, plus JSON metadata: the data stream
position and seed (which fix the data order, the only randomness training
consumes) and the run's configuration. Arrays are restored straight into the
shardings of a template state, so a run resumes on any mesh.

Failures are one-line errors: a save that cannot be written (disk full)
raises OSError naming the step and the last complete checkpoint, and removes
orbax's temporary folder; a checkpoint whose tensors do not match the model
raises ValueError before anything is read. orbax's own log records of the
error (tracebacks through its threads) are held back while a Checkpointer is
open.

Importing this module makes orbax's `asyncio_utils.run_sync` wait for every
task its coroutine started before orbax closes the event loop (see
`_with_its_tasks`): a failed save then ends with no write still in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src import asyncio_utils


def flatten_state(state) -> dict[str, jax.Array]:
  """{"params/layers/0/attn/q_proj/kernel/value": array, ...} for any pytree."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
          for path, leaf in leaves}


async def _with_its_tasks(coro):
  """Awaits `coro`, then every task started on its loop while it ran.

  orbax runs each save's coroutine on a new event loop in a thread and closes
  the loop when the coroutine ends. A save writes its tensors as
  `asyncio.gather` children; when one write fails (ENOSPC) gather raises at
  once, and the loop used to close with the other writes still awaiting their
  TensorStore futures. TensorStore then completed those from its own threads
  into the closed loop (`loop.call_soon_threadsafe`): one "RuntimeError:
  Event loop is closed" traceback each on stderr, after the one-line error,
  and writes still landing in the temporary folder being removed. Waiting
  here ends each of those writes (done or failed, its error retrieved) while
  the loop runs. The tasks are counted by a task factory, not
  `asyncio.all_tasks`, whose iteration of global sets orbax avoids across
  threads.
  """
  loop = asyncio.get_running_loop()
  previous = loop.get_task_factory()
  started = []

  def factory(loop, coro, **kwargs):
    task = (asyncio.Task(coro, loop=loop, **kwargs) if previous is None
            else previous(loop, coro, **kwargs))
    started.append(task)
    return task

  loop.set_task_factory(factory)
  try:
    return await coro
  finally:
    while pending := [task for task in started if not task.done()]:
      await asyncio.gather(*pending, return_exceptions=True)
    loop.set_task_factory(previous)


_orbax_run_sync = asyncio_utils.run_sync
asyncio_utils.run_sync = lambda coro: _orbax_run_sync(_with_its_tasks(coro))


class _OrbaxErrors(logging.Filter):
  """Drops orbax's ERROR records: the Checkpointer raises them as one line."""

  def filter(self, record):
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


class Checkpointer:
  """Saves and restores train states under `directory`, keeping the last `keep`.

  Saving is asynchronous: call `close()` before reading the files or exiting;
  a failed save raises at the next save or at close. create=False: the folder
  is not created (a resume writes nothing until its checks pass).
  """

  def __init__(self, directory: str | Path, *, keep: int, create: bool = True):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep={keep!r}: expected an int >= 1")
    self.directory = Path(directory).absolute()
    self._filter = _OrbaxErrors()
    logging.getLogger("absl").addFilter(self._filter)
    self._step = None  # the save in flight
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    """state: a pytree of jax.Arrays; meta: JSON-serialisable dict."""
    with self._write_errors():  # the save in flight first: its error is its own
      self._manager.wait_until_finished()
    self._step = step
    with self._write_errors():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(flatten_state(state)),
          meta=ocp.args.JsonSave(meta)))

  def read_meta(self, step: int) -> dict:
    """The JSON metadata of checkpoint `step`, without reading its arrays."""
    return dict(self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

  def restore(self, like_state, step: int | None = None):
    """(state, meta) of `step` (default: latest) with `like_state`'s structure,
    shapes, dtypes and shardings. ValueError (one line) when the checkpoint's
    tensors are not `like_state`'s (another architecture)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    flat_like = flatten_state(like_state)
    stored = self._manager.item_metadata(step)["state"]
    for name, x in flat_like.items():
      if name not in stored or tuple(stored[name].shape) != tuple(x.shape):
        found = "no such tensor" if name not in stored else f"shape {tuple(stored[name].shape)}"
        raise ValueError(
            f"checkpoint {self.directory / str(step)}: {name!r} has {found}, the model "
            f"has shape {tuple(x.shape)}: the model settings differ from the run's "
            "(resume with its model, or start a new run)")
    extra = sorted(set(stored) - set(flat_like))
    if extra:
      raise ValueError(f"checkpoint {self.directory / str(step)}: {extra[0]!r} is not a "
                       "tensor of this model: the model settings differ from the run's")
    abstract = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                for name, x in flat_like.items()}
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    treedef = jax.tree.structure(like_state)
    state = jax.tree.unflatten(treedef, [restored.state[name] for name in flat_like])
    return state, dict(restored.meta)

  def close(self) -> None:
    """Waits for the save in flight; raises its error (see `_write_errors`)."""
    try:
      with self._write_errors():
        self._manager.wait_until_finished()
    finally:
      self._manager.close()
      logging.getLogger("absl").removeFilter(self._filter)

  @contextlib.contextmanager
  def _write_errors(self):
    """A failed save (this one or the one in flight) -> one-line OSError; its
    temporary folders are removed, the complete checkpoints stay."""
    try:
      yield
    except Exception as e:
      for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)
      code = re.search(r"os_error_code='(\d+)'", str(e))
      code = int(code[1]) if code else getattr(e, "errno", None) or errno.EIO
      latest = self.latest_step()
      raise OSError((
          f"checkpoint {self._step} could not be written in {self.directory} "
          f"({os.strerror(code)}); "
          + ("no complete checkpoint" if latest is None
             else f"the last complete checkpoint is {latest}"))) from None


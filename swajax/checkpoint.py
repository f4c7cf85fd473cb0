"""Resumable training checkpoints (orbax).

A checkpoint holds the whole train state pytree (parameters, optimizer state,
step) as one flat {path: array} dict, plus JSON metadata: the data stream
position and seed (which fix the data order, the only randomness training
consumes) and the run's configuration. Arrays are restored straight into the
shardings of a template state, so a run resumes on any mesh.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


def flatten_state(state) -> dict[str, jax.Array]:
  """{"params/layers/0/attn/q_proj/kernel/value": array, ...} for any pytree."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
          for path, leaf in leaves}


class Checkpointer:
  """Saves and restores train states under `directory`, keeping the last `keep`.

  Saving is asynchronous: call `close()` before reading the files or exiting.
  """

  def __init__(self, directory: str | Path, *, keep: int):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep={keep!r}: expected an int >= 1")
    self.directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    """state: a pytree of jax.Arrays; meta: JSON-serialisable dict."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flatten_state(state)),
        meta=ocp.args.JsonSave(meta)))

  def restore(self, like_state, step: int | None = None):
    """(state, meta) of `step` (default: latest) with `like_state`'s structure,
    shapes, dtypes and shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    flat_like = flatten_state(like_state)
    abstract = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                for name, x in flat_like.items()}
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    treedef = jax.tree.structure(like_state)
    state = jax.tree.unflatten(treedef, [restored.state[name] for name in flat_like])
    return state, dict(restored.meta)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

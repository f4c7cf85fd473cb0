"""`swajax train` through the real command when things go wrong: shared run
folders, refused resumes, signals, NaNs, a full disk, partial config tables.

Every run is a subprocess (`python -m swajax train`) of a tiny model for a few
steps; the refused cases fail before training, in seconds.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model-overrides", "num_layers=1", "hidden_size=32", "intermediate_size=64",
        "num_q_heads=2", "num_kv_heads=1", "head_dim=16", "layer_windows=(16,)",
        "--seq-len", "32", "--batch-size", "4", "--dtype", "float32",
        "--corpus-max-bytes", "20000", "--eval-every", "2", "--eval-batches", "1",
        "--checkpoint-every", "2", "--sample-tokens", "0", "--warmup-steps", "1"]


def swajax(*argv, cwd=None, **popen) -> subprocess.Popen:
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  env.pop("SWAJAX_TRACEBACK", None)
  return subprocess.Popen([sys.executable, "-m", "swajax", *map(str, argv)], cwd=cwd,
                          env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, **popen)


def run(*argv, cwd=None) -> subprocess.CompletedProcess:
  proc = swajax(*argv, cwd=cwd)
  out, err = proc.communicate(timeout=300)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_one_line_error(result, message: str) -> None:
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith("swajax train: error")]
  assert len(errors) == 1 and message in errors[0], result.stderr
  others = [l for l in result.stderr.splitlines()  # besides the progress lines
            if not l.startswith(("run folder ", "step ", "  validation: ", "swajax train: error"))]
  assert not others, result.stderr


def snapshot(folder: Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes()
          for p in sorted(folder.rglob("*")) if p.is_file()}


def strict_records(path: Path) -> list[dict]:
  """metrics.jsonl read by a strict JSON parser (NaN/Infinity rejected)."""
  def reject(name):
    raise ValueError(f"{path}: non-standard JSON constant {name}")
  return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
  """A finished 4-step run (checkpoints 2 and 4, hf/ export)."""
  out = tmp_path_factory.mktemp("base") / "run"
  result = run("train", *TINY, "--steps", "4", "--out", out)
  assert result.returncode == 0, result.stderr
  return out


def test_runs_started_together_get_their_own_folders(tmp_path):
  """Point 1: two runs with the default --out started at once."""
  procs = [swajax("train", *TINY, "--steps", "2", cwd=tmp_path) for _ in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], results
  folders = sorted((tmp_path / "runs").iterdir())
  assert len(folders) == 2
  for folder in folders:
    assert [r["step"] for r in strict_records(folder / "metrics.jsonl")] == [1, 2]
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["2"]
    assert json.loads((folder / "config.json").read_text())["out"] == str(
        folder.relative_to(tmp_path))


def test_claim_run_dir_never_reuses_a_folder(tmp_path, monkeypatch):
  """Point 1: the same second gives runs/<t>, runs/<t>-2, ...; an explicit
  non-empty --out is refused."""
  from swajax.training import run_folder

  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(run_folder.time, "strftime", lambda _: "20260101-000000")
  assert [run_folder.claim_run_dir(None) for _ in range(3)] == [
      Path("runs/20260101-000000"), Path("runs/20260101-000000-2"),
      Path("runs/20260101-000000-3")]
  assert (tmp_path / "runs/20260101-000000-3/config.json").is_file()
  with pytest.raises(ValueError, match="is not empty: a run folder is never reused"):
    run_folder.claim_run_dir("runs/20260101-000000")
  (tmp_path / "empty").mkdir()
  assert run_folder.claim_run_dir("empty") == Path("empty")


def test_refused_resumes_leave_the_run_untouched(finished_run, tmp_path):
  """Points 2, 3 and 4: every refused --resume is one line, exit 2, and the
  run folder stays byte-identical; then a valid resume keeps the schedule."""
  before = snapshot(finished_run)
  for flags, message in [
      (["--steps", "6", "--seq-len", "64"], "seq_len=64: the checkpoint was trained with"),
      (["--steps", "6", "--model-overrides", "num_layers=1", "hidden_size=64",
        "intermediate_size=64", "num_q_heads=2", "num_kv_heads=1", "head_dim=16",
        "layer_windows=(16,)"], "the model settings differ from the run's"),
      (["--steps", "4"], "steps=4: the run's latest checkpoint is at step 4"),
      (["--steps", "3"], "nothing would be trained"),
  ]:
    result = run("train", "--resume", finished_run, *flags)
    assert_one_line_error(result, message)
    assert snapshot(finished_run) == before, flags
  # A run folder's config.json that is not JSON is named in the error.
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text('{"steps": 4}{"steps": 5}')
  assert_one_line_error(run("train", "--resume", broken),
                        f"{broken / 'config.json'}: not valid JSON")
  # The refusals changed nothing: a plain resume trains the 2 new steps on the
  # run's own schedule (cosine over 4 steps, then the minimum LR) and says so.
  result = run("train", "--resume", finished_run, "--steps", "6")
  assert result.returncode == 0, result.stderr
  assert "the LR schedule stays the run's (cosine over 4 steps" in result.stderr
  assert "trained 2 steps" in result.stdout
  assert "\r" not in result.stderr  # not a terminal: whole progress lines (point 13)
  records = strict_records(finished_run / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, 7))
  lr_min = 2e-3 * 0.1  # TrainConfig's lr * min_lr_ratio: the schedule ended at step 4
  assert records[3]["lr"] > lr_min * 1.5  # step 4's lr is schedule(3)
  assert records[4]["lr"] == records[5]["lr"] == pytest.approx(lr_min)
  saved = json.loads((finished_run / "config.json").read_text())
  assert (saved["steps"], saved["schedule_steps"], saved["sample_tokens"]) == (6, 4, 0)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_exits_128_plus_signum(tmp_path, signum):
  """Point 5: the step in progress finishes, then checkpoint, metrics and plot."""
  out = tmp_path / "run"
  proc = swajax("train", *TINY, "--steps", "100000", "--checkpoint-every", "50000",
                "--eval-every", "50000", "--out", out)
  lines = []
  while not any(l.startswith("step ") for l in lines):
    line = proc.stderr.readline()
    assert line, "".join(lines)
    lines.append(line)
  time.sleep(1.0)  # a few more steps
  proc.send_signal(signum)
  _, rest = proc.communicate(timeout=120)
  err = "".join(lines) + rest
  assert proc.returncode == 128 + signum, err
  assert "Traceback" not in err, err
  step = strict_records(out / "metrics.jsonl")[-1]["step"]
  assert f"interrupted by {signal.Signals(signum).name} after step {step} " in err
  assert f"resume: swajax train --resume {out}\n" in err
  assert [p.name for p in (out / "checkpoints").iterdir()] == [str(step)]
  assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_non_finite_step_stops_the_run(tmp_path):
  """Point 6: lr 1e30 makes step 2's gradient norm NaN."""
  out = tmp_path / "run"
  result = run("train", *TINY, "--steps", "5", "--lr", "1e30", "--warmup-steps", "0",
               "--checkpoint-every", "1", "--out", out)
  assert_one_line_error(result, "step 2: loss=")
  assert "(not finite): training stopped; the last good checkpoint is step 1" in (
      result.stderr)
  records = strict_records(out / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2] and records[1]["grad_norm"] is None
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str):
  """A real `size` tmpfs at `folder` (root only); skips the test where mount
  is not allowed."""
  folder.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                            str(folder)], capture_output=True).returncode == 0
  if not mounted:
    pytest.skip("mount -t tmpfs is not allowed here (see test_disk_full_simulated)")
  try:
    yield folder
  finally:
    subprocess.run(["umount", str(folder)], check=True)


def test_disk_full_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
  """Point 7: a 1.2 MB disk holds checkpoint 2 (~790 KB) but not also 4."""
  with small_tmpfs(tmp_path / "disk", "1200k") as disk:
    out = disk / "run"
    result = run("train", *TINY, "--model-overrides", "num_layers=1", "hidden_size=64",
                 "intermediate_size=128", "num_q_heads=2", "num_kv_heads=1",
                 "head_dim=32", "layer_windows=(16,)", "--steps", "8", "--out", out)
    assert_one_line_error(result, "No space left on device")
    assert "the last complete checkpoint is 2" in result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]
    from swajax.training.checkpoint import Checkpointer
    checkpointer = Checkpointer(out / "checkpoints", keep=2, create=False)
    assert checkpointer.read_meta(2)["data_position"] == 8
    checkpointer.close()
    # --out on a full disk is refused before the data is read (a missing
    # --data would be the error otherwise).
    with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
      while True:
        f.write(b"\0" * 65536)
        f.flush()
    result = run("train", *TINY, "--data", tmp_path / "missing.txt", "--out", disk / "new")
    assert_one_line_error(result, f"out='{disk / 'new'}': cannot write in {disk}")


def test_a_partial_model_table_names_the_missing_fields(tmp_path):
  """Point 8."""
  toml = tmp_path / "run.toml"
  toml.write_text('steps = 2\n[model]\nnum_layers = 2\nhidden_size = 64\n')
  result = run("train", "--config", toml, "--out", tmp_path / "run")
  assert_one_line_error(result, "model: missing ModelConfig fields")
  assert not (tmp_path / "run").exists()


def test_disk_full_simulated(tmp_path, monkeypatch):
  """Point 7 where no tmpfs can be mounted too: ENOSPC raised at the writes
  (the --out probe; orbax's write, as tensorstore reports it) is one line, and
  the save's temporary folder is removed."""
  import errno

  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  from swajax.training import run_folder
  from swajax.training.checkpoint import Checkpointer

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  with monkeypatch.context() as patch:
    patch.setattr(run_folder.os, "fsync", full)
    with pytest.raises(OSError, match=f"out='{tmp_path}/run': cannot write in {tmp_path} "
                       r"\(No space left on device\)"):
      run_folder.check_writable(str(tmp_path / "run"))
  checkpointer = Checkpointer(tmp_path / "checkpoints", keep=2)
  checkpointer.save(1, {"x": jnp.ones(3)}, {"data_position": 1})
  original = ocp.CheckpointManager.save

  def save_fails(self, step, *args, **kwargs):
    (tmp_path / "checkpoints" / f"{step}.orbax-checkpoint-tmp-123").mkdir()
    raise ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']")

  monkeypatch.setattr(ocp.CheckpointManager, "save", save_fails)
  with pytest.raises(OSError, match=r"^checkpoint 2 could not be written in .*checkpoints "
                     r"\(No space left on device\); the last complete checkpoint is 1$"):
    checkpointer.save(2, {"x": jnp.ones(3)}, {"data_position": 2})
  monkeypatch.setattr(ocp.CheckpointManager, "save", original)
  checkpointer.close()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_a_failed_save_leaves_no_write_in_flight():
  """Point 7's cause, without a disk: when one of a save's gathered writes
  fails, orbax's run_sync still waits for the others (here one that ends 0.2 s
  later, and one it starts then) before closing its loop. Left running, each
  would complete into the closed loop: an 'Event loop is closed' traceback."""
  import asyncio
  import errno

  from orbax.checkpoint._src import asyncio_utils

  import swajax.training.checkpoint  # noqa: F401  (installs the wait)

  finished = []

  async def write(name, seconds):
    await asyncio.sleep(seconds)
    if name == "first":
      asyncio.ensure_future(write("started late", 0.1))
    finished.append(name)

  async def full():
    raise OSError(errno.ENOSPC, "No space left on device")

  async def save():
    await asyncio.gather(full(), write("first", 0.2))

  with pytest.raises(OSError, match="No space left on device"):
    asyncio_utils.run_sync(save())
  assert finished == ["first", "started late"]

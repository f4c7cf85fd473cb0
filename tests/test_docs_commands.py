"""Every `swajax` command in README.md and docs/*.md runs, for real.

The commands are read from the fenced shell blocks (```bash, sh, shell,
console) of README.md, then of docs/*.md in name order, and each runs as the
real command line in a subprocess, `[sys.executable, "-m", "swajax", ...]`
with PYTHONPATH at this checkout, in one scratch folder for all pages (with
`examples/` linked in), in page order: README's commands write `runs/base`
and `runs/chat-lora`, which the pages after it take up (one LoRA run serves
chat, eval, merge and generate). A command passes when it exits 0; the files
it names after `--out` / `--plot` must exist then, and a `.json` one must
parse.

Shell forms understood: `swajax ARGS`, `python -m swajax ARGS`, and
`echo TEXT | swajax ARGS` (TEXT becomes stdin); a trailing backslash continues
a line, `#` starts a comment. Any other line in a shell block fails the test
unless it is in OTHER_COMMANDS (which says who runs it); an open quote
continues a line too. A `swajax` command line in an untagged block fails (it
would escape this test); a synopsis goes in a `text` block.

Commands run as documented, except for these explicit overrides, appended to
the documented arguments (argparse: the last value of a flag wins) and listed
in OVERRIDES: the benchmarks' documented sizes take minutes each, so
`swajax bench attention` and `moe` run `--smoke` and `generate`, `train` and
`context` run at tiny sizes (every code path and output of the command, small
shapes); docs/preference.md's DPO run trains 2 steps of a one-layer model.

A command that needs what the test machine lacks is marked in its block by a
line `# needs: WHAT` (a GPU, the network); it applies to the commands after it
in that block. Such a command is not run: its flags are checked against the
subcommand's `--help`, then it is reported as skipped with WHAT and the
command line (visible with `pytest -rs`).

Also checked: README's newcomer path (a LoRA chat fine-tune of an HF
checkpoint, `swajax chat`, `swajax eval`) is on its first screen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import resource
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from swajax.cli import entry

REPO = Path(__file__).resolve().parent.parent
PAGES = ["README.md"] + sorted(
    str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*```\s*(\w*)")
NEEDS = re.compile(r"^#\s*needs:\s*(.+)$")
FIRST_SCREEN_LINES = 50

# Lines of shell blocks that are not swajax commands, and who runs them.
OTHER_COMMANDS = {
    "make train": "the Makefile's `.venv/bin/swajax train` after building the venv; "
                  "`swajax train` runs here (README, docs)",
    "make test": "the test suite itself, run by CI (.ci/run)",
}

# Arguments appended to a documented command, by the words its arguments
# start with.
OVERRIDES = {
    ("train", "--stage", "dpo"): ["--steps", "2", "--model-overrides", "num_layers=1",
                                  "--sample-tokens", "0", "--eval-batches", "1"],
    ("bench", "attention"): ["--smoke"],
    ("bench", "moe"): ["--smoke"],
    ("bench", "generate"): ["--prompt-len", "32", "--new-tokens", "4", "--window", "8",
                            "--model-overrides", "num_layers=1", "--repeats", "1"],
    ("bench", "train"): ["--seq-len", "64", "--window", "8", "--model-overrides",
                         "num_layers=1", "--repeats", "1"],
    ("bench", "context"): ["--seq-lens", "256", "--window", "16", "--heads", "2",
                           "--kv-heads", "1", "--head-dim", "16"],
}
OUTPUT_FLAGS = ("--out", "--plot")


@dataclasses.dataclass(frozen=True)
class Command:
  """One command line of a docs shell block.

  `argv` is what follows `swajax` (None for a line that is not a swajax
  command), `stdin` the text piped into it, `needs` the `# needs:` mark in
  force (None: runnable here).
  """
  page: str
  line: int
  text: str
  argv: tuple[str, ...] | None
  stdin: str | None
  needs: str | None

  @property
  def subcommand(self) -> tuple[str, ...]:
    words = self.argv[:2] if self.argv and self.argv[0] == "bench" else self.argv[:1]
    return tuple(words)

  def __str__(self):
    return f"{self.page}:{self.line}: {self.text}"


def parse_line(text: str) -> tuple[list[str], tuple[str, ...] | None, str | None]:
  """(words, argv after `swajax`, stdin) of one logical shell line, `#`
  comments dropped; argv is None when the line is not a swajax command."""
  lexer = shlex.shlex(text, posix=True, punctuation_chars="|")
  lexer.whitespace_split = True
  words = list(lexer)
  stages = [[]]
  for word in words:
    if word == "|":
      stages.append([])
    else:
      stages[-1].append(word)
  stdin = None
  if len(stages) == 2 and stages[0][:1] == ["echo"]:
    stdin = " ".join(stages[0][1:]) + "\n"
    stages = stages[1:]
  command = stages[0] if len(stages) == 1 else []
  if command[:1] == ["swajax"]:
    return words, tuple(command[1:]), stdin
  if command[:3] in (["python", "-m", "swajax"], ["python3", "-m", "swajax"]):
    return words, tuple(command[3:]), stdin
  return words, None, None


def looks_like_a_command(line: str) -> bool:
  """Whether `line` of an untagged block is a swajax command line (a block
  tagged `text`, `python`, ... declares it holds none)."""
  words = line.split()
  if words[:3] in (["python", "-m", "swajax"], ["python3", "-m", "swajax"]):
    return True
  return words[:1] == ["swajax"] and len(words) > 1 and words[1] in entry.SUBCOMMANDS


def read_page(page: str) -> tuple[list[Command], list[str]]:
  """The commands of `page`'s shell blocks, and the `swajax` lines found in
  its other blocks (each an error)."""
  commands, stray = [], []
  language, needs, pending, start = None, None, "", 0
  for number, raw in enumerate((REPO / page).read_text().splitlines(), 1):
    fence = FENCE.match(raw)
    if fence:
      language = None if language is not None else fence.group(1)
      needs = None
      continue
    if language is None:
      continue
    line = raw.strip()
    if language not in SHELL_LANGUAGES:
      if not language and looks_like_a_command(line):
        stray.append(f"{page}:{number}: {line}")
      continue
    if not pending:
      start = number
    if line.endswith("\\"):
      pending += line[:-1] + " "
      continue
    line, pending = pending + line, ""
    mark = NEEDS.match(line)
    if mark:
      needs = mark.group(1).strip()
      continue
    try:
      words, argv, stdin = parse_line(line)
    except ValueError:  # a quote still open: the command goes on on the next line
      pending = line + "\n"
      continue
    if words:
      commands.append(Command(page, start, " ".join(words), argv, stdin, needs))
  return commands, stray


ALL = {page: read_page(page) for page in PAGES}
COMMANDS = [c for page in PAGES for c in ALL[page][0]]
RUNNABLE = {page: [c for c in ALL[page][0] if c.needs is None and c.argv is not None]
            for page in PAGES}
NEEDING = [c for c in COMMANDS if c.needs is not None]


def overrides_for(argv: tuple[str, ...]) -> list[str]:
  """The OVERRIDES of the command whose arguments are `argv`."""
  return [a for key, extra in OVERRIDES.items() if argv[:len(key)] == key for a in extra]


def run_command(command: Command, workdir: Path) -> subprocess.CompletedProcess:
  """Runs `command` (+ its OVERRIDES) in `workdir`; prints its CPU time (-s)."""
  argv = [*command.argv, *overrides_for(command.argv)]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  result = subprocess.run(
      [sys.executable, "-m", "swajax", *argv], cwd=workdir, env=env,
      input=command.stdin, stdin=None if command.stdin is not None else subprocess.DEVNULL,
      capture_output=True, text=True, timeout=900)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
  print(f"{cpu:5.1f} s CPU  {command}")
  return result


def check_result(command: Command, result: subprocess.CompletedProcess, workdir: Path):
  assert result.returncode == 0, (
      f"{command}\nexit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
  argv = list(command.argv)
  for flag in OUTPUT_FLAGS:
    if flag in argv:
      path = workdir / argv[argv.index(flag) + 1]
      assert path.exists(), f"{command}: {flag} {path} was not written"
      if path.suffix == ".json":
        json.loads(path.read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("docs_commands")
  (folder / "examples").symlink_to(REPO / "examples")
  return folder


@pytest.fixture(scope="module")
def readme_results(workdir):
  """README's commands, run once in order (the later pages build on them)."""
  return [(c, run_command(c, workdir)) for c in RUNNABLE["README.md"]]


def test_every_shell_line_is_a_known_command():
  unknown = [str(c) for c in COMMANDS if c.argv is None and c.needs is None
             and c.text not in OTHER_COMMANDS]
  assert not unknown, "shell lines this test cannot run (see its docstring):\n" + "\n".join(unknown)
  stray = [s for page in PAGES for s in ALL[page][1]]
  assert not stray, "swajax commands outside a shell block:\n" + "\n".join(stray)
  assert [c.text for c in COMMANDS if c.text in OTHER_COMMANDS] == list(OTHER_COMMANDS)
  runnable = [c.argv for page in PAGES for c in RUNNABLE[page]]
  unused = [k for k in OVERRIDES if not any(argv[:len(k)] == k for argv in runnable)]
  assert not unused, f"overrides of no documented command: {unused}"


def test_readme_newcomer_path_is_on_the_first_screen():
  first = [c for c in RUNNABLE["README.md"] if c.line <= FIRST_SCREEN_LINES and c.argv]
  lora = [c for c in first if c.argv[0] == "train" and "--init-from-hf" in c.argv
          and "--lora-rank" in c.argv and "--data" in c.argv]
  assert lora, "README's first screen: no `swajax train --init-from-hf DIR --data --lora-rank`"
  run_dir = lora[0].argv[lora[0].argv.index("--out") + 1]
  for sub in ("chat", "eval"):
    assert any(c.argv[:2] == (sub, run_dir) for c in first), (
        f"README's first screen: no `swajax {sub} {run_dir}`")


def test_readme_commands(readme_results, workdir):
  assert readme_results
  for command, result in readme_results:
    check_result(command, result, workdir)


@pytest.mark.parametrize("page", [p for p in PAGES[1:] if RUNNABLE[p]])
def test_docs_page_commands(page, readme_results, workdir):
  for command in RUNNABLE[page]:
    check_result(command, run_command(command, workdir), workdir)


def help_text(words: tuple[str, ...]) -> str:
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    entry.main([*words, "--help"])
  return out.getvalue()


@pytest.mark.parametrize("command", NEEDING, ids=str)
def test_commands_needing_a_resource_are_reported(command):
  if command.argv is not None:
    text = help_text(command.subcommand)
    unknown = [a for a in command.argv if a.startswith("--") and a.split("=")[0] not in text]
    assert not unknown, f"{command}: flags not in `swajax {' '.join(command.subcommand)} --help`"
  pytest.skip(f"needs: {command.needs} -- {command}")

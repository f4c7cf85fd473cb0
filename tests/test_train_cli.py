"""`swajax train`: flags and config files, a tiny end-to-end run, one-line errors."""

import json

import pytest

from swajax.cli import train as train_cli
from swajax.training.config import TrainConfig
from tests.test_train import tiny_train_config


def as_flags(config: TrainConfig) -> list[str]:
  """The flags that rebuild `config` (every non-default field)."""
  defaults = TrainConfig().to_dict()
  flags = []
  for name, value in config.to_dict().items():
    if value == defaults[name]:
      continue
    flag = "--" + name.replace("_", "-")
    if name == "model_overrides":
      flags += [flag, *(f"{k}={v!r}" for k, v in value.items())]
    elif isinstance(value, bool):
      flags.append(flag if value else "--no-" + flag[2:])
    else:
      flags += [flag, str(value)]
  return flags


def parse(argv) -> TrainConfig:
  return train_cli.resolve_config(train_cli.build_parser().parse_args(argv))


def test_every_field_is_a_flag(tmp_path):
  config = tiny_train_config(tmp_path, train_prompt=True, val_data="v.jsonl", remat="full")
  assert parse(as_flags(config)) == config


def test_config_files_then_flags(tmp_path):
  toml = tmp_path / "run.toml"
  toml.write_text('steps = 7\nlr = 1\n[model_overrides]\nnum_layers = 2\n'
                  'layer_windows = [8, 8]\n')
  config = parse(["--config", str(toml), "--lr", "0.5"])
  assert (config.steps, config.lr) == (7, 0.5)
  assert dict(config.model_overrides) == {"num_layers": 2, "layer_windows": (8, 8)}
  assert config.out is None  # train claims runs/<timestamp>[-N] (claim_run_dir)
  yaml = tmp_path / "run.yaml"
  yaml.write_text("steps: 9\ndtype: float32\n")
  assert (parse(["--config", str(yaml)]).steps, parse(["--config", str(yaml)]).dtype) == (
      9, "float32")


def test_resume_reads_the_run_config(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"steps": 5, "seq_len": 64}))
  config = parse(["--resume", str(tmp_path), "--steps", "10"])
  assert (config.steps, config.seq_len, config.out) == (10, 64, str(tmp_path))


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "steps=0: expected an int >= 1"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["--lr", "-1"], "lr=-1.0: expected a float in (0.0, inf]"),
    (["--dtype", "fp8"], "dtype='fp8': expected one of"),
    (["--model-overrides", "num_layers"], "'num_layers': expected KEY=VALUE"),
    (["--model-overrides", "num_layer=2"],
     "model_overrides.num_layer=2: not a ModelConfig field"),
    (["--config", "{tmp}/missing.toml"], "No such file or directory"),
    (["--config", "{tmp}/bad.toml"], "not valid TOML"),
    (["--config", "{tmp}/bad.yaml"], "not valid YAML"),
    (["--config", "{tmp}/bad.json"], "expected a .toml, .yaml or .yml file"),
    (["--resume", "{tmp}"], "no config.json (not a run folder)"),
    (["--data", "{tmp}/missing.txt"], "data='{tmp}/missing.txt': no such file"),
    (["--data", "{tmp}/bad.jsonl"], "line 1 is not JSON"),
    (["--model", "gpt5", "--corpus-max-bytes", "10000"], "model='gpt5': expected a preset"),
])
def test_bad_settings_print_one_line_and_exit_2(tmp_path, capsys, argv, message):
  (tmp_path / "bad.toml").write_text("steps = [")
  (tmp_path / "bad.yaml").write_text("steps: [")
  (tmp_path / "bad.json").write_text("{}")
  (tmp_path / "bad.jsonl").write_text("{oops\n")
  argv = [a.format(tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "run")]
  with pytest.raises(SystemExit) as exit_info:
    raise SystemExit(train_cli.main(argv))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err, err
  assert err.startswith("swajax train: error: ")
  assert message.format(tmp=tmp_path) in err
  assert not (tmp_path / "run").exists()


def test_train_end_to_end(tmp_path, capsys):
  run = tmp_path / "run"
  config = tiny_train_config(run, sample_tokens=4)
  assert train_cli.main(as_flags(config)) == 0
  out, err = capsys.readouterr()
  assert "step 6/6" in err and "validation: loss" in err
  assert "validation perplexity" in out and f"swajax generate {run} " in out
  assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
      "3", "6"]
  records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, 7))
  assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
  assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())) == config
  assert (run / "hf" / "config.json").is_file()
  assert (run / "sample.txt").read_text().startswith(train_cli.SAMPLE_PROMPT)
  # Resuming the finished run for more steps re-exports over its hf/ folder.
  assert train_cli.main(["--resume", str(run), "--steps", "7", "--sample-tokens", "0"]) == 0
  assert "step 7/7" in capsys.readouterr().err
  assert json.loads((run / "hf" / "config.json").read_text())["model_type"] == "mistral"

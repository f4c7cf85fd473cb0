"""Benchmarks run end to end at tiny sizes: CLI dispatch, JSON, plot, GPU script."""

import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import Band, FlashBlockSizes, visible
from pallas_kernels.validation import check_attention_args
from swajax.cli import bench
from swajax.cli.bench import attention, moe, mosaic, tiles

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv, code", [([], 2), (["--help"], 0), (["nope"], 2)])
def test_bench_dispatch(argv, code, capsys):
  assert bench.main(argv) == code
  captured = capsys.readouterr()
  assert "attention" in captured.out + captured.err


@pytest.mark.parametrize("seq_len, window", [(1, 1), (7, 3), (10, 10), (9, 30)])
def test_in_window_pairs_counts_the_mask(seq_len, window):
  pos = np.arange(seq_len)
  mask = visible(pos[:, None], pos[None, :], Band(window - 1, 0))
  assert attention.in_window_pairs(seq_len, window) == int(np.sum(mask))


def test_attention_keyword_api_returns_the_payload():
  payload = attention.benchmark(seq_lens=[64], windows=(8,), impls=("xla", "cudnn"),
                                modes=("fwd",), heads=2, kv_heads=1, head_dim=16,
                                repeats=1)
  assert set(payload) == {"machine", "config", "matmul_flops_per_s", "results"}
  config = payload["config"]
  assert config == dataclasses.asdict(attention.Settings(**config))
  assert (config["seq_lens"], config["dtype"], config["batch"]) == ((64,), "float32", 1)
  xla, cudnn = payload["results"]
  assert (xla["impl"], xla["seq_len"], xla["window"]) == ("xla", 64, 8)
  assert xla["time_s"] > 0 and xla["tflops"] > 0
  assert cudnn["time_s"] is None and cudnn["skipped"] == "needs a GPU"


def test_attention_cli_flags_are_the_keyword_arguments():
  settings, _ = attention.parse_args([])
  assert settings == {}  # every default comes from Settings
  settings, args = attention.parse_args(
      ["--smoke", "--seq-lens", "64", "96", "--dtype", "bfloat16", "--out", "a.json"])
  assert settings == {**attention.SMOKE, "seq_lens": [64, 96], "dtype": "bfloat16"}
  assert args.out == "a.json"


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(seq_lens=128), ValueError, "seq_lens=128: expected a non-empty sequence"),
    (dict(windows=(16, 0)), ValueError, r"windows=\(16, 0\): expected ints >= 1"),
    (dict(impls=("xla", "flash")), ValueError, "impls=.*expected entries from"),
    (dict(modes=()), ValueError, r"modes=\(\): expected a non-empty sequence"),
    (dict(dtype="fp8"), ValueError, "dtype='fp8': expected one of"),
    (dict(repeats=0), ValueError, "repeats=0: expected an int >= 1"),
    (dict(heads=3), ValueError, "heads=3, kv_heads=8: expected heads to be a multiple"),
    (dict(max_dense_bytes=-1), ValueError, "max_dense_bytes=-1: expected a number > 0"),
    (dict(seq_len=128), TypeError, "seq_len"),
])
def test_attention_settings_reject_bad_values(kwargs, error, match):
  with pytest.raises(error, match=match):
    attention.benchmark(**kwargs)


def test_attention_smoke_writes_json_and_plot(tmp_path):
  out, png = tmp_path / "a.json", tmp_path / "a.png"
  assert bench.main(["attention", "--smoke", "--impls", "xla", "dense", "cudnn",
                     "--out", str(out), "--plot", str(png)]) == 0
  rows = json.loads(out.read_text())["results"]
  xla = [r for r in rows if r["impl"] == "xla"]
  assert len(xla) == 2 and all(r["time_s"] > 0 for r in xla)
  assert all(r["speedup_vs_dense"] > 0 for r in xla)
  dense = [r for r in rows if r["impl"] == "dense"]
  assert all(r["speedup_vs_dense"] == 1.0 for r in dense)
  cudnn = [r for r in rows if r["impl"] == "cudnn"]
  assert all(r["time_s"] is None and r["skipped"] for r in cudnn)
  assert png.stat().st_size > 1000


def test_train_bench_times_sliding_and_full(tmp_path):
  out = tmp_path / "t.json"
  assert bench.main(["train", "--seq-len", "128", "--window", "32",
                     "--model-overrides", "num_layers=1", "--repeats", "1",
                     "--out", str(out)]) == 0
  payload = json.loads(out.read_text())
  assert payload["model"]["layer_windows"] == [32]
  rows = {r["attention"]: r for r in payload["rows"]}
  assert rows["sliding"]["layer_windows"] == [32]
  assert rows["full"]["layer_windows"] == [None]
  assert all(r["step_ms"] > 0 and r["seq_len"] == 128 for r in rows.values())
  assert rows["full"]["speedup"] == 1.0


def test_generate_bench_reports_stream_and_fused_decode(tmp_path, capsys):
  out = tmp_path / "g.json"
  assert bench.main([
      "generate", "--prompt-len", "6", "--new-tokens", "3", "--window", "4",
      "--repeats", "1", "--out", str(out), "--model-overrides", "num_layers=1",
      "hidden_size=32", "intermediate_size=32", "num_q_heads=2",
      "num_kv_heads=1", "head_dim=16"]) == 0
  assert "fused vs stream" in capsys.readouterr().out
  rows = json.loads(out.read_text())["rows"]
  assert [r["attention"] for r in rows] == ["sliding", "full"]
  for row in rows:
    for loop in ("stream", "fused"):
      rate = row[f"{loop}_decode_tokens_per_s"]
      assert rate > 0
      np.testing.assert_allclose(row[f"{loop}_decode_ms_per_token"],
                                 1e3 / rate)  # batch 1
    np.testing.assert_allclose(row["fused_vs_stream"],
                               row["fused_decode_tokens_per_s"]
                               / row["stream_decode_tokens_per_s"])
  assert rows[0]["cache_bytes"] < rows[1]["cache_bytes"]  # W=4 < 10 tokens


def test_serve_bench_batched_and_sequential_agree(tmp_path, capsys):
  """Both modes at concurrency 1 and 2 serve every request whole, with the
  same greedy tokens; the figures are consistent; JSON + PNG written."""
  out = tmp_path / "s.json"
  assert bench.main([
      "serve", "--concurrency", "1", "2", "--requests", "3", "--prompt-len", "6",
      "--new-tokens", "3", "--window", "4", "--prefill-chunk", "4", "--out", str(out),
      "--model-overrides", "num_layers=1", "hidden_size=32", "intermediate_size=32",
      "num_q_heads=2", "num_kv_heads=1", "head_dim=16"]) == 0
  assert "same tokens" in capsys.readouterr().out
  rows = json.loads(out.read_text())["rows"]
  assert [(r["mode"], r["concurrency"]) for r in rows] == [
      ("batched", 1), ("sequential", 1), ("batched", 2), ("sequential", 2)]
  for row in rows:
    assert (row["requests"], row["tokens"], row["same_tokens"]) == (3, 9, True)
    np.testing.assert_allclose(row["tokens_per_s"], row["tokens"] / row["wall_s"])
    assert 0 < row["ttft_p50_ms"] <= row["ttft_p95_ms"]
    assert 0 < row["tpot_p50_ms"] <= row["tpot_p95_ms"]
  assert (tmp_path / "s.png").stat().st_size > 0


def test_serve_bench_rejects_bad_values(capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench.main(["serve", "--concurrency", "0"])
  assert exit_info.value.code == 2
  assert "--concurrency" in capsys.readouterr().err


def test_moe_smoke_writes_json_and_plot(tmp_path):
  out, png = tmp_path / "m.json", tmp_path / "m.png"
  assert bench.main(["moe", "--smoke", "--out", str(out), "--plot", str(png)]) == 0
  payload = json.loads(out.read_text())
  assert payload["settings"]["cases"] == [list(c) for c in moe.SMOKE_CASES]
  rows = {r["dispatch"]: r for r in payload["rows"]}
  assert set(rows) == set(moe.DISPATCHES)
  assert rows["blocked"]["fwd_vs_blocked"] == rows["blocked"]["fwd_bwd_vs_blocked"] == 1.0
  assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows.values())
  assert rows["blocked"]["max_abs_diff"] == 0
  assert rows["ragged"]["max_abs_diff"] < 1e-5 and rows["dense"]["max_abs_diff"] < 1e-5
  if rows["capacity"]["dropped"] == 0:  # nothing dropped: exact too
    assert rows["capacity"]["max_abs_diff"] < 1e-5
  assert png.stat().st_size > 1000


@pytest.mark.parametrize("kwargs, match", [
    (dict(cases=()), r"cases=\(\): expected \(N, D, F, E, k\)"),
    (dict(cases=[(8, 4, 4, 2, 3)]), "expected k <= E"),
    (dict(dispatches=("sparse",)), "dispatches=.*expected entries from"),
    (dict(preset="mistral_tiny"), "preset='mistral_tiny': expected one of"),
    (dict(repeats=0), "repeats=0: expected an int >= 1"),
    (dict(capacity_factor=0), "capacity_factor=0: expected > 0"),
])
def test_moe_settings_reject_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    moe.benchmark(**kwargs)


def test_moe_bad_case_exits_2(capsys):
  assert bench.main(["moe", "--cases", "8,4,4,2,3"]) == 2
  assert "expected k <= E" in capsys.readouterr().err


def test_gpu_check_smoke_mode(tmp_path):
  env = dict(os.environ, SMOKE="1", PYTHON=sys.executable, PYTHONPATH=REPO)
  run = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=240)
  assert run.returncode == 0, run.stdout + run.stderr
  names = sorted(os.listdir(tmp_path))
  assert len(names) <= 8, names
  assert all(os.path.isfile(tmp_path / n) for n in names), names
  assert {"env.txt", "gpu_check.log", "summary.txt", "tests.xml",
          "attention.json", "attention.png", "tiles.json",
          "mosaic.json"} <= set(names)
  rows = json.loads((tmp_path / "attention.json").read_text())["results"]
  assert any(r["impl"] == "xla" and r["time_s"] for r in rows)
  # The Mosaic table's rows: every impl and mode; on a CPU none is timed,
  # each listed with why (the kernels' interpret modes time the interpreter).
  rows = json.loads((tmp_path / "mosaic.json").read_text())["results"]
  assert {(r["impl"], r["mode"]) for r in rows} == set(
      itertools.product(mosaic.IMPLS, attention.MODES))
  assert all(r["heads"] == 4 and r["kv_heads"] == 2 for r in rows)
  if jax.default_backend() != "gpu":
    assert all(r["time_s"] is None and r["skipped"] for r in rows), rows


def test_mosaic_table_stops_at_its_budget(tmp_path):
  out = tmp_path / "m.json"
  payload = mosaic.benchmark(gqa=((4, 2),), head_dims=(64,),
                             seq_lens=(128, 256), windows=(64,),
                             impls=("mosaic", "cudnn"), budget_s=0, out=out)
  assert json.loads(out.read_text()) == payload
  rows = payload["results"]
  assert len(rows) == 2 * 2 * 2  # T x mode x impl
  assert all(r["skipped"] == "budget" and r["time_s"] is None for r in rows)


@pytest.mark.parametrize("flags, match", [
    (["--repeats", "0"], "--repeats=0: expected an int >= 1"),
    (["--budget-s", "-1"], "--budget-s=-1.0: expected seconds >= 0"),
])
def test_mosaic_table_bad_flags_exit_2(flags, match, capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench.main(["mosaic", *flags])
  assert exit_info.value.code == 2
  assert match in capsys.readouterr().err


def test_mosaic_table_compares_with_cudnn():
  rows = [dict(impl=impl, mode="fwd", window=64, time_s=t)
          for impl, t in (("cudnn", 2.0), ("mosaic", 1.6), ("pallas", None))]
  got = {r["impl"]: r.get("vs_cudnn") for r in mosaic._with_vs_cudnn(rows)}
  assert got == {"cudnn": 1.0, "mosaic": 1.25, "pallas": None}


@pytest.mark.parametrize("benchmark", ["generate", "train"])
@pytest.mark.parametrize("override, match", [
    ("num_layers", "expected KEY=VALUE"),
    ("num_layer=2", "--model-overrides: .*num_layer"),
    ("num_layers=0", "--model-overrides: num_layers=0"),
])
def test_bad_model_overrides_exit_2(benchmark, override, match, capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench.main([benchmark, "--model-overrides", override])
  assert exit_info.value.code == 2
  assert re.search(match, capsys.readouterr().err)


def test_tiles_variants_change_one_field_each():
  q = jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16)
  default = FlashBlockSizes.default(check_attention_args(
      q, q, q, window=256, causal=True, segment_ids=None, softcap=None,
      scale=None))
  found = tiles.variants(default)
  assert found[0] == ("default", default)
  names = [name for name, _ in found]
  assert len(set(names)) == len(names)
  for name, blocks in found[1:]:
    field, value = name.split("=")
    changed = {f.name for f in dataclasses.fields(FlashBlockSizes)
               if getattr(blocks, f.name) != getattr(default, f.name)}
    assert changed == {field} and getattr(blocks, field) == int(value)


def test_tiles_smoke_stops_at_its_budget(tmp_path):
  out = tmp_path / "tiles.json"
  assert bench.main(["tiles", "--smoke", "--budget-s", "0",
                     "--out", str(out)]) == 0
  payload = json.loads(out.read_text())
  assert payload["cut_at_budget_s"] == 0
  [row] = payload["rows"]
  assert row["variant"] == "default" and row["fwd_bwd_vs_default"] == 1.0
  assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0


def test_tiles_needs_a_gpu_without_smoke(capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench.main(["tiles"])
  assert exit_info.value.code == 2
  assert "needs a GPU" in capsys.readouterr().err

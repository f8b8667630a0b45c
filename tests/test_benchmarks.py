"""Smoke test of the benchmark suite's entry point (``python -m benchmarks.run``).

Runs every suite in ``--smoke`` mode (tiny sizes, cheap stand-ins for the
expensive teleports) and checks that the JSON results are written with the
expected keys. It checks plumbing, not performance.
"""

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # plumbing of the benchmark scripts: ``pytest -m slow``

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the benchmarks package lives next to tests/, not installed
  sys.path.insert(0, str(ROOT))

SUITE_KEYS = {"suite", "mode", "tables", "targets", "notes", "wall_s", "machine"}
EXTRA_KEYS = {
  "latency": {"problem", "timings", "compile", "eager", "ratios"},
  "scaling": {"rows", "data_gl_pieces", "points", "settings"},
  "time_to_target": {"rows", "regression", "memory", "settings"},
  "compile": {"compile", "schedule_changes", "recompiled_on_value_change", "num_steps_change"},
}
MACHINE_KEYS = {"platform", "jax_version", "backend", "devices", "cpu_count", "total_wall_s"}
TARGET_KEYS = {"name", "measured", "threshold", "comparison", "status"}


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
  from benchmarks import run

  out = tmp_path_factory.mktemp("bench")
  results = run.main(["--smoke", "--out", str(out)])
  return out, results


def test_writes_one_json_per_suite_and_machine(smoke_results):
  out, results = smoke_results
  from benchmarks import run

  assert set(results) == set(run.SUITES)
  names = {p.name for p in out.glob("*.json")}
  assert names == {f"{s}.json" for s in run.SUITES} | {"machine.json"}
  machine = json.loads((out / "machine.json").read_text())
  assert MACHINE_KEYS <= set(machine)
  assert machine["mode"] == "smoke"
  assert machine["devices"]


@pytest.mark.parametrize("suite", sorted(EXTRA_KEYS))
def test_suite_json_has_expected_keys(smoke_results, suite):
  out, _ = smoke_results
  data = json.loads((out / f"{suite}.json").read_text())
  assert SUITE_KEYS | EXTRA_KEYS[suite] <= set(data)
  assert data["suite"] == suite and data["mode"] == "smoke"
  for table in data["tables"]:
    assert table["title"] and isinstance(table["rows"], list)
  for target in data["targets"]:
    assert TARGET_KEYS <= set(target)


def test_smoke_figures_are_sane(smoke_results):
  out, _ = smoke_results
  compile_ = json.loads((out / "compile.json").read_text())
  # schedule values live in the optimizer state: changing them does not recompile
  assert compile_["recompiled_on_value_change"] is False
  assert compile_["num_steps_change"]["xla_compiles"] >= 1
  ttt = json.loads((out / "time_to_target.json").read_text())
  assert all(r["time_gd_ms"] > 0 and r["time_teleport_ms"] > 0 for r in ttt["rows"])
  scaling = json.loads((out / "scaling.json").read_text())
  assert any(r["symmetry"] == "rescaling" and r["grad_ms"] > 0 for r in scaling["rows"])


def test_parse_args_modes():
  from benchmarks import run

  assert not run.parse_args([]).quick
  args = run.parse_args(["--quick", "--only", "latency", "compile"])
  assert args.quick and args.only == ["latency", "compile"]
  with pytest.raises(SystemExit):
    run.parse_args(["--quick", "--smoke"])


@pytest.mark.parametrize("name", ["backends", "discovery", "loop_modes", "workloads"])
def test_standalone_benchmarks_run_in_smoke_mode(tmp_path, name):
  import importlib

  module = importlib.import_module(f"benchmarks.{name}")
  result = module.main(["--smoke", "--out", str(tmp_path)])
  assert result["mode"] == "smoke" and result["tables"]
  assert (tmp_path / f"{name}.json").exists()


def test_learned_workloads_benchmark_runs_in_smoke_mode(tmp_path):
  from benchmarks import learned_workloads

  result = learned_workloads.main(["--smoke", "--only", "mlp_digits", "--out", str(tmp_path)])
  rec = result["workloads"]["mlp_digits"]
  assert set(learned_workloads.LEARNED) <= set(rec["methods"])
  assert set(rec["meta_training"]) == set(learned_workloads.LEARNED)
  assert rec["methods"]["learned_lr_tele"]["max_rel_loss_drift"] <= 1e-5
  assert (tmp_path / "learned_workloads.json").exists()


def test_sharding_benchmark_runs_in_smoke_mode_in_its_own_process(tmp_path):
  import subprocess

  # its own process: the benchmark asks for 8 emulated CPU devices before importing jax
  cmd = [sys.executable, "-m", "benchmarks.sharding", "--smoke", "--out", str(tmp_path)]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "sharding.json").read_text())
  assert {r["devices"] for r in result["records"]} == {1, 8}
  assert all(r["outputs_keep_shardings"] and r["teleport_accepted"] for r in result["records"])


@pytest.mark.slow
def test_cpu_flags_benchmark_measures_each_setting_in_its_own_process(tmp_path, monkeypatch):
  from benchmarks import cpu_flags

  monkeypatch.setattr(cpu_flags, "CASES", ("mlp_digits",))
  result = cpu_flags.main(["--rounds", "1", "--out", str(tmp_path)])
  assert set(result["records"]) == set(cpu_flags.SETTINGS)
  for rec in result["records"].values():
    r = rec["cases"]["mlp_digits"]
    assert r["teleport_compile_s"] > 0 and r["plain_step_s"] > 0
  assert (tmp_path / "cpu_flags.json").exists()

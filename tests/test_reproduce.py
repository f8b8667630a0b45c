"""The ``reproduce`` command and the MLP regression experiment (tiny sizes)."""

import json

import numpy as np
import pytest

from teleport_jax.experiments import cli
from teleport_jax.experiments import common
from teleport_jax.experiments import regression


@pytest.fixture
def tiny_regression(monkeypatch):
  # one seed, 30 epochs and a subset of the methods keep the compile time down
  monkeypatch.setattr(regression, "_sizes", lambda config: (range(1), 30))
  monkeypatch.setattr(regression, "REPEATED_SCHEDULE", (5, 15))
  monkeypatch.setattr(regression, "METHODS", ("gd", "gd_teleport", "gd_teleport_repeated"))
  monkeypatch.setattr(regression, "COMPARISONS", ("gd_teleport_published",))


def test_published_problem_matches_the_protocol():
  params, x, y = regression.make_problem(0)
  assert [w.shape for w in params] == [(6, 5), (7, 6), (8, 7)]
  assert x.shape == (5, 4) and y.shape == (8, 4)
  for a in params + [x, y]:
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0


def test_reproduce_writes_summary_plots_and_table(tiny_regression, tmp_path, capsys):
  assert cli.main(["--only", "mlp_regression", "--out", str(tmp_path), "--no-progress"]) == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  runs = summary["experiments"]["mlp_regression"]["runs"]
  for method in regression.METHODS + regression.COMPARISONS:
    entry = runs[method]
    assert len(entry["loss_mean"]) == 30 and len(entry["loss_std"]) == 30
    assert entry["n_seeds"] == 1 and entry["wall_time_s"] > 0
    if "teleport" in method:
      assert "max_rel_loss_drift" in entry and "nonfinite_runs" in entry
  for method in ("gd_teleport", "gd_teleport_repeated"):
    assert runs[method]["max_rel_loss_drift"] <= 1e-4
    assert runs[method]["nonfinite_runs"] == 0
  assert runs["gd_teleport_repeated"]["num_teleports"] == [2]
  # the published first-order action changes the loss by far more than our tolerance
  assert runs["gd_teleport_published"]["max_rel_loss_drift"] > 1e-2
  # teleporting helps GD early on (the full run checks the 5x target at epoch 50)
  assert runs["gd_teleport"]["loss_mean"][29] < runs["gd"]["loss_mean"][29]
  targets = summary["experiments"]["mlp_regression"]["targets"]
  assert targets["every_teleport_drift_le_1e-4"] and targets["no_nonfinite_run"]
  for name in ("mlp_loss_vs_epoch.png", "mlp_loss_vs_time.png", "mlp_grad_norm_vs_loss.png"):
    assert (tmp_path / name).stat().st_size > 1000
  out = capsys.readouterr().out
  assert "gd_teleport" in out and "summary.json" in out


def test_format_table_aligns_columns():
  text = cli.format_table([{"method": "gd", "loss": 1.5}, {"method": "gd_teleport", "loss": None}])
  lines = text.splitlines()
  assert lines[0].startswith("method") and len({len(line.rstrip()) > 0 for line in lines}) == 1
  assert "-" in lines[-1]


def test_timed_training_separates_compile_time():
  import optax

  step = common.make_train_step(optax.sgd(1e-4), regression.loss_fn)
  params, x, y = regression.make_problem(1)
  _, _, losses, gns, times, compile_s = common.timed_training(
    step, params, optax.sgd(1e-4).init(params), lambda e: (x, y), 5
  )
  assert losses.shape == (5,) and np.all(np.diff(times) >= 0) and compile_s > 0
  assert np.all(np.isfinite(gns))

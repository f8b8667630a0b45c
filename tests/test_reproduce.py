"""The ``reproduce`` command and the MLP regression experiment (tiny sizes)."""

import json

import numpy as np
import pytest

from teleport_jax.experiments import cli
from teleport_jax.experiments import common
from teleport_jax.experiments import regression


@pytest.fixture
def tiny_regression(monkeypatch):
  # one seed, 20 epochs and three methods keep the compile time down
  monkeypatch.setattr(regression, "_sizes", lambda config: (range(1), 20))
  monkeypatch.setattr(regression, "REPEATED_SCHEDULE", (5, 15))
  monkeypatch.setattr(regression, "METHODS", ("gd", "gd_teleport_repeated"))
  monkeypatch.setattr(regression, "COMPARISONS", ("gd_teleport_published",))
  monkeypatch.setattr(regression, "COMPILER_OPTIONS", {"xla_backend_optimization_level": 0})


def test_published_problem_matches_the_protocol():
  params, x, y = regression.make_problem(0)
  assert [w.shape for w in params] == [(6, 5), (7, 6), (8, 7)]
  assert x.shape == (5, 4) and y.shape == (8, 4)
  for a in params + [x, y]:
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0


def test_reproduce_writes_summary_plots_and_table(tiny_regression, tmp_path, capsys):
  assert cli.main(["--only", "mlp_regression", "--out", str(tmp_path), "--no-progress"]) == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["library"]["library_sha256"] and "xla_flags" in summary["machine"]
  section = summary["experiments"]["mlp_regression"]
  runs = section["runs"]
  for method in regression.METHODS + regression.COMPARISONS:
    entry = runs[method]
    assert len(entry["loss_mean"]) == 20 and len(entry["loss_std"]) == 20
    assert entry["n_seeds"] == 1 and entry["wall_time_s"] > 0
    assert set(entry["loss_at_epoch_per_seed"]) == {"19"}
  repeated = runs["gd_teleport_repeated"]
  assert repeated["max_rel_loss_drift"] <= common.RTOL_FLOAT32
  assert repeated["nonfinite_runs"] == 0
  # two attempts; the first moves, a later one may find nothing to improve
  (statuses,) = repeated["teleport_status"]
  assert len(statuses) == 2 and statuses[0] == "SUCCESSFUL"
  assert len(repeated["step_sharpness_after_teleports"][0]) == 2
  # the published first-order action changes the loss by far more than our tolerance
  assert runs["gd_teleport_published"]["max_rel_loss_drift"] > 1e-2
  # teleporting helps GD early on (the full run checks the 5x target at epoch 50)
  assert repeated["loss_mean"][19] < runs["gd"]["loss_mean"][19]
  assert section["targets"]["every_teleport_within_rtol"] and section["targets"]["no_nonfinite_run"]
  # every setting of every method is in the protocol
  settings = section["protocol"]["methods"]["gd_teleport_repeated"]
  assert settings["objective"] == "optimizer_lookahead(steps=5)"
  assert settings["rtol"] == common.RTOL_FLOAT32 and settings["stability"].startswith("on")
  assert section["protocol"]["methods"]["gd_teleport_published"]["rtol"].startswith("none")
  for name in ("mlp_loss_vs_epoch.png", "mlp_loss_vs_time.png", "mlp_grad_norm_vs_loss.png"):
    assert (tmp_path / name).stat().st_size > 1000
  out = capsys.readouterr().out
  assert "== mlp_regression" in out and "protocol:" in out and "optimizer_lookahead" in out
  assert "summary.json" in out


class _FakeExperiment:
  """A module-like experiment that records what the CLI had printed when it ran."""

  def __init__(self, name, capsys, seen):
    self.name, self.capsys, self.seen = name, capsys, seen

  def num_units(self, config):
    return 1

  def run(self, config, progress):
    self.seen[self.name] = self.capsys.readouterr().out
    progress.update(1)
    return dict(
      protocol=dict(lr=0.1, method=dict(objective="x", num_steps=3)),
      table=[dict(method=self.name, loss=1.0)],
      notes=[f"{self.name} note"],
      targets=dict(ok=True),
    )


def test_reproduce_prints_each_experiment_when_it_finishes(tmp_path, capsys, monkeypatch):
  seen = {}
  fakes = {n: _FakeExperiment(n, capsys, seen) for n in ("first", "second")}
  monkeypatch.setattr(cli, "EXPERIMENTS", {n: n for n in fakes})
  monkeypatch.setattr(cli.importlib, "import_module", lambda name: fakes[name.rsplit(".", 1)[1]])
  assert cli.main(["--out", str(tmp_path), "--no-progress"]) == 0
  # when the second experiment started, the first one's results were already printed
  assert "first note" in seen["second"] and "== first" in seen["second"]
  assert "method=x" not in seen["second"] and "method: objective=x; num_steps=3" in seen["second"]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert list(summary["experiments"]) == ["first", "second"]


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

"""The generalization experiment, at a tiny size."""

import json
import math

import pytest

from teleport_jax.experiments import cli
from teleport_jax.experiments import common
from teleport_jax.experiments import generalization as gen

TINY = gen.Settings(
  hidden=8,
  epochs=4,
  teleport_epoch=2,
  batch_size=50,
  seeds=(0, 1),
  measure_size=100,
  num_samples=4,
  num_directions=2,
  num_steps=4,
  corr_seeds=(0, 1),
  corr_learning_rates=(0.05, 0.2),
  corr_batch_sizes=(50,),
  corr_epochs=2,
  orbit_points=2,
  max_train=300,
  max_val=200,
)
# one teleport per objective kind, in opposite directions
TINY_TELEPORTS = (("sharpness_up", "sharpness", True), ("curvature_down", "curvature", False))


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
  out = tmp_path_factory.mktemp("gen")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(gen, "TELEPORTS", TINY_TELEPORTS)
    mp.setattr(gen, "default_settings", lambda config: TINY)
    assert cli.main(["--only", "generalization", "--out", str(out), "--no-progress"]) == 0
  return json.loads((out / "summary.json").read_text())["experiments"]["generalization"], out


def _finite(x) -> bool:
  return x is not None and math.isfinite(x)


@pytest.mark.slow
def test_summary_has_the_contract_and_finite_values(summary):
  s, out = summary
  for key in ("dataset", "protocol", "runs", "table", "correlation_table", "orbit_spread_table"):
    assert key in s, key
  assert set(s["runs"]) == {"sgd", "sharpness_up", "curvature_down"}
  for m, r in s["runs"].items():
    assert len(r["val_loss"]) == len(r["val_accuracy"]) == TINY.epochs + 1
    assert all(_finite(v) for v in r["val_loss"] + r["val_loss_std"] + r["val_accuracy"]), m
    assert len(r["final_val_loss_per_seed"]) == len(TINY.seeds) and r["nonfinite_runs"] == 0
  for row in s["table"]:
    assert _finite(row["val_loss_end"]) and _finite(row["val_acc_end"])
  assert len(s["minima"]) == 4  # 2 seeds x 2 learning rates x 1 batch size
  assert {(r["measure"], r["target"]) for r in s["correlation_table"]} == {
    (m, t) for m in gen.MEASURES for t in gen.CORRELATION_TARGETS
  }
  for row in s["correlation_table"]:
    assert row["n"] == 4 and _finite(row["pearson_r"]) and _finite(row["spearman_rho"])
  assert (out / "generalization_teleport.png").stat().st_size > 1000
  assert (out / "generalization_correlation.png").stat().st_size > 1000
  assert len(s["notes"]) >= 3
  teleport = s["protocol"]["teleport"]
  assert teleport["rtol"] == common.RTOL_FLOAT32 and teleport["stability"] == "off"


@pytest.mark.slow
def test_teleports_move_their_objective_and_keep_the_function(summary):
  s, _ = summary
  assert s["targets"]["teleports_moved_their_objective"]
  assert s["targets"]["every_teleport_accepted"]
  for name, kind, maximize in TINY_TELEPORTS:
    r = s["runs"][name]
    assert r["objective"] == kind and r["maximize"] == maximize
    for before, after in zip(r["objective_before"], r["objective_after"]):
      assert after > before if maximize else after < before
    assert r["max_rel_loss_drift"] <= common.RTOL_FLOAT32
    # rescaling keeps the network function: validation loss unchanged at the teleport
    assert (
      r["val_loss_change_at_teleport"] <= 1e-4 * s["runs"]["sgd"]["val_loss"][TINY.teleport_epoch]
    )


@pytest.mark.slow
def test_orbit_points_keep_validation_loss_and_relative_sharpness(summary):
  s, _ = summary
  rows = {r["measure"]: r for r in s["orbit_spread_table"]}
  assert rows["val_loss"]["within_orbit_max_over_min"] - 1 <= 1e-4
  assert rows["relative_sharpness"]["within_orbit_max_over_min"] - 1 <= 1e-3
  assert rows["sharpness"]["within_orbit_max_over_min"] > 1.01  # the absolute measure moves


def test_num_units_counts_seeds_and_correlation_runs(monkeypatch):
  monkeypatch.setattr(gen, "default_settings", lambda config: TINY)
  assert gen.num_units(common.RunConfig()) == 2 + 4

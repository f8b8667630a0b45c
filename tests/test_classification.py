"""The classification experiment, at a tiny size."""

import json
import math

import pytest
from test_data import fake_mnist

from teleport_jax.experiments import classification
from teleport_jax.experiments import common
from teleport_jax.experiments import data as data_lib

TINY = classification.Settings(
  hidden=16,
  epochs=3,
  batch_size=50,
  learning_rate=0.1,
  seeds=(0,),
  teleport_epochs=2,
  max_train=300,
  max_val=200,
)


@pytest.fixture(scope="module")
def digits_summary(tmp_path_factory):
  out = tmp_path_factory.mktemp("cls")
  config = common.RunConfig(quick=True, out_dir=out)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(classification, "LOOKAHEAD_STEPS", 1)  # compiles faster than 5
    mp.setattr(classification, "COMPILER_OPTIONS", {"xla_backend_optimization_level": 0})
    return classification.run(config, settings=TINY), out


@pytest.mark.slow
def test_summary_has_the_contract(digits_summary):
  summary, out = digits_summary
  assert summary["dataset"] == "sklearn_digits"
  assert summary["dataset_note"] in summary["notes"]
  assert set(summary["runs"]) == set(classification.METHODS)
  for m, r in summary["runs"].items():
    for key in (
      "train_loss",
      "val_loss",
      "train_loss_std",
      "val_loss_std",
      "val_accuracy",
      "wall_time_s",
      "n_seeds",
      "nonfinite_runs",
    ):
      assert key in r, (m, key)
    assert len(r["train_loss"]) == len(r["val_loss"]) == len(r["val_accuracy"]) == TINY.epochs + 1
    assert r["n_seeds"] == 1
  rows = {row["method"]: row for row in summary["table"]}
  assert set(rows) == set(classification.METHODS)
  for row in rows.values():
    for key in ("train_loss", "val_loss", "best_val_loss", "best_val_epoch", "val_acc", "wall_s"):
      assert key in row
  assert (out / "classification_loss.png").stat().st_size > 1000
  json.dumps(summary)  # serialisable as it is


@pytest.mark.slow
def test_losses_finite_and_teleports_exact(digits_summary):
  summary, _ = digits_summary
  for m, r in summary["runs"].items():
    assert r["nonfinite_runs"] == 0, m
    assert all(v is not None and math.isfinite(v) for v in r["train_loss"] + r["val_loss"])
    # training reduces the loss from the initial point
    assert r["train_loss"][-1] < r["train_loss"][0]
    if m == "sgd":
      assert "max_rel_loss_drift" not in r
      continue
    assert r["max_rel_loss_drift"] is not None
    assert 0.0 <= r["max_rel_loss_drift"] <= common.RTOL_FLOAT32, m
    assert r["num_teleports"][0] + r["num_rejected"][0] == TINY.teleport_epochs, m
    statuses = r["teleport_status"][0]
    assert statuses[0] == "SUCCESSFUL", (m, statuses)
    assert r["num_teleports"] == [statuses.count("SUCCESSFUL")]
    # the paper's objective increases the gradient norm at every teleport that moved
    if m == "sgd_teleport":
      moved = [
        g for g, st in zip(r["grad_norm_sq_ratio_per_teleport"][0], statuses) if st == "SUCCESSFUL"
      ]
      assert all(g > 1.0 for g in moved)
  assert summary["targets"] == {"every_teleport_within_rtol": True, "no_nonfinite_run": True}
  # the protocol names every setting of each method
  methods = summary["protocol"]["methods"]
  assert methods["sgd_teleport"]["stability"] == "off"
  assert methods["sgd_teleport_lookahead"]["stability"].startswith("on")
  assert methods["sgd_teleport_lookahead"]["objective"] == "optimizer_lookahead(steps=1)"
  assert methods["sgd_teleport"]["rtol"] == common.RTOL_FLOAT32
  per_seed = summary["runs"]["sgd"]["per_seed"]
  assert len(per_seed["best_val_epoch"]) == 1 and 0 <= per_seed["best_val_epoch"][0] <= TINY.epochs


def test_mnist_directory_selects_mnist_sizes(tmp_path):
  fake_mnist(tmp_path, gz=True, n_train=60, n_val=30, side=8)
  quick = common.RunConfig(quick=True, data_dir=tmp_path)
  full = common.RunConfig(quick=False, data_dir=tmp_path)
  n_methods = len(classification.METHODS)
  q = classification.default_settings(quick, "mnist")
  assert classification.num_units(quick) == n_methods * len(q.seeds)
  assert classification.num_units(full) == n_methods * 3
  # the run reads exactly what the loader gives for these sizes
  ds = data_lib.load_classification_data(tmp_path, max_train=q.max_train, max_val=q.max_val)
  assert ds.name == "mnist" and ds.x_train.shape == (60, 64) and ds.num_classes == 10


def test_num_units_and_default_sizes():
  quick = common.RunConfig(quick=True)
  full = common.RunConfig(quick=False)
  n_methods = len(classification.METHODS)
  assert classification.num_units(quick) == n_methods * 2
  assert classification.num_units(full) == n_methods * 3
  for name in ("mnist", "sklearn_digits"):
    q = classification.default_settings(quick, name)
    f = classification.default_settings(full, name)
    assert q.epochs < f.epochs and len(q.seeds) <= len(f.seeds)

"""The optimizer experiment (every common optimizer, with and without teleport), tiny sizes."""

import json
import math

import pytest

from teleport_jax.experiments import cli
from teleport_jax.experiments import common
from teleport_jax.experiments import optimizers


@pytest.fixture
def tiny(monkeypatch):
  # one seed, a few epochs, one optimizer and one policy keep the compile time down
  monkeypatch.setattr(
    optimizers, "_sizes", lambda config: dict(regression=(range(1), 8), classification=((0,), 2))
  )
  monkeypatch.setattr(optimizers, "OPTIMIZERS", ("adam",))
  monkeypatch.setattr(optimizers, "STATEFUL", ("adam",))
  monkeypatch.setattr(optimizers, "POLICIES", ("transport",))


@pytest.mark.slow
def test_optimizer_experiment_writes_summary_tables_and_plots(tiny, tmp_path, capsys):
  assert cli.main(["--only", "optimizers", "--out", str(tmp_path), "--no-progress"]) == 0
  section = json.loads((tmp_path / "summary.json").read_text())["experiments"]["optimizers"]
  assert set(section["problems"]) == {"regression", "classification"}
  expected = {"adam", "adam_teleport_transport"}
  for problem, epochs in (("regression", 8), ("classification", 3)):
    runs = section["problems"][problem]["runs"]
    assert set(runs) == expected
    for key, entry in runs.items():
      assert len(entry["loss_mean"]) == epochs
      assert all(v is not None and math.isfinite(v) for v in entry["loss_mean"]), key
      assert math.isfinite(entry["final_loss_mean"]) and entry["nonfinite_runs"] == 0
      if entry["variant"] != "none":
        # Adam's teleports move (its sqrt(nu) has a finite derivative: eps_root)
        assert entry["num_teleports"][0] >= 1, (problem, entry)
        assert entry["max_rel_loss_drift"] <= common.RTOL_FLOAT32
    assert (tmp_path / f"optimizers_{problem}.png").stat().st_size > 1000
  assert len(section["table"]) == 2 * len(expected)
  rows = section["policy_table"]
  assert [r["optimizer"] for r in rows] == ["adam", "adam"]
  assert all(r["best policy"] in optimizers.POLICIES for r in rows)
  assert all(section["targets"].values()), section["targets"]
  protocol = section["protocol"]
  assert protocol["regression"]["teleport"]["objective"] == "optimizer_lookahead(steps=5)"
  assert protocol["regression"]["teleport"]["stability"] == "off"
  assert protocol["classification"]["teleport"]["stability"].startswith("on")
  out = capsys.readouterr().out
  assert "== optimizers" in out and "lowest mean" in out


def test_variants_cover_every_policy_for_stateful_optimizers():
  pairs = optimizers.variants()
  for name in optimizers.OPTIMIZERS:
    assert (name, "none") in pairs
  for name in optimizers.STATEFUL:
    assert {p for n, p in pairs if n == name} == {"none", *optimizers.POLICIES}
  with pytest.raises(ValueError, match="optimizer"):
    optimizers.make_base("lbfgs", 0.1)

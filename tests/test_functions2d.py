"""GD with and without teleport on Booth and Rosenbrock (tiny run)."""

import numpy as np
import pytest

from teleport_jax.experiments import common
from teleport_jax.experiments import functions2d


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("functions2d")
  return functions2d.run(common.RunConfig(quick=True, out_dir=out)), out


@pytest.mark.slow
def test_keys_and_plots(quick):
  section, out = quick
  assert {"table", "notes", "targets", "runs", "protocol"} <= set(section)
  for name in ("booth_trajectories", "rosenbrock_trajectories", "booth_loss", "rosenbrock_loss"):
    assert (out / f"{name}.png").stat().st_size > 0
  methods = {(r["function"], r["method"]) for r in section["table"]}
  assert ("booth", "gd") in methods and ("rosenbrock", "gd+teleport(lookahead)/k") in methods


@pytest.mark.slow
def test_teleports_keep_the_loss(quick):
  section, _ = quick
  for fn in section["runs"].values():
    for name, entry in fn.items():
      if "teleport" in name:
        assert entry["num_teleports_total"] > 0
        assert entry["max_rel_drift"] is not None and entry["max_rel_drift"] <= 1e-8


@pytest.mark.slow
def test_booth_teleport_needs_fewer_iterations(quick):
  section, _ = quick
  gd = section["runs"]["booth"]["gd"]["iters_to_tol"]
  tp = section["runs"]["booth"]["gd+teleport(max_grad_norm)"]["iters_to_tol"]
  assert None not in gd and None not in tp
  assert all(t <= g / 4 for t, g in zip(tp, gd)), (gd, tp)
  assert section["runs"]["booth"]["gd+teleport(max_grad_norm)"]["nonfinite_runs"] == 0


@pytest.mark.slow
def test_rosenbrock_lookahead_teleport_is_finite_and_faster(quick):
  section, _ = quick
  gd = section["runs"]["rosenbrock"]["gd"]["iters_to_tol"]
  la = section["runs"]["rosenbrock"]["gd+teleport(lookahead)/k"]
  assert la["nonfinite_runs"] == 0
  assert None not in la["iters_to_tol"]
  assert all(t < g for t, g in zip(la["iters_to_tol"], gd)), (gd, la["iters_to_tol"])


def test_booth_teleport_aligns_gradient_with_top_eigenvector():
  r = functions2d.run_one(functions2d.BOOTH, functions2d.METHODS["booth"][1], (8.0, -6.0))
  assert r["accepted"][0] and not r["accepted"][1:].any()
  m = np.array([[1.0, 2.0], [2.0, 1.0]])
  hessian = 2 * m.T @ m
  wt = r["wt"][0]
  g = hessian @ wt - 2 * m.T @ np.array([7.0, 5.0])
  top = np.linalg.eigh(hessian)[1][:, -1]
  assert abs(g @ top) / np.linalg.norm(g) > 0.999
  np.testing.assert_allclose(functions2d.BOOTH.fn(wt), functions2d.BOOTH.fn(r["w"][0]), rtol=1e-12)

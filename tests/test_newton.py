"""The seed's convergence claim on quadratics: teleport + GD step = Newton step."""

import numpy as np
import pytest

from teleport_jax.experiments import common
from teleport_jax.experiments import newton

N = 5  # the quick run's dimension: the teleport compiles once for both tests


@pytest.mark.parametrize("seed", [0, 1])
def test_teleported_gradient_is_top_eigenvector_and_newton_direction(seed):
  r = newton.check(N, seed)
  assert r["accepted"]
  assert r["rel_loss_drift"] < 1e-10
  # the gradient is not aligned at the start, and is after the teleport
  assert r["cos_eig_before"] < 0.999 or r["cos_newton_before"] < 0.999
  assert r["cos_eig_after"] > 0.999
  assert r["cos_newton_after"] > 0.999
  # |grad|^2 reaches its maximum 2 L0 lambda_max on the level set
  np.testing.assert_allclose(r["grad_ratio_after"], 1.0, rtol=1e-6)
  assert r["grad_ratio_before"] < 1.0
  # teleport + one GD step of 1/lambda_max reaches the minimum, like Newton;
  # the same GD step from the start does not
  assert r["teleport_gd_step"] < 1e-10
  assert r["newton_step"] < 1e-10
  assert r["gd_step"] > 1e-3
  assert r["teleport_gd_vs_newton"] < 1e-4


def test_teleported_point_by_hand():
  h, c, w = newton.make_quadratic(N, 2)
  wt, info = newton.teleport_max_grad_norm(h, c, w)
  assert bool(info.accepted)
  g = h @ (wt - c)
  lam_max = np.linalg.eigvalsh(h)[-1]
  # H g = lambda_max g: the gradient is an eigenvector for the largest eigenvalue
  np.testing.assert_allclose(h @ g, lam_max * g, atol=1e-6 * lam_max * np.linalg.norm(g))
  # the GD step of size 1/lambda_max lands on the minimiser
  np.testing.assert_allclose(wt - g / lam_max, c, atol=1e-6 * np.linalg.norm(w - c))


def test_quick_run(tmp_path):
  config = common.RunConfig(quick=True, out_dir=tmp_path)
  section = newton.run(config)
  assert {"table", "notes", "targets", "protocol", "per_problem"} <= set(section)
  assert len(section["per_problem"]) == newton.num_units(config)
  assert all(section["targets"].values()), section["targets"]
  row = section["table"][0]
  for key in ("n", "cos_eig_after_min", "cos_newton_after_min", "max_rel_drift", "L/L0_gd"):
    assert key in row
  assert row["cos_eig_after_min"] > 0.999
  assert (tmp_path / "newton_check.png").stat().st_size > 0

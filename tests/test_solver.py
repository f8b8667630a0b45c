"""The teleport solver: direction, rejection, jit/vmap, objectives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mlp_apply
from conftest import random_mlp

import teleport_jax as tj
from teleport_jax.experiments import regression

ACT = tj.activations.leaky_relu(0.1)


def published_problem(seed, dtype=jnp.float32):
  """The published regression problem as ``(params, (x, y))``."""
  params, x, y = regression.make_problem(seed, dtype=dtype)
  return params, (x, y)


def loss(params, data):
  x, y = data
  return 0.5 * jnp.sum((y - mlp_apply(params, x, ACT, "out_in")) ** 2)


SYMS = {
  "data_gl": tj.DataDependentGL(activation=ACT),
  "rescale": tj.PositiveRescaling(),
}


@pytest.mark.parametrize("sym_name", sorted(SYMS))
def test_max_objective_raises_gradient_norm_and_keeps_loss(sym_name, dtype):
  params, data = published_problem(0, dtype)
  new, info = tj.teleport(
    loss, params, data, symmetry=SYMS[sym_name], num_steps=5, objective="max_grad_norm"
  )
  assert bool(info.accepted) and int(info.status) == tj.TeleportStatus.SUCCESSFUL
  assert float(info.grad_norm_sq_after) > 1.5 * float(info.grad_norm_sq_before)
  assert float(info.rel_loss_drift) <= tj.default_rtol(dtype)
  assert abs(float(loss(new, data) - loss(params, data))) <= tj.default_rtol(dtype) * float(
    loss(params, data)
  )
  gn = lambda p: sum(jnp.sum(g**2) for g in jax.grad(loss)(p, data))
  np.testing.assert_allclose(gn(new), info.grad_norm_sq_after, rtol=1e-3)
  for a, b in zip(new, params):
    assert a.dtype == b.dtype and a.shape == b.shape


@pytest.mark.parametrize("sym_name", sorted(SYMS))
def test_min_objective_lowers_gradient_norm(sym_name):
  params, data = published_problem(1)
  _, info = tj.teleport(
    loss, params, data, symmetry=SYMS[sym_name], objective="min_grad_norm", num_steps=5
  )
  assert bool(info.accepted)
  assert float(info.grad_norm_sq_after) < 0.99 * float(info.grad_norm_sq_before)


def test_forced_bad_step_is_rejected_and_returns_the_input_bit_for_bit():
  # GL between layers is not a symmetry of a nonlinear network: with the symmetry
  # check and the safeguard off, the steps are taken and the final guard rejects them.
  params = random_mlp(jax.random.key(2), (5, 6, 7, 8), jnp.float32)
  data = (
    jax.random.normal(jax.random.key(3), (5, 4)),
    jax.random.normal(jax.random.key(4), (8, 4)),
  )
  new, info = tj.teleport(
    loss, params, data, symmetry=tj.LinearGL(), num_steps=3, safeguard=False, check=False
  )
  assert not bool(info.accepted)
  assert int(info.status) == tj.TeleportStatus.LOSS_DRIFT
  assert float(info.rel_loss_drift) > 1e-4
  assert "rejected" in tj.status_message(info.status)
  for a, b in zip(new, params):
    np.testing.assert_array_equal(a, b)
  assert float(info.loss_after) == float(info.loss_before)


def test_nonfinite_input_under_jit_is_rejected_not_raised():
  params, data = published_problem(3)
  bad = [params[0].at[0, 0].set(jnp.nan)] + params[1:]
  f = jax.jit(lambda p, d: tj.teleport(loss, p, d, symmetry=SYMS["data_gl"], num_steps=2))
  new, info = f(bad, data)
  assert not bool(info.accepted)
  assert int(info.status) == tj.TeleportStatus.NONFINITE_INPUT
  assert bool(jnp.isnan(new[0][0, 0]))  # the input itself, returned untouched


def test_inner_steps_to_nonfinite_points_are_refused():
  params, data = published_problem(4)

  def objective(loss_fn, p, d):  # becomes NaN away from the start point
    moved = jnp.sum(p[0]) - jnp.sum(params[0])
    return jnp.where(jnp.abs(moved) > 0, jnp.nan, 0.0) + moved

  new, info = tj.teleport(
    loss,
    params,
    data,
    symmetry=tj.PositiveRescaling(),
    objective=objective,
    num_steps=2,
    safeguard=False,
  )
  assert int(info.num_accepted_steps) == 0
  for a, b in zip(new, params):
    np.testing.assert_array_equal(a, b)
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in new)


def test_jit_matches_eager_and_vmap_over_seeds():
  sym = SYMS["data_gl"]
  f = lambda p, d: tj.teleport(loss, p, d, symmetry=sym, num_steps=3)
  params, data = published_problem(0)
  eager_p, eager_i = f(params, data)
  jit_f = jax.jit(f)
  jit_p, jit_i = jit_f(params, data)
  for a, b in zip(eager_p, jit_p):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  batch = [published_problem(s) for s in range(2)]
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *batch)
  vp, vi = jax.jit(jax.vmap(f))(*stacked)
  assert vi.accepted.shape == (2,) and bool(jnp.all(vi.accepted))
  for s in range(2):
    _, si = jit_f(*batch[s])
    np.testing.assert_allclose(vi.grad_norm_sq_after[s], si.grad_norm_sq_after, rtol=1e-3)


def test_custom_objective_hook_is_maximised():
  params, data = published_problem(5)
  # maximise the first layer's norm, a user-defined objective
  hook = lambda loss_fn, p, d: jnp.sum(p[0] ** 2)
  new, info = tj.teleport(
    loss, params, data, symmetry=tj.PositiveRescaling(), objective=hook, num_steps=4
  )
  assert bool(info.accepted)
  assert float(jnp.sum(new[0] ** 2)) > float(jnp.sum(params[0] ** 2))
  minimised = tj.objectives.Objective(
    lambda lf, p, d: jnp.sum(p[0] ** 2), maximize=False, name="l0"
  )
  new, _ = tj.teleport(
    loss, params, data, symmetry=tj.PositiveRescaling(), objective=minimised, num_steps=4
  )
  assert float(jnp.sum(new[0] ** 2)) < float(jnp.sum(params[0] ** 2))


def test_lookahead_objective_lowers_loss_after_a_step():
  params, data = published_problem(6)
  lr = 1e-4
  obj = tj.objectives.lookahead_loss(lr, num_steps=2)
  new, info = tj.teleport(loss, params, data, symmetry=SYMS["data_gl"], objective=obj, num_steps=6)
  assert bool(info.accepted)

  def after(p):
    for _ in range(2):
      p = jax.tree_util.tree_map(lambda w, g: w - lr * g, p, jax.grad(loss)(p, data))
    return loss(p, data)

  assert float(after(new)) < float(after(params))
  assert float(info.objective_after) < float(info.objective_before)


def test_plain_unnormalised_steps_without_safeguard_run():
  params, data = published_problem(7)
  _, info = tj.teleport(
    loss,
    params,
    data,
    symmetry=tj.PositiveRescaling(),
    solver="lie",
    normalize=False,
    safeguard=False,
    step_size=1e-9,
    num_steps=3,
  )
  assert bool(info.accepted) and int(info.num_accepted_steps) == 3


def test_zero_steps_report_nothing_moved_and_return_the_same_params():
  params, data = published_problem(8)
  new, info = tj.teleport(loss, params, data, symmetry=SYMS["data_gl"], num_steps=0)
  assert not bool(info.accepted)
  assert int(info.status) == tj.TeleportStatus.NO_IMPROVEMENT
  assert tj.TeleportStatus(int(info.status)).nothing_moved
  for a, b in zip(new, params):
    np.testing.assert_array_equal(a, b)


def test_rotation_teleport_on_quadratic_finds_max_gradient_norm_point():
  n = 4
  evals = jnp.asarray([1.0, 2.0, 3.0, 5.0], jnp.float64)
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (n, n), jnp.float64))
  h = (q * evals) @ q.T
  c = jnp.zeros(n, jnp.float64)
  f = lambda w: 0.5 * w @ h @ w
  w0 = jax.random.normal(jax.random.key(1), (n,), jnp.float64)
  sym = tj.symmetries.QuadraticRotation(hessian=h, center=c)
  new, info = tj.teleport(
    f, w0, symmetry=sym, num_steps=200, step_size=0.1, objective="max_grad_norm"
  )
  assert bool(info.accepted)
  g = h @ new
  # at the max-gradient-norm point of a level set the gradient is an eigenvector of H
  cos = jnp.abs(g @ q[:, -1]) / jnp.linalg.norm(g)
  assert float(cos) > 0.999
  np.testing.assert_allclose(info.grad_norm_sq_after, 2 * f(w0) * evals[-1], rtol=1e-4)


def test_teleport_helps_gradient_descent_on_published_problem():
  params, data = published_problem(0)
  lr = 1e-4

  def gd(p, steps):
    def body(p, _):
      return jax.tree_util.tree_map(lambda w, g: w - lr * g, p, jax.grad(loss)(p, data)), None

    return jax.lax.scan(body, p, None, length=steps)[0]

  plain = loss(jax.jit(gd, static_argnums=1)(params, 50), data)
  tele, info = tj.teleport(
    loss,
    params,
    data,
    symmetry=SYMS["data_gl"],
    num_steps=8,
    objective=tj.objectives.lookahead_loss(lr, 1),
  )
  assert bool(info.accepted)
  teleported = loss(jax.jit(gd, static_argnums=1)(tele, 50), data)
  assert float(teleported) < float(plain)


def test_bias_and_linen_layout_teleport():
  widths = (4, 6, 6, 2)
  params = random_mlp(jax.random.key(0), widths, jnp.float32, fmt="linen", bias=True)
  x = jax.random.normal(jax.random.key(1), (5, 4))
  y = jax.random.normal(jax.random.key(2), (5, 2))
  lf = lambda p, d: jnp.mean((d[1] - mlp_apply(p, d[0], ACT, "linen")) ** 2)
  new, info = tj.teleport(
    lf, params, (x, y), symmetry=tj.DataDependentGL(activation=ACT), num_steps=4
  )
  assert bool(info.accepted) and float(info.grad_norm_sq_after) > float(info.grad_norm_sq_before)

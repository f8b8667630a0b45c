"""Teleports that keep the optimizer's next steps stable (stability_constrained)."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import teleport_jax as tj
from teleport_jax.experiments import common
from teleport_jax.experiments import regression

LR = regression.GD_LR


def _data_loss(p, d):
  return regression.loss_fn(p, *d)


@functools.partial(jax.jit, static_argnums=0)
def _exact_eigenvalues(loss_fn, params, data):
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  flat = flat.astype(jnp.float64)
  hess = jax.hessian(lambda f: loss_fn(jax.tree_util.tree_map(jnp.asarray, unravel(f)), data))(flat)
  return jnp.linalg.eigvalsh(hess)


def _exact_max_abs_eigenvalue(loss_fn, params, data):
  """The largest ``|lambda|`` of the exact Hessian, in float64."""
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
  data = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), data)
  return float(jnp.max(jnp.abs(_exact_eigenvalues(loss_fn, params, data))))


def _problem(seed, dtype):
  params, x, y = regression.make_problem(seed, dtype=dtype)
  return params, (x, y)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_hessian_max_eigenvalue_matches_the_exact_spectrum(dtype):
  params, data = _problem(0, dtype)
  lam = tj.geometry.hessian_max_eigenvalue(_data_loss, params, data, num_iterations=100)
  assert lam.dtype == dtype
  exact = _exact_max_abs_eigenvalue(_data_loss, params, data)
  assert abs(float(lam)) == pytest.approx(exact, rel=1e-3)


def test_hessian_max_eigenvalue_of_a_quadratic_keeps_its_sign():
  loss = lambda w: 0.5 * (w[0] ** 2 - 4.0 * w[1] ** 2)  # noqa: E731
  assert float(
    tj.geometry.hessian_max_eigenvalue(loss, jnp.ones(2), num_iterations=60)
  ) == pytest.approx(-4.0, rel=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_hessian_max_eigenvalue_rejects_bad_num_iterations(bad):
  with pytest.raises(ValueError, match="num_iterations"):
    tj.geometry.hessian_max_eigenvalue(lambda w: jnp.sum(w**2), jnp.ones(2), num_iterations=bad)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(learning_rate=1e-4, threshold=0.0), "threshold"),
    (dict(learning_rate=1e-4, num_iterations=0), "num_iterations"),
  ],
)
def test_stability_constrained_rejects_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    tj.objectives.stability_constrained("max_grad_norm", **kwargs)


@pytest.mark.parametrize("maximize", [True, False])
def test_stability_constrained_keeps_direction_and_is_worst_above_the_bound(maximize):
  params, data = _problem(0, jnp.float64)
  inner = tj.objectives.grad_norm_sq(maximize)
  lam = _exact_max_abs_eigenvalue(_data_loss, params, data)
  below = tj.objectives.stability_constrained(inner, 1.0 / lam)  # lr * lam = 1 <= 2
  above = tj.objectives.stability_constrained(inner, 3.0 / lam)  # lr * lam = 3 > 2
  assert below.maximize == above.maximize == maximize
  value, loss = inner.fn(_data_loss, params, data)
  v_below, l_below = below.fn(_data_loss, params, data)
  v_above, l_above = above.fn(_data_loss, params, data)
  assert float(v_below) == pytest.approx(float(value))
  assert float(v_above) == (-np.inf if maximize else np.inf)
  assert float(l_below) == float(l_above) == pytest.approx(float(loss))


def test_constrained_lookahead_teleport_lowers_the_lookahead_loss():
  params, data = _problem(0, jnp.float32)
  objective = tj.objectives.stability_constrained(tj.objectives.lookahead_loss(LR, 5), LR)
  new, info = tj.teleport(
    _data_loss, params, data, symmetry=regression.symmetry(), objective=objective, num_steps=10
  )
  assert bool(info.accepted) and int(info.num_accepted_steps) > 0
  assert float(info.objective_after) < float(info.objective_before)
  assert jax.tree_util.tree_all(
    jax.tree_util.tree_map(lambda a, b: a.dtype == b.dtype, new, params)
  )
  assert LR * _exact_max_abs_eigenvalue(_data_loss, new, data) <= 2.0 * 1.01


def test_max_grad_norm_teleport_never_leaves_the_bound(threshold=1.0):
  """Unconstrained, 10 steps of max |grad|^2 end far above the bound; constrained,
  the teleported point satisfies it (exact Hessian spectrum) and is still steeper."""
  params, data = _problem(0, jnp.float64)
  sym = regression.symmetry()
  assert LR * _exact_max_abs_eigenvalue(_data_loss, params, data) < threshold
  kw = dict(symmetry=sym, num_steps=10, step_size=0.1)
  free, _ = tj.teleport(_data_loss, params, data, objective="max_grad_norm", **kw)
  assert LR * _exact_max_abs_eigenvalue(_data_loss, free, data) > threshold
  objective = tj.objectives.stability_constrained(
    "max_grad_norm", LR, threshold=threshold, num_iterations=50
  )
  safe, info = tj.teleport(_data_loss, params, data, objective=objective, **kw)
  assert bool(info.accepted)
  assert float(info.grad_norm_sq_after) > float(info.grad_norm_sq_before)
  assert LR * _exact_max_abs_eigenvalue(_data_loss, safe, data) <= threshold * 1.01


def test_teleport_starting_above_the_bound_does_not_move():
  params, data = _problem(0, jnp.float32)
  params = [3.0 * w for w in params]  # a much sharper point of the same problem
  assert LR * _exact_max_abs_eigenvalue(_data_loss, params, data) > 2.0
  objective = tj.objectives.stability_constrained(tj.objectives.lookahead_loss(LR, 5), LR)
  new, info = tj.teleport(
    _data_loss, params, data, symmetry=regression.symmetry(), objective=objective, num_steps=10
  )
  assert int(info.num_accepted_steps) == 0 and not bool(info.accepted)
  assert int(info.status) == tj.TeleportStatus.UNSTABLE  # nothing moved, and why
  assert float(info.objective_before) == np.inf
  for a, b in zip(new, params):
    np.testing.assert_array_equal(a, b)


def _train(objective, seeds, epochs=60, period=20, num_steps=10):
  """GD on the float32 regression problem with a teleport every ``period`` epochs
  (plain GD for ``objective=None``); returns the losses, ``(len(seeds), epochs)``."""
  opt = optax.sgd(LR)
  if objective is not None:
    opt = tj.with_teleport(
      opt,
      regression.symmetry(),
      tj.every(period, start=regression.TELEPORT_EPOCH),
      objective=objective,
      num_steps=num_steps,
      step_size=0.1,
      stability=False,  # only the objective's own constraint, if any
    )
  step = common.make_train_step(opt, regression.loss_fn)
  finals = []
  for seed in seeds:
    params, x, y = regression.make_problem(seed, dtype=jnp.float32)
    state = opt.init(params)
    losses = []
    for _ in range(epochs):
      params, state, loss, _ = step(params, state, x, y)
      losses.append(float(loss))
    if objective is not None:
      assert int(state.num_teleports) + int(state.num_rejected) == len(
        range(regression.TELEPORT_EPOCH, epochs, period)
      )
    finals.append(np.asarray(losses))
  return np.stack(finals)


def test_repeated_max_grad_norm_schedule_diverges_without_and_stays_finite_with_the_constraint():
  seeds = (0, 1)
  free = _train("max_grad_norm", seeds)
  assert not np.all(np.isfinite(free))
  safe = _train(tj.objectives.stability_constrained("max_grad_norm", LR), seeds)
  assert np.all(np.isfinite(safe))


def test_repeated_constrained_lookahead_schedule_keeps_every_seed_finite_and_below_gd():
  seeds = (0, 1)
  losses = _train(
    tj.objectives.stability_constrained(tj.objectives.lookahead_loss(LR, 5), LR),
    seeds,
    num_steps=30,
  )
  assert np.all(np.isfinite(losses))
  gd = _train(None, seeds)
  assert np.all(losses[:, -1] < gd[:, -1])

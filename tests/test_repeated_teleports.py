"""Teleports in a user's own loop: told the optimizer, decided on the objective's scale, loud."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_solver import loss as published_loss
from test_solver import published_problem

import teleport_jax as tj
from teleport_jax._src.solver import solver as solver_lib

LEAKY = tj.activations.leaky_relu(0.1)
SYM = tj.DataDependentGL(activation=LEAKY)


def _sharpness(params, data, lr):
  return float(lr * jnp.abs(tj.geometry.hessian_max_eigenvalue(published_loss, params, data)))


@pytest.mark.parametrize("told", ["learning_rate", "optimizer"])
def test_a_teleport_told_the_optimizer_keeps_its_step_sharpness_bounded(told):
  params, data = published_problem(31)
  lr = 1e-4  # the seed's GD step
  if told == "learning_rate":
    kwargs = dict(learning_rate=lr)
  else:
    opt = optax.adagrad(0.1)
    kwargs = dict(optimizer=opt, opt_state=opt.init(params))
  new, info = tj.teleport(published_loss, params, data, symmetry=SYM, num_steps=4, **kwargs)
  before, after = float(info.step_sharpness_before), float(info.step_sharpness_after)
  assert np.isfinite(before) and np.isfinite(after)  # the bound was measured
  assert bool(info.accepted) and bool(info.stability_checked)
  assert after <= max(2.0, before) * (1 + 1e-3)
  if told == "learning_rate":  # gradient descent's step sharpness is lr * |lambda_max|
    np.testing.assert_allclose(before, _sharpness(params, data, lr), rtol=0.05)
    assert _sharpness(new, data, lr) <= max(2.0, before) * 1.05


def test_a_teleport_told_nothing_says_it_could_not_bound_the_next_steps():
  params, data = published_problem(32)
  new, info = tj.teleport(published_loss, params, data, symmetry=SYM, num_steps=4)
  assert bool(info.accepted) and not bool(info.stability_checked)
  assert np.isnan(float(info.step_sharpness_before))


def test_a_bound_without_an_optimizer_does_not_raise_the_curvature():
  params, data = published_problem(32)
  new, info = tj.teleport(
    published_loss, params, data, symmetry=SYM, num_steps=4, stability=True, throw=False
  )
  assert bool(info.stability_checked)
  before, after = float(info.step_sharpness_before), float(info.step_sharpness_after)
  assert np.isfinite(before) and np.isfinite(after)
  assert after <= before * (1 + 1e-3)
  assert _sharpness(new, data, 1.0) <= _sharpness(params, data, 1.0) * 1.05


def test_learning_rate_and_optimizer_are_exclusive_and_checked():
  params, data = published_problem(33)
  opt = optax.sgd(1e-2)
  with pytest.raises(ValueError, match="not both"):
    tj.teleport(
      published_loss,
      params,
      data,
      symmetry=SYM,
      learning_rate=1e-2,
      optimizer=opt,
      opt_state=opt.init(params),
    )
  with pytest.raises(ValueError, match="learning_rate"):
    tj.teleport(published_loss, params, data, symmetry=SYM, learning_rate=-1.0)


def test_repeated_calls_with_a_learning_rate_share_one_compiled_teleport():
  params, data = published_problem(34)
  tj.teleport(published_loss, params, data, symmetry=SYM, num_steps=1, learning_rate=1e-3)
  size = solver_lib._run_jit._cache_size()
  params2 = jax.tree.map(lambda w: w * 1.01, params)
  tj.teleport(published_loss, params2, data, symmetry=SYM, num_steps=1, learning_rate=1e-3)
  assert solver_lib._run_jit._cache_size() == size


def _relu_mlp_problem(seed, widths=(64, 128, 128, 16), batch=256):
  keys = jax.random.split(jax.random.key(seed), len(widths) + 1)
  params = [
    (
      jax.random.normal(keys[i], (widths[i], widths[i + 1]), jnp.float32) / np.sqrt(widths[i]),
      jnp.zeros((widths[i + 1],), jnp.float32),
    )
    for i in range(len(widths) - 1)
  ]
  x = jax.random.normal(keys[-2], (batch, widths[0]), jnp.float32)
  y = jax.random.normal(keys[-1], (batch, widths[-1]), jnp.float32)
  return params, x, y


def _relu_mlp_loss(params, x, y):
  h = x
  for w, b in params[:-1]:
    h = jax.nn.relu(h @ w + b)
  w, b = params[-1]
  return 0.5 * jnp.mean(jnp.sum((h @ w + b - y) ** 2, axis=-1))


def test_a_small_step_lookahead_in_float32_still_teleports_under_adam():
  # orbit points differ by far less than 1e-4 of the loss after two steps of
  # 1e-3: improvements count against the decrease the look-ahead predicts
  params, x, y = _relu_mlp_problem(0)
  opt = tj.with_teleport(
    optax.adam(1e-3),
    tj.PositiveRescaling(),
    tj.schedules.at_steps([3, 7, 11]),
    objective=tj.objectives.lookahead_loss(1e-3, 2),
  )
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss, g = jax.value_and_grad(_relu_mlp_loss)(params, x, y)
    u, state = opt.update(g, state, params, value=loss, value_fn=_relu_mlp_loss, x=x, y=y)
    return optax.apply_updates(params, u), state

  statuses = []
  for i in range(12):
    params, state = step(params, state)
    if i in (3, 7, 11):
      statuses.append(tj.TeleportStatus(int(state.info.status)))
      assert float(state.info.rel_loss_drift) <= tj.default_rtol(jnp.float32)
  assert int(state.num_teleports) >= 2, statuses
  assert all(np.all(np.isfinite(np.asarray(w))) for w in jax.tree.leaves(params))


def test_an_orbit_on_which_the_lookahead_is_constant_is_refused_not_decided_by_rounding():
  # GD on 1/2 |w|^2 commutes with rotations: every orbit point has the same
  # look-ahead loss, and the float32 values differ by rounding only
  w = jnp.asarray([0.3, -1.2, 0.7, 2.0], jnp.float32)
  sym = tj.symmetries.QuadraticRotation(
    hessian=jnp.eye(4, dtype=jnp.float32), center=jnp.zeros(4, jnp.float32)
  )
  loss = lambda w: 0.5 * jnp.sum(w**2)  # noqa: E731
  new, info = tj.teleport(
    loss, w, symmetry=sym, objective=tj.objectives.lookahead_loss(1e-3, 2), num_steps=8, throw=False
  )
  assert int(info.status) == tj.TeleportStatus.NO_IMPROVEMENT
  np.testing.assert_array_equal(np.asarray(new), np.asarray(w))


def _vf(p, x, y):
  return published_loss(p, (x, y))


@pytest.mark.parametrize("kind", ["chain", "named_chain"])
@pytest.mark.parametrize("position", ["first", "last"])
def test_with_teleport_next_to_other_links_is_refused_in_chain_and_named_chain(kind, position):
  params, (x, y) = published_problem(35)
  tele = tj.with_teleport(optax.sgd(1e-4), tj.PositiveRescaling(), 5)
  other = optax.clip_by_global_norm(1.0)
  links = [tele, other] if position == "first" else [other, tele]
  if kind == "chain":
    opt = optax.chain(*links)
  else:
    opt = optax.named_chain(*[(f"link{i}", t) for i, t in enumerate(links)])
  state = opt.init(params)
  with pytest.raises(tj.TeleportError, match=f"outermost.*|{kind}"):
    opt.update(jax.grad(_vf)(params, x, y), state, params, value_fn=_vf, x=x, y=y)


@pytest.mark.parametrize("warn", [True, False])
def test_a_group_that_is_never_a_symmetry_is_said_out_loud_once_when_asked(warn):
  params, (x, y) = published_problem(36)

  def tanh_loss(p, x, y):
    h = x
    for w in p[:-1]:
      h = jnp.tanh(w @ h)
    return 0.5 * jnp.sum((y - p[-1] @ h) ** 2)

  opt = tj.with_teleport(
    optax.sgd(1e-4), tj.PositiveRescaling(), tj.every(1), num_steps=2, warn=warn
  )
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    g = jax.grad(tanh_loss)(params, x, y)
    u, state = opt.update(g, state, params, value_fn=tanh_loss, x=x, y=y)
    return optax.apply_updates(params, u), state

  # a host callback in the program would cost every call JAX's fast dispatch path
  assert ("callback" in step.lower(params, state).as_text()) == warn
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("default")
    for _ in range(4):
      params, state = step(params, state)
    jax.effects_barrier()
  said = [w for w in caught if issubclass(w.category, tj.TeleportWarning)]
  assert len(said) == int(warn), [str(w.message) for w in caught]
  if warn:
    assert "NOT_A_SYMMETRY" in str(said[0].message)
  assert tj.TeleportStatus(int(state.info.status)).name == "NOT_A_SYMMETRY"
  assert int(state.num_rejected) == 3 and int(state.num_teleports) == 0

"""The one-step back-end: its gradient from gradients only, its guard, its defaults."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import teleport_jax as tj
from teleport_jax._src.objectives import objectives as obj_lib
from teleport_jax._src.objectives import stability as stab_lib
from teleport_jax._src.solver import backends
from teleport_jax._src.solver import solver as solver_lib

LEAKY = tj.activations.leaky_relu(0.1)
SYMS = {"data_gl": tj.DataDependentGL(activation=LEAKY), "rescale": tj.PositiveRescaling()}


def _problem(seed, dtype):
  """A 3-layer LeakyReLU MLP (widths 6-9-8-4, batch 7), not at a symmetric point."""
  k = jax.random.split(jax.random.key(seed), 5)
  params = [
    jax.random.normal(k[0], (9, 6), dtype) * 0.5,
    jax.random.normal(k[1], (8, 9), dtype) * 0.5,
    jax.random.normal(k[2], (4, 8), dtype) * 0.5,
  ]
  x = jax.random.normal(k[3], (6, 7), dtype)
  y = jax.random.normal(k[4], (4, 7), dtype)
  return params, (x, y)


def loss(params, data):
  x, y = data
  h = x
  for w in params[:-1]:
    h = LEAKY(w @ h)
  return 0.5 * jnp.mean((y - params[-1] @ h) ** 2)


def _optimizers(params):
  adam = optax.adam(1e-2)
  # a few steps so that Adam's moments are not those of a fresh state
  data = _problem(0, jnp.float64)[1]
  state = jax.jit(
    lambda p: jax.lax.fori_loop(
      0, 3, lambda _, s: adam.update(jax.grad(loss)(p, data), s, p)[1], adam.init(p)
    )
  )(params)
  return {
    "gd": (solver_lib.gradient_descent(0.05), None),
    "adam": (adam, state),
  }


def _bound_problem(params, data, sym_name, objective, context):
  cfg = tj.TeleportConfig(objective=objective)
  sym = solver_lib.bind_and_validate(loss, params, data, SYMS[sym_name], cfg)
  bound = obj_lib.bind(objective, loss, params, data, context)
  return sym, backends.Problem(
    loss_fn=loss,
    data=data,
    symmetry=sym,
    objective=bound,
    sign=-1.0,
    dtype=jnp.float64,
    params0=params,
    loss0=loss(params, data),
  )


@pytest.mark.parametrize("sym_name,opt_name", [("data_gl", "gd"), ("rescale", "adam")])
def test_the_objective_gradient_from_gradients_matches_automatic_differentiation(
  sym_name, opt_name
):
  params, data = _problem(1, jnp.float64)
  opt, state = _optimizers(params)[opt_name]
  state = opt.init(params) if state is None else state
  context = obj_lib.ObjectiveContext(opt, lambda p, g: state, {})
  objective = tj.objectives.optimizer_lookahead(1)
  _, problem = _bound_problem(params, data, sym_name, objective, context)
  grads = jax.grad(loss)(params, data)
  solver = tj.solvers.OneStep()

  @jax.jit
  def directions(params, grads):
    model = obj_lib.step_model(objective, loss, params, data, context, grads)
    by_differences = solver.direction(problem, params, grads, None, model)
    return by_differences, solver.direction(problem, params, grads, None, None)

  by_differences, by_autodiff = directions(params, grads)
  np.testing.assert_allclose(by_differences[0], by_autodiff[0], rtol=1e-12)
  a = ravel_pytree(by_differences[3])[0]
  b = ravel_pytree(by_autodiff[3])[0]
  assert float(jnp.linalg.norm(b)) > 0
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.linalg.norm(b)))


@pytest.mark.parametrize(
  "sym_name,dtype",
  [("data_gl", jnp.float32), ("rescale", jnp.float32), ("data_gl", jnp.float64)],
)
def test_a_one_step_teleport_keeps_the_loss_and_lowers_the_look_ahead(sym_name, dtype):
  params, data = _problem(2, dtype)
  lr = 0.05
  new, info = tj.teleport(loss, params, data, symmetry=SYMS[sym_name], learning_rate=lr)
  assert bool(info.accepted), tj.status_message(info)
  assert float(info.rel_loss_drift) <= tj.default_rtol(dtype)
  np.testing.assert_allclose(float(loss(new, data)), float(loss(params, data)), rtol=1e-5)
  np.testing.assert_allclose(float(info.loss_after), float(loss(new, data)), rtol=1e-6)
  look = tj.objectives.lookahead_loss(lr, 1)
  before = float(look.value(loss, params, data)[0])
  after = float(look.value(loss, new, data)[0])
  assert after < before
  np.testing.assert_allclose(after, float(info.objective_after), rtol=1e-5)
  assert 0 < int(info.num_accepted_steps) <= 4  # 2 rounds of 2 trials
  assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(new))


def test_the_gradient_returned_with_a_teleport_is_the_gradient_at_the_new_point():
  params, data = _problem(3, jnp.float64)
  config = tj.TeleportConfig()
  opt = solver_lib.gradient_descent(0.05)
  context = obj_lib.ObjectiveContext(opt, lambda p, g: opt.init(p), {})
  sym = solver_lib.bind_and_validate(loss, params, data, SYMS["data_gl"], config)
  run = jax.jit(lambda p: solver_lib.run(loss, p, data, sym, config, context, track_element=True))
  new, info, grads, g = run(params)
  assert bool(info.accepted)
  want = jax.grad(loss)(new, data)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
  moved = sym.act(params, g, data)
  for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(new)):
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_one_step_teleports_run_under_vmap_and_jit():
  params, data = _problem(4, jnp.float32)
  scales = jnp.asarray([0.5, 1.0, 2.0], jnp.float32)
  batched = jax.tree.map(lambda w: w * scales[:, None, None], params)

  @jax.jit
  def one(p):
    return tj.teleport(loss, p, data, symmetry=SYMS["rescale"], learning_rate=0.05)

  new, info = jax.vmap(one)(batched)
  assert info.accepted.shape == (3,)
  assert bool(jnp.all(info.rel_loss_drift <= tj.default_rtol(jnp.float32)))


@pytest.mark.parametrize("opt_name", ["gd", "adam"])
def test_the_stability_bound_by_differences_matches_forward_over_reverse(opt_name):
  params, data = _problem(5, jnp.float64)
  opt, state = _optimizers(params)[opt_name]
  state = opt.init(params) if state is None else state
  context = obj_lib.ObjectiveContext(opt, lambda p, g: state, {})
  f = lambda p: loss(p, data)  # noqa: E731
  exact = stab_lib.Stability(num_iterations=30).init(f, params, context, None)
  diff = stab_lib.Stability(num_iterations=30, differences=True).init(f, params, context, None)
  np.testing.assert_allclose(float(diff.sigma0), float(exact.sigma0), rtol=1e-4)


def test_the_largest_eigenvalue_by_differences_matches_the_exact_one():
  params, data = _problem(6, jnp.float64)
  exact = tj.geometry.hessian_max_eigenvalue(loss, params, data, num_iterations=40)
  diff = tj.geometry.hessian_max_eigenvalue(loss, params, data, num_iterations=40, differences=True)
  np.testing.assert_allclose(float(diff), float(exact), rtol=1e-5)


def test_the_default_back_end_follows_the_objective():
  assert isinstance(tj.TeleportConfig().solver, tj.solvers.OneStep)
  one = tj.TeleportConfig(objective=tj.objectives.optimizer_lookahead(1))
  assert isinstance(one.solver, tj.solvers.OneStep)
  for named in ("max_grad_norm", "lookahead", tj.objectives.optimizer_lookahead(5)):
    config = tj.TeleportConfig(objective=named)
    assert isinstance(config.solver, tj.solvers.Lie) and config.inner_steps == 10
  chosen = tj.TeleportConfig(objective="max_grad_norm", solver="onestep")
  assert isinstance(chosen.solver, tj.solvers.OneStep) and chosen.inner_steps == 2


def test_a_one_step_search_refuses_a_group_that_is_not_a_symmetry():
  params, data = _problem(7, jnp.float32)

  def tanh_loss(p, data):
    x, y = data
    h = x
    for w in p[:-1]:
      h = jnp.tanh(w @ h)
    return 0.5 * jnp.mean((y - p[-1] @ h) ** 2)

  new, info = tj.teleport(
    tanh_loss, params, data, symmetry=tj.PositiveRescaling(), learning_rate=0.05, throw=False
  )
  assert int(info.status) == tj.TeleportStatus.NOT_A_SYMMETRY
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(rounds=0), "rounds"),
    (dict(stability_iterations=(6,)), "stability_iterations"),
    (dict(step_size=-1.0), "step_size"),
  ],
)
def test_bad_one_step_settings_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tj.solvers.OneStep(**kwargs)


def test_a_shortcut_for_a_field_the_back_end_lacks_names_it():
  params, data = _problem(8, jnp.float32)
  with pytest.raises(ValueError, match="normalize.*OneStep"):
    tj.teleport(loss, params, data, symmetry=SYMS["rescale"], normalize=False)

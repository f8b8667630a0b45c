"""Cheap teleports: closed-form balancing and the one-direction line search."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mlp_apply
from conftest import random_mlp

import teleport_jax as tj

LEAKY = tj.activations.leaky_relu(0.1)


@functools.cache
def _problem(kind):
  x = jax.random.normal(jax.random.key(1), (5, 16), jnp.float64)
  y = jax.random.normal(jax.random.key(2), (3, 16), jnp.float64)
  if kind == "relu":
    params = random_mlp(jax.random.key(0), (5, 7, 6, 3), jnp.float64, fmt="pairs")
    loss = lambda p, d: 0.5 * jnp.mean((mlp_apply(p, d[0], LEAKY, "pairs") - d[1]) ** 2)  # noqa: E731
    return params, (x, y), loss, tj.PositiveRescaling()
  # hidden widths no larger than their neighbours: full-rank Gram matrices, so the
  # balanced point exists (with a rank-deficient one the infimum is not attained)
  params = random_mlp(jax.random.key(3), (5, 4, 4, 3), jnp.float64, fmt="out_in")
  loss = lambda p, d: (
    0.5 * jnp.mean((mlp_apply(p, d[0], tj.activations.identity(), "out_in") - d[1]) ** 2)
  )  # noqa: E731
  return params, (x, y), loss, tj.LinearGL()


def test_norm_balancing_equalises_incoming_and_outgoing_norms_per_channel():
  params, data, loss, sym = _problem("relu")
  new, info = tj.teleport(
    loss, params, data, symmetry=sym, solver=tj.solvers.Balance(), num_steps=20
  )
  assert int(info.status) == tj.TeleportStatus.SUCCESSFUL
  assert float(info.objective_after) < float(info.objective_before)
  assert float(info.rel_loss_drift) <= 1e-12
  (w0, b0), (w1, b1), (w2, _) = new
  for incoming, outgoing in (
    (jnp.sum(w0**2, 1) + b0**2, jnp.sum(w1**2, 0)),
    (jnp.sum(w1**2, 1) + b1**2, jnp.sum(w2**2, 0)),
  ):
    np.testing.assert_allclose(incoming / outgoing, 1.0, rtol=2e-2)


def test_gradient_balancing_reaches_the_closed_form_minimum_of_the_gradient_norm():
  params, data, loss, sym = _problem("relu")
  new, info = tj.teleport(
    loss, params, data, symmetry=sym, solver=tj.solvers.Balance(target="grad"), num_steps=20
  )
  assert int(info.status) == tj.TeleportStatus.SUCCESSFUL
  assert float(info.grad_norm_sq_after) < float(info.grad_norm_sq_before)
  (g0, gb0), (g1, _), _ = jax.grad(loss)(new, data)
  np.testing.assert_allclose((jnp.sum(g0**2, 1) + gb0**2) / jnp.sum(g1**2, 0), 1.0, rtol=2e-2)
  # a random rescaling of the balanced point has a larger gradient norm (it is the minimum)
  g = tuple(
    jnp.exp(0.3 * jax.random.normal(jax.random.key(k), z.shape))
    for k, z in enumerate(sym.algebra_zeros(new))
  )
  moved = tj.group_action(new, g, symmetry=sym)
  gn = lambda p: float(
    sum(jnp.sum(a**2) for a in jax.tree_util.tree_leaves(jax.grad(loss)(p, data)))
  )  # noqa: E731
  assert gn(moved) > gn(new)


@pytest.mark.parametrize("target", ["norm", "grad"])
def test_gl_balancing_by_matrix_geometric_mean_lowers_its_target(target):
  params, data, loss, sym = _problem("linear")
  balance = tj.solvers.Balance(target=target)
  new, info = tj.teleport(loss, params, data, symmetry=sym, solver=balance, num_steps=10)
  assert int(info.status) == tj.TeleportStatus.SUCCESSFUL
  assert float(info.objective_after) < 0.8 * float(info.objective_before)
  # one sweep on one site is the closed-form minimiser: a second sweep barely moves it
  # (gradient Gram matrices can be rank deficient, where the minimum is approached but
  # not attained, so "barely" rather than "not at all")
  single = tj.symmetries.Product(sym.as_product(params).parts[:1])
  once, first = tj.teleport(loss, params, data, symmetry=single, solver=balance, num_steps=1)
  _, again = tj.teleport(loss, once, data, symmetry=single, solver=balance, num_steps=1)
  assert float(first.objective_after) < float(first.objective_before)
  assert float(again.objective_after) >= (1 - 1e-4) * float(again.objective_before)


def test_bounded_balancing_moves_at_most_max_log_scale():
  params, data, loss, sym = _problem("relu")
  g = tj.solvers.Balance(max_log_scale=0.05).element(sym, params)
  assert max(float(jnp.max(jnp.abs(jnp.log(s)))) for s in g) <= 0.05 + 1e-12
  half = tj.solvers.Balance(power=0.5).element(sym, params)
  full = tj.solvers.Balance().element(sym, params)
  for h, f in zip(half, full):
    np.testing.assert_allclose(jnp.log(h), 0.5 * jnp.log(f), rtol=1e-10)


@pytest.mark.parametrize("target", ["norm", "grad"])
def test_bounded_gl_balancing_keeps_the_elements_eigenvalues_within_the_bound(target):
  params, data, loss, sym = _problem("linear")
  grads = jax.grad(loss)(params, data)
  free = [
    np.linalg.eigvalsh(np.asarray(a))
    for a in tj.solvers.Balance(target).element(sym, params, grads)
  ]
  assert max(float(np.max(np.abs(np.log(e)))) for e in free) > 0.1  # the bound binds
  bounded = tj.solvers.Balance(target, max_log_scale=0.1).element(sym, params, grads)
  for a in bounded:
    np.testing.assert_allclose(a, a.T, atol=1e-12)
    assert float(np.max(np.abs(np.log(np.linalg.eigvalsh(np.asarray(a)))))) <= 0.1 + 1e-9


def test_line_search_improves_the_objective_with_one_gradient():
  params, data, loss, sym = _problem("relu")
  new, info = tj.teleport(
    loss, params, data, symmetry=sym, solver="line_search", num_steps=8,
    objective=tj.objectives.lookahead_loss(0.5, 2),
  )  # fmt: skip
  assert int(info.status) == tj.TeleportStatus.SUCCESSFUL
  assert float(info.objective_after) < float(info.objective_before)
  assert float(info.stats["cost_objective_values"]) == 3.0 + 8


def test_balancing_refuses_a_group_without_sites():
  with pytest.raises(ValueError, match="balancing needs rescaling or GL sites"):
    tj.solvers.Balance().element(tj.problems.booth_symmetry(), jnp.ones(2))


@pytest.mark.parametrize("target", ["norm", pytest.param("grad", marks=pytest.mark.slow)])
def test_balancing_a_cnn_balances_the_channels_a_flatten_spreads_over_dense_rows(target):
  # the last convolution's channels are read by the dense layer through a flatten:
  # channel c owns rows c, c + C, ... of the dense kernel (a reshaped slot)
  from teleport_jax import models

  m = models.cnn(channels=(3, 4), dense=(6, 5), image=(8, 8, 1), batch=16, dtype=jnp.float64)
  x, y = models.example_batch(m)
  loss = lambda p, d: models.classification_loss(m)(p, d)  # noqa: E731
  sym = tj.find_symmetries(m.apply, m.params, x)
  assert any(s.reshape is not None for part in sym.parts for s in part.site.slots)
  new, info = tj.teleport(
    loss, m.params, (x, y), symmetry=sym, solver=tj.solvers.Balance(target=target), num_steps=3
  )
  assert int(info.status) == tj.TeleportStatus.SUCCESSFUL
  assert float(info.objective_after) < float(info.objective_before)
  assert float(info.rel_loss_drift) <= 1e-10
  np.testing.assert_allclose(m.apply(new, x), m.apply(m.params, x), rtol=1e-9, atol=1e-12)


# ------------------------------------------------- tj.balanced: every-step balancing


def _mlp_problem(seed, widths, dtype):
  params = random_mlp(jax.random.key(seed), widths, dtype, fmt="pairs", scale=1.5)
  x = jax.random.normal(jax.random.key(seed + 1), (widths[0], 9), dtype)
  y = jax.random.normal(jax.random.key(seed + 2), (widths[-1], 9), dtype)
  loss = lambda p: 0.5 * jnp.mean((mlp_apply(p, x, LEAKY, "pairs") - y) ** 2)  # noqa: E731
  return params, loss, x


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("seed,widths", [(0, (4, 6, 5, 2)), (7, (3, 8, 8, 8, 1))])
def test_norm_balancing_keeps_the_function_and_balances_every_hidden_neuron(seed, widths, dtype):
  import optax

  params, loss, x = _mlp_problem(seed, widths, dtype)
  opt = tj.balanced(optax.sgd(0.0), tj.PositiveRescaling())  # lr 0: the balancing alone
  step = jax.jit(opt.update)
  zeros = jax.tree.map(jnp.zeros_like, params)
  state, new, norms = opt.init(params), params, []
  for _ in range(30):  # one sweep per step: coupled neighbours converge over steps (ENorm)
    u, state = step(zeros, state, new)
    new = optax.apply_updates(new, u)
    norms.append(sum(float(jnp.sum(a.astype(jnp.float64) ** 2)) for a in jax.tree.leaves(new)))
  sq = sum(float(jnp.sum(a.astype(jnp.float64) ** 2)) for a in jax.tree.leaves(params))
  assert norms[0] < sq and norms[-1] <= norms[0] * (1 + 1e-6)
  rtol = tj.default_rtol(dtype) * 100
  np.testing.assert_allclose(
    mlp_apply(new, x, LEAKY, "pairs"), mlp_apply(params, x, LEAKY, "pairs"), rtol=rtol, atol=rtol
  )
  for (w, b), (w_next, _) in zip(new[:-1], new[1:]):
    np.testing.assert_allclose(jnp.sum(w**2, 1) + b**2, jnp.sum(w_next**2, 0), rtol=1e-2)
  assert int(state.num_balanced) == 30 and int(state.num_rejected) == 0
  assert all(a.dtype == dtype for a in jax.tree.leaves(u))


def test_gradient_balancing_steps_from_the_balanced_point_with_its_exact_gradient():
  import optax

  params, loss, _ = _mlp_problem(3, (4, 6, 5, 2), jnp.float64)
  lr = 0.05
  opt = tj.balanced(optax.sgd(lr), tj.PositiveRescaling(), "grad", max_log_scale=None)
  u, _ = opt.update(jax.grad(loss)(params), opt.init(params), params)
  # the balanced point: the same element the closed form gives at params
  g = tj.solvers.Balance(target="grad").element(
    tj.PositiveRescaling(), params, jax.grad(loss)(params)
  )
  w = tj.group_action(params, g, symmetry=tj.PositiveRescaling())
  expected = optax.apply_updates(w, jax.tree.map(lambda d: -lr * d, jax.grad(loss)(w)))
  got = optax.apply_updates(params, u)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  gn = lambda p: sum(float(jnp.sum(d**2)) for d in jax.tree.leaves(jax.grad(loss)(p)))  # noqa: E731
  assert gn(w) < gn(params)
  assert abs(float(loss(w)) - float(loss(params))) <= 1e-12 * float(loss(params))


def test_balancing_every_k_steps_balances_only_at_multiples_of_k_and_moves_adam_state():
  import optax

  params, loss, _ = _mlp_problem(5, (4, 6, 5, 2), jnp.float32)
  opt = tj.balanced(optax.adam(1e-2), tj.PositiveRescaling(), "norm", every=3)
  state = opt.init(params)
  step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p))
  seen = []
  for _ in range(7):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
    seen.append(int(state.num_balanced))
  assert seen == [1, 1, 1, 2, 2, 2, 3]
  assert all(np.isfinite(a).all() for a in jax.tree.leaves((params, state)))


def test_a_non_finite_balancing_is_refused_and_the_step_is_the_optimizers():
  import optax

  params, loss, _ = _mlp_problem(2, (4, 6, 5, 2), jnp.float32)
  grads = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), params)
  opt = tj.balanced(optax.sgd(0.1), tj.PositiveRescaling(), "grad")
  u, state = opt.update(grads, opt.init(params), params)
  plain, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params), params)
  assert int(state.num_rejected) == 1 and int(state.num_balanced) == 0
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))


def test_balanced_refuses_data_dependent_groups_and_wrong_types():
  import optax

  with pytest.raises(ValueError, match="data-free"):
    tj.balanced(optax.sgd(0.1), tj.DataDependentGL(activation=LEAKY))
  with pytest.raises(TypeError, match="optimizer"):
    tj.balanced("adam", tj.PositiveRescaling())
  with pytest.raises(TypeError, match="symmetry"):
    tj.balanced(optax.sgd(0.1), "rescaling")
  with pytest.raises(ValueError, match="every"):
    tj.balanced(optax.sgd(0.1), tj.PositiveRescaling(), every=0)
  with pytest.raises(ValueError, match="target"):
    tj.balanced(optax.sgd(0.1), tj.PositiveRescaling(), "weights")


def _lapack_operand_ranks(hlo: str) -> list[int]:
  """Ranks of the first operand of every LAPACK custom call in StableHLO text."""
  import re

  ranks = []
  for line in hlo.splitlines():
    if "custom_call @lapack_" in line:
      operand = re.search(r":\s*\(tensor<([^>]*)>", line).group(1)
      ranks.append(len(operand.split("x")) - 1)
  return ranks


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU runtime matter")
def test_balancing_a_transformer_calls_lapack_one_matrix_at_a_time_on_a_cpu():
  # jaxlib's batched CPU LAPACK kernels (before 0.11.1) wait on the thread pool they
  # run on: two at once deadlock a two-core machine. Every call must be unbatched.
  import optax

  from teleport_jax import models

  m = models.transformer(vocab=11, d_model=16, heads=2, layers=2, context=8, batch=2)
  sym = tj.find_symmetries(m.apply, m.params, m.inputs)
  loss = models.loss_for(m)
  data = models.example_batch(m)
  opt = tj.balanced(optax.adam(1e-3), sym, "norm")
  g = jax.grad(loss)(m.params, data)
  hlo = jax.jit(opt.update).lower(g, opt.init(m.params), m.params).as_text()
  ranks = _lapack_operand_ranks(hlo)
  assert ranks and set(ranks) == {2}
  tele = tj.with_teleport(optax.adam(1e-3), sym, 1, state_policy="transport")
  fn = functools.partial(tele.update, value_fn=lambda p, d: loss(p, d))
  hlo = jax.jit(fn).lower(g, tele.init(m.params), m.params, d=data).as_text()
  assert set(_lapack_operand_ranks(hlo)) <= {2}


def test_gradient_balancing_is_bounded_by_default_and_norm_balancing_is_not():
  import optax

  params, loss, _ = _mlp_problem(3, (4, 6, 5, 2), jnp.float64)
  sym, grads = tj.PositiveRescaling(), jax.grad(loss)(params)
  for target, bound in (("grad", 0.5), ("norm", None)):
    opt = tj.balanced(optax.sgd(0.0), sym, target)  # lr 0: the move alone
    u, _ = opt.update(grads, opt.init(params), params)
    g = tj.solvers.Balance(target, max_log_scale=bound).element(sym, params, grads)
    expected = tj.group_action(params, g, symmetry=sym)
    for a, b in zip(jax.tree.leaves(optax.apply_updates(params, u)), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  unbounded = tj.solvers.Balance("grad").element(sym, params, grads)
  assert max(float(jnp.max(jnp.abs(jnp.log(s)))) for s in unbounded) > 0.5
  with pytest.raises(ValueError, match="max_log_scale"):
    tj.balanced(optax.sgd(0.1), sym, "grad", max_log_scale="wide")

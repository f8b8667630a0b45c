"""Cheap teleports: closed-form balancing and the one-direction line search."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mlp_apply
from conftest import random_mlp

import teleport_jax as tj

LEAKY = tj.leaky_relu(0.1)


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
  loss = lambda p, d: 0.5 * jnp.mean((mlp_apply(p, d[0], tj.identity(), "out_in") - d[1]) ** 2)  # noqa: E731
  return params, (x, y), loss, tj.LinearGL()


def test_norm_balancing_equalises_incoming_and_outgoing_norms_per_channel():
  params, data, loss, sym = _problem("relu")
  new, info = tj.teleport(loss, params, data, symmetry=sym, solver=tj.Balance(), num_steps=20)
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
    loss, params, data, symmetry=sym, solver=tj.Balance(target="grad"), num_steps=20
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
  balance = tj.Balance(target=target)
  new, info = tj.teleport(loss, params, data, symmetry=sym, solver=balance, num_steps=10)
  assert int(info.status) == tj.TeleportStatus.SUCCESSFUL
  assert float(info.objective_after) < 0.8 * float(info.objective_before)
  # one sweep on one site is the closed-form minimiser: a second sweep barely moves it
  # (gradient Gram matrices can be rank deficient, where the minimum is approached but
  # not attained, so "barely" rather than "not at all")
  single = tj.Product(sym.as_product(params).parts[:1])
  once, first = tj.teleport(loss, params, data, symmetry=single, solver=balance, num_steps=1)
  _, again = tj.teleport(loss, once, data, symmetry=single, solver=balance, num_steps=1)
  assert float(first.objective_after) < float(first.objective_before)
  assert float(again.objective_after) >= (1 - 1e-4) * float(again.objective_before)


def test_bounded_balancing_moves_at_most_max_log_scale():
  params, data, loss, sym = _problem("relu")
  g = tj.Balance(max_log_scale=0.05).element(sym, params)
  assert max(float(jnp.max(jnp.abs(jnp.log(s)))) for s in g) <= 0.05 + 1e-12
  half = tj.Balance(power=0.5).element(sym, params)
  full = tj.Balance().element(sym, params)
  for h, f in zip(half, full):
    np.testing.assert_allclose(jnp.log(h), 0.5 * jnp.log(f), rtol=1e-10)


def test_line_search_improves_the_objective_with_one_gradient():
  params, data, loss, sym = _problem("relu")
  new, info = tj.teleport(
    loss, params, data, symmetry=sym, solver="line_search", num_steps=8,
    objective=tj.lookahead_loss(0.5, 2),
  )  # fmt: skip
  assert int(info.status) == tj.TeleportStatus.SUCCESSFUL
  assert float(info.objective_after) < float(info.objective_before)
  assert float(info.stats["cost_objective_values"]) == 3.0 + 8


def test_balancing_refuses_a_group_without_sites():
  with pytest.raises(ValueError, match="balancing needs rescaling or GL sites"):
    tj.Balance().element(tj.booth_symmetry(), jnp.ones(2))


@pytest.mark.parametrize("target", ["norm", "grad"])
def test_balancing_a_cnn_balances_the_channels_a_flatten_spreads_over_dense_rows(target):
  # the last convolution's channels are read by the dense layer through a flatten:
  # channel c owns rows c, c + C, ... of the dense kernel (a reshaped slot)
  from teleport_jax import models

  m = models.cnn(channels=(3, 4), dense=(6, 5), image=(8, 8, 1), batch=16, dtype=jnp.float64)
  x, y = models.example_batch(m)
  loss = lambda p, d: models.classification_loss(m)(p, d)  # noqa: E731
  sym = tj.find_symmetries(m.apply, m.params, x)
  assert any(
    s.reshape is not None for part in sym.parts for s in part.site.slots
  )
  new, info = tj.teleport(
    loss, m.params, (x, y), symmetry=sym, solver=tj.Balance(target=target), num_steps=3
  )
  assert int(info.status) == tj.TeleportStatus.SUCCESSFUL
  assert float(info.objective_after) < float(info.objective_before)
  assert float(info.rel_loss_drift) <= 1e-10
  np.testing.assert_allclose(m.apply(new, x), m.apply(m.params, x), rtol=1e-9, atol=1e-12)

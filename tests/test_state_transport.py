"""Moving optimizer state with the group action at a teleport."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp_apply
from conftest import random_mlp

import teleport_jax as tj

LEAKY = tj.activations.leaky_relu(0.1)


def _case(name, dtype):
  """``(symmetry, loss(params), params, data)`` for which ``symmetry`` is exact."""
  key = jax.random.key(3)
  k1, k2, k3 = jax.random.split(key, 3)
  if name == "rescaling":
    params = random_mlp(k1, (5, 6, 7, 3), dtype, fmt="pairs")
    x, y = jax.random.normal(k2, (5, 9), dtype), jax.random.normal(k3, (3, 9), dtype)
    act, sym = LEAKY, tj.PositiveRescaling()
  elif name == "linear_gl":
    params = random_mlp(k1, (5, 6, 4, 3), dtype, fmt="out_in")
    x, y = jax.random.normal(k2, (5, 9), dtype), jax.random.normal(k3, (3, 9), dtype)
    act, sym = tj.activations.identity(), tj.LinearGL()
  elif name in ("data_gl", "data_gl_deep"):
    widths = (5, 6, 7, 8) if name == "data_gl" else (5, 6, 7, 6, 8, 3)
    params = random_mlp(k1, widths, dtype, fmt="out_in")
    x, y = jax.random.uniform(k2, (5, 4), dtype), jax.random.uniform(k3, (widths[-1], 4), dtype)
    act, sym = LEAKY, tj.DataDependentGL(activation=LEAKY)
  else:
    raise ValueError(name)
  fmt = "pairs" if name == "rescaling" else "out_in"
  data = (x, y)

  def loss(p):
    return 0.5 * jnp.sum((y - mlp_apply(p, x, act, fmt)) ** 2)

  return sym, loss, params, data


def _element(sym, params, scale=0.4):
  zeros = sym.algebra_zeros(params)
  keys = jax.random.split(jax.random.key(11), len(zeros))
  return sym.exp(tuple(scale * jax.random.normal(k, z.shape, z.dtype) for k, z in zip(keys, zeros)))


def _rel(a, b):
  diff = optax.tree.norm(optax.tree.sub(a, b))
  return float(diff / optax.tree.norm(b))


TOL = {jnp.float32: 2e-3, jnp.float64: 1e-9}
# the deep case is float64 only: with 4 hidden layers and min singular ratio 1e-3
# the transport (like the action itself) loses all float32 digits
CASES = [
  ("rescaling", jnp.float32),
  ("rescaling", jnp.float64),
  ("linear_gl", jnp.float64),
  ("data_gl", jnp.float32),
  ("data_gl", jnp.float64),
  ("data_gl_deep", jnp.float64),
]


# the deep and the float64 rescaling case with -m slow
SLOW_CASES = (("rescaling", jnp.float64), ("data_gl_deep", jnp.float64))


@pytest.mark.parametrize(
  "name,dtype",
  [pytest.param(*c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES],
  ids=[f"{n}-{jnp.dtype(d).name}" for n, d in CASES],
)
def test_transported_gradient_momentum_and_moments_match_the_new_point(name, dtype):
  sym, loss, params, data = _case(name, dtype)
  g = _element(sym, params)
  opt = optax.chain(optax.clip_by_global_norm(1e9), optax.trace(0.9), optax.adam(0.1))

  @jax.jit
  def run(params, g):
    new = tj.group_action(params, g, symmetry=sym, data=data)
    grad_old, grad_new = jax.grad(loss)(params), jax.grad(loss)(new)
    moved = tj.transport_cotangent(grad_old, params, new, g, symmetry=sym, data=data)
    _, state = opt.update(grad_old, opt.init(params), params)  # trace = g, mu = 0.1 g
    state_new = tj.transport_state(state, params, new, g, symmetry=sym, data=data)
    return new, grad_old, grad_new, moved, state, state_new

  new, grad_old, grad_new, moved, state, state_new = run(params, g)
  assert abs(float(loss(new) - loss(params))) <= 1e-3 * float(loss(params))
  assert _rel(grad_old, grad_new) > 0.05  # the teleport changed the gradient
  assert _rel(moved, grad_new) <= TOL[dtype]
  assert [a.dtype for a in jax.tree_util.tree_leaves(moved)] == [
    a.dtype for a in jax.tree_util.tree_leaves(params)
  ]
  # momentum and Adam's first moment move exactly as the gradient does
  assert jax.tree_util.tree_structure(state_new) == jax.tree_util.tree_structure(state)
  trace, adam = state_new[1].trace, state_new[2][0]
  assert _rel(trace, grad_new) <= TOL[dtype]
  assert _rel(adam.mu, optax.tree.scale(0.1, grad_new)) <= TOL[dtype]
  assert int(adam.count) == int(state[2][0].count)
  nu_new = optax.tree.scale(0.001, jax.tree_util.tree_map(jnp.square, grad_new))
  if name == "rescaling":  # diagonal transport: second moments move exactly by r**2
    assert _rel(adam.nu, nu_new) <= 2 * TOL[dtype]
  else:  # no exact transport of elementwise squares under GL: kept
    assert _rel(adam.nu, state[2][0].nu) == 0.0


def test_rescaling_second_moment_factor_is_the_square_of_the_cotangent_factor():
  sym, loss, params, data = _case("rescaling", jnp.float64)
  g = _element(sym, params)
  new = tj.group_action(params, g, symmetry=sym, data=data)
  for opt in (optax.rmsprop(0.1), optax.adagrad(0.1)):

    @jax.jit
    def run(params, new, g, opt=opt):
      _, state = opt.update(jax.grad(loss)(params), opt.init(params), params)
      return state, tj.transport_state(state, params, new, g, symmetry=sym)

    state, moved = run(params, new, g)
    old_sq, new_sq = jax.tree_util.tree_leaves(state[0])[0], jax.tree_util.tree_leaves(moved[0])[0]
    # first-layer kernel (out, in): row j scales by 1 / s_j, so squares by 1 / s_j**2
    expect = old_sq / np.asarray(g[0])[:, None] ** 2
    np.testing.assert_allclose(new_sq, expect, rtol=1e-12)


@pytest.mark.parametrize(
  "make_opt",
  [
    pytest.param(lambda: optax.sgd(1e-2, momentum=0.9), marks=pytest.mark.slow),
    pytest.param(lambda: optax.rmsprop(1e-3), marks=pytest.mark.slow),
    pytest.param(lambda: optax.adagrad(1e-2), marks=pytest.mark.slow),
    pytest.param(lambda: optax.adam(1e-3), marks=pytest.mark.slow),
  ],
  ids=["momentum", "rmsprop", "adagrad", "adam"],
)
def test_every_state_policy_trains_under_jit(make_opt):
  sym, _, params, (x, y) = _case("rescaling", jnp.float32)

  def value_fn(p, x, y):
    return 0.5 * jnp.mean((y - mlp_apply(p, x, LEAKY, "pairs")) ** 2)

  for policy in ("keep", "reset", "transport"):
    opt = tj.with_teleport(
      make_opt(), sym, tj.schedules.at_steps([1]), objective="min_grad_norm", num_steps=2,
      state_policy=policy,
    )  # fmt: skip

    @jax.jit
    def step(p, s, opt=opt):
      loss, grads = jax.value_and_grad(value_fn)(p, x, y)
      updates, s = opt.update(grads, s, p, value_fn=value_fn, x=x, y=y)
      return optax.apply_updates(p, updates), s, loss

    p, s = params, opt.init(params)
    losses = []
    for _ in range(3):
      p, s, loss = step(p, s)
      losses.append(float(loss))
    assert int(s.num_teleports) == 1, policy
    assert np.all(np.isfinite(losses)), policy
    assert float(s.max_rel_loss_drift) <= 1e-4


def test_transport_policy_moves_momentum_to_the_teleported_point():
  sym, _, params, (x, y) = _case("rescaling", jnp.float64)

  def value_fn(p, x, y):
    return 0.5 * jnp.sum((y - mlp_apply(p, x, LEAKY, "pairs")) ** 2)

  opt = tj.with_teleport(
    optax.sgd(1e-3, momentum=0.5), sym, tj.schedules.at_steps([1]), objective="min_grad_norm",
    num_steps=3, state_policy="transport",
  )  # fmt: skip
  s = opt.init(params)
  g0 = jax.grad(value_fn)(params, x, y)
  u, s = opt.update(g0, s, params, value_fn=value_fn, x=x, y=y)
  w1 = optax.apply_updates(params, u)
  g1 = jax.grad(value_fn)(w1, x, y)
  u, s = opt.update(g1, s, w1, value_fn=value_fn, x=x, y=y)
  assert int(s.num_teleports) == 1
  # the element, read off the biases
  w_tel = optax.apply_updates(
    w1, optax.tree.sub(u, optax.tree.scale(-1e-3, s.inner_state[0].trace))
  )
  scales = (w_tel[0][1] / w1[0][1], w_tel[1][1] / w1[1][1])  # b_m -> s_m b_m
  assert not np.allclose(scales[0], 1.0)
  moved = tj.transport_cotangent(g0, w1, w_tel, scales, symmetry=sym)
  grad_tel = jax.grad(value_fn)(w_tel, x, y)
  expect = optax.tree.add(optax.tree.scale(0.5, moved), grad_tel)
  assert _rel(s.inner_state[0].trace, expect) <= 1e-9


def test_bad_state_policy_and_unsupported_symmetry_raise():
  sym = tj.PositiveRescaling()
  with pytest.raises(ValueError, match="state_policy"):
    tj.with_teleport(optax.adam(1e-3), sym, 1, state_policy="move")
  # every group composes, so every group can move state; a back-end that does not move
  # along a group has no element to move it with
  tj.with_teleport(optax.adam(1e-3), tj.problems.booth_symmetry(), 1, state_policy="transport")

  class NoElement(tj.solvers.Lie):
    tracks_element = False

  with pytest.raises(ValueError, match="transport"):
    tj.with_teleport(optax.adam(1e-3), sym, 1, state_policy="transport", solver_backend=NoElement())

"""Every group action keeps the loss and the network outputs (to rounding)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mlp_apply
from conftest import mse_loss
from conftest import random_mlp
from conftest import rel_change
from conftest import tol
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from test_solver import published_problem

import teleport_jax as tj


def _random_algebra(sym, params, key, scale):
  xi = sym.algebra_zeros(params)
  leaves, treedef = jax.tree_util.tree_flatten(xi)
  keys = jax.random.split(key, len(leaves))
  leaves = [
    scale * jax.random.normal(k, x.shape, x.dtype) / math.sqrt(max(x.shape[-1], 1))
    for k, x in zip(keys, leaves)
  ]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _numpy_mlp(rng, widths, dtype, *, bias):
  """Like ``random_mlp(..., fmt="pairs")`` from numpy draws (zero biases without ``bias``)."""
  return [
    (
      jnp.asarray(rng.normal(size=(o, i)) / math.sqrt(i), dtype),
      jnp.asarray(0.1 * rng.normal(size=(o,)) * bias, dtype),
    )
    for i, o in zip(widths[:-1], widths[1:])
  ]


def _numpy_algebra(sym, params, rng, scale):
  """Like :func:`_random_algebra`, from numpy draws."""
  xi = sym.algebra_zeros(params)
  return jax.tree_util.tree_map(
    lambda x: jnp.asarray(
      scale * rng.normal(size=x.shape) / math.sqrt(max(x.shape[-1], 1)), x.dtype
    ),
    xi,
  )


@functools.partial(jax.jit, static_argnums=0)
def _act_jit(sym, params, xi, data):
  """One compiled action per shape (hypothesis draws many shapes); ``retract``
  gives a true group element (Cayley transform) and compiles fast."""
  return sym.act(params, sym.retract(xi), data)


def _data(key, widths, n, dtype, fmt):
  kx, ky = jax.random.split(key)
  x = jax.random.normal(kx, (widths[0], n), dtype)
  y = jax.random.normal(ky, (widths[-1], n), dtype)
  return (x.T, y.T) if fmt == "linen" else (x, y)


MLP_CASES = [
  # (symmetry factory, activation, fmt, bias)
  ("rescale", "relu", "out_in", False),
  ("rescale", "leaky_relu", "pairs", True),
  ("rescale", "relu", "linen", True),
  ("linear_gl", "identity", "out_in", False),
  ("linear_gl", "identity", "linen", True),
  ("data_gl", "leaky_relu", "out_in", False),
  ("data_gl", "leaky_relu", "pairs", True),
  ("data_gl", "asinh", "linen", True),
]


def _make(kind, act):
  if kind == "rescale":
    return tj.PositiveRescaling(activation=act)
  if kind == "linear_gl":
    return tj.LinearGL()
  return tj.DataDependentGL(activation=act)


@pytest.mark.parametrize("kind,act_name,fmt,bias", MLP_CASES)
@pytest.mark.parametrize("seed", [0])
def test_mlp_action_keeps_loss_and_outputs(kind, act_name, fmt, bias, seed, dtype):
  key = jax.random.key(seed)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  widths = tuple(int(w) for w in jax.random.randint(k4, (4,), 5, 9))
  n = min(widths[:-2]) - 1  # batch small enough for the data-dependent action
  params = random_mlp(k1, widths, dtype, fmt=fmt, bias=bias)
  act = tj.activations.as_activation(act_name)
  data = _data(k2, widths, n, dtype, fmt)
  sym = _make(kind, act)
  g = sym.exp(_random_algebra(sym, params, k3, 0.5))
  new = tj.group_action(params, g, symmetry=sym, data=data)

  chex_same_structure(new, params)
  out0 = mlp_apply(params, data[0], act, fmt)
  out1 = mlp_apply(new, data[0], act, fmt)
  assert out1.dtype == dtype
  assert rel_change(out0, out1) < tol(dtype)
  loss = mse_loss(act, fmt)
  assert abs(loss(new, data) - loss(params, data)) <= tol(dtype) * abs(loss(params, data))
  # and the parameters really moved
  assert rel_change(jax.tree_util.tree_leaves(params)[0], jax.tree_util.tree_leaves(new)[0]) > 1e-3


def chex_same_structure(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype


@settings(max_examples=5, deadline=None)
@given(
  widths=st.lists(st.integers(3, 9), min_size=3, max_size=5),
  seed=st.integers(0, 2**16),
  use_x64=st.booleans(),
)
def test_data_free_actions_keep_outputs_on_any_input(widths, seed, use_x64):
  dtype = jnp.float64 if use_x64 else jnp.float32
  rng = np.random.default_rng(seed)  # numpy draws: no program to compile per drawn shape
  params = _numpy_mlp(rng, widths, dtype, bias=True)
  x = jnp.asarray(rng.normal(size=(widths[0], 11)), dtype)  # batch larger than widths: data-free
  for sym, act in (
    (tj.PositiveRescaling(), tj.activations.leaky_relu(0.2)),
    (tj.LinearGL(), tj.activations.identity()),
  ):
    new = _act_jit(sym, params, _numpy_algebra(sym, params, rng, 0.5), None)
    assert rel_change(mlp_apply(params, x, act, "pairs"), mlp_apply(new, x, act, "pairs")) < tol(
      dtype
    )


@settings(max_examples=5, deadline=None)
@given(
  widths=st.lists(st.integers(4, 9), min_size=3, max_size=5),
  seed=st.integers(0, 2**16),
  use_x64=st.booleans(),
  slope=st.floats(0.05, 1.0),
)
def test_data_dependent_action_keeps_batch_outputs(widths, seed, use_x64, slope):
  dtype = jnp.float64 if use_x64 else jnp.float32
  rng = np.random.default_rng(seed)
  params = [w for w, _ in _numpy_mlp(rng, widths, dtype, bias=False)]
  n = min(widths[:-2])
  x = jnp.asarray(rng.normal(size=(widths[0], n)), dtype)
  act = tj.activations.leaky_relu(slope)
  sym = tj.DataDependentGL(activation=act)
  assert sym.rank_condition(params, (x,))["shape_ok"]
  sym.validate(params, (x,))
  new = _act_jit(sym, params, _numpy_algebra(sym, params, rng, 0.3), (x,))
  # inverse-free check of outputs on the batch
  assert rel_change(
    mlp_apply(params, x, act, "out_in"), mlp_apply(new, x, act, "out_in")
  ) < 20 * tol(dtype)


def test_data_dependent_hidden_features_transform_by_g(dtype):
  widths = (5, 6, 7, 8)
  params = random_mlp(jax.random.key(3), widths, dtype)
  x = jax.random.normal(jax.random.key(4), (5, 4), dtype)
  act = tj.activations.leaky_relu(0.1)
  sym = tj.DataDependentGL(activation=act)
  g = sym.exp(_random_algebra(sym, params, jax.random.key(5), 0.5))
  new = tj.group_action(params, g, symmetry=sym, data=x)
  h_old = act(params[0] @ x)  # (6, n); features transform as h^T -> h^T A
  h_new = act(new[0] @ x)
  np.testing.assert_allclose(h_new.T, h_old.T @ g[0], rtol=50 * tol(dtype), atol=50 * tol(dtype))


@pytest.mark.parametrize(
  "kind,act_name", [("rescale", "relu"), ("linear_gl", "identity"), ("data_gl", "leaky_relu")]
)
def test_identity_element_is_identity_and_inverse_undoes(kind, act_name, dtype):
  params = random_mlp(jax.random.key(0), (5, 6, 6, 3), dtype)
  data = (jax.random.normal(jax.random.key(1), (5, 4), dtype),)
  sym = _make(kind, tj.activations.as_activation(act_name))
  same = tj.group_action(params, sym.identity(params), symmetry=sym, data=data)
  for a, b in zip(params, same):
    np.testing.assert_allclose(a, b, rtol=tol(dtype), atol=tol(dtype))
  g = sym.exp(_random_algebra(sym, params, jax.random.key(2), 0.5))
  for a, ainv in zip(g, sym.inverse(g)):
    eye = a * ainv if a.ndim == 1 else a @ ainv
    np.testing.assert_allclose(
      eye,
      jnp.eye(a.shape[0], dtype=dtype) if a.ndim == 2 else jnp.ones_like(a),
      atol=10 * tol(dtype),
    )
  if kind != "data_gl":  # data-free actions compose exactly: g^-1 . (g . w) == w
    back = tj.group_action(tj.group_action(params, g, symmetry=sym), sym.inverse(g), symmetry=sym)
    for a, b in zip(params, back):
      np.testing.assert_allclose(a, b, rtol=10 * tol(dtype), atol=10 * tol(dtype))


def test_equal_width_layers_are_batched_in_one_call():
  calls = []

  def fn(a):
    calls.append(a.shape)
    return a

  tj_sym = pytest.importorskip("teleport_jax._src.symmetries.symmetry")
  arrays = [jnp.ones((4, 4)), 2 * jnp.ones((4, 4)), jnp.ones((3, 3))]
  out = tj_sym.batched_over_equal_shapes(fn, arrays, batch=True)
  assert [o.shape for o in out] == [(4, 4), (4, 4), (3, 3)]
  assert float(out[1][0, 0]) == 2.0  # results come back in the original order
  assert len(calls) == 2  # the two 4x4 layers went through one vmapped call
  calls.clear()
  tj_sym.batched_over_equal_shapes(fn, arrays, batch=False)
  assert len(calls) == 3


def test_layers_are_not_batched_on_cpu_by_default():
  calls = []
  tj_sym = pytest.importorskip("teleport_jax._src.symmetries.symmetry")
  tj_sym.batched_over_equal_shapes(lambda a: calls.append(a) or a, [jnp.ones((4, 4))] * 2)
  assert len(calls) == (2 if jax.default_backend() == "cpu" else 1)


def test_data_dependent_action_with_batch_wider_than_a_layer(dtype):
  widths = (3, 8, 8, 2)
  params = random_mlp(jax.random.key(0), widths, dtype)
  x = jax.random.normal(jax.random.key(1), (3, 6), dtype)  # 6 samples > input width 3
  act = tj.activations.leaky_relu(0.1)
  out0 = mlp_apply(params, x, act, "out_in")
  # default: the first hidden layer (fed by 3 features) stays fixed, the second moves exactly
  sym = tj.DataDependentGL(activation=act)
  info = sym.rank_condition(params, x)
  assert info["shape_ok"] and not info["all_layers_ok"] and info["max_exact_batch"] == 3
  assert info["active_layers"] == (False, True)
  g = sym.exp(_random_algebra(sym, params, jax.random.key(2), 0.5))
  new = tj.group_action(params, g, symmetry=sym, data=x)
  np.testing.assert_array_equal(new[0], params[0])
  assert rel_change(params[1], new[1]) > 1e-3
  assert rel_change(out0, mlp_apply(new, x, act, "out_in")) < 20 * tol(dtype)
  # forcing every layer to move breaks exactness, which is measurable
  forced = tj.DataDependentGL(activation=act, skip_inexact_layers=False)
  new = tj.group_action(params, g, symmetry=forced, data=x)
  assert rel_change(out0, mlp_apply(new, x, act, "out_in")) > 1e-3


def test_published_first_order_action_changes_the_loss_and_exact_does_not(dtype):
  act = tj.activations.leaky_relu(0.1)
  params, data = published_problem(0, dtype)
  loss = lambda p, d: 0.5 * jnp.sum((d[1] - mlp_apply(p, d[0], act, "out_in")) ** 2)
  exact = tj.DataDependentGL(activation=act)
  published = tj.DataDependentGL(activation=act, variant="published")
  xi = _random_algebra(exact, params, jax.random.key(1), 0.5)
  l0 = loss(params, data)
  l_exact = loss(tj.group_action(params, exact.exp(xi), symmetry=exact, data=data), data)
  l_pub = loss(tj.group_action(params, published.exp(xi), symmetry=published, data=data), data)
  assert abs(l_exact - l0) / l0 < tol(dtype)
  assert abs(l_pub - l0) / l0 > 1e-2


@pytest.mark.parametrize("which", ["quadratic", "booth", "rosenbrock"])
def test_rotations_keep_the_loss(which, dtype):
  key = jax.random.key(7)
  if which == "quadratic":
    a = jax.random.normal(key, (6, 6), dtype)
    h = a @ a.T + 6 * jnp.eye(6, dtype=dtype)
    c = jnp.arange(6, dtype=dtype)
    sym = tj.symmetries.QuadraticRotation(hessian=h, center=c)
    loss = lambda w: 0.5 * (w - c) @ h @ (w - c)
    w = jax.random.normal(jax.random.key(8), (6,), dtype)
  elif which == "booth":
    sym, loss, w = tj.problems.booth_symmetry(), tj.problems.booth, jnp.asarray([-3.0, 4.0], dtype)
  else:
    sym, loss, w = (
      tj.problems.rosenbrock_symmetry(),
      tj.problems.rosenbrock,
      jnp.asarray([-1.2, 1.0], dtype),
    )
  for s in range(3):
    g = sym.exp(_random_algebra(sym, w, jax.random.key(s), 2.0))
    np.testing.assert_allclose(g @ sym.inverse(g), jnp.eye(g.shape[0]), atol=10 * tol(dtype))
    new = tj.group_action(w, g, symmetry=sym)
    assert new.dtype == dtype
    assert abs(loss(new) - loss(w)) <= 10 * tol(dtype) * abs(loss(w))
    assert float(jnp.max(jnp.abs(new - w))) > 1e-3


def test_flax_linen_and_nnx_params_are_understood(dtype):
  flax_linen = pytest.importorskip("flax.linen")
  nnx = pytest.importorskip("flax.nnx")

  class Linen(flax_linen.Module):
    @flax_linen.compact
    def __call__(self, x):
      for _ in range(2):
        x = flax_linen.leaky_relu(flax_linen.Dense(6, param_dtype=dtype)(x), 0.1)
      return flax_linen.Dense(3, param_dtype=dtype)(x)

  x = jax.random.normal(jax.random.key(0), (4, 5), dtype)
  model = Linen()
  params = model.init(jax.random.key(1), x)
  act = tj.activations.leaky_relu(0.1)
  for sym in (tj.PositiveRescaling(), tj.DataDependentGL(activation=act)):
    g = sym.exp(_random_algebra(sym, params, jax.random.key(2), 0.5))
    new = tj.group_action(params, g, symmetry=sym, data=x)
    assert rel_change(model.apply(params, x), model.apply(new, x)) < 10 * tol(dtype)

  class NNX(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(5, 6, rngs=rngs, param_dtype=dtype)
      self.l2 = nnx.Linear(6, 6, rngs=rngs, param_dtype=dtype)
      self.l3 = nnx.Linear(6, 3, rngs=rngs, param_dtype=dtype)

    def __call__(self, x):
      x = nnx.leaky_relu(self.l1(x), 0.1)
      x = nnx.leaky_relu(self.l2(x), 0.1)
      return self.l3(x)

  graphdef, state = nnx.split(NNX(nnx.Rngs(0)))
  apply = lambda s, x: nnx.merge(graphdef, s)(x)
  layout = tj.symmetries.infer_layout(state)
  assert layout.num_layers == 3 and layout.kernel_format == "in_out"
  for sym in (tj.PositiveRescaling(), tj.DataDependentGL(activation=act)):
    g = sym.exp(_random_algebra(sym, state, jax.random.key(2), 0.5))
    new = tj.group_action(state, g, symmetry=sym, data=x)
    assert rel_change(apply(state, x), apply(new, x)) < 10 * tol(dtype)

"""Sharpness and orbit-curvature objectives: values, invariances, teleports."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mse_loss
from conftest import random_mlp
from jax.flatten_util import ravel_pytree

import teleport_jax as tj
from teleport_jax._src.objectives import geometry
from teleport_jax.experiments import regression

ACT = tj.activations.leaky_relu(0.1)
WIDTHS = (3, 5, 4, 2)


def small_mlp(dtype, seed=0, n=12):
  """A biased LeakyReLU MLP ``[(W, b), ...]`` and a batch ``(x, y)`` (features x samples)."""
  params = random_mlp(jax.random.key(seed), WIDTHS, dtype, fmt="pairs")
  kx, ky = jax.random.split(jax.random.key(seed + 100))
  x = jax.random.normal(kx, (WIDTHS[0], n), dtype)
  y = jax.random.normal(ky, (WIDTHS[-1], n), dtype)
  return params, (x, y)


MLP_LOSS = mse_loss(ACT, "pairs")


def regression_problem(dtype):
  params, x, y = regression.make_problem(0, dtype=dtype)
  return params, (x, y)


def regression_loss(params, data):
  return regression.loss_fn(params, *data)


# ------------------------------------------------------------------ sharpness
@pytest.mark.parametrize(
  "dtype,relative", [(jnp.float32, False), (jnp.float64, True)], ids=["float32", "float64-relative"]
)
def test_sharpness_matches_a_python_loop_over_the_same_perturbations(dtype, relative):
  params, data = small_mlp(dtype)
  radius, num = 0.3, 5
  obj = tj.geometry.sharpness(radius, num_samples=num, seed=3, relative=relative)
  value, loss = jax.jit(lambda p: obj.fn(MLP_LOSS, p, data))(params)
  flat, unravel = ravel_pytree(params)
  u = geometry.perturbation_directions(3, num, flat.size, flat.dtype, unit=not relative)
  u = np.asarray(u, np.float64)
  if not relative:
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, rtol=1e-5)
  w = np.asarray(flat, np.float64)
  loss_of = jax.jit(lambda v: MLP_LOSS(unravel(v), data))
  l0 = float(loss_of(flat))
  total = 0.0
  for i in range(num):
    eps = radius * u[i] * (np.abs(w) if relative else 1.0)
    for sign in (1.0, -1.0):
      total += 0.5 * float(loss_of(jnp.asarray(w + sign * eps, dtype)))
  expected = total / num - l0
  assert value.dtype == dtype and loss.dtype == dtype
  np.testing.assert_allclose(float(loss), l0, rtol=1e-6)
  atol = 1e-5 * l0 if dtype == jnp.float32 else 1e-12 * l0
  np.testing.assert_allclose(float(value), expected, rtol=1e-3, atol=atol)


def test_sharpness_of_a_quadratic_is_half_the_mean_curvature_along_the_directions():
  # (L(w+e) + L(w-e))/2 - L(w) = e^T H e / 2 exactly for a quadratic, whatever the gradient
  h = jnp.diag(jnp.asarray([1.0, 2.0, 5.0], jnp.float64))
  loss = lambda w: 0.5 * w @ h @ w + jnp.sum(w)  # noqa: E731
  w = jnp.asarray([0.3, -1.0, 2.0], jnp.float64)
  value, _ = tj.geometry.sharpness(0.5, num_samples=7, seed=1).fn(loss, w, None)
  u = geometry.perturbation_directions(1, 7, 3, jnp.float64)
  expected = jnp.mean(jax.vmap(lambda v: 0.5 * 0.25 * v @ h @ v)(u))
  np.testing.assert_allclose(value, expected, rtol=1e-12)


def test_sharpness_is_deterministic_jittable_and_vmappable():
  params, data = small_mlp(jnp.float64)
  obj = tj.geometry.sharpness(0.2, num_samples=4)
  value = jax.jit(lambda p: obj.fn(MLP_LOSS, p, data)[0])
  first = value(params)
  again = jax.jit(lambda p: tj.geometry.sharpness(0.2, num_samples=4).fn(MLP_LOSS, p, data)[0])(
    params
  )
  np.testing.assert_allclose(again, first, rtol=1e-14)  # the same key in every trace
  other, _ = small_mlp(jnp.float64, seed=1)
  stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), params, other)
  batched = jax.jit(jax.vmap(value))(stacked)
  np.testing.assert_allclose(batched, [first, value(other)], rtol=1e-10)
  assert obj == tj.geometry.sharpness(0.2, num_samples=4) and hash(obj) == hash(
    tj.geometry.sharpness(0.2, 4)
  )
  assert obj != tj.geometry.sharpness(0.2, num_samples=4, seed=1)


def test_relative_sharpness_is_invariant_under_rescaling_absolute_is_not():
  params, data = small_mlp(jnp.float64)
  sym = tj.PositiveRescaling()
  xi = jax.tree_util.tree_map(
    lambda z: jax.random.normal(jax.random.key(7), z.shape, z.dtype), sym.algebra_zeros(params)
  )
  moved = tj.group_action(params, sym.exp(xi), symmetry=sym)
  np.testing.assert_allclose(MLP_LOSS(moved, data), MLP_LOSS(params, data), rtol=1e-12)
  rel = tj.geometry.sharpness(0.1, num_samples=6, relative=True)
  ab = tj.geometry.sharpness(0.1, num_samples=6)
  both = jax.jit(lambda p: (rel.fn(MLP_LOSS, p, data)[0], ab.fn(MLP_LOSS, p, data)[0]))
  (r0, a0), (r1, a1) = both(params), both(moved)
  np.testing.assert_allclose(r1, r0, rtol=1e-10)
  assert abs(float(a1 - a0)) > 0.05 * abs(float(a0))


# ------------------------------------------------------------------ curvature
def test_rotation_orbit_of_a_point_is_a_circle_with_curvature_one_over_radius(dtype):
  sym = tj.symmetries.QuadraticRotation(hessian=jnp.eye(2, dtype=dtype), center=jnp.zeros(2, dtype))
  loss = lambda p: 0.5 * jnp.sum(p**2)  # noqa: E731
  obj = tj.geometry.orbit_curvature(sym, num_directions=3)
  kappa_of = jax.jit(lambda w: obj.fn(loss, w, None)[0])
  for radius in (0.5, 2.0, 10.0):
    kappa = kappa_of(radius * jnp.asarray([0.6, -0.8], dtype))
    assert kappa.dtype == dtype
    np.testing.assert_allclose(float(kappa), 1.0 / radius, rtol=1e-5)


def test_rotation_orbit_of_a_quadratic_is_an_ellipse_with_its_curvature():
  a, b, c = 1.0, 4.0, 2.0  # level set a x^2/2 + b y^2/2 = c: semi-axes sqrt(2c/a), sqrt(2c/b)
  sym = tj.symmetries.QuadraticRotation(hessian=jnp.diag(jnp.asarray([a, b])), center=jnp.zeros(2))
  ax, bx = np.sqrt(2 * c / a), np.sqrt(2 * c / b)
  loss = lambda p: 0.5 * (a * p[0] ** 2 + b * p[1] ** 2)  # noqa: E731
  # through the matrix exponential (the circle test above uses the default retraction)
  obj = tj.geometry.orbit_curvature(sym, num_directions=2, use_retract=False)
  fn = jax.jit(lambda w: obj.fn(loss, w, None))
  for theta in (0.0, 0.7, 2.0):
    kappa, value = fn(jnp.asarray([ax * np.cos(theta), bx * np.sin(theta)]))
    expected = ax * bx / (ax**2 * np.sin(theta) ** 2 + bx**2 * np.cos(theta) ** 2) ** 1.5
    np.testing.assert_allclose(float(value), c, rtol=1e-12)
    np.testing.assert_allclose(float(kappa), expected, rtol=1e-9)


@functools.partial(jax.jit, static_argnums=(3,))
def _curve_points(params, m, ts, sym, data):
  """``exp(t M) . w`` for each ``t`` in ``ts``, flattened: ``(len(ts), n)``."""
  flat, unravel = ravel_pytree(params)

  def point(t):
    xi = jax.tree_util.tree_map(lambda a: t * a, m)
    return ravel_pytree(sym.act(unravel(flat), sym.exp(xi), data))[0]

  return jax.vmap(point)(ts)


def _finite_difference_curvature(params, m, sym, data, h):
  ts = jnp.asarray([h, 0.0, -h], jnp.float64)
  g_plus, g0, g_minus = np.asarray(_curve_points(params, m, ts, sym, data), np.float64)
  g1 = (g_plus - g_minus) / (2 * h)
  g2 = (g_plus - 2 * g0 + g_minus) / h**2
  num = np.sqrt(np.dot(g1, g1) * np.dot(g2, g2) - np.dot(g1, g2) ** 2)
  return num / np.linalg.norm(g1) ** 3, g1, g2


@functools.partial(jax.jit, static_argnums=(0, 1))
def objective_value(fn, loss_fn, params, data):
  """``fn(loss_fn, params, data)[0]``, compiled once per (fn, loss_fn, shapes): tests share it."""
  return fn(loss_fn, params, data)[0]


def test_curvature_matches_finite_differences_on_mlp_with_rescaling():
  params, data = small_mlp(jnp.float64)
  sym = tj.PositiveRescaling()
  obj = tj.geometry.orbit_curvature(sym, num_directions=2)
  dirs = obj.fn.directions(params)
  derivatives = jax.jit(jax.vmap(lambda m: geometry.orbit_derivatives(params, m, sym)))(dirs)
  kappas = []
  for i in range(2):
    m = jax.tree_util.tree_map(lambda a, i=i: a[i], dirs)
    expected, g1_fd, g2_fd = _finite_difference_curvature(params, m, sym, None, 1e-4)
    g1, g2 = derivatives[0][i], derivatives[1][i]
    np.testing.assert_allclose(g1, g1_fd, rtol=1e-5, atol=1e-7 * np.abs(g1_fd).max())
    np.testing.assert_allclose(g2, g2_fd, rtol=1e-3, atol=1e-4 * np.abs(g2_fd).max())
    kappa = geometry.curvature_from_derivatives(g1, g2)
    np.testing.assert_allclose(kappa, expected, rtol=1e-4)
    kappas.append(float(kappa))
  value = objective_value(obj.fn, MLP_LOSS, params, data)
  np.testing.assert_allclose(float(value), np.mean(kappas), rtol=1e-10)
  assert float(value) > 0


def test_curvature_matches_finite_differences_on_regression_with_data_gl():
  # The objective differentiates the Cayley retraction; the finite differences use the
  # matrix exponential: they agree because both maps agree to second order.
  params, data = regression_problem(jnp.float64)
  sym = regression.symmetry()
  obj = tj.geometry.orbit_curvature(sym, num_directions=2)
  dirs = obj.fn.directions(params)
  expected = [
    _finite_difference_curvature(params, jax.tree_util.tree_map(lambda a, i=i: a[i], dirs), sym,
                                 data, 1e-4)[0]
    for i in range(2)
  ]  # fmt: skip
  value = objective_value(obj.fn, regression_loss, params, data)
  np.testing.assert_allclose(float(value), np.mean(expected), rtol=1e-4)
  assert float(value) > 0


def test_stationary_curve_has_zero_curvature_and_finite_gradient():
  params, data = small_mlp(jnp.float64)
  sym = tj.PositiveRescaling()
  zero = sym.algebra_zeros(params)
  kappa, grads = jax.jit(jax.value_and_grad(lambda p: geometry.curve_curvature(p, zero, sym)))(
    params
  )
  assert float(kappa) == 0.0
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
  line = geometry.curvature_from_derivatives(jnp.ones(3), 2 * jnp.ones(3))  # a straight line
  assert float(line) == 0.0
  g = jax.grad(lambda v: geometry.curvature_from_derivatives(v, 2 * v))(jnp.ones(3))
  assert bool(jnp.all(jnp.isfinite(g)))


def test_curvature_is_jittable_and_vmappable_over_params():
  sym = tj.PositiveRescaling()
  obj = tj.geometry.orbit_curvature(sym, num_directions=2)
  params, data = small_mlp(jnp.float32)
  other, _ = small_mlp(jnp.float32, seed=1)
  stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), params, other)
  value = jax.jit(lambda p: obj.fn(MLP_LOSS, p, data)[0])
  batched = jax.jit(jax.vmap(value))(stacked)
  expected = [value(p) for p in (params, other)]
  np.testing.assert_allclose(batched, expected, rtol=1e-5)
  assert obj == tj.geometry.orbit_curvature(tj.PositiveRescaling(), num_directions=2)
  assert hash(obj) == hash(tj.geometry.orbit_curvature(tj.PositiveRescaling(), num_directions=2))
  rot = tj.symmetries.QuadraticRotation(hessian=jnp.eye(2), center=jnp.zeros(2))  # holds arrays
  assert tj.geometry.orbit_curvature(rot) == tj.geometry.orbit_curvature(rot)
  hash(tj.geometry.orbit_curvature(rot))


# ------------------------------------------------------------------ teleports
def _make(kind, sym, maximize):
  if kind == "sharpness":
    return tj.geometry.sharpness(0.3, num_samples=4, maximize=maximize)
  return tj.geometry.orbit_curvature(sym, num_directions=2, maximize=maximize)


def _check_teleport(loss_fn, params, data, sym, obj, dtype):
  new, info = tj.teleport(
    loss_fn, params, data, symmetry=sym, objective=obj, num_steps=5, max_step_size=0.3
  )
  assert bool(info.accepted), tj.status_message(info.status)
  assert float(info.rel_loss_drift) <= tj.default_rtol(dtype)
  before, after = float(info.objective_before), float(info.objective_after)
  assert after > before if obj.maximize else after < before, (before, after)
  # float32 sharpness is a difference of losses: allow rounding of the loss itself
  atol = (1e-6 if dtype == jnp.float32 else 1e-12) * float(loss_fn(params, data))
  value = functools.partial(objective_value, obj.fn, loss_fn)
  np.testing.assert_allclose(float(value(params, data)), before, rtol=1e-4, atol=atol)
  np.testing.assert_allclose(float(value(new, data)), after, rtol=1e-3, atol=atol)
  rel = abs(float(loss_fn(new, data)) - float(loss_fn(params, data))) / float(loss_fn(params, data))
  assert rel <= tj.default_rtol(dtype)
  for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(params)):
    assert a.dtype == b.dtype == dtype


# Each case compiles one teleport (several seconds), so the cases are spread out: every
# objective is run in both directions, on both problems and in both dtypes.
MLP_CASES = [
  ("sharpness", True, jnp.float32),
  ("curvature", False, jnp.float64),
]


@pytest.mark.parametrize(
  "kind,maximize,dtype", MLP_CASES, ids=lambda v: str(getattr(v, "__name__", v))
)
def test_teleport_moves_objective_on_mlp_with_rescaling(kind, maximize, dtype):
  params, data = small_mlp(dtype)
  sym = tj.PositiveRescaling()
  _check_teleport(MLP_LOSS, params, data, sym, _make(kind, sym, maximize), dtype)


REGRESSION_CASES = [
  ("sharpness", False, jnp.float32),
  ("curvature", True, jnp.float64),  # shares objective_value's compilation with the test above
]


@pytest.mark.parametrize(
  "kind,maximize,dtype", REGRESSION_CASES, ids=lambda v: str(getattr(v, "__name__", v))
)
def test_teleport_moves_objective_on_published_regression_with_data_gl(kind, maximize, dtype):
  params, data = regression_problem(dtype)
  sym = regression.symmetry()
  _check_teleport(regression_loss, params, data, sym, _make(kind, sym, maximize), dtype)


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(radius=0.0), "radius"),
    (dict(radius=-1.0), "radius"),
    (dict(radius=float("inf")), "radius"),
    (dict(radius="big"), "radius"),
    (dict(radius=0.1, num_samples=0), "num_samples"),
    (dict(radius=0.1, num_samples=2.5), "num_samples"),
    (dict(radius=0.1, num_samples=True), "num_samples"),
    (dict(radius=0.1, seed=1.5), "seed"),
  ],
)
def test_sharpness_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tj.geometry.sharpness(**kwargs)


def test_orbit_curvature_rejects_bad_arguments():
  with pytest.raises(TypeError, match="symmetry"):
    tj.geometry.orbit_curvature("rescaling")
  with pytest.raises(ValueError, match="num_directions"):
    tj.geometry.orbit_curvature(tj.PositiveRescaling(), num_directions=0)
  with pytest.raises(ValueError, match="seed"):
    tj.geometry.orbit_curvature(tj.PositiveRescaling(), seed="zero")

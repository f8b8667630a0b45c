"""Geometric teleport objectives: sharpness of the loss and curvature of the orbit.

Zhao et al. (ICLR 2024) relate two quantities at a point ``w`` of a level set
to how well the minimum generalises, and teleport along the orbit to change
them:

* **sharpness**, the expected loss increase under random perturbations of the
  parameters (:func:`sharpness`);
* **orbit curvature**, the curvature of the curves ``t -> exp(t M) . w``
  traced by the group through ``w`` (:func:`orbit_curvature`).

Both are :class:`~teleport_jax.objectives.Objective` s for :func:`teleport_jax.teleport`
and can also be evaluated on their own (``objective.fn(loss_fn, params, data)``
returns ``(value, loss)``). Their random directions are drawn from a fixed key,
so an objective is a deterministic function of ``params`` that the solver can
differentiate, and equal settings share compiled code.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import chex
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from teleport_jax._src.objectives import objectives as obj_lib
from teleport_jax._src.symmetries import symmetry as sym_lib


def _check_positive_int(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return int(value)


def _check_seed(seed: Any) -> int:
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
    raise ValueError(f"seed must be an int, got {seed!r}.")
  return int(seed)


def perturbation_directions(
  seed: int, num_samples: int, size: int, dtype: Any = jnp.float32, *, unit: bool = True
) -> chex.Array:
  """The random directions :func:`sharpness` uses: ``(num_samples, size)``.

  Rows are standard Gaussian vectors drawn from ``jax.random.key(seed)``;
  with ``unit=True`` they are normalised to unit Euclidean norm (uniform on
  the unit sphere of the flattened parameters).
  """
  u = jax.random.normal(jax.random.key(seed), (num_samples, size), dtype)
  if not unit:
    return u
  norms = jnp.linalg.norm(u, axis=1, keepdims=True)
  return u / jnp.maximum(norms, jnp.finfo(dtype).tiny)


@dataclasses.dataclass(frozen=True)
class _Sharpness:
  """``fn`` of :func:`sharpness`; hashable by value."""

  radius: float
  num_samples: int
  seed: int
  relative: bool

  def __call__(self, loss_fn, params, data):
    flat, unravel = ravel_pytree(params)
    u = perturbation_directions(
      self.seed, self.num_samples, flat.shape[0], flat.dtype, unit=not self.relative
    )
    scale = jnp.abs(flat) if self.relative else jnp.ones_like(flat)
    eps = jnp.asarray(self.radius, flat.dtype) * u * scale[None, :]  # (num_samples, n)
    f = lambda w: obj_lib.call_loss(loss_fn, unravel(w), data)  # noqa: E731
    loss = f(flat)
    plus = jax.vmap(lambda e: f(flat + e))(eps)
    minus = jax.vmap(lambda e: f(flat - e))(eps)
    return jnp.mean(0.5 * (plus + minus)) - loss, loss


def sharpness(
  radius: float,
  num_samples: int = 16,
  seed: int = 0,
  maximize: bool = False,
  *,
  relative: bool = False,
) -> obj_lib.Objective:
  r"""Sharpness: the expected loss increase under random perturbations.

  .. math::

     S(w) = \frac{1}{N} \sum_{i=1}^{N} \tfrac12\big(L(w + \epsilon_i) + L(w - \epsilon_i)\big)
     - L(w),

  an estimate of :math:`\mathbb{E}_\epsilon[L(w + \epsilon)] - L(w)` with ``N =
  num_samples`` fixed random perturbations (:func:`perturbation_directions`),
  each used with both signs:

  * ``relative=False`` (default): :math:`\epsilon_i = r\,u_i` with :math:`u_i`
    uniform on the unit sphere of the flattened parameter pytree, a
    perturbation of Euclidean norm exactly ``radius`` over the whole pytree. This is the
    measure of Zhao et al. (ICLR 2024). It is *not* invariant under
    reparametrisations such as positive rescaling (Dinh et al., 2017): scaling
    a hidden unit's incoming weights up and its outgoing weights down moves
    the same network to a point of different sharpness, which is what lets a
    teleport change it.
  * ``relative=True``: :math:`\epsilon_i = r\,|w| \odot z_i` with :math:`z_i`
    standard Gaussian, i.e. each weight is multiplied by :math:`1 + r z`: a
    relative perturbation of standard deviation ``radius`` (adaptive
    sharpness, as in ASAM, Kwon et al. 2021). Under positive rescaling every weight and its
    perturbation scale together, so the perturbed networks are the same
    functions and this sharpness is *exactly constant* on a rescaling orbit: a
    scale-aware measure to compare different minima, not something a
    rescaling teleport can change.

  The antithetic pairs :math:`\pm\epsilon_i` cancel the first-order term
  :math:`\nabla L\cdot\epsilon_i` exactly, so away from a minimum the estimate
  measures curvature rather than the sampling noise of the gradient term; for
  small ``radius`` it is :math:`\tfrac12 \overline{\epsilon^\top H \epsilon}`,
  about :math:`r^2 \operatorname{tr} H / (2n)` for ``relative=False``.

  The value is a difference of nearly equal losses: its rounding error is
  about ``eps * L`` (``eps`` ~ 1e-7 in float32), so choose ``radius`` large
  enough that the sharpness is well above that.

  The directions come from ``jax.random.key(seed)``, so the objective is a
  deterministic, differentiable function of the parameters. The ``2 N``
  perturbed losses are evaluated in one ``vmap``.

  Args:
    radius: perturbation size :math:`r > 0` (absolute norm, or relative scale
      with ``relative=True``).
    num_samples: number of random directions :math:`N` (each used twice).
    seed: seed of the directions.
    maximize: teleport to sharper (``True``) or flatter (``False``, default) points.
    relative: scale each weight's perturbation by its magnitude.

  Returns:
    An :class:`~teleport_jax.objectives.Objective` whose ``fn(loss_fn, params, data)``
    returns ``(S(params), L(params))``.

  Raises:
    ValueError: for a non-positive or non-finite ``radius``, a ``num_samples``
      that is not a positive int, or a ``seed`` that is not an int.

  Examples:
    >>> import jax.numpy as jnp, teleport_jax as tj
    >>> loss = lambda w: 0.5 * jnp.sum(jnp.asarray([1.0, 3.0]) * w**2)
    >>> s = tj.geometry.sharpness(0.1, num_samples=4)
    >>> value, l = s.fn(loss, jnp.asarray([1.0, 1.0]), None)
    >>> bool(0.005 * 1.0 <= value <= 0.005 * 3.0)  # r^2/2 * u^T H u
    True
  """
  if isinstance(radius, bool) or not isinstance(radius, numbers.Real):
    raise ValueError(f"radius must be a positive number, got {radius!r}.")
  if not (radius > 0 and radius < float("inf")):
    raise ValueError(f"radius must be a positive, finite number, got {radius!r}.")
  n = _check_positive_int(num_samples, "num_samples")
  seed = _check_seed(seed)
  fn = _Sharpness(float(radius), n, seed, bool(relative))
  kind = "relative_sharpness" if relative else "sharpness"
  name = f"{'max' if maximize else 'min'}_{kind}(r={float(radius):g}, n={n})"
  return obj_lib.Objective(fn, bool(maximize), name)


def _static_key(symmetry: sym_lib.Symmetry):
  """A hashable stand-in for ``symmetry``: itself if hashable, else its identity."""
  try:
    hash(symmetry)
  except TypeError:  # e.g. a QuadraticRotation holding arrays
    return ("id", id(symmetry))
  return symmetry


@dataclasses.dataclass(frozen=True, eq=False)
class _OrbitCurvature:
  """``fn`` of :func:`orbit_curvature`; hashable by value (by identity for a
  symmetry that holds arrays)."""

  symmetry: sym_lib.Symmetry
  num_directions: int
  seed: int
  use_retract: bool

  def _key(self):
    return (_static_key(self.symmetry), self.num_directions, self.seed, self.use_retract)

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return type(other) is type(self) and self._key() == other._key()

  def directions(self, params):
    """The algebra directions ``M_i``: a pytree with a leading axis of ``num_directions``."""
    zeros = self.symmetry.algebra_zeros(params)
    flat, unravel = ravel_pytree(zeros)
    u = perturbation_directions(self.seed, self.num_directions, flat.shape[0], flat.dtype)
    return jax.vmap(unravel)(u)

  def __call__(self, loss_fn, params, data):
    sym = self.symmetry
    act_data = data if sym.needs_data else None
    dirs = self.directions(params)
    curv = jax.vmap(
      lambda m: curve_curvature(params, m, sym, act_data, use_retract=self.use_retract)
    )(dirs)
    return jnp.mean(curv), obj_lib.call_loss(loss_fn, params, data)


def orbit_derivatives(
  params: chex.ArrayTree,
  direction: Any,
  symmetry: sym_lib.Symmetry,
  data: Any = None,
  *,
  use_retract: bool = False,
) -> tuple[chex.Array, chex.Array]:
  r"""First and second derivatives of the orbit curve at ``t = 0``.

  The curve is :math:`\gamma(t) = \exp(t M)\cdot w`, i.e.
  ``symmetry.act(params, symmetry.exp(t * direction), data)``; the derivatives
  are computed with nested forward-mode ``jvp`` (exact, no finite differences).

  Args:
    params: the point :math:`w` (a parameter pytree with ``n`` entries).
    direction: :math:`M`, shaped like ``symmetry.algebra_zeros(params)``.
    symmetry: the group.
    data: the batch for data-dependent groups (``None`` otherwise).
    use_retract: differentiate ``symmetry.retract(t * M)`` instead of
      ``symmetry.exp(t * M)``. The result is the same whenever the retraction
      agrees with ``exp`` to second order at zero, as it does for every group
      of this library (the Cayley transform
      :math:`I + X + X^2/2 + O(X^3)`, or ``exp`` itself), and it compiles
      about twice as fast as differentiating the matrix exponential twice.

  Returns:
    ``(gamma1, gamma2)``, flat vectors of shape ``(n,)``.
  """
  flat, unravel = ravel_pytree(params)

  to_group = symmetry.retract if use_retract else symmetry.exp

  def curve(t):
    xi = jax.tree_util.tree_map(lambda m: (t * m).astype(m.dtype), direction)
    moved = symmetry.act(unravel(flat), to_group(xi), data)
    return ravel_pytree(moved)[0]

  def velocity(t):
    return jax.jvp(curve, (t,), (jnp.ones_like(t),))[1]

  t0 = jnp.zeros((), flat.dtype)
  gamma1, gamma2 = jax.jvp(velocity, (t0,), (jnp.ones_like(t0),))
  return gamma1, gamma2


def curvature_from_derivatives(gamma1: chex.Array, gamma2: chex.Array) -> chex.Array:
  r"""Curvature :math:`\sqrt{|\gamma'|^2|\gamma''|^2 - (\gamma'\cdot\gamma'')^2}/|\gamma'|^3`.

  Returns 0 (with finite gradients) where :math:`\gamma' = 0`, a stationary
  point of the curve, and where the numerator vanishes (a straight line).

  Args:
    gamma1: :math:`\gamma'`, shape ``(n,)``.
    gamma2: :math:`\gamma''`, shape ``(n,)``.

  Returns:
    A scalar.
  """
  tiny = jnp.finfo(gamma1.dtype).tiny
  a = jnp.vdot(gamma1, gamma1)
  b = jnp.vdot(gamma2, gamma2)
  c = jnp.vdot(gamma1, gamma2)
  num_sq = a * b - c * c
  ok_num = num_sq > 0
  num = jnp.where(ok_num, jnp.sqrt(jnp.where(ok_num, num_sq, 1.0)), 0.0)
  ok = a > tiny ** (2 / 3)  # |gamma'|^3 = a^(3/2) must not underflow
  safe_a = jnp.where(ok, a, 1.0)
  return jnp.where(ok, num / (safe_a * jnp.sqrt(safe_a)), 0.0)


def curve_curvature(
  params: chex.ArrayTree,
  direction: Any,
  symmetry: sym_lib.Symmetry,
  data: Any = None,
  *,
  use_retract: bool = False,
) -> chex.Array:
  r"""Curvature at ``t = 0`` of the orbit curve :math:`t \mapsto \exp(t M)\cdot w`.

  Args:
    params: the point :math:`w`.
    direction: :math:`M`, shaped like ``symmetry.algebra_zeros(params)``.
    symmetry: the group.
    data: the batch for data-dependent groups (``None`` otherwise).
    use_retract: see :func:`orbit_derivatives`.

  Returns:
    A scalar, 0 where the curve is stationary.
  """
  derivatives = orbit_derivatives(params, direction, symmetry, data, use_retract=use_retract)
  return curvature_from_derivatives(*derivatives)


def orbit_curvature(
  symmetry: sym_lib.Symmetry,
  num_directions: int = 8,
  seed: int = 0,
  maximize: bool = False,
  *,
  use_retract: bool = True,
) -> obj_lib.Objective:
  r"""Mean curvature of the group's orbit curves through the parameters.

  For ``N = num_directions`` fixed random Lie-algebra directions :math:`M_i`,
  the curve :math:`\gamma_i(t) = \exp(t M_i)\cdot w` lies on the orbit of
  :math:`w` (the level set, for a loss-invariant action), and

  .. math::

     \kappa(w) = \frac1N \sum_i
     \frac{\sqrt{|\gamma_i'|^2 |\gamma_i''|^2 - (\gamma_i'\cdot\gamma_i'')^2}}{|\gamma_i'|^3}
     \Big|_{t=0}

  is the mean curvature of these curves at :math:`w` (the curvature of the
  minimum's orbit in the sense of Zhao et al., ICLR 2024; they relate it to
  generalisation). Curvature does not depend on the speed of a curve, so it
  does not matter how the :math:`M_i` are scaled: they are standard Gaussian
  entries (with the structure of ``symmetry.algebra_zeros(params)``)
  normalised to unit norm, drawn from ``jax.random.key(seed)``. The
  derivatives :math:`\gamma', \gamma''` come from nested ``jvp`` through
  ``symmetry.act(params, symmetry.exp(t M), data)`` (``data`` is used only
  when ``symmetry.needs_data``); a curve with :math:`\gamma' = 0` contributes
  0. The curvature is measured in the Euclidean metric of the flattened
  parameters; for a rotation orbit of a 2-D point it is ``1 / radius``.

  By default the curve is differentiated through ``symmetry.retract`` rather
  than ``symmetry.exp``: the two agree to second order for every group of this
  library, so :math:`\gamma'` and :math:`\gamma''` are the same, and the
  Cayley transform compiles much faster than a twice-differentiated matrix
  exponential (the teleport differentiates the curvature once more). Pass
  ``use_retract=False`` for a custom group whose ``retract`` is only
  first-order accurate.

  Args:
    symmetry: the group whose orbit is measured (the one the teleport uses).
    num_directions: number of random algebra directions :math:`N`.
    seed: seed of the directions.
    maximize: teleport to more curved (``True``) or flatter (``False``,
      default) parts of the orbit.
    use_retract: differentiate ``symmetry.retract`` (default) or ``symmetry.exp``.

  Returns:
    An :class:`~teleport_jax.objectives.Objective` whose ``fn(loss_fn, params, data)``
    returns ``(kappa(params), L(params))``.

  Raises:
    TypeError: if ``symmetry`` is not a teleport_jax symmetry.
    ValueError: for a ``num_directions`` that is not a positive int, or a
      ``seed`` that is not an int.

  Examples:
    >>> import jax.numpy as jnp, teleport_jax as tj
    >>> sym = tj.symmetries.QuadraticRotation(hessian=jnp.eye(2), center=jnp.zeros(2))
    >>> loss = lambda w: 0.5 * jnp.sum(w**2)
    >>> kappa, _ = tj.geometry.orbit_curvature(sym).fn(loss, jnp.asarray([3.0, 4.0]), None)
    >>> round(float(kappa), 4)  # a circle of radius 5
    0.2
  """
  if not isinstance(symmetry, sym_lib.Symmetry):
    raise TypeError(f"symmetry must be a teleport_jax symmetry, got {type(symmetry).__name__}.")
  n = _check_positive_int(num_directions, "num_directions")
  seed = _check_seed(seed)
  fn = _OrbitCurvature(symmetry, n, seed, bool(use_retract))
  name = f"{'max' if maximize else 'min'}_orbit_curvature(n={n})"
  return obj_lib.Objective(fn, bool(maximize), name)

"""What a teleport optimises over the orbit.

An objective is evaluated at a candidate point ``params`` of the orbit and
returns ``(value, loss)``: the value to optimise and the loss at ``params``
(which the solver uses to watch the level set at no extra cost).

Some objectives need more than the loss: the step size of the optimizer that
runs after the teleport (:func:`lookahead_loss` without a learning rate reads
the curvature at the start point), or the optimizer itself
(:func:`optimizer_lookahead` simulates the wrapped optax optimizer from its
state). Their :attr:`Objective.prepare` is called once per teleport with an
:class:`ObjectiveContext` and returns the function the solver evaluates.

Objectives are bounded by default: the default, ``"lookahead"``, is the loss
after a few steps of the optimizer. Maximising ``||grad L||^2`` (the paper's
objective, ``"max_grad_norm"``) has no maximum on the non-compact groups of
neural networks (for one rescaled neuron it is ``a/s^2 + b s^2 + c``): its
result is set by step counts and caps, and a fixed-step optimizer can diverge
after it. It is kept for comparison with the published experiments.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from teleport_jax._src.core import noise
from teleport_jax._src.core.errors import TeleportError
from teleport_jax._src.core.losses import LossFn
from teleport_jax._src.core.losses import call_loss
from teleport_jax._src.core.precision import upcast
from teleport_jax._src.objectives import differences as diff_lib

ObjectiveFn = Callable[[LossFn, chex.ArrayTree, Any], tuple[chex.Array, chex.Array]]


class ObjectiveContext(NamedTuple):
  """What a teleport knows besides the loss, for objectives that need it.

  Attributes:
    optimizer: the optax optimizer that runs after the teleport (``None`` when
      :func:`teleport_jax.teleport` is called on its own).
    state_at: ``state_at(params, g) -> opt_state``: the optimizer state at a
      candidate point ``params = g . params0`` under the state policy
      (``g`` is ``None`` when the solver does not track the group element).
    update_kwargs: keyword arguments for ``optimizer.update`` (``value_fn``
      and the batch, optax's convention).
  """

  optimizer: Any = None
  state_at: Callable | None = None
  update_kwargs: Any = None


class Objective(NamedTuple):
  """An objective for :func:`teleport_jax.teleport`.

  Attributes:
    fn: ``fn(loss_fn, params, data) -> (value, loss)`` (or ``-> value``).
    maximize: whether the teleport increases (``True``) or decreases ``value``.
    name: a short name for tables and error messages.
    prepare: optional ``prepare(loss_fn, params0, data, context) -> bound`` with
      ``bound(params, g) -> (value, loss)``, called once per teleport at the
      start point (``context`` is an :class:`ObjectiveContext`). Objectives that
      need the optimizer or a start-point quantity use it; ``fn`` is then only
      used by :meth:`value`.
    scale: what an inner step's improvement is measured against (the
      teleport's ``improve_rtol``): ``"value"`` (default), the objective's
      magnitude; ``"decrease"``, for a look-ahead loss, the decrease
      ``|value - loss|`` it predicts at the start point, so that a look-ahead
      over small steps still ranks orbit points by the gain they bring, with a
      floor at the loss's rounding level so that rounding never decides.
  """

  fn: ObjectiveFn
  maximize: bool
  name: str
  prepare: Callable | None = None
  scale: str = "value"

  def value(self, loss_fn, params, data=None, context=None):
    """``(value, loss)`` at ``params`` (a teleport's start point is ``params`` too)."""
    return bind(self, loss_fn, params, data, context)(params, None)


@dataclasses.dataclass(frozen=True)
class Prepared:
  """``prepare`` of an objective whose ``fn`` has a ``prepare`` method.

  Equal (and hashing alike) when the owners are equal, unlike bound methods,
  which compare by the identity of their instance; equal settings then share
  compiled code.
  """

  owner: Any

  def __call__(self, loss_fn, params0, data, context):
    return self.owner.prepare(loss_fn, params0, data, context)


def bind(objective: Objective, loss_fn, params0, data, context=None):
  """The function ``(params, g) -> (value, loss)`` a teleport from ``params0`` evaluates."""
  if objective.prepare is not None:
    return objective.prepare(loss_fn, params0, data, context or ObjectiveContext())
  return lambda params, g: evaluate(objective, loss_fn, params, data)


def has_step_model(objective: Objective) -> bool:
  """Whether :func:`step_model` gives the objective's optimizer step (a one-step look-ahead)."""
  owner = getattr(objective.prepare, "owner", None)
  return hasattr(owner, "step_model") and getattr(owner, "num_steps", None) == 1


def step_model(objective: Objective, loss_fn, params0, data, context, grads0):
  """The optimizer step a one-step look-ahead objective simulates, or ``None``.

  For :func:`lookahead_loss` and :func:`optimizer_lookahead` with
  ``num_steps=1`` the objective is ``L(w + u(grad L(w), w))``; its update
  ``u`` lets a back-end differentiate the objective with gradients only
  (:class:`~teleport_jax.solvers.OneStep`).

  Args:
    objective: the objective.
    loss_fn, params0, data, context: as for :attr:`Objective.prepare`.
    grads0: the loss gradient at ``params0``.

  Returns:
    ``update(grads, params, g) -> updates`` (a pytree like ``params``: the
    step from ``params`` given the gradient there, the optimizer state at
    ``params = g . params0`` under the state policy), or ``None``.
  """
  owner = getattr(objective.prepare, "owner", None)
  make = getattr(owner, "step_model", None)
  return None if make is None else make(loss_fn, params0, data, context, grads0)


def _grad_norm_sq(loss_fn, params, data):
  loss, grads = jax.value_and_grad(lambda p: call_loss(loss_fn, p, data))(params)
  return optax.tree.vdot(grads, grads), loss


def grad_norm_sq(maximize: bool = True) -> Objective:
  r"""The squared gradient norm :math:`\|\nabla L(g \cdot w)\|^2`.

  Maximising it is the teleport of Zhao et al. (2022): a first-order step
  from a steeper point of the level set decreases the loss more. Minimising it
  moves towards flatter points.
  """
  return Objective(_grad_norm_sq, bool(maximize), "max_grad_norm" if maximize else "min_grad_norm")


def is_concrete(x) -> bool:
  """Whether ``x`` is a concrete number (not a tracer of ``jit``/``inject_hyperparams``)."""
  return not isinstance(x, jax.core.Tracer)


def check_positive(value, name: str, *, allow_none: bool = False):
  """A positive real number (Python, NumPy or JAX scalar); tracers pass unchecked."""
  if value is None and allow_none:
    return None
  if not is_concrete(value):
    return value
  if isinstance(value, bool) or not (
    isinstance(value, numbers.Real) or (hasattr(value, "__float__") and jnp.ndim(value) == 0)
  ):
    raise ValueError(f"{name} must be a positive number, got {value!r}.")
  v = float(value)
  if not v > 0 or v == float("inf"):
    raise ValueError(f"{name} must be a positive, finite number, got {value!r}.")
  return v


def check_count(value, name: str, minimum: int = 1) -> int:
  """An int ``>= minimum`` (Python or NumPy integer)."""
  import operator

  if isinstance(value, bool):
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
  try:
    v = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.") from None
  if v < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
  return int(v)


def _gd_steps(loss_of, params, lr, k):
  loss0, grads = jax.value_and_grad(loss_of)(params)
  p = optax.tree.add_scale(params, -lr, grads)
  if k > 1:  # a loop, not an unrolled chain: compile time does not grow with k
    p = jax.lax.fori_loop(
      0, k - 1, lambda _, p: optax.tree.add_scale(p, -lr, jax.grad(loss_of)(p)), p
    )
  return loss_of(p), loss0


@dataclasses.dataclass(frozen=True)
class _Lookahead:
  """``fn`` of :func:`lookahead_loss`; hashable by value, so equal settings
  share compiled code."""

  learning_rate: Any
  num_steps: int

  def __call__(self, loss_fn, params, data):
    f = lambda p: call_loss(loss_fn, p, data)  # noqa: E731
    lr = self.learning_rate
    if lr is None:
      lr = 1.0 / _curvature_scale(f, params)
    return _gd_steps(f, params, lr, self.num_steps)

  def prepare(self, loss_fn, params0, data, context):
    del context
    f = lambda p: call_loss(loss_fn, p, data)  # noqa: E731
    lr = self.learning_rate
    if lr is None:  # the GD step a well-tuned optimizer takes at the start point
      lr = jax.lax.stop_gradient(1.0 / _curvature_scale(f, params0))
    return lambda params, g: _gd_steps(f, params, lr, self.num_steps)

  def step_model(self, loss_fn, params0, data, context, grads0):
    """The gradient step this look-ahead simulates (one step only), or ``None``."""
    del context
    if self.num_steps != 1:
      return None
    lr = self.learning_rate
    if lr is None:  # 1/lambda_max at the start point, by differences of gradients
      f = lambda p: call_loss(loss_fn, p, data)  # noqa: E731
      lam = jnp.abs(
        hessian_max_eigenvalue(f, params0, num_iterations=10, differences=True, grads=grads0)
      )
      lr = jax.lax.stop_gradient(1.0 / jnp.maximum(lam, jnp.finfo(lam.dtype).tiny))
    return lambda grads, params, g: optax.tree.scale(-lr, grads)


def _curvature_scale(loss_of, params):
  lam = jnp.abs(hessian_max_eigenvalue(lambda p: loss_of(p), params, num_iterations=20))
  return jnp.maximum(lam, jnp.finfo(lam.dtype).tiny)


def lookahead_loss(learning_rate: float | None = None, num_steps: int = 1) -> Objective:
  r"""The loss after ``num_steps`` gradient-descent steps of size ``learning_rate``.

  Minimised. Unlike the gradient norm, this objective knows the optimizer's
  step size: it prefers a point where the *next steps* decrease the loss most,
  and so does not teleport to points so steep that a fixed step overshoots
  (maximising :math:`\|\nabla L\|^2` with a fixed step size can make the next
  steps diverge). For one step it equals, to second order,
  :math:`L - \eta\|\nabla L\|^2 + \tfrac{\eta^2}{2}\nabla L^\top H \nabla L`.

  With ``learning_rate=None`` the step size is ``1 / |lambda_max(H)|`` at the
  teleport's start point (20 Hessian-vector products, once per teleport): the
  step a well-tuned gradient descent takes there. Inside
  :func:`teleport_jax.with_teleport` prefer :func:`optimizer_lookahead` (the
  default there), which simulates the wrapped optimizer itself.

  Args:
    learning_rate: the step size of the optimizer that runs after the teleport
      (a Python, NumPy or JAX scalar; traced values, e.g. from
      ``optax.inject_hyperparams``, are accepted), or ``None``.
    num_steps: how many steps to look ahead (a ``lax`` loop, differentiated through).
  """
  lr = check_positive(learning_rate, "learning_rate", allow_none=True)
  k = check_count(num_steps, "num_steps")
  fn = _Lookahead(lr, k)
  lr_name = "1/lambda_max" if lr is None else (f"{lr:g}" if is_concrete(lr) else "traced")
  return Objective(
    fn, False, f"lookahead_loss(lr={lr_name}, steps={k})", Prepared(fn), scale="decrease"
  )


def _finite_cotangents(fn: Callable) -> Callable:
  """``fn`` whose reverse-mode derivative sets non-finite input cotangents to zero.

  Adaptive optimizers divide by ``sqrt(v) + eps``; for a coordinate whose
  gradient and second moment are exactly zero (an embedding row no batch uses,
  a parameter the loss ignores) the chain rule gives ``0 * inf = nan``, which
  would poison the whole derivative of the look-ahead. Zero is the limit along
  every direction in which that coordinate stays zero.
  """

  @jax.custom_vjp
  def wrapped(*args):
    return fn(*args)

  def fwd(*args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp

  def bwd(vjp, ct):
    def clean(c):
      if jnp.issubdtype(c.dtype, jnp.inexact):
        return jnp.where(jnp.isfinite(c), c, jnp.zeros_like(c))
      return c

    return jax.tree.map(clean, vjp(ct))

  wrapped.defvjp(fwd, bwd)
  return wrapped


@dataclasses.dataclass(frozen=True)
class _OptimizerLookahead:
  """``prepare`` of :func:`optimizer_lookahead`."""

  num_steps: int

  def __call__(self, loss_fn, params, data):
    raise TeleportError(
      "optimizer_lookahead needs the optimizer: use it in teleport_jax.with_teleport, or "
      "pass optimizer= and opt_state= to teleport_jax.teleport."
    )

  def prepare(self, loss_fn, params0, data, context):
    if context is None or context.optimizer is None:
      self(loss_fn, params0, data)
    opt = context.optimizer
    kwargs = dict(context.update_kwargs or {})
    loss_of = lambda p: call_loss(loss_fn, p, data)  # noqa: E731
    k = self.num_steps

    def bound(params, g):
      # the state in the teleport's compute dtype (a bfloat16 state in float32, as the
      # candidate is); each step's state is cast like the carry, whose types are fixed
      state = upcast(jax.lax.stop_gradient(context.state_at(params, g)))
      loss0 = loss_of(params)

      update = _finite_cotangents(lambda g_, s_, p_: opt.update(g_, s_, p_, **kwargs))

      def body(_, carry):
        p, s = carry
        grads = jax.grad(loss_of)(p)
        u, new_s = update(grads, s, p)
        return optax.apply_updates(p, u), optax.tree.cast_like(new_s, s)

      p, _ = jax.lax.fori_loop(0, k, body, (params, state))
      return loss_of(p), loss0

    return bound

  def step_model(self, loss_fn, params0, data, context, grads0):
    """The optimizer's update this look-ahead simulates (one step only), or ``None``."""
    del loss_fn, params0, data, grads0
    if self.num_steps != 1:
      return None
    if context is None or context.optimizer is None:
      self(None, None, None)
    opt = context.optimizer
    kwargs = dict(context.update_kwargs or {})
    update = _finite_cotangents(lambda g_, s_, p_: opt.update(g_, s_, p_, **kwargs)[0])

    def step(grads, params, g):
      state = upcast(jax.lax.stop_gradient(context.state_at(params, g)))
      return update(grads, state, params)

    return step


def optimizer_lookahead(num_steps: int = 5) -> Objective:
  r"""The loss after ``num_steps`` steps of the wrapped optax optimizer. Minimised.

  Inside :func:`teleport_jax.with_teleport` (whose default objective this is)
  the teleport then looks for the point of the orbit from which *the
  optimizer that will run* - Adam, RMSProp, momentum, with its learning rate,
  schedule and current state - decreases the loss most. The state at a
  candidate point follows the transformation's ``state_policy`` (kept,
  re-initialised, or transported with the group element). The optimizer's
  steps are simulated in a ``lax`` loop and differentiated through.

  Args:
    num_steps: optimizer steps to simulate.
  """
  k = check_count(num_steps, "num_steps")
  fn = _OptimizerLookahead(k)
  return Objective(fn, False, f"optimizer_lookahead(steps={k})", Prepared(fn), scale="decrease")


_NAMED = {
  "max_grad_norm": lambda: grad_norm_sq(True),
  "min_grad_norm": lambda: grad_norm_sq(False),
  "lookahead": lambda: lookahead_loss(None, 5),
  "optimizer_lookahead": lambda: optimizer_lookahead(5),
}


def as_objective(objective: Objective | str | Callable) -> Objective:
  """Resolves ``objective`` to an :class:`Objective`.

  Accepts an :class:`Objective`, a name (``"lookahead"``: the loss after 5
  gradient steps of size ``1/lambda_max``; ``"optimizer_lookahead"``: after 5
  steps of the wrapped optimizer; ``"max_grad_norm"``, ``"min_grad_norm"``)
  or a user hook ``fn(loss_fn, params, data) -> scalar`` that is *maximised*
  (wrap it in :class:`Objective` with ``maximize=False`` to minimise, or return
  ``(value, loss)`` to save a loss evaluation).

  Raises:
    ValueError: for an unknown name.
    TypeError: for anything else.
  """
  if isinstance(objective, Objective):
    return objective
  if isinstance(objective, str):
    if objective not in _NAMED:
      raise ValueError(
        f"Unknown objective {objective!r}; expected one of {sorted(_NAMED)}, a "
        "teleport_jax.objectives.Objective or a callable."
      )
    return _NAMED[objective]()
  if callable(objective):
    return Objective(objective, True, getattr(objective, "__name__", "custom"))
  raise TypeError(
    f"objective must be a name, a teleport_jax.objectives.Objective or a callable, got "
    f"{type(objective).__name__}."
  )


def hessian_max_eigenvalue(
  loss_fn: LossFn,
  params: chex.ArrayTree,
  data: Any = None,
  *,
  num_iterations: int = 20,
  differences: bool = False,
  grads: chex.ArrayTree | None = None,
) -> chex.Array:
  r"""The Hessian eigenvalue of largest magnitude, by power iteration.

  Runs ``num_iterations`` Hessian-vector products (forward-over-reverse,
  :func:`jax.jvp` of :func:`jax.grad`, so the Hessian is never formed) from a
  fixed pseudo-random unit vector (numpy's ``default_rng(0)``), inside a
  ``lax.fori_loop``, and returns the Rayleigh quotient :math:`v^\top H v` of
  the last iterate. It converges to the eigenvalue of largest magnitude (with
  its sign) from below in magnitude; the rate depends on the gap to the second.

  Gradient descent with step size :math:`\eta` is stable on a quadratic iff
  :math:`\eta\,|\lambda| < 2` for every eigenvalue :math:`\lambda` of its
  Hessian (the "sharpness" :math:`\eta\lambda_{\max}`).

  Args:
    loss_fn: ``loss_fn(params, data) -> scalar`` (``loss_fn(params)`` when
      ``data`` is ``None``).
    params: parameter pytree (``n`` parameters in all).
    data: the batch passed to ``loss_fn``.
    num_iterations: power iterations (static; at least 1).
    differences: Hessian-vector products as forward differences of gradients
      (one gradient each, a first-order program) instead of forward-over-reverse.
    grads: the loss gradient at ``params``, if known (saves one gradient with
      ``differences``).

  Returns:
    A scalar of the parameters' dtype.

  Raises:
    ValueError: if ``num_iterations`` is not a positive integer.

  Examples:
    >>> import jax.numpy as jnp, teleport_jax as tj
    >>> loss = lambda w: 0.5 * (3.0 * w[0] ** 2 + w[1] ** 2)
    >>> float(tj.geometry.hessian_max_eigenvalue(loss, jnp.ones(2), num_iterations=50))
    3.0
  """
  num_iterations = check_count(num_iterations, "num_iterations")
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  grad_fn = jax.grad(lambda p: call_loss(loss_fn, p, data))
  tiny = jnp.finfo(flat.dtype).tiny

  if differences:
    g0 = jax.flatten_util.ravel_pytree(grad_fn(params) if grads is None else grads)[0]

    def hvp(v):
      flat_g = lambda x: jax.flatten_util.ravel_pytree(grad_fn(unravel(x)))[0]  # noqa: E731
      return diff_lib.directional_difference(flat_g, flat, g0, v)

  else:

    def hvp(v):
      return jax.flatten_util.ravel_pytree(jax.jvp(grad_fn, (params,), (unravel(v),))[1])[0]

  def body(_, carry):
    v, _ = carry
    hv = hvp(v)
    return hv / jnp.maximum(jnp.linalg.norm(hv), tiny), jnp.vdot(v, hv)

  v0 = noise.normal(0, flat.shape, flat.dtype)
  v0 = v0 / jnp.maximum(jnp.linalg.norm(v0), tiny)
  _, lam = jax.lax.fori_loop(0, int(num_iterations), body, (v0, jnp.zeros((), flat.dtype)))
  return lam


@dataclasses.dataclass(frozen=True)
class _StabilityConstrained:
  """``fn`` of :func:`stability_constrained`; hashable by value."""

  objective: Objective
  learning_rate: float
  threshold: float
  num_iterations: int

  def _constrain(self, loss_fn, params, data, value):
    # The constraint only selects points; it is not differentiated (no third derivatives).
    lam = hessian_max_eigenvalue(
      loss_fn, jax.lax.stop_gradient(params), data, num_iterations=self.num_iterations
    )
    feasible = self.learning_rate * jnp.abs(lam) <= self.threshold
    worst = -jnp.inf if self.objective.maximize else jnp.inf
    return jnp.where(feasible, value, jnp.asarray(worst, jnp.result_type(value)))

  def __call__(self, loss_fn, params, data):
    value, loss = evaluate(self.objective, loss_fn, params, data)
    return self._constrain(loss_fn, params, data, value), loss

  def prepare(self, loss_fn, params0, data, context):
    inner = bind(self.objective, loss_fn, params0, data, context)

    def bound(params, g):
      value, loss = inner(params, g)
      return self._constrain(loss_fn, params, data, value), loss

    return bound


def stability_constrained(
  objective: Objective | str | Callable,
  learning_rate: float,
  *,
  threshold: float = 2.0,
  num_iterations: int = 20,
) -> Objective:
  r"""``objective`` restricted to points where a step of ``learning_rate`` is stable.

  The value is ``objective``'s wherever
  :math:`\eta\,|\lambda_{\max}(H(g\cdot w))| \le` ``threshold`` (with
  :math:`\lambda_{\max}` from :func:`hessian_max_eigenvalue`) and the worst
  possible value (:math:`-\infty` when maximised, :math:`+\infty` when
  minimised) elsewhere. The solver's safeguard (``safeguard=True``, the
  default) keeps an inner step only if the objective improves and stays
  finite, so a teleport that starts at a feasible point never moves to a point
  that breaks the bound; one that starts above the bound does not move at all
  (``info.objective_before`` is then infinite). With ``safeguard=False`` the
  bound is not enforced.

  Teleports can raise the curvature a lot: maximising :math:`\|\nabla L\|^2`
  steepens the level set until a fixed step overshoots, and a few-step
  :func:`lookahead_loss` does not see an unstable direction that the gradient
  barely excites yet, so a schedule of repeated teleports can end in a
  non-finite loss. Constraining either objective keeps the optimizer's next
  steps stable at every teleported point.

  The default ``threshold=2`` is the stability limit of plain gradient descent
  (:math:`\eta\lambda < 2`); choose less for a margin, :math:`2(1+\beta)` for
  heavy-ball momentum :math:`\beta`. For a learning-rate schedule pass its
  largest value: a bound that holds for the largest step holds for smaller ones.
  Each evaluation costs ``num_iterations`` Hessian-vector products on top of
  ``objective``.

  Args:
    objective: the objective to constrain (anything :func:`as_objective` accepts).
    learning_rate: the step size of the optimizer that runs after the teleport.
    threshold: the bound on ``learning_rate * |lambda_max|``.
    num_iterations: power iterations per evaluation.

  Returns:
    An :class:`Objective` that optimises in the same direction as ``objective``.

  Raises:
    ValueError: for a non-positive ``learning_rate`` or ``threshold`` or a
      non-positive ``num_iterations``.

  Examples:
    >>> import teleport_jax as tj
    >>> obj = tj.objectives.stability_constrained(tj.objectives.lookahead_loss(1e-4, 5), 1e-4)
    >>> obj.maximize, obj.name
    (False, 'stability_constrained(lookahead_loss(lr=0.0001, steps=5), lr*|lambda|<=2)')
  """
  objective = as_objective(objective)
  lr = check_positive(learning_rate, "learning_rate")
  t = check_positive(threshold, "threshold")
  k = check_count(num_iterations, "num_iterations")
  fn = _StabilityConstrained(objective, lr, t, k)
  return Objective(
    fn,
    objective.maximize,
    f"stability_constrained({objective.name}, lr*|lambda|<={t:g})",
    Prepared(fn) if objective.prepare is not None else None,
    scale=objective.scale,
  )


def evaluate(objective: Objective, loss_fn, params, data):
  """Returns ``(value, loss)`` for any objective, plain-scalar hooks included."""
  out = objective.fn(loss_fn, params, data)
  if isinstance(out, tuple):
    return out
  return out, call_loss(loss_fn, params, data)

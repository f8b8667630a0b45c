"""What a teleport optimises over the orbit.

An objective is evaluated at a candidate point ``params`` of the orbit and
returns ``(value, loss)``: the value to optimise and the loss at ``params``
(which the solver uses to watch the level set at no extra cost).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

LossFn = Callable[..., chex.Array]
ObjectiveFn = Callable[[LossFn, chex.ArrayTree, Any], tuple[chex.Array, chex.Array]]


def call_loss(loss_fn: LossFn, params: chex.ArrayTree, data: Any) -> chex.Array:
  """Calls ``loss_fn(params, data)``, or ``loss_fn(params)`` when ``data is None``."""
  return loss_fn(params) if data is None else loss_fn(params, data)


class Objective(NamedTuple):
  """An objective for :func:`teleport_jax.teleport`.

  Attributes:
    fn: ``fn(loss_fn, params, data) -> (value, loss)``.
    maximize: whether the teleport increases (``True``) or decreases ``value``.
    name: a short name for tables and error messages.
  """

  fn: ObjectiveFn
  maximize: bool
  name: str


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


@dataclasses.dataclass(frozen=True)
class _Lookahead:
  """``fn`` of :func:`lookahead_loss`; hashable by value, so equal settings
  share compiled code."""

  learning_rate: float
  num_steps: int

  def __call__(self, loss_fn, params, data):
    lr, k = self.learning_rate, self.num_steps
    f = lambda p: call_loss(loss_fn, p, data)  # noqa: E731
    loss0, grads = jax.value_and_grad(f)(params)
    p = optax.tree.add_scale(params, -lr, grads)
    if k > 1:  # a loop, not an unrolled chain: compile time does not grow with k
      p = jax.lax.fori_loop(0, k - 1, lambda _, p: optax.tree.add_scale(p, -lr, jax.grad(f)(p)), p)
    return f(p), loss0


def lookahead_loss(learning_rate: float, num_steps: int = 1) -> Objective:
  r"""The loss after ``num_steps`` gradient-descent steps of size ``learning_rate``.

  Minimised. Unlike the gradient norm, this objective knows the optimizer's
  step size: it prefers a point where the *next steps* decrease the loss most,
  and so does not teleport to points so steep that a fixed step overshoots
  (maximising :math:`\|\nabla L\|^2` with a fixed step size can make the next
  steps diverge). For one step it equals, to second order,
  :math:`L - \eta\|\nabla L\|^2 + \tfrac{\eta^2}{2}\nabla L^\top H \nabla L`.

  Args:
    learning_rate: the step size of the optimizer that runs after the teleport.
    num_steps: how many steps to look ahead (a ``lax`` loop, differentiated through).
  """
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be positive, got {learning_rate}.")
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps must be a positive integer, got {num_steps}.")
  lr, k = float(learning_rate), int(num_steps)
  return Objective(_Lookahead(lr, k), False, f"lookahead_loss(lr={lr:g}, steps={k})")


_NAMED = {
  "max_grad_norm": lambda: grad_norm_sq(True),
  "min_grad_norm": lambda: grad_norm_sq(False),
}


def as_objective(objective: Objective | str | Callable) -> Objective:
  """Resolves ``objective`` to an :class:`Objective`.

  Accepts an :class:`Objective`, a name (``"max_grad_norm"``, ``"min_grad_norm"``)
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
        "teleport_jax.Objective or a callable."
      )
    return _NAMED[objective]()
  if callable(objective):
    return Objective(objective, True, getattr(objective, "__name__", "custom"))
  raise TypeError(
    f"objective must be a name, a teleport_jax.Objective or a callable, got "
    f"{type(objective).__name__}."
  )


def hessian_max_eigenvalue(
  loss_fn: LossFn, params: chex.ArrayTree, data: Any = None, *, num_iterations: int = 20
) -> chex.Array:
  r"""The Hessian eigenvalue of largest magnitude, by power iteration.

  Runs ``num_iterations`` Hessian-vector products (forward-over-reverse,
  :func:`jax.jvp` of :func:`jax.grad`, so the Hessian is never formed) from a
  fixed pseudo-random unit vector (``jax.random.key(0)``), inside a
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

  Returns:
    A scalar of the parameters' dtype.

  Raises:
    ValueError: if ``num_iterations`` is not a positive integer.

  Examples:
    >>> import jax.numpy as jnp, teleport_jax as tj
    >>> loss = lambda w: 0.5 * (3.0 * w[0] ** 2 + w[1] ** 2)
    >>> float(tj.hessian_max_eigenvalue(loss, jnp.ones(2), num_iterations=50))
    3.0
  """
  if (
    isinstance(num_iterations, bool) or int(num_iterations) != num_iterations or num_iterations < 1
  ):
    raise ValueError(f"num_iterations must be a positive integer, got {num_iterations!r}.")
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  grad_fn = jax.grad(lambda p: call_loss(loss_fn, p, data))
  tiny = jnp.finfo(flat.dtype).tiny

  def hvp(v):
    return jax.flatten_util.ravel_pytree(jax.jvp(grad_fn, (params,), (unravel(v),))[1])[0]

  def body(_, carry):
    v, _ = carry
    hv = hvp(v)
    return hv / jnp.maximum(jnp.linalg.norm(hv), tiny), jnp.vdot(v, hv)

  v0 = jax.random.normal(jax.random.key(0), flat.shape, flat.dtype)
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

  def __call__(self, loss_fn, params, data):
    value, loss = evaluate(self.objective, loss_fn, params, data)
    # The constraint only selects points; it is not differentiated (no third derivatives).
    lam = hessian_max_eigenvalue(
      loss_fn, jax.lax.stop_gradient(params), data, num_iterations=self.num_iterations
    )
    feasible = self.learning_rate * jnp.abs(lam) <= self.threshold
    worst = -jnp.inf if self.objective.maximize else jnp.inf
    return jnp.where(feasible, value, jnp.asarray(worst, jnp.result_type(value))), loss


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
    >>> obj = tj.stability_constrained(tj.lookahead_loss(1e-4, 5), 1e-4)
    >>> obj.maximize, obj.name
    (False, 'stability_constrained(lookahead_loss(lr=0.0001, steps=5), lr*|lambda|<=2)')
  """
  objective = as_objective(objective)
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be positive, got {learning_rate}.")
  if not threshold > 0:
    raise ValueError(f"threshold must be positive, got {threshold}.")
  if (
    isinstance(num_iterations, bool) or int(num_iterations) != num_iterations or num_iterations < 1
  ):
    raise ValueError(f"num_iterations must be a positive integer, got {num_iterations!r}.")
  lr, t, k = float(learning_rate), float(threshold), int(num_iterations)
  return Objective(
    _StabilityConstrained(objective, lr, t, k),
    objective.maximize,
    f"stability_constrained({objective.name}, lr*|lambda|<={t:g})",
  )


def evaluate(objective: Objective, loss_fn, params, data):
  """Returns ``(value, loss)`` for any objective, plain-scalar hooks included."""
  out = objective.fn(loss_fn, params, data)
  if isinstance(out, tuple):
    return out
  return out, call_loss(loss_fn, params, data)

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


def evaluate(objective: Objective, loss_fn, params, data):
  """Returns ``(value, loss)`` for any objective, plain-scalar hooks included."""
  out = objective.fn(loss_fn, params, data)
  if isinstance(out, tuple):
    return out
  return out, call_loss(loss_fn, params, data)

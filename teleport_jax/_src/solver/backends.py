r"""Teleport back-ends: how the next candidate point is proposed.

The driver (:func:`teleport_jax.teleport`) owns the ``lax`` loop, the guard
(a step is kept iff it is finite, keeps the loss within ``rtol`` and improves
the objective beyond rounding) and the :class:`~teleport_jax.TeleportInfo`. A
back-end only proposes. It is a frozen dataclass whose fields are its
hyper-parameters, with

* ``init(problem, params) -> (state, aux)``: its state at the start point and
  an ``aux`` with the structure :meth:`evaluate` returns (zeros);
* ``evaluate(problem, params, g) -> (signed_value, value, loss, aux)``: the
  objective at a point and what the next proposal needs there (e.g. a
  gradient);
* ``propose(problem, params, state, aux) -> (candidate, step)``: the next
  candidate from the current accepted point (``step`` is a group element
  when the back-end moves along a group, else ``None``);
* ``update(state, accepted, improvement, aux) -> state``: adapts to the
  driver's decision (``improvement`` is the signed objective change of the
  proposal, ``aux`` what the proposal was made from);
* ``stats(state) -> dict``: its own statistics, reported in
  ``TeleportInfo.stats``;
* ``moves(state)``: whether anything can move at all (``False``: the driver
  reports ``NOTHING_TO_MOVE`` without searching);
* ``cost_per_step()``: the work of one inner step, in gradient evaluations,
  counting the objective's gradient as one.

``"lie"`` (:class:`Lie`) is gradient ascent on the group's Lie algebra. Two
back-ends need no group (``needs_symmetry = False``, ``symmetry=None``):
``"nullspace"`` (:class:`~teleport_jax.solvers.NullSpace`, the objective's gradient
projected onto the null space of each layer's input batch) and ``"levelset"``
(:class:`~teleport_jax.solvers.LevelSet`, tangent steps on the loss level set with
Newton corrections back onto it).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from teleport_jax._src.objectives import objectives as obj_lib
from teleport_jax._src.objectives import stability as stab_lib
from teleport_jax._src.symmetries import symmetry as sym_lib


@dataclasses.dataclass(frozen=True)
class Problem:
  """What a back-end works on (built by the driver inside the trace).

  Attributes:
    loss_fn: the loss, ``loss_fn(params, data)``.
    data: the batch.
    symmetry: the group (``None`` for group-free back-ends).
    objective: ``objective(params, g) -> (value, loss)`` (bound at the start point).
    sign: ``+1`` to maximise the objective, ``-1`` to minimise it.
    dtype: the compute dtype.
    params0: the start point.
    loss0: the loss at the start point.
  """

  loss_fn: Callable
  data: Any
  symmetry: sym_lib.Symmetry | None
  objective: Callable
  sign: float
  dtype: Any
  params0: Any
  loss0: Any

  def loss(self, params):
    return obj_lib.call_loss(self.loss_fn, params, self.data)

  def signed(self, params, g=None):
    value, loss = self.objective(params, g)
    return self.sign * value, (value, loss)


class Solver(abc.ABC):
  """A teleport back-end (see the module docstring)."""

  #: whether the back-end needs a symmetry group
  needs_symmetry: bool = True
  #: whether ``propose`` returns group elements (so optimizer state can be transported)
  tracks_element: bool = False

  @abc.abstractmethod
  def init(self, problem: Problem, params) -> Any: ...

  @abc.abstractmethod
  def evaluate(
    self, problem: Problem, params, g
  ) -> tuple[chex.Array, chex.Array, chex.Array, Any]: ...

  @abc.abstractmethod
  def propose(self, problem: Problem, params, state, aux) -> tuple[Any, Any]: ...

  @abc.abstractmethod
  def update(self, state, accepted: chex.Array, improvement: chex.Array, aux: Any) -> Any: ...

  def stats(self, state) -> dict[str, chex.Array]:
    del state
    return {}

  def moves(self, state) -> chex.Array | bool:
    """Whether anything can move (``False``: status ``NOTHING_TO_MOVE``, no search)."""
    del state
    return True

  def stats_template(self, dtype) -> dict[str, chex.Array]:
    """Zeros with the structure of :meth:`stats` (for an info record before any teleport)."""
    del dtype
    return {}

  def cost_per_step(self) -> float:
    """Extra work per inner step, in objective-gradient evaluations (for reports)."""
    return 1.0

  def default_objective(self, optimizer_known: bool) -> obj_lib.Objective:
    """The objective of a teleport that names none: the loss after 5 steps of the
    optimizer that runs after it, if known, else of gradient descent at ``1/lambda_max``."""
    return obj_lib.optimizer_lookahead(5) if optimizer_known else obj_lib.lookahead_loss(None, 5)

  def default_stability(self):
    """The stability bound ``stability="auto"`` applies when the optimizer is known."""
    return stab_lib.Stability()


def algebra_gradient(problem: Problem, w, g):
  """``(signed value, value, loss, its gradient in the Lie algebra at xi = 0)`` at ``w``.

  The objective is differentiated through the linearised action (first order is
  all a gradient at ``xi = 0`` needs, so matrix groups use ``I + xi``).
  """
  sym = problem.symmetry

  def j(xi):
    return problem.signed(sym.act_linearized(w, xi, problem.data), g)

  (jv, (value, loss)), grad = jax.value_and_grad(j, has_aux=True)(sym.algebra_zeros(w))
  return jv, value, loss, grad


class LieState(NamedTuple):
  eta: chex.Array


def check_step_fields(solver: Any) -> None:
  """Validates (and normalises) the step-size fields a back-end has.

  ``step_size``, ``max_step_size``, ``grow`` and ``shrink`` must be positive;
  concrete values become Python floats. For frozen dataclasses, from
  ``__post_init__``.
  """
  for name in ("step_size", "max_step_size", "grow", "shrink"):
    if hasattr(solver, name):
      object.__setattr__(solver, name, obj_lib.check_positive(getattr(solver, name), name))


def adapted_step(eta: chex.Array, accepted: chex.Array, solver: Any) -> chex.Array:
  """The next step size: ``grow`` after a kept step (capped at ``max_step_size``),
  ``shrink`` after a refused one; in ``eta``'s dtype."""
  eta_next = jnp.where(
    accepted, jnp.minimum(eta * solver.grow, solver.max_step_size), eta * solver.shrink
  )
  return eta_next.astype(eta.dtype)


@dataclasses.dataclass(frozen=True)
class Lie(Solver):
  r"""Gradient ascent (or descent) on the group's Lie algebra.

  At the current point ``w`` it differentiates
  ``J(xi) = objective(act_linearized(w, xi))`` at ``xi = 0`` (first order is
  all the gradient needs, so matrix groups use ``I + xi``, no factorisation),
  takes ``xi = step_size * grad / |grad|`` (or ``step_size * grad`` with
  ``normalize=False``) and moves to ``act(w, retract(xi))``: a true group
  element (the Cayley transform for matrix groups).

  The step size adapts like a trust region: a refused step multiplies it by
  ``shrink``; a kept step whose improvement is at least half the first-order
  prediction (``step_size * |grad|``, or ``step_size * |grad|^2``) grows it by
  ``grow`` (up to ``max_step_size``), one that brings less than a tenth of it
  shrinks it. Near an optimum of the orbit the steps therefore shrink and the
  search converges, instead of bouncing around the optimum with full-size
  normalised steps (a chaotic map, on which two machines' rounding would lead
  to different points).

  Attributes:
    step_size: initial step (norm of the algebra step when normalised).
    normalize: normalise the algebra gradient.
    max_step_size: cap on the adapted step size (default 0.5: with larger normalised
      steps the search is chaotic near an optimum, and one device and eight, or two
      machines, end on visibly different points of the orbit).
    grow: largest factor after a kept step.
    shrink: factor after a refused step (and the smallest after a kept one).
    trust_region: adapt kept steps by the ratio of actual to predicted
      improvement (default); ``False`` grows every kept step by ``grow``.
  """

  step_size: Any = 0.1
  normalize: bool = True
  max_step_size: Any = 0.5
  grow: float = 1.5
  shrink: float = 0.5
  trust_region: bool = True

  needs_symmetry = True
  tracks_element = True

  def __post_init__(self):
    check_step_fields(self)
    if not isinstance(self.normalize, bool):
      raise TypeError(f"normalize must be a bool, got {self.normalize!r}.")

  def init(self, problem, params):
    state = LieState(eta=jnp.asarray(self.step_size, problem.dtype))
    return state, problem.symmetry.algebra_zeros(params)

  def evaluate(self, problem, w, g):
    return algebra_gradient(problem, w, g)

  def propose(self, problem, w, state, aux):
    gnorm = optax.tree.norm(aux)
    tiny = jnp.finfo(problem.dtype).tiny
    scale = state.eta / jnp.maximum(gnorm, tiny) if self.normalize else state.eta
    xi = optax.tree.scale(scale, aux)
    step = problem.symmetry.retract(xi)
    return problem.symmetry.act(w, step, problem.data), step

  def update(self, state, accepted, improvement, aux):
    gnorm = optax.tree.norm(aux)
    predicted = state.eta * (gnorm if self.normalize else gnorm * gnorm)
    ratio = improvement / jnp.maximum(predicted, jnp.finfo(state.eta.dtype).tiny)
    # continuous in the ratio: rounding cannot flip a discrete choice here
    factor = jnp.clip(self.shrink + (self.grow - self.shrink) * ratio, self.shrink, self.grow)
    if not self.trust_region:
      factor = self.grow
    kept = jnp.minimum(state.eta * factor, self.max_step_size)
    eta = jnp.where(accepted, kept, state.eta * self.shrink)
    return LieState(eta=eta.astype(state.eta.dtype))

  def stats(self, state):
    return {"final_step_size": state.eta}

  def stats_template(self, dtype):
    return {"final_step_size": jnp.zeros((), dtype)}

  def cost_per_step(self) -> float:
    return 1.0


# The back-ends by short name, read by :func:`as_solver` when it is called. The
# modules that define the other back-ends import this one and register into it
# (``SOLVERS["nullspace"] = NullSpace``), so this module imports none of them;
# ``teleport_jax`` imports them all, so every name is there before any call.
SOLVERS: dict[str, Callable[[], Solver]] = {
  "lie": Lie,
}


def as_solver(solver: Solver | str | None) -> Solver:
  """A back-end from itself or a short name (``"lie"``, ``"nullspace"``, ``"levelset"``)."""
  if solver is None:
    return SOLVERS["onestep"]()
  if isinstance(solver, Solver):
    return solver
  if isinstance(solver, str):
    key = solver.lower().replace("-", "").replace("_", "")
    if key in SOLVERS:
      return SOLVERS[key]()
    raise ValueError(
      f"Unknown solver {solver!r}; expected one of {sorted(SOLVERS)} or a teleport_jax Solver."
    )
  raise TypeError(f"solver must be a name or a teleport_jax Solver, got {type(solver).__name__}.")

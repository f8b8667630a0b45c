r"""The one-step back-end: one objective gradient, then a few value-only trials.

:class:`OneStep` spends one evaluation of the objective's gradient in the Lie
algebra at the start point and then only evaluates the objective, at points
along that gradient whose distance a quadratic fit chooses:

1. at the start point ``w``, the algebra gradient ``d`` of the objective
   ``J``. For a one-step look-ahead
   :math:`J(w') = L(w' + u(\nabla L(w'), w'))` (:func:`~teleport_jax.objectives.optimizer_lookahead`
   or :func:`~teleport_jax.objectives.lookahead_loss` with ``num_steps=1``,
   ``u`` the optimizer's update) it needs gradients only:
   :math:`\nabla J = v + H z_g + z_p`, with :math:`v = \nabla L(w + u)`,
   :math:`(z_g, z_p)` the cotangents of ``u`` (a first-order derivative of
   an elementwise map) and :math:`H z_g` a forward difference of the gradient,
   pulled back to the algebra through the linearised action: two gradients,
   the train step's own gradient at ``w`` reused, and a first-order program;
   any other objective is differentiated as :class:`~teleport_jax.solvers.Lie`
   does;
2. ``num_steps`` trials at normalised distances ``t`` along ``d`` from the
   start point: the first at ``step_size``; after a trial that improved, the
   next is ``grow`` times farther (at most ``max_step_size``); after one that
   did not, it goes back to where the parabola through the start value, its
   slope ``|d|`` and that trial peaks (between ``shrink`` and half that
   distance), and after one that is not finite or leaves the level set,
   ``shrink`` times closer. Each trial costs one gradient and one loss (the
   look-ahead from it); the best one that passes the driver's guard is kept,
   and its loss and gradient are returned, so the optimizer step after a
   teleport costs nothing more.

The driver checks the stability bound at every trial that would be kept (the
bound's products as differences, one gradient each). A teleport then costs
about ``2 + 1.3 * num_steps`` gradients plus the bound's power iterations,
against hundreds for ten :class:`~teleport_jax.solvers.Lie` steps through a
differentiated five-step look-ahead.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from teleport_jax._src.objectives import differences as diff_lib
from teleport_jax._src.objectives import objectives as obj_lib
from teleport_jax._src.objectives import stability as stab_lib
from teleport_jax._src.solver import backends


class OneStepState(NamedTuple):
  """The trial distances: ``eta`` of the kept point, ``next_eta`` of the next trial."""

  eta: chex.Array
  next_eta: chex.Array


@dataclasses.dataclass(frozen=True)
class OneStep(backends.Solver):
  """One objective gradient in the algebra, then value-only trials along it.

  See the module docstring. ``num_steps`` of the teleport is the number of
  trials (default 2 with this back-end).

  Attributes:
    step_size: the first trial's distance (norm of the algebra step).
    max_step_size: the largest trial distance.
    grow: the largest factor from one trial's distance to the next.
    shrink: the factor after a trial that is not finite or leaves the level set
      (and the smallest one otherwise).
    rounds: how many times the search takes the objective's gradient (at the
      start point, then at the best point so far) and runs its trials.
    stability_iterations: power iterations of the default stability bound at
      the start point and, warm-started, at the kept point (products by
      differences, one gradient each).
  """

  step_size: Any = 0.5
  max_step_size: Any = 8.0
  grow: float = 4.0
  shrink: float = 0.25
  rounds: int = 2
  stability_iterations: tuple[int, int] = (6, 3)

  needs_symmetry = True
  tracks_element = True
  one_shot = True
  default_num_steps = 2

  def __post_init__(self):
    backends.check_step_fields(self)
    if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 1:
      raise ValueError(f"rounds must be a positive int, got {self.rounds!r}.")
    its = tuple(self.stability_iterations)
    if len(its) != 2 or any(not isinstance(i, int) or i < 1 for i in its):
      raise ValueError(
        f"stability_iterations must be two positive ints, got {self.stability_iterations!r}."
      )
    object.__setattr__(self, "stability_iterations", its)

  def default_objective(self, optimizer_known: bool):
    """The loss after one step of the optimizer that runs after the teleport (if known,
    else of gradient descent at ``1/lambda_max``): its gradient needs gradients only."""
    return obj_lib.optimizer_lookahead(1) if optimizer_known else obj_lib.lookahead_loss(None, 1)

  def default_stability(self):
    n0, n1 = self.stability_iterations
    return stab_lib.Stability(num_iterations=n0, warm_iterations=n1, differences=True)

  # the loop-driver interface (used when the driver runs this back-end step by step)
  def init(self, problem, params):
    eta = jnp.asarray(self.step_size, problem.dtype)
    return OneStepState(eta=jnp.zeros_like(eta), next_eta=eta), problem.symmetry.algebra_zeros(
      params
    )

  def evaluate(self, problem, w, g):
    return backends.algebra_gradient(problem, w, g)

  def propose(self, problem, w, state, aux):
    return self._move(problem, w, aux, state.next_eta)

  def update(self, state, accepted, improvement, aux):
    del improvement, aux
    eta = jnp.where(accepted, state.next_eta, state.eta)
    nxt = jnp.where(accepted, state.next_eta * self.grow, state.next_eta * self.shrink)
    nxt = jnp.minimum(nxt, self.max_step_size)
    return OneStepState(eta=eta.astype(state.eta.dtype), next_eta=nxt.astype(state.eta.dtype))

  def stats(self, state):
    return {"final_step_size": state.eta}

  def stats_template(self, dtype):
    return {"final_step_size": jnp.zeros((), dtype)}

  def cost_per_step(self) -> float:
    return 0.5

  # ------------------------------------------------------------------ one shot
  def _move(self, problem, w, d, eta):
    """``(act(w, retract(eta d / |d|)), element)``."""
    dn = optax.tree.norm(d)
    scale = eta / jnp.maximum(dn, jnp.finfo(problem.dtype).tiny)
    step = problem.symmetry.retract(optax.tree.scale(scale, d))
    return problem.symmetry.act(w, step, problem.data), step

  def direction(self, problem, w, grads, g, model):
    """``(signed value, value, loss, algebra gradient of the signed value)`` at ``w``."""
    if model is None:
      return self.evaluate(problem, w, g)
    sym, sign = problem.symmetry, problem.sign
    grad_fn = jax.grad(problem.loss)
    u, vjp_u = jax.vjp(lambda gr, p: model(gr, p, g), grads, w)
    value, v = jax.value_and_grad(problem.loss)(optax.apply_updates(w, u))
    zg, zp = vjp_u(v)
    hz = diff_lib.directional_difference(grad_fn, w, grads, zg)
    grad_w = optax.tree.add(optax.tree.add(v, hz), zp)
    _, vjp_act = jax.vjp(lambda xi: sym.act_linearized(w, xi, problem.data), sym.algebra_zeros(w))
    (d,) = vjp_act(optax.tree.cast_like(grad_w, w))
    return sign * value, value, problem.loss0, optax.tree.scale(sign, d)

  def value(self, problem, w, g, model):
    """``(signed value, value, loss, gradient)`` at ``w``; the gradient is ``None`` without
    a step model."""
    if model is None:
      jv, (value, loss) = problem.signed(w, g)
      return jv, value, loss, None
    loss, grads = jax.value_and_grad(problem.loss)(w)
    value = problem.loss(optax.apply_updates(w, model(grads, w, g)))
    return problem.sign * value, value, loss, grads

  def search(self, problem, init, judge, num_trials: int, model):
    """The driver's one-shot search: the carry after ``rounds`` rounds of ``num_trials`` trials.

    Args:
      problem: the driver's :class:`~teleport_jax._src.solver.backends.Problem`.
      init: the driver's carry at the start point (its ``loss`` and ``grads`` there).
      judge: ``judge(carry, first, cand, g, jv, value, loss, aux, grads) -> (carry, ok)``.
      num_trials: trials per round (static).
      model: the objective's step model (:func:`~teleport_jax.objectives.step_model`) or ``None``.
    """
    dtype = problem.dtype

    def round_(r, carry):
      # a round: the direction at the best point so far, then trials from there; one
      # lax loop over the rounds, so that XLA compiles the direction and a trial once
      c, eta = carry
      w_r, g_r = c.w, c.g
      jv_r, value_r, loss_r, d = self.direction(problem, w_r, c.grads, g_r, model)
      # the first round judges the start point (kept, whatever it is)
      started, _ = judge(c, True, w_r, g_r, jv_r, value_r, loss_r, d, c.grads)
      c = jax.tree_util.tree_map(lambda a, b: jnp.where(r == 0, a, b), started, c._replace(aux=d))
      jv_r = jnp.asarray(jv_r, dtype)
      slope = optax.tree.norm(c.aux)

      def trial(_, carry):
        c, eta = carry
        cand, step = self._move(problem, w_r, c.aux, eta)
        g_cand = None if g_r is None else problem.symmetry.compose(g_r, step)
        jv, value, loss, grads = self.value(problem, cand, g_cand, model)
        grads = c.grads if grads is None else grads
        new, ok = judge(c, False, cand, g_cand, jv, value, loss, c.aux, grads)
        # after an improving trial: farther (up to grow times); otherwise back to where the
        # parabola through (0, jv_r) with slope |d| and (eta, jv) peaks, or shrink times
        jv = jnp.asarray(jv, dtype)
        a = 2.0 * (jv_r + slope * eta - jv) / jnp.maximum(eta * eta, jnp.finfo(dtype).tiny)
        peak = jnp.where(a > 0, slope / jnp.where(a > 0, a, 1.0), eta * self.shrink)
        back = jnp.clip(peak, eta * self.shrink, eta * 0.5)
        usable = (new.n_drift == c.n_drift) & (new.n_nonfinite == c.n_nonfinite)
        nxt = jnp.where(ok, jnp.minimum(eta * self.grow, self.max_step_size), back)
        nxt = jnp.where(usable, nxt, eta * self.shrink).astype(eta.dtype)
        kept_eta = jnp.where(ok, eta, c.bstate.eta).astype(c.bstate.eta.dtype)
        return new._replace(bstate=OneStepState(eta=kept_eta, next_eta=nxt)), nxt

      c, _ = jax.lax.fori_loop(0, num_trials, trial, (c, eta))
      # the next round starts at the distance that last worked
      eta = jnp.where(c.bstate.eta > 0, c.bstate.eta, eta).astype(dtype)
      return c, eta

    eta = jnp.asarray(self.step_size, dtype)
    c, _ = jax.lax.fori_loop(0, self.rounds, round_, (init, eta))
    return c


backends.SOLVERS["onestep"] = OneStep

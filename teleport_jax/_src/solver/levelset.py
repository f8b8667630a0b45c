r"""Teleporting without a group: steps inside the loss level set.

The level set :math:`\{w : L(w) = L(w_0)\}` of any differentiable loss is
(away from critical points) a smooth hypersurface whose tangent space at ``w``
is the orthogonal complement of :math:`\nabla L(w)`. :class:`LevelSet` moves
along it without knowing any symmetry (after Mishkin, Bietti and Gower, 2024,
who maximise :math:`\log\|\nabla L\|^2` by sequential linear programming):

1. **Tangent step.** The objective's gradient ``G`` minus its component along
   :math:`g = \nabla L(w)`: :math:`d = G - (G\cdot g / \|g\|^2)\, g`, scaled to
   the step size.
2. **Second-order correction.** Along a tangent step ``s`` the loss rises by
   :math:`\tfrac12 s^\top H s` to second order (one Hessian-vector product);
   together with the current offset :math:`L(w) - L(w_0)` it is removed by a
   step along ``-g``.
3. **Newton correction.** A few steps
   :math:`w \leftarrow w - \frac{L(w) - L(w_0)}{\|\nabla L(w)\|^2}\nabla L(w)`
   (the minimum-norm Newton step for the scalar equation
   :math:`L(w) = L(w_0)`) in a ``lax.fori_loop``, which converge quadratically
   back onto the level set.

The teleport driver then keeps the candidate only if it is finite, within
``rtol`` of the starting loss and better for the objective; otherwise the
step size shrinks and the last kept point stays. Every call therefore returns
a point on the level set (or the input, bit for bit), and repeated calls do not
drift off it.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from teleport_jax._src.objectives import objectives as obj_lib
from teleport_jax._src.solver import backends

# a tangent component below this many eps of the objective's gradient is rounding noise
_NOISE = 1024


class LevelSetState(NamedTuple):
  """State of :class:`LevelSet`.

  Attributes:
    eta: current step size (relative to ``scale``).
    scale: the parameters' norm at the start (``1`` if not relative).
  """

  eta: chex.Array
  scale: chex.Array


@dataclasses.dataclass(frozen=True)
class LevelSet(backends.Solver):
  r"""Group-free teleport along the loss level set (after Mishkin et al., 2024).

  Each inner step projects the objective's gradient onto the tangent space of
  the level set, takes a step of size ``step_size * scale`` along it
  (``scale``: the parameters' norm with ``relative=True``), removes the
  predicted second-order rise of the loss with one Hessian-vector product
  (``second_order=True``) and then takes ``num_corrections`` Newton steps along
  :math:`\nabla L` back onto :math:`L(w) = L(w_0)`. A kept step grows the step
  size by ``grow`` up to ``max_step_size``; a refused one multiplies it by
  ``shrink``. Works for any differentiable loss and any objective of the
  library; the loss is kept on the teleport batch only (measure other data
  with :func:`teleport_jax.solvers.held_out_drift`).

  Statistics (``TeleportInfo.stats``): ``final_step_size`` and
  ``grad_evals_per_step`` (:meth:`cost_per_step`).

  Attributes:
    step_size: initial step, relative to the parameters' norm (absolute with
      ``relative=False``).
    max_step_size: cap on the adapted step size.
    grow: factor after a kept step.
    shrink: factor after a refused step.
    num_corrections: Newton steps back onto the level set per inner step
      (static; each costs one loss gradient).
    second_order: correct the tangent step's second-order loss rise with a
      Hessian-vector product before the Newton steps.
    relative: step sizes relative to the parameters' norm.

  Examples:
    >>> import jax.numpy as jnp, teleport_jax as tj
    >>> loss = lambda w: 0.5 * (4.0 * w[0] ** 2 + w[1] ** 2)
    >>> w0 = jnp.array([0.1, 1.0])
    >>> new, info = tj.teleport(loss, w0, solver="levelset",
    ...                         objective="max_grad_norm", num_steps=20)
    >>> bool(info.accepted), abs(float(loss(new) - loss(w0))) < 1e-5
    (True, True)
    >>> bool(abs(new[0]) > 0.45)  # towards the steepest point (0.5, 0)
    True
  """

  step_size: Any = 0.1
  max_step_size: Any = 1.0
  grow: float = 1.5
  shrink: float = 0.5
  num_corrections: int = 3
  second_order: bool = True
  relative: bool = True

  needs_symmetry = False
  tracks_element = False

  def __post_init__(self):
    backends.check_step_fields(self)
    object.__setattr__(
      self, "num_corrections", obj_lib.check_count(self.num_corrections, "num_corrections", 0)
    )
    for name in ("second_order", "relative"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}.")

  def init(self, problem, params):
    tiny = jnp.finfo(problem.dtype).tiny
    scale = optax.tree.norm(params).astype(problem.dtype) if self.relative else 1.0
    scale = jnp.where(scale > tiny, scale, 1.0).astype(problem.dtype)
    state = LevelSetState(
      eta=jnp.asarray(self.step_size, problem.dtype), scale=jax.lax.stop_gradient(scale)
    )
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return state, (zeros, zeros, jnp.zeros((), problem.dtype))

  def evaluate(self, problem, w, g):
    (jv, (value, loss)), grad = jax.value_and_grad(problem.signed, has_aux=True)(w, g)
    loss_w, grad_loss = jax.value_and_grad(problem.loss)(w)
    return jv, value, loss, (grad, grad_loss, jnp.asarray(loss_w, problem.dtype))

  def tangent(self, grad: chex.ArrayTree, grad_loss: chex.ArrayTree, dtype) -> chex.ArrayTree:
    """``grad`` without its component along ``grad_loss``."""
    tiny = jnp.finfo(dtype).tiny
    g2 = jnp.maximum(optax.tree.vdot(grad_loss, grad_loss), tiny)
    return optax.tree.add_scale(grad, -optax.tree.vdot(grad, grad_loss) / g2, grad_loss)

  def propose(self, problem, w, state, aux):
    grad, grad_loss, loss_w = aux
    dtype = problem.dtype
    tiny = jnp.finfo(dtype).tiny
    loss0 = jnp.asarray(problem.loss0, dtype)
    d = self.tangent(grad, grad_loss, dtype)
    d_norm = optax.tree.norm(d)
    # at a stationary point of the objective on the level set only rounding noise
    # is left of the tangent component: do not normalise it into a step
    signal = d_norm > _NOISE * jnp.finfo(dtype).eps * optax.tree.norm(grad)
    scale = jnp.where(signal, state.eta * state.scale / jnp.maximum(d_norm, tiny), 0.0)
    step = optax.tree.scale(scale, d)
    offset = loss_w - loss0
    if self.second_order:
      _, h_step = jax.jvp(jax.grad(problem.loss), (w,), (step,))
      offset = offset + 0.5 * optax.tree.vdot(step, h_step)
    g2 = jnp.maximum(optax.tree.vdot(grad_loss, grad_loss), tiny)
    cand = optax.tree.add_scale(optax.tree.add(w, step), -offset / g2, grad_loss)

    def newton(_, v):
      value, g = jax.value_and_grad(problem.loss)(v)
      gg = jnp.maximum(optax.tree.vdot(g, g), tiny)
      return optax.tree.add_scale(v, -(jnp.asarray(value, dtype) - loss0) / gg, g)

    if self.num_corrections:
      cand = jax.lax.fori_loop(0, self.num_corrections, newton, cand)
    cand = optax.tree.cast_like(cand, w)
    return cand, None

  def update(self, state, accepted, improvement=None, aux=None):
    del improvement, aux  # kept steps grow the step, refused ones shrink it
    return state._replace(eta=backends.adapted_step(state.eta, accepted, self))

  def stats(self, state):
    return {
      "final_step_size": state.eta,
      "grad_evals_per_step": jnp.asarray(self.cost_per_step(), state.eta.dtype),
    }

  def stats_template(self, dtype):
    z = jnp.zeros((), dtype)
    return {"final_step_size": z, "grad_evals_per_step": z}

  def cost_per_step(self) -> float:
    """Per inner step, counting the objective's gradient as one: one loss
    gradient for the tangent, about two for the Hessian-vector product
    (``second_order``) and one per Newton correction."""
    return 1.0 + 1.0 + (2.0 if self.second_order else 0.0) + self.num_corrections


backends.SOLVERS["levelset"] = LevelSet

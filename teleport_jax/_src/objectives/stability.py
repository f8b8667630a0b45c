r"""Keeping the optimizer's next steps stable at a teleported point.

A teleport that raises the gradient norm raises curvature too, and a
fixed-step optimizer can then overshoot. Gradient descent with step size
:math:`\eta` is stable near a point iff :math:`\eta\,\lambda_{\max}(H) < 2`;
in general the linearisation of one optimizer step
:math:`w \mapsto w + u(\nabla L(w))` around ``w`` is :math:`I + T` with
:math:`T = D_w\,u(\nabla L(w))` (for SGD :math:`T = -\eta H`, for Adam roughly
:math:`-\eta (1-\beta_1) P^{-1} H` with its preconditioner ``P``), and the
iteration is stable when the eigenvalues of :math:`-T` stay in ``(0, 2)`` (up to
:math:`2(1+\beta)` with heavy-ball momentum :math:`\beta`).

:class:`Stability` is a constraint the teleport driver applies to every inner
step: the *step sharpness* :math:`\sigma = |\lambda_{\max}(-T)|` at the
candidate must stay below a bound, by default
:math:`\max(\text{threshold}, \sigma_0)` with :math:`\sigma_0` at the start
point: a teleport may not make the optimizer less stable than it already is,
or than plain gradient descent's limit. (No slack by default: with a slack, a
schedule of teleports could ratchet the sharpness up by that slack each time.) Inside
:func:`teleport_jax.with_teleport` ``T`` is the wrapped optax optimizer's own
step (a Jacobian-vector product through ``optimizer.update`` at the candidate's
state); on its own, :func:`teleport_jax.teleport` uses ``learning_rate * H``
(or ``H`` with a relative bound only, when no learning rate is given).

:math:`\sigma` comes from power iteration: ``num_iterations`` products at the
start point, then ``warm_iterations`` at each candidate started from the
previous accepted point's vector.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from teleport_jax._src.core import noise
from teleport_jax._src.core import precision
from teleport_jax._src.objectives import differences as diff_lib
from teleport_jax._src.objectives import objectives as obj_lib


class StabilityState(NamedTuple):
  sigma0: chex.Array
  sigma: chex.Array
  vector: chex.Array
  bound: chex.Array


@dataclasses.dataclass(frozen=True)
class Stability:
  """A bound on the step sharpness at every teleported point.

  Attributes:
    threshold: absolute bound on ``|lambda_max(-T)|``: 2 is gradient descent's
      stability limit (safe for momentum and Adam too, whose limits are higher).
      ``None``: only the relative bound.
    relative: also allow up to ``(1 + margin)`` times the start point's value.
    margin: slack of the relative bound (default 0).
    learning_rate: without an optimizer (plain :func:`teleport_jax.teleport`),
      ``T = -learning_rate * H``; ``None`` measures ``H`` alone (relative bound only).
    num_iterations: power iterations at the start point.
    warm_iterations: power iterations at each candidate (warm-started).
    differences: products of ``T`` by forward differences of the optimizer's
      step (one gradient each, a first-order program) instead of
      forward-over-reverse differentiation (two to three gradients each, and a
      program twice the size to compile).
  """

  threshold: float | None = 2.0
  relative: bool = True
  margin: float = 0.0
  learning_rate: Any = None
  num_iterations: int = 20
  warm_iterations: int = 5
  differences: bool = False

  def __post_init__(self):
    if self.threshold is not None:
      object.__setattr__(self, "threshold", obj_lib.check_positive(self.threshold, "threshold"))
    object.__setattr__(
      self,
      "learning_rate",
      obj_lib.check_positive(self.learning_rate, "learning_rate", allow_none=True),
    )
    object.__setattr__(
      self, "num_iterations", obj_lib.check_count(self.num_iterations, "num_iterations")
    )
    object.__setattr__(
      self, "warm_iterations", obj_lib.check_count(self.warm_iterations, "warm_iterations")
    )
    if self.threshold is None and not self.relative:
      raise ValueError("Stability needs a threshold or relative=True.")
    if not isinstance(self.differences, bool):
      raise TypeError(f"differences must be a bool, got {self.differences!r}.")

  # ------------------------------------------------------------------ maps
  def _step_map(self, loss_of, params, context, g, grads=None):
    """``v -> -T v`` at ``params`` (flat vectors, in the dtype of ``params``).

    ``grads`` (the loss gradient at ``params``, if known) saves a gradient when
    the products are differences.
    """
    flat, unravel = ravel_pytree(params)
    if context is not None and context.optimizer is not None:
      # the state in the compute dtype, as the candidate is (a bfloat16 state in float32)
      state = precision.upcast(jax.lax.stop_gradient(context.state_at(params, g)))
      kwargs = dict(context.update_kwargs or {})
      opt = context.optimizer

      def update(p, gr):
        u, _ = opt.update(gr, state, p, **kwargs)
        return ravel_pytree(optax.tree.cast_like(u, p))[0]

    else:
      lr = 1.0 if self.learning_rate is None else self.learning_rate

      def update(p, gr):
        del p
        return -lr * ravel_pytree(gr)[0]

    def step(p):
      return update(p, jax.grad(loss_of)(p))

    if self.differences:
      # T v = D_g u (H v) + D_p u v: H v as a difference of gradients (smooth), the
      # update's derivative exactly (forward mode through an elementwise map; a
      # difference through Adam's g / sqrt(v) would see its kink at g = 0)
      grad_fn = jax.grad(loss_of)
      g0 = grad_fn(params) if grads is None else grads

      def mv(v):
        hv = diff_lib.directional_difference(grad_fn, params, g0, unravel(v))
        return -jax.jvp(update, (params, g0), (unravel(v), hv))[1]

      return flat, mv

    def mv(v):
      return -jax.jvp(lambda x: step(unravel(x)), (flat,), (v,))[1]

    return flat, mv

  def _power(self, mv, v, iterations):
    tiny = jnp.finfo(v.dtype).tiny

    def body(_, carry):
      v, _ = carry
      w = mv(v)
      # a derivative that is undefined somewhere (sqrt at 0 in a fresh Adam state)
      # contributes nothing rather than poisoning the estimate
      w = jnp.where(jnp.isfinite(w), w, 0)
      lam = jnp.vdot(v, w)
      return w / jnp.maximum(jnp.linalg.norm(w), tiny), lam

    v, lam = jax.lax.fori_loop(0, iterations, body, (v, jnp.zeros((), v.dtype)))
    return jnp.abs(lam), v

  def init(self, loss_of, params, context, g, grads=None) -> StabilityState:
    """The start point's step sharpness and bound (``grads``: the gradient there, if known)."""
    params = jax.lax.stop_gradient(params)
    flat, mv = self._step_map(loss_of, params, context, g, grads)
    v0 = noise.normal(0, flat.shape, flat.dtype)
    v0 = v0 / jnp.maximum(jnp.linalg.norm(v0), jnp.finfo(flat.dtype).tiny)
    sigma0, v = self._power(mv, v0, self.num_iterations)
    absolute = self.threshold is not None and (
      self.learning_rate is not None or (context is not None and context.optimizer is not None)
    )
    bound = jnp.asarray(jnp.inf, flat.dtype)
    if absolute:
      bound = jnp.asarray(self.threshold, flat.dtype)
    if self.relative:
      rel = (1.0 + self.margin) * sigma0
      bound = jnp.maximum(bound, rel) if absolute else rel
    return StabilityState(sigma0, sigma0, v, bound.astype(flat.dtype))

  def check(self, loss_of, params, context, g, state: StabilityState, grads=None):
    """``(ok, state at params)`` (``grads``: the gradient at ``params``, if known)."""
    params = jax.lax.stop_gradient(params)
    _, mv = self._step_map(loss_of, params, context, g, grads)
    sigma, v = self._power(mv, state.vector, self.warm_iterations)
    ok = jnp.isfinite(sigma) & (sigma <= state.bound)
    return ok, state._replace(sigma=sigma.astype(state.sigma.dtype), vector=v)


def as_stability(stability, *, learning_rate=None) -> Stability | None:
  """``None``/``False`` (off), ``True`` (defaults) or a :class:`Stability`."""
  if stability is None or stability is False:
    return None
  if stability is True:
    return Stability(learning_rate=learning_rate)
  if isinstance(stability, Stability):
    return stability
  raise TypeError(
    f"stability must be None, a bool or a teleport_jax.objectives.Stability, got {type(stability).__name__}."
  )

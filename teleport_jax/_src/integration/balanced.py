"""Closed-form balancing at every step, as an optax wrapper (the cheap, frequent teleport)."""

from __future__ import annotations

from typing import Literal
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from teleport_jax._src.core import precision
from teleport_jax._src.solver import balancing
from teleport_jax._src.solver import state_transport
from teleport_jax._src.symmetries import symmetry as sym_lib


class BalancedState(NamedTuple):
  """State of :func:`balanced`.

  Attributes:
    count: optimizer steps taken so far.
    inner_state: the wrapped optimizer's state.
    num_balanced: steps at which the parameters were balanced.
    num_rejected: balancing moves refused because they were not finite (the
      parameters then moved by the optimizer's step only).
  """

  count: chex.Array
  inner_state: optax.OptState
  num_balanced: chex.Array
  num_rejected: chex.Array


def _finite(tree) -> chex.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(ok, a, b):
  return jax.tree.map(lambda x, y: jnp.where(ok, x, y).astype(jnp.asarray(y).dtype), a, b)


def balanced(
  optimizer: optax.GradientTransformation,
  symmetry: sym_lib.Symmetry,
  target: Literal["norm", "grad"] = "norm",
  *,
  every: int = 1,
  power: float = 1.0,
  max_log_scale: float | None | str = "auto",
  eps: float = 1e-6,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps ``optimizer`` so that it balances the parameters in closed form.

  The cheap, frequent teleport: no search, no loss evaluation, ``O(parameters)``
  work per balancing (a per-channel sum of squares, or one ``eigh`` per GL
  pair; :meth:`teleport_jax.solvers.Balance.element`), the optimizer state and the
  gradient carried along exactly (:func:`teleport_jax.transport_state`,
  :func:`teleport_jax.transport_cotangent`).

  * ``target="norm"`` (ENorm): take the optimizer's step, then move the result
    towards the point of its orbit with the smallest squared weight norm over
    the symmetry's channels. Needs no data and no gradient.
  * ``target="grad"``: before the step, move the parameters towards the point
    of their orbit with the smallest gradient norm (per channel ``s^4 = a / b``;
    a GL pair by a matrix geometric mean). The gradient there is the
    transported incoming gradient, so this needs no extra gradient evaluation
    either; the optimizer then steps from the moved point.

  Each balancing is one sweep: every site takes its own closed-form optimum
  with its neighbours held fixed, all at once. An isolated site is balanced
  exactly; coupled neighbours (consecutive hidden layers) approach the joint
  optimum over repeated steps, as in ENorm.

  The move is exact only for a data-free symmetry (rescalings, GL of linear
  layers, those :func:`teleport_jax.find_symmetries` verifies): the network
  function is unchanged on every input, so there is nothing to check on a
  batch. A move that is not finite is refused (the state counts it) and the
  step is the optimizer's alone. For data-dependent groups, or to check every
  move against the loss, use :func:`teleport_jax.with_teleport` with
  ``solver_backend=tj.solvers.Balance(...)``.

  Args:
    optimizer: the optax optimizer to wrap.
    symmetry: a data-free symmetry with rescaling or GL sites
      (:class:`~teleport_jax.PositiveRescaling`, :class:`~teleport_jax.LinearGL`,
      a discovered symmetry, a :class:`~teleport_jax.symmetries.Product` of sites).
    target: ``"norm"`` or ``"grad"``.
    every: balance at steps ``0, every, 2 * every, ...``.
    power: fraction of the way to the balanced point, in ``(0, 1]``.
    max_log_scale: bound on ``|log s|`` per channel and balancing (a GL
      pair's eigenvalues likewise); ``None``: unbounded. ``"auto"`` (default):
      unbounded for ``"norm"``, ``0.5`` for ``"grad"``. Unbounded gradient
      balancing at every step sends a transformer's loss to ``nan`` within
      50 steps: early in training some channels' gradients are near zero, the
      closed form scales them by orders of magnitude, and the optimizer's next
      step from there is no longer small. Bounded, repeated balancings still
      approach the balanced point.
    eps: relative regulariser of the per-channel sums and Gram matrices.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` with state
    :class:`BalancedState`; extra keyword arguments reach ``optimizer``.

  Raises:
    TypeError: ``optimizer`` or ``symmetry`` of the wrong type.
    ValueError: a data-dependent symmetry, an unknown ``target``, ``every < 1``.

  Examples:
    >>> import jax.numpy as jnp, optax, teleport_jax as tj
    >>> params = [jnp.array([[4.0, 0.0], [0.0, 1.0]]), jnp.array([[1.0, 1.0]])]
    >>> opt = tj.balanced(optax.sgd(0.0), tj.PositiveRescaling())  # lr 0: balance only
    >>> state = opt.init(params)
    >>> u, state = opt.update([jnp.zeros((2, 2)), jnp.zeros((1, 2))], state, params)
    >>> w = optax.apply_updates(params, u)
    >>> [round(float(x), 3) for x in w[1][0]]  # |incoming| = |outgoing| per neuron
    [2.0, 1.0]
  """
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
      f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}."
    )
  if not isinstance(symmetry, sym_lib.Symmetry):
    raise TypeError(f"symmetry must be a teleport_jax symmetry, got {type(symmetry).__name__}.")
  if symmetry.needs_data:
    raise ValueError(
      f"balanced moves the parameters without evaluating the loss, which is exact only for a "
      f"data-free symmetry; {type(symmetry).__name__} depends on the batch. Use "
      "tj.with_teleport(optimizer, symmetry, schedule, solver_backend=tj.solvers.Balance(...)), which "
      "checks every move on the batch."
    )
  if not isinstance(every, int) or isinstance(every, bool) or every < 1:
    raise ValueError(f"every must be a positive int, got {every!r}.")
  if isinstance(max_log_scale, str):
    if max_log_scale != "auto":
      raise ValueError(f"max_log_scale must be 'auto', None or a number, got {max_log_scale!r}.")
    max_log_scale = 0.5 if target == "grad" else None
  # validates target, power and max_log_scale
  balance = balancing.Balance(target=target, power=power, max_log_scale=max_log_scale, eps=eps)
  optimizer = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    zero = jnp.zeros((), jnp.int32)
    return BalancedState(zero, optimizer.init(params), zero, zero)

  def move(params, grads, inner):
    """``(w', grads', inner', ok)``: ``params`` balanced, gradient and state carried."""
    g = balance.element(symmetry, params, grads)
    new = symmetry.act(params, g, None)
    new_grads = grads
    if grads is not None:
      new_grads = state_transport.transport_cotangent(grads, params, new, g, symmetry=symmetry)
    new_inner = state_transport.transport_state(inner, params, new, g, symmetry=symmetry)
    ok = _finite((new, new_grads, new_inner))
    return (
      _select(ok, new, params),
      None if grads is None else _select(ok, new_grads, grads),
      _select(ok, new_inner, inner),
      ok,
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("params must be passed to update: balancing moves them.")
    up = precision.upcast(params)
    inner = state.inner_state
    do = (state.count % every) == 0

    if target == "grad":
      grads = optax.tree.cast_like(updates, up)
      if every == 1:
        w, grads, inner, ok = move(up, grads, inner)
      else:
        w, grads, inner, ok = jax.lax.cond(
          do, move, lambda p, gr, s: (p, gr, s, jnp.asarray(True)), up, grads, inner
        )
      step, inner = optimizer.update(
        optax.tree.cast_like(grads, updates), inner, optax.tree.cast_like(w, params), **extra_args
      )
      out = optax.tree.add(optax.tree.sub(w, up), optax.tree.cast_like(step, up))
    else:
      step, inner = optimizer.update(updates, inner, params, **extra_args)
      stepped = optax.apply_updates(up, optax.tree.cast_like(step, up))
      if every == 1:
        w, _, inner, ok = move(stepped, None, inner)
      else:
        w, _, inner, ok = jax.lax.cond(
          do,
          lambda p, s: move(p, None, s),
          lambda p, s: (p, None, s, jnp.asarray(True)),
          stepped,
          inner,
        )
      out = optax.tree.sub(w, up)
    return optax.tree.cast_like(out, updates), BalancedState(
      count=optax.safe_increment(state.count),
      inner_state=inner,
      num_balanced=state.num_balanced + (do & ok).astype(jnp.int32),
      num_rejected=state.num_rejected + (do & ~ok).astype(jnp.int32),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

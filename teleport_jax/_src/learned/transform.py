"""A learned teleport before every step (or on a schedule), as an optax wrapper."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from teleport_jax._src.core import precision
from teleport_jax._src.integration import balanced as bal_lib
from teleport_jax._src.integration import schedules as sched_lib
from teleport_jax._src.integration import transform as tr_lib
from teleport_jax._src.learned import move as move_lib
from teleport_jax._src.solver import solver
from teleport_jax._src.solver import state_transport
from teleport_jax._src.symmetries import symmetry as sym_lib

Status = solver.TeleportStatus


class LearnedTeleportState(NamedTuple):
  """State of :func:`learned_teleport`.

  Attributes:
    count: optimizer steps taken so far.
    inner_state: the wrapped optimizer's state.
    schedule: the schedule's parameters.
    carry: the policy's recurrent state.
    lr: the step size the policy proposed last (``nan`` if it proposes none).
    status: :class:`~teleport_jax.TeleportStatus` of the latest move (``SKIPPED``
      at steps the schedule skips).
    num_teleports: accepted moves so far.
    num_rejected: moves refused (loss changed beyond ``rtol``, or not finite);
      the parameters were kept.
    max_rel_loss_drift: largest relative loss change of an accepted move.
  """

  count: chex.Array
  inner_state: optax.OptState
  schedule: sched_lib.Schedule
  carry: Any
  lr: chex.Array
  status: chex.Array
  num_teleports: chex.Array
  num_rejected: chex.Array
  max_rel_loss_drift: chex.Array


def learned_teleport(
  optimizer: optax.GradientTransformation,
  symmetry: sym_lib.Symmetry,
  policy: nnx.Module,
  schedule: Any = 1,
  *,
  rtol: float | None = None,
  state_policy: str = "transport",
  gradient: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps ``optimizer`` so that a learned policy teleports before its steps.

  At a step the schedule selects (every step by default) the policy reads
  the algebra features at ``w`` (:func:`~teleport_jax.learned.algebra_features`,
  ``O(parameters)``), proposes ``xi``, and the parameters move by the exact
  action to ``w' = retract(xi) . w``; the gradient there is the incoming one
  transported (exact for a group action) or evaluated there (``gradient``).
  The loss is evaluated once at ``w'`` (the guard): a move that changes it by more than ``rtol`` (relative), or that
  is not finite, is refused and ``w`` kept, with status and counters in the
  state. The update is then

  .. math:: u = (w' - w) + \eta\,\mathrm{opt}(\nabla L(w'))

  with :math:`\eta` the policy's proposed step size if it proposes one (its
  ``lr_range``; wrap ``optax.sgd(1.0)`` for it to set the learning rate), else 1.
  A policy that proposes a step size runs at every step (the schedule then
  says where it also moves the parameters).
  Follows optax's extra-arguments convention: ``update(grads, state, params,
  value_fn=loss, **batch)``, ``value=`` (the loss at ``params``) saves one
  evaluation. The incoming updates must be the loss gradient.

  Args:
    optimizer: the optax optimizer to wrap.
    symmetry: the group the policy moves in.
    policy: a policy module (its weights are constants of the compiled step).
    schedule: when to move: an int ``k`` (every ``k`` steps; 1: every step), a
      list of steps, or :func:`~teleport_jax.every`.
    rtol: the largest relative loss change accepted; default
      :func:`~teleport_jax.default_rtol` of the parameters' dtype.
    state_policy: ``"transport"`` (default): the optimizer's state moves with
      the parameters (:func:`~teleport_jax.transport_state`); ``"keep"``.
    gradient: the gradient at the moved point: ``"transport"`` (the incoming
      one carried by the action, no model evaluation beyond the guard's
      forward pass), ``"recompute"`` (one ``value_and_grad`` there, which is
      also the guard's evaluation), or ``"auto"`` (default): transport for
      data-free groups, recompute for data-dependent ones (whose transport
      solves a linear system by several vector-Jacobian products of the action).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`LearnedTeleportState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, teleport_jax as tj
    >>> from teleport_jax import learned
    >>> params = [jnp.ones((4, 8)) * 0.3, jnp.ones((8, 1)) * 0.2]
    >>> x, y = jnp.ones((16, 4)), jnp.zeros((16, 1))
    >>> def loss(p, x, y):
    ...   return jnp.mean((jax.nn.relu(x @ p[0]) @ p[1] - y) ** 2)
    >>> policy = learned.make_policy(learned.PolicyConfig())
    >>> opt = learned.learned_teleport(optax.sgd(0.1), tj.PositiveRescaling(), policy)
    >>> state = opt.init(params)
    >>> g = jax.grad(loss)(params, x, y)
    >>> for _ in range(2):  # every(1) first fires at step 1
    ...   u, state = opt.update(g, state, params, value_fn=loss, x=x, y=y)
    >>> int(state.num_teleports), int(state.num_rejected)
    (1, 0)
  """
  if not isinstance(symmetry, sym_lib.Symmetry):
    raise TypeError(f"symmetry must be a teleport_jax Symmetry, got {type(symmetry).__name__}.")
  if not isinstance(policy, nnx.Module):
    raise TypeError(f"policy must be a flax nnx Module, got {type(policy).__name__}.")
  if state_policy not in ("transport", "keep"):
    raise ValueError(f"state_policy must be 'transport' or 'keep', got {state_policy!r}.")
  if gradient not in ("auto", "transport", "recompute"):
    raise ValueError(f"gradient must be 'auto', 'transport' or 'recompute', got {gradient!r}.")
  recompute = gradient == "recompute" or (gradient == "auto" and symmetry.needs_data)
  schedule = sched_lib.as_schedule(schedule)
  graphdef, weights = nnx.split(policy)
  lr_policy = getattr(policy.config, "lr_range", None) is not None
  optimizer = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    zero = jnp.zeros((), jnp.int32)
    return LearnedTeleportState(
      count=zero,
      inner_state=optimizer.init(params),
      schedule=schedule,
      carry=policy.initial_carry(),
      lr=jnp.asarray(jnp.nan, jnp.float32),
      status=jnp.asarray(int(Status.SKIPPED), jnp.int32),
      num_teleports=zero,
      num_rejected=zero,
      max_rel_loss_drift=jnp.zeros((), jnp.float32),
    )

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    if params is None or value_fn is None:
      raise ValueError(
        "learned_teleport's update needs params and value_fn (value_fn(params, **batch) -> "
        "loss), with the batch as keyword arguments."
      )
    value = extra_args.pop("value", None)
    data = tr_lib._accepted_kwargs(value_fn, extra_args)
    loss_fn = tr_lib._KeywordLoss(value_fn)
    if symmetry.needs_data and not data:
      raise ValueError(f"{type(symmetry).__name__} needs the batch as keyword arguments.")
    sym = symmetry.bind(loss_fn, params, data)
    sym.validate(params, data)
    up = precision.upcast(params)
    grads = optax.tree.cast_like(updates, up)
    tol = rtol if rtol is not None else solver.default_rtol(solver.params_dtype(params))
    inner = state.inner_state
    do = state.schedule(state.count)

    def moved(_):
      loss0 = loss_fn(up, data) if value is None else jnp.asarray(value)
      pol = nnx.merge(graphdef, weights)
      mv = move_lib.learned_move(
        pol, sym, up, grads, loss0, state.carry, data or None, transport=not recompute
      )
      if recompute:
        loss1, new_grads = jax.value_and_grad(loss_fn)(mv.params, data)
        mv = mv._replace(grads=new_grads)
      else:
        loss1 = loss_fn(mv.params, data)
      drift = jnp.abs(loss1 - loss0) / jnp.maximum(jnp.abs(loss0), jnp.finfo(jnp.float32).tiny)
      finite = bal_lib._finite((mv.params, mv.grads)) & jnp.isfinite(loss1)
      ok = finite & (drift <= tol)
      status = jnp.where(
        ok, int(Status.SUCCESSFUL), jnp.where(finite, int(Status.LOSS_DRIFT), int(Status.NONFINITE))
      )
      new_inner = inner
      if state_policy == "transport":
        new_inner = state_transport.transport_state(
          inner, up, mv.params, mv.element, symmetry=sym, data=data or None
        )
        new_inner = bal_lib._select(ok, new_inner, inner)
      lr = jnp.nan if mv.proposal.lr is None else mv.proposal.lr
      return (
        bal_lib._select(ok, mv.params, up),
        bal_lib._select(ok, mv.grads, grads),
        new_inner,
        mv.proposal.carry,
        jnp.asarray(lr, jnp.float32),
        status.astype(jnp.int32),
        jnp.where(ok, drift, 0.0).astype(jnp.float32),
      )

    def skipped(_):
      none = jnp.asarray(int(Status.SKIPPED), jnp.int32)
      return (up, grads, inner, state.carry, state.lr, none, jnp.zeros((), jnp.float32))

    if lr_policy:
      # the policy sets the step size at every step: it runs at every step, and
      # moves the parameters where the schedule says so
      w, g, new_inner, carry, lr, status, drift = moved(None)
      keep = ~do
      w, g, new_inner = bal_lib._select(keep, (up, grads, inner), (w, g, new_inner))
      status = jnp.where(keep, int(Status.SKIPPED), status).astype(jnp.int32)
      drift = jnp.where(keep, 0.0, drift)
      inner = new_inner
    else:
      w, g, inner, carry, lr, status, drift = jax.lax.cond(do, moved, skipped, None)
    step, inner = optimizer.update(
      optax.tree.cast_like(g, updates), inner, optax.tree.cast_like(w, params), **extra_args
    )
    step = optax.tree.cast_like(step, up)
    if lr_policy:
      step = optax.tree.scale(lr, step)
    out = optax.tree.add(optax.tree.sub(w, up), step)
    accepted = status == int(Status.SUCCESSFUL)
    rejected = do & ~accepted
    return optax.tree.cast_like(out, updates), LearnedTeleportState(
      count=optax.safe_increment(state.count),
      inner_state=inner,
      schedule=state.schedule,
      carry=carry,
      lr=lr,
      status=status,
      num_teleports=state.num_teleports + accepted.astype(jnp.int32),
      num_rejected=state.num_rejected + rejected.astype(jnp.int32),
      max_rel_loss_drift=jnp.maximum(state.max_rel_loss_drift, drift),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

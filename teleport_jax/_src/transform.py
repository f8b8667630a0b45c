"""Teleportation as an optax gradient transformation."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any
from typing import Literal
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from teleport_jax._src import objectives as obj_lib
from teleport_jax._src import schedules as sched_lib
from teleport_jax._src import solver
from teleport_jax._src import state_transport
from teleport_jax._src import symmetry as sym_lib

StatePolicy = Literal["keep", "reset", "transport"]
STATE_POLICIES = ("keep", "reset", "transport")


class TeleportState(NamedTuple):
  """State of :func:`with_teleport`.

  Attributes:
    count: optimizer steps taken so far (the schedule is evaluated on it).
    inner_state: the wrapped optimizer's state.
    schedule: the schedule's parameters (arrays; change them without recompiling).
    info: :class:`TeleportInfo` of the most recent teleport attempt
      (``status == SKIPPED`` before the first one).
    num_teleports: accepted teleports so far.
    num_rejected: rejected teleports so far.
    max_rel_loss_drift: largest relative loss drift over the accepted teleports
      so far (the record of every teleport, not only the latest).
  """

  count: chex.Array
  inner_state: optax.OptState
  schedule: sched_lib.Schedule
  info: solver.TeleportInfo
  num_teleports: chex.Array
  num_rejected: chex.Array
  max_rel_loss_drift: chex.Array


def _accepted_kwargs(fn: Callable, kwargs: dict) -> dict:
  """The keyword arguments ``fn`` accepts (all of them if it takes ``**kwargs``)."""
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return dict(kwargs)
  params = sig.parameters.values()
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
    return dict(kwargs)
  names = {
    p.name
    for p in params
    if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  }
  return {k: v for k, v in kwargs.items() if k in names}


def with_teleport(
  optimizer: optax.GradientTransformation,
  symmetry: sym_lib.Symmetry,
  schedule: Any,
  *,
  objective: obj_lib.Objective | str | Callable = "max_grad_norm",
  num_steps: int = 10,
  step_size: float = 0.1,
  normalize: bool = True,
  safeguard: bool = True,
  max_step_size: float = 1.0,
  rtol: float | None = None,
  state_policy: StatePolicy = "keep",
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps ``optimizer`` so that it teleports on a schedule.

  Follows optax's convention for transformations that need the loss (as
  :func:`optax.scale_by_zoom_linesearch` does): ``update`` takes
  ``value_fn`` — ``value_fn(params, **extra_args) -> loss`` — and the batch as
  further keyword arguments, which reach ``value_fn`` (and the symmetry, for
  data-dependent groups). Keywords ``value_fn`` does not accept are dropped,
  so the transformation can sit in an :func:`optax.chain` with links that take
  other keywords.

  At a step where ``schedule(count)`` is true (decided inside jit with
  ``lax.cond``), the update is

  .. math:: u = (w' - w) + \mathrm{opt}(\nabla L(w')),\qquad w' = \mathrm{teleport}(w)

  i.e. teleport, then take the optimizer's step *from the teleported point*
  (the gradient is re-evaluated there; the incoming ``updates``, computed at
  ``w``, are not used). A rejected teleport keeps ``w' = w`` and uses the
  incoming updates. At every other step it is exactly ``optimizer``.

  Optimizer state at a teleport (``state_policy``):

  * ``"keep"`` (default): momentum/accumulators are kept as they are. They were
    computed in the old coordinates, which the teleport changed; this matches
    the published NeurIPS 2022 code.
  * ``"reset"``: the state is re-initialised at the teleported point (as the
    published ICLR 2024 code does by rebuilding the optimizer), so e.g. Adam's
    bias correction restarts.
  * ``"transport"``: the state is moved with the group element, by
    :func:`teleport_jax.transport_state`: momentum and first moments are
    transported as cotangents (exactly: the gradient at ``w`` maps to the
    gradient at ``w'``); second moments (Adam/RMSProp ``nu``, AdaGrad
    ``sum_of_squares``) are rescaled exactly for
    :class:`~teleport_jax.PositiveRescaling` and kept for the GL groups, which
    mix coordinates. The teleport then also accumulates its inner steps into one
    group element ``g`` and moves to ``w' = g . w`` (for the data-free groups the
    same point up to rounding; for :class:`~teleport_jax.DataDependentGL` a point
    with the same features on the batch). Supported for ``PositiveRescaling``,
    ``LinearGL`` and ``DataDependentGL``.

  Place clipping or other gradient transforms *inside* (``with_teleport(
  optax.chain(optax.clip_by_global_norm(1.), optax.adam(1e-3)), ...)``) so they
  also apply to the gradient at the teleported point, and make this
  transformation the outermost one (or the last link of a chain): its update
  contains the jump ``w' - w``, which a later link would rescale.

  Args:
    optimizer: the optax optimizer to wrap.
    symmetry: the group to teleport with.
    schedule: an int ``k`` (every ``k`` steps, from step 0), a list of step
      counts, or :func:`every`, :func:`at_steps`, :func:`first`.
    objective, num_steps, step_size, normalize, safeguard, max_step_size, rtol:
      passed to :func:`teleport_jax.teleport`.
    state_policy: ``"keep"``, ``"reset"`` or ``"transport"``.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` with state
    :class:`TeleportState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, teleport_jax as tj
    >>> params = [jnp.full((6, 5), 0.5), jnp.full((3, 6), 0.5)]
    >>> x, y = jnp.linspace(0, 1, 20).reshape(5, 4), jnp.ones((3, 4))
    >>> act = tj.leaky_relu(0.1)
    >>> def loss(p, x, y): return 0.5 * jnp.sum((y - p[1] @ act(p[0] @ x)) ** 2)
    >>> opt = tj.with_teleport(optax.sgd(1e-2), tj.DataDependentGL(activation=act),
    ...                        schedule=tj.at_steps([0]))
    >>> state = opt.init(params)
    >>> g = jax.grad(loss)(params, x, y)
    >>> u, state = opt.update(g, state, params, value_fn=loss, x=x, y=y)
    >>> int(state.num_teleports)
    1
  """
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
      f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}."
    )
  if not isinstance(symmetry, sym_lib.Symmetry):
    raise TypeError(f"symmetry must be a teleport_jax symmetry, got {type(symmetry).__name__}.")
  if state_policy not in STATE_POLICIES:
    raise ValueError(
      f"state_policy must be one of {', '.join(map(repr, STATE_POLICIES))}, got {state_policy!r}."
    )
  compose = state_transport.composer(symmetry) if state_policy == "transport" else None
  schedule = sched_lib.as_schedule(schedule)
  objective = obj_lib.as_objective(objective)
  optimizer = optax.with_extra_args_support(optimizer)
  kwargs = dict(
    symmetry=symmetry,
    objective=objective,
    num_steps=num_steps,
    step_size=step_size,
    normalize=normalize,
    safeguard=safeguard,
    max_step_size=max_step_size,
    rtol=rtol,
  )

  def init_fn(params):
    dtype = solver._params_dtype(params)
    return TeleportState(
      count=jnp.zeros((), jnp.int32),
      inner_state=optimizer.init(params),
      schedule=schedule,
      info=solver.empty_info(dtype),
      num_teleports=jnp.zeros((), jnp.int32),
      num_rejected=jnp.zeros((), jnp.int32),
      max_rel_loss_drift=jnp.zeros((), dtype),
    )

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    if params is None:
      raise ValueError("params must be passed to update: teleporting moves them.")
    if value_fn is None:
      raise ValueError(
        "value_fn must be passed to update (value_fn(params, **batch) -> loss), "
        "following optax's convention for transformations that need the loss."
      )
    data = _accepted_kwargs(value_fn, extra_args)
    loss_fn = lambda p, d: value_fn(p, **d)  # noqa: E731
    if symmetry.needs_data and not data:
      raise ValueError(
        f"{type(symmetry).__name__} needs the batch: pass it to update as keyword "
        "arguments that value_fn accepts (value_fn(params, x=..., y=...))."
      )
    solver._validate(loss_fn, params, data, symmetry, num_steps, step_size, max_step_size, rtol)

    def teleport_branch(_):
      if compose is None:
        new_params, info, grads = solver.teleport_with_grad(loss_fn, params, data, **kwargs)
      else:
        new_params, info, grads, g = solver.teleport_with_grad(
          loss_fn, params, data, compose=compose, **kwargs
        )
      grads = jax.tree_util.tree_map(
        lambda a, b: jnp.where(info.accepted, a, b).astype(jnp.asarray(b).dtype), grads, updates
      )
      inner = state.inner_state
      if state_policy == "reset":
        fresh = optimizer.init(new_params)
        inner = jax.tree_util.tree_map(lambda a, b: jnp.where(info.accepted, a, b), fresh, inner)
      elif state_policy == "transport":
        moved = state_transport.transport_state(
          inner, params, new_params, g, symmetry=symmetry, data=data
        )
        inner = jax.tree_util.tree_map(
          lambda a, b: jnp.where(info.accepted, a, b).astype(jnp.asarray(b).dtype), moved, inner
        )
      info = jax.tree_util.tree_map(
        lambda a, b: jnp.asarray(a, jnp.asarray(b).dtype), info, state.info
      )
      return new_params, grads, inner, info

    def skip_branch(_):
      return params, updates, state.inner_state, state.info

    do = state.schedule(state.count)
    new_params, grads, inner_state, info = jax.lax.cond(do, teleport_branch, skip_branch, None)
    inner_updates, inner_state = optimizer.update(
      grads, inner_state, new_params, value_fn=value_fn, **extra_args
    )
    moved = optax.tree.sub(new_params, params)
    out = optax.tree.add(moved, inner_updates)
    out = optax.tree.cast_like(out, updates)
    accepted = do & info.accepted
    return out, TeleportState(
      count=optax.safe_increment(state.count),
      inner_state=inner_state,
      schedule=state.schedule,
      info=info,
      num_teleports=state.num_teleports + accepted.astype(jnp.int32),
      num_rejected=state.num_rejected + (do & ~info.accepted).astype(jnp.int32),
      max_rel_loss_drift=jnp.where(
        accepted,
        jnp.maximum(state.max_rel_loss_drift, info.rel_loss_drift),
        state.max_rel_loss_drift,
      ).astype(state.max_rel_loss_drift.dtype),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

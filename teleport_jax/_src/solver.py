"""The teleport solver: gradient ascent on the group, inside ``lax`` loops."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from teleport_jax._src import layouts
from teleport_jax._src import objectives as obj_lib
from teleport_jax._src import symmetry as sym_lib


class TeleportStatus(enum.IntEnum):
  """Outcome of a teleport (stored as an ``int32`` in :class:`TeleportInfo`)."""

  SUCCESSFUL = 0
  LOSS_DRIFT = 1
  NONFINITE = 2
  NONFINITE_INPUT = 3
  SKIPPED = 4

  @property
  def message(self) -> str:
    return _MESSAGES[self]


_MESSAGES = {
  TeleportStatus.SUCCESSFUL: "teleported; loss unchanged within tolerance",
  TeleportStatus.LOSS_DRIFT: "rejected: the loss changed by more than rtol; "
  "original parameters kept",
  TeleportStatus.NONFINITE: "rejected: the teleported point is non-finite; "
  "original parameters kept",
  TeleportStatus.NONFINITE_INPUT: "rejected: params, data or the loss were "
  "non-finite before teleporting; original parameters kept",
  TeleportStatus.SKIPPED: "no teleport at this step",
}


def status_message(status: int | chex.Array) -> str:
  """The message for a :class:`TeleportInfo` ``status`` (concrete values only)."""
  return TeleportStatus(int(status)).message


class TeleportInfo(NamedTuple):
  """What a teleport did. All fields are arrays, so the record passes through jit.

  Attributes:
    accepted: whether the returned parameters are the teleported ones.
    status: a :class:`TeleportStatus` code.
    loss_before: loss at the input parameters.
    loss_after: loss at the returned parameters.
    grad_norm_sq_before: squared gradient norm at the input parameters.
    grad_norm_sq_after: squared gradient norm at the returned parameters.
    rel_loss_drift: ``|L(candidate) - L(params)| / |L(params)|`` of the teleported
      candidate, whether or not it was accepted (this is why it was rejected).
    objective_before: objective value at the input parameters.
    objective_after: objective value at the candidate.
    num_accepted_steps: inner steps that improved the objective and were kept.
    final_step_size: inner step size at the end (after safeguard adaptation).
  """

  accepted: chex.Array
  status: chex.Array
  loss_before: chex.Array
  loss_after: chex.Array
  grad_norm_sq_before: chex.Array
  grad_norm_sq_after: chex.Array
  rel_loss_drift: chex.Array
  objective_before: chex.Array
  objective_after: chex.Array
  num_accepted_steps: chex.Array
  final_step_size: chex.Array


def empty_info(dtype=jnp.float32) -> TeleportInfo:
  """A :class:`TeleportInfo` for "nothing happened yet" (status ``SKIPPED``)."""
  z = jnp.zeros((), dtype)
  return TeleportInfo(
    accepted=jnp.asarray(False),
    status=jnp.asarray(TeleportStatus.SKIPPED, jnp.int32),
    loss_before=z,
    loss_after=z,
    grad_norm_sq_before=z,
    grad_norm_sq_after=z,
    rel_loss_drift=z,
    objective_before=z,
    objective_after=z,
    num_accepted_steps=jnp.zeros((), jnp.int32),
    final_step_size=z,
  )


def default_rtol(dtype) -> float:
  """Default relative loss-drift tolerance: 1e-4 in float32, 1e-8 in float64."""
  return 1e-8 if jnp.dtype(dtype) == jnp.float64 else 1e-4


def _params_dtype(params):
  leaves = [
    x
    for x in jax.tree_util.tree_leaves(params)
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
  ]
  if not leaves:
    raise TypeError("params must contain floating-point arrays.")
  return jnp.result_type(*leaves)


def _validate(loss_fn, params, data, symmetry, num_steps, step_size, max_step_size, rtol):
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
  if not isinstance(symmetry, sym_lib.Symmetry):
    raise TypeError(
      "symmetry must be a teleport_jax symmetry (PositiveRescaling, LinearGL, "
      f"DataDependentGL, Rotation, ...), got {type(symmetry).__name__}."
    )
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
    raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}.")
  for name, v in (("step_size", step_size), ("max_step_size", max_step_size)):
    if not isinstance(v, (int, float)) or not v > 0:
      raise ValueError(f"{name} must be a positive number, got {v!r}.")
  if rtol is not None and not rtol >= 0:
    raise ValueError(f"rtol must be non-negative, got {rtol!r}.")
  if symmetry.needs_data and data is None:
    raise ValueError(f"data is required: {type(symmetry).__name__} depends on the batch.")
  sym_lib.check_finite(params, "params")
  if data is not None:
    sym_lib.check_finite(data, "data")
  symmetry.validate(params, data)


def teleport(
  loss_fn: Callable[..., chex.Array],
  params: chex.ArrayTree,
  data: Any = None,
  *,
  symmetry: sym_lib.Symmetry,
  objective: obj_lib.Objective | str | Callable = "max_grad_norm",
  num_steps: int = 10,
  step_size: float = 0.1,
  normalize: bool = True,
  safeguard: bool = True,
  max_step_size: float = 1.0,
  rtol: float | None = None,
) -> tuple[chex.ArrayTree, TeleportInfo]:
  r"""Moves ``params`` along the orbit of ``symmetry`` to optimise ``objective``.

  Runs ``num_steps`` steps of gradient ascent (or descent for minimised
  objectives) on the Lie algebra inside a ``lax.fori_loop``: at the current
  point ``w`` it differentiates ``J(xi) = objective(act(w, retract(xi)))`` at
  ``xi = 0``, takes ``xi = step_size * grad / |grad|`` (or ``step_size * grad``
  with ``normalize=False``) and moves to ``act(w, retract(xi))``, where
  ``retract`` is the group's first-order exponential (the Cayley transform
  for matrix groups: always a true, invertible group element).

  With ``safeguard=True`` (default) a step is kept only if it improves the
  objective, keeps every value finite and keeps the loss within ``rtol`` of the
  starting loss; a kept step grows the step size by 1.5 (up to
  ``max_step_size``), a refused one halves it. This keeps group elements well
  conditioned (``|xi| <= max_step_size`` per step) without tuning.

  Finally the candidate's loss is compared with the original loss: if the
  relative change exceeds ``rtol`` or anything is non-finite, the teleport is
  rejected and the *original* ``params`` are returned; ``info.status`` says why.

  Args:
    loss_fn: ``loss_fn(params, data) -> scalar`` (``loss_fn(params)`` when
      ``data`` is ``None``).
    params: parameter pytree.
    data: the batch passed to ``loss_fn`` (and to data-dependent symmetries).
    symmetry: the group, e.g. :class:`teleport_jax.DataDependentGL`.
    objective: ``"max_grad_norm"`` (default), ``"min_grad_norm"``, an
      :class:`teleport_jax.Objective` or a callable
      ``fn(loss_fn, params, data) -> scalar`` to maximise.
    num_steps: inner steps (static: a different value recompiles).
    step_size: initial inner step size (norm of the algebra step if normalised).
    normalize: whether to normalise the algebra gradient.
    safeguard: whether to keep only improving steps and adapt the step size.
    max_step_size: cap on the adapted step size.
    rtol: allowed relative loss change; default 1e-4 (float32) or 1e-8 (float64).

  Returns:
    ``(new_params, info)``; ``new_params`` has the structure and dtypes of
    ``params``; ``info`` is a :class:`TeleportInfo`.

  Raises:
    TypeError, ValueError: for bad arguments, before any computation. Non-finite
      ``params``/``data`` raise when concrete; under ``jit`` they give
      ``status == NONFINITE_INPUT`` instead.

  Examples:
    >>> import jax, jax.numpy as jnp, teleport_jax as tj
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> params = [jax.random.uniform(k1, (6, 5)), jax.random.uniform(k2, (3, 6))]
    >>> x, y = jax.random.uniform(k3, (5, 4)), jnp.ones((3, 4))
    >>> act = tj.leaky_relu(0.1)
    >>> loss = lambda p, d: 0.5 * jnp.sum((d[1] - p[1] @ act(p[0] @ d[0])) ** 2)
    >>> sym = tj.DataDependentGL(activation=act)
    >>> new, info = tj.teleport(loss, params, (x, y), symmetry=sym)
    >>> bool(info.accepted), bool(info.grad_norm_sq_after > info.grad_norm_sq_before)
    (True, True)
  """
  objective = obj_lib.as_objective(objective)
  _validate(loss_fn, params, data, symmetry, num_steps, step_size, max_step_size, rtol)
  if rtol is None:
    rtol = default_rtol(_params_dtype(params))
  new_params, info, _ = _teleport_jit(
    loss_fn,
    params,
    data,
    symmetry=symmetry,
    objective=objective,
    num_steps=num_steps,
    step_size=step_size,
    normalize=normalize,
    safeguard=safeguard,
    max_step_size=max_step_size,
    rtol=rtol,
  )
  return new_params, info


def teleport_with_grad(
  loss_fn,
  params,
  data,
  *,
  symmetry,
  objective,
  num_steps,
  step_size,
  normalize,
  safeguard,
  max_step_size,
  rtol,
  compose=None,
):
  """Like :func:`teleport` (no validation) and also returns the loss gradient at
  the returned parameters, which an optimizer step after the teleport needs.

  With ``compose`` (``compose(g1, g2)`` -> the element acting as ``g1`` then
  ``g2``), the accepted inner steps are also multiplied into one group element
  ``g``, the candidate is ``act(params, g)`` and ``g`` (the identity if the
  teleport is rejected) is returned as a fourth value, so that optimizer state
  can be moved with the same element."""
  objective = obj_lib.as_objective(objective)
  dtype = _params_dtype(params)
  rtol = default_rtol(dtype) if rtol is None else rtol
  sign = 1.0 if objective.maximize else -1.0
  loss_of = lambda p: obj_lib.call_loss(loss_fn, p, data)  # noqa: E731

  loss0, grads0 = jax.value_and_grad(loss_of)(params)
  gnorm0 = optax.tree.vdot(grads0, grads0)
  inputs_finite = (
    layouts.tree_leaves_finite(params)
    & (layouts.tree_leaves_finite(data) if data is not None else True)
    & jnp.isfinite(loss0)
  )
  loss_scale = jnp.maximum(jnp.abs(loss0), jnp.finfo(dtype).tiny)

  def j_and_grad(w):
    """Signed objective at ``w`` and its gradient on the algebra at zero."""

    def j(xi):
      moved = symmetry.act_linearized(w, xi, data)  # first order suffices at xi = 0
      value, loss = obj_lib.evaluate(objective, loss_fn, moved, data)
      return sign * value, (value, loss)

    xi0 = symmetry.algebra_zeros(w)
    (jv, (value, loss)), g = jax.value_and_grad(j, has_aux=True)(xi0)
    return jv, value, loss, g

  class Carry(NamedTuple):
    w: Any
    jv: chex.Array
    value: chex.Array
    value0: chex.Array
    grad: Any
    eta: chex.Array
    accepted: chex.Array
    g: Any = None  # the product of the accepted steps (only with ``compose``)

  # Iteration 0 only evaluates the objective at ``params`` (so the objective's
  # gradient graph is traced and compiled once, not twice); iterations
  # 1..num_steps take steps.
  def body(i, c: Carry) -> Carry:
    first = i == 0
    gnorm = optax.tree.norm(c.grad)
    scale = c.eta / jnp.maximum(gnorm, jnp.finfo(dtype).tiny) if normalize else c.eta
    xi = optax.tree.scale(scale, c.grad)
    step = symmetry.retract(xi)
    moved = symmetry.act(c.w, step, data)
    cand = jax.tree_util.tree_map(lambda a, b: jnp.where(first, a, b), c.w, moved)
    g_cand = None if compose is None else compose(c.g, step)
    jv, value, loss, g = j_and_grad(cand)
    finite = (
      jnp.isfinite(jv)
      & jnp.isfinite(loss)
      & layouts.tree_leaves_finite(cand)
      & layouts.tree_leaves_finite(g)
    )
    ok = finite | first
    if safeguard:
      drift = jnp.abs(loss - loss0) / loss_scale
      # require an improvement beyond rounding, so drift does not creep up
      improved = jv > c.jv + 4 * jnp.finfo(dtype).eps * jnp.abs(c.jv)
      ok = first | (ok & improved & (drift <= rtol))
    new = Carry(cand, jv, value, c.value0, g, c.eta, c.accepted + jnp.where(first, 0, 1), g_cand)
    kept = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, c)
    kept = kept._replace(value0=jnp.where(first, value, c.value0).astype(c.value0.dtype))
    if safeguard:
      eta = jnp.where(ok, jnp.minimum(c.eta * 1.5, max_step_size), c.eta * 0.5)
      kept = kept._replace(eta=jnp.where(first, c.eta, eta).astype(c.eta.dtype))
    return kept

  nan = jnp.asarray(jnp.nan, dtype)
  init = Carry(
    w=params,
    jv=jnp.asarray(-jnp.inf, dtype),
    value=nan,
    value0=nan,
    grad=symmetry.algebra_zeros(params),
    eta=jnp.asarray(step_size, dtype),
    accepted=jnp.zeros((), jnp.int32),
    g=None if compose is None else symmetry.identity(params),
  )
  if num_steps == 0:
    out = init._replace(
      value=jnp.asarray(obj_lib.evaluate(objective, loss_fn, params, data)[0], dtype)
    )
    out = out._replace(value0=out.value)
  else:
    out = jax.lax.fori_loop(0, num_steps + 1, body, init)

  cand = out.w if compose is None else symmetry.act(params, out.g, data)
  loss1, grads1 = jax.value_and_grad(loss_of)(cand)
  gnorm1 = optax.tree.vdot(grads1, grads1)
  drift = jnp.abs(loss1 - loss0) / loss_scale
  finite = layouts.tree_leaves_finite(cand) & jnp.isfinite(loss1) & jnp.isfinite(gnorm1)
  status = jnp.where(
    ~inputs_finite,
    TeleportStatus.NONFINITE_INPUT,
    jnp.where(
      ~finite,
      TeleportStatus.NONFINITE,
      jnp.where(drift > rtol, TeleportStatus.LOSS_DRIFT, TeleportStatus.SUCCESSFUL),
    ),
  ).astype(jnp.int32)
  accepted = status == TeleportStatus.SUCCESSFUL
  pick = lambda a, b: jnp.where(accepted, a, b)  # noqa: E731
  new_params = jax.tree_util.tree_map(pick, cand, params)
  new_params = optax.tree.cast_like(new_params, params)
  grads = jax.tree_util.tree_map(pick, grads1, grads0)
  info = TeleportInfo(
    accepted=accepted,
    status=status,
    loss_before=loss0,
    loss_after=pick(loss1, loss0),
    grad_norm_sq_before=gnorm0,
    grad_norm_sq_after=pick(gnorm1, gnorm0),
    rel_loss_drift=drift.astype(dtype),
    objective_before=jnp.asarray(out.value0, dtype),
    objective_after=jnp.asarray(out.value, dtype),
    num_accepted_steps=out.accepted,
    final_step_size=out.eta,
  )
  if compose is None:
    return new_params, info, grads
  g_out = jax.tree_util.tree_map(pick, out.g, symmetry.identity(params))
  return new_params, info, grads, g_out


_teleport_jit = jax.jit(
  teleport_with_grad,
  static_argnums=(0,),
  static_argnames=("objective", "num_steps", "normalize", "safeguard"),
)


def group_action(
  params: chex.ArrayTree,
  g: Any,
  *,
  symmetry: sym_lib.Symmetry,
  data: Any = None,
) -> chex.ArrayTree:
  """Applies the group element ``g`` of ``symmetry`` to ``params``.

  Args:
    params: parameter pytree.
    g: a group element, e.g. ``symmetry.exp(xi)`` or ``symmetry.identity(params)``.
    symmetry: the group.
    data: the batch, for data-dependent symmetries.

  Returns:
    The transformed parameters (same structure as ``params``).

  Examples:
    >>> import jax.numpy as jnp, teleport_jax as tj
    >>> params = [jnp.ones((4, 3)), jnp.ones((2, 4))]
    >>> sym = tj.PositiveRescaling()
    >>> g = sym.exp(sym.algebra_zeros(params))
    >>> new = tj.group_action(params, g, symmetry=sym)
    >>> bool(jnp.allclose(new[0], params[0]))
    True
  """
  if not isinstance(symmetry, sym_lib.Symmetry):
    raise TypeError(f"symmetry must be a teleport_jax symmetry, got {type(symmetry).__name__}.")
  if symmetry.needs_data and data is None:
    raise ValueError(f"data is required: {type(symmetry).__name__} depends on the batch.")
  symmetry.validate(params, data)
  return symmetry.act(params, g, data)

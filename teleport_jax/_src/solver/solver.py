"""The teleport driver: one ``lax`` loop, one guard, one info record, any back-end.

:func:`teleport` moves parameters along the orbit of a symmetry (or, with a
group-free back-end, inside the loss level set) to optimise an objective. The
driver owns everything that makes a teleport trustworthy, whatever back-end
proposes the steps:

1. **Input check**: non-finite parameters, data or loss give a rejected
   teleport (status ``NONFINITE_INPUT``) with the input returned, eagerly and
   under ``jit`` alike (``throw=True`` raises instead).
2. **Symmetry check** (:mod:`teleport_jax._src.symmetries.check`): the loss must not change
   to first order along random generators, at the parameters and at a
   perturbed copy; otherwise nothing moves (status ``NOT_A_SYMMETRY``; called
   eagerly, :func:`teleport` raises a :class:`TeleportError`, a ``ValueError``,
   naming the failing layers and the likely cause).
3. **Guard** on every inner step: kept iff finite, within ``rtol`` of the
   starting loss, improving the objective by more than its rounding level,
   and (with a stability constraint) keeping the optimizer's next steps
   stable.
4. **Final check**: the candidate, cast back to the parameters' dtype, must
   be finite and within ``rtol``; otherwise the original parameters are
   returned, bit for bit. A teleport that did not move reports why.

Low-precision parameters (bfloat16, float16) are teleported with the group
math and the loss check in float32 and cast back; the drift is measured on
the cast-back parameters.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from teleport_jax._src.core import precision
from teleport_jax._src.core.errors import TeleportError
from teleport_jax._src.objectives import objectives as obj_lib
from teleport_jax._src.objectives import stability as stab_lib
from teleport_jax._src.solver import backends
from teleport_jax._src.solver import onestep  # noqa: F401 - registers "onestep"
from teleport_jax._src.symmetries import check as check_lib
from teleport_jax._src.symmetries import layouts
from teleport_jax._src.symmetries import symmetry as sym_lib


class TeleportStatus(enum.IntEnum):
  """Outcome of a teleport (stored as an ``int32`` in :class:`TeleportInfo`).

  ``SUCCESSFUL`` is the only outcome in which the parameters moved. Every
  other status returns the original parameters; :meth:`nothing_moved`
  statuses say why the search found nothing to do.
  """

  SUCCESSFUL = 0
  LOSS_DRIFT = 1
  NONFINITE = 2
  NONFINITE_INPUT = 3
  SKIPPED = 4
  NOT_A_SYMMETRY = 5
  NOTHING_TO_MOVE = 6
  NO_IMPROVEMENT = 7
  STEPS_LEFT_LEVEL_SET = 8
  STEPS_NONFINITE = 9
  UNSTABLE = 10
  TRANSFORMED_UPDATES = 11

  @property
  def message(self) -> str:
    return _MESSAGES[self]

  @property
  def nothing_moved(self) -> bool:
    return self in (
      TeleportStatus.NOT_A_SYMMETRY,
      TeleportStatus.NOTHING_TO_MOVE,
      TeleportStatus.NO_IMPROVEMENT,
      TeleportStatus.STEPS_LEFT_LEVEL_SET,
      TeleportStatus.STEPS_NONFINITE,
      TeleportStatus.UNSTABLE,
    )


_MESSAGES = {
  TeleportStatus.SUCCESSFUL: "teleported: the parameters moved and the loss stayed within rtol",
  TeleportStatus.LOSS_DRIFT: "rejected: the loss changed by more than rtol; "
  "original parameters kept",
  TeleportStatus.NONFINITE: "rejected: the teleported point is non-finite; "
  "original parameters kept",
  TeleportStatus.NONFINITE_INPUT: "rejected: params, data or the loss were "
  "non-finite before teleporting; original parameters kept",
  TeleportStatus.SKIPPED: "no teleport at this step",
  TeleportStatus.NOT_A_SYMMETRY: "nothing moved: the group is not a symmetry of this loss "
  "(the loss changes to first order along its generators; see info.symmetry_error). Likely "
  "causes: an activation that is not declared or not homogeneous/invertible, a normalisation "
  "or residual connection between the layers, layers out of call order",
  TeleportStatus.NOTHING_TO_MOVE: "nothing moved: no part of the group can move these "
  "parameters (e.g. DataDependentGL with a batch larger than every layer input, or an empty "
  "group), or the back-end has nothing to move (NullSpace: no layer's input batch has a "
  "null space)",
  TeleportStatus.NO_IMPROVEMENT: "nothing moved: no inner step improved the objective "
  "beyond its rounding level (already optimal on the orbit, or num_steps == 0)",
  TeleportStatus.STEPS_LEFT_LEVEL_SET: "nothing moved: every improving inner step changed "
  "the loss by more than rtol (an inexact action: ill-conditioned data, float32, or not a "
  "symmetry)",
  TeleportStatus.STEPS_NONFINITE: "nothing moved: every inner step was non-finite",
  TeleportStatus.UNSTABLE: "nothing moved: every improving inner step broke the stability "
  "bound (the optimizer's next steps would be less stable than before)",
  TeleportStatus.TRANSFORMED_UPDATES: "rejected: with_teleport received updates that differ "
  "from the loss gradient (a transform before it in an optax.chain would be bypassed); put "
  "the transforms inside: with_teleport(optax.chain(transform, optimizer), ...)",
}


def status_message(status: "int | chex.Array | TeleportInfo") -> str:
  """The message for a :class:`TeleportInfo` or its ``status`` (concrete values only)."""
  if isinstance(status, TeleportInfo):
    status = status.status
  return TeleportStatus(int(status)).message


class TeleportInfo(NamedTuple):
  """What a teleport did. All fields are arrays, so the record passes through jit.

  Attributes:
    accepted: whether the returned parameters are the teleported ones (status
      ``SUCCESSFUL``: they moved and the loss stayed within ``rtol``).
    status: a :class:`TeleportStatus` code.
    loss_before: loss at the input parameters.
    loss_after: loss at the returned parameters.
    grad_norm_sq_before: squared gradient norm at the input parameters.
    grad_norm_sq_after: squared gradient norm at the returned parameters.
    rel_loss_drift: ``|L(candidate) - L(params)| / |L(params)|`` of the teleported
      candidate, whether or not it was accepted (this is why it was rejected).
    objective_before: objective value at the input parameters.
    objective_after: objective value at the candidate.
    num_accepted_steps: inner steps that were kept.
    final_step_size: the back-end's step size at the end (``nan`` if it has none).
    rounding_level: the loss's relative rounding level at the input in the
      parameters' dtype, ``eps * |w * grad L| / |L| + eps``: an accepted drift
      far above it is a sign of an inexact action.
    symmetry_error: the symmetry check's largest relative first-order loss
      change along a generator (``0`` if not checked).
    num_nonfinite_steps: inner steps refused because they were non-finite.
    num_drift_steps: inner steps refused because the loss left ``rtol``.
    num_unstable_steps: inner steps refused by the stability bound.
    step_sharpness_before: the optimizer's step sharpness at the start (``nan``
      without a stability constraint).
    step_sharpness_after: the same at the last kept point.
    stats: the back-end's own statistics.
    stability_checked: whether a stability bound was applied. ``False`` when it
      was turned off, or when ``stability="auto"`` met a teleport that was not
      told which optimizer follows it (no ``optimizer=``/``learning_rate=``):
      then nothing kept that optimizer's next steps stable.
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
  rounding_level: chex.Array
  symmetry_error: chex.Array
  num_nonfinite_steps: chex.Array
  num_drift_steps: chex.Array
  num_unstable_steps: chex.Array
  step_sharpness_before: chex.Array
  step_sharpness_after: chex.Array
  stats: dict
  stability_checked: chex.Array = False

  @property
  def message(self) -> str:
    """The status message (concrete values only)."""
    return status_message(self.status)


def default_rtol(dtype) -> float:
  """Default relative loss-drift tolerance per parameter dtype.

  float64: 1e-8; float32: 1e-5; float16: 2e-3; bfloat16: 1.6e-2 (low-precision
  parameters are teleported in float32, but casting the result back rounds
  every weight, which changes the loss at the dtype's resolution).
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float64:
    return 1e-8
  if dtype == jnp.float16:
    return 2e-3
  if dtype == jnp.bfloat16:
    return 1.6e-2
  return 1e-5


def default_improve_rtol(dtype) -> float:
  """Relative improvement an inner step must bring to count: 1e-4 (float32), 1e-6 (float64).

  Relative to the objective's own scale (:attr:`Objective.scale`): its value,
  or for a look-ahead loss the decrease it predicts at the start point. A
  convergence tolerance: on a flat stretch of the orbit the search stops
  instead of drifting along it with improvements that rounding could reverse.
  A look-ahead's improvement must also exceed ``IMPROVE_ROUNDING_ULPS`` units
  of the loss's last place, far above its rounding (so that two machines, or
  one device and eight, take the same decisions).
  """
  return 1e-6 if jnp.dtype(dtype) == jnp.float64 else 1e-4


# A look-ahead's improvement must exceed this many ulps of the loss: the sum of
# a batch's losses in another order (another device count) differs by a few.
IMPROVE_ROUNDING_ULPS = 64


def _is_low_precision(dtype) -> bool:
  return jnp.dtype(dtype) in precision.LOW_PRECISION


def params_dtype(params):
  """The widest floating dtype of ``params``."""
  leaves = [
    x
    for x in jax.tree_util.tree_leaves(params)
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
  ]
  if not leaves:
    raise TypeError("params must contain floating-point arrays.")
  return jnp.result_type(*leaves)


_params_dtype = params_dtype


def compute_dtype(dtype):
  """float32 for bfloat16/float16 parameters, else the parameters' dtype."""
  return jnp.float32 if _is_low_precision(dtype) else jnp.dtype(dtype)


def empty_info(dtype=jnp.float32, solver: backends.Solver | None = None) -> TeleportInfo:
  """A :class:`TeleportInfo` for "nothing happened yet" (status ``SKIPPED``)."""
  dtype = compute_dtype(dtype)
  z = jnp.zeros((), dtype)
  nan = jnp.full((), jnp.nan, dtype)
  zi = jnp.zeros((), jnp.int32)
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
    num_accepted_steps=zi,
    final_step_size=z,
    rounding_level=z,
    symmetry_error=z,
    num_nonfinite_steps=zi,
    num_drift_steps=zi,
    num_unstable_steps=zi,
    step_sharpness_before=nan,
    step_sharpness_after=nan,
    stability_checked=jnp.asarray(False),
    stats=(solver or backends.Lie()).stats_template(dtype),
  )


@dataclasses.dataclass(frozen=True)
class TeleportConfig:
  """Everything a teleport is asked to do, in one hashable record.

  Attributes:
    objective: what to optimise on the orbit. ``None`` (default): the
      back-end's default: for :class:`~teleport_jax.solvers.OneStep`, the loss
      after one step of the optimizer that runs after the teleport
      (:func:`~teleport_jax.objectives.optimizer_lookahead` ``(1)`` when the
      teleport knows it, :func:`~teleport_jax.objectives.lookahead_loss`
      ``(None, 1)`` otherwise); for the other back-ends, after five.
      Or ``"lookahead"`` (5 gradient steps of ``1/lambda_max``),
      ``"optimizer_lookahead"``, ``"max_grad_norm"``, ``"min_grad_norm"``, an
      :class:`~teleport_jax.objectives.Objective` or a callable.
    solver: the back-end that proposes steps: ``"onestep"``
      (:class:`~teleport_jax.solvers.OneStep`: one objective gradient and two
      value-only trials, a few gradients in all), ``"lie"``
      (:class:`~teleport_jax.solvers.Lie`: ten steps of gradient ascent on the
      algebra), another name or a back-end object. ``None`` (default):
      ``"onestep"`` for the default objective and one-step look-aheads, whose
      gradient it computes from gradients alone; ``"lie"`` for any other
      objective (``"max_grad_norm"`` is then the published teleport).
    num_steps: inner steps (static: a different value recompiles); ``None``
      (default): the back-end's default, 10 (2 trials for
      :class:`~teleport_jax.solvers.OneStep`).
    rtol: allowed relative loss change (default :func:`default_rtol` of the
      parameters' dtype).
    safeguard: keep only finite, improving steps within ``rtol`` (default).
    check: run the symmetry check before teleporting (default).
    stability: ``"auto"`` (default), ``None``/``False`` (off), ``True`` or a
      :class:`~teleport_jax.objectives.Stability`: a bound on the optimizer's step
      sharpness at every kept step. ``"auto"``: :class:`~teleport_jax.objectives.Stability`
      ``()`` when the teleport knows the optimizer that follows
      (:func:`teleport_jax.teleport`'s ``optimizer=``/``learning_rate=``): its
      step sharpness may not exceed ``max(2, its value before)``; off otherwise,
      and ``TeleportInfo.stability_checked`` says so. ``True`` without an
      optimizer bounds the curvature ``|lambda_max(H)|`` by its value before.
      :func:`teleport_jax.with_teleport` turns it on for schedules that
      teleport more than once unless told otherwise.
    improve_rtol: relative improvement of the objective an inner step must
      exceed to count (default :func:`default_improve_rtol`: 1e-4 in float32,
      1e-6 in float64), so that decisions do not follow rounding.
    check_tol: the symmetry check's tolerance on the first-order relative loss
      change (default: 1e-4 in float32, 1e-9 in float64, 1e-2 for a loss
      computed in bfloat16/float16).
    throw: ``None`` (default): raise eagerly only when the group is not a
      symmetry of the loss (a configuration error); ``True``: raise
      :class:`TeleportError` for every rejected teleport (eager calls);
      ``False``: never raise, read ``info.status``.
  """

  objective: Any = None
  solver: Any = None
  num_steps: int | None = None
  rtol: float | None = None
  safeguard: bool = True
  check: bool = True
  stability: Any = "auto"
  improve_rtol: float | None = None
  throw: bool | None = None
  check_tol: float | None = None

  def resolved_objective(self, optimizer_known: bool) -> obj_lib.Objective:
    """``objective``, or the back-end's default for a teleport that does (not) know
    the optimizer that runs after it."""
    if self.objective is not None:
      return self.objective
    return self.solver.default_objective(optimizer_known)

  @property
  def inner_steps(self) -> int:
    """``num_steps``, or the back-end's default (10; 2 for :class:`~teleport_jax.solvers.OneStep`)."""
    if self.num_steps is not None:
      return self.num_steps
    return int(getattr(self.solver, "default_num_steps", 10))

  def __post_init__(self):
    if self.objective is not None:
      object.__setattr__(self, "objective", obj_lib.as_objective(self.objective))
      if self.objective.scale not in ("value", "decrease"):
        raise ValueError(
          f"objective.scale must be 'value' or 'decrease', got {self.objective.scale!r}."
        )
    if self.solver is None:  # one step where the objective allows it, else Lie's search
      one = self.objective is None or obj_lib.has_step_model(self.objective)
      object.__setattr__(self, "solver", "onestep" if one else "lie")
    object.__setattr__(self, "solver", backends.as_solver(self.solver))
    if self.num_steps is not None:
      object.__setattr__(self, "num_steps", obj_lib.check_count(self.num_steps, "num_steps", 0))
    if self.rtol is not None:
      if obj_lib.is_concrete(self.rtol):
        if isinstance(self.rtol, bool) or not float(self.rtol) >= 0:
          raise ValueError(f"rtol must be non-negative, got {self.rtol!r}.")
        object.__setattr__(self, "rtol", float(self.rtol))
    if self.improve_rtol is not None:
      object.__setattr__(self, "improve_rtol", float(self.improve_rtol))
    if self.check_tol is not None:
      object.__setattr__(self, "check_tol", obj_lib.check_positive(self.check_tol, "check_tol"))
    if not (isinstance(self.stability, str) and self.stability == "auto") and (
      self.stability is not True
    ):
      object.__setattr__(self, "stability", stab_lib.as_stability(self.stability))
    for name in ("safeguard", "check"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}.")
    if self.throw not in (None, True, False):
      raise TypeError(f"throw must be None or a bool, got {self.throw!r}.")


_SOLVER_SHORTCUTS = ("step_size", "normalize", "max_step_size")


def make_config(
  config: TeleportConfig | None = None,
  *,
  objective: Any = None,
  solver: Any = None,
  num_steps: Any = None,
  step_size: Any = None,
  normalize: Any = None,
  safeguard: Any = None,
  max_step_size: Any = None,
  rtol: Any = None,
  stability: Any = None,
  check: Any = None,
  throw: Any = None,
) -> TeleportConfig:
  """A :class:`TeleportConfig` from ``config`` and keyword shortcuts (which win)."""
  if config is not None and not isinstance(config, TeleportConfig):
    raise TypeError(f"config must be a teleport_jax.TeleportConfig, got {type(config).__name__}.")
  changes = {
    k: v
    for k, v in dict(
      objective=objective,
      solver=solver,
      num_steps=num_steps,
      safeguard=safeguard,
      rtol=rtol,
      stability=stability,
      check=check,
      throw=throw,
    ).items()
    if v is not None
  }
  if config is None:  # a fresh record: its defaults follow the arguments (the back-end
    cfg = TeleportConfig(**changes)  # follows the objective)
  else:
    cfg = dataclasses.replace(config, **changes) if changes else config
  shortcuts = {
    k: v
    for k, v in dict(step_size=step_size, normalize=normalize, max_step_size=max_step_size).items()
    if v is not None
  }
  if shortcuts:
    missing = [k for k in shortcuts if not hasattr(cfg.solver, k)]
    if missing:
      raise ValueError(
        f"{', '.join(missing)} configure{'s' if len(missing) == 1 else ''} a back-end with "
        f"{'that field' if len(missing) == 1 else 'those fields'}; "
        f"{type(cfg.solver).__name__} has none: set its own fields instead."
      )
    cfg = dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, **shortcuts))
  return cfg


def _describe_output(out: Any) -> str:
  """What a traced loss returned, e.g. ``shape (3,) and dtype float32``."""
  if isinstance(out, jax.ShapeDtypeStruct):
    return f"shape {tuple(out.shape)} and dtype {out.dtype.name}"
  if isinstance(out, (tuple, list)):
    parts = "; ".join(_describe_output(o) for o in out)
    return f"a {type(out).__name__} of {len(out)} ({parts})"
  return f"a {type(out).__name__}"


def _check_loss_output(loss_fn, params, data) -> None:
  """Raises unless ``loss_fn`` returns a real scalar; traces it once (no FLOPs)."""
  out = jax.eval_shape(lambda p: obj_lib.call_loss(loss_fn, p, data), params)
  if isinstance(out, jax.ShapeDtypeStruct):
    if out.shape == () and jnp.issubdtype(out.dtype, jnp.floating):
      return
    hint = (
      "reduce a per-example loss with .mean() or .sum()"
      if out.shape
      else "compute it in floating point (gradients need a real float)"
    )
  else:
    hint = "for a loss with auxiliary outputs pass lambda *a: loss_fn(*a)[0]"
  raise TypeError(
    f"loss_fn must return a scalar floating-point loss; it returned {_describe_output(out)}: "
    f"{hint}."
  )


def bind_and_validate(loss_fn, params, data, symmetry, config: TeleportConfig):
  """Checks the arguments and returns the symmetry bound to this loss (layer order).

  The loss is traced once with :func:`jax.eval_shape` (no FLOPs) to check that
  it returns a scalar floating-point loss.
  """
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
  params_dtype(params)
  needs_symmetry = config.solver.needs_symmetry or symmetry is not None
  if needs_symmetry:
    if not isinstance(symmetry, sym_lib.Symmetry):
      raise TypeError(
        "symmetry must be a teleport_jax symmetry (PositiveRescaling, LinearGL, "
        f"DataDependentGL, Product, ...), got {type(symmetry).__name__}."
      )
    if symmetry.needs_data and data is None:
      raise ValueError(f"data is required: {type(symmetry).__name__} depends on the batch.")
  if needs_symmetry:
    symmetry = symmetry.bind(loss_fn, params, data)
    symmetry.validate(params, data)
  _check_loss_output(loss_fn, params, data)
  return symmetry


def _tree_finite(tree) -> chex.Array:
  return layouts.tree_leaves_finite(tree)


def _where(pred, a, b):
  return jax.tree_util.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


class _Carry(NamedTuple):
  w: Any
  g: Any
  jv: chex.Array
  value: chex.Array
  value0: chex.Array
  aux: Any
  bstate: Any
  accepted: chex.Array
  n_nonfinite: chex.Array
  n_drift: chex.Array
  n_unstable: chex.Array
  stab: Any
  loss: Any = None  # the loss at ``w`` and its gradient, where a back-end computes them
  grads: Any = None


def run(
  loss_fn: Callable,
  params: chex.ArrayTree,
  data: Any,
  symmetry: sym_lib.Symmetry | None,
  config: TeleportConfig,
  context: obj_lib.ObjectiveContext | None = None,
  *,
  track_element: bool = False,
  value_and_grad0: tuple | None = None,
  skip_check: Any = False,
  transport_gradient: bool = False,
):
  """The driver, without validation (traceable; the caller binds the symmetry).

  ``value_and_grad0`` is ``(loss, grads)`` at ``params`` (upcast to the compute
  dtype) if the caller already has them. ``skip_check`` (a bool, possibly
  traced) skips the symmetry check at run time, for a symmetry already checked
  on this model. With ``transport_gradient`` (static), a back-end that tracks
  its group element and a data-free symmetry, the gradient at the new point is
  the transported ``grads0`` (exact for a symmetry; a vector-Jacobian product
  through the action) and only the loss is evaluated there: a teleport then
  costs one forward pass on top of its back-end.

  Returns:
    ``(new_params, info, grads, g)``: ``grads`` is the loss gradient at
    ``new_params`` (an optimizer step after the teleport needs it); ``g`` the
    group element from ``params`` to ``new_params`` when ``track_element``
    (the identity if rejected), else ``None``.
  """
  solver = config.solver
  objective = config.resolved_objective(context is not None and context.optimizer is not None)
  orig = params
  dtype0 = params_dtype(params)
  dtype = compute_dtype(dtype0)
  params = precision.upcast(params)
  rtol = default_rtol(dtype0) if config.rtol is None else config.rtol
  eps = jnp.finfo(dtype).eps
  tiny = jnp.finfo(dtype).tiny
  improve_rtol = default_improve_rtol(dtype) if config.improve_rtol is None else config.improve_rtol
  track = track_element and solver.tracks_element and symmetry is not None
  loss_of = lambda p: obj_lib.call_loss(loss_fn, p, data)  # noqa: E731

  if value_and_grad0 is None:
    loss0, grads0 = jax.value_and_grad(loss_of)(params)
  else:
    loss0, grads0 = value_and_grad0
  gnorm0 = optax.tree.vdot(grads0, grads0)
  inputs_finite = (
    _tree_finite(params)
    & (_tree_finite(data) if data is not None else True)
    & jnp.isfinite(loss0)
    & jnp.isfinite(gnorm0)
  )
  loss_scale = jnp.maximum(jnp.abs(loss0), tiny)
  wg = optax.tree.norm(jax.tree_util.tree_map(lambda w, g: w * g, params, grads0))
  rounding = (jnp.finfo(dtype0).eps * wg / loss_scale + eps).astype(dtype)

  loss_dtype = jnp.result_type(loss0)
  check_tol = config.check_tol
  if check_tol is None:
    check_tol = max(check_lib.default_check_tol(dtype), check_lib.default_check_tol(loss_dtype))
  if config.check and symmetry is not None:

    def do_check(_):
      return check_lib.symmetry_check(loss_of, symmetry, params, data, grads0, tol=check_tol)

    def no_check(_):
      z = jnp.zeros((), dtype)
      return check_lib.CheckResult(z, z, jnp.asarray(True), jnp.asarray(True))

    if isinstance(skip_check, bool):
      res = no_check(None) if skip_check else do_check(None)
    else:
      res = jax.lax.cond(skip_check, no_check, do_check, None)
  else:
    res = check_lib.CheckResult(
      jnp.zeros((), dtype), jnp.zeros((), dtype), jnp.asarray(True), jnp.asarray(True)
    )

  g0 = symmetry.identity(params) if track else None
  bound = obj_lib.bind(objective, loss_fn, params, data, context)
  problem = backends.Problem(
    loss_fn=loss_fn,
    data=data,
    symmetry=symmetry,
    objective=bound,
    sign=1.0 if objective.maximize else -1.0,
    dtype=dtype,
    params0=params,
    loss0=loss0,
  )
  bstate, aux0 = solver.init(problem, params)
  res = res._replace(moves=res.moves & solver.moves(bstate))
  stability = config.stability
  if isinstance(stability, str):  # "auto": bound the optimizer that follows, if known
    stability = solver.default_stability() if context is not None else None
  elif stability is True:  # on, with the back-end's default bound
    stability = solver.default_stability()
  stab0 = None
  if stability is not None:
    stab0 = stability.init(loss_of, params, context, g0, grads=grads0)

  by_decrease = objective.scale == "decrease"
  floor_factor = jnp.asarray(IMPROVE_ROUNDING_ULPS * eps, dtype)

  def improve_by(c: _Carry, value):
    """How much an inner step must improve the objective to count."""
    if not by_decrease:
      return improve_rtol * jnp.maximum(jnp.abs(c.jv), tiny)
    # a look-ahead loss: against the decrease it predicts from the start point,
    # never below the loss's rounding level (there rounding would decide)
    decrease = jnp.abs(c.value0 - loss0)
    floor = floor_factor * jnp.maximum(jnp.maximum(jnp.abs(loss0), jnp.abs(c.value)), tiny)
    return jnp.maximum(improve_rtol * decrease, floor).astype(dtype)

  def judge(c: _Carry, first, cand, g_cand, jv, value, loss, aux, grads=None):
    """The carry after a candidate: kept iff finite, within rtol, improving (and stable)."""
    jv, value, loss = (jnp.asarray(x).astype(dtype) for x in (jv, value, loss))
    # an infinite objective marks an infeasible point (a constraint), not a failure
    feasible = ~jnp.isinf(jv)
    finite = (
      ~jnp.isnan(jv) & jnp.isfinite(loss) & _tree_finite(cand) & (_tree_finite(aux) | ~feasible)
    )
    # keep proposals finite even from a point whose objective gradient is not
    # (e.g. an infeasible start); non-finite steps were counted above
    aux = jax.tree_util.tree_map(lambda a: jnp.where(jnp.isfinite(a), a, 0), aux)
    drift = jnp.abs(loss - loss0) / loss_scale
    within = drift <= rtol
    improved = jv > c.jv + improve_by(c, value)
    ok = finite & within & improved & feasible if config.safeguard else finite & feasible
    stab = c.stab
    stable = jnp.asarray(True)
    # (``first`` may be a Python bool: the start point is then judged without the bound)
    if stability is not None and first is not True:

      def check_stability(_):
        return stability.check(loss_of, cand, context, g_cand, c.stab, grads=grads)

      stable, stab = jax.lax.cond(
        ok & ~first, check_stability, lambda _: (jnp.asarray(True), c.stab), None
      )
      ok = ok & stable
    first = jnp.asarray(first)
    ok = first | ok
    notfirst = ~first
    new = c._replace(w=cand, g=g_cand, jv=jv, value=value, aux=aux, stab=stab)
    if grads is not None:
      new = new._replace(loss=loss, grads=grads)
    kept = _where(ok, new, c)
    return kept._replace(
      value0=jnp.where(first, value, c.value0).astype(c.value0.dtype),
      accepted=c.accepted + (ok & notfirst).astype(jnp.int32),
      n_nonfinite=c.n_nonfinite + (notfirst & ~finite).astype(jnp.int32),
      n_drift=c.n_drift + (notfirst & finite & ~within & bool(config.safeguard)).astype(jnp.int32),
      n_unstable=c.n_unstable
      + (notfirst & finite & within & (~stable | ~feasible)).astype(jnp.int32),
    ), ok

  def body(i, c: _Carry) -> _Carry:
    first = i == 0
    cand, step = solver.propose(problem, c.w, c.bstate, c.aux)
    cand = _where(first, c.w, cand)
    g_cand = None
    if track:
      g_cand = _where(first, c.g, symmetry.compose(c.g, step))
    jv, value, loss, aux = solver.evaluate(problem, cand, g_cand)
    kept, ok = judge(c, first, cand, g_cand, jv, value, loss, aux)
    bstate = solver.update(c.bstate, ok, jnp.asarray(jv).astype(dtype) - c.jv, c.aux)
    return kept._replace(bstate=_where(first, c.bstate, bstate))

  nan = jnp.asarray(jnp.nan, dtype)
  zi = jnp.zeros((), jnp.int32)
  one_shot = getattr(solver, "one_shot", False)
  init = _Carry(
    w=params,
    g=g0,
    jv=jnp.asarray(-jnp.inf, dtype),
    value=nan,
    value0=nan,
    aux=aux0,
    bstate=bstate,
    accepted=zi,
    n_nonfinite=zi,
    n_drift=zi,
    n_unstable=zi,
    stab=stab0,
    loss=jnp.asarray(loss0, dtype) if one_shot else None,
    grads=grads0 if one_shot else None,
  )
  run_search = inputs_finite & res.ok & res.moves
  if config.inner_steps == 0:
    value0 = jnp.asarray(bound(params, g0)[0], dtype)
    out = init._replace(value=value0, value0=value0)
  else:

    def search(_):
      if not one_shot:
        return jax.lax.fori_loop(0, config.inner_steps + 1, body, init)
      # one evaluation of the objective's gradient, then value-only trials
      model = obj_lib.step_model(objective, loss_fn, params, data, context, grads0)
      return solver.search(problem, init, judge, config.inner_steps, model)

    def skip(_):
      return init

    out = jax.lax.cond(run_search, search, skip, None)

  # the point the search evaluated (a one-shot back-end), or the composed element's
  cand = symmetry.act(params, out.g, data) if track and not one_shot else out.w
  new_c = optax.tree.cast_like(cand, orig)
  cand_eval = precision.upcast(new_c)
  if one_shot and dtype0 == dtype:
    # the back-end evaluated the loss and its gradient at this very point
    loss1, grads1 = out.loss, out.grads
  elif transport_gradient and track and not symmetry.needs_data:
    from teleport_jax._src.solver import state_transport

    loss1 = loss_of(cand_eval)
    grads1 = state_transport.transport_cotangent(
      grads0, params, cand_eval, out.g, symmetry=symmetry
    )
  else:
    loss1, grads1 = jax.value_and_grad(loss_of)(cand_eval)
  gnorm1 = optax.tree.vdot(grads1, grads1)
  drift = jnp.abs(loss1 - loss0) / loss_scale
  finite1 = _tree_finite(new_c) & jnp.isfinite(loss1) & jnp.isfinite(gnorm1)
  moved = jnp.any(
    jnp.stack(
      [
        jnp.any(a != b)
        for a, b in zip(jax.tree_util.tree_leaves(new_c), jax.tree_util.tree_leaves(orig))
      ]
    )
  )
  S = TeleportStatus  # noqa: N806
  steps = config.inner_steps
  nothing = jnp.where(
    (out.n_nonfinite == steps) & (steps > 0),
    S.STEPS_NONFINITE,
    jnp.where(
      (out.n_drift > 0) & (out.n_drift >= out.n_unstable),
      S.STEPS_LEFT_LEVEL_SET,
      jnp.where(out.n_unstable > 0, S.UNSTABLE, S.NO_IMPROVEMENT),
    ),
  )
  status = jnp.where(
    ~inputs_finite,
    S.NONFINITE_INPUT,
    jnp.where(
      ~res.ok,
      S.NOT_A_SYMMETRY,
      jnp.where(
        ~res.moves,
        S.NOTHING_TO_MOVE,
        jnp.where(
          (out.accepted == 0) | ~moved,
          nothing,
          jnp.where(~finite1, S.NONFINITE, jnp.where(drift > rtol, S.LOSS_DRIFT, S.SUCCESSFUL)),
        ),
      ),
    ),
  ).astype(jnp.int32)
  accepted = status == S.SUCCESSFUL
  new_params = _where(accepted, new_c, orig)
  grads = optax.tree.cast_like(_where(accepted, grads1, grads0), orig)
  stats = solver.stats(out.bstate)
  info = TeleportInfo(
    accepted=accepted,
    status=status,
    loss_before=loss0.astype(dtype),
    loss_after=jnp.where(accepted, loss1, loss0).astype(dtype),
    grad_norm_sq_before=gnorm0.astype(dtype),
    grad_norm_sq_after=jnp.where(accepted, gnorm1, gnorm0).astype(dtype),
    rel_loss_drift=drift.astype(dtype),
    objective_before=jnp.asarray(out.value0, dtype),
    objective_after=jnp.asarray(out.value, dtype),
    num_accepted_steps=out.accepted,
    final_step_size=jnp.asarray(stats.get("final_step_size", jnp.nan), dtype),
    rounding_level=rounding,
    symmetry_error=jnp.asarray(res.error, dtype),
    num_nonfinite_steps=out.n_nonfinite,
    num_drift_steps=out.n_drift,
    num_unstable_steps=out.n_unstable,
    step_sharpness_before=(nan if stab0 is None else stab0.sigma0.astype(dtype)),
    step_sharpness_after=(nan if out.stab is None else out.stab.sigma.astype(dtype)),
    stability_checked=jnp.asarray(stability is not None),
    stats={k: jnp.asarray(v, dtype) for k, v in stats.items()},
  )
  g_out = None
  if track:
    g_out = _where(accepted, out.g, symmetry.identity(params))
  return new_params, info, grads, g_out


def _has_tracer(tree) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def _run_static(loss_fn, params, data, symmetry, optimizer, opt_state, *, config):
  context = None
  if optimizer is not None:
    context = obj_lib.ObjectiveContext(optimizer, lambda p, g: opt_state, {})
  new_params, info, _, _ = run(loss_fn, params, data, symmetry, config, context)
  return new_params, info


_run_jit = jax.jit(_run_static, static_argnums=(0, 4), static_argnames=("config",))


def teleport(
  loss_fn: Callable[..., chex.Array],
  params: chex.ArrayTree,
  data: Any = None,
  *,
  symmetry: sym_lib.Symmetry | None = None,
  config: TeleportConfig | None = None,
  objective: obj_lib.Objective | str | Callable | None = None,
  solver: Any = None,
  num_steps: int | None = None,
  step_size: float | None = None,
  normalize: bool | None = None,
  safeguard: bool | None = None,
  max_step_size: float | None = None,
  rtol: float | None = None,
  stability: Any = None,
  check: bool | None = None,
  throw: bool | None = None,
  optimizer: optax.GradientTransformation | None = None,
  opt_state: optax.OptState | None = None,
  learning_rate: float | None = None,
) -> tuple[chex.ArrayTree, TeleportInfo]:
  r"""Moves ``params`` along the orbit of ``symmetry`` to optimise an objective.

  With the default back-end (``solver="lie"``) it runs ``num_steps`` steps of
  gradient ascent (or descent for minimised objectives) on the group's Lie
  algebra inside a ``lax.fori_loop`` (see :class:`teleport_jax.solvers.Lie`).
  The driver checks first that the group is a symmetry of this loss, keeps an
  inner step only if it is finite, keeps the loss within ``rtol`` and improves
  the objective beyond rounding, and finally returns the original ``params``
  (bit for bit) unless the teleported point moved, is finite and keeps the
  loss within ``rtol``; ``info.status`` says what happened (see
  :class:`TeleportStatus`).

  **Tell it what runs next.** With ``optimizer=`` and ``opt_state=`` (any
  optax optimizer and its state at ``params``), or ``learning_rate=`` for plain
  gradient descent, the default objective is the loss after 5 steps of *that*
  optimizer (:func:`teleport_jax.objectives.optimizer_lookahead`) and the stability bound
  (on by default) keeps its step sharpness at most ``max(2, its value
  before)``, at every call: repeated teleports in a training loop then cannot
  push a fixed-step optimizer past its stability limit;
  ``info.step_sharpness_before`` and ``_after`` report it. Without either, the
  objective simulates gradient steps of ``1/lambda_max``, no bound applies
  (a step sharpness needs a step size) and ``info.stability_checked`` is
  ``False``: ``stability=True`` then keeps the curvature ``|lambda_max(H)|``
  from rising, at the price of refusing most moves.

  Settings come from ``config`` (a :class:`TeleportConfig`) or the keyword
  shortcuts, which override it: ``objective`` (default ``"lookahead"``, see
  above; bounded), ``solver`` (``"lie"``), ``num_steps`` (10), ``rtol``
  (:func:`default_rtol` of the parameters' dtype), ``safeguard`` (``True``),
  ``stability`` (``"auto"``, see above; ``False`` turns it off), ``check``
  (``True``), ``throw`` (``None``) and the Lie back-end's ``step_size`` (0.1),
  ``normalize`` (``True``), ``max_step_size`` (0.5). Numbers may be Python,
  NumPy or JAX scalars.

  Args:
    loss_fn: ``loss_fn(params, data) -> scalar`` (``loss_fn(params)`` when
      ``data`` is ``None``).
    params: parameter pytree (any floating dtype; bfloat16/float16 are
      teleported in float32 and cast back).
    data: the batch passed to ``loss_fn`` (and to data-dependent symmetries).
    symmetry: the group, e.g. :class:`teleport_jax.PositiveRescaling`, a
      :class:`teleport_jax.symmetries.Product` or the result of
      :func:`teleport_jax.find_symmetries`. For the MLP groups without an
      explicit layout the layer order is read from how ``loss_fn`` calls the
      model.
    config: a :class:`TeleportConfig`.
    objective, solver, num_steps, step_size, normalize, safeguard,
      max_step_size, rtol, stability, check, throw: shortcuts for the fields of
      ``config`` and of the Lie back-end.
    optimizer: the optax optimizer that will run after the teleport: the
      default objective simulates it and the stability bound uses its step.
    opt_state: its state at ``params`` (required with ``optimizer``).
    learning_rate: shortcut for ``optimizer=optax.sgd(learning_rate)`` with its
      state: the step size of the plain gradient descent that follows.

  Returns:
    ``(new_params, info)``; ``new_params`` has the structure and dtypes of
    ``params``; ``info`` is a :class:`TeleportInfo`.

  Raises:
    TypeError, ValueError: for bad arguments, before any computation (a
      ``TypeError`` naming ``loss_fn`` if it does not return a floating-point
      scalar).
    TeleportError: a ``ValueError``; called eagerly, when the group is not a
      symmetry of the loss (unless ``throw=False``), naming the failing layers
      and the likely cause; with ``throw=True``, for any rejected teleport.

  Examples:
    >>> import jax, jax.numpy as jnp, teleport_jax as tj
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> params = [jax.random.uniform(k1, (6, 5)), jax.random.uniform(k2, (3, 6))]
    >>> x, y = jax.random.uniform(k3, (5, 4)), jnp.ones((3, 4))
    >>> act = tj.activations.leaky_relu(0.1)
    >>> loss = lambda p, d: 0.5 * jnp.sum((d[1] - p[1] @ act(p[0] @ d[0])) ** 2)
    >>> sym = tj.DataDependentGL(activation=act)
    >>> new, info = tj.teleport(loss, params, (x, y), symmetry=sym, objective="max_grad_norm")
    >>> bool(info.accepted), bool(info.grad_norm_sq_after > info.grad_norm_sq_before)
    (True, True)
  """
  config = make_config(
    config,
    objective=objective,
    solver=solver,
    num_steps=num_steps,
    step_size=step_size,
    normalize=normalize,
    safeguard=safeguard,
    max_step_size=max_step_size,
    rtol=rtol,
    stability=stability,
    check=check,
    throw=throw,
  )
  symmetry = bind_and_validate(loss_fn, params, data, symmetry, config)
  if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
      f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}."
    )
  if optimizer is not None and opt_state is None:
    raise ValueError("opt_state is required with optimizer= (the state at params).")
  if learning_rate is not None:
    if optimizer is not None:
      raise ValueError(
        "pass optimizer= and opt_state=, or learning_rate= (plain gradient descent), not both."
      )
    learning_rate = obj_lib.check_positive(learning_rate, "learning_rate")
    optimizer = gradient_descent(learning_rate)
    opt_state = optimizer.init(params)
  if optimizer is not None:
    optimizer = optax.with_extra_args_support(optimizer)
  traced = _has_tracer((params, data, opt_state, learning_rate))
  static = dataclasses.replace(config, throw=None)  # raising happens outside: no recompile
  if traced or not _hashable(static):
    new_params, info = _run_static(
      loss_fn, params, data, symmetry, optimizer, opt_state, config=config
    )
  else:
    new_params, info = _run_jit(
      loss_fn, params, data, symmetry, optimizer, opt_state, config=static
    )
  if not traced:
    _raise_if_asked(info, config, loss_fn, params, data, symmetry)
  return new_params, info


@dataclasses.dataclass(frozen=True)
class _GDInit:
  def __call__(self, params):
    del params
    return optax.EmptyState()


@dataclasses.dataclass(frozen=True)
class _GDUpdate:
  learning_rate: Any

  def __call__(self, updates, state, params=None, **extra_args):
    del params, extra_args
    return optax.tree.scale(-self.learning_rate, updates), state


def gradient_descent(learning_rate) -> optax.GradientTransformationExtraArgs:
  """``optax.sgd(learning_rate)`` that compares and hashes by value.

  Equal learning rates give equal transformations, so repeated
  :func:`teleport` calls with ``learning_rate=`` share one compiled program.
  """
  return optax.GradientTransformationExtraArgs(_GDInit(), _GDUpdate(learning_rate))


def _hashable(x) -> bool:
  try:
    hash(x)
  except TypeError:
    return False
  return True


def _raise_if_asked(info, config, loss_fn, params, data, symmetry):
  status = TeleportStatus(int(info.status))
  if status == TeleportStatus.NOT_A_SYMMETRY and config.throw is not False:
    loss_of = lambda p: obj_lib.call_loss(loss_fn, p, data)  # noqa: E731
    dtype = compute_dtype(params_dtype(params))
    tol = config.check_tol or check_lib.default_check_tol(dtype)
    diagnosis = check_lib.diagnose(loss_of, symmetry, precision.upcast(params), data, tol=tol)
    raise TeleportError(f"{status.name}: {diagnosis}")
  if config.throw and status != TeleportStatus.SUCCESSFUL:
    raise TeleportError(f"{status.name}: {status.message}")


def teleport_with_grad(
  loss_fn,
  params,
  data,
  *,
  symmetry,
  objective="max_grad_norm",
  num_steps=10,
  step_size=0.1,
  normalize=True,
  safeguard=True,
  max_step_size=1.0,
  rtol=None,
  compose=None,
):
  """Like :func:`teleport` (no validation, no symmetry check) and also returns the
  loss gradient at the returned parameters; with ``compose`` also the group element.

  Kept for code written against the first solver; new code calls :func:`run`.
  """
  config = TeleportConfig(
    objective=objective,
    solver=backends.Lie(step_size=step_size, normalize=normalize, max_step_size=max_step_size),
    num_steps=num_steps,
    safeguard=safeguard,
    rtol=rtol,
    check=False,
  )
  new_params, info, grads, g = run(
    loss_fn, params, data, symmetry, config, track_element=compose is not None
  )
  if compose is None:
    return new_params, info, grads
  return new_params, info, grads, g


def group_action(
  params: chex.ArrayTree,
  g: Any,
  *,
  symmetry: sym_lib.Symmetry,
  data: Any = None,
) -> chex.ArrayTree:
  """Applies the group element ``g`` of ``symmetry`` to ``params``.

  Conventions: a matrix element ``A`` of a hidden layer maps its features
  ``h -> h A`` (samples in rows): the layer's ``(in, out)`` kernel becomes
  ``K A`` and the next kernel ``A^{-1} K``. For a list of ``W @ x`` matrices
  (``(out, in)``, samples in columns) that is ``W_m -> A^T W_m`` and
  ``W_{m+1} -> W_{m+1} A^{-T}``: an element ``B`` written for column features
  (``x -> B x``, as in the published ``(I + T) @ h``) is ``A = B^T``.

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

"""Teleportation as an optax gradient transformation."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
from collections.abc import Callable
from typing import Any
from typing import Literal
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import shard_alike

from teleport_jax._src.core import precision
from teleport_jax._src.integration import schedules as sched_lib
from teleport_jax._src.objectives import objectives as obj_lib
from teleport_jax._src.objectives import stability as stab_lib
from teleport_jax._src.solver import solver
from teleport_jax._src.solver import state_transport
from teleport_jax._src.symmetries import symmetry as sym_lib

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
    verified: whether a teleport has been accepted with the full checks (the
      symmetry check and the incoming updates compared with the gradient); with
      ``verify="first"`` later teleports skip them.
  """

  count: chex.Array
  inner_state: optax.OptState
  schedule: sched_lib.Schedule
  info: solver.TeleportInfo
  num_teleports: chex.Array
  num_rejected: chex.Array
  max_rel_loss_drift: chex.Array
  verified: chex.Array


def teleport_due(state: optax.OptState, num_steps: int = 1) -> bool:
  """Whether a :func:`with_teleport` in ``state`` is scheduled in its next ``num_steps`` steps.

  For deciding in Python, before each chunk of a compiled training loop, which
  of two programs runs it: the train step as usual (the schedule decides
  inside, with a ``lax.cond``), or the same step compiled with
  ``update(..., teleport=False)``, which holds no conditional and costs what
  the wrapped optimizer costs. A compiled loop that carries the conditional at
  every step pays for it even where it is not taken (on a 2-core CPU the
  conditional's branch keeps XLA from running the step's kernels
  concurrently: 1.17x a plain AdamW step on the workloads' CNN)::

    plain = jax.jit(functools.partial(train_chunk, teleport=False))
    maybe = jax.jit(functools.partial(train_chunk, teleport=None))
    for _ in range(num_chunks):
      run = maybe if tj.teleport_due(opt_state, chunk_len) else plain
      params, opt_state = run(params, opt_state, ...)

  Reads the step count and the schedule to the host (it waits for ``state``).

  Args:
    state: an optimizer state holding one or more :class:`TeleportState`
      (``with_teleport``'s state, or a chain's tuple containing it).
    num_steps: how many steps the next chunk takes (``>= 1``).

  Returns:
    True if any of the states' schedules fires at a step of the window.

  Raises:
    TypeError: if ``state`` holds no :class:`TeleportState`.
    ValueError: if ``num_steps`` is not a positive int.
  """
  found = [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, TeleportState))
    if isinstance(s, TeleportState)
  ]
  if not found:
    raise TypeError(
      f"state holds no TeleportState (got {type(state).__name__}): pass the state of "
      "an optimizer built with teleport_jax.with_teleport."
    )
  return any(sched_lib.fires_within(s.schedule, int(np.asarray(s.count)), num_steps) for s in found)


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


def _repeats(schedule: sched_lib.Schedule) -> bool:
  """Whether a schedule can fire more than once."""
  import numpy as np

  leaves = jax.tree_util.tree_leaves(schedule)
  if any(isinstance(x, jax.core.Tracer) for x in leaves):
    return True  # unknown (e.g. under optax.inject_hyperparams): the safe choice
  if isinstance(schedule, sched_lib.AtSteps):
    return int(np.sum(np.asarray(schedule.steps) >= 0)) > 1
  period, start, stop = (
    int(np.asarray(x)) for x in (schedule.period, schedule.start, schedule.stop)
  )
  return stop - start > period


class TeleportWarning(UserWarning):
  """A :func:`with_teleport` configuration that rejects every teleport it attempts."""


# Statuses that depend on the configuration, not on the point: once seen, every
# later teleport of the same optimizer would end the same way.
_CONFIGURATION_STATUSES = (
  solver.TeleportStatus.NOT_A_SYMMETRY,
  solver.TeleportStatus.TRANSFORMED_UPDATES,
  solver.TeleportStatus.NOTHING_TO_MOVE,
)


def _warn_if_configuration(status) -> None:
  """Host side of the teleport branch's callback: says a never-teleporting setup out loud.

  Python's warning registry shows each message once per place, so a training
  loop gets one warning, not one per teleport.
  """
  status = solver.TeleportStatus(int(status))
  if status in _CONFIGURATION_STATUSES:
    warnings.warn(
      f"with_teleport rejected a teleport with status {status.name}: {status.message}. "
      "This depends on the configuration, not on the parameters, so every teleport of "
      "this optimizer will be rejected the same way (counted in state.num_rejected).",
      TeleportWarning,
      stacklevel=1,
    )


def _chain_links(local: dict) -> list[tuple[str, Callable]] | None:
  """The ``(name, update)`` links of an ``optax.chain``/``named_chain`` frame's locals."""
  fns = local.get("update_fns")
  if isinstance(fns, (tuple, list)):  # optax.chain
    return [(str(i + 1), f) for i, f in enumerate(fns)]
  transforms = local.get("transforms")
  if isinstance(transforms, (tuple, list)) and all(
    isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], str) for t in transforms
  ):  # optax.named_chain: (name, transformation) pairs
    return [(repr(name), getattr(tx, "update", None)) for name, tx in transforms]
  return None


def _check_chain_position(update_fn: Callable) -> None:
  """Raises if ``update_fn`` runs inside an ``optax.chain``/``named_chain`` next to other links.

  A link before ``with_teleport`` would be bypassed at a teleport step (the
  optimizer step is taken from the gradient re-evaluated at the teleported
  point); a link after it would rescale the jump ``w' - w``. Detected at
  trace time from the calling optax combinator's frame.
  """
  frame = sys._getframe(2)
  depth = 0
  while frame is not None and depth < 12:
    code = frame.f_code
    filename = code.co_filename.replace("\\", "/")
    if code.co_name == "update_fn" and "/optax/" in filename and "comb" in filename:
      links = _chain_links(frame.f_locals)
      if links is not None and len(links) > 1:
        mine = [name for name, f in links if f is update_fn]
        if mine:
          kind = "optax.chain" if "update_fns" in frame.f_locals else "optax.named_chain"
          raise solver.TeleportError(
            f"with_teleport is link {mine[0]} of the {len(links)} links of an {kind}: at a "
            "teleport step the links before it would be bypassed (the step is taken from "
            "the gradient at the teleported point) and the links after it would rescale "
            "the teleport's jump. Make it the outermost transformation and put the other "
            "links inside: tj.with_teleport(optax.chain(optax.clip_by_global_norm(1.0), "
            "optax.adam(1e-3)), symmetry, schedule)."
          )
      return
    frame = frame.f_back
    depth += 1


def with_teleport(
  optimizer: optax.GradientTransformation,
  symmetry: sym_lib.Symmetry | None,
  schedule: Any,
  *,
  config: solver.TeleportConfig | None = None,
  objective: obj_lib.Objective | str | Callable | None = None,
  solver_backend: Any = None,
  num_steps: int | None = None,
  step_size: float | None = None,
  normalize: bool | None = None,
  safeguard: bool | None = None,
  max_step_size: float | None = None,
  rtol: float | None = None,
  stability: Any = "auto",
  check: bool | None = None,
  state_policy: StatePolicy = "keep",
  grad_rtol: float = 1e-3,
  verify: str = "auto",
  teleport_batch: int | None = None,
  warm_start: bool = False,
  warn: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps ``optimizer`` so that it teleports on a schedule.

  Follows optax's convention for transformations that need the loss (as
  :func:`optax.scale_by_zoom_linesearch` does): ``update`` takes
  ``value_fn`` — ``value_fn(params, **extra_args) -> loss`` — and the batch as
  further keyword arguments, which reach ``value_fn`` (and the symmetry, for
  data-dependent groups). Keywords ``value_fn`` does not accept are dropped.

  At a step where ``schedule(count)`` is true (decided inside jit with
  ``lax.cond``), the update is

  .. math:: u = (w' - w) + \mathrm{opt}(\nabla L(w')),\qquad w' = \mathrm{teleport}(w)

  i.e. teleport, then take the optimizer's step *from the teleported point*
  (the gradient is re-evaluated there). A rejected teleport keeps ``w' = w``
  and uses the incoming updates. At every other step it is exactly
  ``optimizer``.

  ``update(..., teleport=True | False)`` (a Python bool) decides in Python
  instead of the schedule: the program then holds one branch only, no
  conditional, so a step that does not teleport compiles to the wrapped
  optimizer's step plus the state's bookkeeping. For Python training loops
  with small models, where the conditional's cost shows: jit the step with
  ``static_argnames`` for it and pass ``teleport=bool(schedule(count))``. The
  schedule in the state is then not read; the count still advances.

  **Safe defaults.** The default objective simulates the wrapped optimizer
  (:func:`teleport_jax.objectives.optimizer_lookahead`, 5 steps from its state), so the
  teleport knows the optimizer's step size, schedule and preconditioner. A
  schedule that teleports more than once is stability-constrained
  (``stability="auto"``): no kept inner step may make the optimizer's step
  sharpness exceed ``max(2, its value before)`` (:class:`~teleport_jax.objectives.Stability`);
  pass ``stability=False`` to opt out, or a :class:`~teleport_jax.objectives.Stability`.

  **Place it outermost.** Inside an :func:`optax.chain` with other links it
  raises a ``ValueError`` (links before it would be bypassed at teleport steps,
  links after it would rescale the jump); put them inside:
  ``with_teleport(optax.chain(optax.clip_by_global_norm(1.), optax.adam(1e-3)), ...)``.
  At a teleport step the incoming updates must also equal the loss gradient
  (within ``grad_rtol``); otherwise the teleport is rejected with status
  ``TRANSFORMED_UPDATES`` and the incoming updates are used.

  Optimizer state at a teleport (``state_policy``):

  * ``"keep"`` (default): momentum/accumulators are kept as they are. They were
    computed in the old coordinates, which the teleport changed; this matches
    the published NeurIPS 2022 code.
  * ``"reset"``: the state is re-initialised at the teleported point (as the
    published ICLR 2024 code does by rebuilding the optimizer), so e.g. Adam's
    bias correction restarts.
  * ``"transport"``: the state is moved with the group element, by
    :func:`teleport_jax.transport_state`: momentum and first moments are
    transported as cotangents (exactly); second moments are rescaled exactly
    where the group is elementwise and kept where it mixes coordinates. The
    teleport then also accumulates its inner steps into one group element
    ``g`` and moves to ``w' = g . w``. Needs a back-end that moves along a group.

  Args:
    optimizer: the optax optimizer to wrap.
    symmetry: the group to teleport with (``None`` for group-free back-ends).
    schedule: an int ``k`` (every ``k`` steps, from step 0), a list of step
      counts, or :func:`every`, :func:`at_steps`, :func:`first`.
    config: a :class:`~teleport_jax.TeleportConfig` (its objective ``"lookahead"``
      means :func:`~teleport_jax.objectives.optimizer_lookahead` here).
    objective, solver_backend, num_steps, step_size, normalize, safeguard,
      max_step_size, rtol, check: shortcuts for the fields of ``config``
      (``solver_backend`` is its ``solver``).
    stability: ``"auto"`` (default: on for repeating schedules), ``True``,
      ``False``/``None`` or a :class:`~teleport_jax.objectives.Stability`.
    state_policy: ``"keep"``, ``"reset"`` or ``"transport"``.
    grad_rtol: how far the incoming updates may be from the loss gradient at a
      teleport step.
    verify: when to run the full checks (the symmetry check and the comparison of
      the incoming updates with the loss gradient): ``"always"``, or ``"first"``:
      until one teleport passed them; later teleports then trust the incoming
      updates as the gradient and, for a data-free symmetry and a back-end that
      moves along the group, transport it to the new point instead of
      recomputing it (a teleport then costs its back-end plus one forward pass).
      ``"auto"`` (default): ``"first"`` for data-free symmetries, ``"always"``
      for data-dependent ones (whose exactness depends on the batch).
      Passing ``value=`` (the loss at ``params``, optax's convention) to
      ``update`` saves one more forward pass.
    teleport_batch: teleport on the first ``teleport_batch`` examples of the
      batch (the leading axis of every batch array) instead of all of it: the
      search, its objective and its loss check then cost that fraction. Only
      for a data-free symmetry with a back-end that moves along the group
      (``"lie"``, ``"normbalance"``, ``"gradbalance"``, ``"linesearch"``):
      their moves keep the network function on every input, so a teleport
      found on part of the batch is exact on all of it, and the optimizer's
      step uses the whole batch's gradient, transported to the new point.
      The losses in ``TeleportInfo`` are then those of the teleport batch.
      ``None`` (default): the whole batch.
    warm_start: start each teleport's search at the step size the previous
      attempt ended with (its ``TeleportInfo.final_step_size``: the next step
      its trust region would have tried), clipped to
      ``[step_size / 8, max_step_size]``, instead of at ``step_size``. Teleports
      a few hundred steps apart meet similar orbits, so the search skips the
      growing (or shrinking) phase it went through last time and its
      ``num_steps`` go further. For back-ends with a step size (``"lie"``,
      ``"onestep"``, ``"linesearch"``, ``"nullspace"``, ``"levelset"``); the
      first teleport starts at ``step_size``.
    warn: warn once (a :class:`TeleportWarning`) when a teleport is rejected
      for a reason that depends on the configuration, not on the parameters
      (``NOT_A_SYMMETRY``, ``TRANSFORMED_UPDATES``, ``NOTHING_TO_MOVE``). The
      warning comes from a ``jax.debug.callback``, and a program that holds a
      host callback loses JAX's fast dispatch path: about half a millisecond
      per call of the train step on CPU, teleporting or not. Off by default;
      ``state.num_rejected`` and ``tj.status_message(state.info)`` tell the
      same on the host at no cost.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` with state
    :class:`TeleportState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, teleport_jax as tj
    >>> params = [jnp.full((6, 5), 0.5), jnp.full((3, 6), 0.5)]
    >>> x, y = jnp.linspace(0, 1, 20).reshape(5, 4), jnp.ones((3, 4))
    >>> act = tj.activations.leaky_relu(0.1)
    >>> def loss(p, x, y): return 0.5 * jnp.sum((y - p[1] @ act(p[0] @ x)) ** 2)
    >>> opt = tj.with_teleport(optax.sgd(1e-2), tj.DataDependentGL(activation=act),
    ...                        schedule=tj.schedules.at_steps([0]))
    >>> state = opt.init(params)
    >>> g = jax.grad(loss)(params, x, y)
    >>> u, state = opt.update(g, state, params, value_fn=loss, x=x, y=y)
    >>> int(state.num_teleports)
    1
  """
  s = _resolve_settings(
    optimizer,
    symmetry,
    schedule,
    config=config,
    objective=objective,
    solver_backend=solver_backend,
    num_steps=num_steps,
    step_size=step_size,
    normalize=normalize,
    safeguard=safeguard,
    max_step_size=max_step_size,
    rtol=rtol,
    stability=stability,
    check=check,
    state_policy=state_policy,
    grad_rtol=grad_rtol,
    verify=verify,
    teleport_batch=teleport_batch,
    warm_start=warm_start,
    warn=warn,
  )

  def init_fn(params):
    return _init_state(s, params)

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    if params is None:
      raise ValueError("params must be passed to update: teleporting moves them.")
    if value_fn is None:
      raise ValueError(
        "value_fn must be passed to update (value_fn(params, **batch) -> loss), "
        "following optax's convention for transformations that need the loss."
      )
    _check_chain_position(update_fn)  # reads the caller's frame: keep it in update_fn
    teleport = extra_args.pop("teleport", None)
    if teleport is not None and not isinstance(teleport, (bool, np.bool_)):
      raise TypeError(
        "teleport must be None (the schedule decides) or a Python bool (static: use "
        f"jax.jit(..., static_argnames=...) for it), got {type(teleport).__name__}."
      )
    return _update(s, updates, state, params, value_fn, teleport, extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True, eq=False)
class _Settings:
  """:func:`with_teleport`'s arguments, validated and resolved (made once per optimizer).

  Attributes:
    optimizer: the wrapped optimizer, with extra-args support.
    symmetry: the group (``None`` for group-free back-ends).
    schedule: the schedule, as a :class:`~teleport_jax.Schedule`.
    cfg: the resolved :class:`~teleport_jax.TeleportConfig`.
    state_policy: ``"keep"``, ``"reset"`` or ``"transport"``.
    grad_rtol: the checked ``grad_rtol``.
    verify: ``"always"`` or ``"first"`` (``"auto"`` resolved).
    teleport_batch: the teleport batch size, or ``None``.
    warm_start: whether each search starts at the previous final step size.
    warn: whether a configuration status warns (from a host callback).
    lean: whether later teleports transport the gradient instead of recomputing it.
    track: whether the back-end is asked to track its group element.
  """

  optimizer: optax.GradientTransformationExtraArgs
  symmetry: sym_lib.Symmetry | None
  schedule: sched_lib.Schedule
  cfg: solver.TeleportConfig
  state_policy: str
  grad_rtol: Any
  verify: str
  teleport_batch: int | None
  warm_start: bool
  warn: bool
  lean: bool
  track: bool


def _resolve_settings(
  optimizer,
  symmetry,
  schedule,
  *,
  config,
  objective,
  solver_backend,
  num_steps,
  step_size,
  normalize,
  safeguard,
  max_step_size,
  rtol,
  stability,
  check,
  state_policy,
  grad_rtol,
  verify,
  teleport_batch,
  warm_start,
  warn,
) -> _Settings:
  """Validates :func:`with_teleport`'s arguments (in a fixed order) and resolves them."""
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
      f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}."
    )
  if state_policy not in STATE_POLICIES:
    raise ValueError(
      f"state_policy must be one of {', '.join(map(repr, STATE_POLICIES))}, got {state_policy!r}."
    )
  schedule = sched_lib.as_schedule(schedule)
  if isinstance(stability, str):
    if stability != "auto":
      raise ValueError(f"stability must be 'auto', a bool or a Stability, got {stability!r}.")
    stability = True if _repeats(schedule) else None
  cfg = solver.make_config(
    config,
    objective=objective,
    solver=solver_backend,
    num_steps=num_steps,
    step_size=step_size,
    normalize=normalize,
    safeguard=safeguard,
    max_step_size=max_step_size,
    rtol=rtol,
    check=check,
  )
  if stability is not True:  # True: the back-end's default bound
    stability = stab_lib.as_stability(stability)
  cfg = dataclasses.replace(cfg, stability=stability)
  if cfg.solver.needs_symmetry and not isinstance(symmetry, sym_lib.Symmetry):
    raise TypeError(f"symmetry must be a teleport_jax symmetry, got {type(symmetry).__name__}.")
  if state_policy == "transport" and not cfg.solver.tracks_element:
    raise ValueError(
      f"state_policy='transport' moves optimizer state with the teleport's group element; "
      f"the {type(cfg.solver).__name__} back-end has none. Use 'keep' or 'reset'."
    )
  grad_rtol = obj_lib.check_positive(grad_rtol, "grad_rtol")
  if not isinstance(warm_start, bool):
    raise TypeError(f"warm_start must be a bool, got {type(warm_start).__name__}.")
  if not isinstance(warn, bool):
    raise TypeError(f"warn must be a bool, got {type(warn).__name__}.")
  if warm_start and not (hasattr(cfg.solver, "step_size") and hasattr(cfg.solver, "max_step_size")):
    raise ValueError(
      f"warm_start restarts the search at the previous teleport's step size; the "
      f"{type(cfg.solver).__name__} back-end has no step size (it is closed-form)."
    )
  if verify not in ("auto", "always", "first"):
    raise ValueError(f"verify must be 'auto', 'always' or 'first', got {verify!r}.")
  if verify == "auto":
    verify = "always" if symmetry is None or symmetry.needs_data else "first"
  if teleport_batch is not None:
    if (
      not isinstance(teleport_batch, int) or isinstance(teleport_batch, bool) or teleport_batch < 1
    ):
      raise ValueError(f"teleport_batch must be a positive int or None, got {teleport_batch!r}.")
    if symmetry is None or symmetry.needs_data or not cfg.solver.tracks_element:
      raise ValueError(
        "teleport_batch needs a data-free symmetry and a back-end that moves along the group "
        "(a teleport found on part of the batch is exact on the rest only then); got "
        f"symmetry {type(symmetry).__name__} and back-end {type(cfg.solver).__name__}."
      )
  lean = verify == "first" and symmetry is not None and not symmetry.needs_data
  return _Settings(
    optimizer=optax.with_extra_args_support(optimizer),
    symmetry=symmetry,
    schedule=schedule,
    cfg=cfg,
    state_policy=state_policy,
    grad_rtol=grad_rtol,
    verify=verify,
    teleport_batch=teleport_batch,
    warm_start=warm_start,
    warn=warn,
    lean=lean,
    track=(
      state_policy == "transport"
      or (lean and cfg.solver.tracks_element)
      or teleport_batch is not None
    ),
  )


def _init_state(s: _Settings, params) -> TeleportState:
  """:func:`with_teleport`'s ``init``."""
  # No leaves: optax.tree_map_params's placeholder (only the structure counts).
  dtype = solver.params_dtype(params) if jax.tree.leaves(params) else jnp.float32
  return TeleportState(
    count=jnp.zeros((), jnp.int32),
    inner_state=s.optimizer.init(params),
    schedule=s.schedule,
    info=solver.empty_info(dtype, s.cfg.solver),
    num_teleports=jnp.zeros((), jnp.int32),
    num_rejected=jnp.zeros((), jnp.int32),
    max_rel_loss_drift=jnp.zeros((), solver.compute_dtype(dtype)),
    verified=jnp.asarray(False),
  )


@dataclasses.dataclass(frozen=True, eq=False)
class _Step:
  """One ``update`` call's inputs, as the teleport and plain branches read them.

  Attributes:
    s: the optimizer's settings.
    updates: the incoming updates.
    state: the incoming :class:`TeleportState`.
    params: the parameters.
    value_fn: the loss, ``value_fn(params, **extra_args)``.
    extra_args: ``update``'s other keyword arguments (``value``/``grad``/``teleport`` removed).
    value: the loss at ``params`` if the caller passed it, else ``None``.
    data: the keyword arguments ``value_fn`` accepts (the batch).
    loss_fn: ``value_fn`` as ``loss_fn(params, data)``.
    sym: the symmetry, bound to the loss and the batch.
    state_at: the optimizer state at a candidate point under the state policy.
    context: the objective's :class:`~teleport_jax.objectives.ObjectiveContext`.
    up: ``params`` upcast to the compute dtype.
  """

  s: _Settings
  updates: Any
  state: TeleportState
  params: Any
  value_fn: Callable
  extra_args: dict
  value: Any
  data: dict
  loss_fn: _KeywordLoss
  sym: Any
  state_at: Callable
  context: obj_lib.ObjectiveContext
  up: Any


def _update(s: _Settings, updates, state, params, value_fn, teleport, extra_args):
  """:func:`with_teleport`'s ``update`` after the argument checks: one step, teleporting or not."""
  value = extra_args.pop("value", None)  # optax's convention: the loss at params
  extra_args.pop("grad", None)
  data = _accepted_kwargs(value_fn, extra_args)
  loss_fn = _KeywordLoss(value_fn)
  symmetry = s.symmetry
  if symmetry is not None and symmetry.needs_data and not data:
    raise ValueError(
      f"{type(symmetry).__name__} needs the batch: pass it to update as keyword "
      "arguments that value_fn accepts (value_fn(params, x=..., y=...))."
    )
  sym = solver.bind_and_validate(loss_fn, params, data, symmetry, s.cfg)
  inner = state.inner_state

  def state_at(p, g):
    if s.state_policy == "reset":
      return s.optimizer.init(p)
    if s.state_policy == "transport" and g is not None:
      return state_transport.transport_state(inner, params, p, g, symmetry=sym, data=data)
    return inner

  context = obj_lib.ObjectiveContext(s.optimizer, state_at, dict(value_fn=value_fn, **extra_args))
  step = _Step(
    s=s,
    updates=updates,
    state=state,
    params=params,
    value_fn=value_fn,
    extra_args=extra_args,
    value=value,
    data=data,
    loss_fn=loss_fn,
    sym=sym,
    state_at=state_at,
    context=context,
    up=precision.upcast(params),
  )
  run_cfg = _warm_start_config(s, state, params)

  def teleport_branch(_):
    return _teleport_step(step, run_cfg)

  def skip_branch(_):
    return _plain_step(step)

  if teleport is None:  # the schedule decides, inside the program
    do = state.schedule(state.count)
    out, inner_state, info = jax.lax.cond(do, teleport_branch, skip_branch, None)
  else:  # decided in Python: one branch only, no conditional in the program
    do = jnp.asarray(bool(teleport))
    out, inner_state, info = (teleport_branch if teleport else skip_branch)(None)
  out = _shard_like(out, updates)
  inner_state = _shard_like(inner_state, state.inner_state)
  return out, _next_state(state, do, inner_state, info)


def _warm_start_config(s: _Settings, state: TeleportState, params) -> solver.TeleportConfig:
  """The configuration the search runs with: with ``warm_start``, at the last final step size."""
  cfg = s.cfg
  if not s.warm_start:
    return cfg
  base = jnp.asarray(cfg.solver.step_size, solver.compute_dtype(solver.params_dtype(params)))
  prev = state.info.final_step_size.astype(base.dtype)
  tried = (state.num_teleports + state.num_rejected) > 0
  use = tried & jnp.isfinite(prev) & (prev > 0)
  eta0 = jnp.where(use, jnp.clip(prev, base / 8, cfg.solver.max_step_size), base)
  return dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, step_size=eta0))


def _verified(step: _Step):
  """Whether the full checks can be skipped (``verify="first"`` after an accepted teleport)."""
  return step.state.verified if step.s.verify == "first" else False


def _loss_and_grad0(step: _Step):
  """``(loss, gradient, transformed)`` at ``params``; ``transformed``: the updates are not it."""
  updates, loss_fn, up, data = step.updates, step.loss_fn, step.up, step.data

  def full(_):
    loss0, g0 = jax.value_and_grad(loss_fn)(up, data)
    # the incoming updates must be the loss gradient at params (nothing transformed them)
    diff = optax.tree.norm(optax.tree.sub(updates, optax.tree.cast_like(g0, updates)))
    ref = jnp.maximum(optax.tree.norm(g0), jnp.finfo(jnp.result_type(loss0)).tiny)
    return loss0, g0, diff > step.s.grad_rtol * ref

  def trusted(_):
    loss_dtype = jax.eval_shape(loss_fn, up, data).dtype
    loss0 = loss_fn(up, data) if step.value is None else jnp.asarray(step.value)
    g0 = optax.tree.cast_like(updates, up)
    return loss0.astype(loss_dtype), g0, jnp.asarray(False)

  if step.s.verify == "first":
    return jax.lax.cond(_verified(step), trusted, full, None)
  return full(None)


def _search(step: _Step, run_cfg: solver.TeleportConfig, loss0, g0):
  """Runs the back-end: ``(new_params, info, grads at new_params, g)``, as :func:`solver.run`."""
  s, verified = step.s, _verified(step)
  if s.teleport_batch is None:
    return solver.run(
      step.loss_fn,
      step.params,
      step.data,
      step.sym,
      run_cfg,
      step.context,
      track_element=s.track,
      value_and_grad0=(loss0, g0),
      skip_check=verified,
      transport_gradient=s.lean,
    )
  part = _first_examples(step.data, s.teleport_batch)
  sub_context = obj_lib.ObjectiveContext(
    s.optimizer, step.state_at, dict(value_fn=step.value_fn, **{**step.extra_args, **part})
  )
  new_params, info, _, g = solver.run(
    step.loss_fn,
    step.params,
    part,
    step.sym,
    run_cfg,
    sub_context,
    track_element=True,
    skip_check=verified,
  )
  # the whole batch's gradient at the new point: the incoming one, transported
  grads = state_transport.transport_cotangent(
    g0, step.up, precision.upcast(new_params), g, symmetry=step.sym
  )
  return new_params, info, grads, g


def _moved_inner_state(step: _Step, new_params, g, ok):
  """The wrapped optimizer's state at the teleported point, under the state policy."""
  s, inner = step.s, step.state.inner_state
  if s.state_policy == "reset":
    fresh = s.optimizer.init(new_params)
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), fresh, inner)
  if s.state_policy == "transport":
    moved = state_transport.transport_state(
      inner, step.params, new_params, g, symmetry=step.sym, data=step.data
    )
    return jax.tree_util.tree_map(
      lambda a, b: jnp.where(ok, a, b).astype(jnp.asarray(b).dtype), moved, inner
    )
  return inner


def _teleport_step(step: _Step, run_cfg: solver.TeleportConfig):
  """The teleport branch: teleport, then the optimizer's step from the new point.

  Returns ``(updates, inner_state, info)``; a rejected teleport keeps ``params``
  and the incoming updates.
  """
  params, updates = step.params, step.updates
  loss0, g0, transformed = _loss_and_grad0(step)
  new_params, info, grads, g = _search(step, run_cfg, loss0, g0)
  ok = info.accepted & ~transformed
  info = info._replace(
    accepted=ok,
    status=jnp.where(transformed, solver.TeleportStatus.TRANSFORMED_UPDATES, info.status).astype(
      jnp.int32
    ),
  )
  new_params = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new_params, params)
  grads = jax.tree_util.tree_map(
    lambda a, b: jnp.where(ok, a, b).astype(jnp.asarray(b).dtype), grads, updates
  )
  moved_inner = _moved_inner_state(step, new_params, g, ok)
  info = jax.tree_util.tree_map(
    lambda a, b: jnp.asarray(a, jnp.asarray(b).dtype), info, step.state.info
  )
  if step.s.warn:  # a host callback costs every call of the program its fast dispatch
    jax.debug.callback(_warn_if_configuration, info.status)
  inner_updates, inner_state = step.s.optimizer.update(
    grads, moved_inner, new_params, value_fn=step.value_fn, **step.extra_args
  )
  out = optax.tree.add(optax.tree.sub(new_params, params), inner_updates)
  return optax.tree.cast_like(out, updates), inner_state, info


def _plain_step(step: _Step):
  """The branch without a teleport: exactly the wrapped optimizer's step."""
  # nothing else on the common path
  inner_updates, inner_state = step.s.optimizer.update(
    step.updates, step.state.inner_state, step.params, value_fn=step.value_fn, **step.extra_args
  )
  return optax.tree.cast_like(inner_updates, step.updates), inner_state, step.state.info


def _next_state(state: TeleportState, do, inner_state, info) -> TeleportState:
  """The state after a step: the count advanced, the teleport's outcome recorded."""
  accepted = do & info.accepted
  return TeleportState(
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
    verified=state.verified | accepted,
  )


def _first_examples(data: dict, n: int) -> dict:
  """Every batch array cut to its first ``n`` examples (leading axis); scalars kept."""

  def cut(x):
    x = jnp.asarray(x)
    return x[:n] if x.ndim >= 1 else x

  return jax.tree.map(cut, data)


def _shard_like(tree: chex.ArrayTree, like: chex.ArrayTree) -> chex.ArrayTree:
  """``tree`` sharded as ``like`` under jit (a no-op on one device).

  The teleport branch's arithmetic would otherwise let jit's sharding
  propagation pick other layouts for the updates and the optimizer state than
  those they came in with (and a second compile at the next step).
  """
  return jax.tree.map(lambda a, b: shard_alike.shard_alike(a, b)[0], tree, like)


class _KeywordLoss:
  """``loss(params, data_dict) = value_fn(params, **data_dict)``; hashable by ``value_fn``."""

  def __init__(self, value_fn):
    self.value_fn = value_fn

  def __call__(self, params, data):
    return self.value_fn(params, **data)

  def __eq__(self, other):
    return type(other) is _KeywordLoss and other.value_fn is self.value_fn

  def __hash__(self):
    return hash(("keyword_loss", id(self.value_fn)))

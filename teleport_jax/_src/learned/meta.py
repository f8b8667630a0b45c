"""Meta-training a teleport policy: truncated back-propagation through unrolled training.

A task is one training run: initial parameters and a batch, drawn from a
family by a key. ``unroll`` optimizer steps of every task in a batch of tasks
run in one ``lax.scan``, ``vmap``-ed over the tasks; the meta-loss is the mean
over the steps and tasks of ``log L`` (scale-free: early and late steps of a
run count alike); its gradient with respect to the policy's weights, through
the steps, the exact actions and the transported gradients, updates the policy
with an optax meta-optimizer. The tasks then continue from where the unroll
left them (their state is not differentiated further: truncated
back-propagation) until ``horizon`` steps, when that task is drawn afresh. The
tasks' ages are staggered (task ``j`` of ``n`` starts as if ``j / n`` of the way
through its horizon), so that every meta-batch mixes early and late phases of
training instead of cycling through them together. The whole meta-step is one
compiled program.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from teleport_jax._src.integration import balanced as bal_lib
from teleport_jax._src.learned import move as move_lib
from teleport_jax._src.solver import state_transport
from teleport_jax._src.symmetries import symmetry as sym_lib


class TaskFamily(NamedTuple):
  """Training runs to meta-train on.

  Attributes:
    sample: ``sample(key) -> (params, data)``: one task's initial parameters
      and its batch (jit- and vmap-able).
    loss: ``loss(params, data) -> scalar``.
    symmetry: the group the policy moves in (bound to the model).
  """

  sample: Callable[[chex.PRNGKey], tuple[chex.ArrayTree, Any]]
  loss: Callable[[chex.ArrayTree, Any], chex.Array]
  symmetry: sym_lib.Symmetry


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  """How a policy is meta-trained.

  Attributes:
    tasks: tasks per meta-step (``vmap``-ed).
    unroll: optimizer steps per meta-step (back-propagated through).
    horizon: steps of a task before it is drawn afresh (a multiple of ``unroll``;
      the tasks' ages are staggered over it).
    meta_steps: meta-steps in all.
    meta_lr: the meta-optimizer's (Adam's) learning rate.
    meta_lr_final: where given, the meta learning rate decays from ``meta_lr`` to
      this over the meta-steps (cosine), so that the policy settles instead of
      ending on the noise of its last meta-batches.
    normalize_tasks: divide each task's meta-gradient by its norm before
      averaging over the tasks, so that every task counts alike (without it the
      tasks early in their runs, whose loss falls fastest, set the direction).
    clip: the meta-gradient's global norm is clipped to this before Adam
      (gradients through unrolled training spike); ``None``: no clipping.
    lr: the inner optimizer's step size where the policy proposes none.
    teleport: whether the policy moves the parameters (``False`` meta-trains
      its step size alone, the comparison that isolates what the move adds).
    divergence: a task whose loss exceeds this factor times its loss at the
      start of an unroll stops moving for the rest of it (so that no value
      overflows and the meta-loss counts the divergence) and is then drawn afresh.
    norm_penalty: adds ``norm_penalty * log(|w_end|^2 / |w_start|^2)`` over each
      unroll to the meta-loss (``0``: none). Moves along the orbit that the
      loss does not see (a dead ReLU unit's scale, say) cost nothing inside an
      unroll, so a policy meta-trained on short unrolls may push the
      parameters' norm up without bound until plain SGD steps from there
      diverge; this term makes it pay for the growth. The unroll's starting
      norm is a constant (truncated back-propagation). It counts the total
      norm only: it does not stop a policy from shrinking one layer while
      growing another, which raises the relative size of Adam's per-coordinate
      steps in the shrunken layer.
    seed: key of the task draws.
  """

  tasks: int = 8
  unroll: int = 10
  horizon: int = 100
  meta_steps: int = 200
  meta_lr: float = 1e-3
  meta_lr_final: float | None = None
  normalize_tasks: bool = True
  clip: float | None = 1.0
  lr: float = 1e-4
  teleport: bool = True
  divergence: float = 10.0
  norm_penalty: float = 0.0
  seed: int = 0

  def __post_init__(self):
    for name in ("tasks", "unroll", "horizon", "meta_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"MetaConfig.{name} must be positive, got {getattr(self, name)}.")
    if self.meta_lr_final is not None and not 0 < self.meta_lr_final <= self.meta_lr:
      raise ValueError(
        f"MetaConfig.meta_lr_final must lie in (0, meta_lr], got {self.meta_lr_final}."
      )
    if not self.norm_penalty >= 0:
      raise ValueError(f"MetaConfig.norm_penalty must be >= 0, got {self.norm_penalty}.")
    if self.clip is not None and not self.clip > 0:
      raise ValueError(f"MetaConfig.clip must be positive or None, got {self.clip}.")
    if self.horizon % self.unroll:
      raise ValueError(
        f"MetaConfig.horizon ({self.horizon}) must be a multiple of unroll ({self.unroll})."
      )


class MetaResult(NamedTuple):
  """What :func:`meta_train` returns.

  Attributes:
    policy: the trained policy (a new module; the one passed in is unchanged).
    losses: the meta-loss of every meta-step, ``(meta_steps,)``.
    seconds: wall-clock seconds of the meta-training, compilation included.
    compile_seconds: of which compiling the meta-step.
  """

  policy: nnx.Module
  losses: chex.Array
  seconds: float
  compile_seconds: float


def inner_step(policy, family: TaskFamily, base_lr: float | None, teleport: bool = True):
  """``step((params, carry), data) -> ((params', carry'), loss)``: one plain-SGD step of a task.

  With ``teleport`` the policy's move comes first (from the point and gradient
  of this step), then the step from the moved point with the transported
  gradient, at the policy's step size if it proposes one, else at ``base_lr``
  (which may be ``None`` only for a policy that proposes one). This is
  :func:`optimizer_step` around ``optax.sgd``, whose state is empty.
  """
  config = getattr(policy, "config", None)
  proposes = getattr(config, "lr_range", None) is not None
  if base_lr is None and not proposes:
    raise ValueError("base_lr is required for a policy that proposes no step size (lr_range).")
  sgd = optax.sgd(1.0 if proposes else base_lr)
  one = optimizer_step(policy, family, sgd, teleport)

  def step(state, data):
    params, carry = state
    (new, (carry, _)), loss = one((params, (carry, sgd.init(params))), data)
    return (new, carry), loss

  return step


def optimizer_step(
  policy, family: TaskFamily, optimizer: optax.GradientTransformation, teleport: bool = True
):
  """``step((params, (carry, opt_state)), data) -> (..., loss)``: one step of ``optimizer``.

  What :func:`~teleport_jax.learned.learned_teleport` around ``optimizer`` does
  at a step, written for meta-training: the policy's move (from this step's point
  and gradient), the optimizer's state carried to the moved point
  (:func:`~teleport_jax.transport_state`), the optimizer's update from there with
  the transported gradient, scaled by the policy's step size if it proposes one.
  Without ``teleport`` the move is skipped (the policy may still set the step
  size). Pass :func:`optimizer_carry` as ``meta_train``'s ``init_carry``.

  Args:
    policy: the policy module.
    family: the tasks.
    optimizer: an optax optimizer (its state must not depend on anything but the
      parameters: ``optimizer.init(params)``).
    teleport: whether the policy moves the parameters.

  Returns:
    The step function, for ``meta_train(..., step=lambda m: optimizer_step(m, ...))``.
  """
  optimizer = optax.with_extra_args_support(optimizer)

  def step(state, data):
    params, (carry, opt_state) = state
    loss, grads = jax.value_and_grad(family.loss)(params, data)
    mv = move_lib.learned_move(policy, family.symmetry, params, grads, loss, carry, data)
    at, g = params, grads
    if teleport:
      at, g = mv.params, mv.grads
      opt_state = state_transport.transport_state(
        opt_state, params, mv.params, mv.element, symmetry=family.symmetry, data=data
      )
    updates, opt_state = optimizer.update(g, opt_state, at)
    if mv.proposal.lr is not None:
      updates = optax.tree.scale(mv.proposal.lr, updates)
    return (optax.apply_updates(at, updates), (mv.proposal.carry, opt_state)), loss

  return step


def optimizer_carry(policy, optimizer: optax.GradientTransformation):
  """``init_carry`` of :func:`meta_train` for :func:`optimizer_step`: the policy's
  carry and ``optimizer.init(params)``."""
  return lambda params: (policy.initial_carry(), optimizer.init(params))


def meta_train(
  policy: nnx.Module,
  family: TaskFamily,
  config: MetaConfig | None = None,
  *,
  step: Callable | None = None,
  init_carry: Callable[[chex.ArrayTree], Any] | None = None,
  progress: bool = False,
  callback: Callable[[int, float], None] | None = None,
) -> MetaResult:
  """Meta-trains ``policy`` on tasks of ``family``.

  Args:
    policy: the module to start from (not modified): a teleport policy, or any
      nnx module with ``initial_carry()`` that ``step`` knows how to use.
    family: the tasks.
    config: sizes and learning rates (default :class:`MetaConfig` ``()``).
    step: ``step(module) -> step_fn``, with ``step_fn((params, carry), data) ->
      ((params, carry), loss)`` one optimizer step of a task (a learned
      optimizer, say); default :func:`inner_step` with ``config.lr`` and
      ``config.teleport``.
    init_carry: ``init_carry(params) -> carry``, the state a task starts
      with beside its parameters (an optimizer's state, say:
      :func:`optimizer_carry`); default ``policy.initial_carry()``.
    progress: show a progress bar (tqdm) with the running meta-loss.
    callback: called as ``callback(meta_step, meta_loss)`` after every meta-step.

  Returns:
    :class:`MetaResult`.
  """
  config = MetaConfig() if config is None else config
  graphdef, weights = nnx.split(policy)
  # a non-finite meta-gradient (a task diverged) skips the update, however many in a row
  meta_lr = config.meta_lr
  if config.meta_lr_final is not None:
    meta_lr = optax.cosine_decay_schedule(
      config.meta_lr, config.meta_steps, alpha=config.meta_lr_final / config.meta_lr
    )
  adam = optax.adam(meta_lr)
  if config.clip is not None:
    adam = optax.chain(optax.clip_by_global_norm(config.clip), adam)
  meta_opt = optax.apply_if_finite(adam, 2**30)
  key = jax.random.key(config.seed)

  def one(w, params, carry, data):
    """One task's unroll: ``(mean log loss, (params, carry, diverged))``."""
    start = params
    pol = nnx.merge(graphdef, w)
    one_step = inner_step(pol, family, config.lr, config.teleport) if step is None else step(pol)
    cap = config.divergence * jax.lax.stop_gradient(family.loss(params, data))

    def guarded(state, _):
      # a run whose loss passed the cap stops moving: every value stays finite, and
      # the remaining steps of the unroll count its (large) loss
      (new, new_carry), loss = one_step(state, data)
      stop = ~(loss < cap)
      new = jax.tree.map(lambda a, b: jnp.where(stop, a, b), state[0], new)
      return (new, new_carry), (loss, stop)

    (params, carry), (losses, stopped) = jax.lax.scan(
      guarded, (params, carry), None, length=config.unroll
    )
    value = jnp.mean(jnp.log(losses))
    if config.norm_penalty:
      value = value + config.norm_penalty * (
        jnp.log(optax.tree.norm(params, squared=True))
        - jnp.log(jax.lax.stop_gradient(optax.tree.norm(start, squared=True)))
      )
    return value, (params, carry, jnp.any(stopped))

  def meta_gradient(w, tasks):
    params, carry, data = tasks
    per_task = jax.vmap(jax.value_and_grad(one, has_aux=True), in_axes=(None, 0, 0, 0))
    (logs, (params, carry, diverged)), grads = per_task(w, params, carry, data)
    if config.normalize_tasks:
      # every task's gradient counts alike: a task early in its run, where the loss
      # falls fast, would otherwise outweigh the late ones
      norms = jax.vmap(optax.tree.norm)(grads)
      grads = jax.tree.map(lambda g: g / _expand(jnp.maximum(norms, 1e-30), g), grads)
    grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
    return jnp.mean(logs), grads, (params, carry, data), diverged

  per_task = config.horizon // config.unroll

  def meta_step(w, opt_state, tasks, ages, key):
    value, grads, tasks, diverged = meta_gradient(w, tasks)
    updates, opt_state = meta_opt.update(grads, opt_state, w)
    tasks = jax.lax.stop_gradient(tasks)
    # a task at its horizon, diverged or non-finite starts again from a fresh draw
    ok = jax.vmap(bal_lib._finite)(tasks[0]) & ~diverged & (ages + 1 < per_task)
    tasks = jax.tree.map(lambda a, b: jnp.where(_expand(ok, a), a, b), tasks, draw(key))
    ages = jnp.where(ok, ages + 1, 0)
    return optax.apply_updates(w, updates), opt_state, tasks, ages, value

  def draw(k):
    params, data = jax.vmap(family.sample)(jax.random.split(k, config.tasks))
    carry = jax.vmap(init_carry or (lambda _: policy.initial_carry()))(params)
    return params, carry, data

  t0 = time.perf_counter()
  opt_state = meta_opt.init(weights)
  key, sub = jax.random.split(key)
  draw_jit = jax.jit(draw)
  tasks = draw_jit(sub)
  ages = (jnp.arange(config.tasks) * per_task) // config.tasks
  compiled = (
    jax.jit(meta_step, donate_argnums=(1, 2, 3))
    .lower(weights, opt_state, tasks, ages, key)
    .compile()
  )
  compile_s = time.perf_counter() - t0
  bar = _bar(progress, config.meta_steps)
  losses = []
  for i in range(config.meta_steps):
    key, sub = jax.random.split(key)
    weights, opt_state, tasks, ages, value = compiled(weights, opt_state, tasks, ages, sub)
    losses.append(value)
    if bar is not None or callback is not None:
      v = float(value)
      if bar is not None:
        bar.update()
        bar.set_postfix(meta_loss=f"{v:.3f}")
      if callback is not None:
        callback(i, v)
  losses = jnp.stack(losses)
  jax.block_until_ready(weights)
  if bar is not None:
    bar.close()
  return MetaResult(nnx.merge(graphdef, weights), losses, time.perf_counter() - t0, compile_s)


def _expand(mask: chex.Array, like: chex.Array) -> chex.Array:
  return mask.reshape(mask.shape + (1,) * (jnp.ndim(like) - 1))


def _bar(progress: bool, total: int):
  if not progress:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:  # tqdm is an optional dependency
    return None
  return tqdm(total=total, desc="meta-training", unit="step")

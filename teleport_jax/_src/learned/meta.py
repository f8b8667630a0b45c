"""Meta-training a teleport policy: truncated back-propagation through unrolled training.

A task is one training run: initial parameters and a batch, drawn from a
family by a key. ``unroll`` optimizer steps of every task in a batch of tasks
run in one ``lax.scan``, ``vmap``-ed over the tasks; the meta-loss is the mean
over the steps and tasks of ``log L`` (scale-free: early and late steps of a
run count alike); its gradient with respect to the policy's weights, through
the steps, the exact actions and the transported gradients, updates the policy
with an optax meta-optimizer. The tasks then continue from where the unroll
left them (their state is not differentiated further: truncated
back-propagation) until ``horizon`` steps, when a new batch of tasks is drawn.
The whole meta-step is one compiled program.
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
    horizon: steps of a task before a new batch is drawn (a multiple of ``unroll``).
    meta_steps: meta-steps in all.
    meta_lr: the meta-optimizer's (Adam's) learning rate.
    lr: the inner optimizer's step size where the policy proposes none.
    teleport: whether the policy moves the parameters (``False`` meta-trains
      its step size alone, the comparison that isolates what the move adds).
    divergence: a task whose loss exceeds this factor times its loss at the
      start of an unroll stops moving for the rest of it (so that no value
      overflows and the meta-loss counts the divergence) and is then drawn afresh.
    seed: key of the task draws.
  """

  tasks: int = 8
  unroll: int = 10
  horizon: int = 100
  meta_steps: int = 200
  meta_lr: float = 1e-3
  lr: float = 1e-4
  teleport: bool = True
  divergence: float = 10.0
  seed: int = 0

  def __post_init__(self):
    for name in ("tasks", "unroll", "horizon", "meta_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"MetaConfig.{name} must be positive, got {getattr(self, name)}.")
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


def inner_step(policy, family: TaskFamily, base_lr: float, teleport: bool = True):
  """``step((params, carry), data) -> ((params', carry'), loss)``: one plain-SGD step of a task.

  With ``teleport`` the policy's move comes first (from the point and gradient
  of this step), then the step from the moved point with the transported
  gradient, at the policy's step size if it proposes one.
  """

  def step(state, data):
    params, carry = state
    loss, grads = jax.value_and_grad(family.loss)(params, data)
    mv = move_lib.learned_move(policy, family.symmetry, params, grads, loss, carry, data)
    lr = base_lr if mv.proposal.lr is None else mv.proposal.lr
    at, g = (mv.params, mv.grads) if teleport else (params, grads)
    new = jax.tree.map(lambda w, c: w - lr * c, at, g)
    return (new, mv.proposal.carry), loss

  return step


def meta_train(
  policy: nnx.Module,
  family: TaskFamily,
  config: MetaConfig | None = None,
  *,
  step: Callable | None = None,
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
    progress: show a progress bar (tqdm) with the running meta-loss.
    callback: called as ``callback(meta_step, meta_loss)`` after every meta-step.

  Returns:
    :class:`MetaResult`.
  """
  config = MetaConfig() if config is None else config
  graphdef, weights = nnx.split(policy)
  # a non-finite meta-gradient (a task diverged) skips the update, however many in a row
  meta_opt = optax.apply_if_finite(optax.adam(config.meta_lr), 2**30)
  key = jax.random.key(config.seed)

  def segment(w, tasks):
    pol = nnx.merge(graphdef, w)
    if step is None:
      one_step = inner_step(pol, family, config.lr, config.teleport)
    else:
      one_step = step(pol)

    def one(params, carry, data):
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
      return params, carry, jnp.mean(jnp.log(losses)), jnp.any(stopped)

    params, carry, data = tasks
    params, carry, logs, diverged = jax.vmap(one)(params, carry, data)
    return jnp.mean(logs), ((params, carry, data), diverged)

  def meta_step(w, opt_state, tasks, key):
    (value, (tasks, diverged)), grads = jax.value_and_grad(segment, has_aux=True)(w, tasks)
    updates, opt_state = meta_opt.update(grads, opt_state, w)
    tasks = jax.lax.stop_gradient(tasks)
    # a task that diverged or went non-finite starts again from a fresh draw
    ok = jax.vmap(bal_lib._finite)(tasks[0]) & ~diverged
    tasks = jax.tree.map(lambda a, b: jnp.where(_expand(ok, a), a, b), tasks, draw(key))
    return optax.apply_updates(w, updates), opt_state, tasks, value

  def draw(k):
    params, data = jax.vmap(family.sample)(jax.random.split(k, config.tasks))
    carry = jax.vmap(lambda _: policy.initial_carry())(jnp.arange(config.tasks))
    return params, carry, data

  t0 = time.perf_counter()
  opt_state = meta_opt.init(weights)
  key, sub = jax.random.split(key)
  draw_jit = jax.jit(draw)
  tasks = draw_jit(sub)
  compiled = (
    jax.jit(meta_step, donate_argnums=(1, 2)).lower(weights, opt_state, tasks, key).compile()
  )
  compile_s = time.perf_counter() - t0
  per_task = config.horizon // config.unroll
  bar = _bar(progress, config.meta_steps)
  losses = []
  for i in range(config.meta_steps):
    if i and i % per_task == 0:
      key, sub = jax.random.split(key)
      tasks = draw_jit(sub)
    key, sub = jax.random.split(key)
    weights, opt_state, tasks, value = compiled(weights, opt_state, tasks, sub)
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

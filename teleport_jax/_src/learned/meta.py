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
    seed: key of the task draws.
  """

  tasks: int = 8
  unroll: int = 10
  horizon: int = 100
  meta_steps: int = 200
  meta_lr: float = 1e-3
  lr: float = 1e-4
  teleport: bool = True
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
  progress: bool = False,
  callback: Callable[[int, float], None] | None = None,
) -> MetaResult:
  """Meta-trains ``policy`` on tasks of ``family``.

  Args:
    policy: the policy to start from (not modified).
    family: the tasks.
    config: sizes and learning rates (default :class:`MetaConfig` ``()``).
    progress: show a progress bar (tqdm) with the running meta-loss.
    callback: called as ``callback(meta_step, meta_loss)`` after every meta-step.

  Returns:
    :class:`MetaResult`.
  """
  config = MetaConfig() if config is None else config
  graphdef, weights = nnx.split(policy)
  meta_opt = optax.apply_if_finite(optax.adam(config.meta_lr), 10)
  key = jax.random.key(config.seed)

  def segment(w, tasks):
    pol = nnx.merge(graphdef, w)
    step = inner_step(pol, family, config.lr, config.teleport)

    def one(params, carry, data):
      (params, carry), losses = jax.lax.scan(
        lambda s, _: step(s, data), (params, carry), None, length=config.unroll
      )
      return params, carry, jnp.mean(jnp.log(losses))

    params, carry, data = tasks
    params, carry, logs = jax.vmap(one)(params, carry, data)
    return jnp.mean(logs), (params, carry, data)

  def meta_step(w, opt_state, tasks):
    (value, tasks), grads = jax.value_and_grad(segment, has_aux=True)(w, tasks)
    updates, opt_state = meta_opt.update(grads, opt_state, w)
    return optax.apply_updates(w, updates), opt_state, jax.lax.stop_gradient(tasks), value

  def draw(k):
    params, data = jax.vmap(family.sample)(jax.random.split(k, config.tasks))
    carry = jax.vmap(lambda _: policy.initial_carry())(jnp.arange(config.tasks))
    return params, carry, data

  t0 = time.perf_counter()
  opt_state = meta_opt.init(weights)
  key, sub = jax.random.split(key)
  draw_jit = jax.jit(draw)
  tasks = draw_jit(sub)
  compiled = jax.jit(meta_step, donate_argnums=(1, 2)).lower(weights, opt_state, tasks).compile()
  compile_s = time.perf_counter() - t0
  per_task = config.horizon // config.unroll
  bar = _bar(progress, config.meta_steps)
  losses = []
  for i in range(config.meta_steps):
    if i and i % per_task == 0:
      key, sub = jax.random.split(key)
      tasks = draw_jit(sub)
    weights, opt_state, tasks, value = compiled(weights, opt_state, tasks)
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


def _bar(progress: bool, total: int):
  if not progress:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:  # tqdm is an optional dependency
    return None
  return tqdm(total=total, desc="meta-training", unit="step")

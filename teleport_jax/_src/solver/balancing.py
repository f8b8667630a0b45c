r"""Cheap teleports: closed-form balancing and a one-direction line search.

A searched teleport differentiates its objective at every inner step and
costs hundreds of gradient evaluations; what pays on the clock is cheap and
frequent. The back-ends here cost about one gradient evaluation or less:

* :class:`Balance` with ``target="norm"`` (the ENorm idea): for every channel
  of a rescaling site, the scale that minimises the squared norm of the
  weights it touches, ``a s^2 + b / s^2`` with ``a`` the writers' and ``b`` the
  readers' squared entries, is ``s = (b / a)^{1/4}``; for a GL site,
  ``tr(P M) + tr(Q M^{-1})`` with ``M = A A^T``, ``P = W_w^T W_w`` and
  ``Q = W_r W_r^T`` is minimised by the matrix geometric mean
  ``M = P^{-1} # Q`` (two symmetric eigendecompositions). No data, no gradient.
* :class:`Balance` with ``target="grad"``: the same for the gradient, which
  moves as a cotangent (writers ``/ s``, readers ``* s``): ``s^4 = A / B`` with
  ``A``, ``B`` the writers' and readers' squared gradient entries; for GL
  ``M = Q'^{-1} # P'``. This is the closed-form *minimum* of the gradient norm
  on the orbit (its maximum does not exist: it is unbounded).
* Bounded variants: ``power`` (move a fraction of the way, ``s^power``) and
  ``max_log_scale`` (clip ``|log s|``, a trust region on the element).
* :class:`LineSearch`: one gradient of the objective on the algebra at the
  start point, then only objective *values* along that direction (growing the
  step while it improves, halving it when not).

Balancing acts on the :class:`~teleport_jax.groups.Scaling` and
:class:`~teleport_jax.groups.GL` parts of a symmetry (the MLP groups,
:class:`~teleport_jax.symmetries.Product`, discovered symmetries); other parts stay at the
identity. Each back-end reports its work in ``stats["cost_grad_evals"]``
(gradient-evaluation equivalents of its own proposals; the driver's checks
come on top).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Literal
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from teleport_jax._src.core import paths as paths_lib
from teleport_jax._src.objectives import objectives as obj_lib
from teleport_jax._src.solver import backends
from teleport_jax._src.symmetries import groups as groups_lib
from teleport_jax._src.symmetries import sites as sites_lib


def _parts(symmetry, params) -> list:
  """The per-site parts of ``symmetry`` (``None`` for parts balancing cannot move)."""
  if hasattr(symmetry, "as_product"):
    prod = symmetry.as_product(params)
  elif isinstance(symmetry, sites_lib.Product):
    prod = symmetry
  elif isinstance(symmetry, sites_lib.SiteSymmetry):
    return [symmetry]
  else:
    raise ValueError(
      f"symmetry: balancing needs rescaling or GL sites (PositiveRescaling, LinearGL, a Product "
      f"of SiteSymmetry, a discovered symmetry), got {type(symmetry).__name__}."
    )
  return list(prod.parts)


def _channels(x, slot: sites_lib.Slot, site: sites_lib.Site) -> chex.Array:
  """``x`` as ``(rows, H, d)`` with the element's heads (query heads of a KV group merged)."""
  x = jnp.asarray(x)
  if slot.reshape is not None:  # e.g. a dense kernel reading a flattened feature map
    x = x.reshape(slot.view_shape(x.shape))
  y = sites_lib._to_channels_last(x, slot)  # (..., H_leaf, d)
  h_leaf, d = y.shape[-2], y.shape[-1]
  y = y.reshape((-1, h_leaf, d))
  if slot.head_group > 1:  # rows of the heads that share one element
    h = h_leaf // slot.head_group
    y = y.reshape((y.shape[0], h, slot.head_group, d))
    y = jnp.moveaxis(y, 2, 1).reshape((-1, h, d))
  del site
  return y


class BalanceState(NamedTuple):
  sweeps: chex.Array


@dataclasses.dataclass(frozen=True)
class Balance(backends.Solver):
  """Closed-form balancing of rescaling and GL sites (see the module docstring).

  Each inner step is one balancing sweep over all sites at once (a kernel that
  is a writer of one site and a reader of the next couples them, so a second
  sweep balances a little further); one step is usually enough. The driver
  keeps a sweep only if it lowers the target and keeps the loss within
  ``rtol``. The teleport's ``objective`` is not used: the target is the
  objective.

  Attributes:
    target: ``"norm"`` (squared weight norms) or ``"grad"`` (squared gradient norm).
    power: fraction of the way to the balanced point, in ``(0, 1]``.
    max_log_scale: bound on ``|log s|`` per channel, and on the logarithms of
      a GL pair's (symmetric positive definite) element's eigenvalues
      (``None``: unbounded).
    eps: relative regulariser of the per-channel sums and the GL Gram matrices.
  """

  target: Literal["norm", "grad"] = "norm"
  power: float = 1.0
  max_log_scale: float | None = None
  eps: float = 1e-6

  needs_symmetry = True
  tracks_element = True

  def __post_init__(self):
    if self.target not in ("norm", "grad"):
      raise ValueError(f"target must be 'norm' or 'grad', got {self.target!r}.")
    p = obj_lib.check_positive(self.power, "power")
    if obj_lib.is_concrete(p) and p > 1:
      raise ValueError(f"power must be in (0, 1], got {self.power!r}.")
    if self.max_log_scale is not None:
      obj_lib.check_positive(self.max_log_scale, "max_log_scale")

  # ---------------------------------------------------------------- target
  def _touched(self, problem, params):
    paths = []
    for part in _parts(problem.symmetry, params):
      if isinstance(part, sites_lib.SiteSymmetry):
        paths.extend(s.path for s in part.site.slots)
    return sorted(set(paths))

  def evaluate(self, problem, w, g):
    del g
    if self.target == "norm":
      index = paths_lib.LeafIndex(w)
      value = sum(jnp.sum(jnp.square(index.get(p))) for p in self._touched(problem, w))
      loss = problem.loss(w)
      return -value, value, loss, jnp.zeros((), problem.dtype)
    loss, grads = jax.value_and_grad(problem.loss)(w)
    value = optax.tree.vdot(grads, grads)
    return -value, value, loss, grads

  def init(self, problem, params):
    aux = jnp.zeros((), problem.dtype)
    if self.target == "grad":
      aux = jax.tree_util.tree_map(jnp.zeros_like, params)
    return BalanceState(jnp.zeros((), jnp.int32)), aux

  def element(self, symmetry, params, grads=None):
    """The balancing element at ``params`` (in ``symmetry``'s element format)."""
    source = paths_lib.LeafIndex(params if self.target == "norm" else grads)
    out = []
    for part in _parts(symmetry, params):
      if not isinstance(part, sites_lib.SiteSymmetry):
        out.append(part.identity(params))
        continue
      writers = [s for s in part.site.slots if s.role == "out"]
      readers = [s for s in part.site.slots if s.role == "in"]
      group = part.group
      if not writers or not readers or not isinstance(group, (groups_lib.Scaling, groups_lib.GL)):
        out.append(part.identity(params))
        continue
      if isinstance(group, groups_lib.Orthogonal | groups_lib.RotaryGL):
        out.append(part.identity(params))
        continue
      out.append(self._site_element(part, source, writers, readers))
    return tuple(out)

  def _site_element(self, part, source, writers, readers):
    site, group = part.site, part.group
    ws = [_channels(source.get(s.path), s, site) for s in writers]
    rs = [_channels(source.get(s.path), s, site) for s in readers]
    heads = site.heads is not None
    if isinstance(group, groups_lib.Scaling):
      a = sum(jnp.sum(jnp.square(y), axis=0) for y in ws)  # (H, d)
      b = sum(jnp.sum(jnp.square(y), axis=0) for y in rs)
      tiny = self.eps * (jnp.mean(a) + jnp.mean(b)) + jnp.finfo(a.dtype).tiny
      a, b = a + tiny, b + tiny
      # norm: minimise a s^2 + b / s^2; grad (cotangents move inversely): a / s^2 + b s^2
      log_s = 0.25 * (jnp.log(b) - jnp.log(a))
      if self.target == "grad":
        log_s = -log_s
      log_s = self.power * log_s
      if self.max_log_scale is not None:
        log_s = jnp.clip(log_s, -self.max_log_scale, self.max_log_scale)
      s = jnp.exp(log_s)
      return s if heads else s[0]
    # GL: Gram matrices per head
    p = sum(jnp.einsum("rhi,rhj->hij", y, y) for y in ws)
    q = sum(jnp.einsum("rhi,rhj->hij", y, y) for y in rs)
    if self.target == "norm":  # min tr(P M) + tr(Q M^-1): M = P^-1 # Q
      m = _geometric_mean_inv(p, q, self.eps)
    else:  # min tr(P M^-1) + tr(Q M): M = Q^-1 # P
      m = _geometric_mean_inv(q, p, self.eps)
    a = _spd_power(m, 0.5 * self.power, self.eps, self.max_log_scale)
    return a if heads else a[0]

  def propose(self, problem, w, state, aux):
    grads = aux if self.target == "grad" else None
    g = self.element(problem.symmetry, w, grads)
    return problem.symmetry.act(w, g, problem.data), g

  def update(self, state, accepted, improvement, aux):
    del accepted, improvement, aux
    return BalanceState(state.sweeps + 1)

  def stats(self, state):
    per = 0.0 if self.target == "norm" else 1.0
    return {"cost_grad_evals": per * state.sweeps.astype(jnp.float32)}

  def stats_template(self, dtype):
    return {"cost_grad_evals": jnp.zeros((), dtype)}

  def cost_per_step(self) -> float:
    return 0.34 if self.target == "norm" else 1.0


def _sym_eig(m, eps):
  m = 0.5 * (m + jnp.swapaxes(m, -1, -2))
  d = m.shape[-1]
  scale = jnp.trace(m, axis1=-2, axis2=-1)[..., None, None] / d
  m = m + (eps * scale + jnp.finfo(m.dtype).tiny) * jnp.eye(d, dtype=m.dtype)
  # one LAPACK call per matrix on a CPU (see groups._batched)
  return groups_lib._batched(jnp.linalg.eigh, m)


def _spd_power(m, power, eps, max_log=None):
  """``m ** power`` of SPD ``m``; with ``max_log``, eigenvalues clipped to ``exp(+-max_log)``."""
  evals, evecs = _sym_eig(m, eps)
  log_e = power * jnp.log(jnp.maximum(evals, jnp.finfo(m.dtype).tiny))
  if max_log is not None:
    log_e = jnp.clip(log_e, -max_log, max_log)
  return (evecs * jnp.exp(log_e)[..., None, :]) @ jnp.swapaxes(evecs, -1, -2)


def _geometric_mean_inv(p, q, eps):
  """``P^{-1} # Q = P^{-1/2} (P^{1/2} Q P^{1/2})^{1/2} P^{-1/2}`` (batched, SPD)."""
  evals, evecs = _sym_eig(p, eps)
  evals = jnp.maximum(evals, jnp.finfo(p.dtype).tiny)
  half = (evecs * jnp.sqrt(evals)[..., None, :]) @ jnp.swapaxes(evecs, -1, -2)
  ihalf = (evecs / jnp.sqrt(evals)[..., None, :]) @ jnp.swapaxes(evecs, -1, -2)
  middle = _spd_power(half @ q @ half, 0.5, eps)
  return ihalf @ middle @ ihalf


class LineSearchState(NamedTuple):
  eta: chex.Array
  direction: Any
  evals: chex.Array


@dataclasses.dataclass(frozen=True)
class LineSearch(backends.Solver):
  """One gradient on the algebra, then objective values along that direction.

  At the start point it differentiates the objective on the Lie algebra once
  (like :class:`~teleport_jax.solvers.Lie`), normalises the direction and then
  only evaluates the objective: after a kept step the next one is ``grow``
  times longer, after a refused one ``shrink`` times shorter, always along the
  first direction from the latest kept point. Each inner step costs one
  objective value instead of a value and a gradient.

  Attributes:
    step_size: first step (norm on the algebra).
    grow: factor after a kept step.
    shrink: factor after a refused step.
    max_step_size: cap on a step.
  """

  step_size: Any = 0.1
  grow: float = 2.0
  shrink: float = 0.5
  max_step_size: Any = 1.0

  needs_symmetry = True
  tracks_element = True

  def __post_init__(self):
    backends.check_step_fields(self)

  def init(self, problem, params):
    sym = problem.symmetry

    def j(xi):
      return problem.signed(sym.act_linearized(params, xi, problem.data))[0]

    grad = jax.grad(j)(sym.algebra_zeros(params))
    norm = optax.tree.norm(grad)
    direction = optax.tree.scale(1.0 / jnp.maximum(norm, jnp.finfo(problem.dtype).tiny), grad)
    state = LineSearchState(
      jnp.asarray(self.step_size, problem.dtype), direction, jnp.zeros((), jnp.int32)
    )
    return state, jnp.zeros((), problem.dtype)

  def evaluate(self, problem, w, g):
    jv, (value, loss) = problem.signed(w, g)
    return jv, value, loss, jnp.zeros((), problem.dtype)

  def propose(self, problem, w, state, aux):
    del aux
    step = problem.symmetry.retract(optax.tree.scale(state.eta, state.direction))
    return problem.symmetry.act(w, step, problem.data), step

  def update(self, state, accepted, improvement, aux):
    del improvement, aux
    return state._replace(
      eta=backends.adapted_step(state.eta, accepted, self), evals=state.evals + 1
    )

  def stats(self, state):
    # one objective gradient (about 3 values) + one value per step
    return {
      "final_step_size": state.eta,
      "cost_objective_values": 3.0 + state.evals.astype(state.eta.dtype),
    }

  def stats_template(self, dtype):
    return {"final_step_size": jnp.zeros((), dtype), "cost_objective_values": jnp.zeros((), dtype)}

  def cost_per_step(self) -> float:
    return 0.34


backends.SOLVERS.update({"balance": Balance, "normbalance": Balance, "linesearch": LineSearch})
backends.SOLVERS["gradbalance"] = lambda: Balance(target="grad")

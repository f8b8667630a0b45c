"""Teleport policies: flax nnx modules mapping algebra features to a group element.

Two kinds, one interface (``policy(inputs, carry) -> Proposal``):

* :class:`EquivariantPolicy` (default): reads the algebra features of
  :mod:`~teleport_jax._src.learned.features` and proposes, per algebra leaf, an
  element of the same shape. Its weights are shared across units (neurons,
  channels, heads): a vector leaf ``(..., d)`` is mapped unit by unit from the
  unit's features and their mean over the leaf; a matrix leaf ``(..., d, d)``
  entry by entry from ``M_ij, M_ji, M_ii, M_jj``, the row and column means and
  the leaf's mean. So it is permutation-equivariant and width-agnostic: a policy
  trained at one width runs at any other, on any symmetry of the library.
* :class:`LSTMPolicy`: the configuration of Zhao et al. (ICLR 2024,
  learn-to-teleport): two stacked LSTM cells read the flattened loss gradient and
  a linear layer writes every algebra entry, normalised to a fixed magnitude.
  Its sizes are those of one model (it is not width-agnostic).

Either may also propose a step size (``PolicyConfig.lr_range``), in the range
given, log-uniformly parameterised.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax import flatten_util

from teleport_jax._src.learned import features as feat_lib

K = len(feat_lib.FEATURES)


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
  """What a policy is; stored beside its weights.

  Attributes:
    kind: ``"equivariant"`` (:class:`EquivariantPolicy`) or ``"lstm"``
      (:class:`LSTMPolicy`).
    hidden: width of the hidden layers (the LSTM's cells).
    max_rms: the largest root mean square of a proposed algebra leaf (the
      equivariant policy scales its direction by ``max_rms * sigmoid(.)``; the
      LSTM's is always exactly ``max_rms``, as the published normalisation).
    lr_range: ``(low, high)``: the policy also proposes the optimizer's step
      size in this range; ``None``: it proposes none.
    seed: initialisation seed.
  """

  kind: str = "equivariant"
  hidden: int = 32
  max_rms: float = 1e-3
  lr_range: tuple[float, float] | None = None
  seed: int = 0

  def __post_init__(self):
    if self.kind not in ("equivariant", "lstm"):
      raise ValueError(f"PolicyConfig.kind must be 'equivariant' or 'lstm', got {self.kind!r}.")
    if self.hidden < 1:
      raise ValueError(f"PolicyConfig.hidden must be positive, got {self.hidden}.")
    if not self.max_rms > 0:
      raise ValueError(f"PolicyConfig.max_rms must be positive, got {self.max_rms}.")
    if self.lr_range is not None:
      lo, hi = self.lr_range
      if not 0 < lo < hi:
        raise ValueError(
          f"PolicyConfig.lr_range must be (low, high), 0 < low < high; got {self.lr_range}."
        )


class PolicyInputs(NamedTuple):
  """What a policy reads at one step: the algebra features and the raw gradient."""

  features: feat_lib.Features
  grads: chex.ArrayTree


class Proposal(NamedTuple):
  """A policy's output.

  Attributes:
    xi: the algebra element, a tuple like ``symmetry.algebra_zeros(params)``'s leaves.
    lr: the proposed step size (a scalar), or ``None``.
    carry: the policy's recurrent state for the next step (``()`` if none).
  """

  xi: tuple
  lr: chex.Array | None
  carry: Any


def _lr(z: chex.Array, lr_range) -> chex.Array:
  lo, hi = (jnp.log(jnp.asarray(v, jnp.float32)) for v in lr_range)
  return jnp.exp(lo + jax.nn.sigmoid(z) * (hi - lo))


def _with_rms(direction: chex.Array, rms: chex.Array) -> chex.Array:
  norm = jnp.sqrt(jnp.mean(jnp.square(direction)) + 1e-30)
  return direction * (rms / norm)


def _entry_inputs(f: chex.Array, scales: chex.Array) -> chex.Array:
  """``(..., d, d, 8K)`` per-entry inputs of a matrix leaf's features ``(K, ..., d, d)``."""
  f = jnp.moveaxis(f, 0, -1)  # (..., d, d, K)
  diag = jnp.diagonal(f, axis1=-3, axis2=-2)  # (..., K, d)
  diag = jnp.moveaxis(diag, -1, -2)  # (..., d, K)
  d = f.shape[-2]
  rows = jnp.broadcast_to(jnp.mean(f, axis=-2, keepdims=True), f.shape)
  cols = jnp.broadcast_to(jnp.mean(f, axis=-3, keepdims=True), f.shape)
  mean = jnp.broadcast_to(jnp.mean(f, axis=(-3, -2), keepdims=True), f.shape)
  parts = [
    f,
    jnp.swapaxes(f, -3, -2),
    jnp.broadcast_to(diag[..., :, None, :], f.shape),
    jnp.broadcast_to(diag[..., None, :, :], f.shape),
    rows,
    cols,
    mean,
    jnp.broadcast_to(scales, f.shape[:-3] + (d, d, scales.shape[-1])),
  ]
  return jnp.concatenate(parts, axis=-1)


def _unit_inputs(f: chex.Array, scales: chex.Array) -> chex.Array:
  """``(..., d, 3K)`` per-unit inputs of a vector leaf's features ``(K, ..., d)``."""
  f = jnp.moveaxis(f, 0, -1)  # (..., d, K)
  mean = jnp.broadcast_to(jnp.mean(f, axis=-2, keepdims=True), f.shape)
  return jnp.concatenate([f, mean, jnp.broadcast_to(scales, f.shape)], axis=-1)


def _is_matrix(shape) -> bool:
  return len(shape) >= 2 and shape[-1] == shape[-2]


class _Trunk(nnx.Module):
  def __init__(self, n_in: int, hidden: int, rngs: nnx.Rngs):
    self.a = nnx.Linear(n_in, hidden, rngs=rngs)
    self.b = nnx.Linear(hidden, hidden, rngs=rngs)
    self.direction = nnx.Linear(hidden, 1, rngs=rngs)
    self.magnitude = nnx.Linear(hidden, 1, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.b(jnp.tanh(self.a(x))))
    return self.direction(h)[..., 0], h


class EquivariantPolicy(nnx.Module):
  """Width-agnostic, permutation-equivariant policy over any symmetry's algebra."""

  def __init__(self, config: PolicyConfig):
    rngs = nnx.Rngs(config.seed)
    self.config = config
    self.units = _Trunk(3 * K, config.hidden, rngs)
    self.entries = _Trunk(8 * K, config.hidden, rngs)
    self.lr_head = nnx.Linear(config.hidden, 1, rngs=rngs) if config.lr_range else None

  def initial_carry(self):
    return ()

  def __call__(self, inputs: PolicyInputs, carry=()) -> Proposal:
    cfg = self.config
    xis, pooled = [], []
    for f, s in zip(inputs.features.leaves, inputs.features.log_scales):
      shape = f.shape[1:]
      s = jnp.tanh(s / 10.0)  # log-scales, squashed to a bounded input
      if _is_matrix(shape):
        direction, h = self.entries(_entry_inputs(f, s))
        trunk = self.entries
        h = jnp.mean(h, axis=(-3, -2))
      else:
        g = f.reshape((K,) + (shape if shape else (1,)))
        direction, h = self.units(_unit_inputs(g, s))
        direction = direction.reshape(shape)
        trunk = self.units
        h = jnp.mean(h, axis=-2)
      h = jnp.mean(h.reshape(-1, cfg.hidden), axis=0)
      rms = cfg.max_rms * jax.nn.sigmoid(trunk.magnitude(h)[0])
      xis.append(_with_rms(direction, rms).astype(f.dtype))
      pooled.append(h)
    lr = None
    if self.lr_head is not None:
      lr = _lr(self.lr_head(jnp.mean(jnp.stack(pooled), axis=0))[0], cfg.lr_range)
    return Proposal(tuple(xis), lr, carry)


class LSTMPolicy(nnx.Module):
  """Two LSTM cells on the flattened gradient, a linear map to every algebra entry."""

  def __init__(self, config: PolicyConfig, shapes: tuple, n_in: int):
    rngs = nnx.Rngs(config.seed)
    self.config = config
    self.shapes = tuple(tuple(int(k) for k in s) for s in shapes)
    self.n_in = int(n_in)
    n_out = sum(math.prod(s) for s in self.shapes)
    self.cell1 = nnx.LSTMCell(n_in, config.hidden, rngs=rngs)
    self.cell2 = nnx.LSTMCell(config.hidden, config.hidden, rngs=rngs)
    self.out = nnx.Linear(config.hidden, n_out, rngs=rngs)
    self.lr_head = nnx.Linear(config.hidden, 1, rngs=rngs) if config.lr_range else None

  def initial_carry(self):
    z = jnp.zeros((self.config.hidden,), jnp.float32)
    return ((z, z), (z, z))

  def __call__(self, inputs: PolicyInputs, carry) -> Proposal:
    x = flatten_util.ravel_pytree(inputs.grads)[0].astype(jnp.float32)
    c1, h = self.cell1(carry[0], x)
    c2, h = self.cell2(carry[1], h)
    flat = self.out(h)
    xis, start = [], 0
    for shape, f in zip(self.shapes, inputs.features.leaves):
      n = math.prod(shape)
      xis.append(
        _with_rms(flat[start : start + n].reshape(shape), self.config.max_rms).astype(f.dtype)
      )
      start += n
    lr = None if self.lr_head is None else _lr(self.lr_head(h)[0], self.config.lr_range)
    return Proposal(tuple(xis), lr, (c1, c2))


def make_policy(
  config: PolicyConfig,
  symmetry=None,
  params: chex.ArrayTree = None,
) -> nnx.Module:
  """The policy ``config`` describes.

  Args:
    config: the policy's :class:`PolicyConfig`.
    symmetry, params: the group and a model's parameters; an ``"lstm"`` policy
      is sized for them (its input is the flattened gradient, its output every
      algebra entry). The equivariant policy needs neither.
  """
  if config.kind == "equivariant":
    return EquivariantPolicy(config)
  if symmetry is None or params is None:
    raise ValueError("an 'lstm' policy is sized for one model: pass symmetry and params.")
  shapes = tuple(jnp.shape(a) for a in jax.tree.leaves(symmetry.algebra_zeros(params)))
  return LSTMPolicy(config, shapes, flatten_util.ravel_pytree(params)[0].size)

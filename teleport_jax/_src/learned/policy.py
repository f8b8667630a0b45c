"""Teleport policies: flax nnx modules mapping algebra features to a group element.

Two kinds, one interface (``policy(inputs, carry) -> Proposal``):

* :class:`EquivariantPolicy` (default): reads the algebra features of
  :mod:`~teleport_jax._src.learned.features` and proposes, per algebra leaf, an
  element of the same shape. Its weights are shared across units (neurons,
  channels, heads): a vector leaf ``(..., d)`` is mapped unit by unit, by a small
  MLP, from the unit's features and their mean over the leaf; a matrix leaf
  ``(..., d, d)`` is ``sum_k a_k F_k + b_k F_k^T + c I`` of its feature matrices,
  with coefficients from an MLP of the leaf's permutation-invariant statistics
  (``O(K d^2)``, a few times cheaper than the model's own step). So it is
  permutation-equivariant and width-agnostic: a policy trained at one width
  runs at any other, on any symmetry of the library.
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
_LOG_SCALE = 20.0  # log-scales and the log loss are divided by this: inputs of order one


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
    lr_init: the step size a new policy proposes (inside ``lr_range``); ``None``:
      the range's geometric middle.
    move_init: the root mean square a new equivariant policy proposes, as a
      fraction of ``max_rms`` in ``(0, 1)`` (its magnitude heads start with zero
      weights). A small value starts meta-training from (nearly) the step size
      alone, so that moves grow only where they pay.
    seed: initialisation seed.
  """

  kind: str = "equivariant"
  hidden: int = 32
  max_rms: float = 1e-3
  lr_range: tuple[float, float] | None = None
  lr_init: float | None = None
  move_init: float = 0.5
  seed: int = 0

  def __post_init__(self):
    if self.kind not in ("equivariant", "lstm"):
      raise ValueError(f"PolicyConfig.kind must be 'equivariant' or 'lstm', got {self.kind!r}.")
    if self.hidden < 1:
      raise ValueError(f"PolicyConfig.hidden must be positive, got {self.hidden}.")
    if not self.max_rms > 0:
      raise ValueError(f"PolicyConfig.max_rms must be positive, got {self.max_rms}.")
    if not 0 < self.move_init < 1:
      raise ValueError(f"PolicyConfig.move_init must lie in (0, 1), got {self.move_init}.")
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


def _lr_bias(config: PolicyConfig) -> float:
  """The logit at which :func:`_lr` gives ``config.lr_init``."""
  if config.lr_init is None:
    return 0.0
  lo, hi = (math.log(v) for v in config.lr_range)
  return _logit((math.log(config.lr_init) - lo) / (hi - lo))


def _logit(u: float) -> float:
  return math.log(u / (1 - u))


def _magnitude_head(config: PolicyConfig, hidden: int, rngs: nnx.Rngs) -> nnx.Linear:
  """The move's magnitude logit (zero weights: a new policy proposes ``move_init * max_rms``)."""
  bias = nnx.initializers.constant(_logit(config.move_init))
  return nnx.Linear(hidden, 1, kernel_init=nnx.initializers.zeros, bias_init=bias, rngs=rngs)


def _lr_head(config: PolicyConfig, n_in: int, rngs: nnx.Rngs) -> nnx.Linear | None:
  """The step-size head (zero weights: a new policy proposes ``lr_init``), or ``None``."""
  if config.lr_range is None:
    return None
  bias = nnx.initializers.constant(_lr_bias(config))
  return nnx.Linear(n_in, 1, kernel_init=nnx.initializers.zeros, bias_init=bias, rngs=rngs)


def _lr(z: chex.Array, lr_range) -> chex.Array:
  lo, hi = (jnp.log(jnp.asarray(v, jnp.float32)) for v in lr_range)
  return jnp.exp(lo + jax.nn.sigmoid(z) * (hi - lo))


def _with_rms(direction: chex.Array, rms: chex.Array) -> chex.Array:
  norm = jnp.sqrt(jnp.mean(jnp.square(direction)) + 1e-30)
  return direction * (rms / norm)


def _matrix_context(f: chex.Array, scales: chex.Array) -> chex.Array:
  """``(5K,)`` permutation-invariant statistics of a matrix leaf's features ``(K, ..., d, d)``."""
  axes = tuple(range(1, f.ndim))
  diag = jnp.diagonal(f, axis1=-2, axis2=-1)
  skew = f - jnp.swapaxes(f, -1, -2)
  return jnp.concatenate(
    [
      scales,
      jnp.mean(f, axis=axes),
      jnp.mean(diag, axis=tuple(range(1, diag.ndim))),
      feat_lib.safe_sqrt(jnp.mean(jnp.square(diag), axis=tuple(range(1, diag.ndim)))),
      feat_lib.safe_sqrt(0.5 * jnp.mean(jnp.square(skew), axis=axes)),
    ]
  )


def _unit_inputs(f: chex.Array, scales: chex.Array) -> chex.Array:
  """``(..., d, 3K)`` per-unit inputs of a vector leaf's features ``(K, ..., d)``."""
  f = jnp.moveaxis(f, 0, -1)  # (..., d, K)
  mean = jnp.broadcast_to(jnp.mean(f, axis=-2, keepdims=True), f.shape)
  return jnp.concatenate([f, mean, jnp.broadcast_to(scales, f.shape)], axis=-1)


def _is_matrix(shape) -> bool:
  return len(shape) >= 2 and shape[-1] == shape[-2]


class _Trunk(nnx.Module):
  def __init__(self, n_in: int, config: PolicyConfig, rngs: nnx.Rngs):
    hidden = config.hidden
    self.a = nnx.Linear(n_in, hidden, rngs=rngs)
    self.b = nnx.Linear(hidden, hidden, rngs=rngs)
    self.direction = nnx.Linear(hidden, 1, rngs=rngs)
    self.magnitude = _magnitude_head(config, hidden, rngs)

  def __call__(self, x):
    h = jnp.tanh(self.b(jnp.tanh(self.a(x))))
    return self.direction(h)[..., 0], h


class _MatrixHead(nnx.Module):
  """Coefficients of ``A = sum_k a_k F_k + b_k F_k^T + c I`` from a matrix leaf's statistics."""

  def __init__(self, config: PolicyConfig, rngs: nnx.Rngs):
    hidden = config.hidden
    self.a = nnx.Linear(5 * K, hidden, rngs=rngs)
    self.b = nnx.Linear(hidden, hidden, rngs=rngs)
    self.coefficients = nnx.Linear(hidden, 2 * K + 1, rngs=rngs)
    self.magnitude = _magnitude_head(config, hidden, rngs)

  def __call__(self, f, scales):
    h = jnp.tanh(self.b(jnp.tanh(self.a(_matrix_context(f, scales)))))
    c = self.coefficients(h)
    eye = jnp.eye(f.shape[-1], dtype=f.dtype)
    direction = (
      jnp.tensordot(c[:K], f, axes=1)
      + jnp.tensordot(c[K : 2 * K], jnp.swapaxes(f, -1, -2), axes=1)
      + c[2 * K] * jnp.broadcast_to(eye, f.shape[1:])
    )
    return direction, h


class EquivariantPolicy(nnx.Module):
  """Width-agnostic, permutation-equivariant policy over any symmetry's algebra."""

  def __init__(self, config: PolicyConfig):
    rngs = nnx.Rngs(config.seed)
    self.config = config
    self.units = _Trunk(3 * K, config, rngs)
    self.entries = _MatrixHead(config, rngs)
    # zero weights: a new policy proposes lr_init at every step
    self.lr_head = _lr_head(config, config.hidden + 2, rngs)

  def initial_carry(self):
    return ()

  def __call__(self, inputs: PolicyInputs, carry=()) -> Proposal:
    cfg = self.config
    xis, pooled = [], []
    for f, s in zip(inputs.features.leaves, inputs.features.log_scales):
      shape = f.shape[1:]
      s = s / _LOG_SCALE  # log-scales, to order one
      if _is_matrix(shape):
        direction, h = self.entries(f, s)
        trunk = self.entries
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
      # the step size also reads the scales of the loss and of the gradient (the
      # features are scale-free): log L - log |g|^2 is the log of Polyak's step
      log_loss = jnp.log(jnp.maximum(jnp.abs(inputs.features.loss), 1e-30))
      sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(inputs.grads))
      log_sq = jnp.log(jnp.maximum(sq, 1e-30))
      z = jnp.concatenate(
        [jnp.mean(jnp.stack(pooled), axis=0), jnp.stack([log_loss, log_sq]) / _LOG_SCALE]
      )
      lr = _lr(self.lr_head(z.astype(jnp.float32))[0], cfg.lr_range)
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
    self.lr_head = _lr_head(config, config.hidden, rngs)

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

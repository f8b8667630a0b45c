r"""What a teleport policy reads: features in the Lie algebra, one stack per algebra leaf.

A policy proposes an algebra element ``xi`` (the search space of every
symmetry here), so it reads features of the same shapes: for each algebra leaf
(a ``(..., d)`` vector of log-scales, a ``(..., d, d)`` matrix for GL and
rotations) a stack of ``K`` same-shaped arrays. Each is the gradient in the
algebra, at ``xi = 0``, of a quantity of the parameters ``w`` and the loss
gradient ``c = dL/dw``; with ``T_w(xi) = d/dt act(w, retract(t xi))`` the
orbit's tangent map:

* ``weights``: :math:`\nabla_\xi \langle w, T_w(\xi)\rangle` -- the moment map
  of the weights, the direction norm balancing follows (for a neuron rescaling,
  ``|incoming|^2 - |outgoing|^2``);
* ``grad_norm``: :math:`-\nabla_\xi \langle c, D_w T_w(\xi)[c]\rangle`, the
  exact algebra gradient of :math:`\tfrac12\|\nabla L(g\cdot w)\|^2` (the
  published teleport objective). Invariance, :math:`L(g\cdot w) = L(w)` for every
  ``w``, makes :math:`\nabla L(g\cdot w) = D\phi_g(w)^{-\top} c`, whose derivative
  needs only the action, not the model: no Hessian-vector product;
* ``cross``: :math:`\nabla_\xi \langle w, D_w T_w(\xi)[c]\rangle`, how the
  weights' moment map moves along the gradient.

All three cost one linearisation of the action (``O(parameters)``), whatever
the model. Each leaf's features are divided by their root mean square over the
leaf (a policy then sees directions, at any scale of training), and the
``log`` of that root mean square is returned beside them. A feature whose root
mean square is below ``100 eps`` (of the parameters' dtype) times its natural
scale (the mean square of the weights, of the gradient, or their geometric
mean) is set to zero: for a linear action (rescalings, GL on linear layers)
``cross`` vanishes identically, and its rounding noise, normalised, would read
as a signal. The log-scales stop at ``SCALE_FLOOR`` times the natural scale, so
that a vanished feature reads the same in float32 and float64.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from teleport_jax._src.symmetries import symmetry as sym_lib

FEATURES = ("weights", "grad_norm", "cross")
SCALE_FLOOR = 1e-4  # relative to a feature's natural scale, the smallest log-scale reported


class Features(NamedTuple):
  """Policy inputs for one step.

  Attributes:
    leaves: per algebra leaf, an array ``(K, *leaf.shape)``: the features of
      :data:`FEATURES`, each divided by its root mean square over the leaf.
    log_scales: per algebra leaf, ``(K,)``: the log of those root mean squares.
    loss: the loss at the parameters (a scalar).
  """

  leaves: tuple
  log_scales: tuple
  loss: chex.Array


def safe_sqrt(x: chex.Array) -> chex.Array:
  """``sqrt`` with a finite derivative at zero, where a vanished feature sits (sqrt's is
  infinite there, and would make a meta-gradient through it non-finite)."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _rms(x: chex.Array) -> chex.Array:
  return safe_sqrt(jnp.mean(jnp.square(x)))


def algebra_features(
  symmetry: sym_lib.Symmetry,
  params: chex.ArrayTree,
  grads: chex.ArrayTree,
  loss: chex.Array,
  data: Any = None,
  eps: float = 1e-30,
) -> Features:
  """The features of :data:`FEATURES` at ``params`` with loss gradient ``grads``.

  Args:
    symmetry: the group (bound to the model, as the teleport binds it).
    params: the parameters ``w``.
    grads: the loss gradient at ``params``, a pytree like ``params``.
    loss: the loss at ``params``.
    data: the batch, for data-dependent groups.
    eps: absolute floor of the root mean square a feature is divided by.

  Returns:
    :class:`Features`, one entry per leaf of ``symmetry.algebra_zeros(params)``.
  """
  xi0 = symmetry.algebra_zeros(params)
  grads = jax.tree.map(lambda g, p: jnp.asarray(g, jnp.asarray(p).dtype), grads, params)

  def act(xi, w):
    return symmetry.act_linearized(w, xi, data)

  def both(xi):
    moved = act(xi, params)
    # D_w act(w, xi)[c]: the tangent map's derivative along the gradient
    along = jax.jvp(lambda w: act(xi, w), (params,), (grads,))[1]
    return moved, along

  _, pullback = jax.vjp(both, xi0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  (weights,) = pullback((params, zeros))
  (grad_norm,) = pullback((zeros, grads))
  (cross,) = pullback((zeros, params))
  grad_norm = jax.tree.map(jnp.negative, grad_norm)
  # a feature that vanishes identically (``cross`` of a linear action: by invariance the
  # gradient is orthogonal to the orbit) is rounding noise; divided by its root mean
  # square it would read as a unit-size signal. Below ``floor`` times its natural
  # scale it reads as zero.
  dtype = jnp.result_type(*jax.tree.leaves(params))
  floor = 100 * jnp.finfo(dtype).eps
  ww = optax.tree.norm(params, squared=True) / max(1, optax.tree.size(params))
  cc = optax.tree.norm(grads, squared=True) / max(1, optax.tree.size(grads))
  natural = (ww, cc, jnp.sqrt(ww * cc))
  stacks, scales = [], []
  for leaf in zip(*(jax.tree.leaves(t) for t in (weights, grad_norm, cross))):
    rms = jnp.stack([_rms(f) for f in leaf])
    nat = jnp.stack(natural).astype(rms.dtype)
    signal = rms > jnp.maximum(floor * nat, eps)
    unit = jnp.where(signal, 1.0 / jnp.where(signal, rms, 1.0), 0.0)
    stacks.append(jnp.stack(leaf) * unit.reshape((-1,) + (1,) * leaf[0].ndim))
    # the scale a policy reads stops at 1e-4 of the natural one, whatever the dtype
    scales.append(jnp.log(jnp.maximum(rms, jnp.maximum(SCALE_FLOOR * nat, eps))))
  return Features(tuple(stacks), tuple(scales), jnp.asarray(loss))

"""Derivative products by differences of gradients, in first-order programs.

A Hessian-vector product ``H v`` costs one gradient as a forward difference
``(grad(w + h v) - grad(w)) / h`` when ``grad(w)`` is known, where
forward-over-reverse differentiation costs two to three and doubles the program
XLA compiles. The one-step teleport (:class:`~teleport_jax.solvers.OneStep`)
and :class:`~teleport_jax.objectives.Stability` with ``differences=True`` use
these products: they only steer a search or estimate a bound, and every
decision about the parameters is taken on exact loss values.

May import: ``core``.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import optax


def difference_step(params: chex.ArrayTree, v: chex.ArrayTree) -> chex.Array:
  """The step ``h`` of a forward difference along ``v`` at ``params``.

  ``h = sqrt(eps) (1 + |params|) / |v|``: the truncation and rounding errors
  of a forward difference balance near ``sqrt(eps)`` relative to the scale of
  the point (``eps`` of ``params``' dtype).

  Args:
    params: the point (a pytree of floating arrays).
    v: the direction (a pytree like ``params``).

  Returns:
    A positive scalar in the dtype of ``params``' leaves (``0`` for ``v = 0``).
  """
  dtype = jnp.result_type(*jax.tree.leaves(params))
  eps = jnp.finfo(dtype).eps
  vn = optax.tree.norm(v)
  h = jnp.sqrt(eps) * (1.0 + optax.tree.norm(params)) / jnp.maximum(vn, jnp.finfo(dtype).tiny)
  return jnp.where(vn > 0, h, 0.0).astype(dtype)


def directional_difference(
  fn: Callable[[chex.ArrayTree], chex.ArrayTree],
  params: chex.ArrayTree,
  f0: chex.ArrayTree,
  v: chex.ArrayTree,
) -> chex.ArrayTree:
  """``(fn(params + h v) - f0) / h``: the derivative of ``fn`` along ``v``, to first order.

  Args:
    fn: a function of a pytree like ``params`` (for a Hessian-vector product,
      the loss gradient).
    params: the point.
    f0: ``fn(params)``, already computed.
    v: the direction.

  Returns:
    A pytree like ``f0``; zeros for ``v = 0``.
  """
  h = difference_step(params, v)
  moved = optax.tree.add_scale(params, h, v)
  f1 = fn(moved)
  inv = jnp.where(h > 0, 1.0 / jnp.where(h > 0, h, 1.0), 0.0)
  return optax.tree.scale(inv, optax.tree.sub(f1, f0))

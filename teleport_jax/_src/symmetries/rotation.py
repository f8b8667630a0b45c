"""Rotations O(k) acting through a change of variables (quadratics, test functions)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import struct
from jax.flatten_util import ravel_pytree

from teleport_jax._src.symmetries import symmetry


class _LatentRotation(symmetry.Symmetry):
  r"""Rotations of a latent vector ``z = phi(w)`` on which the loss is radial.

  If ``L(w) = f(|phi(w)|)`` for an invertible change of variables ``phi``, then
  ``w -> phi^{-1}(R phi(w))`` with ``R`` orthogonal keeps the loss. Group
  element: a ``(k, k)`` rotation matrix; Lie algebra: ``(k, k)`` matrices whose
  skew-symmetric part ``(X - X^T)/2`` is exponentiated, so ``exp`` always gives
  a proper rotation and ``inverse`` is the transpose.
  """

  needs_data = False

  def to_latent(self, w: chex.Array) -> chex.Array:
    raise NotImplementedError

  def from_latent(self, z: chex.Array) -> chex.Array:
    raise NotImplementedError

  def latent_size(self, params) -> int:
    w, _ = ravel_pytree(params)
    return int(jax.eval_shape(self.to_latent, w).shape[0])

  def algebra_zeros(self, params):
    w, _ = ravel_pytree(params)
    k = self.latent_size(params)
    return jnp.zeros((k, k), w.dtype)

  def exp(self, xi):
    return symmetry.expm(0.5 * (xi - xi.T))

  def retract(self, xi):
    return symmetry.cayley(0.5 * (xi - xi.T))

  def inverse(self, g):
    return g.T

  def compose(self, g1, g2):  # z -> g1 z -> g2 g1 z
    return g2 @ g1

  def validate(self, params, data=None):
    del data
    w, _ = ravel_pytree(params)
    if w.size == 0:
      raise ValueError("params is empty.")

  def act(self, params: chex.ArrayTree, g, data: Any = None) -> chex.ArrayTree:
    del data
    w, unravel = ravel_pytree(params)
    z = self.to_latent(w)
    if g.shape != (z.shape[0], z.shape[0]):
      raise ValueError(f"g has shape {g.shape}, expected {(z.shape[0],) * 2}.")
    return unravel(self.from_latent(g.astype(z.dtype) @ z).astype(w.dtype))


@struct.dataclass
class Rotation(_LatentRotation):
  """Rotations through a user-given change of variables.

  Attributes:
    forward: ``phi``: flat parameter vector ``(n,)`` -> latent ``(k,)``.
    backward: ``phi^{-1}``: latent ``(k,)`` -> flat parameter vector ``(n,)``.
  """

  forward: Callable[[chex.Array], chex.Array] = struct.field(pytree_node=False, default=None)
  backward: Callable[[chex.Array], chex.Array] = struct.field(pytree_node=False, default=None)

  def __post_init__(self):
    if not callable(self.forward) or not callable(self.backward):
      raise TypeError("Rotation needs callables forward= and backward=.")

  def to_latent(self, w):
    return self.forward(w)

  def from_latent(self, z):
    return self.backward(z)


@struct.dataclass
class QuadraticRotation(_LatentRotation):
  r"""``O(n)`` on the level sets of ``L(w) = 1/2 (w - c)^T H (w - c) + const``.

  The change of variables is ``z = H^{1/2} (w - c)``; ``H`` must be symmetric
  positive definite. O(n) acts transitively on each level set, so the maximum
  gradient-norm point of a level set is reachable (there the gradient is an
  eigenvector of ``H`` for its largest eigenvalue).

  Attributes:
    hessian: ``(n, n)`` symmetric positive definite.
    center: ``(n,)`` the minimiser.
  """

  hessian: chex.Array = None
  center: chex.Array = None

  def _sqrt(self):
    evals, evecs = jnp.linalg.eigh(self.hessian)
    return evals, evecs

  def to_latent(self, w):
    evals, evecs = self._sqrt()
    return (evecs * jnp.sqrt(evals)) @ (evecs.T @ (w - self.center))

  def from_latent(self, z):
    evals, evecs = self._sqrt()
    return self.center + evecs @ ((evecs.T @ z) / jnp.sqrt(evals))

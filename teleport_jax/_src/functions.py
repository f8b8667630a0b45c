"""Two-dimensional test functions and the rotations that keep their level sets."""

from __future__ import annotations

import chex
import jax.numpy as jnp

from teleport_jax._src import rotation

_BOOTH_M = ((1.0, 2.0), (2.0, 1.0))
_BOOTH_C = (7.0, 5.0)


def booth(w: chex.Array) -> chex.Array:
  """Booth's function ``(x + 2y - 7)^2 + (2x + y - 5)^2``; minimum 0 at (1, 3).

  Args:
    w: ``(2,)`` the point ``(x, y)``.
  """
  x, y = w[0], w[1]
  return (x + 2 * y - 7) ** 2 + (2 * x + y - 5) ** 2


def booth_symmetry() -> rotation.Rotation:
  """O(2) on Booth's level sets through ``z = M w - c`` (Booth is ``|z|^2``)."""

  def forward(w):
    m = jnp.asarray(_BOOTH_M, w.dtype)
    return m @ w - jnp.asarray(_BOOTH_C, w.dtype)

  def backward(z):
    m = jnp.asarray(_BOOTH_M, z.dtype)
    return jnp.linalg.solve(m, z + jnp.asarray(_BOOTH_C, z.dtype))

  return rotation.Rotation(forward=forward, backward=backward)


def rosenbrock(w: chex.Array, a: float = 1.0, b: float = 100.0) -> chex.Array:
  """Rosenbrock's function ``(a - x)^2 + b (y - x^2)^2``; minimum 0 at (a, a^2)."""
  x, y = w[0], w[1]
  return (a - x) ** 2 + b * (y - x**2) ** 2


def rosenbrock_symmetry(a: float = 1.0, b: float = 100.0) -> rotation.Rotation:
  """O(2) on Rosenbrock's level sets through ``u = a - x, v = sqrt(b) (y - x^2)``."""
  sb = b**0.5

  def forward(w):
    x, y = w[0], w[1]
    return jnp.stack([a - x, sb * (y - x**2)])

  def backward(z):
    x = a - z[0]
    return jnp.stack([x, z[1] / sb + x**2])

  return rotation.Rotation(forward=forward, backward=backward)

"""Two-dimensional test functions and the rotations that keep their level sets."""

from __future__ import annotations

import chex
import jax.numpy as jnp
from flax import struct

from teleport_jax._src.symmetries import rotation

_BOOTH_M = ((1.0, 2.0), (2.0, 1.0))
_BOOTH_M_INV = ((-1.0 / 3.0, 2.0 / 3.0), (2.0 / 3.0, -1.0 / 3.0))
_BOOTH_C = (7.0, 5.0)


def booth(w: chex.Array) -> chex.Array:
  """Booth's function ``(x + 2y - 7)^2 + (2x + y - 5)^2``; minimum 0 at (1, 3).

  Args:
    w: ``(2,)`` the point ``(x, y)``.
  """
  x, y = w[0], w[1]
  return (x + 2 * y - 7) ** 2 + (2 * x + y - 5) ** 2


def _booth_forward(w):
  return jnp.asarray(_BOOTH_M, w.dtype) @ w - jnp.asarray(_BOOTH_C, w.dtype)


def _booth_backward(z):
  return jnp.asarray(_BOOTH_M_INV, z.dtype) @ (z + jnp.asarray(_BOOTH_C, z.dtype))


def booth_symmetry() -> rotation.Rotation:
  """O(2) on Booth's level sets through ``z = M w - c`` (Booth is ``|z|^2``).

  Returns the same (hashable) symmetry on every call, so jitted code that
  takes it as a static argument compiles once.
  """
  return rotation.Rotation(forward=_booth_forward, backward=_booth_backward)


def rosenbrock(w: chex.Array, a: float = 1.0, b: float = 100.0) -> chex.Array:
  """Rosenbrock's function ``(a - x)^2 + b (y - x^2)^2``; minimum 0 at (a, a^2)."""
  x, y = w[0], w[1]
  return (a - x) ** 2 + b * (y - x**2) ** 2


@struct.dataclass
class RosenbrockRotation(rotation._LatentRotation):
  """O(2) on Rosenbrock's level sets through ``u = a - x, v = sqrt(b) (y - x^2)``."""

  a: float = struct.field(pytree_node=False, default=1.0)
  b: float = struct.field(pytree_node=False, default=100.0)

  def to_latent(self, w):
    x, y = w[0], w[1]
    return jnp.stack([self.a - x, self.b**0.5 * (y - x**2)])

  def from_latent(self, z):
    x = self.a - z[0]
    return jnp.stack([x, z[1] / self.b**0.5 + x**2])


def rosenbrock_symmetry(a: float = 1.0, b: float = 100.0) -> RosenbrockRotation:
  """O(2) on Rosenbrock's level sets (see :class:`RosenbrockRotation`)."""
  return RosenbrockRotation(a=float(a), b=float(b))

"""Elementwise activations with the properties the symmetry groups rely on.

The data-dependent GL action needs an activation that is a bijection of the
real line (so that ``inverse(fn(z)) == z`` for every pre-activation and every
transformed post-activation has a pre-image). Positive rescaling needs a
positively homogeneous activation (``fn(s * z) == s * fn(z)`` for ``s > 0``).

Activations compare and hash by value: ``leaky_relu(0.1) == leaky_relu(0.1)``,
so symmetries built from equal settings are equal and share compiled code.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable

import chex
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Activation:
  """An elementwise activation and what is known about it.

  Attributes:
    name: a short name, used in error messages.
    fn: the activation, ``(...,) -> (...,)``.
    inverse: its inverse on the whole real line, or ``None`` if it has none.
    positively_homogeneous: whether ``fn(s * z) == s * fn(z)`` for all ``s > 0``.
  """

  name: str
  fn: Callable[[chex.Array], chex.Array]
  inverse: Callable[[chex.Array], chex.Array] | None = None
  positively_homogeneous: bool = False

  @property
  def invertible(self) -> bool:
    return self.inverse is not None

  def __call__(self, x: chex.Array) -> chex.Array:
    return self.fn(x)


@dataclasses.dataclass(frozen=True)
class _LeakyReLU:
  slope: float

  def __call__(self, z):
    return jnp.where(z >= 0, z, jnp.asarray(self.slope, jnp.result_type(z)) * z)


@dataclasses.dataclass(frozen=True)
class _LeakyReLUInverse:
  slope: float

  def __call__(self, y):
    return jnp.where(y >= 0, y, y / jnp.asarray(self.slope, jnp.result_type(y)))


def _relu(z):
  return jnp.maximum(z, 0)


def _identity(z):
  return z


def leaky_relu(negative_slope: float = 0.01) -> Activation:
  """LeakyReLU ``max(z, a z)`` with slope ``a > 0``: invertible and homogeneous.

  Args:
    negative_slope: the slope ``a`` for negative inputs; must be in ``(0, 1]``.

  Examples:
    >>> import teleport_jax as tj
    >>> tj.activations.leaky_relu(0.1) == tj.activations.leaky_relu(0.1)  # equal settings, equal activations
    True
  """
  if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
    raise TypeError(f"negative_slope must be a real number, got {negative_slope!r}.")
  a = float(negative_slope)
  if not 0.0 < a <= 1.0:
    raise ValueError(f"negative_slope must be in (0, 1] for an invertible LeakyReLU, got {a}.")
  return Activation(
    name=f"leaky_relu({a})",
    fn=_LeakyReLU(a),
    inverse=_LeakyReLUInverse(a),
    positively_homogeneous=True,
  )


def relu() -> Activation:
  """ReLU: positively homogeneous, not invertible."""
  return Activation(name="relu", fn=_relu, inverse=None, positively_homogeneous=True)


def identity() -> Activation:
  """The identity (a linear network): invertible and homogeneous."""
  return Activation(name="identity", fn=_identity, inverse=_identity, positively_homogeneous=True)


def asinh() -> Activation:
  """``arcsinh``: a smooth bijection of the real line, not homogeneous."""
  return Activation(name="asinh", fn=jnp.arcsinh, inverse=jnp.sinh, positively_homogeneous=False)


def tanh() -> Activation:
  """``tanh``: injective but onto ``(-1, 1)`` only, so not usable for GL."""
  return Activation(name="tanh", fn=jnp.tanh, inverse=None)


_NAMED = {
  "leaky_relu": leaky_relu,
  "relu": relu,
  "identity": identity,
  "linear": identity,
  "asinh": asinh,
  "tanh": tanh,
}


# the public factories, by the name they are exported under
_FACTORIES = {f.__name__: f for f in (leaky_relu, relu, identity, asinh, tanh)}


def as_activation(activation: Activation | str, *, argname: str = "activation") -> Activation:
  """Resolves a name such as ``"leaky_relu"`` or ``"relu"`` to an :class:`Activation`.

  Raises:
    TypeError: if ``activation`` is neither a string nor an ``Activation``
      (for a factory such as ``relu`` passed uncalled, the message says to
      call it).
    ValueError: if the name is unknown.
  """
  if isinstance(activation, Activation):
    return activation
  factory = next((name for name, f in _FACTORIES.items() if activation is f), None)
  if factory is not None:
    call = {
      "relu": "tj.activations.relu() (or tj.activations.leaky_relu(0.1))",
      "leaky_relu": "tj.activations.leaky_relu(0.1) (any slope in (0, 1]; tj.activations.leaky_relu() is 0.01)",
    }.get(factory, f"tj.activations.{factory}() (or the name {factory!r})")
    raise TypeError(
      f"{argname} must be a teleport_jax.activations.Activation; tj.activations.{factory} is a factory: pass {call}."
    )
  if isinstance(activation, str):
    if activation not in _NAMED:
      raise ValueError(
        f"Unknown {argname} {activation!r}; expected one of {sorted(_NAMED)} "
        "or a teleport_jax.activations.Activation."
      )
    return _NAMED[activation]()
  raise TypeError(
    f"{argname} must be a string or a teleport_jax.activations.Activation, got "
    f"{type(activation).__name__}. Wrap a plain function as "
    "teleport_jax.activations.Activation(name, fn, inverse)."
  )

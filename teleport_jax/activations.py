"""Activations with their inverse and homogeneity.

The lower-case names are factories (``tj.activations.relu()``); equal
settings compare and hash equal, so they share compiled code.
"""

from teleport_jax._src.symmetries.activations import Activation
from teleport_jax._src.symmetries.activations import as_activation
from teleport_jax._src.symmetries.activations import asinh
from teleport_jax._src.symmetries.activations import identity
from teleport_jax._src.symmetries.activations import leaky_relu
from teleport_jax._src.symmetries.activations import relu
from teleport_jax._src.symmetries.activations import tanh

__all__ = (
  "Activation",
  "as_activation",
  "asinh",
  "identity",
  "leaky_relu",
  "relu",
  "tanh",
)

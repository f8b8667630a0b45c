"""Positive rescaling of hidden units (data-free, exact for homogeneous activations)."""

from __future__ import annotations

from typing import Any

import chex
import jax.numpy as jnp
from flax import struct

from teleport_jax._src import activations as act_lib
from teleport_jax._src import layouts
from teleport_jax._src import symmetry


@struct.dataclass
class PositiveRescaling(symmetry.Symmetry):
  r"""Positive diagonal rescaling of every hidden layer of an MLP.

  For a hidden layer with positively homogeneous activation
  (:math:`\sigma(s z) = s \sigma(z)` for :math:`s > 0`: ReLU, LeakyReLU,
  identity), scaling its incoming kernel and bias by :math:`D = \mathrm{diag}(s)`
  and its outgoing kernel by :math:`D^{-1}` leaves the network function
  unchanged for every input. This holds without data, so the teleported point
  stays on the level set of the loss on *any* batch.

  Group element: a tuple with one positive vector of shape ``(d_m,)`` per
  hidden layer. Lie algebra: log-scales of the same shapes; ``exp`` is the
  elementwise exponential and ``inverse`` the reciprocal.

  Attributes:
    layout: where the layers are in ``params`` (inferred if ``None``).
    activation: optional; if given, it must be positively homogeneous.
  """

  layout: layouts.MLPLayout | None = struct.field(pytree_node=False, default=None)
  activation: Any = struct.field(pytree_node=False, default=None)

  needs_data = False
  diagonal_transport = True

  def __post_init__(self):
    if self.activation is not None:
      a = act_lib.as_activation(self.activation)
      if not a.positively_homogeneous:
        raise ValueError(
          f"activation {a.name!r} is not positively homogeneous; positive "
          "rescaling is only a symmetry for ReLU-like activations."
        )

  def _layout(self, params):
    return layouts.as_layout(self.layout, params)

  def algebra_zeros(self, params: chex.ArrayTree) -> tuple[chex.Array, ...]:
    kernels, _ = self._layout(params).get(params)
    return tuple(jnp.zeros((k.shape[1],), k.dtype) for k in kernels[:-1])

  def exp(self, xi):
    return tuple(jnp.exp(x) for x in xi)

  def inverse(self, g):
    return tuple(1.0 / s for s in g)

  def compose(self, g1, g2):
    return tuple(a * b for a, b in zip(g1, g2))

  def validate(self, params, data=None):
    del data
    self._layout(params).get(params)

  def act(self, params: chex.ArrayTree, g, data: Any = None) -> chex.ArrayTree:
    """Rescales hidden units: ``K_m <- K_m D_m``, ``b_m <- D_m b_m``, ``K_{m+1} <- D_m^{-1} K_{m+1}``."""
    del data
    layout = self._layout(params)
    kernels, biases = layout.get(params)
    _check_group_shapes(g, kernels, vector=True)
    kernels, biases = list(kernels), list(biases)
    for m, s in enumerate(g):
      s = s.astype(kernels[m].dtype)
      kernels[m] = kernels[m] * s[None, :]
      if biases[m] is not None:
        biases[m] = biases[m] * s
      kernels[m + 1] = kernels[m + 1] / s[:, None]
    return layout.set(params, kernels, biases)


def _check_group_shapes(g, kernels, *, vector: bool) -> None:
  if not isinstance(g, (tuple, list)) or len(g) != len(kernels) - 1:
    raise ValueError(
      f"g must be a tuple with one element per hidden layer ({len(kernels) - 1}), "
      f"got {type(g).__name__} of length {len(g) if hasattr(g, '__len__') else '?'}."
    )
  for m, x in enumerate(g):
    d = kernels[m].shape[1]
    want = (d,) if vector else (d, d)
    if tuple(x.shape) != want:
      raise ValueError(f"g[{m}] has shape {tuple(x.shape)}, expected {want} for hidden layer {m}.")

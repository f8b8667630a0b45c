"""GL(n) acting between two linear maps (data-free)."""

from __future__ import annotations

from typing import Any

import chex
import jax.numpy as jnp
from flax import struct

from teleport_jax._src.symmetries import groups
from teleport_jax._src.symmetries import layouts
from teleport_jax._src.symmetries import mlp
from teleport_jax._src.symmetries import sites as sites_lib
from teleport_jax._src.symmetries import symmetry


@struct.dataclass
class LinearGL(mlp.MLPGroupMixin, symmetry.Symmetry):
  r"""``GL(d_m)`` on every hidden layer of a *linear* network.

  With no nonlinearity between layer ``m`` and ``m+1``,
  :math:`x K_m K_{m+1} = x (K_m A)(A^{-1} K_{m+1})` for any invertible ``A``,
  so ``K_m <- K_m A``, ``b_m <- b_m A``, ``K_{m+1} <- A^{-1} K_{m+1}`` keeps the
  function for every input (features ``h -> h A``; for ``W @ x`` matrices
  ``W_m <- A^T W_m`` and ``W_{m+1} <- W_{m+1} A^{-T}``).

  It is the product of one :class:`~teleport_jax.symmetries.SiteSymmetry` with group
  :class:`~teleport_jax.groups.GL` per hidden layer (see :meth:`as_product`).
  Group element: a tuple with one ``(d_m, d_m)`` invertible matrix per hidden
  layer. Lie algebra: matrices of the same shapes; ``exp`` is the matrix
  exponential (always invertible, inverse ``exp(-xi)``). Layers of equal width
  are stacked and their exponentials computed in one ``vmap``-ed call on
  accelerators.

  Attributes:
    layout: where the layers are in ``params``, in call order (inferred if ``None``).
  """

  layout: layouts.MLPLayout | None = struct.field(pytree_node=False, default=None)

  needs_data = False

  def as_product(self, params: chex.ArrayTree) -> sites_lib.Product:
    """The same group as a :class:`~teleport_jax.symmetries.Product` of per-layer site symmetries."""
    sites = mlp.mlp_sites(self._layout(params), params, "linear")
    return sites_lib.Product(tuple(sites_lib.SiteSymmetry(s, groups.GL()) for s in sites))

  def algebra_zeros(self, params):
    return self.as_product(params).algebra_zeros(params)

  def exp(self, xi):
    return symmetry.batched_over_equal_shapes(symmetry.expm, xi)

  def retract(self, xi):
    return symmetry.batched_over_equal_shapes(symmetry.cayley, xi)

  def inverse(self, g):
    return symmetry.batched_over_equal_shapes(jnp.linalg.inv, g)

  def compose(self, g1, g2):  # features h -> h A1 -> h A1 A2
    return tuple(a @ b for a, b in zip(g1, g2))

  def validate(self, params, data=None):
    del data
    self._layout(params).get(params)

  def act(self, params: chex.ArrayTree, g, data: Any = None) -> chex.ArrayTree:
    del data
    prod = self.as_product(params)
    mlp.check_group_shapes(g, len(prod), [p.site.dim for p in prod.parts], vector=False)
    return prod.act(params, tuple(g))

  def act_linearized(self, params, xi, data=None):
    del data
    return self.as_product(params).act_linearized(params, tuple(xi))

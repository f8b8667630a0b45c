"""Positive rescaling of hidden units (data-free, exact for homogeneous activations)."""

from __future__ import annotations

from typing import Any

import chex
from flax import struct

from teleport_jax._src.symmetries import activations as act_lib
from teleport_jax._src.symmetries import groups
from teleport_jax._src.symmetries import layouts
from teleport_jax._src.symmetries import mlp
from teleport_jax._src.symmetries import sites as sites_lib
from teleport_jax._src.symmetries import symmetry


@struct.dataclass
class PositiveRescaling(mlp.MLPGroupMixin, symmetry.Symmetry):
  r"""Positive diagonal rescaling of every hidden layer of an MLP.

  For a hidden layer with positively homogeneous activation
  (:math:`\sigma(s z) = s \sigma(z)` for :math:`s > 0`: ReLU, LeakyReLU,
  identity), scaling its incoming kernel and bias by :math:`D = \mathrm{diag}(s)`
  and its outgoing kernel by :math:`D^{-1}` leaves the network function
  unchanged for every input. This holds without data, so the teleported point
  stays on the level set of the loss on *any* batch.

  It is the product of one :class:`~teleport_jax.symmetries.SiteSymmetry` with group
  :class:`~teleport_jax.groups.Scaling` per hidden layer (see
  :meth:`as_product`). Group element: a tuple with one positive vector of shape
  ``(d_m,)`` per hidden layer. Lie algebra: log-scales of the same shapes;
  ``exp`` is the elementwise exponential and ``inverse`` the reciprocal.

  Attributes:
    layout: where the layers are in ``params``, in call order (inferred if
      ``None``: from the loss the teleport is given, see
      :func:`teleport_jax.symmetries.infer_layout`).
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

  def as_product(self, params: chex.ArrayTree) -> sites_lib.Product:
    """The same group as a :class:`~teleport_jax.symmetries.Product` of per-layer site symmetries."""
    sites = mlp.mlp_sites(self._layout(params), params, "homogeneous")
    return sites_lib.Product(tuple(sites_lib.SiteSymmetry(s, groups.Scaling()) for s in sites))

  def algebra_zeros(self, params: chex.ArrayTree) -> tuple[chex.Array, ...]:
    return self.as_product(params).algebra_zeros(params)

  def exp(self, xi):
    return tuple(groups.Scaling().exp(x) for x in xi)

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
    prod = self.as_product(params)
    mlp.check_group_shapes(g, len(prod), [p.site.dim for p in prod.parts], vector=True)
    return prod.act(params, tuple(g))

  def act_linearized(self, params, xi, data=None):
    del data
    return self.as_product(params).act_linearized(params, tuple(xi))

  def cotangent_scale(self, params, g, data=None):
    del data
    return self.as_product(params).cotangent_scale(params, tuple(g))

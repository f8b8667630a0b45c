"""GL(n) acting between two linear maps (data-free)."""

from __future__ import annotations

from typing import Any

import chex
import jax.numpy as jnp
from flax import struct

from teleport_jax._src import layouts
from teleport_jax._src import rescaling
from teleport_jax._src import symmetry


@struct.dataclass
class LinearGL(symmetry.Symmetry):
  r"""``GL(d_m)`` on every hidden layer of a *linear* network.

  With no nonlinearity between layer ``m`` and ``m+1``,
  :math:`x K_m K_{m+1} = x (K_m A)(A^{-1} K_{m+1})` for any invertible ``A``,
  so ``K_m <- K_m A``, ``b_m <- b_m A``, ``K_{m+1} <- A^{-1} K_{m+1}`` keeps the
  function for every input. (The same symmetry acts on an attention head's
  query/key and value/output maps.)

  Group element: a tuple with one ``(d_m, d_m)`` invertible matrix per hidden
  layer. Lie algebra: matrices of the same shapes; ``exp`` is the matrix
  exponential (always invertible, inverse ``exp(-xi)``). Layers of equal width
  are stacked and their exponentials computed in one ``vmap``-ed call; a layer
  of a different width gets its own call. The action applies ``A^{-1}`` by an
  LU solve, never by an approximate inverse.

  Attributes:
    layout: where the layers are in ``params`` (inferred if ``None``).
  """

  layout: layouts.MLPLayout | None = struct.field(pytree_node=False, default=None)

  needs_data = False

  def _layout(self, params):
    return layouts.as_layout(self.layout, params)

  def algebra_zeros(self, params):
    kernels, _ = self._layout(params).get(params)
    return tuple(jnp.zeros((k.shape[1], k.shape[1]), k.dtype) for k in kernels[:-1])

  def exp(self, xi):
    return symmetry.batched_over_equal_shapes(symmetry.expm, xi)

  def retract(self, xi):
    if getattr(self, "variant", "exact") == "published":
      return tuple(jnp.eye(x.shape[0], dtype=x.dtype) + x for x in xi)
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
    return self._apply(params, g, lambda a, k: jnp.linalg.solve(a, k))

  def act_linearized(self, params, xi, data=None):
    del data
    g = tuple(jnp.eye(x.shape[0], dtype=x.dtype) + x for x in xi)
    return self._apply(params, g, lambda a, k: 2 * k - a @ k)  # (I - xi) K

  def _apply(self, params, g, inv_apply):
    layout = self._layout(params)
    kernels, biases = layout.get(params)
    rescaling._check_group_shapes(g, kernels, vector=False)
    kernels, biases = list(kernels), list(biases)
    for m, a in enumerate(g):
      a = a.astype(kernels[m].dtype)
      kernels[m] = kernels[m] @ a
      if biases[m] is not None:
        biases[m] = biases[m] @ a
      kernels[m + 1] = inv_apply(a, kernels[m + 1])
    return layout.set(params, kernels, biases)

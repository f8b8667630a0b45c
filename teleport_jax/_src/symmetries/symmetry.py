"""The interface every symmetry group implements, and shared helpers.

A symmetry group ``G`` of a loss acts on parameters so that
``L(g . w, X) == L(w, X)``. Teleportation searches the orbit ``{g . w}`` for a
point with a better gradient. Every group here exposes:

* ``identity(params)``: the identity element, shaped for ``params``;
* ``algebra_zeros(params)``: the zero of the Lie algebra (the search space);
* ``exp(xi)``: algebra element -> group element, with an exact ``inverse``;
* ``act(params, g, data)``: the action, returning a new parameter pytree;
* ``compose(g1, g2)``: the element acting as ``g1`` and then ``g2``;
* ``cotangent_scale(params, g, data)``: how a gradient moves with ``g`` when
  that is elementwise (diagonal groups), ``None`` otherwise;
* ``needs_data``: whether ``act`` depends on the batch (data-dependent groups
  are only loss-invariant on the batch they were built from).

**Conventions.** Internally a layer computes ``h @ K`` with samples in rows and
features in columns (flax's ``(in, out)`` kernels). A matrix group element
``A`` of a hidden layer maps its features ``h -> h A`` (it acts on the
*right*): the layer's kernel becomes ``K A`` and the next kernel ``A^{-1} K``.
For a list of ``W @ x`` matrices (``(out, in)``, samples in columns) the same
element maps the feature columns ``x -> A^T x``: an element ``B`` written in
that convention (features ``x -> B x``, as in the published ``(I + T) @ h``)
is ``A = B^T``.

Group elements and algebra elements are pytrees (tuples of per-layer arrays for
MLP groups), so they can be ``vmap``-ed, differentiated and carried through
``lax`` loops.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

GroupElement = Any
AlgebraElement = Any


class Symmetry(abc.ABC):
  """Abstract base class of a symmetry group acting on parameters."""

  needs_data: bool = False
  #: whether the cotangent transport of an element is elementwise (a diagonal map)
  diagonal_transport: bool = False

  @abc.abstractmethod
  def algebra_zeros(self, params: chex.ArrayTree) -> AlgebraElement:
    """The zero of the Lie algebra (maps to the identity under ``exp``)."""

  @abc.abstractmethod
  def exp(self, xi: AlgebraElement) -> GroupElement:
    """Maps a Lie-algebra element to a group element.

    For matrix groups this is the matrix exponential of each block; the
    element acts on features from the right (``h -> h exp(xi)``, see the module
    docstring for the ``W @ x`` convention).
    """

  @abc.abstractmethod
  def inverse(self, g: GroupElement) -> GroupElement:
    """The exact inverse of a group element."""

  @abc.abstractmethod
  def act(self, params: chex.ArrayTree, g: GroupElement, data: Any = None) -> chex.ArrayTree:
    """Applies ``g`` to ``params`` (using ``data`` if ``needs_data``)."""

  def identity(self, params: chex.ArrayTree) -> GroupElement:
    """The identity element for ``params``."""
    return self.retract(self.algebra_zeros(params))

  def retract(self, xi: AlgebraElement) -> GroupElement:
    """A group-valued map that agrees with ``exp`` to first order at zero.

    The teleport solver differentiates ``act(params, retract(xi))`` at
    ``xi = 0`` and moves with ``act(params, retract(step))``. Matrix groups
    return the Cayley transform :func:`cayley` here: a true group element
    (invertible; orthogonal for skew-symmetric input) that costs one LU solve
    and compiles far faster than the matrix exponential.
    """
    return self.exp(xi)

  def act_linearized(
    self, params: chex.ArrayTree, xi: AlgebraElement, data: Any = None
  ) -> chex.ArrayTree:
    """A map of ``xi`` that agrees with ``act(params, retract(xi), data)`` to first order.

    The teleport solver only needs the objective's value and gradient on the
    algebra at ``xi = 0``, which depend on the action only to first order, so
    groups may return a cheaper map here (matrix groups use ``I + xi`` for
    ``g`` and ``I - xi`` for ``g^{-1}``, with no factorisation). It is *not*
    a group action away from ``xi = 0``; moves always use :meth:`act`.
    Default: ``act(params, retract(xi), data)``.
    """
    return self.act(params, self.retract(xi), data)

  @abc.abstractmethod
  def compose(self, g1: GroupElement, g2: GroupElement) -> GroupElement:
    """The element that acts as ``g1`` and then ``g2``:
    ``act(act(w, g1), g2) == act(w, compose(g1, g2))``."""

  def cotangent_scale(
    self, params: chex.ArrayTree, g: GroupElement, data: Any = None
  ) -> dict[tuple[str, ...], chex.Array | None] | None:
    """Elementwise factors ``r`` that move a gradient with ``g``: ``c' = r * c``.

    Returns a dict from leaf path (a tuple of key names) to the factor, with
    ``None`` for a leaf the group mixes (no elementwise transport exists
    there); leaves not in the dict are untouched (factor 1). ``None`` for a
    group that is not elementwise at all. Optimizer second moments move by
    ``r ** 2`` where a factor exists.
    """
    del params, g, data
    return None

  def bind(self, loss_fn: Callable, params: chex.ArrayTree, data: Any = None) -> Symmetry:
    """The symmetry resolved for a model: e.g. its layer order read from ``loss_fn``.

    The teleport calls this once per compiled call with its loss, parameters
    and batch. Default: ``self``.
    """
    del loss_fn, params, data
    return self

  def validate(self, params: chex.ArrayTree, data: Any = None) -> None:
    """Raises ``ValueError``/``TypeError`` if ``params``/``data`` do not fit."""
    del params, data


def batched_over_equal_shapes(
  fn: Callable[[chex.Array], chex.Array],
  arrays: Sequence[chex.Array],
  *,
  batch: bool | None = None,
) -> tuple[chex.Array, ...]:
  """Applies ``fn`` to each array, ``vmap``-ing over arrays of equal shape.

  Layers of equal width are stacked and handled in one batched call (one
  kernel launch on an accelerator); layers of a different width form their own
  batch. Results are returned in the original order.

  ``batch=None`` (default) batches on accelerators only: on the CPU backend
  each layer gets its own call, as there is no kernel launch to save and
  jaxlib's batched CPU LAPACK kernels (before 0.11.1) can deadlock a small
  thread pool when two of them run concurrently.
  """
  if batch is None:
    batch = jax.default_backend() != "cpu"
  if not batch:
    return tuple(fn(a) for a in arrays)
  groups: dict[tuple, list[int]] = {}
  for i, a in enumerate(arrays):
    groups.setdefault((tuple(a.shape), jnp.asarray(a).dtype), []).append(i)
  out: list[chex.Array | None] = [None] * len(arrays)
  for idx in groups.values():
    if len(idx) == 1:
      out[idx[0]] = fn(arrays[idx[0]])
    else:
      stacked = jax.vmap(fn)(jnp.stack([arrays[i] for i in idx]))
      for j, i in enumerate(idx):
        out[i] = stacked[j]
  return tuple(out)


def expm(x: chex.Array) -> chex.Array:
  """Matrix exponential of a square matrix."""
  return jax.scipy.linalg.expm(x)


def cayley(x: chex.Array) -> chex.Array:
  r"""Cayley transform :math:`(I - x/2)^{-1}(I + x/2)` of a square matrix.

  Agrees with :math:`\exp(x)` to second order, is invertible whenever the
  spectral radius of ``x`` is below 2 (inverse: ``cayley(-x)``), and maps
  skew-symmetric matrices to rotations.
  """
  eye = jnp.eye(x.shape[-1], dtype=x.dtype)
  return jnp.linalg.solve(eye - 0.5 * x, eye + 0.5 * x)


def check_finite(tree: Any, argname: str) -> None:
  """Raises ``ValueError`` naming ``argname`` if a concrete leaf is non-finite.

  Traced values are skipped: under ``jit`` the teleport reports non-finite
  input in its info record instead.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.core.Tracer):
      continue
    arr = np.asarray(leaf)
    if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
      where = jax.tree_util.keystr(tuple(path)) or "(root)"
      raise ValueError(f"{argname} contains non-finite values at {where}.")

r"""What a group does on one channel axis: rescaling, GL, rotations.

A :class:`~teleport_jax.symmetries.Site` says *where* a group acts (which leaves, which
axis, which heads); a :class:`Group` here says *what* it does there. Every
group acts on a channel axis of size ``d`` (one element per head when the site
has heads) through a matrix ``M``:

* a leaf with role ``"out"`` (a *writer*: the channel is an output of the
  leaf) is multiplied on that axis by ``M``: ``W -> W M`` for a kernel
  ``(in, d)``, ``b -> b M`` for a bias;
* a leaf with role ``"in"`` (a *reader*: the channel is contracted by the
  leaf) gets ``M^{-1}`` on that axis: ``W -> M^{-1} W`` for a kernel ``(d, out)``.

So features ``h`` (rows are samples) become ``h M`` and what reads them sees
``h M M^{-1} = h``. Elements are arrays (batched over heads), so they can be
``vmap``-ed, differentiated and carried through ``lax`` loops.

| group | element | algebra | exact ``exp`` | ``retract`` |
|---|---|---|---|---|
| :class:`Scaling` | positive ``s`` ``(..., d)``, ``M = diag(s)`` | log-scales | ``exp`` | ``exp`` |
| :class:`GL` | ``A`` ``(..., d, d)`` invertible | ``(..., d, d)`` | ``expm`` | Cayley |
| :class:`Orthogonal` | ``R`` ``(d, d)``, ``R^T R = I`` | skew part of ``(d, d)`` | ``expm`` | Cayley |
| :class:`RotaryGL` | ``(..., d/2, 2)`` complex scalars ``a + ib`` | log-modulus, angle | closed form | closed form |

The matrix groups' ``retract`` is the Cayley transform (a true group element
that agrees with ``expm`` to second order and compiles much faster).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Literal

import chex
import jax
import jax.numpy as jnp

Role = Literal["out", "in"]


def _batched(fn, x):
  """``fn`` over the leading (head) axes of ``x`` (``(..., d, d)``); its outputs may be a tuple."""
  lead = x.shape[:-2]
  if not lead:
    return fn(x)
  flat = x.reshape((-1,) + x.shape[-2:])
  out = jax.vmap(fn)(flat) if jax.default_backend() != "cpu" else _cpu_map(fn, flat)
  return jax.tree.map(lambda o: o.reshape(lead + o.shape[1:]), out)


def _cpu_map(fn, flat):
  # jaxlib's batched CPU LAPACK kernels (before 0.11.1) block a pool thread while
  # their chunks wait on the same pool: two at once deadlock a small pool. One
  # call per matrix is as fast on a CPU.
  outs = [fn(m) for m in flat]
  return jax.tree.map(lambda *o: jnp.stack(o), *outs)


def expm(x: chex.Array) -> chex.Array:
  """Matrix exponential of ``(..., d, d)``."""
  return _batched(jax.scipy.linalg.expm, x)


def cayley(x: chex.Array) -> chex.Array:
  r"""Cayley transform :math:`(I - x/2)^{-1}(I + x/2)` of ``(..., d, d)``.

  Agrees with :math:`\exp(x)` to second order, is invertible whenever the
  spectral radius of ``x`` is below 2 (inverse: ``cayley(-x)``), and maps
  skew-symmetric matrices to rotations.
  """
  eye = jnp.eye(x.shape[-1], dtype=x.dtype)
  return _batched(lambda m: jnp.linalg.solve(eye - 0.5 * m, eye + 0.5 * m), x)


def matrix_inverse(a: chex.Array) -> chex.Array:
  """Inverse of ``(..., d, d)`` by LU."""
  return _batched(jnp.linalg.inv, a)


def _skew(x):
  return 0.5 * (x - jnp.swapaxes(x, -1, -2))


class Group(abc.ABC):
  """What a symmetry does on a channel axis; stateless and hashable."""

  name: str = "group"
  #: elements act elementwise (``M`` diagonal): cotangents move by a factor
  diagonal: bool = False

  @abc.abstractmethod
  def algebra_shape(self, dim: int, heads: int | None) -> tuple[int, ...]:
    """Shape of one algebra (and group) element for ``dim`` channels."""

  def dimension(self, dim: int, heads: int | None) -> int:
    """The dimension of the group (number of free real parameters)."""
    n = 1
    for s in self.algebra_shape(dim, heads):
      n *= s
    return n

  @abc.abstractmethod
  def exp(self, xi: chex.Array) -> chex.Array:
    """Algebra element -> group element."""

  def retract(self, xi: chex.Array) -> chex.Array:
    """A group element that agrees with ``exp`` to first order (default: ``exp``)."""
    return self.exp(xi)

  @abc.abstractmethod
  def inverse(self, g: chex.Array) -> chex.Array:
    """The exact inverse."""

  @abc.abstractmethod
  def compose(self, g1: chex.Array, g2: chex.Array) -> chex.Array:
    """The element acting as ``g1`` and then ``g2`` (features ``h -> h M1 M2``)."""

  @abc.abstractmethod
  def identity(self, shape: tuple[int, ...], dtype) -> chex.Array:
    """The identity element of algebra shape ``shape``."""

  @abc.abstractmethod
  def matrix(self, g: chex.Array) -> chex.Array:
    """``M`` as a dense ``(..., d, d)`` matrix (for reports and generic code)."""

  @abc.abstractmethod
  def apply(self, x: chex.Array, g: chex.Array, role: Role, inv: chex.Array | None) -> chex.Array:
    """Applies ``g`` to ``x`` of shape ``(..., H, d)`` (``H`` heads, matching ``g``).

    ``inv`` is ``self.inverse(g)`` (computed once per site) for role ``"in"``.
    """

  def apply_linearized(self, x: chex.Array, xi: chex.Array, role: Role) -> chex.Array:
    """A map of ``xi`` that agrees with ``apply(x, retract(xi))`` to first order at 0."""
    g = self.retract(xi)
    return self.apply(x, g, role, self.inverse(g) if role == "in" else None)

  def __repr__(self) -> str:
    return f"{type(self).__name__}()"


def _matmul_last(x, m):
  """``x[..., h, i] M[h, i, j]`` summed over ``i``: ``(..., H, d) x (H, d, d)``."""
  return jnp.einsum("...hi,hij->...hj", x, m.astype(x.dtype))


def _matvec_last(x, m):
  """``M[h, i, j] x[..., h, j]`` summed over ``j``."""
  return jnp.einsum("...hj,hij->...hi", x, m.astype(x.dtype))


@dataclasses.dataclass(frozen=True)
class Scaling(Group):
  """Positive diagonal rescaling of channels: ``M = diag(s)``, ``s > 0``.

  Exact across positively homogeneous maps (ReLU, LeakyReLU, max pooling,
  average pooling, linear maps) and into scale-invariant ones (a normalisation
  in train mode). Algebra: log-scales.
  """

  name = "scaling"
  diagonal = True

  def algebra_shape(self, dim, heads):
    return (dim,) if heads is None else (heads, dim)

  def exp(self, xi):
    return jnp.exp(xi)

  def inverse(self, g):
    return 1.0 / g

  def compose(self, g1, g2):
    return g1 * g2

  def identity(self, shape, dtype):
    return jnp.ones(shape, dtype)

  def matrix(self, g):
    return g[..., :, None] * jnp.eye(g.shape[-1], dtype=g.dtype)

  def apply(self, x, g, role, inv):
    g = g.astype(x.dtype)
    return x * g if role == "out" else x / g

  def apply_linearized(self, x, xi, role):
    return self.apply(x, self.exp(xi), role, None)


@dataclasses.dataclass(frozen=True)
class GL(Group):
  """The general linear group ``GL(d)`` (one element per head with heads).

  Exact across linear maps: between two dense layers with no nonlinearity,
  attention queries and keys (``W_Q A``, ``W_K A^{-T}``), values and the
  output projection (``W_V B``, ``B^{-1} W_O``), LoRA factors.
  """

  name = "GL"

  def algebra_shape(self, dim, heads):
    return (dim, dim) if heads is None else (heads, dim, dim)

  def exp(self, xi):
    return expm(xi)

  def retract(self, xi):
    return cayley(xi)

  def inverse(self, g):
    return matrix_inverse(g)

  def compose(self, g1, g2):
    return g1 @ g2

  def identity(self, shape, dtype):
    return jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)

  def matrix(self, g):
    return g

  def apply(self, x, g, role, inv):
    return _matmul_last(x, g) if role == "out" else _matvec_last(x, inv)

  def apply_linearized(self, x, xi, role):
    # (I + xi) for writers, (I - xi) for readers: first-order, no factorisation
    d = xi if role == "out" else -xi
    return x + (_matmul_last(x, d) if role == "out" else _matvec_last(x, d))


@dataclasses.dataclass(frozen=True)
class Orthogonal(GL):
  """Rotations ``O(d)``: ``R^T R = I``, so readers get ``R^T``.

  Exact where every map between writers and readers commutes with rotations:
  the residual stream of a network whose norms are gain-free RMSNorms.
  Algebra: the skew-symmetric part of a ``(d, d)`` matrix.
  """

  name = "O"

  def dimension(self, dim, heads):
    return (heads or 1) * dim * (dim - 1) // 2

  def exp(self, xi):
    return expm(_skew(xi))

  def retract(self, xi):
    return cayley(_skew(xi))

  def inverse(self, g):
    return jnp.swapaxes(g, -1, -2)

  def apply_linearized(self, x, xi, role):
    return super().apply_linearized(x, _skew(xi), role)


@dataclasses.dataclass(frozen=True)
class RotaryGL(Group):
  r"""The matrices that commute with rotary position embeddings.

  Rotary embeddings rotate each pair of query/key channels by a
  position-dependent angle; ``A`` keeps ``q A R_p (k A^{-T} R_r)^T`` equal to
  ``q R_p R_r^T k^T`` iff it commutes with every ``R_p``: with distinct
  frequencies, a ``2 x 2`` block ``a I + b J`` (a complex scalar ``a + ib``) per
  pair. Element: ``(..., d/2, 2)`` holding ``(a, b)``; algebra: log-modulus and
  angle, ``exp`` the complex exponential.

  Attributes:
    pairing: ``"half"`` (channel ``i`` pairs with ``i + d/2``, the
      "rotate-half" convention of GPT-NeoX and Llama) or ``"interleaved"``
      (``2i`` with ``2i + 1``, the original RoFormer convention).
  """

  pairing: Literal["half", "interleaved"] = "half"
  name = "rotary"

  def __post_init__(self):
    if self.pairing not in ("half", "interleaved"):
      raise ValueError(f"pairing must be 'half' or 'interleaved', got {self.pairing!r}.")

  def algebra_shape(self, dim, heads):
    if dim % 2:
      raise ValueError(f"rotary channels come in pairs; got an odd dimension {dim}.")
    return (dim // 2, 2) if heads is None else (heads, dim // 2, 2)

  def exp(self, xi):
    r = jnp.exp(xi[..., 0])
    return jnp.stack([r * jnp.cos(xi[..., 1]), r * jnp.sin(xi[..., 1])], axis=-1)

  def inverse(self, g):
    n = jnp.sum(g * g, axis=-1, keepdims=True)
    return jnp.stack([g[..., 0], -g[..., 1]], axis=-1) / n

  def compose(self, g1, g2):
    a1, b1, a2, b2 = g1[..., 0], g1[..., 1], g2[..., 0], g2[..., 1]
    return jnp.stack([a1 * a2 - b1 * b2, a1 * b2 + b1 * a2], axis=-1)

  def identity(self, shape, dtype):
    return jnp.zeros(shape, dtype).at[..., 0].set(1.0)

  def matrix(self, g):
    a, b = g[..., 0], g[..., 1]
    half = a.shape[-1]
    if self.pairing == "half":
      top = jnp.concatenate([_diag(a), _diag(b)], axis=-1)
      bottom = jnp.concatenate([-_diag(b), _diag(a)], axis=-1)
      return jnp.concatenate([top, bottom], axis=-2)
    m = jnp.zeros(a.shape[:-1] + (2 * half, 2 * half), g.dtype)
    idx = jnp.arange(half)
    m = m.at[..., 2 * idx, 2 * idx].set(a).at[..., 2 * idx + 1, 2 * idx + 1].set(a)
    return m.at[..., 2 * idx, 2 * idx + 1].set(b).at[..., 2 * idx + 1, 2 * idx].set(-b)

  def apply(self, x, g, role, inv):
    m = self.matrix(g if role == "out" else inv)
    return _matmul_last(x, m) if role == "out" else _matvec_last(x, m)


def _diag(v):
  return v[..., :, None] * jnp.eye(v.shape[-1], dtype=v.dtype)


GROUPS = {"scaling": Scaling, "gl": GL, "orthogonal": Orthogonal, "rotary": RotaryGL}


def as_group(group: Group | str) -> Group:
  """A :class:`Group` from itself or a name (``"scaling"``, ``"gl"``, ``"orthogonal"``, ``"rotary"``)."""
  if isinstance(group, Group):
    return group
  if isinstance(group, str) and group.lower() in GROUPS:
    return GROUPS[group.lower()]()
  raise ValueError(f"group must be a teleport_jax group or one of {sorted(GROUPS)}, got {group!r}.")

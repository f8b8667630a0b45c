r"""Where a group acts: sites, and symmetries made of a site and a group.

A :class:`Site` is a frozen, hashable record of *which leaves, which axis*:
its writers produce a channel (a kernel's output axis, a bias, a norm gain)
and its readers contract it (the next kernel's input axis). What lies between
them is recorded in ``between`` (``"linear"``, ``"homogeneous"``, ``"rms_norm"``,
``"scale_invariant"``, ``"bilinear"``, ``"rotary"``, ``"other"``), which decides
which groups are exact there. A :class:`SiteSymmetry` is a site with a
:class:`~teleport_jax.groups.Group`; a :class:`Product` of symmetries on
disjoint sites is itself a symmetry (its elements are tuples over the parts).

Sites can be written by hand::

  site = tj.symmetries.Site(
      name="hidden0",
      slots=(tj.symmetries.Slot("params/Dense_0/kernel", axis=1, role="out"),
             tj.symmetries.Slot("params/Dense_0/bias", axis=0, role="out"),
             tj.symmetries.Slot("params/Dense_1/kernel", axis=0, role="in")),
      dim=64, between="homogeneous")
  sym = tj.symmetries.SiteSymmetry(site, "scaling")

or found by the finders in :mod:`teleport_jax.finders` and by
:func:`teleport_jax.find_symmetries`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any
from typing import Literal

import chex
import jax
import jax.numpy as jnp

from teleport_jax._src.core import paths as paths_lib
from teleport_jax._src.symmetries import groups as groups_lib
from teleport_jax._src.symmetries import symmetry as sym_lib

Between = Literal[
  "linear", "homogeneous", "rms_norm", "scale_invariant", "bilinear", "rotary", "other"
]
BETWEEN = ("linear", "homogeneous", "rms_norm", "scale_invariant", "bilinear", "rotary", "other")

# which groups are exact for what lies between writers and readers
ALLOWED: dict[str, tuple[type, ...]] = {
  "linear": (groups_lib.GL, groups_lib.Scaling, groups_lib.RotaryGL),
  "bilinear": (groups_lib.GL, groups_lib.Scaling, groups_lib.RotaryGL),
  "homogeneous": (groups_lib.Scaling,),
  "scale_invariant": (groups_lib.Scaling,),
  "rms_norm": (groups_lib.Orthogonal,),
  # queries and keys rotated by rotary position embeddings before q k^T
  "rotary": (groups_lib.RotaryGL,),
  "other": (),
}


@dataclasses.dataclass(frozen=True)
class Slot:
  """One leaf a site acts on.

  Attributes:
    path: the leaf's path (``"a/b/kernel"``, a tuple of names, or a JAX key path).
    axis: the channel axis of the leaf.
    role: ``"out"`` (a writer: multiplied by ``M`` on ``axis``) or ``"in"`` (a
      reader: ``M^{-1}`` on ``axis``).
    head_axis: the leaf's head axis when the site has one element per head.
    head_group: consecutive heads of this leaf that share one element (for
      grouped-query attention: the query heads of one key/value group).
    reshape: act on the leaf viewed with this shape (``axis`` and ``head_axis``
      then index the view; one entry may be ``-1``), e.g. ``(H * W, C, out)``
      for a dense kernel ``(H * W * C, out)`` that reads a flattened
      ``(H, W, C)`` feature map, whose rows ``c, c + C, ...`` belong to channel
      ``c``. ``None``: the leaf's own shape.
  """

  path: Any
  axis: int
  role: Literal["out", "in"] = "out"
  head_axis: int | None = None
  head_group: int = 1
  reshape: tuple[int, ...] | None = None

  def __post_init__(self):
    object.__setattr__(self, "path", paths_lib.as_path(self.path))
    if self.role not in ("out", "in"):
      raise ValueError(f"Slot role must be 'out' or 'in', got {self.role!r}.")
    if not isinstance(self.head_group, int) or self.head_group < 1:
      raise ValueError(f"head_group must be a positive int, got {self.head_group!r}.")
    if self.reshape is not None:
      view = tuple(int(n) for n in self.reshape)
      if sum(n == -1 for n in view) > 1 or any(n < -1 or n == 0 for n in view):
        raise ValueError(
          f"reshape must hold positive ints and at most one -1, got {self.reshape!r}."
        )
      object.__setattr__(self, "reshape", view)

  def view_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the slot acts on for a leaf of ``shape`` (``shape`` without ``reshape``)."""
    shape = tuple(shape)
    if self.reshape is None:
      return shape
    size = 1
    for n in shape:
      size *= n
    known = 1
    for n in self.reshape:
      known *= n if n != -1 else 1
    view = self.reshape
    if -1 in view:
      if size % known:
        raise ValueError(
          f"slot {paths_lib.path_str(self.path)}: a leaf of shape {shape} has no view {view}."
        )
      view = tuple(size // known if n == -1 else n for n in view)
    elif known != size:
      raise ValueError(
        f"slot {paths_lib.path_str(self.path)}: a leaf of shape {shape} has no view {view}."
      )
    return view


@dataclasses.dataclass(frozen=True)
class Site:
  """Where a group acts: leaves, the channel axis, optional heads.

  Attributes:
    name: a name for reports (e.g. ``"Dense_0->Dense_1"``).
    slots: the writers (role ``"out"``) and readers (role ``"in"``).
    dim: number of channels (the size of each slot's axis).
    heads: number of group elements along the head axis (``None``: one element).
    between: what lies between writers and readers (see the module docstring).
  """

  name: str
  slots: tuple[Slot, ...]
  dim: int
  heads: int | None = None
  between: str = "linear"

  def __post_init__(self):
    object.__setattr__(self, "slots", tuple(self.slots))
    if not self.slots:
      raise ValueError(f"site {self.name!r} has no slots.")
    if self.between not in BETWEEN:
      raise ValueError(
        f"site {self.name!r}: between must be one of {BETWEEN}, got {self.between!r}."
      )
    for s in self.slots:
      if not isinstance(s, Slot):
        raise TypeError(
          f"site {self.name!r}: slots must be teleport_jax.symmetries.Slot, got {type(s).__name__}."
        )
      if (s.head_axis is None) != (self.heads is None):
        raise ValueError(
          f"site {self.name!r}: slot {paths_lib.path_str(s.path)} must have a head_axis iff the "
          "site has heads."
        )

  @property
  def writers(self) -> tuple[Slot, ...]:
    return tuple(s for s in self.slots if s.role == "out")

  @property
  def readers(self) -> tuple[Slot, ...]:
    return tuple(s for s in self.slots if s.role == "in")

  @property
  def leaves(self) -> tuple[tuple[str, ...], ...]:
    return tuple(s.path for s in self.slots)

  def validate(self, index: paths_lib.LeafIndex) -> None:
    """Checks that every slot exists and has ``dim`` channels (and the heads)."""
    for s in self.slots:
      leaf = index.get(s.path, what=f"slot of site {self.name!r}")
      shape = s.view_shape(tuple(jnp.shape(leaf)))
      if not -len(shape) <= s.axis < len(shape) or shape[s.axis] != self.dim:
        raise ValueError(
          f"site {self.name!r}: leaf {paths_lib.path_str(s.path)} of shape {shape} has no "
          f"axis {s.axis} of size {self.dim}."
        )
      if s.head_axis is not None:
        h = shape[s.head_axis]
        if h != self.heads * s.head_group:
          raise ValueError(
            f"site {self.name!r}: leaf {paths_lib.path_str(s.path)} has {h} heads on axis "
            f"{s.head_axis}, expected {self.heads} x head_group {s.head_group}."
          )


def _to_channels_last(x, slot: Slot):
  """Moves (head axis, channel axis) last: ``(..., H, d)``; ``H = 1`` without heads."""
  axis = slot.axis % x.ndim
  if slot.head_axis is None:
    return jnp.moveaxis(x, axis, -1)[..., None, :]
  head = slot.head_axis % x.ndim
  return jnp.moveaxis(x, (head, axis), (-2, -1))


def _from_channels_last(y, slot: Slot, ndim: int):
  axis = slot.axis % ndim
  if slot.head_axis is None:
    return jnp.moveaxis(y[..., 0, :], -1, axis)
  head = slot.head_axis % ndim
  return jnp.moveaxis(y, (-2, -1), (head, axis))


def _per_head(g, site: Site, slot: Slot, batch_ndim: int):
  """``g`` with a leading head axis matching the slot's heads."""
  if site.heads is None:
    return g[None]
  if slot.head_group > 1:
    g = jnp.repeat(g, slot.head_group, axis=0)
  del batch_ndim
  return g


@dataclasses.dataclass(frozen=True)
class SiteSymmetry(sym_lib.Symmetry):
  """A group acting on one site.

  Group element: an array of the group's shape for ``site.dim`` channels
  (``(heads, ...)`` when the site has heads). Acting with ``M``: writers
  ``W -> W M`` on their axis, readers ``W -> M^{-1} W``.

  Attributes:
    site: where it acts.
    group: what it does (a :class:`~teleport_jax.groups.Group` or a name:
      ``"scaling"``, ``"gl"``, ``"orthogonal"``, ``"rotary"``).
    check_between: refuse a group that is not exact for ``site.between``
      (default). Turn off only to study a non-symmetry on purpose.
  """

  site: Site
  group: Any = "scaling"
  check_between: bool = True

  def __post_init__(self):
    object.__setattr__(self, "group", groups_lib.as_group(self.group))
    if not isinstance(self.site, Site):
      raise TypeError(
        f"site must be a teleport_jax.symmetries.Site, got {type(self.site).__name__}."
      )
    allowed = ALLOWED[self.site.between]
    if self.check_between and not isinstance(self.group, allowed):
      ok = ", ".join(sorted({a.__name__ for a in allowed})) or "none"
      raise ValueError(
        f"site {self.site.name!r}: {type(self.group).__name__} is not a symmetry across "
        f"{self.site.between!r} (exact groups there: {ok})."
      )
    if isinstance(self.group, groups_lib.Orthogonal) and self.site.heads is not None:
      raise ValueError(f"site {self.site.name!r}: Orthogonal acts without heads.")

  @property
  def needs_data(self) -> bool:  # type: ignore[override]
    return False

  @property
  def diagonal_transport(self) -> bool:  # type: ignore[override]
    return self.group.diagonal

  # ------------------------------------------------------------------ group
  def dimension(self) -> int:
    """Number of free real parameters of the group on this site."""
    return self.group.dimension(self.site.dim, self.site.heads)

  def _dtype(self, params):
    index = paths_lib.LeafIndex(params)
    return jnp.asarray(index.get(self.site.slots[0].path)).dtype

  def algebra_zeros(self, params):
    shape = self.group.algebra_shape(self.site.dim, self.site.heads)
    return jnp.zeros(shape, self._dtype(params))

  def identity(self, params):
    shape = self.group.algebra_shape(self.site.dim, self.site.heads)
    return self.group.identity(shape, self._dtype(params))

  def exp(self, xi):
    return self.group.exp(xi)

  def retract(self, xi):
    return self.group.retract(xi)

  def inverse(self, g):
    return self.group.inverse(g)

  def compose(self, g1, g2):
    return self.group.compose(g1, g2)

  def validate(self, params, data=None):
    del data
    self.site.validate(paths_lib.LeafIndex(params))

  # ----------------------------------------------------------------- action
  def act_on_index(self, index: paths_lib.LeafIndex, g, *, linearized: bool = False) -> None:
    """Applies ``g`` (or, with ``linearized``, the algebra element) in place on ``index``."""
    site, group = self.site, self.group
    inv = None
    if not linearized and any(s.role == "in" for s in site.slots):
      inv = group.inverse(g)
    for slot in site.slots:
      leaf = jnp.asarray(index.get(slot.path))
      x = leaf if slot.reshape is None else leaf.reshape(slot.view_shape(leaf.shape))
      y = _to_channels_last(x, slot)
      if linearized:
        y = group.apply_linearized(y, _per_head(g, site, slot, y.ndim), slot.role)
      else:
        gi = _per_head(g, site, slot, y.ndim)
        ii = None if inv is None else _per_head(inv, site, slot, y.ndim)
        y = group.apply(y, gi, slot.role, ii)
      y = _from_channels_last(y, slot, x.ndim).reshape(leaf.shape)
      index.set(slot.path, y.astype(leaf.dtype))

  def act(self, params, g, data=None):
    del data
    index = paths_lib.LeafIndex(params)
    _check_element(self, g)
    self.act_on_index(index, g)
    return index.unflatten()

  def act_linearized(self, params, xi, data=None):
    del data
    index = paths_lib.LeafIndex(params)
    self.act_on_index(index, xi, linearized=True)
    return index.unflatten()

  def cotangent_scale(self, params, g, data=None):
    """Per-leaf factor ``r`` with transported cotangent ``r * c`` (diagonal groups)."""
    del data
    if not self.group.diagonal:
      return None
    index = paths_lib.LeafIndex(params)
    ones = paths_lib.LeafIndex(params)
    for slot in self.site.slots:
      x = jnp.asarray(index.get(slot.path))
      ones.set(slot.path, jnp.ones_like(x))
    # a cotangent moves by the inverse-transpose: writers / s, readers * s
    self.act_on_index(ones, self.group.inverse(g))
    touched = {s.path for s in self.site.slots}
    return {p: ones.get(p) for p in touched}

  def describe(self) -> str:
    h = "" if self.site.heads is None else f" x {self.site.heads} heads"
    return f"{self.site.name}: {self.group.name}({self.site.dim}){h}"


def _check_element(sym: SiteSymmetry, g) -> None:
  want = sym.group.algebra_shape(sym.site.dim, sym.site.heads)
  if tuple(jnp.shape(g)) != tuple(want):
    raise ValueError(
      f"g for site {sym.site.name!r} has shape {tuple(jnp.shape(g))}, expected {tuple(want)}."
    )


@dataclasses.dataclass(frozen=True)
class Product(sym_lib.Symmetry):
  """Several symmetries acting as one: elements are tuples over the parts.

  The parts must act on disjoint ``(leaf, axis)`` pairs; they then commute and
  their product is a group. ``exp``, ``inverse``, ``compose`` and ``act`` go
  part by part.

  Attributes:
    parts: the symmetries.
  """

  parts: tuple[sym_lib.Symmetry, ...]

  def __post_init__(self):
    parts = tuple(self.parts)
    object.__setattr__(self, "parts", parts)
    for p in parts:
      if not isinstance(p, sym_lib.Symmetry):
        raise TypeError(f"Product parts must be teleport_jax symmetries, got {type(p).__name__}.")
    seen: dict[tuple, str] = {}
    for p in parts:
      if isinstance(p, SiteSymmetry):
        for s in p.site.slots:
          key = (s.path, s.axis, s.reshape)
          if key in seen:
            raise ValueError(
              f"Product: sites {seen[key]!r} and {p.site.name!r} both act on axis {s.axis} of "
              f"{paths_lib.path_str(s.path)}; parts must act on disjoint sites."
            )
          seen[key] = p.site.name

  @property
  def needs_data(self) -> bool:  # type: ignore[override]
    return any(p.needs_data for p in self.parts)

  @property
  def diagonal_transport(self) -> bool:  # type: ignore[override]
    return all(p.diagonal_transport for p in self.parts)

  def __len__(self) -> int:
    return len(self.parts)

  def algebra_zeros(self, params):
    return tuple(p.algebra_zeros(params) for p in self.parts)

  def identity(self, params):
    return tuple(p.identity(params) for p in self.parts)

  def exp(self, xi):
    return tuple(p.exp(x) for p, x in zip(self.parts, _check_len(self, xi, "xi")))

  def retract(self, xi):
    return tuple(p.retract(x) for p, x in zip(self.parts, _check_len(self, xi, "xi")))

  def inverse(self, g):
    return tuple(p.inverse(x) for p, x in zip(self.parts, _check_len(self, g, "g")))

  def compose(self, g1, g2):
    return tuple(p.compose(a, b) for p, a, b in zip(self.parts, g1, g2))

  def validate(self, params, data=None):
    for p in self.parts:
      p.validate(params, data)

  def _act(self, params, g, data, linearized):
    g = _check_len(self, g, "g")
    if all(isinstance(p, SiteSymmetry) for p in self.parts):
      index = paths_lib.LeafIndex(params)
      for p, x in zip(self.parts, g):
        if not linearized:
          _check_element(p, x)
        p.act_on_index(index, x, linearized=linearized)
      return index.unflatten()
    for p, x in zip(self.parts, g):
      params = p.act_linearized(params, x, data) if linearized else p.act(params, x, data)
    return params

  def act(self, params, g, data=None):
    return self._act(params, g, data, linearized=False)

  def act_linearized(self, params, xi, data=None):
    return self._act(params, xi, data, linearized=True)

  def cotangent_scale(self, params, g, data=None):
    """Per-leaf factors from the diagonal parts; leaves a non-diagonal part touches are
    ``None`` (no elementwise transport exists there)."""
    out: dict[tuple, Any] = {}
    blocked: set[tuple] = set()
    for p, x in zip(self.parts, g):
      scale = p.cotangent_scale(params, x, data)
      if scale is None:
        blocked |= set(_touched(p, params))
        continue
      for path, r in scale.items():
        out[path] = r if path not in out else out[path] * r
    for path in blocked:
      out[path] = None
    return out

  def bind(self, loss_fn, params, data=None):
    return Product(tuple(p.bind(loss_fn, params, data) for p in self.parts))

  def describe(self) -> str:
    return "\n".join(getattr(p, "describe", lambda p=p: type(p).__name__)() for p in self.parts)


def _touched(sym, params) -> list[tuple]:
  if isinstance(sym, SiteSymmetry):
    return [s.path for s in sym.site.slots]
  if isinstance(sym, Product):
    return [p for part in sym.parts for p in _touched(part, params)]
  return list(paths_lib.LeafIndex(params).paths)


def _check_len(sym: Product, x, name):
  if not isinstance(x, (tuple, list)) or len(x) != len(sym.parts):
    raise ValueError(
      f"{name} must be a tuple with one element per part ({len(sym.parts)}), got "
      f"{type(x).__name__} of length {len(x) if hasattr(x, '__len__') else '?'}."
    )
  return tuple(x)


def product(*symmetries: sym_lib.Symmetry | Sequence[sym_lib.Symmetry]) -> Product:
  """``Product`` of symmetries (nested products are flattened)."""
  flat: list[sym_lib.Symmetry] = []
  for s in symmetries:
    if isinstance(s, (list, tuple)):
      flat.extend(s)
    else:
      flat.append(s)
  out: list[sym_lib.Symmetry] = []
  for s in flat:
    out.extend(s.parts if isinstance(s, Product) else [s])
  return Product(tuple(out))


def leaf_dtype(params: chex.ArrayTree):
  leaves = [
    x
    for x in jax.tree_util.tree_leaves(params)
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
  ]
  return jnp.result_type(*leaves) if leaves else jnp.float32


# Symmetries pass through ``jax.jit`` as arguments: a site symmetry holds no
# arrays (a static node); a product's parts are its children, so that parts
# holding arrays stay traced.
def _unflatten_product(_, parts) -> Product:
  out = object.__new__(Product)
  object.__setattr__(out, "parts", tuple(parts))
  return out


jax.tree_util.register_static(SiteSymmetry)
jax.tree_util.register_pytree_node(Product, lambda p: (p.parts, None), _unflatten_product)

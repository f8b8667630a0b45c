r"""Finders: symmetries of a model's parameter pytree, found from leaf paths.

A finder reads the *paths and shapes* of a parameter pytree (flax linen
variables or an nnx state; never the model's code) and returns the exact
symmetries of one kind as a :class:`~teleport_jax.symmetries.Product` of
:class:`~teleport_jax.symmetries.SiteSymmetry`, one part per :class:`~teleport_jax.symmetries.Site`,
each with the group that is exact there (``Scaling`` across ReLU, ``GL`` per
head for attention, ``RotaryGL`` with rotary positions, ``Orthogonal`` for
the residual stream of a gain-free RMSNorm network). Products of different
finders combine with :func:`teleport_jax.product` (their sites must be
disjoint), and :func:`sites` lists the sites of a product. A finder that finds
nothing, or leaves whose shapes disagree, raises a ``ValueError`` naming the
predicate or module names it used.

Which leaves a finder looks at is said with small predicates on ``(path,
leaf)``, in the style of flax nnx filters and
``optax.transforms.partition``: :class:`PathContains`, :class:`PathMatches`,
:class:`PathEndsWith`, :class:`OfNdim`, combined with ``&``, ``|`` and ``~``.
A path is the tuple of key names (``("params", "Dense_0", "kernel")`` in linen,
``("layers", "0", "kernel")`` in nnx). Finders for paired modules (attention,
feed-forward, LoRA) take the module *names* and pair modules that share a
parent (``.../attn/query`` with ``.../attn/key``); ``where`` restricts them.

What a finder cannot see from paths it is told: the activation between dense
layers (``activation=``), rotary positions (``rotary=``), and whether the
norms of a network are gain-free RMSNorms (``residual_stream``). A wrong
statement gives a group that is not a symmetry; :func:`teleport_jax.teleport`
then refuses it in its symmetry check.

Examples:
  >>> import teleport_jax as tj, teleport_jax.models as zoo
  >>> from teleport_jax._src.symmetries import finders
  >>> m = zoo.mlp(widths=(4, 8, 8, 2))
  >>> sym = finders.mlp_chain(m.params, activation="relu")
  >>> [s.name for s in finders.sites(sym)]
  ['params/Dense_0 -> params/Dense_1', 'params/Dense_1 -> params/Dense_2']
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import chex
import jax.numpy as jnp

from teleport_jax._src.core import paths as paths_lib
from teleport_jax._src.symmetries import activations as act_lib
from teleport_jax._src.symmetries import groups as groups_lib
from teleport_jax._src.symmetries import sites as sites_lib
from teleport_jax._src.symmetries import symmetry as sym_lib

Path = paths_lib.Path

# --------------------------------------------------------------- predicates


class Predicate(abc.ABC):
  """A test on one leaf: ``predicate(path, leaf) -> bool``; combine with ``& | ~``."""

  @abc.abstractmethod
  def __call__(self, path: Path, leaf: Any) -> bool:
    """Whether the leaf at ``path`` (a tuple of names) is selected."""

  def __and__(self, other: Any) -> Predicate:
    return All((self, as_predicate(other)))

  def __rand__(self, other: Any) -> Predicate:
    return All((as_predicate(other), self))

  def __or__(self, other: Any) -> Predicate:
    return AnyOf((self, as_predicate(other)))

  def __ror__(self, other: Any) -> Predicate:
    return AnyOf((as_predicate(other), self))

  def __invert__(self) -> Predicate:
    return Not(self)


def _window(names: Path, key: Path, *, at_end: bool = False) -> bool:
  n = len(key)
  if n == 0 or n > len(names):
    return False
  if at_end:
    return tuple(names[-n:]) == key
  return any(tuple(names[i : i + n]) == key for i in range(len(names) - n + 1))


@dataclasses.dataclass(frozen=True)
class PathContains(Predicate):
  """Paths holding the name ``key`` (or the consecutive names ``"a/b"``).

  Attributes:
    key: a key name, or names joined by ``/`` that must appear consecutively.
  """

  key: str

  def __call__(self, path, leaf):
    del leaf
    return _window(tuple(path), paths_lib.as_path(self.key))

  def __repr__(self):
    return f"PathContains({self.key!r})"


@dataclasses.dataclass(frozen=True)
class PathEndsWith(Predicate):
  """Paths ending with the name ``key`` (or the names ``"a/b"``)."""

  key: str

  def __call__(self, path, leaf):
    del leaf
    return _window(tuple(path), paths_lib.as_path(self.key), at_end=True)

  def __repr__(self):
    return f"PathEndsWith({self.key!r})"


@dataclasses.dataclass(frozen=True)
class PathMatches(Predicate):
  """Paths whose ``/``-joined string matches the regular expression ``pattern``
  (``re.search``: anchor with ``^``/``$`` where needed)."""

  pattern: str

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as err:
      raise ValueError(f"PathMatches: bad regular expression {self.pattern!r}: {err}.") from err

  def __call__(self, path, leaf):
    del leaf
    return re.search(self.pattern, paths_lib.path_str(tuple(path))) is not None

  def __repr__(self):
    return f"PathMatches({self.pattern!r})"


@dataclasses.dataclass(frozen=True)
class OfNdim(Predicate):
  """Leaves with ``ndim`` dimensions."""

  ndim: int

  def __call__(self, path, leaf):
    del path
    return jnp.ndim(leaf) == self.ndim

  def __repr__(self):
    return f"OfNdim({self.ndim})"


@dataclasses.dataclass(frozen=True)
class All(Predicate):
  """Every predicate holds."""

  predicates: tuple[Predicate, ...]

  def __call__(self, path, leaf):
    return all(p(path, leaf) for p in self.predicates)

  def __repr__(self):
    return "(" + " & ".join(map(repr, self.predicates)) + ")"


@dataclasses.dataclass(frozen=True)
class AnyOf(Predicate):
  """At least one predicate holds."""

  predicates: tuple[Predicate, ...]

  def __call__(self, path, leaf):
    return any(p(path, leaf) for p in self.predicates)

  def __repr__(self):
    return "(" + " | ".join(map(repr, self.predicates)) + ")"


@dataclasses.dataclass(frozen=True)
class Not(Predicate):
  """The predicate does not hold."""

  predicate: Predicate

  def __call__(self, path, leaf):
    return not self.predicate(path, leaf)

  def __repr__(self):
    return f"~{self.predicate!r}"


@dataclasses.dataclass(frozen=True)
class Everything(Predicate):
  """Every leaf."""

  def __call__(self, path, leaf):
    return True

  def __repr__(self):
    return "Everything()"


@dataclasses.dataclass(frozen=True)
class _Fn(Predicate):
  fn: Callable[[Path, Any], bool]

  def __call__(self, path, leaf):
    return bool(self.fn(path, leaf))

  def __repr__(self):
    return getattr(self.fn, "__name__", repr(self.fn))


def as_predicate(p: Predicate | str | Callable[[Path, Any], bool] | None) -> Predicate:
  """A :class:`Predicate` from itself, a name (:class:`PathContains`), a function
  ``fn(path, leaf) -> bool`` or ``None`` (:class:`Everything`)."""
  if p is None:
    return Everything()
  if isinstance(p, Predicate):
    return p
  if isinstance(p, str):
    return PathContains(p)
  if callable(p):
    return _Fn(p)
  raise TypeError(f"a predicate must be a Predicate, a name or a function, got {p!r}.")


#: flax Dense kernels ``(in, out)``
DENSE_KERNELS = PathEndsWith("kernel") & OfNdim(2)
#: flax Conv kernels ``(H, W, in, out)``
CONV_KERNELS = PathEndsWith("kernel") & OfNdim(4)
#: BatchNorm gains: linen ``BatchNorm_i/scale``, the zoo's nnx ``norms/i/scale``
BATCHNORM_SCALES = PathMatches(r"(^|/)(BatchNorm[^/]*|norms/\d+)/scale$")
#: norm parameters (gains, biases) of the zoo's transformers
NORM_PARAMS = PathMatches(r"(^|/)[^/]*norm[^/]*/(scale|bias)$")
#: what writes the residual stream of the zoo's transformers and residual MLPs
STREAM_WRITERS = PathMatches(
  r"(^|/)(embed|pos_embed)/embedding$|(^|/)embed/(kernel|bias)$"
  r"|(^|/)attn/out/(kernel|bias)$|(^|/)(mlp/)?down/(kernel|bias)$"
)
#: what reads the residual stream (through a gain-free norm) in the zoo's models
STREAM_READERS = PathMatches(
  r"(^|/)attn/(query|key|value)/kernel$|(^|/)(mlp/)?(up|gate)/kernel$"
  r"|(^|/)(unembed|head)/kernel$"
)
#: the norms of a pre-norm transformer and the modules (relative to the norm's
#: parent) that read each norm's output
NORM_READERS: tuple[tuple[str, str], ...] = (
  ("norm1", r"attn/(query|key|value)"),
  ("norm2", r"mlp/(up|gate)"),
  ("final_norm", r"unembed"),
)


# ------------------------------------------------------------------ helpers


def _natural_key(path: Path) -> tuple:
  parts = []
  for name in path:
    for tok in re.split(r"(\d+)", str(name)):
      if tok:
        parts.append((0, int(tok), "") if tok.isdigit() else (1, 0, tok))
  return tuple(parts)


def _select(index: paths_lib.LeafIndex, pred: Predicate) -> list[Path]:
  out = [p for p, leaf in zip(index.paths, index.leaves) if pred(p, leaf)]
  return sorted(out, key=_natural_key)


def _shape(index: paths_lib.LeafIndex, path: Path) -> tuple[int, ...]:
  return tuple(jnp.shape(index.get(path)))


def _sibling(index: paths_lib.LeafIndex, path: Path, name: str) -> Path | None:
  p = tuple(path[:-1]) + (name,)
  return p if p in index else None


def _module(path: Path) -> str:
  return paths_lib.path_str(path[:-1])


def _modules_named(index, name: str, where: Predicate, leaf: str = "kernel") -> list[Path]:
  """Paths ``.../name/leaf`` (in natural order) that ``where`` selects."""
  out = [
    p
    for p, x in zip(index.paths, index.leaves)
    if len(p) >= 2 and p[-2] == name and p[-1] == leaf and where(p, x)
  ]
  return sorted(out, key=_natural_key)


def _partner(index, path: Path, name: str, leaf: str = "kernel") -> Path | None:
  """``.../name/leaf`` next to ``.../<module>/<leaf of path>`` (same parent)."""
  p = tuple(path[:-2]) + (name, leaf)
  return p if p in index else None


def _between_for(activation: Any) -> str:
  """What a site across ``activation`` allows: linear, homogeneous or other."""
  if activation is None:
    return "linear"
  if isinstance(activation, act_lib.Activation):
    if activation.name == "identity":
      return "linear"
    return "homogeneous" if activation.positively_homogeneous else "other"
  if isinstance(activation, str):
    name = activation.lower()
    if name in ("identity", "linear", "none"):
      return "linear"
    if name in ("relu", "leaky_relu"):
      return "homogeneous"
    return "other"
  raise TypeError(
    f"activation must be a name ('relu', 'gelu', ...), a teleport_jax.activations.Activation or None, "
    f"got {activation!r}."
  )


def _default_group(between: str) -> groups_lib.Group:
  if between in ("linear", "bilinear"):
    return groups_lib.GL()
  if between == "rms_norm":
    return groups_lib.Orthogonal()
  return groups_lib.Scaling()


def _finish(finder: str, found: Sequence[sites_lib.Site], group: Any, why: str = "") -> Any:
  """A product of one SiteSymmetry per site, with the finder's name on refusals."""
  parts = []
  for site in found:
    g = _default_group(site.between) if group is None else group
    try:
      parts.append(sites_lib.SiteSymmetry(site, g))
    except ValueError as err:
      raise ValueError(f"{finder}: {err}{why}") from err
  return sites_lib.Product(tuple(parts))


def _nothing(finder: str, what: str) -> ValueError:
  return ValueError(f"{finder}: no leaf matches {what}; nothing to build a site from.")


def sites(symmetry: sym_lib.Symmetry) -> tuple[sites_lib.Site, ...]:
  """The sites of a :class:`~teleport_jax.symmetries.SiteSymmetry` or of a product of them."""
  if isinstance(symmetry, sites_lib.SiteSymmetry):
    return (symmetry.site,)
  if isinstance(symmetry, sites_lib.Product):
    return tuple(s for p in symmetry.parts for s in sites(p))
  raise TypeError(f"symmetry has no sites: {type(symmetry).__name__}.")


def dimension(symmetry: sym_lib.Symmetry) -> int:
  """The dimension of a :class:`~teleport_jax.symmetries.SiteSymmetry` or of a product of them."""
  if isinstance(symmetry, sites_lib.SiteSymmetry):
    return symmetry.dimension()
  if isinstance(symmetry, sites_lib.Product):
    return sum(dimension(p) for p in symmetry.parts)
  raise TypeError(f"no dimension for {type(symmetry).__name__}.")


def _dense_site(index, name, writer: Path, reader: Path, between: str, finder: str, pred):
  """Hidden channels of a dense ``writer`` ``(in, d)`` (and its bias) read by ``reader``."""
  ws, rs = _shape(index, writer), _shape(index, reader)
  if len(ws) != 2 or len(rs) != 2 or ws[1] != rs[0]:
    raise ValueError(
      f"{finder}: {paths_lib.path_str(writer)} {ws} does not feed {paths_lib.path_str(reader)} "
      f"{rs} (selected by {pred!r}); expected kernels (in, d) and (d, out)."
    )
  slots = [sites_lib.Slot(writer, 1, "out")]
  bias = _sibling(index, writer, "bias")
  if bias is not None and _shape(index, bias) == (ws[1],):
    slots.append(sites_lib.Slot(bias, 0, "out"))
  slots.append(sites_lib.Slot(reader, 0, "in"))
  return sites_lib.Site(name, tuple(slots), ws[1], None, between)


# ------------------------------------------------------------------ finders


def mlp_chain(
  params: chex.ArrayTree,
  kernels: Predicate | str | Callable | None = DENSE_KERNELS,
  order: Sequence[Any] | None = None,
  *,
  activation: Any = "relu",
  group: Any = None,
) -> sites_lib.Product:
  """The hidden channels of a chain of dense layers.

  One site per hidden layer: the layer's kernel columns (``(in, d)``, axis 1)
  and bias are the writers, the next kernel's rows the readers.

  Args:
    params: the parameter pytree.
    kernels: selects the chain's kernels (default: every 2-D leaf named
      ``kernel``).
    order: the kernels' paths (or their modules' paths) in call order; default:
      the selected kernels in natural path order (``Dense_2`` before
      ``Dense_10``), which is call order for flax auto-names and nnx lists.
    activation: what lies between the layers: ``"relu"``/``"leaky_relu"``
      (positive rescaling), ``None``/``"identity"`` (GL), anything else
      (``"gelu"``, ``"tanh"``, ``"silu"``: no continuous symmetry, refused).
    group: override the group (default ``Scaling`` across a homogeneous
      activation, ``GL`` across none).

  Returns:
    A :class:`~teleport_jax.symmetries.Product` with one part per hidden layer.

  Raises:
    ValueError: fewer than two kernels, shapes that do not chain, or an
      activation across which the group is not a symmetry.
  """
  index = paths_lib.LeafIndex(params)
  pred = as_predicate(kernels)
  if order is not None:
    chain = []
    for p in order:
      path = paths_lib.as_path(p)
      if path not in index and path + ("kernel",) in index:
        path = path + ("kernel",)
      if path not in index:
        raise ValueError(f"mlp_chain: order names {paths_lib.path_str(path)}, not a leaf.")
      chain.append(path)
  else:
    chain = _select(index, pred)
  if len(chain) < 2:
    raise ValueError(
      f"mlp_chain: kernels={pred!r} selects {len(chain)} leaves; a chain needs at least two."
    )
  between = _between_for(activation)
  found = [
    _dense_site(index, f"{_module(a)} -> {_module(b)}", a, b, between, "mlp_chain", pred)
    for a, b in zip(chain[:-1], chain[1:])
  ]
  why = f" (activation {activation!r} between the layers)" if between == "other" else ""
  return _finish("mlp_chain", found, group, why)


def conv_chain(
  params: chex.ArrayTree,
  kernels: Predicate | str | Callable | None = CONV_KERNELS,
  dense: Predicate | str | Callable | None = DENSE_KERNELS,
  norms: Predicate | str | Callable | None = BATCHNORM_SCALES,
  *,
  activation: Any = "relu",
  group: Any = None,
) -> sites_lib.Product:
  """The output channels of a chain of convolutions.

  Convolution ``i`` (kernel ``(H, W, in, C)``, natural path order) writes ``C``
  channels with its kernel's last axis and its bias; convolution ``i + 1``
  reads them on its input-channel axis (2). The last convolution is read by
  the first dense kernel after the flatten: a flatten of ``(h, w, C)`` puts
  channel ``c`` at rows ``c, c + C, ...``, so that reader is a slot on the
  kernel viewed as ``(h * w, C, out)`` (``Slot.reshape``), channel axis 1.
  Max and average pooling between the layers commute with positive rescaling.

  With BatchNorm after every convolution (``norms`` selects their gains), the
  channels after the norm are written by the norm's ``scale`` and ``bias``
  instead (the convolution itself is then covered by :func:`batchnorm_scale`).

  Args:
    params: the parameter pytree.
    kernels: selects the convolution kernels (default: 4-D leaves ``kernel``).
    dense: selects dense kernels; the first (natural order) reads the flatten.
    norms: selects BatchNorm gains (default: linen ``BatchNorm_i/scale`` and
      nnx ``norms/i/scale``); none found means no norms.
    activation: between the layers, as for :func:`mlp_chain`.
    group: override the group.

  Returns:
    A :class:`~teleport_jax.symmetries.Product`, one part per convolution that has a reader.
  """
  index = paths_lib.LeafIndex(params)
  kpred, dpred, npred = as_predicate(kernels), as_predicate(dense), as_predicate(norms)
  convs = _select(index, kpred)
  if not convs:
    raise _nothing("conv_chain", f"kernels={kpred!r}")
  for c in convs:
    if len(_shape(index, c)) != 4:
      raise ValueError(
        f"conv_chain: kernels={kpred!r} selects {paths_lib.path_str(c)} of shape "
        f"{_shape(index, c)}; expected (H, W, in, out)."
      )
  scales = _select(index, npred)
  if scales and len(scales) != len(convs):
    raise ValueError(
      f"conv_chain: norms={npred!r} selects {len(scales)} norms for {len(convs)} convolutions; "
      "expected one norm after every convolution or none."
    )
  denses = _select(index, dpred)
  between = _between_for(activation)
  found = []
  for i, conv in enumerate(convs):
    c = _shape(index, conv)[-1]
    if scales:
      writers = [scales[i]] + [b for b in [_sibling(index, scales[i], "bias")] if b]
      slots = [sites_lib.Slot(w, 0, "out") for w in writers]
      if _shape(index, scales[i]) != (c,):
        raise ValueError(
          f"conv_chain: norm {paths_lib.path_str(scales[i])} {_shape(index, scales[i])} does "
          f"not follow {paths_lib.path_str(conv)} with {c} channels."
        )
    else:
      slots = [sites_lib.Slot(conv, 3, "out")]
      bias = _sibling(index, conv, "bias")
      if bias is not None:
        slots.append(sites_lib.Slot(bias, 0, "out"))
    if i + 1 < len(convs):
      reader = convs[i + 1]
      if _shape(index, reader)[2] != c:
        raise ValueError(
          f"conv_chain: {paths_lib.path_str(reader)} {_shape(index, reader)} does not read the "
          f"{c} channels of {paths_lib.path_str(conv)}."
        )
      slots.append(sites_lib.Slot(reader, 2, "in"))
      name = f"{_module(conv)} -> {_module(reader)}"
    elif denses:
      reader = denses[0]
      rows, out = _shape(index, reader)
      if rows % c:
        raise ValueError(
          f"conv_chain: dense={dpred!r} selects {paths_lib.path_str(reader)} with {rows} rows, "
          f"not a flatten of {c} channels of {paths_lib.path_str(conv)}."
        )
      slots.append(sites_lib.Slot(reader, 1, "in", reshape=(rows // c, c, out)))
      name = f"{_module(conv)} -> flatten -> {_module(reader)}"
    else:
      continue
    found.append(sites_lib.Site(name, tuple(slots), c, None, between))
  if not found:
    raise ValueError(f"conv_chain: kernels={kpred!r}: no convolution is read by another layer.")
  why = f" (activation {activation!r} between the layers)" if between == "other" else ""
  return _finish("conv_chain", found, group, why)


def _stat(index, scale: Path, name: str) -> Path | None:
  """The running statistic ``name`` of the norm whose gain is at ``scale``."""
  p = _sibling(index, scale, name)  # nnx: stats next to the gain
  if p is not None:
    return p
  if scale and scale[0] == "params":  # linen: the batch_stats collection
    p = ("batch_stats",) + tuple(scale[1:-1]) + (name,)
    return p if p in index else None
  return None


def batchnorm_scale(
  params: chex.ArrayTree,
  kernels: Predicate | str | Callable | None = CONV_KERNELS,
  norms: Predicate | str | Callable | None = BATCHNORM_SCALES,
  *,
  mode: str = "train",
) -> sites_lib.Product:
  r"""Rescaling the channels a kernel writes into a BatchNorm.

  Kernel ``i`` (natural order; its last axis and its bias) feeds norm ``i``.

  * ``mode="train"``: a norm with batch statistics is invariant to a positive
    per-channel factor ``c`` on its input, so kernel and bias ``x c`` need no
    readers (``between="scale_invariant"``). The running statistics are left
    alone: eval-mode outputs change (they would need ``mean x c`` and
    ``var -> c^2 (var + eps) - eps``, which is not a linear action on a slot).
  * ``mode="eval"``: exact for running statistics instead: kernel, bias and
    the running ``mean`` are multiplied by ``c`` and the norm's gain divided
    by ``c`` (``gamma (c x - c mu) / (c sigma) ...``: with ``var`` fixed, the
    gain absorbs the factor). Train-mode outputs change (the gain is not
    cancelled there).

  Args:
    params: the parameter pytree (with linen's ``batch_stats`` collection or
      nnx's ``BatchStat`` leaves for ``mode="eval"``).
    kernels: selects the kernels feeding the norms (default: convolutions).
    norms: selects the norms' gains.
    mode: ``"train"`` or ``"eval"``.

  Returns:
    A :class:`~teleport_jax.symmetries.Product` of ``Scaling`` parts, one per norm.
  """
  if mode not in ("train", "eval"):
    raise ValueError(f"batchnorm_scale: mode must be 'train' or 'eval', got {mode!r}.")
  index = paths_lib.LeafIndex(params)
  kpred, npred = as_predicate(kernels), as_predicate(norms)
  ks, scales = _select(index, kpred), _select(index, npred)
  if not scales:
    raise _nothing("batchnorm_scale", f"norms={npred!r}")
  if len(ks) != len(scales):
    raise ValueError(
      f"batchnorm_scale: kernels={kpred!r} selects {len(ks)} kernels for {len(scales)} norms "
      f"(norms={npred!r}); expected one kernel feeding each norm."
    )
  found = []
  for k, s in zip(ks, scales):
    c = _shape(index, k)[-1]
    if _shape(index, s) != (c,):
      raise ValueError(
        f"batchnorm_scale: {paths_lib.path_str(k)} {_shape(index, k)} does not feed norm "
        f"{paths_lib.path_str(s)} {_shape(index, s)}."
      )
    slots = [sites_lib.Slot(k, len(_shape(index, k)) - 1, "out")]
    bias = _sibling(index, k, "bias")
    if bias is not None:
      slots.append(sites_lib.Slot(bias, 0, "out"))
    if mode == "train":
      name = f"{_module(k)} -> {_module(s)}"
      found.append(sites_lib.Site(name, tuple(slots), c, None, "scale_invariant"))
      continue
    mean = _stat(index, s, "mean")
    if mean is None:
      raise ValueError(
        f"batchnorm_scale: mode='eval' needs the running mean of {_module(s)}; params holds "
        "none (pass every collection: linen {'params', 'batch_stats'}, nnx Param and BatchStat)."
      )
    slots += [sites_lib.Slot(mean, 0, "out"), sites_lib.Slot(s, 0, "in")]
    found.append(
      sites_lib.Site(f"{_module(k)} -> {_module(s)} (eval)", tuple(slots), c, None, "homogeneous")
    )
  return _finish("batchnorm_scale", found, groups_lib.Scaling())


def attention_qk(
  params: chex.ArrayTree,
  *,
  query: str = "query",
  key: str = "key",
  where: Predicate | str | Callable | None = None,
  rotary: str | None = None,
) -> sites_lib.Product:
  r"""Queries and keys: ``W_Q A``, ``W_K A^{-T}`` per key/value head.

  Scores depend on ``q k^T`` only, so ``q -> q A`` with ``k -> k A^{-T}`` (a
  ``GL(d_head)`` element per head) keeps them. Kernels have flax's
  ``DenseGeneral`` shapes: ``query`` ``(d_model, heads, d_head)``, ``key``
  ``(d_model, kv_heads, d_head)``; biases ``(heads, d_head)`` move along.
  Under grouped-query attention (``kv_heads < heads``) the query heads of one
  key/value group share its element (``head_group = heads // kv_heads``).
  With rotary position embeddings only the ``2 x 2`` blocks ``a I + b J``
  commute with every position's rotation: ``RotaryGL``.

  Args:
    params: the parameter pytree.
    query, key: module names of the projections (paired when they share a
      parent module).
    where: restricts the query kernels considered (e.g.
      ``PathContains("blocks_0")``).
    rotary: ``"half"`` or ``"interleaved"`` when the model applies rotary
      embeddings to queries and keys with that channel pairing; ``None``
      otherwise.

  Returns:
    A :class:`~teleport_jax.symmetries.Product` with one part per attention layer;
    dimension ``kv_heads * d_head^2`` per layer (``kv_heads * d_head`` with
    rotary).
  """
  if rotary not in (None, "half", "interleaved"):
    raise ValueError(f"attention_qk: rotary must be None, 'half' or 'interleaved', got {rotary!r}.")
  index = paths_lib.LeafIndex(params)
  pred = as_predicate(where)
  found = []
  for q in _modules_named(index, query, pred):
    k = _partner(index, q, key)
    if k is None:
      continue
    qs, ks = _shape(index, q), _shape(index, k)
    if len(qs) != 3 or len(ks) != 3 or qs[0] != ks[0] or qs[2] != ks[2] or qs[1] % ks[1]:
      raise ValueError(
        f"attention_qk: {paths_lib.path_str(q)} {qs} and {paths_lib.path_str(k)} {ks} are not "
        "(d_model, heads, d_head) and (d_model, kv_heads, d_head) with kv_heads dividing heads."
      )
    group = qs[1] // ks[1]
    slots = [sites_lib.Slot(q, 2, "out", head_axis=1, head_group=group)]
    qb = _sibling(index, q, "bias")
    if qb is not None:
      slots.append(sites_lib.Slot(qb, 1, "out", head_axis=0, head_group=group))
    slots.append(sites_lib.Slot(k, 2, "in", head_axis=1))
    kb = _sibling(index, k, "bias")
    if kb is not None:
      slots.append(sites_lib.Slot(kb, 1, "in", head_axis=0))
    between = "bilinear" if rotary is None else "rotary"
    found.append(
      sites_lib.Site(f"{paths_lib.path_str(q[:-2])} q.k", tuple(slots), qs[2], ks[1], between)
    )
  if not found:
    raise _nothing(
      "attention_qk", f"'{query}/kernel' with a '{key}/kernel' beside it (where={pred!r})"
    )
  group = groups_lib.GL() if rotary is None else groups_lib.RotaryGL(rotary)
  return _finish("attention_qk", found, group)


def attention_vo(
  params: chex.ArrayTree,
  *,
  value: str = "value",
  out: str = "out",
  where: Predicate | str | Callable | None = None,
) -> sites_lib.Product:
  r"""Values and output projection: ``W_V B``, rows of ``W_O`` ``B^{-1}`` per head.

  Each head's output is a mix of its values over positions, linear in the
  values, so ``v -> v B`` with ``B^{-1}`` on the output projection's ``d_head``
  axis is exact for any position encoding. Kernels: ``value`` ``(d_model,
  kv_heads, d_head)`` (bias ``(kv_heads, d_head)``), ``out`` ``(heads, d_head,
  d_model)``; under grouped-query attention one ``B`` per key/value head.

  Args:
    params: the parameter pytree.
    value, out: module names (paired when they share a parent module).
    where: restricts the value kernels considered.

  Returns:
    A :class:`~teleport_jax.symmetries.Product` of ``GL(d_head)`` per head and layer;
    dimension ``kv_heads * d_head^2`` per layer.
  """
  index = paths_lib.LeafIndex(params)
  pred = as_predicate(where)
  found = []
  for v in _modules_named(index, value, pred):
    o = _partner(index, v, out)
    if o is None:
      continue
    vs, os_ = _shape(index, v), _shape(index, o)
    if len(vs) != 3 or len(os_) != 3 or vs[2] != os_[1] or os_[0] % vs[1]:
      raise ValueError(
        f"attention_vo: {paths_lib.path_str(v)} {vs} and {paths_lib.path_str(o)} {os_} are not "
        "(d_model, kv_heads, d_head) and (heads, d_head, d_model) with kv_heads dividing heads."
      )
    slots = [sites_lib.Slot(v, 2, "out", head_axis=1)]
    vb = _sibling(index, v, "bias")
    if vb is not None:
      slots.append(sites_lib.Slot(vb, 1, "out", head_axis=0))
    slots.append(sites_lib.Slot(o, 1, "in", head_axis=0, head_group=os_[0] // vs[1]))
    found.append(sites_lib.Site(f"{paths_lib.path_str(v[:-2])} v.o", tuple(slots), vs[2], vs[1]))
  if not found:
    raise _nothing(
      "attention_vo", f"'{value}/kernel' with an '{out}/kernel' beside it (where={pred!r})"
    )
  return _finish("attention_vo", found, groups_lib.GL())


def norm_into_dense(
  params: chex.ArrayTree,
  pairs: Sequence[tuple[str, str]] = NORM_READERS,
) -> sites_lib.Product:
  r"""A norm's gain and bias against the dense layers reading its output.

  ``y = gamma * xhat + beta`` is read only by dense layers (pre-norm, not
  added to the stream), so ``gamma, beta -> gamma s, beta s`` with the readers'
  input rows divided by ``s`` is exact. Only a diagonal factor is (a gain is
  elementwise), so the sites say ``between="homogeneous"`` and take
  ``Scaling``. A norm without a gain (gain-free RMSNorm) has no site here; a
  norm whose readers are not found (e.g. the final norm of a tied-embedding
  model, read by the token embedding) is skipped.

  Args:
    params: the parameter pytree.
    pairs: ``(norm module name, regular expression for the reader modules
      relative to the norm's parent module)``; default: ``norm1`` read by
      ``attn/(query|key|value)``, ``norm2`` by ``mlp/(up|gate)``, ``final_norm``
      by ``unembed``.

  Returns:
    A :class:`~teleport_jax.symmetries.Product` of ``Scaling`` parts, one per norm.
  """
  index = paths_lib.LeafIndex(params)
  found = []
  for norm, readers in pairs:
    pattern = re.compile(f"(?:{readers})/kernel")
    for scale in _modules_named(index, norm, Everything(), leaf="scale"):
      d = _shape(index, scale)
      if len(d) != 1:
        raise ValueError(f"norm_into_dense: {paths_lib.path_str(scale)} {d} is not a gain (d,).")
      scope = scale[:-2]
      slots = [sites_lib.Slot(scale, 0, "out")]
      bias = _sibling(index, scale, "bias")
      if bias is not None:
        slots.append(sites_lib.Slot(bias, 0, "out"))
      readers_found = []
      for p in index.paths:
        if p[: len(scope)] == scope and pattern.fullmatch(paths_lib.path_str(p[len(scope) :])):
          if _shape(index, p)[0] != d[0]:
            raise ValueError(
              f"norm_into_dense: {paths_lib.path_str(p)} {_shape(index, p)} does not read the "
              f"{d[0]} channels of {_module(scale)}."
            )
          readers_found.append(sites_lib.Slot(p, 0, "in"))
      if readers_found:
        name = f"{_module(scale)} -> {readers}"
        found.append(sites_lib.Site(name, tuple(slots + readers_found), d[0], None, "homogeneous"))
  if not found:
    names = ", ".join(f"{n!r} read by {r!r}" for n, r in pairs)
    raise ValueError(f"norm_into_dense: no norm gain with readers found for {names}.")
  return _finish("norm_into_dense", found, groups_lib.Scaling())


def residual_stream(
  params: chex.ArrayTree,
  writers: Predicate | str | Callable | None = STREAM_WRITERS,
  readers: Predicate | str | Callable | None = STREAM_READERS,
  *,
  between: str = "rms_norm",
  norms: Predicate | str | Callable | None = NORM_PARAMS,
  group: Any = None,
) -> sites_lib.Product:
  r"""One transformation ``R`` of the whole residual stream.

  Writers (embeddings, attention output and MLP down kernels and their
  biases; their last axis) become ``W R``; readers (kernels reading the
  normalised stream; their first axis) ``R^{-1} W``. Exact when everything the
  stream passes through commutes with ``R``:

  * ``between="rms_norm"``: every norm is a gain-free RMSNorm
    (``x / rms(x)``, rotation-invariant): ``R`` orthogonal. Refused when
    ``norms`` finds a norm gain or bias (fold gains into the readers first);
    a gain-free LayerNorm is not visible in ``params`` and is not
    rotation-equivariant, so say ``rms_norm`` only when it is true.
  * ``between="linear"``: no norms at all (the zoo's residual MLP): any
    invertible ``R`` (``GL``).

  With tied embeddings the token embedding is a writer, and the unembedding
  it also does (``h E^T``) moves consistently.

  Args:
    params: the parameter pytree.
    writers, readers: select the leaves (defaults fit the zoo's transformers
      and residual MLPs).
    between: ``"rms_norm"`` or ``"linear"``.
    norms: selects norm parameters that forbid ``"rms_norm"``.
    group: override the group (default ``Orthogonal`` / ``GL``).

  Returns:
    A :class:`~teleport_jax.symmetries.Product` with one part, over ``d_model``.
  """
  if between not in ("rms_norm", "linear"):
    raise ValueError(f"residual_stream: between must be 'rms_norm' or 'linear', got {between!r}.")
  index = paths_lib.LeafIndex(params)
  wpred, rpred, npred = as_predicate(writers), as_predicate(readers), as_predicate(norms)
  if between == "rms_norm":
    gains = _select(index, npred)
    if gains:
      raise ValueError(
        f"residual_stream: norm parameters at {paths_lib.path_str(gains[0])} (norms={npred!r}); "
        "the residual stream has an orthogonal symmetry only when every norm is a gain-free "
        "RMSNorm (fold the gains into the readers first)."
      )
  ws, rs = _select(index, wpred), _select(index, rpred)
  if not ws:
    raise _nothing("residual_stream", f"writers={wpred!r}")
  if not rs:
    raise _nothing("residual_stream", f"readers={rpred!r}")
  d = _shape(index, ws[0])[-1]
  slots = []
  for p in ws:
    s = _shape(index, p)
    if s[-1] != d:
      raise ValueError(
        f"residual_stream: writer {paths_lib.path_str(p)} {s} (writers={wpred!r}) does not end "
        f"in d_model={d}."
      )
    slots.append(sites_lib.Slot(p, len(s) - 1, "out"))
  for p in rs:
    s = _shape(index, p)
    if s[0] != d:
      raise ValueError(
        f"residual_stream: reader {paths_lib.path_str(p)} {s} (readers={rpred!r}) does not start "
        f"with d_model={d}."
      )
    slots.append(sites_lib.Slot(p, 0, "in"))
  site = sites_lib.Site("residual stream", tuple(slots), d, None, between)
  return _finish("residual_stream", [site], group)


def feed_forward(
  params: chex.ArrayTree,
  *,
  up: str = "up",
  down: str = "down",
  activation: Any = "relu",
  where: Predicate | str | Callable | None = None,
) -> sites_lib.Product:
  """The hidden channels of ``down(act(up(x)))`` blocks (transformer MLPs, residual blocks).

  Args:
    params: the parameter pytree.
    up, down: module names (paired when they share a parent module).
    activation: as for :func:`mlp_chain`.
    where: restricts the ``up`` kernels considered.

  Returns:
    A :class:`~teleport_jax.symmetries.Product`, one part per block.
  """
  index = paths_lib.LeafIndex(params)
  pred = as_predicate(where)
  between = _between_for(activation)
  found = []
  for u in _modules_named(index, up, pred):
    dn = _partner(index, u, down)
    if dn is None:
      continue
    name = f"{_module(u)} -> {_module(dn)}"
    found.append(_dense_site(index, name, u, dn, between, "feed_forward", pred))
  if not found:
    raise _nothing(
      "feed_forward", f"'{up}/kernel' with a '{down}/kernel' beside it (where={pred!r})"
    )
  why = f" (activation {activation!r} between the layers)" if between == "other" else ""
  return _finish("feed_forward", found, None, why)


def reglu(
  params: chex.ArrayTree,
  *,
  gate: str = "gate",
  up: str = "up",
  down: str = "down",
  branch: str = "value",
  activation: Any = "relu",
  where: Predicate | str | Callable | None = None,
) -> sites_lib.Product:
  r"""Gated MLPs ``down(act(gate(x)) * up(x))``: rescaling a branch.

  * ``branch="value"``: ``W_u[:, i] x s_i`` (and the bias), ``W_d[i, :] / s_i``.
    The product is linear in the value branch, so this holds for every gate
    activation (ReGLU, SwiGLU, GeGLU).
  * ``branch="gate"``: ``W_g[:, i] x s_i``, ``W_d[i, :] / s_i``; exact only
    when ``act`` is positively homogeneous (ReGLU); SwiGLU and GeGLU gates
    have no continuous symmetry and are refused.

  The two act on the same rows of ``W_d``, so they cannot be parts of one
  product; choose one per teleport.

  Args:
    params: the parameter pytree.
    gate, up, down: module names (grouped when they share a parent module).
    branch: ``"value"`` or ``"gate"``.
    activation: the gate's activation (for ``branch="gate"``).
    where: restricts the ``up`` kernels considered.

  Returns:
    A :class:`~teleport_jax.symmetries.Product` of ``Scaling`` parts, one per block.
  """
  if branch not in ("value", "gate"):
    raise ValueError(f"reglu: branch must be 'value' or 'gate', got {branch!r}.")
  index = paths_lib.LeafIndex(params)
  pred = as_predicate(where)
  between = "homogeneous" if branch == "value" else _between_for(activation)
  if between == "linear":
    between = "homogeneous"
  found = []
  for u in _modules_named(index, up, pred):
    g, dn = _partner(index, u, gate), _partner(index, u, down)
    if g is None or dn is None:
      continue
    writer = u if branch == "value" else g
    name = f"{_module(writer)} -> {_module(dn)}"
    found.append(_dense_site(index, name, writer, dn, between, "reglu", pred))
  if not found:
    raise _nothing(
      "reglu", f"'{up}/kernel' with '{gate}/kernel' and '{down}/kernel' beside it (where={pred!r})"
    )
  why = f" (gate activation {activation!r})" if between == "other" else ""
  return _finish("reglu", found, groups_lib.Scaling(), why)


def lora(
  params: chex.ArrayTree,
  *,
  a: str = "lora_a",
  b: str = "lora_b",
  where: Predicate | str | Callable | None = None,
) -> sites_lib.Product:
  r"""LoRA factors ``y = x W + x A B``: ``A -> A G``, ``B -> G^{-1} B``, ``G`` in ``GL(r)``.

  ``A`` ``(in, r)`` writes the rank-``r`` features (axis 1), ``B`` ``(r, out)``
  reads them (axis 0); ``x A G G^{-1} B = x A B`` always.

  Args:
    params: the parameter pytree.
    a, b: leaf names of the factors (paired when they share a module).
    where: restricts the ``a`` leaves considered.

  Returns:
    A :class:`~teleport_jax.symmetries.Product` of ``GL(r)`` parts, one per layer.
  """
  index = paths_lib.LeafIndex(params)
  pred = as_predicate(where)
  found = []
  for pa in sorted(
    (p for p, x in zip(index.paths, index.leaves) if p and p[-1] == a and pred(p, x)),
    key=_natural_key,
  ):
    pb = _sibling(index, pa, b)
    if pb is None:
      continue
    sa, sb = _shape(index, pa), _shape(index, pb)
    if len(sa) != 2 or len(sb) != 2 or sa[1] != sb[0]:
      raise ValueError(
        f"lora: {paths_lib.path_str(pa)} {sa} and {paths_lib.path_str(pb)} {sb} are not "
        "(in, r) and (r, out)."
      )
    slots = (sites_lib.Slot(pa, 1, "out"), sites_lib.Slot(pb, 0, "in"))
    found.append(sites_lib.Site(f"{_module(pa)} lora", slots, sa[1], None, "linear"))
  if not found:
    raise _nothing("lora", f"'{a}' with a '{b}' beside it (where={pred!r})")
  return _finish("lora", found, groups_lib.GL())


__all__ = [
  "All",
  "AnyOf",
  "BATCHNORM_SCALES",
  "CONV_KERNELS",
  "DENSE_KERNELS",
  "Everything",
  "NORM_PARAMS",
  "NORM_READERS",
  "Not",
  "OfNdim",
  "PathContains",
  "PathEndsWith",
  "PathMatches",
  "Predicate",
  "STREAM_READERS",
  "STREAM_WRITERS",
  "as_predicate",
  "attention_qk",
  "attention_vo",
  "batchnorm_scale",
  "conv_chain",
  "dimension",
  "feed_forward",
  "lora",
  "mlp_chain",
  "norm_into_dense",
  "reglu",
  "residual_stream",
  "sites",
]

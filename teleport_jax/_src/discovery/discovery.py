r"""Finding a model's continuous parameter symmetries from its own program.

:func:`find_symmetries` traces ``apply_fn`` with ``jax.make_jaxpr``, follows
every tensor axis through the program (:mod:`teleport_jax._src.discovery.labels`) to
find which parameter axes must move together and what may lie between them,
builds a :class:`~teleport_jax.symmetries.Site` and the largest group the path allows for
each candidate (``GL`` across linear paths and attention ``q k^T``/``V O``
pairs, rotations for a residual stream normalised by gain-free RMS norms,
``2 x 2`` rotary blocks, positive rescaling across ReLU, pooling, gates and
norm gains), and then **verifies every candidate numerically** on the example
inputs: the outputs must not change under a random element of moderate size,
and the output's directional derivative along random generators must vanish
relative to the output's sensitivity to the same leaves. A candidate that
fails is shrunk (GL to a diagonal) or dropped, and the report says so with
the measured errors; every parameter leaf left untouched is listed with the
reason. :func:`verify` runs the same check on a hand-written symmetry.

Examples:
  >>> import jax, teleport_jax as tj
  >>> from teleport_jax import models
  >>> from teleport_jax._src.discovery.discovery import find_symmetries
  >>> m = models.mlp((4, 8, 3), "relu")
  >>> sym = find_symmetries(m.apply, m.params, m.inputs)
  >>> sym.dimension, len(sym.sites)
  (8, 1)
  >>> g = sym.exp(sym.algebra_zeros(m.params))
  >>> new = tj.group_action(m.params, g, symmetry=sym)
"""

from __future__ import annotations

import dataclasses
import math
import time
import types
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from teleport_jax._src.core import paths as paths_lib
from teleport_jax._src.core import precision
from teleport_jax._src.core import tracing
from teleport_jax._src.discovery import labels as labels_lib
from teleport_jax._src.discovery import propagation as propagation_lib
from teleport_jax._src.symmetries import groups as groups_lib
from teleport_jax._src.symmetries import sites as sites_lib
from teleport_jax._src.symmetries import symmetry as sym_lib

Path = tuple[str, ...]
_LEAF_NAMES = frozenset({"kernel", "bias", "scale", "embedding", "weight", "w", "b"})
_DIRECTIONS = 2


# ------------------------------------------------------------------ records
@dataclasses.dataclass(frozen=True)
class SiteCheck:
  """The numerical check of one site (or one part of a declared symmetry).

  Attributes:
    name: the site's name.
    group: the group, as text (``"GL(4) x 2 heads"``).
    dimension: the group's dimension (free real parameters).
    output_error: largest relative change of the outputs under a random
      element of moderate size: ``max|f(g.w) - f(w)| / max|f(w)|``.
    first_order_error: largest ``|J t| / |J u|`` over random generators'
      tangents ``t``, with ``u`` a random direction of the same norm on the
      same leaves (``J``: the outputs' Jacobian; at the parameters and at a
      perturbed copy). About the rounding level for a symmetry, of order 0.1
      to 1 otherwise.
    ok: both errors within the tolerances.
    note: what lies between writers and readers, or why it failed.
  """

  name: str
  group: str
  dimension: int
  output_error: float
  first_order_error: float
  ok: bool
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Verification:
  """What :func:`verify` measured: one :class:`SiteCheck` per part.

  Attributes:
    checks: the parts' checks.
    output_tol: the tolerance on ``output_error``.
    first_order_tol: the tolerance on ``first_order_error``.
    dtype: the parameters' dtype name.
    check_dtype: the dtype the check computed in (float32 for bfloat16/float16
      parameters whose program can be evaluated wider: see :func:`tolerances`).
  """

  checks: tuple[SiteCheck, ...]
  output_tol: float
  first_order_tol: float
  dtype: str
  check_dtype: str = ""

  @property
  def ok(self) -> bool:
    return all(c.ok for c in self.checks)

  def __str__(self) -> str:
    head = (
      f"verify ({_dtype_text(self.dtype, self.check_dtype)}; tolerances: output "
      f"{self.output_tol:.0e}, first order "
      f"{self.first_order_tol:.0e})"
    )
    return head + "\n" + _table(self.checks)


def _dtype_text(dtype: str, check_dtype: str) -> str:
  if not check_dtype or check_dtype == dtype:
    return dtype
  return f"{dtype}, checked in {check_dtype}"


def _fmt(x: float) -> str:
  if x is None or not math.isfinite(x):
    return "  nan  " if x is None or math.isnan(x) else "  inf  "
  return f"{x:.1e}"


def _table(checks: Sequence[SiteCheck], ok_column: bool = True) -> str:
  rows = [("site", "group", "dim", "output err", "1st-order err") + (("ok",) if ok_column else ())]
  for c in checks:
    row = (c.name, c.group, str(c.dimension), _fmt(c.output_error), _fmt(c.first_order_error))
    rows.append(row + (("yes" if c.ok else "NO"),) if ok_column else row)
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = []
  for k, r in enumerate(rows):
    lines.append(
      "  "
      + "  ".join(
        v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))
      ).rstrip()
    )
    if k == 0:
      lines.append("  " + "  ".join("-" * w for w in widths))
  return "\n".join(lines)


# ----------------------------------------------------------------- Discovered
@dataclasses.dataclass(frozen=True, eq=False)
class Discovered(sites_lib.Product):
  """The symmetries :func:`find_symmetries` found and verified: a :class:`~teleport_jax.symmetries.Product`.

  Use it wherever a symmetry is accepted (:func:`teleport_jax.teleport`,
  :func:`teleport_jax.with_teleport`, :func:`teleport_jax.group_action`,
  :func:`teleport_jax.transport_state`); elements are tuples with one entry
  per site. ``str(d)`` (or :meth:`report`) is a table a person can read.

  Attributes:
    parts: one :class:`~teleport_jax.symmetries.SiteSymmetry` per verified site.
    checks: the verified sites' measurements (same order as ``parts``).
    rejected: candidates that failed verification, with their errors.
    untouched_leaves: ``(path, reason)`` for every parameter leaf no site moves.
    unsupported_primitives: ``(name, count)`` of primitives without a rule.
    joint_error: relative output change when every site acts at once.
    output_tol, first_order_tol: the verification tolerances.
    dtype: the parameters' dtype name.
    check_dtype: the dtype the numerical check computed in (float32 for
      bfloat16/float16 parameters whose program can be evaluated wider).
    timings: ``(phase, seconds)`` of the discovery: ``trace`` (``make_jaxpr`` and
      inlining), ``propagate`` (labels and candidates), ``verify`` (compiling the
      check and measuring every candidate), ``joint`` (all sites at once).
  """

  checks: tuple[SiteCheck, ...] = ()
  rejected: tuple[SiteCheck, ...] = ()
  untouched_leaves: tuple[tuple[str, str], ...] = ()
  unsupported_primitives: tuple[tuple[str, int], ...] = ()
  joint_error: float = 0.0
  output_tol: float = 0.0
  first_order_tol: float = 0.0
  dtype: str = "float32"
  check_dtype: str = ""
  timings: tuple[tuple[str, float], ...] = ()

  @property
  def sites(self) -> tuple[sites_lib.Site, ...]:
    """The sites, one per part."""
    return tuple(p.site for p in self.parts)

  @property
  def dimension(self) -> int:  # type: ignore[override]
    """The dimension of the whole group (free real parameters)."""
    return int(sum(p.dimension() for p in self.parts))

  @property
  def untouched(self) -> Mapping[str, str]:
    """``{leaf path: reason}`` for every parameter leaf that no site moves."""
    return types.MappingProxyType(dict(self.untouched_leaves))

  def bind(self, loss_fn, params, data=None):
    del loss_fn, params, data
    return self

  def report(self) -> str:
    """The discovery report: sites, groups, measured errors, untouched leaves."""
    lines = [
      f"find_symmetries: {len(self.parts)} sites, dimension {self.dimension} "
      f"({_dtype_text(self.dtype, self.check_dtype)}; "
      f"tolerances: output {self.output_tol:.0e}, first order {self.first_order_tol:.0e})"
    ]
    if self.checks:
      lines.append(_table(self.checks, ok_column=False))
      notes = [f"  {c.name}: {c.note}" for c in self.checks if c.note]
      if notes:
        lines.append("notes:")
        lines.extend(notes)
      lines.append(f"all sites at once: output error {_fmt(self.joint_error)}")
    else:
      lines.append("  (no continuous symmetry found)")
    if self.rejected:
      lines.append("rejected candidates (failed the numerical check):")
      for c in self.rejected:
        lines.append(
          f"  {c.name}: {c.group}: output error {_fmt(c.output_error)}, first order "
          f"{_fmt(c.first_order_error)}{'; ' + c.note if c.note else ''}"
        )
    if self.untouched_leaves:
      lines.append(f"untouched leaves ({len(self.untouched_leaves)}):")
      width = max(len(p) for p, _ in self.untouched_leaves)
      for p, r in self.untouched_leaves:
        lines.append(f"  {p.ljust(width)}  {r}")
    if self.unsupported_primitives:
      names = ", ".join(f"`{n}` ({k})" for n, k in self.unsupported_primitives)
      lines.append(f"unsupported primitives (their axes got no group): {names}")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.report()

  def __repr__(self) -> str:
    return f"Discovered({len(self.parts)} sites, dimension {self.dimension})"


jax.tree_util.register_static(Discovered)


# -------------------------------------------------------------- tolerances
def tolerances(dtype) -> tuple[float, float]:
  """``(output_tol, first_order_tol)`` for parameters of ``dtype``.

  Exact symmetries measure about ``1e-7`` (float32) and ``1e-15`` (float64)
  on small models; a non-symmetry measures ``1e-3`` to ``1``. In bfloat16 the
  rounding alone measures up to a few ``1e-2``, as large as a weak
  non-symmetry: bfloat16/float16 parameters are therefore checked on the
  same program evaluated in float32 (:func:`teleport_jax._src.core.tracing.widened`)
  with the float32 tolerances; the low-precision tolerances serve the
  programs that cannot be widened (loops, bit-level primitives).
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float64:
    return 1e-10, 1e-8
  if dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return 3e-2, 3e-2
  return 1e-4, 1e-3


# --------------------------------------------------------------- input checks
def _check_finite(tree, what: str) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or isinstance(leaf, jax.core.Tracer):
      continue
    try:
      inexact = jnp.issubdtype(dtype, jnp.inexact)
    except TypeError:
      continue
    if inexact and not bool(np.all(np.isfinite(np.asarray(leaf)))):
      where = jax.tree_util.keystr(tuple(path)) or "(root)"
      raise ValueError(
        f"{what} contain non-finite values at {where}; find_symmetries needs finite "
        "parameters and example inputs."
      )


def _check_args(apply_fn, params, args, kwargs) -> None:
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}.")
  leaves = jax.tree_util.tree_leaves(params)
  if not any(_is_float(x) for x in leaves):
    raise ValueError("params has no floating-point leaves: nothing could carry a symmetry.")
  if any(isinstance(x, jax.core.Tracer) for x in leaves + jax.tree_util.tree_leaves(args)):
    raise TypeError(
      "find_symmetries runs on concrete values: call it outside jax.jit and use the "
      "symmetry it returns inside."
    )
  _check_finite(params, "params")
  for i, a in enumerate(args):
    _check_finite(a, f"example input args[{i}]")
  for k, v in kwargs.items():
    _check_finite(v, f"example keyword input {k!r}")


def _is_float(x) -> bool:
  dtype = getattr(x, "dtype", None)
  try:
    return dtype is not None and bool(jnp.issubdtype(dtype, jnp.floating))
  except TypeError:
    return False


def _rng_hint(err: Exception) -> bool:
  text = f"{type(err).__name__} {err}".lower()
  return "rng" in text or "prng" in text or "random key" in text or "dropout" in text


def _trace(apply_fn, params, args, kwargs):
  def fn(p, *a):
    return apply_fn(p, *a, **kwargs)

  try:
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params, *args)
  except Exception as err:  # noqa: BLE001 - re-raised with a hint, or as is
    if _rng_hint(err):
      raise ValueError(
        "apply_fn needs a random key on the example inputs (e.g. dropout): pass it as a "
        "keyword argument exactly as for apply, e.g. "
        "find_symmetries(model.apply, params, x, rngs={'dropout': key}), or run the model "
        "deterministically (deterministic=True / train=False). The random draws are then "
        f"fixed and the symmetries found hold for any mask. ({type(err).__name__}: {err})"
      ) from err
    raise
  return closed, out_shape


# ------------------------------------------------------------------ candidates
@dataclasses.dataclass
class _Slot:
  pos: int
  path: Path
  view: tuple[int, ...]
  axis: int
  head_axis: int | None
  weight: int


@dataclasses.dataclass
class _Candidate:
  root: int
  slots: list[_Slot]
  dim: int
  heads: int | None
  head_inode: int | None
  inode: int
  groups: list[tuple[Any, str, list[_Slot], int]]  # (group, between, slots, dim)
  notes: list[str]
  name: str = ""


def _module(path: Path) -> str:
  names = list(path)
  if names and names[0] in ("params",):
    names = names[1:]
  if len(names) > 1 and names[-1] in _LEAF_NAMES | {"lora_a", "lora_b", "mean", "var"}:
    if names[-1] in _LEAF_NAMES:
      names = names[:-1]
  return "/".join(names) or "/".join(path)


def _modules(paths: Sequence[Path], limit: int = 3) -> str:
  mods = list(dict.fromkeys(_module(p) for p in paths))
  if len(mods) > limit:
    return ", ".join(mods[:limit]) + f" +{len(mods) - limit}"
  return ", ".join(mods)


class _Analysis:
  """Candidates and reasons read off a finished propagation."""

  def __init__(self, prop: propagation_lib.Propagation, paths: list[Path], used: set[int]):
    self.prop = prop
    self.L = prop.labels
    self.paths = paths
    self.used = used
    L = self.L
    # per parameter leaf: [(axis, factors)] after every split
    self.leaf_facs: dict[int, list[list[labels_lib.Fac]]] = {
      pos: [L.expand_all(a) for a in axes] for pos, axes in prop.param_facs.items()
    }
    self.members: dict[int, list[tuple[int, int, int, Any]]] = {}
    for pos, axes in self.leaf_facs.items():
      if pos not in used:
        continue
      for ax, facs in enumerate(axes):
        for k, f in enumerate(facs):
          for t, w in f.form:
            r, wr = L.tfind(t)
            self.members.setdefault(r, []).append((pos, ax, k, w * wr))
    self._cooccur = self._cooccurrence()

  # ----------------------------------------------------------- co-occurrence
  def _cooccurrence(self) -> tuple[dict[int, set[int]], dict[int, int]]:
    """Per live class: index classes present in every tensor it appears in; its polarity."""
    L = self.L
    cand: dict[int, set[int]] = {}
    polarity: dict[int, int] = {}
    states = sorted(self.prop.states.items())
    param_ids = set(self.prop.prog.invars)
    for var, st in states:
      if not st.floating:
        continue
      facs = [f for axis in st.axes for f in L.expand_all(axis)]
      inodes = {L.ifind(f.inode) for f in facs}
      for f in facs:
        for r, w in L.norm(f.form).items():
          own = inodes - {L.ifind(f.inode)}
          cand[r] = own if r not in cand else cand[r] & own
          if var not in param_ids and r not in polarity and abs(w) == 1:
            polarity[r] = 1 if w > 0 else -1
    return cand, polarity

  # --------------------------------------------------------------- candidates
  def candidates(self) -> tuple[list[_Candidate], dict[int, str]]:
    L = self.L
    cand_heads, polarity = self._cooccur
    out: list[_Candidate] = []
    skipped: dict[int, str] = {}
    for r, mem in self.members.items():
      if r in L.pinned or not L.allowed.get(r):
        continue
      by_leaf: dict[int, list] = {}
      for pos, ax, k, w in mem:
        by_leaf.setdefault(pos, []).append((ax, k, w))
      if any(len(v) > 1 for v in by_leaf.values()):
        skipped[r] = "the channel appears on two axes of one leaf"
        continue
      if any(abs(w) != 1 for v in by_leaf.values() for _, _, w in v):
        skipped[r] = "a leaf enters as a power of the channel's scale"
        continue
      sign = polarity.get(r, 1)
      inode = None
      slots = []
      heads_inode = self._head(r, cand_heads.get(r, set()), by_leaf)
      for pos, [(ax, k, w)] in sorted(by_leaf.items()):
        facs_flat = [f for axis in self.leaf_facs[pos] for f in axis]
        offset = sum(len(a) for a in self.leaf_facs[pos][:ax])
        chan = offset + k
        inode = L.ifind(facs_flat[chan].inode)
        head_axis = None
        if heads_inode is not None:
          head_axis = next(
            i for i, f in enumerate(facs_flat) if L.ifind(f.inode) == heads_inode and i != chan
          )
        view = tuple(L.size(f) for f in facs_flat)
        slots.append(_Slot(pos, self.paths[pos], view, chan, head_axis, 1 if w * sign > 0 else -1))
      dim = L.tsize[r]
      heads = L.isize[heads_inode] if heads_inode is not None else None
      c = _Candidate(r, slots, dim, heads, heads_inode, inode, [], [])
      c.name = self._name(slots)
      c.groups = self._groups(c)
      if c.groups:
        out.append(c)
    return self._dedupe(out), skipped

  def _head(self, r, cands: set[int], by_leaf) -> int | None:
    L = self.L
    if not cands:
      return None
    # a head index must be in every slot leaf (co-occurrence already says so) and be > 1
    best = max(cands, key=lambda i: (L.isize[i], -i))
    if L.isize[best] <= 1:
      return None
    del r, by_leaf
    return best

  def _name(self, slots: list[_Slot]) -> str:
    writers = [s.path for s in slots if s.weight > 0]
    readers = [s.path for s in slots if s.weight < 0]
    w = _modules(writers) if writers else "-"
    if not readers:
      return f"{w} (scale-invariant)"
    return f"{w} -> {_modules(readers)}"

  def _rotary(self, c: _Candidate) -> tuple[str, list[_Slot]] | None:
    """A rotary pairing if every slot leaf has a sliced pair factor next to the channel."""
    L = self.L
    side = None
    new_slots = []
    for s in c.slots:
      facs = [f for axis in self.leaf_facs[s.pos] for f in axis]
      found = None
      for d, pairing in ((-1, "half"), (1, "interleaved")):
        j = s.axis + d
        if 0 <= j < len(facs) and L.size(facs[j]) == 2 and facs[j].form:
          rj, _ = L.tfind(facs[j].form[0][0])
          if "sliced" in L.flags.get(rj, set()):
            found = (j, pairing)
            break
      if found is None:
        return None
      j, pairing = found
      if side not in (None, pairing):
        return None
      side = pairing
      lo = min(j, s.axis)
      view = s.view[:lo] + (2 * c.dim,) + s.view[lo + 2 :]
      head = s.head_axis
      if head is not None and head > lo:
        head -= 1
      new_slots.append(dataclasses.replace(s, view=view, axis=lo, head_axis=head))
    return side, new_slots

  def _groups(self, c: _Candidate):
    L = self.L
    allowed = L.allowed[c.root]
    flags = L.flags.get(c.root, set())
    has_readers = any(s.weight < 0 for s in c.slots)
    out = []
    between_gl = "bilinear" if "bilinear" in flags else "linear"
    if groups_lib.GL is not None and labels_lib.GL in allowed:
      out.append((groups_lib.GL(), between_gl, c.slots, c.dim))
    rot = self._rotary(c) if c.dim >= 1 else None
    if rot is not None:
      pairing, slots = rot
      between = "rotary" if "rotary" in sites_lib.BETWEEN else "bilinear"
      out.append((groups_lib.RotaryGL(pairing), between, slots, 2 * c.dim))
    if labels_lib.ORTHO in allowed and c.dim > 1:
      out.append((groups_lib.Orthogonal(), "rms_norm", c.slots, c.dim))
    if labels_lib.SCALING in allowed:
      if "homogeneous" in flags:
        between = "homogeneous"
      elif not has_readers:
        between = "scale_invariant"
      else:
        between = "linear"
      out.append((groups_lib.Scaling(), between, c.slots, c.dim))
    return out

  def _dedupe(self, cands: list[_Candidate]) -> list[_Candidate]:
    """Drops a diagonal class on the head axis of a per-head matrix site (already inside it)."""
    per_head = {}
    for c in cands:
      if c.heads is not None and any(not g.diagonal for g, *_ in c.groups):
        per_head.setdefault(c.head_inode, []).append(c)
    out = []
    for c in cands:
      owners = per_head.get(c.inode, [])
      leaves = {s.pos for s in c.slots}
      if all(g.diagonal for g, *_ in c.groups) and any(
        leaves <= {s.pos for s in o.slots} for o in owners
      ):
        continue
      out.append(c)
    return out

  # ------------------------------------------------------------------ reasons
  def _cause(self, r: int) -> int:
    L = self.L
    seen = set()
    while r in L.pinned and L.pinned[r].source is not None and r not in seen:
      seen.add(r)
      r = L.tfind(L.pinned[r].source)[0]
    return r

  def pin_reason(self, r: int) -> str:
    """Why class ``r`` is fixed, with the modules on both sides of the obstacle."""
    L = self.L
    cause = self._cause(r)
    reason = L.pinned[cause].reason
    if not hasattr(self, "_followers"):
      self._followers: dict[int, list[int]] = {}
      for r2 in self.members:
        if r2 in L.pinned:
          c = self._cause(r2)
          if c != r2:
            self._followers.setdefault(c, []).append(r2)
    writers = [self.paths[pos] for pos, *_ in self.members.get(cause, [])]
    followers = [
      self.paths[pos] for r2 in self._followers.get(cause, []) for pos, *_ in self.members[r2]
    ]
    if reason.startswith("nonlinear "):
      what = reason[len("nonlinear ") :]
      if writers and followers:
        return (
          f"{what} between {_modules(writers)} and {_modules(followers)}: no continuous symmetry"
        )
      return f"{what} after {_modules(writers or followers)}: no continuous symmetry"
    mods = list(dict.fromkeys(_module(p) for p in writers + followers))
    if len(mods) >= 3:
      return (
        f"{reason}; residual adds join the channels of {_modules(writers + followers)}, so one "
        "element would have to act on every writer of the stream"
      )
    return reason


def _unused_reason() -> str:
  return "not used by apply_fn's outputs (e.g. running statistics in train mode)"


# ------------------------------------------------------------- verification
class _Checker:
  """Measures output invariance for symmetries of one ``(apply_fn, params, inputs)``.

  One compiled function serves every measurement: ``(w, t) -> (f(w), J t)``
  (``jax.jvp`` of the floating outputs with respect to the floating leaves),
  so a discovery compiles the model once; the moves themselves are computed in
  NumPy.
  """

  def __init__(self, apply_fn, params, args, kwargs, *, seed: int = 0, closed=None, widened=None):
    if widened is not None:  # the program in float32: parameters and inputs cast up
      params, args = precision.upcast(params), precision.upcast(args)
    self.params = params
    self.index = paths_lib.LeafIndex(params)
    self.treedef = jax.tree_util.tree_structure(params)
    self.leaves = list(self.index.leaves)
    self.floats = [i for i, x in enumerate(self.leaves) if _is_float(x)]
    self.dtype = jnp.dtype(sites_lib.leaf_dtype(params))
    arg_leaves = jax.tree_util.tree_leaves(args)
    fixed = list(self.leaves)

    def outputs(float_leaves):
      leaves = list(fixed)
      for i, x in zip(self.floats, float_leaves):
        leaves[i] = x
      if widened is not None:
        return widened(*leaves, *arg_leaves)
      if closed is not None:  # the traced program: cheaper to re-trace than the model
        return jex_core.jaxpr_as_fun(closed)(*leaves, *arg_leaves)
      return apply_fn(jax.tree_util.tree_unflatten(self.treedef, leaves), *args, **kwargs)

    def flat_out(float_leaves):
      out = [jnp.ravel(x) for x in jax.tree_util.tree_leaves(outputs(float_leaves)) if _is_float(x)]
      if not out:
        raise ValueError("apply_fn returns no floating-point output to compare.")
      dtype = jnp.result_type(*out)
      return jnp.concatenate([x.astype(dtype) for x in out])

    self._jitted = jax.jit(lambda w, t: jax.jvp(flat_out, (w,), (t,)))
    self._compiled = None
    self.rng = np.random.default_rng(seed)
    self.zero = [np.zeros(np.shape(self.leaves[i]), _np_dtype(self.leaves[i])) for i in self.floats]
    self.out0 = self.forward(self.leaves)
    self.scale = float(np.max(np.abs(self.out0))) if self.out0.size else 0.0
    self.points = [self.leaves, self._perturb(5e-2)]

  def fj(self, leaves, tangent):
    """``(f(w), J t)`` for full leaf lists ``w`` and float tangents ``t``."""
    w = [leaves[i] for i in self.floats]
    if self._compiled is None:
      self._compiled = _compile(self._jitted, w, tangent)
    return self._compiled(w, tangent)

  def forward(self, leaves) -> np.ndarray:
    out, _ = self.fj(leaves, self.zero)
    return np.asarray(out)

  def _perturb(self, scale) -> list:
    leaves = [np.asarray(x) if _is_float(x) else x for x in self.leaves]
    rms = [
      float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
      for x in leaves
      if _is_float(x) and x.size
    ]
    floor = float(np.mean(rms)) if rms else 1.0
    out = []
    for x in leaves:
      if not _is_float(x) or not np.size(x):
        out.append(x)
        continue
      r = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
      noise = self.rng.standard_normal(x.shape) * (scale * max(r, floor))
      out.append((x.astype(np.float64) + noise).astype(x.dtype))
    return out

  def tree(self, leaves):
    return jax.tree_util.tree_unflatten(self.treedef, leaves)

  def output_error(self, sym: sym_lib.Symmetry, *, library: bool = False) -> float:
    """Relative output change under a random element (moderate size).

    Sites are moved in NumPy (the same maths as ``SiteSymmetry.act``, without
    compiling each slot's shapes); ``library=True`` uses ``sym.act`` itself.
    """
    parts = None
    if not library and isinstance(sym, sites_lib.SiteSymmetry):
      parts = [sym]
    elif not library and isinstance(sym, sites_lib.Product):
      if all(isinstance(q, sites_lib.SiteSymmetry) for q in sym.parts):
        parts = list(sym.parts)
    if parts is not None:
      leaves = [np.asarray(x) if _is_float(x) else x for x in self.leaves]
      for part in parts:
        xi = _random_algebra(part, self.params, self.rng)
        moved = _site_apply(part, leaves, self.index, xi)
        leaves = [m if m is not None else x for m, x in zip(moved, leaves)]
    else:
      # the library's own action, compiled once (eagerly every slot's shapes would compile)
      xi = _random_algebra(sym, self.params, self.rng)
      act = _compile(jax.jit(lambda p, x: sym.act(p, sym.retract(x))), self.params, xi)
      leaves = jax.tree_util.tree_leaves(act(self.params, xi))
    out = self.forward(leaves)
    if not np.all(np.isfinite(out)):
      return math.inf
    return float(np.max(np.abs(out - self.out0))) / max(self.scale, 1e-30)

  def _tangent_leaves(self, sym, point_leaves) -> list:
    point = self.tree(point_leaves)
    d = _random_algebra(sym, point, self.rng)
    if isinstance(sym, sites_lib.SiteSymmetry):
      return _site_tangent(sym, point_leaves, self.index, d)
    t = jax.tree_util.tree_leaves(_tangent(sym, point, d))
    return [np.asarray(x) if _is_float(x) else None for x in t]

  def _random_like(self, t_leaves) -> list:
    total_t = sum(float(np.sum(np.square(t, dtype=np.float64))) for t in t_leaves if t is not None)
    us = [
      None if t is None or not np.any(t) else self.rng.standard_normal(t.shape) for t in t_leaves
    ]
    total_u = sum(float(np.sum(np.square(u))) for u in us if u is not None)
    k = math.sqrt(total_t / total_u) if total_u > 0 else 0.0
    return [None if u is None else (u * k).astype(t.dtype) for u, t in zip(us, t_leaves)]

  def first_order(self, syms: Sequence[sym_lib.Symmetry]) -> list[tuple[float, bool]]:
    """Per symmetry: ``max |J t| / mean |J u|`` over the points where the outputs depend
    on the leaves, and whether there is such a point."""
    worst = [0.0] * len(syms)
    sensitive = [False] * len(syms)
    for point in self.points:
      for i, s in enumerate(syms):
        ts = [self._tangent_leaves(s, point) for _ in range(_DIRECTIONS)]
        u = self._random_like(ts[-1])
        jt = [self._jvp_norm(point, t) for t in ts]
        ju = self._jvp_norm(point, u)
        if not all(map(math.isfinite, jt + [ju])):
          worst[i] = math.inf
          continue
        if ju <= 1e-6 * max(self.scale, 1e-30):
          continue  # the outputs do not depend on these leaves at this point
        sensitive[i] = True
        worst[i] = max(worst[i], max(jt) / ju)
    return list(zip(worst, sensitive))

  def _jvp_norm(self, point, tangent_leaves) -> float:
    t = [
      tangent_leaves[i] if tangent_leaves[i] is not None else z
      for i, z in zip(self.floats, self.zero)
    ]
    _, res = self.fj(point, t)
    return float(np.linalg.norm(np.asarray(res, np.float64)))


def _checker(apply_fn, params, args, kwargs, closed, program=None, *, native=None) -> _Checker:
  """The numerical checker; for bfloat16/float16 parameters, on the program in float32.

  In bfloat16 an exact symmetry's measured errors (rounding of the moved
  parameters and of every operation) reach a few ``1e-2``, as large as a
  weak non-symmetry's, and drop a real site at random. The program traced
  from ``apply_fn`` is evaluated with every low-precision value in float32
  instead (same operations, float32 rounding): the check then separates
  symmetries from non-symmetries as in float32. Programs that cannot be
  widened (loops, bit-level primitives), or whose widened outputs disagree
  with the program's own beyond bfloat16 rounding, are checked as they run
  (on ``native``: the traced program, or ``None`` for ``apply_fn`` itself).
  """
  if jnp.dtype(sites_lib.leaf_dtype(params)) in tracing.LOW_PRECISION:
    program = tracing.inline(closed) if program is None else program
    if tracing.widenable(program):
      try:
        checker = _Checker(apply_fn, params, args, kwargs, widened=tracing.widened(program))
        leaves = jax.tree_util.tree_leaves((params, args))
        outs = _compile(jax.jit(jex_core.jaxpr_as_fun(closed)), *leaves)(*leaves)
        ref = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in outs if _is_float(x)])
        gap = float(np.max(np.abs(ref - checker.out0), initial=0.0))
        if np.all(np.isfinite(checker.out0)) and gap <= 0.25 * max(checker.scale, 1e-30):
          return checker
      except Exception:  # noqa: BLE001 - a primitive that does not take float32: as it runs
        pass
  return _Checker(apply_fn, params, args, kwargs, closed=native)


def _compile(jitted, *args):
  """Lowers and compiles, at a low optimisation level on CPU (compiling dominates there)."""
  lowered = jitted.lower(*args)
  if jax.default_backend() == "cpu":
    try:
      return lowered.compile({"xla_backend_optimization_level": 0})
    except Exception:  # noqa: BLE001 - an XLA without the option: compile as usual
      pass
  return lowered.compile()


def _np_dtype(x):
  dtype = getattr(x, "dtype", None)
  try:
    return np.dtype(dtype) if dtype is not None and _is_float(x) else np.dtype(dtype or float)
  except TypeError:
    return np.float32


def _tangent(sym, point, d):
  zeros = sym.algebra_zeros(point)
  flat, unravel = jax.flatten_util.ravel_pytree(zeros)
  dflat = jax.flatten_util.ravel_pytree(d)[0].astype(flat.dtype)
  return jax.jvp(lambda x: sym.act_linearized(point, unravel(x)), (flat,), (dflat,))[1]


def _wide(x) -> np.ndarray:
  """``x`` in float32 at least (NumPy's linear algebra has no bfloat16/float16)."""
  x = np.asarray(x)
  return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)


def _generator(group, d: np.ndarray) -> tuple[np.ndarray, bool]:
  """The derivative of the element's matrix at the identity along ``d``: ``(dM, diagonal)``."""
  d = _wide(d)
  if isinstance(group, groups_lib.Scaling):
    return d, True
  if isinstance(group, groups_lib.RotaryGL):
    return _rotary_matrix(d, group.pairing), False
  if isinstance(group, groups_lib.Orthogonal):
    return 0.5 * (d - np.swapaxes(d, -1, -2)), False
  if isinstance(group, groups_lib.GL):
    return d, False
  raise TypeError(type(group).__name__)


def _np_cayley(x: np.ndarray) -> np.ndarray:
  eye = np.eye(x.shape[-1], dtype=x.dtype)
  return np.linalg.solve(eye - 0.5 * x, eye + 0.5 * x)


def _element(group, xi: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
  """``(M, M^{-1}, diagonal)`` of ``retract(xi)`` in NumPy (diagonal: vectors)."""
  xi = _wide(xi)
  if isinstance(group, groups_lib.Scaling):
    return np.exp(xi), np.exp(-xi), True
  if isinstance(group, groups_lib.RotaryGL):
    r = np.exp(xi[..., 0])
    g = np.stack([r * np.cos(xi[..., 1]), r * np.sin(xi[..., 1])], axis=-1)
    m = _rotary_matrix(g, group.pairing)
    return m, np.linalg.inv(m), False
  if isinstance(group, groups_lib.Orthogonal):
    m = _np_cayley(0.5 * (xi - np.swapaxes(xi, -1, -2)))
    return m, np.swapaxes(m, -1, -2), False
  if isinstance(group, groups_lib.GL):
    m = _np_cayley(xi)
    return m, np.linalg.inv(m), False
  raise TypeError(type(group).__name__)


def _rotary_matrix(g: np.ndarray, pairing: str) -> np.ndarray:
  """``RotaryGL.matrix`` in NumPy: ``(..., d/2, 2)`` pairs ``(a, b)`` to ``(..., d, d)``."""
  a, b = g[..., 0], g[..., 1]
  half = a.shape[-1]
  m = np.zeros(a.shape[:-1] + (2 * half, 2 * half), g.dtype)
  idx = np.arange(half)
  if pairing == "half":
    i, j = idx, idx + half
  else:
    i, j = 2 * idx, 2 * idx + 1
  m[..., i, i] = a
  m[..., j, j] = a
  m[..., i, j] = b
  m[..., j, i] = -b
  return m


def _site_apply(sym: sites_lib.SiteSymmetry, leaves, index: paths_lib.LeafIndex, xi) -> list:
  """New leaves (``None``: unchanged) of ``act(params, retract(xi))``, in NumPy."""
  m, minv, diagonal = _element(sym.group, np.asarray(xi))
  if sym.site.heads is None:
    m, minv = m[None], minv[None]

  def move(y, role, head_group):
    mat = m if role == "out" else minv
    if head_group > 1:
      mat = np.repeat(mat, head_group, axis=0)
    y = _wide(y)
    mat = mat.astype(y.dtype)
    if diagonal:
      return y * mat
    if role == "out":
      return np.einsum("...hi,hij->...hj", y, mat)
    return np.einsum("...hj,hij->...hi", y, mat)

  return _per_slot(sym, leaves, index, move, accumulate=False)


def _site_tangent(sym: sites_lib.SiteSymmetry, leaves, index: paths_lib.LeafIndex, d) -> list:
  """``d/de act(params, retract(e d))`` at 0, leaf by leaf, in NumPy."""
  gen, diagonal = _generator(sym.group, np.asarray(d))
  if sym.site.heads is None:
    gen = gen[None]

  def move(y, role, head_group):
    g = np.repeat(gen, head_group, axis=0) if head_group > 1 else gen
    y = _wide(y)
    g = g.astype(y.dtype)
    if diagonal:
      return y * g if role == "out" else -y * g
    if role == "out":
      return np.einsum("...hi,hij->...hj", y, g)
    return -np.einsum("...hj,hij->...hi", y, g)

  return _per_slot(sym, leaves, index, move, accumulate=True)


def _per_slot(sym, leaves, index, fn, *, accumulate: bool) -> list:
  """Applies ``fn(y, role, head_group)`` to each slot's leaf viewed as ``(..., H, d)``."""
  out: list = [None] * len(leaves)
  for slot in sym.site.slots:
    k = index.index[slot.path]
    leaf = leaves[k] if (accumulate or out[k] is None) else out[k]
    x = leaf.reshape(slot.view_shape(leaf.shape)) if getattr(slot, "reshape", None) else leaf
    nd = x.ndim
    axis = slot.axis % nd
    if slot.head_axis is None:
      y = np.moveaxis(x, axis, -1)[..., None, :]
    else:
      y = np.moveaxis(x, (slot.head_axis % nd, axis), (-2, -1))
    t = fn(y, slot.role, slot.head_group)
    if slot.head_axis is None:
      t = np.moveaxis(t[..., 0, :], -1, axis)
    else:
      t = np.moveaxis(t, (-2, -1), (slot.head_axis % nd, axis))
    t = t.reshape(np.shape(leaf)).astype(leaf.dtype)
    out[k] = out[k] + t if (accumulate and out[k] is not None) else t
  return out


def _random_algebra(sym, params, rng: np.random.Generator):
  """A random algebra element of moderate size for ``sym`` (NumPy)."""
  if isinstance(sym, sites_lib.SiteSymmetry):
    g = sym.group
    leaf = paths_lib.LeafIndex(params).get(sym.site.slots[0].path)
    z = np.zeros(g.algebra_shape(sym.site.dim, sym.site.heads), _np_dtype(leaf))
    noise = rng.standard_normal(z.shape).astype(z.dtype)
    if isinstance(g, groups_lib.Scaling):
      return noise * np.asarray(0.4, z.dtype)
    if isinstance(g, groups_lib.RotaryGL):
      return noise * np.asarray([0.3, 1.0], z.dtype)
    if isinstance(g, groups_lib.GL):  # GL and Orthogonal
      return noise * np.asarray(0.6 / math.sqrt(z.shape[-1]), z.dtype)
    return noise * np.asarray(0.1, z.dtype)
  zeros = sym.algebra_zeros(params)
  leaves, treedef = jax.tree_util.tree_flatten(zeros)
  return jax.tree_util.tree_unflatten(
    treedef,
    [(0.1 * rng.standard_normal(np.shape(x))).astype(np.asarray(x).dtype) for x in leaves],
  )


def _group_text(group, dim: int, heads: int | None) -> str:
  name = {"scaling": "scaling", "GL": "GL", "O": "O", "rotary": "rotary"}.get(
    group.name, group.name
  )
  if isinstance(group, groups_lib.RotaryGL):
    name = f"rotary-{group.pairing}"
  text = f"{name}({dim})"
  return text if heads is None else f"{text} x {heads} heads"


def _describe_between(between: str, group) -> str:
  return {
    "linear": "linear path",
    "bilinear": "q k^T: a contragredient pair",
    "homogeneous": "positively homogeneous path (ReLU, pooling, gates)",
    "scale_invariant": "normalised away (batch statistics)",
    "rms_norm": "residual stream under gain-free RMS norms",
    "rotary": "rotary embeddings between q and k",
  }.get(between, between) + ("" if not isinstance(group, groups_lib.Orthogonal) else "")


def _site_symmetry(c: _Candidate, choice, leaves) -> sites_lib.SiteSymmetry:
  group, between, slots, dim = choice
  heads = None if isinstance(group, groups_lib.Orthogonal) else c.heads
  made = []
  for s in slots:
    shape = tuple(jnp.shape(leaves[s.pos]))
    reshape = None if s.view == shape else s.view
    made.append(
      sites_lib.Slot(
        s.path,
        axis=s.axis,
        role="out" if s.weight > 0 else "in",
        head_axis=s.head_axis if heads is not None else None,
        reshape=reshape,
      )
    )
  site = sites_lib.Site(c.name, tuple(made), dim=dim, heads=heads, between=between)
  return sites_lib.SiteSymmetry(site, group)


# ---------------------------------------------------------------------- API
def find_symmetries(apply_fn: Callable, params: chex.ArrayTree, *example_args, **example_kwargs):
  r"""Finds and verifies the continuous parameter symmetries of ``apply_fn``.

  Args:
    apply_fn: ``apply_fn(params, *example_args, **example_kwargs)``: a flax linen
      ``model.apply``, a pure function of an nnx state (``lambda state, x:
      nnx.merge(graphdef, state)(x)``) or any JAX function of a pytree. Every
      floating output must be unchanged by a symmetry.
    params: the parameter pytree (any floating dtype; integer leaves are
      left alone).
    *example_args: example inputs (a batch of the model's inputs).
    **example_kwargs: keyword arguments of ``apply_fn`` (e.g.
      ``rngs={"dropout": key}``, ``train=True``).

  Returns:
    A :class:`Discovered`: a :class:`~teleport_jax.symmetries.Product` of one
    :class:`~teleport_jax.symmetries.SiteSymmetry` per verified site, with a report
    (``str(d)``, ``d.sites``, ``d.dimension``, ``d.untouched``).

  Raises:
    ValueError: non-finite params or example inputs; a model that needs a
      random key that was not passed.
    TypeError: ``apply_fn`` not callable; traced (jit) arguments.
  """
  clock = [time.perf_counter()]
  timings: list[tuple[str, float]] = []

  def lap(phase: str) -> None:
    now = time.perf_counter()
    timings.append((phase, now - clock[0]))
    clock[0] = now

  _check_args(apply_fn, params, example_args, example_kwargs)
  closed, out_shape = _trace(apply_fn, params, example_args, example_kwargs)
  flat_params, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [paths_lib.normalize(p) for p, _ in flat_params]
  leaves = [x for _, x in flat_params]
  if len(set(paths)) != len(paths):
    raise ValueError("params: two leaves have the same path name; cannot address them.")
  out_names = [
    jax.tree_util.keystr(tuple(p)) or "(the output)"
    for p, _ in jax.tree_util.tree_flatten_with_path(out_shape)[0]
  ]
  program = tracing.inline(closed)
  lap("trace")
  n_params = len(leaves)
  prop = propagation_lib.propagate(program, range(n_params), out_names)
  used = _used_params(program, prop, n_params)
  analysis = _Analysis(prop, paths, used)
  cands, skipped = analysis.candidates()
  lap("propagate")

  dtype = sites_lib.leaf_dtype(params)
  checker = None
  check_dtype = jnp.dtype(dtype)
  if cands:
    checker = _checker(
      apply_fn, params, example_args, example_kwargs, closed, program, native=closed
    )
    check_dtype = checker.dtype
  out_tol, fo_tol = tolerances(check_dtype)

  accepted: list[tuple[_Candidate, sites_lib.SiteSymmetry, SiteCheck]] = []
  rejected: list[SiteCheck] = []
  pending = [(c, 0) for c in cands]
  while pending:
    syms = [_site_symmetry(c, c.groups[k], leaves) for c, k in pending]
    results = _measure(checker, syms, out_tol, fo_tol)
    nxt = []
    for (c, k), sym, check in zip(pending, syms, results):
      if check.ok:
        accepted.append((c, sym, check))
      else:
        rejected.append(check)
        if k + 1 < len(c.groups):
          nxt.append((c, k + 1))
    pending = nxt

  lap("verify")
  accepted.sort(key=lambda a: min(s.pos for s in a[0].slots))
  parts = [sym for _, sym, _ in accepted]
  checks = [chk for _, _, chk in accepted]
  joint = 0.0
  if parts:
    product = sites_lib.Product(tuple(parts))
    product.validate(params)  # the library's own shape checks of every slot and view
    joint = checker.output_error(product)
    while parts and not joint <= 10 * out_tol:
      worst = max(range(len(parts)), key=lambda i: checks[i].output_error)
      bad = checks.pop(worst)
      parts.pop(worst)
      rejected.append(dataclasses.replace(bad, ok=False, note="fails together with the others"))
      joint = checker.output_error(sites_lib.Product(tuple(parts))) if parts else 0.0

  lap("joint")
  rejected_final = [r for r in rejected if r.name not in {c.name for c in checks}]
  untouched = _untouched(analysis, parts, leaves, paths, used, skipped, rejected_final)
  return Discovered(
    tuple(parts),
    checks=tuple(checks),
    rejected=tuple(rejected_final),
    untouched_leaves=tuple(untouched),
    unsupported_primitives=tuple(sorted(prop.unsupported.items())),
    joint_error=float(joint),
    output_tol=out_tol,
    first_order_tol=fo_tol,
    dtype=jnp.dtype(dtype).name,
    check_dtype=check_dtype.name,
    timings=tuple(timings),
  )


def _used_params(program, prop, n_params: int) -> set[int]:
  live = prop._live() if hasattr(prop, "_live") else set(range(len(program.eqns)))
  used_vars = set()
  for k in live:
    for x in program.eqns[k].invars:
      if not isinstance(x, tracing.Const):
        used_vars.add(x)
  used_vars.update(x for x in program.outvars if not isinstance(x, tracing.Const))
  return {pos for pos in range(n_params) if program.invars[pos] in used_vars}


def _measure(checker: _Checker, syms, out_tol, fo_tol) -> list[SiteCheck]:
  if not syms:
    return []
  first = checker.first_order(syms)
  out = []
  for sym, (fo, sensitive) in zip(syms, first):
    err = checker.output_error(sym)
    site = getattr(sym, "site", None)
    name = site.name if site is not None else type(sym).__name__
    if site is not None:
      group = _group_text(sym.group, site.dim, site.heads)
      dim = sym.dimension()
      note = _describe_between(site.between, sym.group)
    else:
      group, dim, note = type(sym).__name__, -1, ""
    ok = err <= out_tol and fo <= fo_tol
    if not sensitive:
      ok = False
      note = "the outputs do not depend on these leaves (nothing to teleport)"
    out.append(SiteCheck(name, group, dim, float(err), float(fo), bool(ok), note))
  return out


def _untouched(analysis: _Analysis, parts, leaves, paths, used, skipped, rejected):
  L = analysis.L
  touched = {s.path for p in parts for s in p.site.slots}
  rejected_by_name = {}
  for r in rejected:
    rejected_by_name.setdefault(r.name, r)
  root_to_name = {}
  cands_roots = {}
  for r, mem in analysis.members.items():
    cands_roots[r] = mem
  del cands_roots
  out = []
  for pos, leaf in enumerate(leaves):
    path = paths[pos]
    if path in touched or not _is_float(leaf):
      continue
    name = paths_lib.path_str(path)
    if pos not in used:
      out.append((name, _unused_reason()))
      continue
    reasons = []
    for axis in analysis.leaf_facs.get(pos, []):
      for f in axis:
        for t, _ in f.form:
          r, _ = L.tfind(t)
          if r in L.pinned:
            reasons.append(analysis.pin_reason(r))
          elif r in skipped:
            reasons.append(skipped[r])
          else:
            slots_name = root_to_name.get(r)
            reasons.append(
              "its candidate site failed the numerical check"
              + (f" ({slots_name})" if slots_name else "")
            )
    reasons = list(dict.fromkeys(reasons)) or ["no axis of it carries a channel"]
    out.append((name, "; ".join(reasons)))
  return out


def verify(
  apply_fn: Callable,
  params: chex.ArrayTree,
  symmetry: sym_lib.Symmetry,
  *example_args,
  strict: bool = False,
  **example_kwargs,
) -> Verification:
  r"""Checks numerically that ``symmetry`` leaves ``apply_fn``'s outputs unchanged.

  The same check :func:`find_symmetries` runs on its candidates, part by part
  for a :class:`~teleport_jax.symmetries.Product`: the relative output change under a
  random element of moderate size, and the output's first-order change along
  random generators relative to a random move of the same leaves.

  Args:
    apply_fn: as for :func:`find_symmetries`.
    params: the parameter pytree.
    symmetry: a data-free symmetry (a :class:`~teleport_jax.symmetries.SiteSymmetry`, a
      :class:`~teleport_jax.symmetries.Product`, ...).
    *example_args: example inputs.
    strict: raise a ``ValueError`` naming every failing part.
    **example_kwargs: keyword arguments of ``apply_fn``.

  Returns:
    A :class:`Verification` (``str()`` gives a table).

  Raises:
    ValueError: with ``strict=True``, if a part is not a symmetry (the message
      names the site and the measured errors); for non-finite inputs.
    TypeError: for a symmetry that is not a ``teleport_jax`` symmetry or needs data.
  """
  if not isinstance(symmetry, sym_lib.Symmetry):
    raise TypeError(f"symmetry must be a teleport_jax symmetry, got {type(symmetry).__name__}.")
  if symmetry.needs_data:
    raise TypeError(
      f"verify checks data-free symmetries; {type(symmetry).__name__} depends on the batch."
    )
  _check_args(apply_fn, params, example_args, example_kwargs)
  closed, _ = _trace(apply_fn, params, example_args, example_kwargs)
  symmetry.validate(params)
  parts = symmetry.parts if isinstance(symmetry, sites_lib.Product) else (symmetry,)
  dtype = sites_lib.leaf_dtype(params)
  checker = _checker(apply_fn, params, example_args, example_kwargs, closed)
  out_tol, fo_tol = tolerances(checker.dtype)
  checks = tuple(_measure(checker, list(parts), out_tol, fo_tol))
  result = Verification(checks, out_tol, fo_tol, jnp.dtype(dtype).name, checker.dtype.name)
  if strict and not result.ok:
    bad = "; ".join(
      f"site {c.name!r} ({c.group}): relative output change {c.output_error:.2g} (tolerance "
      f"{out_tol:g}), first-order {c.first_order_error:.2g} (tolerance {fo_tol:g})"
      + (f" - {c.note}" if c.note and not c.ok and "depend" in c.note else "")
      for c in checks
      if not c.ok
    )
    raise ValueError(f"not a symmetry of apply_fn: {bad}.")
  return result


__all__ = ["Discovered", "SiteCheck", "Verification", "find_symmetries", "tolerances", "verify"]

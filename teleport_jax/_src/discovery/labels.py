r"""Labels on tensor axes: which parameter axes must move together, and how.

The engine behind :func:`teleport_jax.find_symmetries`. It reads a flat program
(:func:`teleport_jax._src.core.tracing.inline`) primitive by primitive and keeps, for
every axis of every tensor, a list of *factors* (an axis of size ``H * d``
reshaped into heads is the two factors ``H`` and ``d``). A factor has

* an **index class** (union-find without weights): factors that index the same
  channels (a kernel's output axis, the activation it writes, the next
  kernel's input axis, the heads of ``q`` and ``k`` ...). Index classes split
  when a reshape or a slice cuts them (heads appear there, and the flatten
  between a convolution and a dense layer);
* a **form**: which group elements act on it, as a sparse sum
  :math:`\sum_T w_T\,\log g_T` over *transformation classes* ``T``. Every axis
  of a parameter starts with its own class (weight 1); an activation starts
  with none (inputs are fixed). A class with weight ``+1`` moves by ``M``
  (a writer), weight ``-1`` by :math:`M^{-T}` (a reader). Elementwise products
  add forms, powers scale them; a form with several classes or a weight other
  than ``+-1`` only makes sense for diagonal elements.

Primitives then *equate* forms (adds, contractions: :math:`x M (M^{-1} W) =
x W`), *pin* classes to the identity (the model's output and inputs, a
nonlinearity, a mean over channels, an unsupported primitive) or *shrink* what
a class allows (``max(x, 0)``: positive diagonal; a sum of squares over the
axis, as in an RMS norm: rotations; ``x x^T``: rotations). Classes that end up
unpinned, with parameter axes in them, are the candidate sites; what they
allow is an upper bound that the numerical verification then checks.

This module holds the records (:class:`Pin`, :class:`Fac`, :class:`State`), the
classes (:class:`Labels`) and the primitive tables; the driver that walks the
program is :mod:`.propagation`, the per-primitive rules are in
:mod:`.rules_elementwise`, :mod:`.rules_contractions` and :mod:`.rules_structure`.

May import: nothing of ``teleport_jax`` (the other modules of this package import it).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence
from fractions import Fraction
from typing import Any
from typing import Protocol

import jax.numpy as jnp
import numpy as np

GL, ORTHO, SCALING = "gl", "o", "scaling"
ALL = frozenset({GL, ORTHO, SCALING})
DIAG = frozenset({SCALING})
ONE = Fraction(1)

# elementwise primitives with no continuous equivariance at all
NONLINEAR = {
  "exp": "exp",
  "exp2": "exp2",
  "expm1": "expm1",
  "log": "log",
  "log1p": "log1p",
  "tanh": "tanh (or the tanh-approximate GELU)",
  "logistic": "sigmoid (SiLU/swish, sigmoid gates)",
  "erf": "GELU (erf)",
  "erfc": "GELU (erfc)",
  "erf_inv": "erf_inv",
  "sin": "sin",
  "cos": "cos",
  "tan": "tan",
  "asin": "asin",
  "acos": "acos",
  "atan": "atan",
  "sinh": "sinh",
  "cosh": "cosh",
  "asinh": "asinh",
  "acosh": "acosh",
  "atanh": "atanh",
  "lgamma": "lgamma",
  "digamma": "digamma",
  "floor": "floor",
  "ceil": "ceil",
  "round": "round",
  "nextafter": "nextafter",
  "atan2": "atan2",
  "rem": "rem",
  "clamp": "clamp",
  "bitcast_convert_type": "bitcast",
  "population_count": "population_count",
  "reduce_prod": "a product over an axis",
  "cumprod": "cumprod",
  "cumlogsumexp": "cumlogsumexp",
}
POWERS = {"sqrt": Fraction(1, 2), "rsqrt": Fraction(-1, 2), "cbrt": Fraction(1, 3)}
IDENTITY = frozenset(
  {
    "neg",
    "copy",
    "copy_p",
    "stop_gradient",
    "reduce_precision",
    "device_put",
    "sharding_constraint",
    "mesh_cast",
    "reshard",
    "pvary",
    "real",
    "imag",
    "conj",
  }
)
VIEWS = IDENTITY | {"convert_element_type", "reshape", "transpose", "broadcast_in_dim", "squeeze"}
COMPARISONS = frozenset({"gt", "ge", "lt", "le", "eq", "ne"})
# primitives on ints/bools (keys, masks, indices): nothing to say unless a channel enters
INTEGER = frozenset(
  {
    "and",
    "or",
    "not",
    "xor",
    "shift_left",
    "shift_right_logical",
    "shift_right_arithmetic",
    "random_bits",
    "random_seed",
    "random_wrap",
    "random_unwrap",
    "random_fold_in",
    "random_split",
    "threefry2x32",
    "iota",
    "is_finite",
    "argsort",
  }
)


# --------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True)
class Pin:
  """Why a class is fixed to the identity.

  Attributes:
    reason: a sentence fragment (``"nonlinear tanh"``).
    source: the class whose pinning caused this one (a reader of dead
      channels points at the writer's class), or ``None``.
  """

  reason: str
  source: int | None = None


class Fac:
  """One factor of a tensor axis: index node, form ``((tnode, weight), ...)``,
  whether the tensor is constant along it, and the class that made it dead."""

  __slots__ = ("inode", "form", "bcast", "origin")

  def __init__(self, inode: int, form: tuple = (), bcast: bool = False, origin: int | None = None):
    self.inode = inode
    self.form = form
    self.bcast = bcast
    self.origin = origin


class State:
  """What is known about one variable: factors per axis and a few facts.

  Attributes:
    axes: per axis, its factors (an axis of size 1 has none).
    shape: the variable's shape.
    uniform: the value when every entry is the same constant, else ``None``.
    pending: classes squared elementwise and not yet used (a following sum
      over their axis is rotation invariant, anything else needs a diagonal).
    param: whether it depends on parameters and constants only.
  """

  __slots__ = ("axes", "shape", "uniform", "pending", "param", "floating")

  def __init__(self, axes, shape, uniform=None, pending=None, param=False, floating=True):
    self.axes = axes
    self.shape = tuple(shape)
    self.uniform = uniform
    self.pending = pending
    self.param = param
    self.floating = floating


class _Incompatible(Exception):
  """Two factorizations of one axis that no common refinement reconciles."""


def _floating(aval) -> bool:
  dtype = getattr(aval, "dtype", None)
  if dtype is None:
    return False
  try:
    # jnp's test: NumPy does not count bfloat16 (an ml_dtypes extension type) as inexact
    return bool(jnp.issubdtype(dtype, jnp.inexact))
  except TypeError:
    return False


def _shape(aval) -> tuple[int, ...]:
  return tuple(int(n) for n in getattr(aval, "shape", ()))


# ------------------------------------------------------------------- the graph
class Labels:
  """Index and transformation classes of one program, and the rules that join them."""

  def __init__(self):
    # index nodes: plain union-find with sizes and splits
    self.iparent: list[int] = []
    self.isize: list[int] = []
    self.isplit: dict[int, list[int]] = {}
    # transformation nodes: weighted union-find, value(x) = weight[x] * value(parent[x])
    self.tparent: list[int] = []
    self.tweight: list[Fraction] = []
    self.tsize: list[int] = []
    self.tsplit: dict[int, list[int]] = {}
    self.allowed: dict[int, frozenset] = {}
    self.pinned: dict[int, Pin] = {}
    self.notes: dict[int, list[str]] = {}
    self.flags: dict[int, set[str]] = {}
    self.nparam: dict[int, int] = {}

  # ---------------------------------------------------------------- index nodes
  def new_inode(self, size: int) -> int:
    self.iparent.append(len(self.iparent))
    self.isize.append(int(size))
    return len(self.iparent) - 1

  def ifind(self, x: int) -> int:
    root = x
    while self.iparent[root] != root:
      root = self.iparent[root]
    while self.iparent[x] != root:
      self.iparent[x], x = root, self.iparent[x]
    return root

  def iunion(self, a: int, b: int) -> None:
    ra, rb = self.ifind(a), self.ifind(b)
    if ra == rb:
      return
    if ra in self.isplit or rb in self.isplit:  # callers unify leaves only
      raise _Incompatible
    self.iparent[ra] = rb

  def _isplit(self, root: int, sizes: Sequence[int]) -> None:
    assert root not in self.isplit and math.prod(sizes) == self.isize[root]
    self.isplit[root] = [self.new_inode(s) for s in sizes]

  # ------------------------------------------------------- transformation nodes
  def new_tnode(self, size: int, *, param: bool = False) -> int:
    t = len(self.tparent)
    self.tparent.append(t)
    self.tweight.append(ONE)
    self.tsize.append(int(size))
    self.allowed[t] = ALL
    self.nparam[t] = int(param)
    return t

  def tfind(self, x: int) -> tuple[int, Fraction]:
    path = []
    while self.tparent[x] != x:
      path.append(x)
      x = self.tparent[x]
    root = x
    w = ONE
    for node in reversed(path):  # from the root's child down to the queried node
      w = self.tweight[node] * w
      self.tparent[node] = root
      self.tweight[node] = w
    return root, w

  def _tsplit(self, root: int, sizes: Sequence[int]) -> list[int]:
    if root in self.tsplit:
      kids = self.tsplit[root]
      if [self.tsize[k] for k in kids] != list(sizes):
        raise _Incompatible
      return kids
    kids = []
    for s in sizes:
      k = self.new_tnode(s)
      self.allowed[k] = self.allowed[root]
      self.nparam[k] = self.nparam[root]
      self.notes[k] = list(self.notes.get(root, []))
      self.flags[k] = set(self.flags.get(root, set()))
      if root in self.pinned:
        self.pinned[k] = self.pinned[root]
      kids.append(k)
    self.tsplit[root] = kids
    return kids

  def pin(self, t: int, reason: str, source: int | None = None) -> None:
    root, _ = self.tfind(t)
    if root in self.pinned:
      return
    if source is not None:
      source = self.tfind(source)[0]
      if source == root:
        source = None
    self.pinned[root] = Pin(reason, source)
    for k in self.tsplit.get(root, []):
      self.pin(k, reason, source)

  def constrain(self, t: int, allowed: frozenset, note: str, flag: str | None = None) -> None:
    root, _ = self.tfind(t)
    if flag:
      self.flags.setdefault(root, set()).add(flag)
    if root in self.pinned:
      return
    before = self.allowed[root]
    after = before & allowed
    if after != before:
      self.notes.setdefault(root, []).append(note)
    self.allowed[root] = after
    if not after:
      self.pin(root, "; ".join(dict.fromkeys(self.notes[root])) + " at once")

  def flag(self, t: int, flag: str) -> None:
    root, _ = self.tfind(t)
    self.flags.setdefault(root, set()).add(flag)

  def tunion(self, a: int, b: int, w: Fraction, note: str) -> None:
    """Requires ``value(a) == w * value(b)``."""
    ra, wa = self.tfind(a)
    rb, wb = self.tfind(b)
    if ra == rb:
      if wa == w * wb:
        return
      if wa == -w * wb and abs(wa) == 1:
        self.constrain(ra, frozenset({ORTHO}), "a channel contracted with its own copy (x x^T)")
      else:
        self.pin(
          ra,
          "nonlinear sum of different powers of one channel (e.g. x + c x^3 in the "
          "tanh-approximate GELU)",
        )
      return
    if ra in self.pinned or rb in self.pinned:
      if ra in self.pinned:
        self.pin(rb, self.pinned[ra].reason, source=ra)
      else:
        self.pin(ra, self.pinned[rb].reason, source=rb)
      return
    k = w * wb / wa
    self.tparent[ra] = rb
    self.tweight[ra] = k
    self.nparam[rb] += self.nparam[ra]
    self.flags.setdefault(rb, set()).update(self.flags.get(ra, set()))
    notes = self.notes.setdefault(rb, [])
    notes.extend(self.notes.get(ra, []))
    allowed = self.allowed[rb] & self.allowed[ra]
    if abs(k) != 1:
      allowed &= DIAG
      notes.append("enters as a power")
    self.allowed[rb] = allowed
    if not allowed:
      self.pin(rb, "; ".join(dict.fromkeys(notes)) + " at once")
    del note

  # ------------------------------------------------------------------- forms
  def norm(self, form) -> dict[int, Fraction]:
    """``{root: weight}`` of a form, without pinned classes and zero weights."""
    out: dict[int, Fraction] = {}
    for t, w in form:
      r, wr = self.tfind(t)
      if r in self.pinned:
        continue
      out[r] = out.get(r, 0) + w * wr
    return {r: w for r, w in out.items() if w != 0}

  def equate(self, fa, fb, reason: str, source: int | None = None) -> None:
    """Requires ``value(fa) == value(fb)`` (forms as ``((tnode, w), ...)``)."""
    na, nb = self.norm(fa), self.norm(fb)
    if not na and not nb:
      return
    if not na or not nb:
      # one side is fixed because its channels are: say why, and where from
      dead = self._dead_root(fa if not na else fb)
      if dead is not None:
        source = dead
        reason = self.pinned[dead].reason
    if len(na) == 1 and len(nb) == 1:
      (ra, wa), (rb, wb) = next(iter(na.items())), next(iter(nb.items()))
      self.tunion(ra, rb, wb / wa, reason)
      return
    diff = dict(na)
    for r, w in nb.items():
      diff[r] = diff.get(r, 0) - w
    diff = {r: w for r, w in diff.items() if w != 0}
    while len(diff) > 2:
      # an underdetermined relation between diagonal classes: fix the least useful one
      r = min(diff, key=self._pin_priority)
      self.pin(r, "tied to other channels by an elementwise product (kept one side)")
      diff.pop(r)
    if len(diff) == 1:
      ((r, _),) = diff.items()
      self.pin(r, reason, source)
    elif len(diff) == 2:
      (r1, w1), (r2, w2) = diff.items()
      self.tunion(r1, r2, -w2 / w1, reason)

  def _dead_root(self, form) -> int | None:
    for t, _ in form:
      r, _ = self.tfind(t)
      if r in self.pinned:
        return r
    return None

  def _pin_priority(self, r: int):
    flags = self.flags.get(r, set())
    return (
      "approx" not in flags,
      "homogeneous" not in flags,
      self.nparam.get(r, 0),
      -r,
    )

  def roots(self, form) -> list[int]:
    return list(self.norm(form))

  def constrain_form(self, form, allowed, note, flag=None) -> None:
    for r in self.roots(form):
      self.constrain(r, allowed, note, flag)

  def pin_form(self, form, reason, source=None) -> None:
    for r in self.roots(form):
      self.pin(r, reason, source)

  # ------------------------------------------------------------------ factors
  def fac(self, size: int, *, form=(), bcast=False, origin=None) -> Fac:
    return Fac(self.new_inode(size), form, bcast, origin)

  def expand(self, f: Fac) -> list[Fac]:
    """The factor's leaves after every split of its index class."""
    root = self.ifind(f.inode)
    kids = self.isplit.get(root)
    if kids is None:
      if root != f.inode:
        f = Fac(root, f.form, f.bcast, f.origin)
      return [f]
    sizes = [self.isize[k] for k in kids]
    forms: list[list] = [[] for _ in kids]
    for t, w in f.form:
      r, wr = self.tfind(t)
      if r in self.pinned:
        continue
      for k, c in enumerate(self._tsplit(r, sizes)):
        forms[k].append((c, w * wr))
    out = []
    for k, c in enumerate(kids):
      out.extend(self.expand(Fac(c, tuple(forms[k]), f.bcast, f.origin)))
    return out

  def expand_all(self, facs: Sequence[Fac]) -> list[Fac]:
    out = []
    for f in facs:
      out.extend(self.expand(f))
    return out

  def size(self, f: Fac) -> int:
    return self.isize[self.ifind(f.inode)]

  def _split_fac(self, f: Fac, first: int) -> None:
    root = self.ifind(f.inode)
    n = self.isize[root]
    if n % first:
      raise _Incompatible
    self._isplit(root, (first, n // first))

  def unify(self, la: Sequence[Fac], lb: Sequence[Fac]) -> tuple[list[Fac], list[Fac]]:
    """Refines two factorizations of one axis to a common one and joins their index classes."""
    for _ in range(64):
      a, b = self.expand_all(la), self.expand_all(lb)
      i = j = 0
      changed = False
      while i < len(a) and j < len(b):
        sa, sb = self.size(a[i]), self.size(b[j])
        if sa == sb:
          i, j = i + 1, j + 1
        elif sa > sb:
          self._split_fac(a[i], sb)
          changed = True
          break
        else:
          self._split_fac(b[j], sa)
          changed = True
          break
      if changed:
        continue
      if i != len(a) or j != len(b):
        raise _Incompatible
      for fa, fb in zip(a, b):
        self.iunion(fa.inode, fb.inode)
      return self.expand_all(a), self.expand_all(b)
    raise _Incompatible

  def regroup(self, facs: Sequence[Fac], sizes: Sequence[int]) -> list[list[Fac]]:
    """Cuts a row-major list of factors into consecutive groups of the given sizes."""
    queue = deque(self.expand_all(facs))
    out = []
    for n in sizes:
      group: list[Fac] = []
      prod = 1
      while prod < n:
        if not queue:
          raise _Incompatible
        f = queue.popleft()
        parts = self.expand(f)
        if len(parts) > 1:
          queue.extendleft(reversed(parts))
          continue
        s = self.size(f)
        if n % (prod * s) == 0:
          group.append(f)
          prod *= s
        else:
          need = n // prod
          if n % prod or s % need:
            raise _Incompatible
          self._split_fac(f, need)
          queue.extendleft(reversed(self.expand(f)))
      if prod != n:
        raise _Incompatible
      out.append(group)
    if queue:
      raise _Incompatible
    return out


def forms_add(*forms) -> tuple:
  out: list = []
  for f in forms:
    out.extend(f)
  return tuple(out)


def forms_scale(form, k: Fraction) -> tuple:
  return tuple((t, w * k) for t, w in form)


class _Aval:
  """A stand-in abstract value (shape only, floating)."""

  def __init__(self, shape):
    self.shape = tuple(shape)
    self.dtype = np.dtype(np.float32)


# ------------------------------------------------------------ what rules call
class Driver(Protocol):
  """What a rule may use of the driver (:class:`~.propagation.Propagation`).

  The rule modules take the driver as their first argument, ``prop``, and
  cannot import its module (it imports them); this is the part they call.

  Attributes:
    labels: the :class:`Labels` of the program.
  """

  labels: Labels

  def align(self, states: Sequence[State], out_shape: Sequence[int]) -> list: ...

  def pin_state(self, st: State, reason: str) -> None: ...

  def _all_facs(self, st: State) -> list[Fac]: ...

  def _origin(self, facs) -> int | None: ...

  def _consume_pending(self, st: State, keep_roots=()) -> None: ...

  def _identity(self, st: State, aval, neg=False) -> State: ...

  def _new(self, axes, aval, ins, uniform=None, pending=None) -> State: ...

  def _unsupported(
    self, name, ins, outs, *, quiet: bool, reason: str | None = None
  ) -> list[State]: ...


# a rule: (driver, equation, input states, output avals) -> one state per output
Rule = Callable[[Driver, Any, list[State], list], list[State]]

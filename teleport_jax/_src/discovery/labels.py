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
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Sequence
from fractions import Fraction

import jax.numpy as jnp
import numpy as np

from teleport_jax._src.core import tracing

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


# ---------------------------------------------------------------- propagation
class Propagation:
  """Runs the rules over a :class:`~teleport_jax._src.core.tracing.Program`.

  Attributes:
    labels: the :class:`Labels`.
    states: ``var id -> State`` of every live variable.
    param_facs: ``flat position -> per-axis factors`` of every floating parameter leaf.
    unsupported: names of primitives that had no rule.
  """

  def __init__(self, program: tracing.Program, param_positions: Sequence[int], output_names):
    self.prog = program
    self.labels = Labels()
    self.states: dict[int, State] = {}
    self.param_facs: dict[int, list[list[Fac]]] = {}
    self.unsupported: dict[str, int] = {}
    self._param_positions = set(param_positions)
    self._output_names = list(output_names)

  # ----------------------------------------------------------------- helpers
  def state(self, x) -> State:
    if isinstance(x, tracing.Const):
      return self._const_state(x.value, x.aval)
    return self.states[x]

  def _const_state(self, value, aval) -> State:
    shape = _shape(aval)
    arr = None
    try:
      arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - tokens, keys: no value to read
      arr = None
    uniform = None
    if arr is not None and arr.size and jnp.issubdtype(arr.dtype, jnp.number):
      first = arr.reshape(-1)[0]
      if np.all(arr == first) or (np.isnan(first) and np.all(np.isnan(arr))):
        uniform = float(first)
    L = self.labels
    axes = [[L.fac(n, bcast=uniform is not None)] if n > 1 else [] for n in shape]
    return State(axes, shape, uniform, param=True, floating=_floating(aval))

  def _fresh(self, aval, *, param=False, origin=None) -> State:
    L = self.labels
    shape = _shape(aval)
    axes = [[L.fac(n, origin=origin)] if n > 1 else [] for n in shape]
    return State(axes, shape, param=param, floating=_floating(aval))

  def _set(self, var: int, st: State) -> None:
    self.states[var] = st

  def _all_facs(self, st: State) -> list[Fac]:
    out = []
    for axis in st.axes:
      out.extend(self.labels.expand_all(axis))
    return out

  def _all_roots(self, st: State) -> list[int]:
    out = []
    for f in self._all_facs(st):
      out.extend(self.labels.roots(f.form))
    return out

  def pin_state(self, st: State, reason: str) -> None:
    for f in self._all_facs(st):
      self.labels.pin_form(f.form, reason)

  @staticmethod
  def _origin(facs) -> int | None:
    for f in facs:
      if f is not None and f.origin is not None:
        return f.origin
    return None

  def _consume_pending(self, st: State, keep_roots=()) -> None:
    if not st.pending:
      return
    for r in st.pending:
      if r not in keep_roots:
        self.labels.constrain(r, DIAG, "squared elementwise")
    st.pending = None

  # ---------------------------------------------------------------- aligning
  def align(self, states: Sequence[State], out_shape: Sequence[int]):
    """Per output axis: ``(out factors, [per input: factor or None])`` per position."""
    L = self.labels
    rank = len(out_shape)
    result = []
    for i, n in enumerate(out_shape):
      if n == 1:
        result.append([])
        continue
      lists = []
      for st in states:
        if len(st.shape) == rank and st.shape[i] == n and st.uniform is None:
          lists.append(st.axes[i])
        else:
          lists.append(None)
      present = [k for k, lst in enumerate(lists) if lst is not None]
      if not present:
        result.append([(L.fac(n, bcast=True), [None] * len(states))])
        continue
      base = L.expand_all(lists[present[0]])
      try:
        for k in present[1:]:
          base, other = L.unify(base, lists[k])
        expanded = {k: L.expand_all(lists[k]) for k in present}
      except _Incompatible:
        for k in present:
          for f in L.expand_all(lists[k]):
            L.pin_form(f.form, "incompatible reshapes of one axis")
        result.append([(L.fac(n), [None] * len(states))])
        continue
      m = len(expanded[present[0]])
      positions = []
      for p in range(m):
        per = [expanded[k][p] if k in expanded else None for k in range(len(states))]
        positions.append((expanded[present[0]][p], per))
      result.append(positions)
    return result

  # -------------------------------------------------------------------- run
  def run(self) -> None:
    prog = self.prog
    L = self.labels
    for pos, var in enumerate(prog.invars):
      aval = prog.avals[var]
      if pos in self._param_positions and _floating(aval):
        axes = []
        for n in _shape(aval):
          if n > 1:
            t = L.new_tnode(n, param=True)
            axes.append([Fac(L.new_inode(n), ((t, ONE),))])
          else:
            axes.append([])
        self.param_facs[pos] = axes
        self._set(var, State(axes, _shape(aval), param=True))
      else:
        self._set(var, self._fresh(aval, param=pos in self._param_positions))
    for var, value in prog.consts.items():
      self._set(var, self._const_state(value, prog.avals[var]))
    live = self._live()
    for k, eqn in enumerate(prog.eqns):
      if k not in live:
        continue
      ins = [self.state(x) for x in eqn.invars]
      outs = [prog.avals[v] for v in eqn.outvars]
      try:
        results = self.rule(eqn, ins, outs)
      except _Incompatible:
        results = None
      if results is None:
        results = self._unsupported(eqn.primitive, ins, outs, quiet=False)
      for v, st in zip(eqn.outvars, results):
        self._set(v, st)
    for name, x in zip(self._output_names, prog.outvars):
      if isinstance(x, tracing.Const):
        continue
      st = self.states[x]
      if not st.floating:
        continue
      self._consume_pending(st)
      self.pin_state(st, f"reaches the model output {name}")

  def _live(self) -> set[int]:
    prog = self.prog
    needed = {x for x in prog.outvars if not isinstance(x, tracing.Const)}
    live = set()
    for k in range(len(prog.eqns) - 1, -1, -1):
      eqn = prog.eqns[k]
      if any(v in needed for v in eqn.outvars):
        live.add(k)
        needed.update(x for x in eqn.invars if not isinstance(x, tracing.Const))
    return live

  def _unsupported(self, name, ins, outs, *, quiet: bool, reason: str | None = None):
    L = self.labels
    touched = False
    for st in ins:
      self._consume_pending(st)
      for f in self._all_facs(st):
        if L.roots(f.form):
          touched = True
          L.pin_form(f.form, reason or f"unsupported primitive `{name}`")
    if touched and not quiet and reason is None:
      self.unsupported[name] = self.unsupported.get(name, 0) + 1
    param = all(st.param for st in ins)
    return [self._fresh(a, param=param) for a in outs]

  # ------------------------------------------------------------------- rules
  def rule(self, eqn, ins: list[State], outs: list) -> list[State] | None:
    name = eqn.primitive
    p = eqn.params
    if name not in VIEWS and name != "reduce_sum":
      for st in ins:
        self._consume_pending(st)
    if name in IDENTITY or (name == "convert_element_type" and _floating(outs[0])):
      return [self._identity(ins[0], outs[0], neg=name == "neg")]
    if name == "optimization_barrier":
      return [self._identity(st, a) for st, a in zip(ins, outs)]
    if name == "convert_element_type":
      return self._unsupported(name, ins, outs, quiet=True, reason="converted to an integer type")
    if name in ("add", "sub", "add_any"):
      return [self._add(ins, outs[0], sub=name == "sub")]
    if name in ("mul", "div"):
      return [self._mul(eqn, ins, outs[0], div=name == "div")]
    if name in POWERS:
      return [self._power(ins[0], outs[0], POWERS[name])]
    if name == "square":
      return [self._power(ins[0], outs[0], Fraction(2), square=True)]
    if name == "integer_pow":
      y = int(p["y"])
      return [self._power(ins[0], outs[0], Fraction(y), square=y == 2)]
    if name == "pow":
      if ins[1].uniform is not None and math.isfinite(ins[1].uniform):
        return [self._power(ins[0], outs[0], Fraction(ins[1].uniform).limit_denominator(1000))]
      return [self._nonlinear("pow", ins, outs[0])]
    if name in ("abs", "sign"):
      return [self._homogeneous_unary(name, ins[0], outs[0])]
    if name in ("max", "min"):
      return [self._maxmin(name, ins, outs[0])]
    if name in COMPARISONS:
      return [self._compare(name, ins, outs[0])]
    if name == "select_n":
      return [self._select(ins, outs[0])]
    if name in NONLINEAR:
      return [self._nonlinear(name, ins, o) for o in outs]
    if name == "reduce_sum":
      return [self._reduce(ins[0], outs[0], p["axes"], kind="sum")]
    if name in ("reduce_max", "reduce_min"):
      return [self._reduce(ins[0], outs[0], p["axes"], kind="max")]
    if name in ("argmax", "argmin"):
      return [self._reduce(ins[0], outs[0], p["axes"], kind="arg")]
    if name in ("cumsum", "cummax", "cummin"):
      return [self._cumulative(name, ins[0], outs[0], p["axis"])]
    if name == "dot_general":
      return [self._dot(ins, outs[0], p["dimension_numbers"])]
    if name == "conv_general_dilated":
      return self._conv(ins, outs, p)
    if name in ("reduce_window_max", "reduce_window_min", "reduce_window_sum"):
      return [self._window(name, ins[0], outs[0], p)]
    if name == "reshape":
      return [self._reshape(ins[0], outs[0], p.get("dimensions"))]
    if name == "transpose":
      return [self._transpose(ins[0], outs[0], p["permutation"])]
    if name == "broadcast_in_dim":
      return [self._broadcast(ins[0], outs[0], p["shape"], p["broadcast_dimensions"])]
    if name == "squeeze":
      return [self._squeeze(ins[0], outs[0], p["dimensions"])]
    if name == "slice":
      return [self._slice(ins[0], outs[0], p["start_indices"], p["limit_indices"], p["strides"])]
    if name == "split":
      return self._split(ins[0], outs, p["axis"])
    if name == "concatenate":
      return [self._concat(ins, outs[0], p["dimension"], new_axis=False)]
    if name == "stack":
      return [self._concat(ins, outs[0], p["axis"], new_axis=True)]
    if name == "gather":
      return [self._gather(ins, outs[0], p)]
    if name == "dynamic_slice":
      return [self._dynamic_slice(ins[0], outs[0])]
    if name == "pad":
      return [self._pad(ins, outs[0], p["padding_config"])]
    if name == "rev":
      return [self._rev(ins[0], outs[0], p["dimensions"])]
    if name in INTEGER or not any(st.floating for st in ins):
      return self._unsupported(
        name, ins, outs, quiet=True, reason=f"unsupported primitive `{name}`"
      )
    return None

  # ---------------------------------------------------------------- elementwise
  def _identity(self, st: State, aval, neg=False) -> State:
    uniform = None if st.uniform is None else (-st.uniform if neg else st.uniform)
    return State(
      st.axes, _shape(aval), uniform, pending=st.pending, param=st.param, floating=_floating(aval)
    )

  def _new(self, axes, aval, ins, uniform=None, pending=None) -> State:
    return State(
      axes,
      _shape(aval),
      uniform,
      pending=pending,
      param=all(st.param for st in ins),
      floating=_floating(aval),
    )

  def _add(self, ins, aval, sub: bool = False) -> State:
    L = self.labels
    shape = _shape(aval)
    pos = self.align(ins, shape)
    zero = [st.uniform == 0 for st in ins]
    axes = []
    for positions in pos:
      axis = []
      for out, per in positions:
        present = [(f, st) for f, st, z in zip(per, ins, zero) if f is not None and not z]
        constants = [
          st for f, st, z in zip(per, ins, zero) if f is None and not z and not _scalar_zero(st)
        ]
        form = present[0][0].form if present else ()
        for f, _ in present[1:]:
          L.equate(form, f.form, "added to channels that move differently")
        for f, _ in present:
          if f.bcast:
            L.equate(form, (), "a constant is added (it does not move with the channels)")
        for st in constants:
          c = st.uniform
          nf = L.norm(form)
          if c is not None and 0 < c <= 1e-3 and nf and all(w == 2 for w in nf.values()):
            for r in nf:
              L.flag(r, "approx")
              L.notes.setdefault(r, []).append(f"an epsilon {c:g} added to a variance")
          else:
            L.pin_form(form, "a constant is added (the shift does not move with the channels)")
        bcast = all(f.bcast for f, _ in present) if present else True
        axis.append(Fac(out.inode, form, bcast, self._origin(per)))
      axes.append(axis)
    uniform = None
    if len(ins) == 2 and all(st.uniform is not None for st in ins):
      a, b = ins[0].uniform, ins[1].uniform
      uniform = a - b if sub else a + b
    return self._new(axes, aval, ins, uniform)

  def _mul(self, eqn, ins, aval, div=False) -> State:
    L = self.labels
    a, b = ins
    same = (
      not div and not isinstance(eqn.invars[0], tracing.Const) and eqn.invars[0] == eqn.invars[1]
    )
    if same:
      return self._power(a, aval, Fraction(2), square=True)
    shape = _shape(aval)
    pos = self.align(ins, shape)
    axes = []
    for positions in pos:
      axis = []
      for out, (fa, fb) in positions:
        forms = []
        if fa is not None:
          forms.append(fa.form)
        if fb is not None:
          forms.append(fb.form if not div else forms_scale(fb.form, Fraction(-1)))
        form = forms_add(*forms)
        if fa is not None and fb is not None and not fa.bcast and not fb.bcast:
          L.constrain_form(
            form,
            DIAG,
            "multiplied elementwise by a tensor that varies along the channels "
            "(a gain, gate, mask or position table)",
          )
        bcast = (fa is None or fa.bcast) and (fb is None or fb.bcast)
        axis.append(Fac(out.inode, form, bcast, self._origin((fa, fb))))
      axes.append(axis)
    uniform = None
    if a.uniform is not None and b.uniform is not None:
      uniform = a.uniform / b.uniform if div and b.uniform else a.uniform * b.uniform
    return self._new(axes, aval, ins, uniform)

  def _power(self, st: State, aval, k: Fraction, square: bool = False) -> State:
    L = self.labels
    axes = []
    pending = set()
    for axis in st.axes:
      new = []
      for f in L.expand_all(axis):
        form = forms_scale(f.form, k)
        if square:
          pending.update(L.roots(f.form))
        elif k != 1:
          L.constrain_form(f.form, DIAG, f"raised to the power {k}")
        new.append(Fac(f.inode, form, f.bcast, f.origin))
      axes.append(new)
    uniform = None
    if st.uniform is not None:
      try:
        uniform = float(st.uniform) ** float(k)
      except (OverflowError, ZeroDivisionError, ValueError):
        uniform = None
    return self._new(axes, aval, [st], uniform, pending=frozenset(pending) if pending else None)

  def _homogeneous_unary(self, name, st: State, aval) -> State:
    L = self.labels
    axes = []
    for axis in st.axes:
      new = []
      for f in L.expand_all(axis):
        L.constrain_form(f.form, DIAG, f"`{name}` (positively homogeneous)", "homogeneous")
        form = f.form if name == "abs" else ()
        new.append(Fac(f.inode, form, f.bcast, f.origin))
      axes.append(new)
    return self._new(axes, aval, [st])

  def _nonlinear(self, name, ins, aval) -> State:
    L = self.labels
    what = NONLINEAR.get(name, name)
    shape = _shape(aval)
    if len(shape) == 0 or any(len(st.shape) not in (0, len(shape)) for st in ins):
      return self._unsupported(name, ins, [aval], quiet=True, reason=f"nonlinear {what}")[0]
    pos = self.align(ins, shape)
    axes = []
    for positions in pos:
      axis = []
      for out, per in positions:
        origin = None
        for f in per:
          if f is None:
            continue
          for r in L.roots(f.form):
            L.pin(r, f"nonlinear {what}")
          if origin is None:
            origin = L._dead_root(f.form)
        if origin is None:
          origin = self._origin(per)
        bcast = all(f is None or f.bcast for f in per)
        axis.append(Fac(out.inode, (), bcast, origin))
      axes.append(axis)
    uniform = None
    if all(st.uniform is not None for st in ins):
      uniform = None  # values of constants through nonlinearities are not needed
    return self._new(axes, aval, ins, uniform)

  def _maxmin(self, name, ins, aval) -> State:
    L = self.labels
    a, b = ins
    if a.uniform is not None and b.uniform is None:
      a, b = b, a
    if b.uniform is not None and a.uniform is None:
      c = b.uniform
      neutral = (name == "max" and c == -math.inf) or (name == "min" and c == math.inf)
      if neutral:
        return self._identity(a, aval)
      for f in self._all_facs(a):
        if c == 0:
          L.constrain_form(
            f.form, DIAG, f"`{name}(x, 0)` (ReLU, positively homogeneous)", "homogeneous"
          )
        else:
          L.pin_form(f.form, f"clipped at the constant {c:g}")
      return self._identity(a, aval) if c == 0 else self._strip(a, aval)
    out = self._add(ins, aval)
    for f in self._all_facs(out):
      L.constrain_form(
        f.form, DIAG, f"`{name}` of two tensors (positively homogeneous)", "homogeneous"
      )
    return out

  def _strip(self, st: State, aval) -> State:
    L = self.labels
    axes = [[Fac(f.inode, (), f.bcast, f.origin) for f in L.expand_all(axis)] for axis in st.axes]
    return self._new(axes, aval, [st])

  def _compare(self, name, ins, aval) -> State:
    L = self.labels
    a, b = ins
    if a.uniform is not None and b.uniform is None:
      a, b = b, a
    if b.uniform is not None and a.uniform is None:
      for f in self._all_facs(a):
        if b.uniform == 0:
          L.constrain_form(f.form, DIAG, f"the sign test `{name}(x, 0)`", "homogeneous")
        else:
          L.pin_form(f.form, f"compared with the constant {b.uniform:g}")
      return self._strip(a, aval)
    out = self._add(ins, aval)
    for f in self._all_facs(out):
      L.constrain_form(f.form, DIAG, f"the comparison `{name}`", "homogeneous")
    return self._strip(out, aval)

  def _select(self, ins, aval) -> State:
    L = self.labels
    cases = ins[1:]
    shape = _shape(aval)
    pos = self.align(ins, shape)
    axes = []
    for positions in pos:
      axis = []
      for out, per in positions:
        fp, fcs = per[0], per[1:]
        present = [f for f, st in zip(fcs, cases) if f is not None and st.uniform != 0]
        consts = [
          st
          for f, st in zip(fcs, cases)
          if f is None and st.uniform is not None and st.uniform != 0
        ]
        form = present[0].form if present else ()
        for f in present[1:]:
          L.equate(form, f.form, "selected between channels that move differently")
        if consts:
          L.pin_form(form, "replaced by a constant where a mask is off")
        if fp is not None and not fp.bcast:
          L.constrain_form(form, DIAG, "selected elementwise by a mask (where, dropout)")
        bcast = all(f.bcast for f in present) if present else True
        axis.append(Fac(out.inode, form, bcast, self._origin(fcs)))
      axes.append(axis)
    return self._new(axes, aval, ins)

  # ----------------------------------------------------------------- reductions
  def _reduce(self, st: State, aval, axes_reduced, kind: str) -> State:
    L = self.labels
    pending = set(st.pending or ())
    reduced = set(int(a) for a in axes_reduced)
    squared_sum_roots = set()
    for i in reduced:
      for f in L.expand_all(st.axes[i]):
        for r in L.roots(f.form):
          if kind == "sum" and r in pending:
            squared_sum_roots.add(r)
            L.constrain(
              r, frozenset({ORTHO}), "a sum of squares over the channels (RMS norm)", "rms"
            )
          elif kind == "sum":
            L.pin(r, "a sum or mean over the channel axis (e.g. LayerNorm's mean subtraction)")
          else:
            L.pin(r, "a max or argmax over the channel axis")
    kept = [a for i, a in enumerate(st.axes) if i not in reduced]
    if pending:
      self._consume_pending(st, keep_roots=squared_sum_roots)
    axes = []
    for axis in kept:
      new = []
      for f in L.expand_all(axis):
        if kind != "sum":
          L.constrain_form(f.form, DIAG, "a max over another axis (pooling)", "homogeneous")
        form = () if kind == "arg" else f.form
        if kind == "sum" and squared_sum_roots:
          form = tuple((t, w) for t, w in form if L.tfind(t)[0] not in squared_sum_roots)
        new.append(Fac(f.inode, form, f.bcast, f.origin))
      axes.append(new)
    return self._new(axes, aval, [st])

  def _cumulative(self, name, st: State, aval, axis: int) -> State:
    L = self.labels
    for f in L.expand_all(st.axes[axis]):
      L.pin_form(f.form, f"a cumulative `{name}` along the channel axis")
    if name != "cumsum":
      for f in self._all_facs(st):
        L.constrain_form(f.form, DIAG, f"`{name}` (positively homogeneous)", "homogeneous")
    axes = [list(a) for a in st.axes]
    axes[axis] = [L.fac(st.shape[axis])] if st.shape[axis] > 1 else []
    return self._new(axes, aval, [st])

  # --------------------------------------------------------------- contractions
  def _pair(self, la, lb, reason, *, contract: bool):
    """Unifies two axes; contracted: forms must cancel; batch: forms add (elementwise)."""
    L = self.labels
    fa_list, fb_list = L.unify(la, lb)
    out = []
    for fa, fb in zip(fa_list, fb_list):
      if contract:
        source = fa.origin if not L.roots(fa.form) else fb.origin
        L.equate(fa.form, forms_scale(fb.form, Fraction(-1)), reason, source)
      else:
        form = forms_add(fa.form, fb.form)
        if not fa.bcast and not fb.bcast:
          L.constrain_form(form, DIAG, "a batch axis of a contraction (per-slice products)")
        out.append(Fac(fa.inode, form, fa.bcast and fb.bcast, fa.origin or fb.origin))
    return out

  def _dot(self, ins, aval, dimension_numbers) -> State:
    L = self.labels
    lhs, rhs = ins
    (lc, rc), (lb, rb) = dimension_numbers
    bilinear = not lhs.param and not rhs.param
    for i, j in zip(lc, rc):
      reason = self._contract_reason(lhs.axes[i], rhs.axes[j])
      self._pair(lhs.axes[i], rhs.axes[j], reason, contract=True)
      if bilinear:
        for f in L.expand_all(lhs.axes[i]) + L.expand_all(rhs.axes[j]):
          for r in L.roots(f.form):
            L.flag(r, "bilinear")
    axes = [self._pair(lhs.axes[i], rhs.axes[j], "", contract=False) for i, j in zip(lb, rb)]
    axes += [lhs.axes[i] for i in range(len(lhs.shape)) if i not in lc and i not in lb]
    axes += [rhs.axes[j] for j in range(len(rhs.shape)) if j not in rc and j not in rb]
    return self._new(axes, aval, ins)

  def _contract_reason(self, la, lb) -> str:
    L = self.labels
    a = any(L.roots(f.form) for f in L.expand_all(la))
    b = any(L.roots(f.form) for f in L.expand_all(lb))
    origin = self._origin(L.expand_all(la) + L.expand_all(lb))
    if a and b:
      return "contracted with channels that move differently"
    if origin is not None:
      return "reads channels that carry no symmetry"
    return "reads the model input or a fixed tensor (it cannot move)"

  def _conv(self, ins, outs, p) -> list[State]:
    L = self.labels
    if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
      return self._unsupported(
        "conv_general_dilated", ins, outs, quiet=True, reason="a grouped (depthwise) convolution"
      )
    lhs, rhs = ins
    dn = p["dimension_numbers"]
    lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    reason = self._contract_reason(lhs.axes[lspec[1]], rhs.axes[rspec[1]])
    self._pair(lhs.axes[lspec[1]], rhs.axes[rspec[1]], reason, contract=True)
    for i in list(lspec[2:]):
      for f in L.expand_all(lhs.axes[i]):
        L.pin_form(f.form, "a spatial axis of a convolution")
    for j in list(rspec[2:]):
      for f in L.expand_all(rhs.axes[j]):
        L.pin_form(f.form, "a convolution window")
    aval = outs[0]
    shape = _shape(aval)
    axes: list = [None] * len(shape)
    axes[ospec[0]] = lhs.axes[lspec[0]]
    axes[ospec[1]] = rhs.axes[rspec[0]]
    for k in ospec[2:]:
      axes[k] = [L.fac(shape[k])] if shape[k] > 1 else []
    return [self._new(axes, aval, ins)]

  def _window(self, name, st: State, aval, p) -> State:
    L = self.labels
    shape = _shape(aval)
    axes = []
    pads = p["padding"]
    for i, n in enumerate(shape):
      trivial = (
        p["window_dimensions"][i] == 1
        and p["window_strides"][i] == 1
        and tuple(pads[i]) == (0, 0)
        and p["base_dilation"][i] == 1
        and p["window_dilation"][i] == 1
      )
      if trivial:
        if name != "reduce_window_sum":
          for f in L.expand_all(st.axes[i]):
            L.constrain_form(f.form, DIAG, "max pooling (positively homogeneous)", "homogeneous")
        axes.append(st.axes[i])
      else:
        for f in L.expand_all(st.axes[i]):
          L.pin_form(f.form, "pooled over the channel axis")
        axes.append([L.fac(n)] if n > 1 else [])
    return self._new(axes, aval, [st])

  # ------------------------------------------------------------------ structure
  def _reshape(self, st: State, aval, dimensions) -> State:
    L = self.labels
    axes = st.axes if dimensions is None else [st.axes[d] for d in dimensions]
    shape = _shape(aval)
    flat = [f for axis in axes for f in axis]
    try:
      groups = L.regroup(flat, shape)
    except _Incompatible:
      for f in L.expand_all(flat):
        L.pin_form(f.form, "a reshape that mixes channels with other axes")
      return self._new([[L.fac(n)] if n > 1 else [] for n in shape], aval, [st], st.uniform)
    return State(
      groups, shape, st.uniform, pending=st.pending, param=st.param, floating=_floating(aval)
    )

  def _transpose(self, st: State, aval, perm) -> State:
    return State(
      [st.axes[i] for i in perm],
      _shape(aval),
      st.uniform,
      pending=st.pending,
      param=st.param,
      floating=_floating(aval),
    )

  def _broadcast(self, st: State, aval, shape, bdims) -> State:
    L = self.labels
    axes = []
    for j, n in enumerate(shape):
      if j in bdims:
        i = list(bdims).index(j)
        if st.shape[i] == n:
          axes.append(st.axes[i])
          continue
      axes.append([L.fac(n, bcast=True)] if n > 1 else [])
    return State(
      axes, tuple(shape), st.uniform, pending=st.pending, param=st.param, floating=_floating(aval)
    )

  def _squeeze(self, st: State, aval, dims) -> State:
    dims = {d % len(st.shape) for d in dims}
    axes = [a for i, a in enumerate(st.axes) if i not in dims]
    return State(
      axes, _shape(aval), st.uniform, pending=st.pending, param=st.param, floating=_floating(aval)
    )

  def _cut(self, axis_facs, n: int, start: int, limit: int, stride: int):
    """Factors of a slice ``[start:limit:stride]`` of an axis of size ``n``, or None."""
    L = self.labels
    m = len(range(start, limit, stride))
    if stride == 1 and m and n % m == 0 and start % m == 0 and limit - start == m:
      k = n // m
      major, minor = L.regroup(axis_facs, (k, m))
      for f in L.expand_all(major):
        for t, _ in f.form:
          L.flag(t, "sliced")
        L.pin_form(f.form, "sliced (one block of the axis is taken)")
      return minor
    if stride > 1 and n % stride == 0 and m == n // stride and start < stride:
      major, minor = L.regroup(axis_facs, (m, stride))
      for f in L.expand_all(minor):
        for t, _ in f.form:
          L.flag(t, "sliced")
        L.pin_form(f.form, "sliced (every k-th entry is taken)")
      return major
    return None

  def _slice(self, st: State, aval, start, limit, strides) -> State:
    L = self.labels
    shape = _shape(aval)
    axes = []
    for i, n in enumerate(st.shape):
      s, lim = int(start[i]), int(limit[i])
      stride = 1 if strides is None else int(strides[i])
      if (s, lim, stride) == (0, n, 1):
        axes.append(st.axes[i])
        continue
      live = any(L.roots(f.form) for f in L.expand_all(st.axes[i]))
      cut = None
      if live:
        try:
          cut = self._cut(st.axes[i], n, s, lim, stride)
        except _Incompatible:
          cut = None
      if cut is None:
        for f in L.expand_all(st.axes[i]):
          L.pin_form(f.form, "sliced along the channel axis")
        axes.append([L.fac(shape[i])] if shape[i] > 1 else [])
      else:
        axes.append(cut)
    return self._new(axes, aval, [st], st.uniform)

  def _split(self, st: State, outs, axis: int) -> list[State]:
    start = 0
    results = []
    for aval in outs:
      m = _shape(aval)[axis]
      lim = list(st.shape)
      begin = [0] * len(st.shape)
      begin[axis], lim[axis] = start, start + m
      results.append(self._slice(st, aval, begin, lim, None))
      start += m
    return results

  def _concat(self, ins, aval, dim: int, new_axis: bool) -> State:
    L = self.labels
    shape = _shape(aval)
    if new_axis:
      pieces = [
        State(
          st.axes[:dim] + [[]] + st.axes[dim:],
          st.shape[:dim] + (1,) + st.shape[dim:],
          st.uniform,
          param=st.param,
          floating=st.floating,
        )
        for st in ins
      ]
    else:
      pieces = list(ins)
    sizes = {st.shape[dim] for st in pieces}
    axes = []
    for i, n in enumerate(shape):
      if i != dim:
        others = [State([st.axes[i]], (st.shape[i],), st.uniform, param=st.param) for st in pieces]
        joined = self._add(others, _Aval((n,)))
        axes.append(joined.axes[0])
        continue
      if len(sizes) == 1:
        m = sizes.pop()
        others = [State([st.axes[i]], (m,), st.uniform, param=st.param) for st in pieces]
        joined = self._add(others, _Aval((m,)))
        k = len(pieces)
        lead = [L.fac(k)] if k > 1 else []
        axes.append(lead + joined.axes[0])
      else:
        for st in pieces:
          for f in L.expand_all(st.axes[i]):
            L.pin_form(f.form, "concatenated along the channel axis")
        axes.append([L.fac(n)] if n > 1 else [])
    return self._new(axes, aval, ins)

  def _gather(self, ins, aval, p) -> State:
    L = self.labels
    operand = ins[0]
    dn = p["dimension_numbers"]
    sizes = p["slice_sizes"]
    shape = _shape(aval)
    kept = []
    for i, n in enumerate(operand.shape):
      indexed = (
        i in dn.collapsed_slice_dims
        or i in dn.start_index_map
        or i in getattr(dn, "operand_batching_dims", ())
        or sizes[i] != n
      )
      if indexed:
        for f in L.expand_all(operand.axes[i]):
          L.pin_form(f.form, "indexed by a lookup (embedding rows, gather)")
          for t, _ in f.form:
            L.flag(t, "indexed")
        if i not in dn.collapsed_slice_dims and i not in getattr(dn, "operand_batching_dims", ()):
          kept.append(None)
      else:
        kept.append(operand.axes[i])
    axes: list = []
    it = iter(kept)
    for j, n in enumerate(shape):
      if j in dn.offset_dims:
        a = next(it, None)
        axes.append(a if a is not None else ([L.fac(n)] if n > 1 else []))
      else:
        axes.append([L.fac(n)] if n > 1 else [])
    for st in ins[1:]:
      self.pin_state(st, "used as gather indices")
    return self._new(axes, aval, ins)

  def _dynamic_slice(self, st: State, aval) -> State:
    L = self.labels
    shape = _shape(aval)
    axes = []
    for i, n in enumerate(shape):
      if n == st.shape[i]:
        axes.append(st.axes[i])
      else:
        for f in L.expand_all(st.axes[i]):
          L.pin_form(f.form, "sliced along the channel axis")
        axes.append([L.fac(n)] if n > 1 else [])
    return self._new(axes, aval, [st])

  def _pad(self, ins, aval, config) -> State:
    L = self.labels
    st, value = ins
    shape = _shape(aval)
    axes = []
    for i, (lo, hi, interior) in enumerate(config):
      if (lo, hi, interior) == (0, 0, 0):
        axes.append(st.axes[i])
        continue
      for f in L.expand_all(st.axes[i]):
        L.pin_form(f.form, "padded along the channel axis")
      axes.append([L.fac(shape[i])] if shape[i] > 1 else [])
    if value.uniform != 0:
      self.pin_state(st, "padded with a nonzero constant")
    return self._new(axes, aval, [st])

  def _rev(self, st: State, aval, dims) -> State:
    L = self.labels
    for i in dims:
      for f in L.expand_all(st.axes[i]):
        L.pin_form(f.form, "reversed along the channel axis")
    return self._identity(st, aval)


class _Aval:
  """A stand-in abstract value (shape only, floating)."""

  def __init__(self, shape):
    self.shape = tuple(shape)
    self.dtype = np.dtype(np.float32)


def _scalar_zero(st: State) -> bool:
  return st.uniform == 0


def propagate(program: tracing.Program, param_positions, output_names) -> Propagation:
  """Runs the label propagation; see :class:`Propagation`."""
  prop = Propagation(program, param_positions, output_names)
  prop.run()
  return prop

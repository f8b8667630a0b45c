"""The label propagation driver: runs the per-primitive rules over a flat program.

:class:`Propagation` gives every program input its :class:`~.labels.State`
(each floating parameter axis a transformation class of its own), walks the
live equations in order and hands each one to the rule that
:data:`RULES` names for its primitive; a primitive without a rule pins every
class it touches. Its helpers (:meth:`Propagation.align`, ``_new``,
``_identity``, ``_unsupported`` ...) are what the rules call back.
:func:`propagate` runs it.

The rules are in :mod:`.rules_elementwise`, :mod:`.rules_contractions` and
:mod:`.rules_structure`; the classes and states they update are in :mod:`.labels`.

May import: :mod:`.labels`, the ``rules_*`` modules, ``core``.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from teleport_jax._src.core import tracing
from teleport_jax._src.discovery import rules_contractions
from teleport_jax._src.discovery import rules_elementwise
from teleport_jax._src.discovery import rules_structure
from teleport_jax._src.discovery.labels import DIAG
from teleport_jax._src.discovery.labels import INTEGER
from teleport_jax._src.discovery.labels import ONE
from teleport_jax._src.discovery.labels import VIEWS
from teleport_jax._src.discovery.labels import Fac
from teleport_jax._src.discovery.labels import Labels
from teleport_jax._src.discovery.labels import State
from teleport_jax._src.discovery.labels import _floating
from teleport_jax._src.discovery.labels import _Incompatible
from teleport_jax._src.discovery.labels import _shape


def _merge(*tables: dict[str, Callable]) -> dict[str, Callable]:
  out: dict[str, Callable] = {}
  for table in tables:
    assert not set(out) & set(table), set(out) & set(table)
    out.update(table)
  return out


# primitive name -> rule(prop, eqn, ins, outs) -> list[State]
RULES: dict[str, Callable] = _merge(
  rules_elementwise.RULES, rules_contractions.RULES, rules_structure.RULES
)


class Propagation:
  """Runs the rules over a :class:`~teleport_jax._src.core.tracing.Program`.

  Attributes:
    labels: the :class:`~.labels.Labels`.
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
    """The state of a variable, or a fresh one for a literal constant."""
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
    """Pins every class on every axis of ``st``."""
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
    """Propagates the labels through the whole program, then pins the outputs."""
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
    """The output states of one equation, or ``None`` when no rule applies.

    Args:
      eqn: the equation (``primitive``, ``params``, ``invars``, ``outvars``).
      ins: the states of its inputs.
      outs: the abstract values of its outputs.

    Returns:
      One state per output; ``None`` for a primitive without a rule that
      touches floating values (the caller pins its inputs and counts it).
    """
    name = eqn.primitive
    if name not in VIEWS and name != "reduce_sum":
      for st in ins:
        self._consume_pending(st)
    rule = RULES.get(name)
    if rule is not None:
      return rule(self, eqn, ins, outs)
    if name in INTEGER or not any(st.floating for st in ins):
      return self._unsupported(
        name, ins, outs, quiet=True, reason=f"unsupported primitive `{name}`"
      )
    return None


def propagate(program: tracing.Program, param_positions, output_names) -> Propagation:
  """Runs the label propagation; see :class:`Propagation`.

  Args:
    program: the inlined program (:func:`teleport_jax._src.core.tracing.inline`).
    param_positions: the flat input positions that are parameter leaves.
    output_names: a name per program output, for the reasons of pinned classes.

  Returns:
    The :class:`Propagation` after :meth:`Propagation.run`.
  """
  prop = Propagation(program, param_positions, output_names)
  prop.run()
  return prop

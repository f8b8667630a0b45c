"""Rules for elementwise primitives: add/sub, mul/div, powers, abs/sign, max/min,
comparisons, select, the nonlinearities and the identity-like primitives.

Each rule is ``rule(prop, eqn, ins, outs) -> list[State]`` and :data:`RULES`
maps primitive names to them; :func:`add` is shared with
:mod:`.rules_structure` (concatenation joins its pieces like a sum).

May import: :mod:`.labels`, ``core``.
"""

from __future__ import annotations

import math
from fractions import Fraction

from teleport_jax._src.core import tracing
from teleport_jax._src.discovery.labels import COMPARISONS
from teleport_jax._src.discovery.labels import DIAG
from teleport_jax._src.discovery.labels import IDENTITY
from teleport_jax._src.discovery.labels import NONLINEAR
from teleport_jax._src.discovery.labels import POWERS
from teleport_jax._src.discovery.labels import Driver
from teleport_jax._src.discovery.labels import Fac
from teleport_jax._src.discovery.labels import Rule
from teleport_jax._src.discovery.labels import State
from teleport_jax._src.discovery.labels import _floating
from teleport_jax._src.discovery.labels import _shape
from teleport_jax._src.discovery.labels import forms_add
from teleport_jax._src.discovery.labels import forms_scale


def _scalar_zero(st: State) -> bool:
  return st.uniform == 0


# ------------------------------------------------------------------- helpers
def add(prop: Driver, ins, aval, sub: bool = False) -> State:
  """Adds states elementwise (``add``, ``sub``; also joins the pieces of a concatenation).

  Args:
    prop: the driver.
    ins: the states of the summands.
    aval: the abstract value of the sum.
    sub: whether the second summand is subtracted (for the uniform value only).

  Returns:
    The state of the sum: aligned factors whose forms are equated, a constant
    shift pins them (an epsilon added to a variance only marks them approximate).
  """
  L = prop.labels
  shape = _shape(aval)
  pos = prop.align(ins, shape)
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
      axis.append(Fac(out.inode, form, bcast, prop._origin(per)))
    axes.append(axis)
  uniform = None
  if len(ins) == 2 and all(st.uniform is not None for st in ins):
    a, b = ins[0].uniform, ins[1].uniform
    uniform = a - b if sub else a + b
  return prop._new(axes, aval, ins, uniform)


def _mul(prop: Driver, eqn, ins, aval, div=False) -> State:
  L = prop.labels
  a, b = ins
  same = not div and not isinstance(eqn.invars[0], tracing.Const) and eqn.invars[0] == eqn.invars[1]
  if same:
    return _power(prop, a, aval, Fraction(2), square=True)
  shape = _shape(aval)
  pos = prop.align(ins, shape)
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
      axis.append(Fac(out.inode, form, bcast, prop._origin((fa, fb))))
    axes.append(axis)
  uniform = None
  if a.uniform is not None and b.uniform is not None:
    uniform = a.uniform / b.uniform if div and b.uniform else a.uniform * b.uniform
  return prop._new(axes, aval, ins, uniform)


def _power(prop: Driver, st: State, aval, k: Fraction, square: bool = False) -> State:
  L = prop.labels
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
  return prop._new(axes, aval, [st], uniform, pending=frozenset(pending) if pending else None)


def _homogeneous_unary(prop: Driver, name, st: State, aval) -> State:
  L = prop.labels
  axes = []
  for axis in st.axes:
    new = []
    for f in L.expand_all(axis):
      L.constrain_form(f.form, DIAG, f"`{name}` (positively homogeneous)", "homogeneous")
      form = f.form if name == "abs" else ()
      new.append(Fac(f.inode, form, f.bcast, f.origin))
    axes.append(new)
  return prop._new(axes, aval, [st])


def _nonlinear(prop: Driver, name, ins, aval) -> State:
  L = prop.labels
  what = NONLINEAR.get(name, name)
  shape = _shape(aval)
  if len(shape) == 0 or any(len(st.shape) not in (0, len(shape)) for st in ins):
    return prop._unsupported(name, ins, [aval], quiet=True, reason=f"nonlinear {what}")[0]
  pos = prop.align(ins, shape)
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
        origin = prop._origin(per)
      bcast = all(f is None or f.bcast for f in per)
      axis.append(Fac(out.inode, (), bcast, origin))
    axes.append(axis)
  uniform = None
  if all(st.uniform is not None for st in ins):
    uniform = None  # values of constants through nonlinearities are not needed
  return prop._new(axes, aval, ins, uniform)


def _maxmin(prop: Driver, name, ins, aval) -> State:
  L = prop.labels
  a, b = ins
  if a.uniform is not None and b.uniform is None:
    a, b = b, a
  if b.uniform is not None and a.uniform is None:
    c = b.uniform
    neutral = (name == "max" and c == -math.inf) or (name == "min" and c == math.inf)
    if neutral:
      return prop._identity(a, aval)
    for f in prop._all_facs(a):
      if c == 0:
        L.constrain_form(
          f.form, DIAG, f"`{name}(x, 0)` (ReLU, positively homogeneous)", "homogeneous"
        )
      else:
        L.pin_form(f.form, f"clipped at the constant {c:g}")
    return prop._identity(a, aval) if c == 0 else _strip(prop, a, aval)
  out = add(prop, ins, aval)
  for f in prop._all_facs(out):
    L.constrain_form(
      f.form, DIAG, f"`{name}` of two tensors (positively homogeneous)", "homogeneous"
    )
  return out


def _strip(prop: Driver, st: State, aval) -> State:
  L = prop.labels
  axes = [[Fac(f.inode, (), f.bcast, f.origin) for f in L.expand_all(axis)] for axis in st.axes]
  return prop._new(axes, aval, [st])


def _compare(prop: Driver, name, ins, aval) -> State:
  L = prop.labels
  a, b = ins
  if a.uniform is not None and b.uniform is None:
    a, b = b, a
  if b.uniform is not None and a.uniform is None:
    for f in prop._all_facs(a):
      if b.uniform == 0:
        L.constrain_form(f.form, DIAG, f"the sign test `{name}(x, 0)`", "homogeneous")
      else:
        L.pin_form(f.form, f"compared with the constant {b.uniform:g}")
    return _strip(prop, a, aval)
  out = add(prop, ins, aval)
  for f in prop._all_facs(out):
    L.constrain_form(f.form, DIAG, f"the comparison `{name}`", "homogeneous")
  return _strip(prop, out, aval)


def _select(prop: Driver, ins, aval) -> State:
  L = prop.labels
  cases = ins[1:]
  shape = _shape(aval)
  pos = prop.align(ins, shape)
  axes = []
  for positions in pos:
    axis = []
    for out, per in positions:
      fp, fcs = per[0], per[1:]
      present = [f for f, st in zip(fcs, cases) if f is not None and st.uniform != 0]
      consts = [
        st for f, st in zip(fcs, cases) if f is None and st.uniform is not None and st.uniform != 0
      ]
      form = present[0].form if present else ()
      for f in present[1:]:
        L.equate(form, f.form, "selected between channels that move differently")
      if consts:
        L.pin_form(form, "replaced by a constant where a mask is off")
      if fp is not None and not fp.bcast:
        L.constrain_form(form, DIAG, "selected elementwise by a mask (where, dropout)")
      bcast = all(f.bcast for f in present) if present else True
      axis.append(Fac(out.inode, form, bcast, prop._origin(fcs)))
    axes.append(axis)
  return prop._new(axes, aval, ins)


# --------------------------------------------------------------------- rules
def _identity_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [prop._identity(ins[0], outs[0], neg=eqn.primitive == "neg")]


def _barrier_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [prop._identity(st, a) for st, a in zip(ins, outs)]


def _convert_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  if _floating(outs[0]):
    return [prop._identity(ins[0], outs[0])]
  return prop._unsupported(
    eqn.primitive, ins, outs, quiet=True, reason="converted to an integer type"
  )


def _add_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [add(prop, ins, outs[0], sub=eqn.primitive == "sub")]


def _mul_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_mul(prop, eqn, ins, outs[0], div=eqn.primitive == "div")]


def _root_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_power(prop, ins[0], outs[0], POWERS[eqn.primitive])]


def _square_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_power(prop, ins[0], outs[0], Fraction(2), square=True)]


def _integer_pow_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  y = int(eqn.params["y"])
  return [_power(prop, ins[0], outs[0], Fraction(y), square=y == 2)]


def _pow_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  if ins[1].uniform is not None and math.isfinite(ins[1].uniform):
    return [_power(prop, ins[0], outs[0], Fraction(ins[1].uniform).limit_denominator(1000))]
  return [_nonlinear(prop, "pow", ins, outs[0])]


def _homogeneous_unary_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_homogeneous_unary(prop, eqn.primitive, ins[0], outs[0])]


def _maxmin_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_maxmin(prop, eqn.primitive, ins, outs[0])]


def _compare_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_compare(prop, eqn.primitive, ins, outs[0])]


def _select_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_select(prop, ins, outs[0])]


def _nonlinear_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_nonlinear(prop, eqn.primitive, ins, o) for o in outs]


# primitive name -> rule
RULES: dict[str, Rule] = {
  **dict.fromkeys(IDENTITY, _identity_rule),
  "optimization_barrier": _barrier_rule,
  "convert_element_type": _convert_rule,
  **dict.fromkeys(("add", "sub", "add_any"), _add_rule),
  **dict.fromkeys(("mul", "div"), _mul_rule),
  **dict.fromkeys(POWERS, _root_rule),
  "square": _square_rule,
  "integer_pow": _integer_pow_rule,
  "pow": _pow_rule,
  **dict.fromkeys(("abs", "sign"), _homogeneous_unary_rule),
  **dict.fromkeys(("max", "min"), _maxmin_rule),
  **dict.fromkeys(COMPARISONS, _compare_rule),
  "select_n": _select_rule,
  **dict.fromkeys(NONLINEAR, _nonlinear_rule),
}

"""Rules for reductions and contractions: ``reduce_*``/``arg*``, cumulative
scans, ``dot_general``, ``conv_general_dilated`` and ``reduce_window_*``.

Each rule is ``rule(prop, eqn, ins, outs) -> list[State]`` and :data:`RULES`
maps primitive names to them.

May import: :mod:`.labels`.
"""

from __future__ import annotations

from fractions import Fraction

from teleport_jax._src.discovery.labels import DIAG
from teleport_jax._src.discovery.labels import ORTHO
from teleport_jax._src.discovery.labels import Driver
from teleport_jax._src.discovery.labels import Fac
from teleport_jax._src.discovery.labels import Rule
from teleport_jax._src.discovery.labels import State
from teleport_jax._src.discovery.labels import _shape
from teleport_jax._src.discovery.labels import forms_add
from teleport_jax._src.discovery.labels import forms_scale


# ------------------------------------------------------------------- helpers
def _reduce(prop: Driver, st: State, aval, axes_reduced, kind: str) -> State:
  L = prop.labels
  pending = set(st.pending or ())
  reduced = set(int(a) for a in axes_reduced)
  squared_sum_roots = set()
  for i in reduced:
    for f in L.expand_all(st.axes[i]):
      for r in L.roots(f.form):
        if kind == "sum" and r in pending:
          squared_sum_roots.add(r)
          L.constrain(r, frozenset({ORTHO}), "a sum of squares over the channels (RMS norm)", "rms")
        elif kind == "sum":
          L.pin(r, "a sum or mean over the channel axis (e.g. LayerNorm's mean subtraction)")
        else:
          L.pin(r, "a max or argmax over the channel axis")
  kept = [a for i, a in enumerate(st.axes) if i not in reduced]
  if pending:
    prop._consume_pending(st, keep_roots=squared_sum_roots)
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
  return prop._new(axes, aval, [st])


def _cumulative(prop: Driver, name, st: State, aval, axis: int) -> State:
  L = prop.labels
  for f in L.expand_all(st.axes[axis]):
    L.pin_form(f.form, f"a cumulative `{name}` along the channel axis")
  if name != "cumsum":
    for f in prop._all_facs(st):
      L.constrain_form(f.form, DIAG, f"`{name}` (positively homogeneous)", "homogeneous")
  axes = [list(a) for a in st.axes]
  axes[axis] = [L.fac(st.shape[axis])] if st.shape[axis] > 1 else []
  return prop._new(axes, aval, [st])


def _pair(prop: Driver, la, lb, reason, *, contract: bool):
  """Unifies two axes; contracted: forms must cancel; batch: forms add (elementwise)."""
  L = prop.labels
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


def _dot(prop: Driver, ins, aval, dimension_numbers) -> State:
  L = prop.labels
  lhs, rhs = ins
  (lc, rc), (lb, rb) = dimension_numbers
  bilinear = not lhs.param and not rhs.param
  for i, j in zip(lc, rc):
    reason = _contract_reason(prop, lhs.axes[i], rhs.axes[j])
    _pair(prop, lhs.axes[i], rhs.axes[j], reason, contract=True)
    if bilinear:
      for f in L.expand_all(lhs.axes[i]) + L.expand_all(rhs.axes[j]):
        for r in L.roots(f.form):
          L.flag(r, "bilinear")
  axes = [_pair(prop, lhs.axes[i], rhs.axes[j], "", contract=False) for i, j in zip(lb, rb)]
  axes += [lhs.axes[i] for i in range(len(lhs.shape)) if i not in lc and i not in lb]
  axes += [rhs.axes[j] for j in range(len(rhs.shape)) if j not in rc and j not in rb]
  return prop._new(axes, aval, ins)


def _contract_reason(prop: Driver, la, lb) -> str:
  L = prop.labels
  a = any(L.roots(f.form) for f in L.expand_all(la))
  b = any(L.roots(f.form) for f in L.expand_all(lb))
  origin = prop._origin(L.expand_all(la) + L.expand_all(lb))
  if a and b:
    return "contracted with channels that move differently"
  if origin is not None:
    return "reads channels that carry no symmetry"
  return "reads the model input or a fixed tensor (it cannot move)"


def _conv(prop: Driver, ins, outs, p) -> list[State]:
  L = prop.labels
  if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
    return prop._unsupported(
      "conv_general_dilated", ins, outs, quiet=True, reason="a grouped (depthwise) convolution"
    )
  lhs, rhs = ins
  dn = p["dimension_numbers"]
  lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  reason = _contract_reason(prop, lhs.axes[lspec[1]], rhs.axes[rspec[1]])
  _pair(prop, lhs.axes[lspec[1]], rhs.axes[rspec[1]], reason, contract=True)
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
  return [prop._new(axes, aval, ins)]


def _window(prop: Driver, name, st: State, aval, p) -> State:
  L = prop.labels
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
  return prop._new(axes, aval, [st])


# --------------------------------------------------------------------- rules
def _reduce_sum_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_reduce(prop, ins[0], outs[0], eqn.params["axes"], kind="sum")]


def _reduce_max_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_reduce(prop, ins[0], outs[0], eqn.params["axes"], kind="max")]


def _arg_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_reduce(prop, ins[0], outs[0], eqn.params["axes"], kind="arg")]


def _cumulative_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_cumulative(prop, eqn.primitive, ins[0], outs[0], eqn.params["axis"])]


def _dot_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_dot(prop, ins, outs[0], eqn.params["dimension_numbers"])]


def _conv_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return _conv(prop, ins, outs, eqn.params)


def _window_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_window(prop, eqn.primitive, ins[0], outs[0], eqn.params)]


# primitive name -> rule
RULES: dict[str, Rule] = {
  "reduce_sum": _reduce_sum_rule,
  **dict.fromkeys(("reduce_max", "reduce_min"), _reduce_max_rule),
  **dict.fromkeys(("argmax", "argmin"), _arg_rule),
  **dict.fromkeys(("cumsum", "cummax", "cummin"), _cumulative_rule),
  "dot_general": _dot_rule,
  "conv_general_dilated": _conv_rule,
  **dict.fromkeys(("reduce_window_max", "reduce_window_min", "reduce_window_sum"), _window_rule),
}

"""Rules for primitives that move, cut or join axes: reshape, transpose,
broadcast, squeeze, slice, split, concatenate, stack, gather, dynamic_slice,
pad and rev.

Each rule is ``rule(prop, eqn, ins, outs) -> list[State]`` and :data:`RULES`
maps primitive names to them.

May import: :mod:`.labels`, :mod:`.rules_elementwise`.
"""

from __future__ import annotations

from teleport_jax._src.discovery.labels import Driver
from teleport_jax._src.discovery.labels import Rule
from teleport_jax._src.discovery.labels import State
from teleport_jax._src.discovery.labels import _Aval
from teleport_jax._src.discovery.labels import _floating
from teleport_jax._src.discovery.labels import _Incompatible
from teleport_jax._src.discovery.labels import _shape
from teleport_jax._src.discovery.rules_elementwise import add


# ------------------------------------------------------------------- helpers
def _reshape(prop: Driver, st: State, aval, dimensions) -> State:
  L = prop.labels
  axes = st.axes if dimensions is None else [st.axes[d] for d in dimensions]
  shape = _shape(aval)
  flat = [f for axis in axes for f in axis]
  try:
    groups = L.regroup(flat, shape)
  except _Incompatible:
    for f in L.expand_all(flat):
      L.pin_form(f.form, "a reshape that mixes channels with other axes")
    return prop._new([[L.fac(n)] if n > 1 else [] for n in shape], aval, [st], st.uniform)
  return State(
    groups, shape, st.uniform, pending=st.pending, param=st.param, floating=_floating(aval)
  )


def _transpose(prop: Driver, st: State, aval, perm) -> State:
  return State(
    [st.axes[i] for i in perm],
    _shape(aval),
    st.uniform,
    pending=st.pending,
    param=st.param,
    floating=_floating(aval),
  )


def _broadcast(prop: Driver, st: State, aval, shape, bdims) -> State:
  L = prop.labels
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


def _squeeze(prop: Driver, st: State, aval, dims) -> State:
  dims = {d % len(st.shape) for d in dims}
  axes = [a for i, a in enumerate(st.axes) if i not in dims]
  return State(
    axes, _shape(aval), st.uniform, pending=st.pending, param=st.param, floating=_floating(aval)
  )


def _cut(prop: Driver, axis_facs, n: int, start: int, limit: int, stride: int):
  """Factors of a slice ``[start:limit:stride]`` of an axis of size ``n``, or None."""
  L = prop.labels
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


def _slice(prop: Driver, st: State, aval, start, limit, strides) -> State:
  L = prop.labels
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
        cut = _cut(prop, st.axes[i], n, s, lim, stride)
      except _Incompatible:
        cut = None
    if cut is None:
      for f in L.expand_all(st.axes[i]):
        L.pin_form(f.form, "sliced along the channel axis")
      axes.append([L.fac(shape[i])] if shape[i] > 1 else [])
    else:
      axes.append(cut)
  return prop._new(axes, aval, [st], st.uniform)


def _split(prop: Driver, st: State, outs, axis: int) -> list[State]:
  start = 0
  results = []
  for aval in outs:
    m = _shape(aval)[axis]
    lim = list(st.shape)
    begin = [0] * len(st.shape)
    begin[axis], lim[axis] = start, start + m
    results.append(_slice(prop, st, aval, begin, lim, None))
    start += m
  return results


def _concat(prop: Driver, ins, aval, dim: int, new_axis: bool) -> State:
  L = prop.labels
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
      joined = add(prop, others, _Aval((n,)))
      axes.append(joined.axes[0])
      continue
    if len(sizes) == 1:
      m = sizes.pop()
      others = [State([st.axes[i]], (m,), st.uniform, param=st.param) for st in pieces]
      joined = add(prop, others, _Aval((m,)))
      k = len(pieces)
      lead = [L.fac(k)] if k > 1 else []
      axes.append(lead + joined.axes[0])
    else:
      for st in pieces:
        for f in L.expand_all(st.axes[i]):
          L.pin_form(f.form, "concatenated along the channel axis")
      axes.append([L.fac(n)] if n > 1 else [])
  return prop._new(axes, aval, ins)


def _gather(prop: Driver, ins, aval, p) -> State:
  L = prop.labels
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
    prop.pin_state(st, "used as gather indices")
  return prop._new(axes, aval, ins)


def _dynamic_slice(prop: Driver, st: State, aval) -> State:
  L = prop.labels
  shape = _shape(aval)
  axes = []
  for i, n in enumerate(shape):
    if n == st.shape[i]:
      axes.append(st.axes[i])
    else:
      for f in L.expand_all(st.axes[i]):
        L.pin_form(f.form, "sliced along the channel axis")
      axes.append([L.fac(n)] if n > 1 else [])
  return prop._new(axes, aval, [st])


def _pad(prop: Driver, ins, aval, config) -> State:
  L = prop.labels
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
    prop.pin_state(st, "padded with a nonzero constant")
  return prop._new(axes, aval, [st])


def _rev(prop: Driver, st: State, aval, dims) -> State:
  L = prop.labels
  for i in dims:
    for f in L.expand_all(st.axes[i]):
      L.pin_form(f.form, "reversed along the channel axis")
  return prop._identity(st, aval)


# --------------------------------------------------------------------- rules
def _reshape_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_reshape(prop, ins[0], outs[0], eqn.params.get("dimensions"))]


def _transpose_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_transpose(prop, ins[0], outs[0], eqn.params["permutation"])]


def _broadcast_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  p = eqn.params
  return [_broadcast(prop, ins[0], outs[0], p["shape"], p["broadcast_dimensions"])]


def _squeeze_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_squeeze(prop, ins[0], outs[0], eqn.params["dimensions"])]


def _slice_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  p = eqn.params
  return [_slice(prop, ins[0], outs[0], p["start_indices"], p["limit_indices"], p["strides"])]


def _split_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return _split(prop, ins[0], outs, eqn.params["axis"])


def _concatenate_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_concat(prop, ins, outs[0], eqn.params["dimension"], new_axis=False)]


def _stack_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_concat(prop, ins, outs[0], eqn.params["axis"], new_axis=True)]


def _gather_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_gather(prop, ins, outs[0], eqn.params)]


def _dynamic_slice_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_dynamic_slice(prop, ins[0], outs[0])]


def _pad_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_pad(prop, ins, outs[0], eqn.params["padding_config"])]


def _rev_rule(prop: Driver, eqn, ins, outs) -> list[State]:
  return [_rev(prop, ins[0], outs[0], eqn.params["dimensions"])]


# primitive name -> rule
RULES: dict[str, Rule] = {
  "reshape": _reshape_rule,
  "transpose": _transpose_rule,
  "broadcast_in_dim": _broadcast_rule,
  "squeeze": _squeeze_rule,
  "slice": _slice_rule,
  "split": _split_rule,
  "concatenate": _concatenate_rule,
  "stack": _stack_rule,
  "gather": _gather_rule,
  "dynamic_slice": _dynamic_slice_rule,
  "pad": _pad_rule,
  "rev": _rev_rule,
}

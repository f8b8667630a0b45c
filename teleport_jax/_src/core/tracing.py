"""Reading a model's call graph: which parameter leaves are used, in what order.

``jax.make_jaxpr`` turns a loss or apply function into a flat program; its
input variables are the leaves of the arguments, in ``jax.tree_util`` order.
:func:`walk` visits every equation in execution order, inlining the
sub-programs of ``pjit``, ``custom_jvp_call``/``custom_vjp_call``, ``remat``,
``cond``, ``while`` and ``scan`` so that a variable is followed through
function boundaries. :func:`first_use_order` uses it to find the order in
which a model calls its dense layers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
from jax.extend import core as jex_core

from teleport_jax._src.core.precision import LOW_PRECISION

# primitives that only move, reshape or cast a tensor: a leaf seen through them
# is still "that leaf"
VIEW_PRIMITIVES = frozenset(
  {
    "transpose",
    "reshape",
    "convert_element_type",
    "copy",
    "copy_p",
    "squeeze",
    "expand_dims",
    "broadcast_in_dim",
    "reduce_precision",
    "optimization_barrier",
  }
)
CONTRACTIONS = frozenset({"dot_general", "conv_general_dilated"})


def _is_jaxpr(x) -> bool:
  return isinstance(x, (jex_core.Jaxpr, jex_core.ClosedJaxpr))


def _open(j):
  return j.jaxpr if isinstance(j, jex_core.ClosedJaxpr) else j


def sub_jaxprs(eqn) -> list[tuple[Any, list]]:
  """``[(jaxpr, outer vars bound to its invars)]`` for an equation's sub-programs."""
  name = eqn.primitive.name
  p = eqn.params
  if name == "cond":
    return [(_open(b), list(eqn.invars[1:])) for b in p["branches"]]
  if name == "while":
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    carry = list(eqn.invars[nc + nb :])
    return [
      (_open(p["cond_jaxpr"]), list(eqn.invars[:nc]) + carry),
      (_open(p["body_jaxpr"]), list(eqn.invars[nc : nc + nb]) + carry),
    ]
  out = []
  for value in p.values():
    if _is_jaxpr(value):
      j = _open(value)
      if len(j.invars) == len(eqn.invars):
        out.append((j, list(eqn.invars)))
  return out


def walk(jaxpr, env: dict | None = None) -> Iterator[tuple[Any, list]]:
  """Yields ``(eqn, [outer identity of each input])`` in execution order.

  ``env`` maps a variable of ``jaxpr`` to the identity it stands for (the
  variable of the outermost program it was bound from); sub-programs are
  inlined with their inputs mapped to the caller's variables, and their
  outputs mapped back, so identities flow through calls.
  """
  env = {} if env is None else env

  def ident(v):
    if isinstance(v, jex_core.Literal):
      return None
    return env.get(v, v)

  for eqn in jaxpr.eqns:
    subs = sub_jaxprs(eqn)
    ins = [ident(v) for v in eqn.invars]
    if subs and eqn.primitive.name not in ("while", "cond", "scan"):
      # a call: inline it and map its outputs back
      j, outer = subs[0]
      inner_env = {iv: ident(ov) for iv, ov in zip(j.invars, outer)}
      yield from walk(j, inner_env)
      for ov, iv in zip(eqn.outvars, j.outvars):
        if not isinstance(iv, jex_core.Literal):
          env[ov] = inner_env.get(iv, iv)
      continue
    for j, outer in subs:
      inner_env = {iv: ident(ov) for iv, ov in zip(j.invars, outer)}
      yield from walk(j, inner_env)
    yield eqn, ins


@functools.lru_cache(maxsize=64)
def _cached_jaxpr(fn, treedef, avals):
  def flat_fn(*leaves):
    return fn(*jax.tree_util.tree_unflatten(treedef, leaves))

  return jax.make_jaxpr(flat_fn)(*avals)


def make_jaxpr(fn: Callable, *args) -> Any:
  """``jax.make_jaxpr(fn)(*args)`` on abstract values (works with tracers), cached."""
  leaves, treedef = jax.tree_util.tree_flatten(args)
  avals = tuple(jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x)) for x in leaves)
  try:
    return _cached_jaxpr(fn, treedef, avals)
  except TypeError:  # an unhashable fn
    return _cached_jaxpr.__wrapped__(fn, treedef, avals)


def first_uses(
  fn: Callable, args: Sequence[Any], leaf_positions: Sequence[int]
) -> list[tuple[int, tuple[int, ...] | None] | None]:
  """For each flat input position: its first contraction and the leaf axes it contracts.

  Args:
    fn: the function, called as ``fn(*args)``.
    args: example arguments (arrays, tracers or ``ShapeDtypeStruct``).
    leaf_positions: positions among the flattened leaves of ``args``.

  Returns:
    One entry per position: ``None`` if no ``dot_general``/``conv_general_dilated``
    reads the leaf (through views and casts), else ``(index, axes)`` with the
    execution index of the first one and the leaf's own axes it contracts
    (``None`` when a reshape between them hides which).
  """
  closed = make_jaxpr(fn, *args)
  jaxpr = closed.jaxpr
  # identity -> (leaf position, permutation from the view's axes to the leaf's, or None)
  source: dict[Any, tuple[int, tuple[int, ...] | None]] = {}
  for p in leaf_positions:
    ndim = len(jaxpr.invars[p].aval.shape)
    source[jaxpr.invars[p]] = (p, tuple(range(ndim)))
  first: dict[int, tuple[int, tuple[int, ...] | None]] = {}
  for t, (eqn, ins) in enumerate(walk(jaxpr)):
    name = eqn.primitive.name
    srcs = [source.get(v) if v is not None else None for v in ins]
    if name in VIEW_PRIMITIVES and srcs and srcs[0] is not None:
      pos, perm = srcs[0]
      if perm is not None and name == "transpose":
        perm = tuple(perm[i] for i in eqn.params["permutation"])
      elif name not in ("convert_element_type", "copy", "copy_p", "reduce_precision"):
        perm = None
      for ov in eqn.outvars:
        source[ov] = (pos, perm)
      continue
    if name in CONTRACTIONS:
      for operand, src in enumerate(srcs[:2]):
        if src is None or src[0] in first:
          continue
        pos, perm = src
        axes = None
        if name == "dot_general" and perm is not None:
          (lc, rc), _ = eqn.params["dimension_numbers"]
          contracted = lc if operand == 0 else rc
          axes = tuple(sorted(perm[a] for a in contracted))
        first[pos] = (t, axes)
  return [first.get(p) for p in leaf_positions]


def first_use_order(
  fn: Callable, args: Sequence[Any], leaf_positions: Sequence[int]
) -> list[int | None]:
  """For each flat input position, the index of the first contraction that uses it
  (``None`` if none does); see :func:`first_uses`."""
  return [None if u is None else u[0] for u in first_uses(fn, args, leaf_positions)]


# ------------------------------------------------------------ flat programs
LOOPS = frozenset({"while", "cond", "scan"})


class Eqn:
  """One equation of a flat program: variables are ints, literals are :class:`Const`.

  Attributes:
    primitive: the primitive's name (``"dot_general"``, ``"add"``, ...).
    params: the equation's parameters.
    invars: input variable ids, or :class:`Const` for literals.
    outvars: output variable ids.
    eqn: the original ``JaxprEqn`` (for its source information).
  """

  __slots__ = ("primitive", "params", "invars", "outvars", "eqn")

  def __init__(self, primitive, params, invars, outvars, eqn):
    self.primitive = primitive
    self.params = params
    self.invars = invars
    self.outvars = outvars
    self.eqn = eqn

  def __repr__(self) -> str:
    return f"Eqn({self.primitive}, {self.invars} -> {self.outvars})"


class Const:
  """A literal or a closed-over constant of a flat program."""

  __slots__ = ("value", "aval")

  def __init__(self, value, aval):
    self.value = value
    self.aval = aval


class Program:
  """A jaxpr with its calls inlined: every variable of every call is a distinct int.

  Attributes:
    invars: the ids of the program's inputs, in ``jax.tree_util`` order.
    outvars: the ids (or :class:`Const`) of its outputs.
    eqns: the equations in execution order; ``while``/``cond``/``scan`` stay
      single (opaque) equations.
    avals: ``id -> abstract value``.
    consts: ``id -> value`` for the closed-over constants.
  """

  def __init__(self):
    self.invars: list[int] = []
    self.outvars: list[Any] = []
    self.eqns: list[Eqn] = []
    self.avals: dict[int, Any] = {}
    self.consts: dict[int, Any] = {}

  def new(self, aval) -> int:
    i = len(self.avals)
    self.avals[i] = aval
    return i


def _call_body(eqn):
  """``(jaxpr, consts)`` of a call-like equation (``jit``, ``custom_jvp_call``, ...) or None."""
  if eqn.primitive.name in LOOPS:
    return None
  for value in eqn.params.values():
    if _is_jaxpr(value):
      j = _open(value)
      if len(j.invars) == len(eqn.invars):
        consts = value.consts if isinstance(value, jex_core.ClosedJaxpr) else []
        return j, list(consts)
  return None


def inline(closed) -> Program:
  """Flattens a (closed) jaxpr into a :class:`Program`, inlining every call.

  Unlike :func:`walk`, each call of a shared sub-program gets its own
  variables, so a function called twice (a jitted helper such as
  ``jax.nn.softmax``) does not alias its two calls.
  """
  prog = Program()
  jaxpr = _open(closed)
  consts = closed.consts if isinstance(closed, jex_core.ClosedJaxpr) else []

  def lookup(env, v):
    if isinstance(v, jex_core.Literal):
      return Const(v.val, v.aval)
    return env[v]

  def bind_consts(env, constvars, values):
    for cv, val in zip(constvars, values):
      i = prog.new(cv.aval)
      prog.consts[i] = val
      env[cv] = i

  def run(j, env):
    for eqn in j.eqns:
      ins = [lookup(env, v) for v in eqn.invars]
      body = _call_body(eqn)
      if body is not None:
        inner, inner_consts = body
        inner_env: dict = {}
        bind_consts(inner_env, inner.constvars, inner_consts)
        for iv, x in zip(inner.invars, ins):
          if isinstance(x, Const):
            k = prog.new(x.aval)
            prog.consts[k] = x.value
            x = k
          inner_env[iv] = x
        run(inner, inner_env)
        for ov, iv in zip(eqn.outvars, inner.outvars):
          env[ov] = lookup(inner_env, iv)
        continue
      outs = [prog.new(v.aval) for v in eqn.outvars]
      for v, i in zip(eqn.outvars, outs):
        env[v] = i
      prog.eqns.append(Eqn(eqn.primitive.name, dict(eqn.params), ins, outs, eqn))

  env: dict = {}
  bind_consts(env, jaxpr.constvars, consts)
  for v in jaxpr.invars:
    env[v] = prog.new(v.aval)
    prog.invars.append(env[v])
  run(jaxpr, env)
  prog.outvars = [lookup(env, v) for v in jaxpr.outvars]
  return prog


# ------------------------------------------------------- widened evaluation
# equation parameters that name the dtype of a result
_DTYPE_PARAMS = frozenset({"new_dtype", "dtype", "preferred_element_type", "out_dtype"})
# primitives whose meaning depends on the bit layout: no wider equivalent
_BIT_PRIMITIVES = frozenset({"bitcast_convert_type", "random_bits", "random_wrap", "threefry2x32"})


def _is_low(dtype) -> bool:
  try:
    return jax.numpy.dtype(dtype) in LOW_PRECISION
  except TypeError:
    return False


def widenable(prog: Program) -> bool:
  """Whether :func:`widened` can evaluate ``prog``: no loops, no bit-level primitives."""
  for e in prog.eqns:
    if e.primitive in LOOPS or e.primitive in _BIT_PRIMITIVES:
      return False
    if any(_is_jaxpr(v) for v in e.params.values()):
      return False
  return True


def widened(prog: Program, dtype=jax.numpy.float32) -> Callable[..., list]:
  """``prog`` as a function with every bfloat16/float16 value computed in ``dtype``.

  The program's arithmetic is unchanged; only its rounding is: inputs,
  constants and literals of a low-precision dtype are cast up, casts down to
  one become casts to ``dtype``, results requested in one (``iota``,
  ``preferred_element_type``) come in ``dtype``, and ``reduce_precision`` is
  the identity. A check of a symmetry then measures the program's exact
  arithmetic to float32 rounding instead of bfloat16's. Check
  :func:`widenable` first.

  Args:
    prog: an inlined program (:func:`inline`).
    dtype: the wider floating dtype.

  Returns:
    ``fn(*leaves) -> [outputs]``, leaves in ``prog.invars`` order.
  """
  wide = jax.numpy.dtype(dtype)

  def up(x):
    x = jax.numpy.asarray(x)
    return x.astype(wide) if x.dtype in LOW_PRECISION else x

  def const(c: Const):
    dt = getattr(c.aval, "dtype", None)
    return up(jax.numpy.asarray(c.value, dt))

  def param(key, value):
    if key in _DTYPE_PARAMS and value is not None and _is_low(value):
      return wide
    return value

  def fn(*leaves) -> list:
    env: dict[int, Any] = {i: up(x) for i, x in zip(prog.invars, leaves)}
    for i, value in prog.consts.items():
      env[i] = up(value)
    for e in prog.eqns:
      ins = [const(x) if isinstance(x, Const) else env[x] for x in e.invars]
      if e.primitive == "reduce_precision":
        outs = ins
      else:
        prim = e.eqn.primitive
        out = prim.bind(*ins, **{k: param(k, v) for k, v in e.params.items()})
        outs = list(out) if prim.multiple_results else [out]
      for i, x in zip(e.outvars, outs):
        env[i] = x
    return [const(v) if isinstance(v, Const) else env[v] for v in prog.outvars]

  return fn

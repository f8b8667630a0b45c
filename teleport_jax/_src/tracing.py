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


def first_use_order(
  fn: Callable, args: Sequence[Any], leaf_positions: Sequence[int]
) -> list[int | None]:
  """For each flat input position, the index of the first contraction that uses it.

  Args:
    fn: the function, called as ``fn(*args)``.
    args: example arguments (arrays, tracers or ``ShapeDtypeStruct``).
    leaf_positions: positions among the flattened leaves of ``args``.

  Returns:
    One entry per position: the execution index of the first
    ``dot_general``/``conv_general_dilated`` that reads the leaf (through
    views and casts), or ``None`` if none does.
  """
  closed = make_jaxpr(fn, *args)
  jaxpr = closed.jaxpr
  source: dict[Any, int] = {jaxpr.invars[p]: p for p in leaf_positions}
  first: dict[int, int] = {}
  for t, (eqn, ins) in enumerate(walk(jaxpr)):
    srcs = [source.get(v) for v in ins if v is not None]
    name = eqn.primitive.name
    if name in VIEW_PRIMITIVES and srcs and srcs[0] is not None:
      for ov in eqn.outvars:
        source[ov] = srcs[0]
      continue
    if name in CONTRACTIONS:
      for s in srcs:
        if s is not None and s not in first:
          first[s] = t
  return [first.get(p) for p in leaf_positions]

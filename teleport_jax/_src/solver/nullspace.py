r"""Teleporting without a group: moves in the null space of each layer's input batch.

A dense layer computes ``Y = X W`` from its input batch ``X`` (``(n, in)``, one
row per sample and position) and its kernel ``W`` (``(in, out)``). Any change
``dW`` whose columns lie in the null space of ``X`` (``X dW = 0``) leaves ``Y``
unchanged *on this batch*; if every layer moves that way, every layer's input
stays what it was, so the network's outputs and the loss on the batch do not
change at all (not only to first order). The null space is found from an SVD
of ``X``: directions whose singular value is at most ``tau`` times the largest
count as null. Projecting the teleport objective's gradient onto it gives a
group-free teleport (after Wu et al., 2025).

Which weights move is read from the loss's own program (``jax.make_jaxpr``):
a parameter leaf moves iff every use of it (through transposes and reshapes) is
an operand of a ``dot_general`` or ``conv_general_dilated`` whose other operand
is an activation, and the layer's input batch has fewer rows than the layer's
input width. So it reaches

* dense layers in either orientation (``x @ W``, ``W @ x``, ``x @ W.T``; flax
  linen ``Dense``, nnx ``Linear``, ``DenseGeneral``/``LinearGeneral``, plain
  lists of matrices), with rows = batch x positions;
* attention projections (query, key, value read the normalised stream,
  the output projection reads the attention output; rows = batch x tokens);
* convolutions through their im2col patches (rows = batch x output positions,
  width = kernel size x input channels): usually only deep, low-resolution
  convolutions with a small batch, since ``n`` counts every output position;

and leaves fixed: biases, norm gains and anything else read by an add or a
product, a weight contracted with another parameter, weights used inside
``lax.scan``/``while``/``cond``, grouped convolutions, and every layer whose
input batch has at least as many rows as its input width (``n >= in``: no null
space). :func:`nullspace_report` lists every leaf with the reason.

The loss is unchanged *on the teleport batch only*: on other data the network
function changes. :func:`held_out_drift` measures how much.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jex_core

from teleport_jax._src.core import paths as paths_lib
from teleport_jax._src.core import tracing
from teleport_jax._src.objectives import objectives as obj_lib
from teleport_jax._src.solver import backends

# call-like primitives whose body is inlined (anything else is evaluated whole)
_CALLS = frozenset(
  {
    "jit",
    "pjit",
    "closed_call",
    "core_call",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "remat",
    "remat2",
    "checkpoint",
  }
)
# views that only move or relabel entries (no data-dependent values)
_VIEWS = frozenset(
  {
    "transpose",
    "reshape",
    "squeeze",
    "expand_dims",
    "broadcast_in_dim",
    "convert_element_type",
    "copy",
    "copy_p",
    "reduce_precision",
  }
)


# ---------------------------------------------------------------- the program
class _Use(NamedTuple):
  """One contraction that reads a parameter leaf as its weight operand.

  ``perm`` (shape ``bkm``) holds, for each entry of the canonical weight matrix
  ``(B, K, M)`` (batch dims, contracted dims, free dims), its flat position in
  the leaf; uses of one leaf are stacked only if their ``perm`` agree.
  """

  eqn: Any
  side: int
  perm: np.ndarray
  bkm: tuple[int, int, int]


@dataclasses.dataclass(frozen=True, eq=False)
class _LeafPlan:
  """How one movable leaf is projected: its uses and canonical matrix shape."""

  position: int
  uses: tuple[_Use, ...]
  bkm: tuple[int, int, int]
  rows: int
  perm: np.ndarray | None  # None: the leaf is already in canonical order


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
  """Per parameter leaf: a :class:`_LeafPlan` or the reason it stays fixed."""

  leaves: tuple[_LeafPlan | None, ...]
  reasons: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  widths: tuple[int | None, ...]
  rows: tuple[int | None, ...]


def _call_body(eqn):
  """``(jaxpr, consts)`` of a call-like equation to inline, else ``None``."""
  if eqn.primitive.name not in _CALLS:
    return None
  for value in eqn.params.values():
    if isinstance(value, jex_core.ClosedJaxpr) and len(value.jaxpr.invars) == len(eqn.invars):
      return value.jaxpr, list(value.consts)
    if isinstance(value, jex_core.Jaxpr) and len(value.invars) == len(eqn.invars):
      if not value.constvars:
        return value, []
  return None


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _view(eqn, idx: np.ndarray) -> np.ndarray | None:
  """The view applied to an index array (``None`` if it is not a bijection)."""
  name, p = eqn.primitive.name, eqn.params
  out_shape = tuple(eqn.outvars[0].aval.shape)
  if name == "transpose":
    idx = np.transpose(idx, p["permutation"])
  elif name == "reshape":
    if p.get("dimensions") is not None:
      idx = np.transpose(idx, p["dimensions"])
    idx = np.reshape(idx, out_shape)
  elif name in ("squeeze", "expand_dims", "broadcast_in_dim"):
    if math.prod(out_shape) != idx.size:
      return None  # a real broadcast: the leaf's entries are repeated
    idx = np.reshape(idx, out_shape)
  return idx if tuple(idx.shape) == out_shape else None


class _Recorder:
  """Evaluates a jaxpr and records how each parameter leaf is used.

  Values are bound primitive by primitive (so tracers work: this runs inside
  the teleport's trace); call-like equations are inlined so that a layer
  inside a ``jit`` or ``custom_jvp`` is seen.
  """

  def __init__(self, num_leaves: int):
    self.uses: dict[int, list[tuple[_Use, Any]]] = {i: [] for i in range(num_leaves)}
    self.blocked: dict[int, str] = {}

  def block(self, leaf: int, reason: str) -> None:
    self.blocked.setdefault(leaf, reason)

  def run(self, jaxpr, consts, args, origins):
    env: dict[Any, Any] = {}
    org: dict[Any, tuple[int, np.ndarray]] = {}

    def read(v):
      return v.val if isinstance(v, jex_core.Literal) else env[v]

    def origin(v):
      return None if isinstance(v, jex_core.Literal) else org.get(v)

    for v, x in zip(jaxpr.constvars, consts):
      env[v] = x
    for v, x, o in zip(jaxpr.invars, args, origins):
      env[v] = x
      if o is not None:
        org[v] = o
    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      inorg = [origin(v) for v in eqn.invars]
      body = _call_body(eqn)
      if body is not None:
        outs, outorg = self.run(body[0], body[1], invals, inorg)
      else:
        outs = _bind(eqn, invals)
        outorg = [None] * len(outs)
        if any(o is not None for o in inorg):
          outorg = self._visit(eqn, invals, inorg)
      for v, x, o in zip(eqn.outvars, outs, outorg):
        env[v] = x
        if o is not None:
          org[v] = o
    return [read(v) for v in jaxpr.outvars], [origin(v) for v in jaxpr.outvars]

  def _visit(self, eqn, invals, inorg):
    name = eqn.primitive.name
    out = [None] * len(eqn.outvars)
    if name in _VIEWS and inorg[0] is not None:
      leaf, idx = inorg[0]
      new = _view(eqn, idx)
      if new is None:
        self.block(leaf, f"broadcast by {name}")
      else:
        out[0] = (leaf, new)
      return out
    sides = [i for i, o in enumerate(inorg[:2]) if o is not None]
    if name == "dot_general" and len(sides) == 1:
      side = sides[0]
      leaf, idx = inorg[side]
      self.uses[leaf].append((_dot_use(eqn, side, idx), invals[1 - side]))
      return out
    if name == "conv_general_dilated" and sides == [1]:
      leaf, idx = inorg[1]
      p = eqn.params
      if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        self.block(leaf, "grouped convolution")
      else:
        self.uses[leaf].append((_conv_use(eqn, idx), invals[0]))
      return out
    why = {
      "dot_general": "contracted with another parameter",
      "conv_general_dilated": "a convolution input, not its kernel",
    }.get(name, f"read by {name}")
    for o in inorg:
      if o is not None:
        self.block(o[0], why)
    return out


def _dot_use(eqn, side: int, idx: np.ndarray) -> _Use:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  cw, bw = (rc, rb) if side == 1 else (lc, lb)
  cw, bw = tuple(int(d) for d in cw), tuple(int(d) for d in bw)
  fw = tuple(d for d in range(idx.ndim) if d not in cw + bw)
  can = np.transpose(idx, bw + cw + fw)
  shape = idx.shape
  bkm = (
    math.prod(shape[d] for d in bw),
    math.prod(shape[d] for d in cw),
    math.prod(shape[d] for d in fw),
  )
  return _Use(eqn, side, can.reshape(bkm), bkm)


def _conv_use(eqn, idx: np.ndarray) -> _Use:
  rhs = tuple(int(d) for d in eqn.params["dimension_numbers"].rhs_spec)
  can = np.transpose(idx, (rhs[1], *rhs[2:], rhs[0]))
  k = math.prod(can.shape[:-1])
  return _Use(eqn, 1, can.reshape(1, k, can.shape[-1]), (1, k, int(can.shape[-1])))


def _input_matrix(use: _Use, other) -> chex.Array:
  """The layer's input batch as ``(B, N, K)``, columns in the weight's canonical order."""
  eqn = use.eqn
  if eqn.primitive.name == "dot_general":
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    ca, ba = (lc, lb) if use.side == 1 else (rc, rb)
    ca, ba = tuple(int(d) for d in ca), tuple(int(d) for d in ba)
    fa = tuple(d for d in range(other.ndim) if d not in ca + ba)
    a = jnp.transpose(other, ba + fa + ca)
    return a.reshape(use.bkm[0], -1, use.bkm[1])
  # convolution: im2col by convolving with one-hot kernels, so the column order
  # is the kernel's canonical (in-channel, spatial...) order by construction
  p = eqn.params
  dn = p["dimension_numbers"]
  rhs, out = tuple(dn.rhs_spec), tuple(dn.out_spec)
  kshape = eqn.invars[1].aval.shape
  k = use.bkm[1]
  canon = (k, kshape[rhs[1]], *(kshape[d] for d in rhs[2:]))
  eye = jnp.eye(k, dtype=other.dtype).reshape(canon)
  kernel = jnp.transpose(eye, tuple(int(i) for i in np.argsort(rhs)))
  patches = jax.lax.conv_general_dilated(
    other,
    kernel,
    window_strides=p["window_strides"],
    padding=p["padding"],
    lhs_dilation=p["lhs_dilation"],
    rhs_dilation=p["rhs_dilation"],
    dimension_numbers=dn,
    precision=jax.lax.Precision.HIGHEST,
  )
  patches = jnp.transpose(patches, (out[0], *out[2:], out[1]))
  return patches.reshape(1, -1, k)


def _args(params, data):
  return (params,) if data is None else (params, data)


def _record(loss_fn, params, data) -> _Recorder:
  args = _args(params, data)
  closed = tracing.make_jaxpr(loss_fn, *args)
  leaves = jax.tree_util.tree_leaves(args)
  shapes = [tuple(jnp.shape(x)) for x in jax.tree_util.tree_leaves(params)]
  origins = [(i, np.arange(math.prod(s)).reshape(s)) for i, s in enumerate(shapes)]
  origins += [None] * (len(leaves) - len(shapes))
  rec = _Recorder(len(shapes))
  rec.run(closed.jaxpr, list(closed.consts), [jnp.asarray(x) for x in leaves], origins)
  return rec


@functools.lru_cache(maxsize=64)
def _cached_plan(loss_fn, treedef, avals, num_params) -> _Plan:
  def abstract(*leaves):
    params, *rest = jax.tree_util.tree_unflatten(treedef, leaves)
    holder.append(_record(loss_fn, params, rest[0] if rest else None))
    return 0

  holder: list[_Recorder] = []
  jax.eval_shape(abstract, *avals)
  rec = holder[0]
  leaves, reasons, widths, rows = [], [], [], []
  shapes = tuple(tuple(a.shape) for a in avals[:num_params])
  for i in range(num_params):
    uses = [u for u, _ in rec.uses[i]]
    plan, reason, width, n = None, "", None, None
    if i in rec.blocked:
      reason = rec.blocked[i]
    elif not uses:
      reason = "not read by the loss"
    elif any(u.bkm != uses[0].bkm or not np.array_equal(u.perm, uses[0].perm) for u in uses):
      reason = "read by layers of different shapes"
    else:
      width = uses[0].bkm[1]
      n = sum(_rows(u) for u in uses)
      if n >= width:
        reason = f"input batch has {n} rows >= input width {width}: no null space"
      else:
        perm = uses[0].perm.reshape(-1)
        ident = np.array_equal(perm, np.arange(perm.size))
        plan = _LeafPlan(i, tuple(uses), uses[0].bkm, n, None if ident else perm)
    leaves.append(plan)
    reasons.append(reason)
    widths.append(width)
    rows.append(n)
  return _Plan(tuple(leaves), tuple(reasons), shapes, tuple(widths), tuple(rows))


def _rows(use: _Use) -> int:
  eqn = use.eqn
  if eqn.primitive.name == "dot_general":
    other = eqn.invars[1 - use.side].aval
    return math.prod(other.shape) // (use.bkm[0] * use.bkm[1])
  out = eqn.outvars[0].aval.shape
  return math.prod(out) // use.bkm[2]


def _plan(loss_fn, params, data) -> _Plan:
  """The static projection plan for this loss and these shapes (cached)."""
  args = _args(params, data)
  leaves, treedef = jax.tree_util.tree_flatten(args)
  avals = tuple(jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves)
  num = len(jax.tree_util.tree_leaves(params))
  try:
    return _cached_plan(loss_fn, treedef, avals, num)
  except TypeError:  # an unhashable loss_fn
    return _cached_plan.__wrapped__(loss_fn, treedef, avals, num)


def _layer_inputs(loss_fn, params, data, plan: _Plan) -> dict[int, chex.Array]:
  """Each movable leaf's input batch ``(B, N, K)`` (uses stacked along ``N``)."""
  rec = _record(loss_fn, params, data)
  out = {}
  for lp in plan.leaves:
    if lp is None:
      continue
    mats = [_input_matrix(u, other) for u, other in rec.uses[lp.position]]
    out[lp.position] = jnp.concatenate(mats, axis=1) if len(mats) > 1 else mats[0]
  return out


# a step direction below this many eps of the gradient it came from is rounding noise
_NOISE = 1024


def default_tau(rows: int, width: int, dtype) -> float:
  """``max(rows, width) * eps``: numpy's numerical-rank cut-off."""
  return float(max(rows, width) * jnp.finfo(dtype).eps)


def _range_basis(a: chex.Array, tau: float, after: Any = None) -> tuple[chex.Array, chex.Array]:
  """Rows spanning the input's row space (``(B, N, K)``, zero rows for null directions).

  Returns the basis and the rank of each of the ``B`` matrices. On a CPU the SVDs
  run one after another (``after``: a value the first must wait for): two of
  jaxlib's batched CPU LAPACK kernels (which a ``vmap`` of the teleport creates)
  running at once can deadlock a small thread pool.
  """

  def one(m):
    m = jnp.where(jnp.isfinite(m), m, 0)
    _, s, vh = jnp.linalg.svd(m, full_matrices=False)
    keep = s > tau * s[0]
    return vh * keep[:, None].astype(vh.dtype), jnp.sum(keep)

  if jax.default_backend() != "cpu":
    return jax.vmap(one)(a)
  outs = []
  for m in a:
    if after is not None:
      m, _ = jax.lax.optimization_barrier((m, after))
    outs.append(one(m))
    after = outs[-1][0]
  return jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs])


def _project(g: chex.Array, basis: chex.Array, lp: _LeafPlan) -> chex.Array:
  """``P g``: the part of ``g`` with ``X dW = 0`` for the leaf's input batch."""
  b, k, m = lp.bkm
  flat = g.reshape(-1)
  gm = (flat if lp.perm is None else flat[lp.perm]).reshape(b, k, m)
  hi = jax.lax.Precision.HIGHEST
  coef = jnp.einsum("bnk,bkm->bnm", basis, gm, precision=hi)
  pm = gm - jnp.einsum("bnk,bnm->bkm", basis, coef, precision=hi)
  pm = pm.reshape(-1)
  if lp.perm is not None:
    pm = pm[np.argsort(lp.perm)]
  return pm.reshape(g.shape)


# ------------------------------------------------------------------- back-end
class NullSpaceState(NamedTuple):
  """State of :class:`NullSpace`.

  Attributes:
    eta: current step size (relative to ``scale``).
    scale: the norm of the movable weights at the start (``1`` if not relative).
    bases: per movable leaf, the row-space basis of its input batch.
    free: parameters free to move (null-space dimensions x output columns).
    movable: parameters in movable leaves.
    total: all parameters.
  """

  eta: chex.Array
  scale: chex.Array
  bases: tuple
  free: chex.Array
  movable: chex.Array
  total: chex.Array


@dataclasses.dataclass(frozen=True)
class NullSpace(backends.Solver):
  r"""Group-free teleport: the objective's gradient projected per layer onto the
  null space of the layer's input batch (after Wu et al., 2025).

  For a weight ``W`` read as ``X W`` with input batch ``X`` (``(n, in)``), the
  step is ``dW = P G``, ``P = I - X^+ X`` (from an SVD of ``X``; singular values
  at most ``tau`` times the largest count as zero), ``G`` the objective's
  gradient. Then ``X dW = 0``: every layer's outputs on the batch, and so the
  loss on the batch, are unchanged, for finite steps too. The projectors are
  computed once per teleport at the start point (the layer inputs do not change
  along the way). With ``orthogonalize`` the step direction also has its
  (rounding-level) component along the loss gradient removed. The
  step is ``step_size * scale * PG / |PG|`` with ``scale``
  the norm of the movable weights (``relative=True``); a kept step grows the
  step size by ``grow`` up to ``max_step_size``, a refused one multiplies it by
  ``shrink``. Layers whose input batch has at least as many rows as the input
  width, biases, norm gains and every other leaf stay fixed bit for bit (see
  :mod:`teleport_jax._src.solver.nullspace` and :meth:`report` for which layers move).

  The loss is unchanged on the teleport batch only; measure the change on
  other data with :func:`teleport_jax.solvers.held_out_drift`.

  Statistics (``TeleportInfo.stats``): ``final_step_size``,
  ``movable_fraction`` (parameters in movable leaves / all),
  ``null_fraction`` (parameters free to move / all) and
  ``grad_evals_per_step`` (:meth:`cost_per_step`).

  Attributes:
    step_size: initial step, relative to the movable weights' norm (absolute
      with ``relative=False``).
    max_step_size: cap on the adapted step size.
    grow: factor after a kept step.
    shrink: factor after a refused step.
    tau: relative singular-value cut-off (``None``: ``max(n, in) * eps`` of the
      compute dtype, numpy's rank cut-off). A larger ``tau`` frees more
      directions but moves the outputs on the batch by up to ``tau`` (relative).
    relative: step sizes relative to the movable weights' norm.
    orthogonalize: also remove from the step its component along the loss
      gradient (zero in exact arithmetic; in float32 the rounding-level
      remainder is a direction in which every step lowers the loss a little,
      which a look-ahead objective follows until the loss leaves ``rtol``: on
      the regression problem 30 steps drift by 1e-5 without it and 6e-7 with
      it). Costs one loss gradient per inner step.

  Examples:
    >>> import jax, jax.numpy as jnp, teleport_jax as tj
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> params = [jax.random.normal(k1, (8, 6)), jax.random.normal(k2, (6, 2))]
    >>> x, y = jax.random.normal(k3, (4, 8)), jnp.ones((4, 2))
    >>> loss = lambda p, d: jnp.mean((jnp.tanh(d[0] @ p[0]) @ p[1] - d[1]) ** 2)
    >>> new, info = tj.teleport(loss, params, (x, y), solver="nullspace",
    ...                         objective="max_grad_norm", num_steps=5)
    >>> bool(info.accepted), float(info.rel_loss_drift) < 1e-5
    (True, True)
  """

  step_size: Any = 0.1
  max_step_size: Any = 1.0
  grow: float = 1.5
  shrink: float = 0.5
  tau: float | None = None
  relative: bool = True
  orthogonalize: bool = True

  needs_symmetry = False
  tracks_element = False

  def __post_init__(self):
    backends.check_step_fields(self)
    if self.tau is not None:
      tau = obj_lib.check_positive(self.tau, "tau")
      if not tau < 1:
        raise ValueError(f"tau must be in (0, 1), got {self.tau!r}.")
      object.__setattr__(self, "tau", tau)
    for name in ("relative", "orthogonalize"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}.")

  def _tau(self, lp: _LeafPlan, dtype) -> float:
    return self.tau if self.tau is not None else default_tau(lp.rows, lp.bkm[1], dtype)

  def init(self, problem, params):
    plan = _plan(problem.loss_fn, params, problem.data)
    leaves = jax.tree_util.tree_leaves(params)
    inputs = _layer_inputs(problem.loss_fn, jax.lax.stop_gradient(params), problem.data, plan)
    bases, free = [], jnp.zeros((), problem.dtype)
    movable, scale2 = 0, jnp.zeros((), problem.dtype)
    for lp in plan.leaves:
      if lp is None:
        continue
      a = jax.lax.stop_gradient(inputs[lp.position]).astype(problem.dtype)
      basis, rank = _range_basis(a, self._tau(lp, problem.dtype), bases[-1] if bases else None)
      bases.append(basis)
      b, k, m = lp.bkm
      free = free + jnp.sum(k - rank).astype(problem.dtype) * m
      movable += b * k * m
      scale2 = scale2 + jnp.sum(jnp.square(leaves[lp.position].astype(problem.dtype)))
    total = sum(math.prod(jnp.shape(x)) for x in leaves)
    tiny = jnp.finfo(problem.dtype).tiny
    scale = jnp.sqrt(scale2) if self.relative else jnp.ones((), problem.dtype)
    scale = jnp.where(scale > tiny, scale, 1.0).astype(problem.dtype)
    state = NullSpaceState(
      eta=jnp.asarray(self.step_size, problem.dtype),
      scale=jax.lax.stop_gradient(scale),
      bases=tuple(bases),
      free=free,
      movable=jnp.asarray(movable, problem.dtype),
      total=jnp.asarray(total, problem.dtype),
    )
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return state, ((zeros, zeros) if self.orthogonalize else zeros)

  def evaluate(self, problem, w, g):
    (jv, (value, loss)), grad = jax.value_and_grad(problem.signed, has_aux=True)(w, g)
    if not self.orthogonalize:
      return jv, value, loss, grad
    return jv, value, loss, (grad, jax.grad(problem.loss)(w))

  def project(self, problem, w, state, grad, *, movable_only=False) -> chex.ArrayTree:
    """``grad`` projected per layer onto the null spaces (zeros on fixed leaves);
    with ``movable_only``, ``grad`` itself on the movable leaves instead."""
    plan = _plan(problem.loss_fn, w, problem.data)
    g_leaves, treedef = jax.tree_util.tree_flatten(grad)
    out = [jnp.zeros_like(x) for x in g_leaves]
    bases = iter(state.bases)
    for lp in plan.leaves:
      if lp is not None:
        g = g_leaves[lp.position]
        out[lp.position] = g if movable_only else _project(g, next(bases), lp)
    return jax.tree_util.tree_unflatten(treedef, out)

  def direction(self, problem, w, state, aux) -> chex.ArrayTree:
    """The step direction: the projected objective gradient (see :class:`NullSpace`)."""
    if not self.orthogonalize:
      return self.project(problem, w, state, aux)
    grad, grad_loss = aux
    d = self.project(problem, w, state, grad)
    # exactly, grad_loss . d = 0; in floating point the remainder is a direction
    # in which the steps keep changing the loss, which an objective that rewards
    # a lower loss follows step after step; removing it moves d by a rounding-level
    # multiple of grad_loss
    tiny = jnp.finfo(problem.dtype).tiny
    coef = optax.tree.vdot(d, grad_loss) / jnp.maximum(optax.tree.vdot(grad_loss, grad_loss), tiny)
    return optax.tree.add_scale(d, -coef, grad_loss)

  def propose(self, problem, w, state, aux):
    plan = _plan(problem.loss_fn, w, problem.data)
    d = self.direction(problem, w, state, aux)
    grad = aux[0] if self.orthogonalize else aux
    finfo = jnp.finfo(problem.dtype)
    # a projection of a gradient that lies in the layers' row spaces leaves only
    # rounding noise; normalising it would step out of the null space
    g_norm = optax.tree.norm(self.project(problem, w, state, grad, movable_only=True))
    d_norm = optax.tree.norm(d)
    signal = d_norm > _NOISE * finfo.eps * g_norm
    scale = jnp.where(signal, state.eta * state.scale / jnp.maximum(d_norm, finfo.tiny), 0.0)
    w_leaves, treedef = jax.tree_util.tree_flatten(w)
    d_leaves = jax.tree_util.tree_leaves(d)
    out = list(w_leaves)
    for lp in plan.leaves:
      if lp is not None:
        i = lp.position
        out[i] = (w_leaves[i] + scale * d_leaves[i]).astype(jnp.result_type(w_leaves[i]))
    return jax.tree_util.tree_unflatten(treedef, out), None

  def update(self, state, accepted, improvement=None, aux=None):
    del improvement, aux  # kept steps grow the step, refused ones shrink it
    return state._replace(eta=backends.adapted_step(state.eta, accepted, self))

  def moves(self, state):
    return state.free > 0

  def stats(self, state):
    return {
      "final_step_size": state.eta,
      "movable_fraction": state.movable / jnp.maximum(state.total, 1),
      "null_fraction": state.free / jnp.maximum(state.total, 1),
      "grad_evals_per_step": jnp.asarray(self.cost_per_step(), state.eta.dtype),
    }

  def stats_template(self, dtype):
    z = jnp.zeros((), dtype)
    return {
      "final_step_size": z,
      "movable_fraction": z,
      "null_fraction": z,
      "grad_evals_per_step": z,
    }

  def cost_per_step(self) -> float:
    """One objective gradient, plus one loss gradient with ``orthogonalize``; the
    projections cost about two products of each movable weight with ``n`` rows
    (small next to a gradient)."""
    return 2.0 if self.orthogonalize else 1.0

  def report(self, loss_fn, params, data=None) -> tuple[NullSpaceLayer, ...]:
    """Which leaves this back-end moves for ``loss_fn`` on ``data`` (see :func:`nullspace_report`)."""
    return nullspace_report(loss_fn, params, data, tau=self.tau)


class NullSpaceLayer(NamedTuple):
  """One parameter leaf in :func:`nullspace_report`.

  Attributes:
    path: the leaf's path (``"params/Dense_0/kernel"``).
    shape: the leaf's shape.
    rows: rows of its input batch (batch x positions), ``None`` if not a layer weight.
    width: its input width (contracted size), ``None`` if not a layer weight.
    null_dim: dimension of the input batch's null space (per output column).
    moves: whether the null-space back-end moves it on this batch.
    reason: why it does not move (empty if it moves).
  """

  path: str
  shape: tuple[int, ...]
  rows: int | None
  width: int | None
  null_dim: int
  moves: bool
  reason: str


def _ranks(loss_fn, params, data, tau) -> dict[int, chex.Array]:
  plan = _plan(loss_fn, params, data)
  dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
  inputs = _layer_inputs(loss_fn, params, data, plan)
  out = {}
  for lp in plan.leaves:
    if lp is not None:
      t = tau if tau is not None else default_tau(lp.rows, lp.bkm[1], dtype)
      out[lp.position] = _range_basis(inputs[lp.position].astype(dtype), t)[1]
  return out


_ranks_jit = jax.jit(_ranks, static_argnums=(0, 3))


def nullspace_report(
  loss_fn, params: chex.ArrayTree, data: Any = None, *, tau: float | None = None
) -> tuple[NullSpaceLayer, ...]:
  """Which parameter leaves the null-space back-end can move, and why not the others.

  Runs on concrete values (it computes the SVDs in one compiled call), so call it
  outside ``jit``.

  Args:
    loss_fn: ``loss_fn(params, data) -> scalar`` (``loss_fn(params)`` if ``data`` is None).
    params: the parameters.
    data: the batch.
    tau: relative singular-value cut-off (``None``: :func:`default_tau`).

  Returns:
    One :class:`NullSpaceLayer` per leaf of ``params``, in ``jax.tree_util`` order.

  Examples:
    >>> import jax.numpy as jnp, teleport_jax as tj
    >>> params = {"w": jnp.ones((5, 3)), "b": jnp.zeros(3)}
    >>> loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"] + p["b"]))
    >>> [(r.path, r.null_dim, r.moves) for r in tj.solvers.nullspace_report(loss, params, jnp.ones((2, 5)))]
    [('b', 0, False), ('w', 4, True)]
  """
  plan = _plan(loss_fn, params, data)
  try:
    ranks = _ranks_jit(loss_fn, params, data, tau)
  except TypeError:  # an unhashable loss_fn
    ranks = _ranks(loss_fn, params, data, tau)
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for i, (path, _) in enumerate(flat):
    lp = plan.leaves[i]
    null = 0
    reason = plan.reasons[i]
    if lp is not None:
      null = int(np.min(lp.bkm[1] - np.asarray(ranks[i])))
      if null == 0:
        reason = "input batch has full column rank: no null space"
    out.append(
      NullSpaceLayer(
        path=paths_lib.path_str(path),
        shape=plan.shapes[i],
        rows=plan.rows[i],
        width=plan.widths[i],
        null_dim=null,
        moves=lp is not None and null > 0,
        reason=reason,
      )
    )
  return tuple(out)


def held_out_drift(
  loss_fn, params: chex.ArrayTree, new_params: chex.ArrayTree, data: Any
) -> chex.Array:
  r"""Relative loss change between two parameter sets on other data.

  A teleport keeps the loss on the batch it was computed from; a group-free
  teleport (and the data-dependent GL action) does not keep it on other data.
  This returns :math:`|L(w', D) - L(w, D)| / |L(w, D)|` for a held-out batch
  ``D`` (traceable).

  Args:
    loss_fn: ``loss_fn(params, data) -> scalar``.
    params: parameters before the teleport.
    new_params: parameters after it.
    data: held-out batch (not the one the teleport used).

  Returns:
    A scalar.

  Examples:
    >>> import jax.numpy as jnp, teleport_jax as tj
    >>> loss = lambda w, x: jnp.sum((x @ w) ** 2)
    >>> float(tj.solvers.held_out_drift(loss, jnp.ones(2), jnp.array([1.0, 2.0]), jnp.eye(2)))
    1.5
  """
  before = obj_lib.call_loss(loss_fn, params, data)
  after = obj_lib.call_loss(loss_fn, new_params, data)
  tiny = jnp.finfo(jnp.result_type(before, jnp.float32)).tiny
  return jnp.abs(after - before) / jnp.maximum(jnp.abs(before), tiny)


backends.SOLVERS["nullspace"] = NullSpace

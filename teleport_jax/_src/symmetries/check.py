r"""Is the declared group a symmetry of *this* loss? A cheap numerical check.

A symmetry keeps the loss on every orbit: :math:`L(g\cdot w) = L(w)` for all
``g``. To first order at the identity that means :math:`\nabla L(w)\cdot\delta w
= 0` for every generator's tangent :math:`\delta w = \tfrac{d}{dt}\,\exp(tM)\cdot
w|_{t=0}`. :func:`symmetry_check` measures

.. math:: e = \max_{p, M} \frac{|\nabla L(p)\cdot\delta w_M(p)|}
                               {\|\nabla L(p)\|\,\|\delta w_M(p)\|},

the cosine between the gradient and a generator's tangent, for a few fixed
random generators ``M`` at the parameters and at a randomly perturbed copy of
them (a true symmetry holds at every point; a perturbed point also avoids a
vanishing gradient at a critical point). For an exact action ``e`` is at the
rounding level; for a group that is not a symmetry (rescaling across GELU,
tanh or a LayerNorm, layers chained across a residual add, layers in the wrong
order, a wrong declared activation) it is of order ``0.1``. The check also
reports when no generator moves the parameters at all (nothing to teleport). Finite
elements are the guard's business: every inner step of a teleport is one, and
it is kept only if the loss stays within ``rtol``.

The check costs about one gradient evaluation plus a few forward-mode
products through the action, once per teleport.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from teleport_jax._src.core import noise
from teleport_jax._src.core import tracing
from teleport_jax._src.symmetries import symmetry as sym_lib


class CheckResult(NamedTuple):
  """Outcome of :func:`symmetry_check` (arrays, so it passes through jit).

  Attributes:
    error: the largest relative first-order loss change (a cosine in [0, 1]).
    finite_drift: reserved (0): finite elements are checked by the teleport's guard.
    moves: whether any generator moves the parameters.
    ok: ``error <= tol`` (or nothing moves).
  """

  error: chex.Array
  finite_drift: chex.Array
  moves: chex.Array
  ok: chex.Array


def default_check_tol(dtype) -> float:
  """Largest first-order relative loss change (cosine) a symmetry may show.

  Exact actions measure at the rounding level (about 1e-8 in float32, 1e-16 in
  float64 on the test problems, ill-conditioned data-dependent ones included);
  non-symmetries measure 5e-4 (a LeakyReLU slope declared 0.01 for 0.1) to 0.1
  (rescaling across GELU, tanh, LayerNorm, residual adds). A loss computed in
  bfloat16 or float16 gets 1e-2.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float64:
    return 1e-9
  if dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return 1e-2
  return 1e-4


def compute_resolution(loss_of, params: chex.ArrayTree):
  """The floating dtype of least precision that ``loss_of(params)`` computes in.

  A model can compute in bfloat16 (a flax module with ``dtype=jnp.bfloat16``
  casts its parameters down) while its parameters and its loss are float32: the
  first-order check then measures bfloat16 rounding, whatever the dtype of
  the loss. Read off the traced program (abstract values only; nothing runs);
  ``None`` when it holds no floating-point value.
  """
  avals = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params
  )
  try:
    closed = jax.make_jaxpr(loss_of)(avals)
  except Exception:  # noqa: BLE001 - a loss that cannot be traced alone: no finding
    return None
  found = None
  for eqn, _ in tracing.walk(closed.jaxpr):
    for v in eqn.outvars:
      dtype = getattr(getattr(v, "aval", None), "dtype", None)
      try:
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
          continue
      except TypeError:
        continue
      if found is None or jnp.finfo(dtype).eps > jnp.finfo(found).eps:
        found = jnp.dtype(dtype)
  return found


def resolution_tol(loss_of, params: chex.ArrayTree, tol: float) -> float:
  """``tol``, raised to :func:`default_check_tol` of the dtype the loss computes in."""
  dtype = compute_resolution(loss_of, params)
  return tol if dtype is None else max(float(tol), default_check_tol(dtype))


def _perturb(params, seed, scale):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  out = []
  for k, x in enumerate(leaves):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      out.append(x)
      continue
    rms = jnp.sqrt(jnp.mean(jnp.square(x))) if x.size else jnp.zeros((), x.dtype)
    out.append(x + (scale * rms) * noise.normal((seed, k), x.shape, x.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def _directions(seed, zeros_flat, num):
  u = noise.normal(seed, (num, zeros_flat.shape[0]), zeros_flat.dtype)
  n = jnp.linalg.norm(u, axis=1, keepdims=True)
  return u / jnp.maximum(n, jnp.finfo(zeros_flat.dtype).tiny)


def _first_order(loss_of, symmetry, params, data, grads, dirs, unravel, zeros_flat):
  """Cosines and tangent norms for each direction at ``params``."""

  def tangent(v):
    def moved(x):
      return ravel_pytree(symmetry.act_linearized(params, unravel(x), data))[0]

    return jax.jvp(moved, (zeros_flat,), (v,))[1]

  gflat = ravel_pytree(grads)[0]
  gnorm = jnp.linalg.norm(gflat)
  tangents = jnp.stack([tangent(dirs[i]) for i in range(dirs.shape[0])])
  tnorm = jnp.linalg.norm(tangents, axis=1)
  dots = jnp.abs(tangents @ gflat.astype(tangents.dtype))
  tiny = jnp.finfo(gflat.dtype).tiny
  cos = dots / jnp.maximum(gnorm * tnorm, tiny)
  del loss_of
  return cos, tnorm, gnorm


def symmetry_check(
  loss_of,
  symmetry: sym_lib.Symmetry,
  params: chex.ArrayTree,
  data: Any,
  grads: chex.ArrayTree,
  *,
  tol: float,
  num_directions: int = 2,
  perturbation: float = 1e-2,
  seed: int = 0,
) -> CheckResult:
  """Checks numerically that ``symmetry`` keeps ``loss_of`` (see the module docstring).

  Args:
    loss_of: ``params -> loss`` on the teleport's batch.
    symmetry: the group.
    params: the point (in the compute dtype).
    data: the batch, passed to data-dependent actions.
    grads: ``grad(loss_of)(params)`` (already computed by the teleport).
    tol: largest allowed cosine; raised to the rounding level of the dtype
      the loss computes in (:func:`compute_resolution`: 1e-2 for a model that
      computes in bfloat16 or float16 whatever the dtypes of its parameters and
      loss).
    num_directions: random generators per point.
    perturbation: size of the perturbed point, relative to each leaf's RMS.
    seed: seed of the directions and the perturbation (fixed: reproducible).

  Returns:
    A :class:`CheckResult`.
  """
  tol = resolution_tol(loss_of, params, tol)
  zeros = symmetry.algebra_zeros(params)
  zeros_flat, unravel = ravel_pytree(zeros)
  dtype = ravel_pytree(params)[0].dtype
  if zeros_flat.shape[0] == 0:
    z = jnp.zeros((), dtype)
    return CheckResult(z, z, jnp.asarray(False), jnp.asarray(True))
  k_dir, k_pert, k_dir2 = (seed, 0), (seed, 1), (seed, 2)
  dirs = _directions(k_dir, zeros_flat, num_directions)
  cos0, tn0, gn0 = _first_order(loss_of, symmetry, params, data, grads, dirs, unravel, zeros_flat)

  other = _perturb(params, k_pert, perturbation)
  loss1, grads1 = jax.value_and_grad(loss_of)(other)
  dirs2 = _directions(k_dir2, zeros_flat, num_directions)
  cos1, tn1, gn1 = _first_order(loss_of, symmetry, other, data, grads1, dirs2, unravel, zeros_flat)

  scale = jnp.maximum(jnp.linalg.norm(ravel_pytree(params)[0]), jnp.finfo(dtype).tiny)
  eps = jnp.finfo(dtype).eps
  moving0 = tn0 > 16 * eps * scale
  moving1 = tn1 > 16 * eps * scale
  tiny = jnp.finfo(dtype).tiny
  valid0 = moving0 & (gn0 > tiny) & jnp.isfinite(cos0)
  valid1 = moving1 & (gn1 > tiny) & jnp.isfinite(cos1) & jnp.isfinite(loss1)
  error = jnp.maximum(
    jnp.max(jnp.where(valid0, cos0, 0.0)), jnp.max(jnp.where(valid1, cos1, 0.0))
  ).astype(dtype)
  moves = jnp.any(moving0)

  # (finite elements are checked by the teleport's guard: every inner step is one, and it is
  # kept only if the loss stays within rtol)
  ok = (error <= tol) | ~moves
  return CheckResult(error, jnp.zeros((), dtype), moves, ok)


def _parts(zeros) -> list[int] | None:
  if isinstance(zeros, tuple) and len(zeros) > 1:
    return list(range(len(zeros)))
  return None


def part_names(symmetry: sym_lib.Symmetry, params: chex.ArrayTree) -> list[str]:
  """Readable names of the parts of a product-like group (hidden layers, sites)."""
  prod = None
  if hasattr(symmetry, "as_product"):
    try:
      prod = symmetry.as_product(params)
    except Exception:  # noqa: BLE001 - names are a courtesy
      prod = None
  elif hasattr(symmetry, "parts"):
    prod = symmetry
  if prod is not None:
    out = []
    for p in prod.parts:
      site = getattr(p, "site", None)
      out.append(site.name if site is not None else type(p).__name__)
    return out
  if hasattr(symmetry, "_layout"):
    try:
      layout = symmetry._layout(params)
      ks = layout.kernel_paths
      return [
        f"{jax.tree_util.keystr(ks[m])} -> {jax.tree_util.keystr(ks[m + 1])}"
        for m in range(len(ks) - 1)
      ]
    except Exception:  # noqa: BLE001
      return []
  return []


def diagnose(
  loss_of, symmetry: sym_lib.Symmetry, params: chex.ArrayTree, data: Any, *, tol: float
) -> str:
  """A message naming the parts of ``symmetry`` that are not symmetries, and likely causes.

  Runs the first-order check part by part (for products and MLP groups: one
  part per hidden layer or site), in one compiled call. Called eagerly, after
  a failed check.
  """
  tol = resolution_tol(loss_of, params, tol)
  names = part_names(symmetry, params)
  errors = np.asarray(_part_errors(loss_of, symmetry, params, data))
  bad = [
    (names[i] if i < len(names) else f"part {i}", float(e)) for i, e in enumerate(errors) if e > tol
  ]
  if not bad and len(errors) == 1:
    bad.append(("the group", float(errors[0])))
  kind = type(symmetry).__name__
  where = "; ".join(f"{n}: {e:.2g}" for n, e in bad) or "the group as a whole"
  causes = _likely_causes(symmetry)
  return (
    f"{kind} is not a symmetry of this loss: the loss changes to first order along "
    f"its generators (relative change, tolerance {tol:g}) at {where}. Nothing was moved. "
    f"Likely causes: {causes}"
  )


def _part_errors(loss_of, symmetry, params, data):
  """Largest cosine per part (one part if the algebra is not a tuple), jit-compiled."""

  def errors(params, data):
    zeros = symmetry.algebra_zeros(params)
    flat, unravel = ravel_pytree(zeros)
    parts = _parts(zeros)
    masks = []
    for i in parts or [None]:
      if i is None:
        masks.append(jnp.ones_like(flat))
      else:
        masks.append(
          ravel_pytree(
            tuple(jnp.zeros_like(z) if j != i else jnp.ones_like(z) for j, z in enumerate(zeros))
          )[0]
        )
    other = _perturb(params, 100, 1e-2)
    grads = jax.grad(loss_of)(params)
    grads1 = jax.grad(loss_of)(other)
    out = []
    for k, mask in enumerate(masks):
      dirs = _directions((k,), flat, 4) * mask[None]
      dirs = dirs / jnp.maximum(jnp.linalg.norm(dirs, axis=1, keepdims=True), 1e-30)
      cos0, _, _ = _first_order(loss_of, symmetry, params, data, grads, dirs, unravel, flat)
      cos1, _, _ = _first_order(loss_of, symmetry, other, data, grads1, dirs, unravel, flat)
      both = jnp.concatenate([cos0, cos1])
      out.append(jnp.max(jnp.where(jnp.isfinite(both), both, 0.0)))
    return jnp.stack(out)

  return jax.jit(errors)(params, data)


def _likely_causes(symmetry) -> str:
  kind = type(symmetry).__name__
  common = (
    "a normalisation (LayerNorm, BatchNorm) or a residual connection lies between the layers; "
    "the layers are not in call order (give an explicit teleport_jax.symmetries.MLPLayout, or use "
    "teleport_jax.find_symmetries on the model)"
  )
  if kind == "PositiveRescaling":
    return (
      "the hidden activation is not positively homogeneous (GELU, SiLU, tanh, sigmoid have no "
      "rescaling symmetry; ReLU and LeakyReLU do); " + common + "."
    )
  if kind in ("DataDependentGL", "PublishedDataDependentGL"):
    return (
      "the declared activation differs from the model's (e.g. leaky_relu(0.01) declared for "
      "a model using leaky_relu(0.1)); the batch's layer inputs are rank deficient or so "
      "ill-conditioned that float32 loses the exactness (try a smaller batch or float64); "
      + common
      + "."
    )
  if kind == "LinearGL":
    return (
      "there is a nonlinearity between the layers (LinearGL needs linear layers); " + common + "."
    )
  return (
    "the site's 'between' does not describe the model (a nonlinearity, normalisation or "
    "residual path between writers and readers); " + common + "."
  )

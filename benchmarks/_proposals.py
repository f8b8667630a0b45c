"""Prototypes of cheaper inner steps for the data-dependent GL action (benchmark only).

These re-implement :meth:`teleport_jax.DataDependentGL.act` (exact variant)
for the scaling suite's ``linen``-style MLP so that the savings of proposed
library changes can be *measured* rather than guessed. Nothing here is used by
the library. Each is checked against the library in :func:`check`.

* :func:`act_fused`: the move ``act(w, cayley(xi))`` without forming the Cayley
  transform ``g = (I - xi/2)^{-1} (I + xi/2)``: the features are multiplied by
  ``g`` through one LU solve of ``(I - xi/2)`` with the batch as right-hand
  sides, and ``g^{-1} K = (I + xi/2)^{-1} (I - xi/2) K`` through one LU solve of
  ``(I + xi/2)``; the library forms ``g`` (LU and a ``d``-column solve) and then
  solves with ``g`` (another LU).
* :func:`act_linear`: the action with ``g = I + xi`` and ``g^{-1}`` replaced by
  ``I - xi``. It agrees with ``act(w, cayley(xi))`` to first order at
  ``xi = 0``, so the objective's value *and gradient* at ``xi = 0`` -- all the
  solver needs from ``j`` -- are the same, without any LU factorisation.
* ``pinv="cholesky"``: ``[H, 1]^+ R = [H, 1]^T (G^{-1} R)`` with the Gram matrix
  ``G = [H, 1][H, 1]^T`` (``n x n``) factorised by Cholesky instead of an SVD of
  ``[H, 1]``; valid when the batch fits the width (the only case in which the
  action is exact anyway).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

import teleport_jax as tj
from teleport_jax._src.objectives import objectives as obj_lib
from teleport_jax._src.symmetries import layouts


def _augment(h):
  return jnp.concatenate([h, jnp.ones((h.shape[0], 1), h.dtype)], axis=1)


def _pinv_apply(a, r, how: str):
  """``pinv(a) @ r`` for a wide ``a`` (``n <= cols``)."""
  if how == "svd":
    return jnp.linalg.pinv(a) @ r
  gram = a @ a.T
  c = jsl.cho_factor(gram, lower=True)
  return a.T @ jsl.cho_solve(c, r)


def _parts(params, x, act):
  layout = tj.symmetries.infer_layout(params)
  kernels, biases = layout.get(params)
  inputs, pre = layouts.mlp_forward(kernels, biases, act, x)
  return layout, list(kernels), list(biases), inputs, pre


def _update_incoming(k, b, h, z, features_times_g, act, how):
  target = act.inverse(features_times_g)
  kb = jnp.concatenate([k, b[None, :]], axis=0)
  kb = kb + _pinv_apply(_augment(h), target - z, how)
  return kb[:-1], kb[-1]


def act_fused(params, xi, data, act, how: str = "svd"):
  """``DataDependentGL.act(params, cayley(xi), data)`` without forming ``cayley(xi)``."""
  layout, ks, bs, inputs, pre = _parts(params, data[0], act)
  eye = [jnp.eye(x.shape[0], dtype=x.dtype) for x in xi]
  new_k, new_b = [], []
  for m, (k, b) in enumerate(zip(ks, bs)):
    if m < len(ks) - 1:
      f = act(pre[m])
      # f @ (I - xi/2)^{-1} (I + xi/2)
      fg = jnp.linalg.solve((eye[m] - 0.5 * xi[m]).T, f.T).T @ (eye[m] + 0.5 * xi[m])
      k, b = _update_incoming(k, b, inputs[m], pre[m], fg, act, how)
    if m > 0:
      # g^{-1} K = (I + xi/2)^{-1} (I - xi/2) K
      k = jnp.linalg.solve(eye[m - 1] + 0.5 * xi[m - 1], k - 0.5 * xi[m - 1] @ k)
    new_k.append(k)
    new_b.append(b)
  return layout.set(params, new_k, new_b)


def act_linear(params, xi, data, act, how: str = "svd"):
  """The action with ``g = I + xi`` and ``g^{-1} = I - xi`` (first order at ``xi = 0``)."""
  layout, ks, bs, inputs, pre = _parts(params, data[0], act)
  new_k, new_b = [], []
  for m, (k, b) in enumerate(zip(ks, bs)):
    if m < len(ks) - 1:
      f = act(pre[m])
      k, b = _update_incoming(k, b, inputs[m], pre[m], f + f @ xi[m], act, how)
    if m > 0:
      k = k - xi[m - 1] @ k
    new_k.append(k)
    new_b.append(b)
  return layout.set(params, new_k, new_b)


def inner_step(loss_fn, act, *, fused: bool, linear_j: bool, how: str, symmetry=None):
  """One solver iteration: ``step(w, data, xi) -> (cand, value, grad)``.

  Moves to ``cand = act(w, cayley(xi))``, then evaluates the objective (squared
  gradient norm) and its gradient on the algebra at ``cand`` (``xi = 0``), as
  ``teleport_with_grad``'s loop body does. With ``fused=False, linear_j=False``
  it is the library's computation (for any ``symmetry``).
  """
  sym = symmetry or tj.DataDependentGL(activation=act)
  objective = obj_lib.grad_norm_sq()

  def j(xi, w, data):
    if linear_j:
      moved = act_linear(w, xi, data, act, how)
    else:
      moved = sym.act(w, sym.retract(xi), data)
    return obj_lib.evaluate(objective, loss_fn, moved, data)[0]

  def step(params, data, xi):
    if fused:
      cand = act_fused(params, xi, data, act, how)
    else:
      cand = sym.act(params, sym.retract(xi), data)
    value, grad = jax.value_and_grad(j)(sym.algebra_zeros(cand), cand, data)
    return cand, value, grad

  return step


def loop(step, scale: float = 0.01):
  """``run(params, data, xi, n)``: ``n`` iterations of ``step`` (a dynamic count),
  each moving along the normalised gradient of the previous one, as the solver does."""

  def run(params, data, xi, n):
    def body(_, c):
      w, xi = c
      cand, _, g = step(w, data, xi)
      norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(g)))
      inv = scale / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny)
      return cand, jax.tree_util.tree_map(lambda x: x * inv, g)

    return jax.lax.fori_loop(0, n, body, (params, xi))

  return run


VARIANTS = {
  "full action in j (earlier library step)": dict(fused=False, linear_j=False, how="svd"),
  "+ j linearised at xi=0 (no LU in j)": dict(fused=False, linear_j=True, how="svd"),
  "+ fused Cayley move": dict(fused=True, linear_j=True, how="svd"),
  "+ Cholesky pinv": dict(fused=True, linear_j=True, how="cholesky"),
}


def _rel(a, b) -> float:
  la = jax.tree_util.tree_leaves(a)
  lb = jax.tree_util.tree_leaves(b)
  num = max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    for x, y in zip(la, lb)
  )
  den = max(float(np.max(np.abs(np.asarray(y, np.float64)))) for y in lb)
  return num / max(den, 1e-30)


def check(loss_fn, act, params, data, xi) -> dict[str, float]:
  """Relative differences of the prototypes from the library (should be rounding-level)."""
  sym = tj.DataDependentGL(activation=act)
  lib_move = jax.jit(lambda p, d, x: sym.act(p, sym.retract(x), d))(params, data, xi)
  out = {
    "act_fused vs library act": _rel(
      jax.jit(lambda p, d, x: act_fused(p, x, d, act))(params, data, xi), lib_move
    ),
    "act_fused(cholesky) vs library act": _rel(
      jax.jit(lambda p, d, x: act_fused(p, x, d, act, "cholesky"))(params, data, xi), lib_move
    ),
  }
  ref = jax.jit(inner_step(loss_fn, act, **next(iter(VARIANTS.values()))))(params, data, xi)
  for name, kw in list(VARIANTS.items())[1:]:
    got = jax.jit(inner_step(loss_fn, act, **kw))(params, data, xi)
    out[f"{name}: grad on the algebra vs library"] = _rel(got[2], ref[2])
  return out

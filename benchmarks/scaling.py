"""Cost of one inner teleport step relative to one gradient evaluation.

Model: a random MLP with ``depth`` dense layers, input and output ``width``,
hidden widths ``width`` (see the note on jaxlib below), flax ``linen``-style
parameters (``{"params": {"Dense_i": {"kernel": (in, out), "bias": (out,)}}}``),
LeakyReLU(0.1), MSE loss on batch-first inputs ``(batch, width)``, float32.

* gradient evaluation: ``jax.jit(jax.value_and_grad(loss))``;
* inner teleport step: ``(T(N1) - T(N0)) / (N1 - N0)`` where ``T(N)`` is the
  run time of the compiled ``tj.teleport(..., num_steps=N)`` (default objective:
  maximise the squared gradient norm), so the fixed costs (gradient at the
  start and end, the loss check) cancel;
* both symmetries: data-free :class:`teleport_jax.PositiveRescaling` and the
  data-dependent :class:`teleport_jax.DataDependentGL` (only where
  ``batch <= width + 1``: otherwise ``DataDependentGL.active_layers`` leaves
  every hidden layer fixed and the teleport does nothing).

For the data-dependent action the suite also times the pieces of an inner
step as jitted micro-benchmarks (pseudo-inverses of the layer inputs, Cayley
transforms, LU solves, the action, the objective's gradient on the Lie algebra,
the gradient of the squared gradient norm), reports XLA's flop estimates
(``compiled.cost_analysis()``), and times prototypes of cheaper inner steps
(:mod:`benchmarks._proposals`) to measure what the proposed library changes
would save.

Hidden widths are all equal to ``width``. (jaxlib 0.10.x's batched CPU LAPACK
kernels can deadlock a 2-thread pool when two run at once; the library
therefore does not batch per-layer factorisations on the CPU backend, see
``teleport_jax._src.symmetries.symmetry.batched_over_equal_shapes``.)
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import optax

import teleport_jax as tj
from benchmarks import _common as C
from benchmarks import _proposals as P
from teleport_jax._src.objectives import objectives as obj_lib
from teleport_jax._src.symmetries import data_gl

ACT = tj.activations.leaky_relu(0.1)
DTYPE = jnp.float32

# (width, depth, batch, prototypes) points. Full: one factor at a time around a
# base point (width 256, depth 4, batch 64) plus large-width points.
GRIDS = {
  "smoke": [(16, 3, 8, False)],
  "quick": [(256, 3, 64, True)],
  "full": [
    # width sweep (depth 4, batch 16: the data-dependent action applies at every width)
    (16, 4, 16, False),
    (64, 4, 16, False),
    (256, 4, 16, True),
    (1024, 4, 16, True),
    (2048, 4, 16, False),
    # depth sweep (width 256, batch 64)
    (256, 3, 64, False),
    (256, 4, 64, True),
    (256, 6, 64, False),
    # batch sweep (width 256, depth 4)
    (256, 4, 256, True),
    (256, 4, 1024, False),
    (256, 4, 4096, False),
    # large widths with batch = width / 2 and = width
    (512, 4, 256, False),
    (512, 4, 512, True),
    (1024, 4, 512, True),
  ],
}
_LINALG_PIECES = ("pinv (layer inputs)", "cayley (retract)", "solve A^-1 K")
_CHEAP_PIECES = (*_LINALG_PIECES, "grad of |grad|^2 (no action)")
# data_gl_teleport: run the data-dependent teleport itself (smoke: only the
# pieces of its action, so the smoke test compiles fast); inner: time one
# standalone loop iteration of each symmetry (and take its flops); pieces:
# which pieces of the data-dependent action to time (None: all).
SETTINGS = {
  "smoke": dict(
    n0=1, n1=2, repeats=3, min_sample_s=0.002, data_gl_teleport=False, inner=False,
    pieces=_LINALG_PIECES,
  ),
  "quick": dict(
    n0=1, n1=5, repeats=5, min_sample_s=0.01, data_gl_teleport=True, inner=True,
    pieces=_CHEAP_PIECES,
  ),
  "full": dict(
    n0=1, n1=5, repeats=9, min_sample_s=0.02, data_gl_teleport=True, inner=True, pieces=None,
  ),
}  # fmt: skip
# Above this width the data-dependent teleport itself is not run (an inner step
# costs seconds: O(width^3) LU factorisations); its pieces are still timed.
MAX_DATA_GL_TELEPORT_WIDTH = 1024
# Points whose teleport timing would take longer than this (seconds, estimated
# from one loop iteration) get N1 = N0 + 2 and fewer rounds.
SLOW_POINT_S = 60.0


def distinct_hidden_widths() -> bool:
  """Kept for the JSON record: hidden widths are no longer made distinct."""
  return False


def widths_for(width: int, depth: int, distinct: bool) -> list[int]:
  """``[d_0, ..., d_depth]``: input and output ``width``; hidden ``width (+ m)``."""
  return [width] + [width + (m if distinct else 0) for m in range(depth - 1)] + [width]


def make_mlp(key, widths, dtype=DTYPE) -> dict:
  """A random ``linen``-style MLP with kernels ``(widths[i], widths[i + 1])`` and biases."""
  keys = jax.random.split(key, 2 * (len(widths) - 1))
  layers = {}
  for i in range(len(widths) - 1):
    k = jax.random.normal(keys[2 * i], (widths[i], widths[i + 1]), dtype)
    b = 0.1 * jax.random.normal(keys[2 * i + 1], (widths[i + 1],), dtype)
    layers[f"Dense_{i}"] = {"kernel": k * math.sqrt(2.0 / widths[i]), "bias": b}
  return {"params": layers}


def mlp_apply(params, x):
  """Forward pass, ``x`` of shape ``(batch, d_0)``."""
  layers = params["params"]
  h = x
  for i in range(len(layers)):
    h = h @ layers[f"Dense_{i}"]["kernel"] + layers[f"Dense_{i}"]["bias"]
    if i < len(layers) - 1:
      h = ACT(h)
  return h


def mse(params, data):
  """Mean squared error on the batch ``data = (x, y)``."""
  x, y = data
  return jnp.mean((y - mlp_apply(params, x)) ** 2)


def make_batch(key, d_in: int, d_out: int, batch: int, dtype=DTYPE):
  """Random ``(x, y)`` with ``x`` of shape ``(batch, d_in)``, ``y`` of ``(batch, d_out)``."""
  kx, ky = jax.random.split(key)
  return jax.random.normal(kx, (batch, d_in), dtype), jax.random.normal(ky, (batch, d_out), dtype)


def _random_xi(sym, params, key, scale=0.01):
  @jax.jit
  def draw(params, key):
    leaves = sym.algebra_zeros(params)
    keys = jax.random.split(key, len(leaves))
    return tuple(scale * jax.random.normal(k, z.shape, z.dtype) for k, z in zip(keys, leaves))

  return draw(params, key)


def _grad_norm_sq(params, data):
  g = jax.grad(mse)(params, data)
  return optax.tree.vdot(g, g)


def _grad_norm_sq_grad(p, d):
  return jax.value_and_grad(_grad_norm_sq)(p, d)


def _teleport_fn(sym, n):
  return lambda p, d: tj.teleport(mse, p, d, symmetry=sym, num_steps=n)


def _data_gl_pieces(sym, params, data, xi):
  """Jitted pieces of the data-dependent action and their call counts per inner step."""
  layout = tj.symmetries.infer_layout(params)
  kernels, biases = layout.get(params)
  hidden = len(kernels) - 1

  @jax.jit
  def setup(kernels, biases, x, xi):  # one compiled call instead of many eager ops
    h, aug = x, []
    for m in range(hidden):
      aug.append(jnp.concatenate([h, jnp.ones((h.shape[0], 1), DTYPE)], 1))
      h = ACT(h @ kernels[m] + biases[m])
    return aug, sym.retract(xi)

  aug, g = setup(kernels, biases, data[0], xi)

  def pinv_all(hs):  # the library's pinv(a) @ r: thin QR of a^T (r: one column per unit)
    return [
      data_gl._pinv_apply(a, jnp.ones((a.shape[0], a.shape[1] - 1), a.dtype), None) for a in hs
    ]

  def cayley_all(xi):
    return sym.retract(xi)

  def solve_all(g, ks):
    return [jnp.linalg.solve(g[m - 1], ks[m]) for m in range(1, len(ks))]

  def act(p, d, xi):
    return sym.act(p, sym.retract(xi), d)

  def j_grad(p, d):
    def j(xi):
      return obj_lib.evaluate(obj_lib.grad_norm_sq(), mse, sym.act_linearized(p, xi, d), d)[0]

    return jax.value_and_grad(j)(sym.algebra_zeros(p))

  n, d = aug[0].shape
  dh = xi[0].shape[0]
  # name: (fn, args, calls per inner step, what)
  return {
    "pinv (layer inputs)": (pinv_all, (aug,), 2, f"{hidden} x QR pinv-apply of ({n}, {d})"),
    "cayley (retract)": (cayley_all, (xi,), 1, f"{hidden} x LU + {dh}-column solve"),
    "solve A^-1 K": (solve_all, (g, list(kernels)), 1, f"{hidden} x LU + solve"),
    "act (whole action)": (act, (params, data, xi), 1, "forward + the above + matmuls"),
    "d/dxi objective (j_and_grad)": (j_grad, (params, data), 1, "act + grad-norm + backward"),
    "grad of |grad|^2 (no action)": (_grad_norm_sq_grad, (params, data), 1, "second-order part"),
  }


def _measure_point(width, depth, batch, prototypes, cfg, notes, distinct):
  key = jax.random.key(width * 1000 + depth * 10 + batch)
  k_p, k_d, k_xi = jax.random.split(key, 3)
  widths = widths_for(width, depth, distinct)
  params = jax.jit(make_mlp, static_argnums=1)(k_p, tuple(widths))
  data = jax.jit(make_batch, static_argnums=(1, 2, 3))(k_d, widths[0], widths[-1], batch)
  grad = C.compile_fn(jax.value_and_grad(mse), params, data)
  i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731

  syms = {"rescaling": tj.PositiveRescaling()}
  dgl = tj.DataDependentGL(activation=ACT)
  active = dgl.active_layers(params, batch)
  dgl_ok = all(active)
  if dgl_ok and width <= MAX_DATA_GL_TELEPORT_WIDTH and cfg["data_gl_teleport"]:
    syms["data_gl"] = dgl
  elif dgl_ok and cfg["data_gl_teleport"]:
    notes.append(
      f"width {width}, depth {depth}, batch {batch}: data-dependent teleport not run (an inner "
      "step would take many seconds here: O(width^3) LU work); its pieces are timed below."
    )
  # the solver's loop body alone (same computation, no safeguard bookkeeping), in a
  # loop with a dynamic trip count: one compile, timed at N0 and N1; one iteration of
  # it also sizes the run (slow points get fewer steps and rounds)
  loops, xis = {}, {}
  est = min(C._call(lambda: grad(params, data)) for _ in range(2))
  for name, sym in syms.items() if cfg["inner"] else ():
    xis[name] = _random_xi(sym, params, k_xi)
    step = P.inner_step(mse, ACT, fused=False, linear_j=False, how="svd", symmetry=sym)
    loops[name] = C.compile_fn(P.loop(step), params, data, xis[name], i32(1))
    one = lambda c=loops[name], xi=xis[name]: c(params, data, xi, i32(1))  # noqa: E731
    C._call(one)
    est = max(est, C._call(one))
  # seconds per round of the slowest teleport call (N1 + 2 loop iterations) x rounds
  n0, n1, repeats, min_sample = cfg["n0"], cfg["n1"], cfg["repeats"], cfg["min_sample_s"]
  if est * (n1 + 2) * 2 * (repeats + 1) > SLOW_POINT_S:
    n1, repeats, min_sample = n0 + 2, max(3, repeats // 3), 0.0
  fns = {"grad": lambda: grad(params, data)}
  compiled = {}
  for name, sym in syms.items():
    for n in (n0, n1):
      c = C.compile_fn(_teleport_fn(sym, n), params, data)
      compiled[(name, n)] = c
      fns[f"{name}_{n}"] = lambda c=c: c(params, data)
    if name in loops:
      for n in (n0, n1):
        n_arr = i32(n)
        fns[f"{name}_loop_{n}"] = lambda c=loops[name], xi=xis[name], n=n_arr: c(
          params, data, xi, n
        )
  t = C.time_side_by_side(fns, repeats=repeats, min_sample_s=min_sample)
  t_grad = t["grad"].median
  f_grad = C.flops(grad)
  rows = []
  for name in ("rescaling", "data_gl"):
    if name not in syms:
      rows.append(
        dict(
          width=width, depth=depth, batch=batch, symmetry=name, grad_ms=1e3 * t_grad,
          note=(
            f"skipped: batch {batch} > width + 1 (active_layers {list(active)})"
            if not dgl_ok
            else ("skipped: width too large" if cfg["data_gl_teleport"] else "skipped in this mode")
          ),
        )
      )  # fmt: skip
      continue
    step = (t[f"{name}_{n1}"].median - t[f"{name}_{n0}"].median) / (n1 - n0)
    loop_step = None
    if name in loops:
      loop_step = (t[f"{name}_loop_{n1}"].median - t[f"{name}_loop_{n0}"].median) / (n1 - n0)
    # cost analysis counts a while loop's body once: the loop's flops are one iteration's
    f_loop = C.flops(loops[name]) if name in loops else None
    rows.append(
      dict(
        width=width, depth=depth, batch=batch, symmetry=name, grad_ms=1e3 * t_grad,
        step_ms=1e3 * step, step_per_grad=step / t_grad,
        body_per_grad=None if loop_step is None else loop_step / t_grad,
        # the solver's per-step bookkeeping (safeguard selects over params, finiteness checks)
        overhead_frac=None if loop_step is None else 1.0 - loop_step / step,
        flops_per_grad=(f_loop / f_grad) if f_loop and f_grad else None,
        compile_s=compiled[(name, n1)].total_s,
        note=f"N0={n0}, N1={n1}, {repeats} rounds",
      )
    )  # fmt: skip
  detail = {
    "widths": widths,
    "grad": {**t["grad"].as_dict(), "flops": f_grad, "compile_s": grad.total_s},
    "teleport": {
      f"{name}_num_steps_{n}": {
        **t[f"{name}_{n}"].as_dict(),
        "compile_s": compiled[(name, n)].total_s,
      }
      for name in syms
      for n in (n0, n1)
    },
    "loop_body": {
      name: {f"iterations_{n}": t[f"{name}_loop_{n}"].as_dict() for n in (n0, n1)}
      | {"flops": C.flops(c), "compile_s": c.total_s}
      for name, c in loops.items()
    },
    "data_gl_active_layers": list(active),
  }
  pieces, protos = [], []
  if dgl_ok:
    xi = _random_xi(dgl, params, k_xi)
    spec = _data_gl_pieces(dgl, params, data, xi)
    keep = cfg["pieces"] if width < 1024 or cfg["pieces"] is not None else _CHEAP_PIECES
    if keep is not None:
      spec = {k: v for k, v in spec.items() if k in keep}
    comp = {k: C.compile_fn(fn, *args) for k, (fn, args, _, _) in spec.items()}
    tp = C.time_side_by_side(
      {"grad": lambda: grad(params, data)}
      | {k: (lambda c=comp[k], a=spec[k][1]: c(*a)) for k in spec},
      repeats=max(3, repeats // 2 + 1),
      min_sample_s=min_sample,
    )
    dgl_row = next(r for r in rows if r["symmetry"] == "data_gl")
    ref = dgl_row.get("step_ms")
    for k, (_, _, per_step, what) in spec.items():
      ms = 1e3 * tp[k].median
      pieces.append(
        dict(
          width=width, depth=depth, batch=batch, piece=k, ms=ms,
          per_grad=tp[k].median / tp["grad"].median, calls_per_step=per_step,
          ms_per_step=per_step * ms, frac_of_step=per_step * ms / ref if ref else None,
          flops=C.flops(comp[k]), what=what,
        )
      )  # fmt: skip
    detail["data_gl_pieces"] = {p["piece"]: p for p in pieces}
    if prototypes and "data_gl" in loops:
      protos, detail["prototypes"] = _measure_prototypes(
        params, data, xis["data_gl"], loops["data_gl"], grad, (n0, n1), repeats, min_sample,
        (width, depth, batch),
      )  # fmt: skip
  return rows, pieces, protos, detail


def _measure_prototypes(params, data, xi, lib_loop, grad, ns, repeats, min_sample, point):
  """Per-iteration time of the library's loop body vs the prototypes of :mod:`_proposals`."""
  width, depth, batch = point
  n0, n1 = ns
  checks = P.check(mse, ACT, params, data, xi)
  i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
  comp = {"library inner step": lib_loop}
  for name, kw in list(P.VARIANTS.items())[1:]:
    comp[name] = C.compile_fn(P.loop(P.inner_step(mse, ACT, **kw)), params, data, xi, i32(1))
  fns = {"grad": lambda: grad(params, data)}
  for k, c in comp.items():
    for n in (n0, n1):
      n_arr = i32(n)
      fns[f"{k}|{n}"] = lambda c=c, n=n_arr: c(params, data, xi, n)
  t = C.time_side_by_side(fns, repeats=max(3, repeats), min_sample_s=min_sample)
  per = {k: (t[f"{k}|{n1}"].median - t[f"{k}|{n0}"].median) / (n1 - n0) for k in comp}
  base = per["library inner step"]
  f_grad = C.flops(grad) or 0
  rows = []
  for k in comp:
    f = C.flops(comp[k])
    rows.append(
      dict(
        width=width, depth=depth, batch=batch, inner_step=k, ms=1e3 * per[k],
        per_grad=per[k] / t["grad"].median, vs_library=per[k] / base,
        flops_per_grad=(f / f_grad) if f and f_grad else None,
      )
    )  # fmt: skip
  return rows, {"rows": rows, "max_rel_diff_vs_library": checks}


def run(mode: str) -> dict:
  """Runs the suite; returns its JSON-ready result."""
  cfg = SETTINGS[mode]
  t0 = time.perf_counter()
  distinct = distinct_hidden_widths()
  rows, pieces, protos, details, notes = [], [], [], [], []
  for width, depth, batch, prototypes in GRIDS[mode]:
    t = time.perf_counter()
    r, p, pr, d = _measure_point(width, depth, batch, prototypes, cfg, notes, distinct)
    rows += r
    pieces += p
    protos += pr
    details.append(
      {"width": width, "depth": depth, "batch": batch, **d, "wall_s": time.perf_counter() - t}
    )
    print(
      f"  scaling: width {width} depth {depth} batch {batch}: {time.perf_counter() - t:.1f} s",
      flush=True,
    )
  targets = []
  for name, limit, label in (
    ("rescaling", 3.0, "data-free PositiveRescaling"),
    ("data_gl", 5.0, "data-dependent DataDependentGL"),
  ):
    big = [
      r for r in rows if r["symmetry"] == name and r["width"] >= 256 and r.get("step_per_grad")
    ]
    if not big:
      continue
    worst = max(big, key=lambda r: r["step_per_grad"])
    best = min(big, key=lambda r: r["step_per_grad"])
    detail = (
      f"worst at width {worst['width']}, depth {worst['depth']}, batch {worst['batch']}; best "
      f"{best['step_per_grad']:.2f}x at width {best['width']}, depth {best['depth']}, batch "
      f"{best['batch']}; {sum(r['step_per_grad'] <= limit for r in big)} of {len(big)} points pass"
    )
    if worst["step_per_grad"] > limit:
      detail += f". MISS by {worst['step_per_grad'] / limit:.1f}x: " + _why(
        name, worst, pieces, protos
      )
    targets.append(
      C.Target(
        f"inner teleport step / gradient evaluation, {label}, width >= 256 (worst point)",
        worst["step_per_grad"],
        limit,
        "<=",
        "x",
        detail=detail,
      ).as_dict()
    )
  notes += _diagnosis(rows, pieces, protos)
  if distinct:
    notes.append(
      "hidden widths are width, width + 1, ... (not all equal) on this backend: jaxlib "
      "< 0.11.1 deadlocks on CPU when batched LAPACK calls (DataDependentGL vmaps the Cayley "
      "transforms of equal-width layers) run concurrently on a small thread pool."
    )
  row_cols = [
    "width", "depth", "batch", "symmetry", "grad_ms", "step_ms", "step_per_grad",
    "body_per_grad", "overhead_frac", "flops_per_grad", "compile_s", "note",
  ]  # fmt: skip
  piece_cols = [
    "width", "depth", "batch", "piece", "ms", "per_grad", "calls_per_step", "ms_per_step",
    "frac_of_step", "flops",
  ]  # fmt: skip
  tables = [
    {
      "title": "scaling: one inner teleport step / one gradient evaluation",
      "rows": rows,
      "columns": row_cols,
    },
    {
      "title": "scaling: where the time goes in the data-dependent action (jitted pieces)",
      "rows": pieces,
      "columns": piece_cols,
    },
  ]
  if protos:
    tables.append(
      {
        "title": "scaling: prototypes of a cheaper data-dependent inner step (benchmarks/_proposals.py)",
        "rows": protos,
      }
    )
  return {
    "suite": "scaling",
    "mode": mode,
    "model": "linen-style MLP with biases, leaky_relu(0.1), MSE; see 'points' for the widths",
    "distinct_hidden_widths": distinct,
    "objective": "max_grad_norm",
    "settings": cfg,
    "rows": rows,
    "data_gl_pieces": pieces,
    "prototypes": protos,
    "points": details,
    "tables": tables,
    "targets": targets,
    "notes": notes
    + [
      "step_per_grad = (T(num_steps=N1) - T(N0)) / (N1 - N0) / T(value_and_grad); "
      "body_per_grad = the same for the solver's loop body alone (move + objective gradient on "
      "the algebra, no safeguard bookkeeping) in a loop with a dynamic trip count; "
      "overhead_frac = 1 - body / step, the share of the solver's per-step bookkeeping "
      "(noisy, can be negative); flops_per_grad = XLA cost-analysis flops of that body / of value_and_grad "
      "(LAPACK custom calls, i.e. SVD and LU, count 0 flops on CPU). Pieces are standalone "
      "jitted calls (own dispatch and buffers), so their fractions can add up to more than 1.",
      f"measured in {time.perf_counter() - t0:.0f} s",
    ],
  }


def _why(name, row, pieces, protos) -> str:
  """Why a point misses its target, from the measured pieces and prototypes."""
  if name == "rescaling":
    out = (
      "the step differentiates |grad L|^2 (reverse over reverse); XLA counts "
      f"{row.get('flops_per_grad') or float('nan'):.1f}x the flops of a gradient, so ~3x is "
      "the floor of this objective"
    )
    if row.get("overhead_frac") is not None:
      out += (
        f"; the solver's per-step bookkeeping (full-parameter selects and finiteness checks) "
        f"took {100 * row['overhead_frac']:.0f}% of the step here"
      )
    return out + "."
  point = (row["width"], row["depth"], row["batch"])
  ps = {p["piece"]: p for p in pieces if (p["width"], p["depth"], p["batch"]) == point}
  out = (
    "the action's dense linear algebra is O(width^3) per hidden layer and step (for the move: "
    "an LU and a width-column solve to form the Cayley transform and an LU solve for A^-1 K; "
    "for the move and again for the objective's first-order action at the new point: a thin "
    "QR of the layer inputs), a gradient is O(batch width^2)"
  )
  lin = [ps[k] for k in _LINALG_PIECES if k in ps]
  if lin:
    grad_ms = lin[0]["ms"] / lin[0]["per_grad"]
    out += (
      f"; here these calls alone take {sum(p['ms_per_step'] for p in lin) / grad_ms:.1f} "
      "gradient evaluations per step ("
      + ", ".join(f"{p['piece']} {p['ms_per_step'] / grad_ms:.1f}" for p in lin)
      + ")"
    )
  pr = [p for p in protos if (p["width"], p["depth"], p["batch"]) == point]
  if pr:
    out += (
      f"; the prototypes (benchmarks/_proposals.py, built on the earlier SVD/full-action step) "
      f"range from {pr[0]['per_grad']:.1f}x to {min(p['per_grad'] for p in pr):.1f}x. Not yet "
      "done: reusing the candidate's QR between the objective and the next move (one QR per "
      "step instead of two)"
    )
  return out + "."


def _diagnosis(rows, pieces, protos) -> list[str]:
  """Plain-language reading of the measurements for the printed report."""
  notes = []
  dgl = [r for r in rows if r["symmetry"] == "data_gl" and r.get("step_per_grad") is not None]
  rs = [r for r in rows if r["symmetry"] == "rescaling" and r.get("step_per_grad") is not None]
  if rs:
    worst = max(rs, key=lambda r: r["step_per_grad"])
    fl = [r["flops_per_grad"] for r in rs if r.get("flops_per_grad")]
    notes.append(
      f"PositiveRescaling: inner step {min(r['step_per_grad'] for r in rs):.2f}x to "
      f"{worst['step_per_grad']:.2f}x a gradient (worst at width {worst['width']}, batch "
      f"{worst['batch']}). An inner step differentiates |grad L|^2 on the algebra (a "
      "second-order, Hessian-vector-product-like computation) after a forward pass for the move"
      + (f"; XLA counts {min(fl):.1f}x to {max(fl):.1f}x the flops of a gradient." if fl else ".")
    )
  if dgl:
    worst = max(dgl, key=lambda r: r["step_per_grad"])
    notes.append(
      f"DataDependentGL: inner step {min(r['step_per_grad'] for r in dgl):.2f}x to "
      f"{worst['step_per_grad']:.2f}x a gradient (worst at width {worst['width']}, batch "
      f"{worst['batch']})."
    )
  by_point = {}
  for p in pieces:
    by_point.setdefault((p["width"], p["depth"], p["batch"]), []).append(p)
  for (w, d, b), ps in by_point.items():
    if w < 256:
      continue
    lin = [p for p in ps if p["piece"] in _LINALG_PIECES]
    top = max(lin, key=lambda p: p["ms_per_step"])
    total = sum(p["ms_per_step"] for p in lin)
    grad_ms = ps[0]["ms"] / ps[0]["per_grad"]
    notes.append(
      f"width {w}, depth {d}, batch {b}: the action's LAPACK work per inner step ("
      + ", ".join(f"{p['calls_per_step']} x {p['piece']}" for p in lin)
      + f"; forward only) takes {total:.1f} ms = {total / grad_ms:.1f} "
      f"gradient evaluations; largest: {top['piece']} ({top['calls_per_step']} x {top['ms']:.2f} ms)."
    )
  by_point = {}
  for p in protos:
    by_point.setdefault((p["width"], p["depth"], p["batch"]), []).append(p)
  for (w, d, b), ps in by_point.items():
    lib, best = ps[0], ps[-1]
    notes.append(
      f"width {w}, depth {d}, batch {b}: prototypes cut the data-dependent inner step from "
      f"{lib['per_grad']:.1f}x to {best['per_grad']:.1f}x a gradient ("
      + ", ".join(f"{p['inner_step']}: {p['per_grad']:.1f}x" for p in ps[1:])
      + ")."
    )
  return notes

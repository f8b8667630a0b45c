"""Gradient descent with and without teleport on Booth's and Rosenbrock's functions.

Both functions are radial in a change of variables ``z = phi(w)`` (Booth:
``z = M w - c``; Rosenbrock: ``z = (a - x, sqrt(b) (y - x^2))``), so rotating
``z`` keeps the loss exactly (:func:`teleport_jax.problems.booth_symmetry`,
:func:`teleport_jax.problems.rosenbrock_symmetry`). From a few fixed starting points we
run plain gradient descent (GD) with a fixed step size and GD with teleports,
and count the GD iterations until the loss is below a tolerance.

Protocol (float64, inside ``jax.enable_x64``):

* Booth: step size 0.01 (stable below 2/18, the Hessian is ``2 M^T M`` with
  eigenvalues 2 and 18), tolerance 1e-6, one teleport at step 0 that maximises
  ``|grad L|^2`` (50 inner steps). On a quadratic the teleported gradient is the
  Hessian's top eigenvector and GD then stays on that line, so one teleport is
  all there is to gain.
* Rosenbrock (a=1, b=100): step size 1e-3 (stable near the minimum, whose top
  Hessian eigenvalue is 1001.6), tolerance 1e-6. Teleports once at step 0
  ("once") or every ``TELEPORT_EVERY`` GD steps while the loss is above the
  tolerance ("/k"). Maximising ``|grad L|^2`` moves along the level set to the
  steep walls of the valley (large ``|x|``) where a fixed step of 1e-3
  overshoots; we measure this (and, in the full run, fewer inner steps as a
  cap) and then cap the teleport by minimising the loss after 5 GD steps of
  the same step size instead (:func:`teleport_jax.objectives.lookahead_loss`).

Each run (GD steps, teleports through ``lax.cond`` on the step) is one
``lax.scan`` under ``jax.jit``. Iterations count GD steps; a teleport costs
``num_steps`` inner steps (each one gradient of the objective on the group),
which the table reports next to the iteration counts.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import teleport_jax as tj
from teleport_jax.experiments import common
from teleport_jax.experiments import plotting

TELEPORT_EVERY = 100


@dataclasses.dataclass(frozen=True)
class Problem:
  """A test function with its symmetry and GD protocol.

  Attributes:
    name: short name (file names, table).
    fn: ``fn(w) -> scalar`` on ``(2,)`` points.
    symmetry: the rotation group of its level sets.
    lr: the fixed GD step size.
    tol: the loss tolerance that counts as converged.
    max_steps: GD steps per run.
    starts: starting points.
    minimum: the minimiser (for plots).
    xlim: plot range in ``x``.
    ylim: plot range in ``y``.
  """

  name: str
  fn: Callable[[jax.Array], jax.Array]
  symmetry: tj.symmetries.Rotation
  lr: float
  tol: float
  max_steps: int
  starts: tuple[tuple[float, float], ...]
  minimum: tuple[float, float]
  xlim: tuple[float, float]
  ylim: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Method:
  """How a run teleports.

  Attributes:
    name: short name (table, legends).
    objective: ``None`` for plain GD, else the teleport objective.
    every: teleport every ``every`` GD steps (while the loss is above the
      tolerance); 0 means once, at step 0.
    num_steps: inner steps of each teleport.
  """

  name: str
  objective: Any = None
  every: int = 0
  num_steps: int = 0


BOOTH = Problem(
  name="booth",
  fn=tj.problems.booth,
  symmetry=tj.problems.booth_symmetry(),
  lr=0.01,
  tol=1e-6,
  max_steps=2000,
  starts=((-5.0, -5.0), (8.0, -6.0), (-6.0, 4.0), (-2.0, 9.0)),
  minimum=(1.0, 3.0),
  xlim=(-10.0, 10.0),
  ylim=(-10.0, 10.0),
)

ROSENBROCK = Problem(
  name="rosenbrock",
  fn=tj.problems.rosenbrock,
  symmetry=tj.problems.rosenbrock_symmetry(),
  lr=1e-3,
  tol=1e-6,
  max_steps=30000,
  starts=((-1.2, 1.0), (-1.5, 2.0), (0.5, -0.5), (1.5, 1.5)),
  minimum=(1.0, 1.0),
  xlim=(-2.5, 2.5),
  ylim=(-1.5, 4.0),
)

# Objectives are created once: a new Objective (new closure) would recompile.
_LOOKAHEAD = tj.objectives.lookahead_loss(ROSENBROCK.lr, 5)

METHODS = {
  "booth": (
    Method("gd"),
    Method("gd+teleport(max_grad_norm)", "max_grad_norm", every=0, num_steps=50),
  ),
  "rosenbrock": (
    Method("gd"),
    Method("gd+teleport(max_grad_norm)", "max_grad_norm", every=0, num_steps=50),
    Method("gd+teleport(max_grad_norm)/k", "max_grad_norm", every=TELEPORT_EVERY, num_steps=50),
    Method("gd+teleport(lookahead)", _LOOKAHEAD, every=0, num_steps=20),
    Method("gd+teleport(lookahead)/k", _LOOKAHEAD, every=TELEPORT_EVERY, num_steps=20),
  ),
}


# Booth start on the line w = (1, 3) + s (1, -1), where z = M w - c is an
# eigenvector of M for its eigenvalue of smallest modulus: the gradient norm is
# minimal on the level set there, a critical point of the teleport objective.
BOOTH_CRITICAL_START = (-4.0, 8.0)
# Inner-step counts of the max-gradient-norm teleport tried on Rosenbrock (full run).
MAX_GRAD_NORM_SWEEP = (1, 2, 5)


RTOL_FLOAT64 = tj.default_rtol(jnp.float64)
# An inner step is kept if it improves the objective by more than this (relative): far
# above float64 rounding (2e-16), and small enough that the ascent converges to the
# optimum on the level set, which is what the Booth and Newton claims are about.
IMPROVE_RTOL_FLOAT64 = 1e-13


def teleport_config(objective, num_steps: int) -> tj.TeleportConfig:
  """Every teleport's settings, spelled out (float64 ``rtol`` and ``improve_rtol``)."""
  return common.teleport_config(
    objective, num_steps, rtol=RTOL_FLOAT64, improve_rtol=IMPROVE_RTOL_FLOAT64
  )


def describe_method(method: Method) -> dict:
  """The protocol entry of ``method``."""
  if method.objective is None:
    return dict(teleport="none")
  schedule = (
    "step 0"
    if method.every == 0
    else f"every {method.every} GD steps from step 0, while the loss is above tol"
  )
  return common.describe_teleport(
    teleport_config(method.objective, method.num_steps), schedule=schedule, stability=None
  )


@functools.cache
def _runner(problem: Problem, objective: Any, num_steps: int, steps: int) -> Callable:
  """A jitted ``run(w0, every) -> (w_final, history)``, compiled once per key."""
  f = problem.fn
  sym = problem.symmetry

  def teleport(w):
    new, info = tj.teleport(f, w, symmetry=sym, config=teleport_config(objective, num_steps))
    return (
      new,
      info.rel_loss_drift,
      info.accepted,
      info.status,
      info.grad_norm_sq_before,
      info.grad_norm_sq_after,
    )

  def skip(w):
    z = jnp.zeros((), w.dtype)
    return w, z, jnp.asarray(False), jnp.asarray(tj.TeleportStatus.SKIPPED, jnp.int32), z, z

  @jax.jit
  def run(w0, every):
    def body(w, t):
      if objective is None:
        do = jnp.asarray(False)
        out = skip(w)
      else:
        do = (t % every == 0) & (f(w) > problem.tol)
        out = jax.lax.cond(do, teleport, skip, w)
      wt, drift, accepted, status, gn0, gn1 = out
      loss, g = jax.value_and_grad(f)(wt)
      hist = dict(
        w=w,
        wt=wt,
        loss=loss,
        do=do,
        accepted=accepted,
        drift=drift,
        status=status,
        grad_norm_sq_before=gn0,
        grad_norm_sq_after=gn1,
      )
      return wt - problem.lr * g, hist

    return jax.lax.scan(body, w0, jnp.arange(steps))

  return run


@functools.cache
def _hessian(problem: Problem) -> Callable:
  return jax.jit(jax.hessian(problem.fn))


def sharpness(problem: Problem, w) -> float:
  """``lr * lambda_max(Hessian(w))``: GD with the fixed step is locally unstable above 2."""
  w = np.asarray(w, np.float64)
  if not np.all(np.isfinite(w)):
    return float("nan")
  with jax.enable_x64(True):
    h = np.asarray(_hessian(problem)(jnp.asarray(w, jnp.float64)))
  return float(problem.lr * np.linalg.eigvalsh(h)[-1])


def run_one(problem: Problem, method: Method, start, steps: int | None = None) -> dict:
  """Runs GD (with the method's teleports) from ``start``, in float64.

  Args:
    problem: the test function and its protocol.
    method: how to teleport.
    start: the starting point ``(x, y)``.
    steps: GD steps (default ``problem.max_steps``).

  Returns:
    A dict with the per-step history as numpy arrays (``w`` and ``wt``: the
    point before and after the teleport of that step; ``loss`` at ``wt``;
    ``do``, ``accepted``, ``drift``, ``status``, ``grad_norm_sq_before/after``
    of the teleport) and ``iters_to_tol`` (GD steps until ``loss <= tol``,
    ``None`` if never), ``num_teleports`` and ``num_rejected`` (until then),
    ``teleport_inner_steps``, ``nonfinite``, ``max_rel_drift`` (over accepted
    teleports), ``first_teleport_sharpness`` (``lr * lambda_max`` where the
    first teleport landed), ``final_loss`` and ``wall_s`` (compile included on
    a first call).
  """
  steps = steps or problem.max_steps
  t0 = time.perf_counter()
  with jax.enable_x64(True):
    run = _runner(problem, method.objective, method.num_steps, steps)
    every = method.every if method.every > 0 else steps + 1
    _, hist = run(jnp.asarray(start, jnp.float64), jnp.asarray(every))
    hist = jax.tree_util.tree_map(np.asarray, hist)
  wall = time.perf_counter() - t0
  loss = hist["loss"]
  hit = np.nonzero(loss <= problem.tol)[0]
  iters = int(hit[0]) if hit.size else None
  end = (iters if iters is not None else steps - 1) + 1
  done = hist["do"][:end]
  acc = hist["accepted"][:end]
  drifts = hist["drift"][:end][acc]
  all_drifts = hist["drift"][:end][done]
  first = np.nonzero(acc)[0]
  tried = np.nonzero(done)[0]  # a teleport that found nothing to improve has gain 1
  return dict(
    **hist,
    iters_to_tol=iters,
    num_teleports=int(done.sum()),
    num_rejected=int((done & ~acc).sum()),
    teleport_inner_steps=int(done.sum()) * method.num_steps,
    nonfinite=bool(not np.all(np.isfinite(loss))),
    max_rel_drift=float(drifts.max()) if drifts.size else None,
    rel_loss_drifts=common.finite_list(all_drifts),
    first_teleport_sharpness=sharpness(problem, hist["wt"][first[0]]) if first.size else None,
    first_teleport_gain=(
      float(hist["grad_norm_sq_after"][tried[0]] / hist["grad_norm_sq_before"][tried[0]])
      if tried.size
      else None
    ),
    final_loss=float(loss[-1]),
    wall_s=wall,
  )


def _sizes(config: common.RunConfig) -> int:
  """How many starting points per function."""
  return 2 if config.quick else 4


def num_units(config: common.RunConfig) -> int:
  n = _sizes(config)
  units = sum(len(METHODS[p.name]) * n for p in (BOOTH, ROSENBROCK))
  if not config.quick:
    units += len(MAX_GRAD_NORM_SWEEP)
  return units + 1  # the critical-point check


def _mean(values):
  vals = [v for v in values if v is not None]
  return float(np.mean(vals)) if vals and len(vals) == len(values) else None


def _max(values):
  vals = [v for v in values if v is not None and np.isfinite(v)]
  return float(np.max(vals)) if vals else None


def run(config: common.RunConfig, progress=None) -> dict:
  """Runs every (function, method, start), writes the plots, returns the summary."""
  progress = progress or common.NullProgress()
  n_starts = _sizes(config)
  results: dict[str, dict[str, list[dict]]] = {}
  runs: dict[str, dict] = {}
  table = []
  for problem in (BOOTH, ROSENBROCK):
    starts = problem.starts[:n_starts]
    results[problem.name] = {}
    runs[problem.name] = {}
    for method in METHODS[problem.name]:
      rs = []
      for s in starts:
        rs.append(run_one(problem, method, s))
        progress.update(1)
      results[problem.name][method.name] = rs
      entry = _entry(problem, method, starts, rs)
      runs[problem.name][method.name] = entry
      row = {"function": problem.name, "method": method.name}
      row.update({f"iters_s{i}": r["iters_to_tol"] for i, r in enumerate(rs)})
      row.update(
        iters_mean=entry["iters_to_tol_mean"],
        reached=f"{entry['num_reached']}/{len(rs)}",
        teleports=entry["num_teleports_total"],
        inner_steps=entry["teleport_inner_steps_total"],
        max_rel_drift=entry["max_rel_drift"],
        rejected=entry["num_rejected_total"],
        nonfinite=entry["nonfinite_runs"],
        lr_sharpness=entry["max_first_teleport_sharpness"],
      )
      table.append(row)

  critical = run_one(BOOTH, METHODS["booth"][1], BOOTH_CRITICAL_START)
  critical_gd = run_one(BOOTH, METHODS["booth"][0], BOOTH_CRITICAL_START)
  progress.update(1)
  sweep = {}
  if not config.quick:
    for ns in MAX_GRAD_NORM_SWEEP:
      m = Method(f"gd+teleport(max_grad_norm,{ns})/k", "max_grad_norm", TELEPORT_EVERY, ns)
      rs = [run_one(ROSENBROCK, m, s) for s in ROSENBROCK.starts[:n_starts]]
      sweep[ns] = _entry(ROSENBROCK, m, ROSENBROCK.starts[:n_starts], rs)
      progress.update(1)

  _plot_trajectories(results, config)
  _plot_losses(results, config)
  summary = dict(
    protocol=dict(
      precision="float64",
      teleport_every=TELEPORT_EVERY,
      teleports_stop_below_tol=True,
      functions={
        p.name: dict(
          lr=p.lr,
          tol=p.tol,
          max_steps=p.max_steps,
          starts=[list(s) for s in p.starts[:n_starts]],
          methods={m.name: describe_method(m) for m in METHODS[p.name]},
        )
        for p in (BOOTH, ROSENBROCK)
      },
    ),
    runs=runs,
    booth_critical_start=dict(
      start=list(BOOTH_CRITICAL_START),
      grad_norm_sq_gain=critical["first_teleport_gain"],
      iters_to_tol_teleport=critical["iters_to_tol"],
      iters_to_tol_gd=critical_gd["iters_to_tol"],
    ),
    rosenbrock_max_grad_norm_steps_sweep={str(k): v for k, v in sweep.items()},
  )
  summary["targets"] = _targets(runs)
  summary["notes"] = _notes(runs, summary, sweep, n_starts)
  summary["table"] = table
  return summary


def _entry(problem: Problem, method: Method, starts, rs: list[dict]) -> dict:
  iters = [r["iters_to_tol"] for r in rs]
  return dict(
    starts=[list(s) for s in starts],
    iters_to_tol=iters,
    iters_to_tol_mean=_mean(iters),
    num_reached=sum(i is not None for i in iters),
    num_teleports=[r["num_teleports"] for r in rs],
    num_teleports_total=sum(r["num_teleports"] for r in rs),
    teleport_inner_steps_total=sum(r["teleport_inner_steps"] for r in rs),
    num_rejected_total=sum(r["num_rejected"] for r in rs),
    max_rel_drift=_max([r["max_rel_drift"] for r in rs]),
    rel_loss_drift_per_teleport=[r["rel_loss_drifts"] for r in rs],
    nonfinite_runs=sum(r["nonfinite"] for r in rs),
    first_teleport_sharpness=[r["first_teleport_sharpness"] for r in rs],
    max_first_teleport_sharpness=_max([r["first_teleport_sharpness"] for r in rs]),
    first_teleport_grad_norm_sq_gain=[r["first_teleport_gain"] for r in rs],
    start_sharpness=[sharpness(problem, s) for s in starts],
    final_loss=[r["final_loss"] for r in rs],
    wall_s=[r["wall_s"] for r in rs],
  )


def _targets(runs: dict) -> dict:
  teleports = [e for fn in runs.values() for name, e in fn.items() if "teleport" in name]
  booth_gd = runs["booth"]["gd"]["iters_to_tol"]
  booth_tp = runs["booth"]["gd+teleport(max_grad_norm)"]["iters_to_tol"]
  rosen_gd = runs["rosenbrock"]["gd"]["iters_to_tol"]
  rosen_la = runs["rosenbrock"]["gd+teleport(lookahead)/k"]["iters_to_tol"]
  return {
    "every_teleport_within_rtol": all(
      (e["max_rel_drift"] or 0.0) <= RTOL_FLOAT64 for e in teleports
    ),
    "booth_teleport_never_slower": all(
      t is not None and (g is None or t <= g) for t, g in zip(booth_tp, booth_gd)
    ),
    "rosenbrock_lookahead_k_never_slower": all(
      t is not None and (g is None or t <= g) for t, g in zip(rosen_la, rosen_gd)
    ),
    "lookahead_runs_finite": all(
      e["nonfinite_runs"] == 0 for name, e in runs["rosenbrock"].items() if "lookahead" in name
    ),
  }


def _fmt(v) -> str:
  return "never" if v is None else f"{v:.0f}" if isinstance(v, (int, float)) else str(v)


def _notes(runs: dict, summary: dict, sweep: dict, n_starts: int) -> list[str]:
  b, r = runs["booth"], runs["rosenbrock"]
  bt, mg = b["gd+teleport(max_grad_norm)"], r["gd+teleport(max_grad_norm)"]
  la, lak = r["gd+teleport(lookahead)"], r["gd+teleport(lookahead)/k"]
  drift = _max([e["max_rel_drift"] for fn in runs.values() for e in fn.values()])
  crit = summary["booth_critical_start"]
  notes = [
    f"iterations = GD steps until the loss is <= tol (Booth: lr {BOOTH.lr:g}, tol "
    f"{BOOTH.tol:g}; Rosenbrock: lr {ROSENBROCK.lr:g}, tol {ROSENBROCK.tol:g}), float64, "
    f"columns iters_s<i> = start i of {n_starts} (see protocol.functions.*.starts); teleports "
    f"at step 0 ('once') or every {TELEPORT_EVERY} steps ('/k') while the loss is above tol.",
    f"Booth: one max-|grad|^2 teleport at step 0 cuts GD from {_fmt(b['gd']['iters_to_tol_mean'])} "
    f"to {_fmt(bt['iters_to_tol_mean'])} iterations on average (per start "
    f"{b['gd']['iters_to_tol']} -> {bt['iters_to_tol']}); the teleported gradient is the "
    "Hessian's top eigenvector, so GD then contracts at 1 - 18 lr per step instead of 1 - 2 lr.",
    f"Booth from {tuple(crit['start'])}: z = M w - c is an eigenvector of M for its "
    "smallest-modulus eigenvalue, a critical point (minimum) of |grad|^2 on the level set; "
    f"the normalised ascent has a zero direction there and the teleport does not move "
    f"(|grad|^2 gain {crit['grad_norm_sq_gain']:.6g}, {_fmt(crit['iters_to_tol_teleport'])} "
    f"vs {_fmt(crit['iters_to_tol_gd'])} GD iterations).",
    f"Rosenbrock, max |grad|^2 teleport with a fixed step {ROSENBROCK.lr:g}: "
    f"{mg['nonfinite_runs']}/{n_starts} runs went non-finite after one teleport "
    f"({r['gd+teleport(max_grad_norm)/k']['nonfinite_runs']}/{n_starts} with a teleport every "
    f"{TELEPORT_EVERY} steps); the teleport lands on the valley walls where lr * lambda_max "
    f"of the Hessian reaches {_fmt_sharp(mg['first_teleport_sharpness'])} (fixed-step GD is "
    f"locally unstable above 2; at the starts it is {_fmt_sharp(mg['start_sharpness'])}).",
    f"Rosenbrock, capped teleport (minimise the loss after 5 GD steps of lr {ROSENBROCK.lr:g}, "
    f"tj.objectives.lookahead_loss, 20 inner steps): once {la['iters_to_tol']}, every {TELEPORT_EVERY} "
    f"steps {lak['iters_to_tol']} iterations vs GD {r['gd']['iters_to_tol']}; no non-finite "
    f"run ({la['nonfinite_runs'] + lak['nonfinite_runs']}); lr * lambda_max after its first "
    f"teleport {_fmt_sharp(lak['first_teleport_sharpness'])}. Each teleport costs 20 inner steps, "
    f"each a gradient through 5 GD steps "
    f"({lak['teleport_inner_steps_total']} inner steps in total for the '/k' runs).",
    f"largest relative loss drift of an accepted teleport: {drift:.2g} (rotations of z are "
    f"exact; teleports are checked against rtol {RTOL_FLOAT64:g} in float64, rejected ones "
    "count in "
    "'rejected').",
  ]
  if sweep:
    parts = [
      f"{ns} steps: reached {e['num_reached']}/{n_starts}, non-finite {e['nonfinite_runs']}, "
      f"iterations {e['iters_to_tol']}"
      for ns, e in sweep.items()
    ]
    notes.append(
      f"Rosenbrock, fewer max-|grad|^2 inner steps (every {TELEPORT_EVERY} steps) does not "
      "cap it usefully: " + "; ".join(parts) + "."
    )
  return notes


def _fmt_sharp(values) -> str:
  return "[" + ", ".join("-" if v is None else f"{v:.3g}" for v in values) + "]"


_PLOTTED = {
  "booth": ("gd", "gd+teleport(max_grad_norm)"),
  "rosenbrock": (
    "gd",
    "gd+teleport(max_grad_norm)",
    "gd+teleport(lookahead)",
    "gd+teleport(lookahead)/k",
  ),
}


@plotting.styled
def _plot_trajectories(results: dict, config: common.RunConfig) -> None:
  from matplotlib import colors as mcolors

  for problem in (BOOTH, ROSENBROCK):
    names = _PLOTTED[problem.name]
    titles = []
    for name in names:
      rs = results[problem.name][name]
      diverged = sum(r["nonfinite"] for r in rs)
      iters = ", ".join(_fmt(r["iters_to_tol"]) for r in rs)
      titles.append(
        f"{name}\niterations to {problem.tol:g}: {iters}"
        + (f" ({diverged} diverged)" if diverged else "")
      )
    fig, axes = plotting.panels(
      len(names),
      xlabel="x",
      ylabel="y",
      titles=titles,
      ncols=2,
      panel_size=(5.0, 4.2),
      suptitle=f"{problem.name}: GD (lr {problem.lr:g}) trajectories, one colour per start",
    )
    xs = np.linspace(*problem.xlim, 300)
    ys = np.linspace(*problem.ylim, 300)
    xx, yy = np.meshgrid(xs, ys)
    zz = np.asarray(problem.fn(np.stack([xx, yy])))  # plain arithmetic: numpy in, numpy out
    levels = np.logspace(-2, np.log10(zz.max()), 18)
    starts = len(results[problem.name][names[0]])
    start_colors = [f"C{i}" for i in range(starts)]
    for ax, name in zip(axes, names):
      ax.contour(xx, yy, zz, levels=levels, norm=mcolors.LogNorm(), cmap="Greys", linewidths=0.7)
      ax.grid(False)
      for r, color in zip(results[problem.name][name], start_colors):
        # log-spaced steps (GD slows down near the minimum), every teleport kept
        steps = len(r["w"])
        idx = np.unique(
          np.concatenate(
            [np.geomspace(1, steps, 3000).astype(int) - 1, np.nonzero(r["do"])[0], [steps - 1]]
          )
        )
        path = np.stack([r["w"][idx], r["wt"][idx]], axis=1).reshape(-1, 2)
        ax.plot(path[:, 0], path[:, 1], color=color, lw=1.4)
        ax.plot(*r["w"][0], "o", color=color, ms=7)
        for j in np.nonzero(r["accepted"])[0]:
          a, b = r["w"][j], r["wt"][j]
          ax.annotate(
            "",
            xy=b,
            xytext=a,
            arrowprops=dict(arrowstyle="->", color="k", lw=1.2, ls="--"),
          )
          ax.plot(*b, "*", color=color, ms=12, mec="k", mew=0.6)
      ax.plot(*problem.minimum, "P", color="gold", ms=11, mec="k")
      ax.set_xlim(*problem.xlim)
      ax.set_ylim(*problem.ylim)
    first = results[problem.name][names[0]]
    extra = [
      plotting.proxy(f"start {tuple(np.round(r['w'][0], 2).tolist())}", color=c, marker="o", ls="-")
      for r, c in zip(first, start_colors)
    ]
    extra += [
      plotting.proxy("teleport (dashed arrow)", color="k", ls="--", lw=1.2),
      plotting.proxy("teleport landing", ls="none", marker="*", ms=12, mfc="0.8", mec="k"),
      plotting.proxy("minimum", ls="none", marker="P", ms=11, mfc="gold", mec="k"),
    ]
    plotting.legend(fig, extra=extra)
    plotting.savefig(fig, config.out_dir / f"{problem.name}_trajectories.png")


@plotting.styled
def _plot_losses(results: dict, config: common.RunConfig) -> None:
  for problem in (BOOTH, ROSENBROCK):
    runs = results[problem.name]
    names = [name for name in runs if name != "gd"]  # one panel each, gd in every one
    title = f"{problem.name}: loss vs iteration, one line per start"
    one = len(names) == 1
    fig, axes = plotting.panels(
      len(names),
      xlabel="GD iteration + 1",
      ylabel="loss",
      titles=[f"{title}\n{names[0]}"] if one else names,
      ncols=2,
      panel_size=(6.4, 4.2) if one else (5.0, 3.6),
      sharex=True,
      sharey=True,
      suptitle=None if one else title,
    )
    top = max(float(r["loss"][0]) for rs in runs.values() for r in rs)
    for ax, name in zip(axes, names):
      for m in ("gd", name) if "gd" in runs else (name,):
        for i, r in enumerate(runs[m]):
          # log-spaced iterations (the x axis is logarithmic), every teleport step kept
          idx = np.unique(
            np.concatenate(
              [np.geomspace(1, len(r["loss"]), 1500).astype(int) - 1, np.nonzero(r["do"])[0]]
            )
          )
          loss = np.maximum(np.where(np.isfinite(r["loss"]), r["loss"], np.nan), 1e-30)
          ax.plot(
            idx + 1,
            loss[idx],
            color=plotting.color(m),
            lw=1.4 if m == name else 1.0,
            alpha=0.85 if m == name else 0.5,
            label=m if i == 0 else None,
          )
          if m != "gd":  # the loss of step t is at the teleported point of step t
            at = np.nonzero(r["accepted"])[0]
            plotting.mark_teleports(ax, at + 1, loss[at], color=plotting.color(m))
      ax.axhline(problem.tol, color="k", ls=":", lw=1, label=f"tol {problem.tol:g}")
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_ylim(1e-14, 1e3 * top)  # diverging runs leave through the top
    plotting.legend(fig)
    plotting.savefig(fig, config.out_dir / f"{problem.name}_loss.png")

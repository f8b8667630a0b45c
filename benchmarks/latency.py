"""Latency of one teleport on the published MLP problem: jit vs eager vs a GD step.

The published problem (:func:`teleport_jax.experiments.regression.make_problem`,
dims 4, 5, 6, 7, 8: ``X`` 5x4, ``W1`` 6x5, ``W2`` 7x6, ``W3`` 8x7) with the exact
data-dependent GL action and 8 inner steps of the default objective (maximise
the squared gradient norm). Three ways of running it, timed side by side:

* ``teleport (jit)``: ``tj.teleport(..., num_steps=8)`` compiled ahead of time
  (the whole solver, ``lax.fori_loop`` included, is one XLA executable);
* ``tj.teleport call``: the public function called as a user does (argument
  validation and finiteness checks on the host, then the cached executable);
* ``teleport (eager)``: the solver's core
  ``teleport_jax._src.solver.solver.teleport_with_grad`` under ``jax.disable_jit()``,
  which also runs ``lax.fori_loop`` as a Python loop: every primitive is
  dispatched one by one. That it really runs eagerly is checked by counting
  the calls of the loss function (a compiled loop calls it only while tracing);
* ``gradient step (jit)``: ``jax.grad`` of the loss plus the SGD update.
"""

from __future__ import annotations

import time

import jax
import numpy as np

import teleport_jax as tj
from benchmarks import _common as C
from teleport_jax._src.solver import solver
from teleport_jax.experiments import regression

NUM_STEPS = 8
# eager: "skip" (smoke), "estimate" (quick: one call, minus the time its op-by-op
# compilations took) or "measure" (full: a warm-up call, then timed calls).
SETTINGS = {
  "smoke": dict(repeats=3, eager="skip", eager_repeats=0),
  "quick": dict(repeats=7, eager="estimate", eager_repeats=0),
  "full": dict(repeats=15, eager="measure", eager_repeats=3),
}


def _solver_kwargs():
  return dict(
    objective="max_grad_norm",
    num_steps=NUM_STEPS,
    step_size=0.1,
    normalize=True,
    safeguard=True,
    max_step_size=1.0,
    rtol=None,
  )


def _symmetry(mode: str):
  if mode == "smoke":  # cheap stand-in so the smoke test compiles fast
    return tj.PositiveRescaling(), "PositiveRescaling (smoke stand-in)"
  return tj.DataDependentGL(
    activation=tj.activations.leaky_relu(0.1)
  ), "DataDependentGL(leaky_relu(0.1))"


def run(mode: str) -> dict:
  """Runs the suite; returns its JSON-ready result."""
  cfg = SETTINGS[mode]
  params, x, y = regression.make_problem(0)
  data = (x, y)
  sym, sym_name = _symmetry(mode)
  calls = {"n": 0}

  def loss(p, d):
    calls["n"] += 1
    return regression.loss_fn(p, *d)

  def teleport_fn(p, d):
    return tj.teleport(loss, p, d, symmetry=sym, num_steps=NUM_STEPS)

  def grad_step(p, x, y):
    g = jax.grad(regression.loss_fn)(p, x, y)
    return jax.tree_util.tree_map(lambda w, gw: w - regression.GD_LR * gw, p, g)

  def eager():
    with jax.disable_jit():
      return solver.teleport_with_grad(loss, params, data, symmetry=sym, **_solver_kwargs())

  tele = C.compile_fn(teleport_fn, params, data)
  step = C.compile_fn(grad_step, params, x, y)
  jit_out = jax.block_until_ready(tele(params, data))
  calls["n"] = 0
  jax.block_until_ready(tele(params, data))
  calls_jit = calls["n"]

  fns = {
    "teleport_jit": lambda: tele(params, data),
    "teleport_public_call": lambda: teleport_fn(params, data),
    "grad_step_jit": lambda: step(params, x, y),
  }
  if mode != "full":  # the public call compiles the solver's own jit once more (seconds)
    del fns["teleport_public_call"]
  fast = C.time_side_by_side(fns, repeats=cfg["repeats"])
  t_jit = fast["teleport_jit"].median
  t_grad = fast["grad_step_jit"].median
  t_pub = fast["teleport_public_call"].median if "teleport_public_call" in fast else None

  eager_info: dict = {"method": cfg["eager"]}
  notes = []
  t_eager = None
  if cfg["eager"] != "skip":
    # The first eager call compiles one small executable per primitive and
    # shape (op-by-op dispatch); later calls reuse them.
    calls["n"] = 0
    with C.CompileCounter() as cc:
      t = time.perf_counter()
      eager_out = jax.block_until_ready(eager())
      first = time.perf_counter() - t
    calls_eager = calls["n"]
    # the objective (one loss call) is evaluated in each of the num_steps + 1
    # loop iterations and the loss twice more outside the loop: a compiled loop
    # would have called it only while tracing
    is_eager = calls_eager >= NUM_STEPS + 1
    diffs = [
      float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
      for a, b in zip(
        jax.tree_util.tree_leaves(jit_out[0]), jax.tree_util.tree_leaves(eager_out[0])
      )
    ]
    eager_info.update(
      loss_calls_per_eager_call=calls_eager,
      loss_calls_per_jit_call=calls_jit,
      ran_eagerly=is_eager,
      first_call_s=first,
      first_call_xla_compiles=cc.count,
      first_call_compile_s=cc.all_compile_seconds,
      max_abs_param_diff_vs_jit=max(diffs),
      same_accept_decision=bool(jit_out[1].accepted) == bool(eager_out[1].accepted),
    )
    notes.append(
      f"eager check: loss_fn called {calls_eager} times per eager teleport ({calls_jit} per "
      f"compiled call): ran eagerly = {is_eager}. The first eager call took {first:.1f} s, of "
      f"which {cc.all_compile_seconds:.1f} s were {cc.count} op-by-op XLA compilations "
      "(tracing, lowering, compiling)."
    )
    notes.append(
      f"eager vs jit result: max |param difference| {max(diffs):.1e}, same accept decision: "
      f"{eager_info['same_accept_decision']}."
    )
    if cfg["eager"] == "estimate":
      t_eager = first - cc.all_compile_seconds
      eager_info["estimate_s"] = t_eager
      notes.append(
        "quick mode: eager time = first call minus its compilation time (an estimate; the "
        "full run times warmed-up calls)."
      )
    else:
      slow = C.time_side_by_side(
        {"teleport_eager": eager}, repeats=cfg["eager_repeats"], warmup=0, min_sample_s=0.0
      )
      t_eager = slow["teleport_eager"].median
      eager_info["timing"] = slow["teleport_eager"].as_dict()
      eager_info["estimate_from_first_call_s"] = first - cc.all_compile_seconds
  else:
    notes.append("smoke mode: eager run skipped; PositiveRescaling stands in for the GL action.")

  speedup = None if t_eager is None else t_eager / t_jit
  rows = [
    {
      "what": f"teleport, {NUM_STEPS} steps (jit, compiled)",
      "median_ms": 1e3 * t_jit,
      "min_ms": 1e3 * fast["teleport_jit"].minimum,
      "compile_s": tele.total_s,
      "vs_grad_step": t_jit / t_grad,
    },
    {
      "what": "tj.teleport(...) public call",
      "median_ms": None if t_pub is None else 1e3 * t_pub,
      "min_ms": None if t_pub is None else 1e3 * fast["teleport_public_call"].minimum,
      "compile_s": None,
      "vs_grad_step": None if t_pub is None else t_pub / t_grad,
    },
    {
      "what": f"teleport, {NUM_STEPS} steps (eager)"
      + (" [estimate]" if cfg["eager"] == "estimate" else ""),
      "median_ms": None if t_eager is None else 1e3 * t_eager,
      "min_ms": None,
      "compile_s": None,
      "vs_grad_step": None if t_eager is None else t_eager / t_grad,
    },
    {
      "what": "gradient step (jit grad + SGD)",
      "median_ms": 1e3 * t_grad,
      "min_ms": 1e3 * fast["grad_step_jit"].minimum,
      "compile_s": step.total_s,
      "vs_grad_step": 1.0,
    },
  ]
  ratios = [
    {"ratio": "eager / jit (speed-up of jit)", "value": speedup},
    {"ratio": "teleport (jit) / gradient step", "value": t_jit / t_grad},
    {
      "ratio": "public tj.teleport call / compiled teleport",
      "value": None if t_pub is None else t_pub / t_jit,
    },
  ]
  notes.append(
    f"compile of the teleport: trace+lower {tele.lower_s:.2f} s, XLA {tele.compile_s:.2f} s."
  )
  if t_pub is not None:
    notes.append(
      f"the public tj.teleport call adds {1e3 * (t_pub - t_jit):.2f} ms of host work per call "
      "(argument validation, finiteness checks that copy params and data to the host, dispatch)."
    )
  target = C.Target(
    f"jit-compiled teleport vs eager (published problem, {NUM_STEPS} inner steps)",
    speedup,
    20.0,
    ">=",
    "x",
  )
  return {
    "suite": "latency",
    "mode": mode,
    "problem": {
      "dims": list(regression.DIMS),
      "symmetry": sym_name,
      "objective": "max_grad_norm",
      "num_steps": NUM_STEPS,
    },
    "timings": {k: v.as_dict() for k, v in fast.items()},
    "compile": {
      "teleport": {"lower_s": tele.lower_s, "compile_s": tele.compile_s},
      "grad_step": {"lower_s": step.lower_s, "compile_s": step.compile_s},
    },
    "eager": eager_info,
    "ratios": {r["ratio"]: r["value"] for r in ratios},
    "tables": [
      {"title": "latency: published MLP problem (dims 4,5,6,7,8)", "rows": rows},
      {"title": "latency: ratios", "rows": ratios},
    ],
    "targets": [target.as_dict()],
    "notes": notes,
  }

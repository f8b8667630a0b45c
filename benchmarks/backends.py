"""Cost of one inner teleport step of each back-end, in gradient evaluations.

Model: the ``linen``-style MLP of :mod:`benchmarks.scaling` (``depth`` dense
layers of ``width``, LeakyReLU(0.1), MSE on batch-first inputs, float32), with
a batch smaller than the width so that the null-space back-end can move every
layer.

Back-ends, all behind the same driver:

* ``lie / rescaling``: :class:`teleport_jax.solvers.Lie` with the data-free
  :class:`teleport_jax.PositiveRescaling`;
* ``lie / data-dependent GL``: :class:`teleport_jax.solvers.Lie` with
  :class:`teleport_jax.DataDependentGL`;
* ``nullspace``: :class:`teleport_jax.solvers.NullSpace` (no group);
* ``levelset``: :class:`teleport_jax.solvers.LevelSet` (no group).

Timing (side by side in one process, :func:`benchmarks._common.time_side_by_side`):

* gradient evaluation: ``jax.jit(jax.value_and_grad(loss))``;
* objective gradient: ``jax.jit(jax.value_and_grad(objective))`` (the part of
  an inner step every back-end shares);
* inner step: ``(T(N1) - T(N0)) / (N1 - N0)`` with ``T(N)`` the compiled
  ``tj.teleport(..., num_steps=N)``, so fixed costs (the start and end
  gradients; the null-space SVDs, once per teleport) cancel; the fixed cost is
  reported as ``T(N0)`` minus ``N0`` inner steps.

The back-ends' own estimates (``Solver.cost_per_step()``, counting the
objective's gradient as one) are listed next to the measured ratios.

Usage::

  python -m benchmarks.backends [--quick | --smoke] [--out benchmarks/results]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

import teleport_jax as tj  # noqa: E402
from benchmarks import _common as C  # noqa: E402
from benchmarks import scaling  # noqa: E402
from teleport_jax._src.objectives import objectives as obj_lib  # noqa: E402
from teleport_jax._src.solver import backends as backends_lib  # noqa: E402

SETTINGS = {
  "smoke": dict(width=16, depth=2, batch=4, n0=1, n1=2, repeats=3, min_sample_s=0.002),
  "quick": dict(width=128, depth=3, batch=32, n0=1, n1=5, repeats=5, min_sample_s=0.01),
  "full": dict(width=256, depth=4, batch=64, n0=1, n1=9, repeats=9, min_sample_s=0.02),
}
OBJECTIVES = {
  "smoke": ("max_grad_norm",),
  "quick": ("max_grad_norm", "lookahead"),
  "full": ("max_grad_norm", "lookahead"),
}
LOOKAHEAD_LR = 1e-2


def _backends(mode: str) -> dict:
  out = {
    "lie / rescaling": dict(symmetry=tj.PositiveRescaling(), solver=tj.solvers.Lie()),
    "lie / data-dependent GL": dict(
      symmetry=tj.DataDependentGL(activation=scaling.ACT), solver=tj.solvers.Lie()
    ),
    "nullspace": dict(solver=backends_lib.as_solver("nullspace")),
    "levelset": dict(solver=backends_lib.as_solver("levelset")),
  }
  if mode == "smoke":
    del out["lie / data-dependent GL"]
  return out


def _objective(name: str):
  if name == "lookahead":
    return tj.objectives.lookahead_loss(LOOKAHEAD_LR, 5)
  return obj_lib.as_objective(name)


def run(mode: str) -> dict:
  """Runs the suite; returns its JSON-ready result."""
  cfg = SETTINGS[mode]
  width, depth, batch = cfg["width"], cfg["depth"], cfg["batch"]
  widths = scaling.widths_for(width, depth, False)
  params = scaling.make_mlp(jax.random.key(0), widths)
  data = scaling.make_batch(jax.random.key(1), width, width, batch)
  loss = scaling.mse
  grad = C.compile_fn(jax.value_and_grad(loss), params, data)
  rows, compile_rows, notes = [], [], []
  for obj_name in OBJECTIVES[mode]:
    objective = _objective(obj_name)
    bound = lambda p, d, objective=objective: obj_lib.bind(objective, loss, p, d)(p, None)[0]
    obj_grad = C.compile_fn(jax.value_and_grad(bound), params, data)
    fns = {
      "gradient": lambda: grad(params, data),
      "objective gradient": lambda: obj_grad(params, data),
    }
    compiled = {}
    for name, kw in _backends(mode).items():
      for n in (cfg["n0"], cfg["n1"]):
        f = lambda p, d, kw=kw, n=n: tj.teleport(
          loss, p, d, objective=objective, num_steps=n, check=False, **kw
        )
        t = time.perf_counter()
        compiled[(name, n)] = C.compile_fn(f, params, data)
        compile_rows.append(
          dict(objective=obj_name, backend=name, num_steps=n, compile_s=time.perf_counter() - t)
        )
        fns[f"{name} N={n}"] = lambda c=compiled[(name, n)]: c(params, data)
    timing = C.time_side_by_side(fns, repeats=cfg["repeats"], min_sample_s=cfg["min_sample_s"])
    t_grad = timing["gradient"].median
    t_obj = timing["objective gradient"].median
    for name, kw in _backends(mode).items():
      t0 = timing[f"{name} N={cfg['n0']}"].median
      t1 = timing[f"{name} N={cfg['n1']}"].median
      step = max((t1 - t0) / (cfg["n1"] - cfg["n0"]), 0.0)
      _, info = compiled[(name, cfg["n1"])](params, data)
      rows.append(
        dict(
          objective=obj_name,
          backend=name,
          inner_step_ms=1e3 * step,
          inner_step_grad_evals=step / t_grad,
          inner_step_objective_grads=step / t_obj,
          estimate_objective_grads=kw["solver"].cost_per_step(),
          fixed_cost_grad_evals=max(t0 - cfg["n0"] * step, 0.0) / t_grad,
          status=tj.TeleportStatus(int(info.status)).name,
          accepted_steps=int(info.num_accepted_steps),
        )
      )
    notes.append(
      f"{obj_name}: one gradient evaluation {1e3 * t_grad:.3f} ms, one gradient of the "
      f"objective {1e3 * t_obj:.3f} ms ({t_obj / t_grad:.1f} gradient evaluations)."
    )
  notes.append(
    "estimate_objective_grads is Solver.cost_per_step(): objective gradients per inner step "
    "(the objective's gradient counted as one, a loss gradient as one, a Hessian-vector "
    "product as two); inner_step_objective_grads is the measured figure in the same unit."
  )
  return {
    "suite": "backends",
    "mode": mode,
    "config": dict(cfg, objectives=list(OBJECTIVES[mode]), lookahead_lr=LOOKAHEAD_LR),
    "tables": [
      {
        "title": f"inner step per back-end (width {width}, depth {depth}, batch {batch})",
        "rows": rows,
      },
      {"title": "compile time", "rows": compile_rows},
    ],
    "targets": [],
    "notes": notes,
  }


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.backends", description=__doc__.split("\n")[0]
  )
  size = p.add_mutually_exclusive_group()
  size.add_argument("--quick", action="store_true", help="reduced sizes")
  size.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
  p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
  args = p.parse_args(argv)
  mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
  t = time.perf_counter()
  result = run(mode)
  result["wall_s"] = time.perf_counter() - t
  result["machine"] = C.machine_info()
  C.write_json(args.out / "backends.json", result)
  print(C.format_result(result))
  return result


if __name__ == "__main__":
  main()

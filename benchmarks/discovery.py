"""What ``find_symmetries`` costs on a 2-layer transformer, in seconds and in gradient steps.

The model is the zoo's 2-layer decoder-only transformer
(:func:`teleport_jax.models.transformer`: vocabulary 32, width 16, 4 heads,
context 8, GELU MLP, pre-LayerNorm; batch 4). Timed in one process:

* ``find_symmetries`` end to end (trace, label propagation, numerical
  verification of every candidate, the joint check), and its phases as the
  result records them (``Discovered.timings``). It is a host-side analysis, not
  a compiled function: every call traces the model and compiles one checking
  function (``jax.jvp`` of the outputs), so its time includes that compilation.
  The first call of the process is reported apart (it also warms JAX's
  op-by-op caches); then the median of ``repeats`` calls;
* one gradient step: ``jax.jit(jax.grad(loss))`` compiled ahead of time (its
  compilation reported apart), warmed up, median per call with
  ``block_until_ready``.

The ratio ``find_symmetries / gradient step`` says how many gradient steps one
discovery costs; a discovery runs once per model, not per step.

Usage::

  python -m benchmarks.discovery [--quick | --smoke] [--out benchmarks/results]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from teleport_jax import models  # noqa: E402
from teleport_jax._src.discovery.discovery import find_symmetries  # noqa: E402

SETTINGS = {
  "smoke": dict(
    repeats=1,
    grad_repeats=3,
    model=dict(vocab=8, d_model=8, heads=2, layers=1, context=4, mlp_ratio=2, batch=2),
  ),
  "quick": dict(repeats=3, grad_repeats=7, model=dict(layers=2)),
  "full": dict(repeats=7, grad_repeats=15, model=dict(layers=2)),
}
PHASES = ("trace", "propagate", "verify", "joint")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _discover(m):
  with C.CompileCounter() as cc:
    t = time.perf_counter()
    d = find_symmetries(m.apply, m.params, m.inputs)
    wall = time.perf_counter() - t
  return d, wall, cc


def run(mode: str) -> dict:
  """Runs the suite; returns its JSON-ready result."""
  cfg = SETTINGS[mode]
  m = models.transformer(**cfg["model"])
  loss = models.loss_for(m)
  batch = models.example_batch(m)

  # the first discovery in this process (cold JAX caches), then warm repeats
  d, first, cc_first = _discover(m)
  walls, phases, compiles = [], {p: [] for p in PHASES}, []
  for _ in range(cfg["repeats"]):
    d, wall, cc = _discover(m)
    walls.append(wall)
    compiles.append((cc.count, cc.all_compile_seconds))
    for name, seconds in d.timings:
      phases[name].append(seconds)
  t_find = statistics.median(walls)

  grad = C.compile_fn(jax.grad(loss), m.params, batch)
  jax.block_until_ready(grad(m.params, batch))
  t_grad = C.time_side_by_side(
    {"grad": lambda: grad(m.params, batch)}, repeats=cfg["grad_repeats"]
  )["grad"].median

  rows = [
    {
      "what": "find_symmetries, first call in the process",
      "seconds": first,
      "grad_steps": first / t_grad,
      "xla_compiles": cc_first.count,
    },
    {
      "what": f"find_symmetries (median of {cfg['repeats']})",
      "seconds": t_find,
      "grad_steps": t_find / t_grad,
      "xla_compiles": statistics.median(c for c, _ in compiles),
    },
  ]
  for name in PHASES:
    s = statistics.median(phases[name]) if phases[name] else None
    rows.append(
      {
        "what": f"  {name}",
        "seconds": s,
        "grad_steps": None if s is None else s / t_grad,
        "xla_compiles": None,
      }
    )
  rows.append(
    {
      "what": "gradient step: jit(grad(loss)), per call",
      "seconds": t_grad,
      "grad_steps": 1.0,
      "xla_compiles": None,
    }
  )
  rows.append(
    {
      "what": "  its compilation (trace + XLA), once",
      "seconds": grad.total_s,
      "grad_steps": grad.total_s / t_grad,
      "xla_compiles": 1,
    }
  )
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(m.params))
  notes = [
    f"model: {m.name} ({m.framework}) {dict(m.config)}; {n_params} parameters; discovered "
    f"{len(d.parts)} sites, dimension {d.dimension}, joint output error {d.joint_error:.1e}.",
    "find_symmetries compiles one checking function (the model's jvp) per call, so its time "
    "is mostly that compilation: about "
    f"{statistics.median(s for _, s in compiles):.2f} s of XLA work per call here.",
    "A discovery runs once per model; the gradient-step equivalents say how many training "
    "steps it costs.",
  ]
  return {
    "suite": "discovery",
    "mode": mode,
    "model": {k: str(v) for k, v in m.config.items()} | {"parameters": int(n_params)},
    "discovered": {
      "sites": len(d.parts),
      "dimension": d.dimension,
      "joint_error": d.joint_error,
      "site_names": [p.site.name for p in d.parts],
    },
    "timings": {
      "find_symmetries_first_s": first,
      "find_symmetries_median_s": t_find,
      "find_symmetries_all_s": walls,
      "phases_median_s": {k: (statistics.median(v) if v else None) for k, v in phases.items()},
      "grad_step_median_s": t_grad,
      "grad_compile_s": grad.total_s,
    },
    "tables": [
      {
        "title": "find_symmetries on the 2-layer transformer vs one gradient step",
        "rows": rows,
        "columns": ["what", "seconds", "grad_steps", "xla_compiles"],
      }
    ],
    "notes": notes,
  }


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.discovery", description=__doc__.split("\n\n")[0]
  )
  size = p.add_mutually_exclusive_group()
  size.add_argument("--quick", action="store_true", help="fewer repeats")
  size.add_argument("--smoke", action="store_true", help="a tiny model, one repeat")
  p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for discovery.json")
  args = p.parse_args(argv)
  mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
  t = time.perf_counter()
  result = run(mode)
  result["wall_s"] = time.perf_counter() - t
  machine = C.machine_info()
  result["machine"] = {
    k: machine[k] for k in ("backend", "devices", "jax_version", "cpu_count", "load_average")
  }
  C.write_json(args.out / "discovery.json", result)
  print(C.format_result(result), flush=True)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])

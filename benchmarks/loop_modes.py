"""Where a workload's training step runs fastest: inside a compiled loop or called step by step.

The workloads (:mod:`teleport_jax.experiments.workloads`) train between two
evaluations either as one compiled ``lax.scan`` of ``eval_every`` steps
(``Workload.loop == "scan"``) or as ``eval_every`` calls of a compiled step
(``"steps"``). Which is faster depends on the model and the backend: on CPU,
XLA runs convolutions several times slower inside a loop body
(jax-ml/jax#12868), while a small MLP pays Python dispatch at every call. This
suite trains each workload's plain AdamW (its stored tuned values, else the
first tuning draw) both ways, side by side in one process (interleaved rounds,
the same seed), and reports the median training time per step of each, their
ratio and whether the workload's chosen loop is the faster one.

The time of a run is the :class:`teleport_jax.experiments.workloads.Trainer`'s
own: the sum of the compiled chunks' wall-clock (``block_until_ready``),
evaluation and compile time apart.

Results: ``benchmarks/results/loop_modes.json`` (per workload
``step_ms_scan``, ``step_ms_steps``, ``scan_over_steps``, ``chosen``) and a
table.

Usage::

  python -m benchmarks.loop_modes [--quick | --smoke] [--only NAME ...] [--out benchmarks/results]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from teleport_jax.experiments import common  # noqa: E402
from teleport_jax.experiments import workloads as W  # noqa: E402

# the same XLA CPU setting as benchmarks.workloads, so the figures describe its runs
common.prefer_xla_cpu_dots()

LOOPS = ("scan", "steps")
# workload sizes (the experiment's modes) and interleaved rounds per mode
SETTINGS = {
  "full": dict(size="quick", rounds=3, names=W.NAMES),
  "quick": dict(size="quick", rounds=2, names=W.NAMES),
  "smoke": dict(size="smoke", rounds=2, names=("mlp_digits", "cnn_digits")),
}


def _hp(name: str, size: str, wl: W.Workload) -> dict:
  stored = W.load_tuned().get(size, {}).get(name, {}).get("adamw")
  return stored["hp"] if stored else W.draw_trials(W.METHODS["adamw"], wl, 1)[0]


def measure(name: str, size: str, rounds: int) -> dict:
  """Median training time per AdamW step of workload ``name`` in either loop."""
  wl = W.make_workload(name, size)
  hp = _hp(name, size, wl)
  trainers = {
    loop: W.Trainer(dataclasses.replace(wl, loop=loop), W.METHODS["adamw"]) for loop in LOOPS
  }
  per_step = {loop: [] for loop in LOOPS}
  for trainer in trainers.values():  # warm-up: first calls allocate
    trainer.run(hp, 0)
  for _ in range(rounds):
    for loop, trainer in trainers.items():
      per_step[loop].append(trainer.run(hp, 0)["time_s"][-1] / wl.steps)
  ms = {loop: 1e3 * statistics.median(v) for loop, v in per_step.items()}
  faster = min(ms, key=ms.get)
  return dict(
    workload=name,
    description=wl.description,
    steps=wl.steps,
    eval_every=wl.eval_every,
    chosen=wl.loop,
    faster=faster,
    step_ms_scan=ms["scan"],
    step_ms_steps=ms["steps"],
    scan_over_steps=ms["scan"] / ms["steps"],
    chosen_over_faster=ms[wl.loop] / ms[faster],
    compile_s={loop: t.compile_s for loop, t in trainers.items()},
    rounds_ms={loop: [1e3 * x for x in v] for loop, v in per_step.items()},
  )


def run(mode: str, names=None) -> dict:
  s = SETTINGS[mode]
  records = [measure(n, s["size"], s["rounds"]) for n in (names or s["names"])]
  rows = [
    {
      "workload": r["workload"],
      "scan (ms/step)": f"{r['step_ms_scan']:.3g}",
      "steps (ms/step)": f"{r['step_ms_steps']:.3g}",
      "scan / steps": f"{r['scan_over_steps']:.2f}",
      "chosen": r["chosen"],
    }
    for r in records
  ]
  targets = [
    C.Target(
      f"{r['workload']}: chosen loop ({r['chosen']}) / the faster loop",
      r["chosen_over_faster"],
      1.05,
      "<=",
      "x",
    ).as_dict()
    for r in records
  ]
  return {
    "suite": "loop_modes",
    "mode": mode,
    "records": records,
    "tables": [
      {
        "title": "AdamW training step: in lax.scan vs one compiled call per step",
        "rows": rows,
        "columns": list(rows[0]),
      }
    ],
    "targets": targets,
    "notes": [
      f"workload sizes of the experiment's {s['size']!r} mode; median of {s['rounds']} "
      "interleaved rounds after a warm-up run; training time only (evaluation and compile apart)",
    ],
  }


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.loop_modes", description=__doc__.split("\n")[0]
  )
  size = p.add_mutually_exclusive_group()
  size.add_argument("--quick", action="store_true", help="fewer rounds")
  size.add_argument("--smoke", action="store_true", help="quarter-size MLP and CNN (seconds)")
  p.add_argument("--only", nargs="+", choices=W.NAMES, help="workloads to run")
  p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
  args = p.parse_args(argv)
  mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
  t = time.perf_counter()
  result = run(mode, args.only)
  result["wall_s"] = time.perf_counter() - t
  result["machine"] = C.machine_info()
  args.out.mkdir(parents=True, exist_ok=True)
  C.write_json(args.out / "loop_modes.json", result)
  print(C.format_result(result))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])

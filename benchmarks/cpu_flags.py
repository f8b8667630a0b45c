"""CPU settings that change what a teleport costs: XLA's fusion emitters, OpenBLAS threads.

XLA reads its flags once per process, so each setting runs in its own
subprocess, one after the other, on the same cases: the digits MLP and CNN of
:mod:`benchmarks.teleport_cost` (AdamW at their tuned values, the default
teleport with ``stability=True``). Each subprocess compiles the plain train
step and the teleporting one (ahead of time, timed apart) and times them as
:mod:`benchmarks.teleport_cost` does (interleaved rounds, median per call,
blocked on each call, with the interquartile range of the rounds).

Settings:

* ``default``: XLA's defaults (the MLIR fusion emitters), ``OPENBLAS_NUM_THREADS=1``;
* ``classic_emitters``: ``--xla_cpu_use_fusion_emitters=false`` (XLA's older
  loop emitters for fusions), ``OPENBLAS_NUM_THREADS=1``;
* ``openblas_default``: XLA's defaults with OpenBLAS's own thread count (unset).

Usage::

  python -m benchmarks.cpu_flags [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
CASES = ("mlp_digits", "cnn_digits")
SETTINGS = {
  "default": {"XLA_FLAGS": "", "OPENBLAS_NUM_THREADS": "1"},
  "classic_emitters": {
    "XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false",
    "OPENBLAS_NUM_THREADS": "1",
  },
  "openblas_default": {"XLA_FLAGS": "", "OPENBLAS_NUM_THREADS": None},
}


def _measure(names: list[str], rounds: int) -> dict:
  """In this process: compile and step times of the plain and teleporting steps.

  The steps, compile timing and interleaved timing are those of
  :mod:`benchmarks.teleport_cost` (the teleport timed after its one-time verification).
  """
  import jax.numpy as jnp

  from benchmarks import _common as C
  from benchmarks import teleport_cost as T

  out = {}
  for name in names:
    case = T.make_case(name, True)
    x, y = case.batch(0)
    s0 = case.optimizer.init(case.params)
    plain = C.compile_fn(T._steps(case, case.optimizer), case.params, s0, x, y)
    opt = T._teleporter(case, {}, [0])
    state = opt.init(case.params)
    tele = C.compile_fn(T._steps(case, opt), case.params, state, x, y)
    fire = state._replace(verified=jnp.asarray(True))  # as after the first teleport
    t = C.time_side_by_side(
      {
        "plain": lambda c=plain, s=s0: c(case.params, s, x, y),
        "teleport": lambda c=tele, s=fire: c(case.params, s, x, y),
      },
      repeats=rounds,
    )
    out[name] = {
      "plain_compile_s": plain.total_s,
      "teleport_compile_s": tele.total_s,
      "plain_step_s": t["plain"].median,
      "plain_step_iqr_s": [t["plain"].q1, t["plain"].q3],
      "teleport_step_s": t["teleport"].median,
      "teleport_step_iqr_s": [t["teleport"].q1, t["teleport"].q3],
    }
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="fewer timing rounds")
  p.add_argument("--out", type=Path, default=DEFAULT_OUT)
  p.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
  p.add_argument("--rounds", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  rounds = args.rounds or (3 if args.quick else 9)
  if args.child is not None:
    print(json.dumps(_measure(args.child, rounds)))
    return {}
  from benchmarks import _common as C

  t0 = time.perf_counter()
  records = {}
  for setting, env_vars in SETTINGS.items():
    env = dict(os.environ)
    for k, v in env_vars.items():
      if v is None:
        env.pop(k, None)
      else:
        env[k] = v
    cmd = [sys.executable, "-m", "benchmarks.cpu_flags", "--rounds", str(rounds), "--child", *CASES]
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
    records[setting] = {"env": env_vars, "cases": json.loads(res.stdout.strip().splitlines()[-1])}
    for name, r in records[setting]["cases"].items():
      print(
        f"{setting:17s} {name:11s} compile plain {r['plain_compile_s']:.2f} s, teleporting "
        f"{r['teleport_compile_s']:.2f} s; step plain {1e3 * r['plain_step_s']:.3f} ms, "
        f"teleporting {1e3 * r['teleport_step_s']:.1f} ms",
        flush=True,
      )
  result = {
    "suite": "cpu_flags",
    "mode": "quick" if args.quick else "full",
    "machine": C.machine_info(),
    "records": records,
    "wall_s": time.perf_counter() - t0,
  }
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    C.write_json(args.out / "cpu_flags.json", result)
  return result


if __name__ == "__main__":
  sys.exit(0 if main() is not None else 1)

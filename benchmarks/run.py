"""The benchmark suite's entry point.

Usage::

  python -m benchmarks.run [--quick | --smoke] [--only SUITE ...] [--out benchmarks/results]

Runs the suites (``latency``, ``scaling``, ``time_to_target``, ``compile``;
``compile`` first, while the process is fresh), prints a table per suite with
its targets (PASS/MISS) and writes one JSON file per suite plus
``machine.json`` into ``--out``. Sizes: ``--smoke`` is a few
seconds per suite (the test suite runs it), ``--quick`` under 3 minutes on 2
CPU cores, the default is the full run. Everything runs on ``jax.devices()[0]``
(CPU, GPU or TPU) unchanged.

LAPACK threads: on CPU, XLA's pseudo-inverses, SVDs and LU solves call the
LAPACK that SciPy ships (OpenBLAS). On a small shared machine its spinning
worker threads made a 64x257 ``pinv`` 100-500x slower (0.8 s instead of 2 ms)
and the timings erratic, so this entry point sets ``OPENBLAS_NUM_THREADS=1``
unless it is already set (``machine.json`` records the value). Set it yourself
to override (it must be set before JAX loads LAPACK).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks import _common as C  # noqa: E402

SUITES = ("latency", "scaling", "time_to_target", "compile")
# compile runs first, while the process is fresh, so that its trace and lowering
# times are not helped by caches the other suites warmed
RUN_ORDER = ("compile", "latency", "scaling", "time_to_target")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _suite_module(name: str):
  if name == "latency":
    from benchmarks import latency as mod
  elif name == "scaling":
    from benchmarks import scaling as mod
  elif name == "time_to_target":
    from benchmarks import time_to_target as mod
  elif name == "compile":
    from benchmarks import compilation as mod
  else:
    raise ValueError(f"unknown suite {name!r}; expected one of {SUITES}")
  return mod


def parse_args(argv=None) -> argparse.Namespace:
  """Parses the command line."""
  p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
  size = p.add_mutually_exclusive_group()
  size.add_argument("--quick", action="store_true", help="reduced sizes (< 3 min on 2 CPU cores)")
  size.add_argument("--smoke", action="store_true", help="tiny sizes (seconds; used by the tests)")
  p.add_argument(
    "--only",
    nargs="+",
    choices=SUITES,
    metavar="SUITE",
    help=f"run only these: {', '.join(SUITES)}",
  )
  p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON results")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  """Runs the selected suites; returns ``{suite: result}`` (also written as JSON)."""
  args = parse_args(argv)
  mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
  suites = [s for s in RUN_ORDER if not args.only or s in args.only]
  out: Path = args.out
  out.mkdir(parents=True, exist_ok=True)
  machine = C.machine_info()
  machine["mode"] = mode
  machine["suites"] = suites
  C.write_json(out / "machine.json", machine)
  print(
    f"benchmarks ({mode}) on {machine['backend']}: {', '.join(machine['devices'])}; "
    f"jax {machine['jax_version']}; {machine['cpu_count']} CPUs; "
    f"OPENBLAS_NUM_THREADS={machine['env']['OPENBLAS_NUM_THREADS']}",
    flush=True,
  )
  results = {}
  t_all = time.perf_counter()
  for name in suites:
    t = time.perf_counter()
    result = _suite_module(name).run(mode)
    result["wall_s"] = time.perf_counter() - t
    result["machine"] = {k: machine[k] for k in ("backend", "devices", "jax_version", "cpu_count")}
    result["host_max_rss_bytes"] = C.max_rss_bytes()
    if mode == "smoke":  # stand-ins and tiny sizes: the figures say nothing about the targets
      for t in result.get("targets", []):
        t["status"] = "N/A"
        t["detail"] = ("smoke run (tiny sizes, stand-ins); " + t.get("detail", "")).strip()
    C.write_json(out / f"{name}.json", result)
    results[name] = result
    print("\n" + C.format_result(result) + "\n", flush=True)
  total = time.perf_counter() - t_all
  machine["total_wall_s"] = total
  machine["suite_wall_s"] = {k: v["wall_s"] for k, v in results.items()}
  C.write_json(out / "machine.json", machine)
  summary = [t | {"suite": k} for k, v in results.items() for t in v.get("targets", [])]
  if summary:
    print("=== targets ===")
    print(C.format_targets(summary))
  print(f"\ntotal wall time {total:.1f} s; results in {out}", flush=True)
  return results


if __name__ == "__main__":
  main(sys.argv[1:])

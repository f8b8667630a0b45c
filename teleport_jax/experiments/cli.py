"""``reproduce``: run the seed experiments, print a results table, write plots.

Usage::

  reproduce [--quick] [--out runs/] [--data-dir DIR] [--only NAME ...]

Writes PNG plots and ``summary.json`` into ``--out`` (default ``runs/``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from teleport_jax.experiments import common

# name -> module under teleport_jax.experiments, in run order
EXPERIMENTS = {
  "mlp_regression": "regression",
  "classification": "classification",
  "test_functions": "functions2d",
  "newton": "newton",
  "optimizers": "optimizers",
  "generalization": "generalization",
}


def _format(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, float):
    if math.isnan(v):
      return "nan"
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
  return str(v)


def format_table(rows: list[dict]) -> str:
  """A plain-text table of dict rows (union of keys, in first-seen order)."""
  if not rows:
    return ""
  cols: list[str] = []
  for r in rows:
    cols += [k for k in r if k not in cols]
  cells = [[_format(r.get(c)) for c in cols] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
  line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
  sep = "  ".join("-" * w for w in widths)
  body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join([line, sep, *body])


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="reproduce", description=__doc__.split("\n")[0])
  parser.add_argument(
    "--quick", action="store_true", help="reduced seeds/epochs (about 2 minutes on 2 CPU cores)"
  )
  parser.add_argument("--out", type=Path, default=Path("runs"), help="output directory")
  parser.add_argument(
    "--data-dir",
    type=Path,
    default=None,
    help="directory with MNIST IDX files (else $TELEPORT_JAX_MNIST_DIR, "
    "else scikit-learn's bundled 8x8 digits)",
  )
  parser.add_argument(
    "--only",
    nargs="*",
    choices=sorted(EXPERIMENTS),
    default=None,
    help="run only these experiments",
  )
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  args = parser.parse_args(argv)

  data_dir = args.data_dir or (
    Path(os.environ["TELEPORT_JAX_MNIST_DIR"]) if os.environ.get("TELEPORT_JAX_MNIST_DIR") else None
  )
  config = common.RunConfig(quick=args.quick, out_dir=args.out, data_dir=data_dir)
  args.out.mkdir(parents=True, exist_ok=True)
  names = args.only or list(EXPERIMENTS)
  modules = {
    n: importlib.import_module(f"teleport_jax.experiments.{EXPERIMENTS[n]}") for n in names
  }
  total = sum(m.num_units(config) for m in modules.values())

  import jax
  from tqdm.auto import tqdm

  summary = {
    "mode": "quick" if args.quick else "full",
    "machine": {
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
    },
    "experiments": {},
  }
  t0 = time.perf_counter()
  with tqdm(total=total, desc="reproduce", disable=args.no_progress, file=sys.stderr) as bar:
    for name, module in modules.items():
      bar.set_postfix_str(name)
      start = time.perf_counter()
      section = module.run(config, bar)
      section["elapsed_s"] = time.perf_counter() - start
      summary["experiments"][name] = section
  summary["elapsed_s"] = time.perf_counter() - t0

  for name, section in summary["experiments"].items():
    print(f"\n== {name} ==")
    for note in section.get("notes", []):
      print(f"note: {note}")
    print(format_table(section.get("table", [])))
    if "targets" in section:
      print("targets: " + ", ".join(f"{k}={_format(v)}" for k, v in section["targets"].items()))
  (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
  print(
    f"\nwrote {args.out / 'summary.json'} and plots in {args.out}/ ({summary['elapsed_s']:.0f} s)"
  )
  return 0


def _json_default(o):
  import numpy as np

  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, Path):
    return str(o)
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")


if __name__ == "__main__":
  sys.exit(main())

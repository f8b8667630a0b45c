"""``reproduce``: run the seed experiments, print a results table, write plots.

Usage::

  reproduce [--quick] [--out runs/] [--data-dir DIR] [--no-download] [--only NAME ...]
  reproduce --only workloads [--quick] [--text FILE] [--retune]

Prints each experiment's protocol, results table(s), notes and targets as soon as
the experiment finishes, and writes PNG plots and ``summary.json`` into ``--out``
(default ``runs/``; ``summary.json`` is rewritten after every experiment).
Exits with status 1 if a yes/no target of a full run does not hold (a
``--quick`` run prints the missed targets and exits 0: its reduced protocol is
not what the targets are set for).

The experiments on classification data (:data:`MNIST_EXPERIMENTS`) use MNIST
from ``--data-dir`` (or ``$TELEPORT_JAX_MNIST_DIR``), else from the cache
(``~/.cache/teleport_jax/mnist``), else downloaded into the cache and
checksum-verified; offline, or with ``--no-download`` /
``$TELEPORT_JAX_NO_DOWNLOAD=1``, they say why and use scikit-learn's 8x8 digits
(see :func:`teleport_jax.experiments.data.locate_mnist`).
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
  "backends": "backends",
  "workloads": "workloads",
  "learned": "learned",
}
# run only when named in --only (workloads: hours on 2 CPU cores, tuned baselines on five
# workloads; learned: meta-training, several minutes)
OPT_IN = ("workloads", "learned")
# the experiments that train on MNIST when it is found or fetched (else on the 8x8 digits)
MNIST_EXPERIMENTS = ("classification", "generalization", "backends")


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


def format_protocol(protocol: dict, indent: str = "  ") -> str:
  """The protocol as indented ``key: value`` lines.

  A nested dict of plain values (one method's settings) is one line
  ``key: k1=v1; k2=v2``; deeper dicts nest by indentation.
  """
  lines: list[str] = []

  def walk(d: dict, pad: str) -> None:
    for k, v in d.items():
      if isinstance(v, dict) and v and any(isinstance(x, dict) for x in v.values()):
        lines.append(f"{pad}{k}:")
        walk(v, pad + indent)
      elif isinstance(v, dict) and v:
        lines.append(f"{pad}{k}: " + "; ".join(f"{a}={_format_value(b)}" for a, b in v.items()))
      else:
        lines.append(f"{pad}{k}: {_format_value(v)}")

  walk(protocol, indent)
  return "\n".join(lines)


def _format_value(v) -> str:
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(_format_value(x) for x in v) + "]"
  if isinstance(v, float):
    return f"{v:g}"
  return str(v)


def format_section(name: str, section: dict) -> str:
  """What ``reproduce`` prints for one experiment: protocol, table, notes, targets."""
  out = [f"== {name} ({section.get('elapsed_s', 0.0):.0f} s) =="]
  if section.get("protocol"):
    out += ["protocol:", format_protocol(section["protocol"])]
  tables = {"": section.get("table")}
  tables.update({k: v for k, v in section.items() if k.endswith("_table") and k != "table"})
  for key, rows in tables.items():
    if rows and isinstance(rows, list):
      if key:
        out.append(f"{key.removesuffix('_table').replace('_', ' ')}:")
      out.append(format_table(rows))
  out += [f"note: {note}" for note in section.get("notes", [])]
  if "targets" in section:
    out.append("targets: " + ", ".join(f"{k}={_format(v)}" for k, v in section["targets"].items()))
  return "\n".join(out)


def _write_summary(path: Path, summary: dict) -> None:
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(summary, indent=2, default=_json_default))
  tmp.replace(path)


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
    help="directory with the MNIST IDX files (else $TELEPORT_JAX_MNIST_DIR, else the cache "
    "($TELEPORT_JAX_CACHE/mnist, $XDG_CACHE_HOME/teleport_jax/mnist or "
    "~/.cache/teleport_jax/mnist), else downloaded into the cache from a public mirror and "
    "checksum-verified, else scikit-learn's bundled 8x8 digits)",
  )
  parser.add_argument(
    "--no-download",
    action="store_true",
    help="never fetch MNIST from the network (also $TELEPORT_JAX_NO_DOWNLOAD=1); without "
    "local MNIST files the 8x8 digits are used",
  )
  parser.add_argument(
    "--only",
    nargs="*",
    choices=sorted(EXPERIMENTS),
    default=None,
    help="run only these experiments (default: all but " + ", ".join(OPT_IN) + ")",
  )
  parser.add_argument(
    "--text",
    type=Path,
    default=None,
    help="text file for the character-level workloads (default: CPython's pydoc_data.topics)",
  )
  parser.add_argument(
    "--retune", action="store_true", help="tune the workloads' methods again (else stored values)"
  )
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  args = parser.parse_args(argv)

  names = args.only or [n for n in EXPERIMENTS if n not in OPT_IN]
  data_dir, data_source = locate_data(args.data_dir, names, no_download=args.no_download)
  config = common.RunConfig(
    quick=args.quick,
    out_dir=args.out,
    data_dir=data_dir,
    data_source=data_source,
    text=args.text,
    retune=args.retune,
  )
  args.out.mkdir(parents=True, exist_ok=True)
  modules = {
    n: importlib.import_module(f"teleport_jax.experiments.{EXPERIMENTS[n]}") for n in names
  }
  if "workloads" in names:  # its timings are taken with XLA's own CPU dots
    common.prefer_xla_cpu_dots()
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
      "cpu_count": os.cpu_count(),
      "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
    },
    "library": _library_fingerprint(),
    "experiments": {},
  }
  path = args.out / "summary.json"
  t0 = time.perf_counter()
  with tqdm(total=total, desc="reproduce", disable=args.no_progress, file=sys.stderr) as bar:
    for name, module in modules.items():
      bar.set_postfix_str(name)
      start = time.perf_counter()
      section = module.run(config, bar)
      section["elapsed_s"] = time.perf_counter() - start
      summary["experiments"][name] = section
      summary["elapsed_s"] = time.perf_counter() - t0
      # the results of finished experiments survive an interrupted run
      _write_summary(path, summary)
      tqdm.write("\n" + format_section(name, section), file=sys.stdout)
      sys.stdout.flush()
  summary["elapsed_s"] = time.perf_counter() - t0
  _write_summary(path, summary)
  print(f"\nwrote {path} and plots in {args.out}/ ({summary['elapsed_s']:.0f} s)")
  missed = missed_targets(summary)
  if not missed:
    return 0
  print(f"\ntargets missed: {', '.join(missed)}", flush=True)
  if args.quick:
    print("(a --quick run has fewer seeds and epochs than the targets are set for: informational)")
    return 0
  return 1


def missed_targets(summary: dict) -> list[str]:
  """``experiment.target`` for every yes/no target of ``summary`` that does not hold.

  Numeric targets (an epoch, a loss) are reported, not judged.
  """
  return [
    f"{name}.{key}"
    for name, section in summary.get("experiments", {}).items()
    for key, value in section.get("targets", {}).items()
    if value is False
  ]


def locate_data(
  data_dir: Path | None, names: list[str], *, no_download: bool = False
) -> tuple[Path | None, str | None]:
  """The MNIST directory for the experiments ``names`` and a phrase for its note.

  The user's directory is ``data_dir`` or ``$TELEPORT_JAX_MNIST_DIR``. When one of
  :data:`MNIST_EXPERIMENTS` runs, :func:`~teleport_jax.experiments.data.locate_mnist`
  looks there, then in the cache, then downloads (unless ``no_download`` or
  ``$TELEPORT_JAX_NO_DOWNLOAD``); if that gives no MNIST its one-line reason is
  printed to stderr and the 8x8 digits are used.

  Returns:
    ``(data_dir, data_source)`` for :class:`~teleport_jax.experiments.common.RunConfig`.
  """
  from teleport_jax.experiments import data

  env = os.environ.get(data.MNIST_DIR_ENV)
  user_dir = data_dir or (Path(env) if env else None)
  if not any(n in MNIST_EXPERIMENTS for n in names):
    return user_dir, None
  found = data.locate_mnist(user_dir, download=False if no_download else None)
  if found.message:
    print(found.message, file=sys.stderr, flush=True)
  return found.directory, found.detail


def _library_fingerprint() -> dict:
  """Which library code produced the figures: a hash of its sources (and git, if any)."""
  import hashlib
  import subprocess

  import teleport_jax

  root = Path(teleport_jax.__file__).parent

  def digest(paths) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
      h.update(str(path.relative_to(root)).encode())
      h.update(path.read_bytes())
    return h.hexdigest()[:16]

  experiments = root / "experiments"
  out = {
    "version": teleport_jax.__version__,
    # the library (what the figures measure) and the experiments (how they are run)
    "library_sha256": digest(p for p in root.rglob("*.py") if experiments not in p.parents),
    "experiments_sha256": digest(experiments.glob("*.py")),
  }
  try:
    git = ["git", "-C", str(root.parent)]
    out["git_commit"] = subprocess.run(
      [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      [*git, "status", "--porcelain", "--", "teleport_jax"],
      capture_output=True,
      text=True,
      check=True,
    ).stdout
    out["git_uncommitted_changes"] = bool(dirty.strip())
  except (OSError, subprocess.CalledProcessError):
    pass
  return out


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

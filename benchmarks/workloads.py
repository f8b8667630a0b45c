"""Training workloads: what ``with_teleport`` costs when idle, and time to a target loss.

Two parts, in one process:

1. **Idle cost** (below). 2. **Time to target** against tuned baselines: the
``workloads`` experiment of ``reproduce``
(:mod:`teleport_jax.experiments.workloads` documents the protocol: methods,
tuning budget, seeds, target, metric), on real data (the bundled digits or
MNIST, CPython's ``pydoc_data.topics`` text or ``--text FILE``). Skipped with
``--overhead-only``.

Idle cost: what ``with_teleport`` costs at a step that does not teleport, at workload sizes.

A training loop that adds ``tj.with_teleport`` pays, at every step that does
not teleport, for whatever the wrapper does besides the wrapped optimizer. This
suite compiles, for each workload, the plain train step (``value_and_grad``,
the optax update, ``apply_updates``) and the same step with the optimizer
wrapped in ``tj.with_teleport(optimizer, symmetry, tj.every(10**6, start=1))``
called at a step the schedule skips, in one process, and times them side by
side (interleaved rounds, median per call, ``block_until_ready``). The ratio
is ``skip_step_overhead`` (target: at most 1.05). The same step compiled with
``update(..., teleport=False)`` (decided in Python: no conditional in the
program) gives ``static_skip_step_overhead``.

Workloads (random inputs of the workloads' shapes; the cost does not depend on
the values):

* ``mlp_digits``: an MLP 64-128-128-10 (the digits protocol: 8x8 images,
  batch 64), SGD, ``PositiveRescaling``;
* ``cnn_digits``, ``cnn_bn_digits``: a ReLU CNN (convolutions 16 and 32
  channels, 2x2 max-pooling, dense 64-10) without and with BatchNorm, batch
  64, Adam, the symmetries ``tj.find_symmetries`` finds;
* ``char_transformer``: a decoder-only character-level transformer of the size
  of nanoGPT's CPU ``shakespeare_char`` configuration (4 layers, 4 heads, width
  128, context 64, batch 12, vocabulary 103 as in ``pydoc_data.topics``), AdamW
  (lr 1e-3, b2 0.99, weight decay 0.1), GELU/LayerNorm and
  ReLU/gain-free-RMSNorm, the symmetries ``tj.find_symmetries`` finds.

Results: ``benchmarks/results/workloads.json``, ``{"workloads": {NAME:
{"target_val_loss", "baseline", "skip_step_overhead", "loop_skip_overhead",
"loop_skip_overhead_split",
"methods": {METHOD: {"kind", "time_to_target_s", "steps_to_target",
"final_val_loss", "compile_s", "teleport_cost_grad_steps", ...}}}}}``, and plots
``workloads_NAME.png`` next to it.

Usage::

  python -m benchmarks.workloads [--quick | --smoke] [--only NAME ...] [--overhead-only]
      [--retune] [--text FILE] [--data-dir DIR] [--out benchmarks/results]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import teleport_jax as tj  # noqa: E402
from benchmarks import _common as C  # noqa: E402
from teleport_jax import models  # noqa: E402
from teleport_jax.experiments import common  # noqa: E402
from teleport_jax.experiments import workloads as wl_lib  # noqa: E402

# XLA's own CPU dot kernels instead of YNNPACK's (faster for the transformers;
# every method of a workload runs with the same setting). Set XLA_FLAGS to choose.
common.prefer_xla_cpu_dots()

SETTINGS = {
  "smoke": dict(repeats=2, scale=0.25),
  "quick": dict(repeats=5, scale=1.0),
  "full": dict(repeats=11, scale=1.0),
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
TARGET = 1.05


def _int(x: float) -> int:
  return max(2, int(round(x)))


def _classifier(m, batch: int):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, *m.inputs.shape[1:])), m.inputs.dtype)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  apply = m.apply

  def loss(params, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y))

  return loss, (x, y)


def workload(name: str, scale: float):
  """``(params, loss(params, x, y), (x, y), symmetry, optimizer, description)``."""
  if name == "mlp_digits":
    h = _int(128 * scale)
    m = models.mlp((64, h, h, 10), activation="relu", batch=64)
    loss, batch = _classifier(m, 64)
    sym = tj.PositiveRescaling()
    return m.params, loss, batch, sym, optax.sgd(0.1), f"MLP 64-{h}-{h}-10, batch 64, SGD"
  if name in ("cnn_digits", "cnn_bn_digits"):
    c1, c2, d = _int(16 * scale), _int(32 * scale), _int(64 * scale)
    bn = name == "cnn_bn_digits"
    m = models.cnn(
      channels=(c1, c2),
      dense=(d, 10),
      activation="relu",
      pool="max",
      batchnorm=bn,
      image=(8, 8, 1),
      batch=64,
    )
    loss, batch = _classifier(m, 64)
    sym = tj.find_symmetries(m.apply, m.params, batch[0])
    what = f"CNN conv {c1}-{c2}, dense {d}-10{', BatchNorm' if bn else ''}, batch 64, Adam"
    return m.params, loss, batch, sym, optax.adam(1e-3), what
  if name.startswith("char_transformer"):
    relu = name.endswith("relu")
    layers, width = _int(4 * scale), 8 * _int(16 * scale)
    m = models.transformer(
      vocab=103,
      d_model=width,
      heads=4,
      layers=layers,
      context=64,
      batch=12,
      mlp="relu" if relu else "gelu",
      norm="rmsnorm_gainfree" if relu else "layernorm",
    )
    tokens, targets = models.example_batch(m)
    lm_loss = models.loss_for(m)

    def loss(params, x, y):
      return lm_loss(params, (x, y))

    sym = tj.find_symmetries(m.apply, m.params, tokens)
    opt = optax.adamw(1e-3, b1=0.9, b2=0.99, weight_decay=0.1)
    kind = "ReLU/gain-free RMSNorm" if relu else "GELU/LayerNorm"
    what = f"transformer {layers}x{width}, 4 heads, context 64, batch 12, {kind}, AdamW"
    return m.params, loss, (tokens, targets), sym, opt, what
  raise ValueError(f"unknown workload {name!r}; choose from {NAMES}.")


NAMES = ("mlp_digits", "cnn_digits", "cnn_bn_digits", "char_transformer", "char_transformer_relu")


def overhead(name: str, scale: float, repeats: int) -> dict:
  params, loss, (x, y), sym, opt, what = workload(name, scale)
  tele = tj.with_teleport(opt, sym, tj.every(10**6, start=1))

  def plain_step(p, s, x, y):
    value, g = jax.value_and_grad(loss)(p, x, y)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, value

  def tele_step(p, s, x, y, teleport=None):
    value, g = jax.value_and_grad(loss)(p, x, y)
    u, s = tele.update(g, s, p, value_fn=loss, x=x, y=y, teleport=teleport)
    return optax.apply_updates(p, u), s, value

  def static_step(p, s, x, y):  # decided in Python: no conditional in the program
    return tele_step(p, s, x, y, teleport=False)

  s_plain, s_tele = opt.init(params), tele.init(params)  # count 0: not scheduled
  assert not bool(s_tele.schedule(s_tele.count))
  plain = C.compile_fn(plain_step, params, s_plain, x, y)
  telep = C.compile_fn(tele_step, params, s_tele, x, y)
  static = C.compile_fn(static_step, params, s_tele, x, y)
  out_p, out_t = plain(params, s_plain, x, y), telep(params, s_tele, x, y)
  # the same update up to rounding (the two programs fuse differently)
  diff = max(
    float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
    for a, b in zip(jax.tree.leaves(out_p[0]), jax.tree.leaves(out_t[0]))
  )
  t = C.time_side_by_side(
    {
      "plain": lambda: plain(params, s_plain, x, y),
      "skip": lambda: telep(params, s_tele, x, y),
      "static": lambda: static(params, s_tele, x, y),
    },
    repeats=repeats,
  )
  n_params = sum(a.size for a in jax.tree.leaves(params))
  return {
    "workload": name,
    "model": what,
    "parameters": int(n_params),
    "symmetry_dimension": getattr(sym, "dimension", None),
    "plain_step_s": t["plain"].median,
    "skip_step_s": t["skip"].median,
    "skip_step_overhead": t["skip"].median / t["plain"].median,
    "static_skip_step_s": t["static"].median,
    "static_skip_step_overhead": t["static"].median / t["plain"].median,
    "update_rel_diff": diff,
    "compile_plain_s": plain.total_s,
    "compile_with_teleport_s": telep.total_s,
  }


def run(mode: str, only=None, train=True, retune=False, text=None, data_dir=None, out=None) -> dict:
  cfg = SETTINGS[mode]
  names = only or NAMES
  records = []
  for name in names:
    r = overhead(name, cfg["scale"], cfg["repeats"])
    records.append(r)
    print(
      f"  {name}: plain {r['plain_step_s'] * 1e3:.2f} ms, with_teleport (skipped) "
      f"{r['skip_step_s'] * 1e3:.2f} ms, x{r['skip_step_overhead']:.3f}; teleport=False "
      f"{r['static_skip_step_s'] * 1e3:.2f} ms, x{r['static_skip_step_overhead']:.3f}",
      flush=True,
    )
  rows = [
    {
      "workload": r["workload"],
      "model": r["model"],
      "parameters": r["parameters"],
      "plain ms": r["plain_step_s"] * 1e3,
      "skipped teleport ms": r["skip_step_s"] * 1e3,
      "overhead": r["skip_step_overhead"],
      "teleport=False ms": r["static_skip_step_s"] * 1e3,
      "overhead teleport=False": r["static_skip_step_overhead"],
      "params rel diff": r["update_rel_diff"],
      "compile plain s": r["compile_plain_s"],
      "compile with_teleport s": r["compile_with_teleport_s"],
    }
    for r in records
  ]
  targets = [
    C.Target(
      f"{r['workload']}: a step that does not teleport / the plain step",
      r["skip_step_overhead"],
      TARGET,
      "<=",
      "x",
    ).as_dict()
    for r in records
  ] + [
    C.Target(
      f"{r['workload']}: the same step compiled with teleport=False / the plain step",
      r["static_skip_step_overhead"],
      TARGET,
      "<=",
      "x",
    ).as_dict()
    for r in records
  ]
  workloads = {
    r["workload"]: {
      "skip_step_overhead": r["skip_step_overhead"],
      "static_skip_step_overhead": r["static_skip_step_overhead"],
    }
    for r in records
  }
  tables = []
  if train:
    config = common.RunConfig(
      quick=mode == "quick", out_dir=out, data_dir=data_dir, text=text, retune=retune, mode=mode
    )
    section = wl_lib.run(config, None, names=names)
    for name, rec in section["workloads"].items():
      workloads[name].update(rec)
      for key, what in (
        ("time_ratio", "the best tuned baseline's (it set the target)"),
        ("time_ratio_vs_fastest_baseline", "the fastest baseline's"),
      ):
        ratios = [r[key] for r in rec["methods"].values() if r["kind"] == "teleport"]
        best = min((x for x in ratios if x is not None), default=None)
        targets.append(
          C.Target(
            f"{name}: best teleport's median time to target / {what}",
            best if best is not None else float("inf"),
            1.0,
            "<=",
            "x",
          ).as_dict()
        )
    tables.append(
      {
        "title": "time to the best tuned baseline's final validation loss",
        "rows": section["table"],
        "columns": list(section["table"][0]),
      }
    )
  return {
    "suite": "workloads",
    "mode": mode,
    "records": records,
    "workloads": workloads,
    "tables": tables
    + [
      {
        "title": "with_teleport at a step that does not teleport vs the plain step",
        "rows": rows,
        "columns": list(rows[0]),
      }
    ],
    "targets": targets,
    "notes": [
      "time to target: training seconds (a compiled scan or compiled steps, compile time "
      "apart) until the validation loss is first at or below the best tuned baseline's "
      "median final validation loss; 'time ratio' divides medians over the evaluation seeds.",
      "Both steps are compiled ahead of time (compile time apart) and timed in interleaved "
      "rounds in one process; 'params rel diff' is the largest difference between "
      "the parameters the two steps return, relative to the largest entry of each leaf "
      "(rounding: the two programs fuse differently).",
    ],
  }


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.workloads", description=__doc__.split("\n\n")[0]
  )
  size = p.add_mutually_exclusive_group()
  size.add_argument("--quick", action="store_true", help="fewer repeats")
  size.add_argument("--smoke", action="store_true", help="quarter-size models, two repeats")
  p.add_argument("--only", nargs="+", choices=NAMES, help="workloads to run")
  p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for workloads.json")
  p.add_argument("--overhead-only", action="store_true", help="only the idle-step cost")
  p.add_argument("--retune", action="store_true", help="tune the methods again")
  p.add_argument("--text", type=Path, default=None, help="text for the character workloads")
  p.add_argument("--data-dir", type=Path, default=None, help="directory with MNIST IDX files")
  args = p.parse_args(argv)
  mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
  t = time.perf_counter()
  args.out.mkdir(parents=True, exist_ok=True)
  result = run(
    mode,
    args.only,
    train=not args.overhead_only,
    retune=args.retune,
    text=args.text,
    data_dir=args.data_dir,
    out=args.out,
  )
  result["wall_s"] = time.perf_counter() - t
  machine = C.machine_info()
  result["machine"] = {
    k: machine[k] for k in ("backend", "devices", "jax_version", "cpu_count", "load_average")
  }
  for rec in result["workloads"].values():
    rec["mode"] = mode
  path = args.out / "workloads.json"
  if args.only and path.is_file():
    # a run of some workloads keeps the others' results (each says its mode)
    merged = json.loads(path.read_text()).get("workloads", {})
    for name, rec in result["workloads"].items():
      merged[name] = {**merged.get(name, {}), **rec}
    result["workloads"] = merged
  C.write_json(path, result)
  print(C.format_result(result), flush=True)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])

"""What a teleport costs and what it buys: the default one-step teleport against the look-ahead search.

For the seed's regression problem (GD, lr 1e-4) and three training workloads
(the digits MLP and CNN and the character transformer, AdamW at their tuned
values), one process measures, for each teleport configuration:

* **cost**: the README's jitted train step (``with_teleport`` with the
  schedule inside) at a step that teleports and at one the schedule skips,
  timed in interleaved rounds against the plain optimizer step (its median
  and interquartile range per call, blocked on each call), and the compile
  time of the teleporting step against the plain one's;
* **benefit**: from ``snapshots`` points of a plain training run, the
  five-step look-ahead of the optimizer (the previous default's objective:
  its loss on the teleport batch after the teleport step and four more steps,
  against five plain steps) and the loss on held-out data after 50 steps (the
  same minibatches with and without the teleport).

Configurations: ``onestep`` (the default: :class:`teleport_jax.solvers.OneStep`
on the one-step look-ahead, 2 trials, its stability bound by differences)
and ``lookahead`` (the previous default: :class:`teleport_jax.solvers.Lie`,
10 steps on the 5-step optimizer look-ahead, the stability bound by
forward-over-reverse products at every kept step). Both with
``stability=True`` (as a repeating schedule's default) and state ``"keep"``.

Usage::

  python -m benchmarks.teleport_cost [--quick] [--only NAME ...] [--out benchmarks/results]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import teleport_jax as tj  # noqa: E402
from benchmarks import _common as C  # noqa: E402
from teleport_jax.experiments import regression  # noqa: E402
from teleport_jax.experiments import workloads as W  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
CASES = ("regression", "mlp_digits", "cnn_digits", "char_transformer")
VARIANTS = {
  "onestep": {},
  "lookahead": dict(
    solver_backend=tj.solvers.Lie(),
    objective=tj.objectives.optimizer_lookahead(5),
    num_steps=10,
  ),
}
NEXT_STEPS = 50
LOOKAHEAD_STEPS = 5


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
  name: str
  description: str
  loss: Callable  # loss(params, x, y)
  params: Any
  optimizer: optax.GradientTransformation
  batch: Callable  # step -> (x, y)
  held_out: tuple
  symmetry: Any
  snapshots: tuple[int, ...]


def make_case(name: str, quick: bool) -> Case:
  if name == "regression":
    params, x, y = regression.make_problem(0)
    snaps = (0, 5, 20, 60) if quick else (0, 5, 10, 20, 40, 60, 100, 150)
    return Case(
      name,
      "the seed's MLP regression (X 5x4, W 6x5, 7x6, 8x7, LeakyReLU 0.1), GD lr 1e-4, "
      "DataDependentGL",
      regression.loss_fn,
      params,
      optax.sgd(regression.GD_LR),
      lambda step: (x, y),
      (x, y),
      regression.symmetry(),
      snaps,
    )
  wl = W.make_workload(name, "full")
  hp = W.load_tuned()["full"][name]["adamw"]["hp"]
  sample = jax.jit(wl.sample)
  n = 3 if quick else 6
  last = 300 if "transformer" in name else 600
  snaps = tuple(int(s) for s in np.linspace(20, last, n))
  return Case(
    name,
    wl.description,
    wl.loss,
    wl.init(0),
    optax.adamw(hp["lr"], b1=0.9, b2=0.99, weight_decay=hp["wd"]),
    lambda step: sample(wl.train, jax.random.fold_in(jax.random.key(0), step)),
    wl.val,
    wl.symmetry,
    snaps,
  )


def _teleporter(case: Case, kw: dict, fire: list[int]):
  return tj.with_teleport(
    case.optimizer, case.symmetry, tj.schedules.at_steps(fire, pad_to=1), stability=True, **kw
  )


def _steps(case: Case, opt):
  loss = case.loss

  def step(p, s, x, y):
    v, g = jax.value_and_grad(loss)(p, x, y)
    u, s = opt.update(g, s, p, value=v, value_fn=loss, x=x, y=y)
    return optax.apply_updates(p, u), s

  return step


def cost(case: Case, repeats: int) -> dict:
  """Compile times and per-call times of the plain, teleporting and skipped steps."""
  x, y = case.batch(0)
  plain = _steps(case, case.optimizer)
  s0 = case.optimizer.init(case.params)
  c_plain = C.compile_fn(plain, case.params, s0, x, y)
  out = {"plain_compile_s": c_plain.total_s, "variants": {}}
  fns = {"plain": lambda: c_plain(case.params, s0, x, y)}
  for name, kw in VARIANTS.items():
    opt = _teleporter(case, kw, [0])
    state = opt.init(case.params)
    c = C.compile_fn(_steps(case, opt), case.params, state, x, y)
    fire = state._replace(verified=jnp.asarray(True))  # as after the first teleport
    skip = fire._replace(schedule=tj.schedules.at_steps([10**6], pad_to=1))
    info = c(case.params, fire, x, y)[1].info
    out["variants"][name] = {
      "compile_s": c.total_s,
      "compile_ratio": c.total_s / c_plain.total_s,
      "accepted": bool(info.accepted),
      "status": tj.TeleportStatus(int(info.status)).name,
    }
    fns[f"{name}:teleport"] = lambda c=c, s=fire: c(case.params, s, x, y)
    fns[f"{name}:skipped"] = lambda c=c, s=skip: c(case.params, s, x, y)
  t = C.time_side_by_side(fns, repeats=repeats)
  base = t["plain"].median
  out["plain_ms"] = 1e3 * base
  out["plain_iqr_ms"] = [1e3 * t["plain"].q1, 1e3 * t["plain"].q3]
  for name, rec in out["variants"].items():
    tt, ts = t[f"{name}:teleport"], t[f"{name}:skipped"]
    rec.update(
      teleport_ms=1e3 * tt.median,
      teleport_iqr_ms=[1e3 * tt.q1, 1e3 * tt.q3],
      teleport_in_steps=tt.median / base,
      skipped_ms=1e3 * ts.median,
      skipped_iqr_ms=[1e3 * ts.q1, 1e3 * ts.q3],
      skipped_ratio=ts.median / base,
    )
  return out


def benefit(case: Case) -> dict:
  """Per snapshot and configuration: the 5-step look-ahead gain and the loss after 50 steps."""
  plain = jax.jit(_steps(case, case.optimizer))
  held = jax.jit(lambda p: case.loss(p, *case.held_out))
  teleporters = {}
  for name, kw in VARIANTS.items():
    opt = _teleporter(case, kw, [0])
    teleporters[name] = (opt, jax.jit(_steps(case, opt)))
  p, s = case.params, case.optimizer.init(case.params)
  rows = []
  step = 0
  for snap in case.snapshots:
    while step < snap:
      p, s = plain(p, s, *case.batch(step))
      step += 1
    x, y = case.batch(step)
    # without a teleport: 5 steps on the teleport batch, 50 on the stream
    q, r = p, s
    for _ in range(LOOKAHEAD_STEPS):
      q, r = plain(q, r, x, y)
    base_la = float(case.loss(q, x, y))
    q, r = p, s
    for k in range(NEXT_STEPS):
      q, r = plain(q, r, *case.batch(step + k))
    base_next = float(held(q))
    row = {"step": step, "loss": float(case.loss(p, x, y)), "held_out": float(held(p))}
    row["lookahead5_plain"] = base_la
    row["held_out_after_50_plain"] = base_next
    for name, (opt, tstep) in teleporters.items():
      st = opt.init(p)._replace(inner_state=s)
      q1, st1 = tstep(p, st, x, y)
      info = st1.info
      q, r = q1, st1.inner_state
      for _ in range(LOOKAHEAD_STEPS - 1):
        q, r = plain(q, r, x, y)
      la = float(case.loss(q, x, y))
      q, r = q1, st1.inner_state
      for k in range(1, NEXT_STEPS):
        q, r = plain(q, r, *case.batch(step + k))
      row[name] = {
        "accepted": bool(info.accepted),
        "status": tj.TeleportStatus(int(info.status)).name,
        "rel_loss_drift": float(info.rel_loss_drift),
        "lookahead5": la,
        "lookahead5_gain": base_la - la,
        "held_out_after_50": float(held(q)),
        "held_out_gain_50": base_next - float(held(q)),
      }
    rows.append(row)
  return {"snapshots": rows}


def summarise(rec: dict) -> dict:
  out = {}
  rows = rec["benefit"]["snapshots"]
  for name in VARIANTS:
    gains = [r[name]["lookahead5_gain"] for r in rows]
    nxt = [r[name]["held_out_gain_50"] for r in rows]
    v = rec["cost"]["variants"][name]
    out[name] = {
      "teleport_in_steps": v["teleport_in_steps"],
      "compile_ratio": v["compile_ratio"],
      "skipped_ratio": v["skipped_ratio"],
      "median_lookahead5_gain": statistics.median(gains),
      "median_held_out_gain_50": statistics.median(nxt),
      "accepted": sum(r[name]["accepted"] for r in rows),
      "max_rel_loss_drift": max(r[name]["rel_loss_drift"] for r in rows),
    }
  la = out["lookahead"]["median_lookahead5_gain"]
  out["onestep"]["gain_kept"] = out["onestep"]["median_lookahead5_gain"] / la if la > 0 else None
  return out


def table(records: dict) -> str:
  rows = []
  for name, rec in records.items():
    for v, s in rec["summary"].items():
      rows.append(
        {
          "workload": name,
          "teleport": v,
          "teleport (plain steps)": f"{s['teleport_in_steps']:.1f}",
          "compile (x plain)": f"{s['compile_ratio']:.1f}",
          "skipped step (x plain)": f"{s['skipped_ratio']:.2f}",
          "median 5-step look-ahead gain": f"{s['median_lookahead5_gain']:.3g}",
          "median held-out gain after 50": f"{s['median_held_out_gain_50']:.3g}",
          "accepted": f"{s['accepted']}/{len(rec['benefit']['snapshots'])}",
        }
      )
  return C.format_table("A teleport: its cost against a plain step, and what it buys", rows)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="fewer snapshots and timing rounds")
  p.add_argument("--only", nargs="*", choices=CASES, default=None)
  p.add_argument("--out", type=Path, default=DEFAULT_OUT)
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  records = {}
  for name in args.only or CASES:
    case = make_case(name, args.quick)
    print(f"{name}: {case.description}", flush=True)
    rec = {"description": case.description, "cost": cost(case, 5 if args.quick else 9)}
    rec["benefit"] = benefit(case)
    rec["summary"] = summarise(rec)
    records[name] = rec
    print(table({name: rec}), flush=True)
  result = {
    "suite": "teleport_cost",
    "mode": "quick" if args.quick else "full",
    "machine": C.machine_info(),
    "records": records,
    "wall_s": time.perf_counter() - t0,
  }
  print(table(records))
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    C.write_json(args.out / "teleport_cost.json", result)
  return result


if __name__ == "__main__":
  sys.exit(0 if main() else 1)

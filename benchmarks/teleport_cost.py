"""What one look-ahead teleport costs, by component, and what warm starts change.

On ``cnn_digits`` (the workloads' ReLU CNN, batch 64, AdamW at its tuned
values), one jitted train step that teleports (``update(..., teleport=True)``,
after the one-time verification) is timed against one plain AdamW step, for
the workloads' look-ahead teleport and variants that drop one ingredient each:
the stability bound, look-ahead steps ``k``, line-search steps, and a
closed-form gradient balancing. Each row also gives the look-ahead objective
before and after (lower is better). Then the workloads' ``tp_lookahead``
trains on the evaluation seeds with and without ``warm_start=True``.

Single calls include what a call costs beyond the computation (the teleport
program's temporary buffer is allocated per call); inside a compiled training
loop a teleport costs less (``teleport_cost_grad_steps`` in
``workloads.json``).

Usage::

  python -m benchmarks.teleport_cost [--out benchmarks/results]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import teleport_jax as tj  # noqa: E402
from teleport_jax.experiments import workloads as W  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

VARIANTS = {
  "look-ahead k=5, 5 line-search steps, stability (tp_lookahead)": {},
  "  without the stability bound": dict(stability=False),
  "  look-ahead k=2": dict(objective=tj.objectives.optimizer_lookahead(2)),
  "  2 line-search steps": dict(num_steps=2),
  "  k=2, 2 steps, no stability": dict(
    objective=tj.objectives.optimizer_lookahead(2), num_steps=2, stability=False
  ),
  "  k=1, 2 steps, no stability": dict(
    objective=tj.objectives.optimizer_lookahead(1), num_steps=2, stability=False
  ),
  "gradient balancing, 1 sweep (tp_gradbalance_50)": dict(
    solver_backend=tj.solvers.Balance("grad", max_log_scale=1.0), num_steps=1, stability=False
  ),
}


def _median_time(fn, n):
  jax.block_until_ready(fn())
  ts = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def cost_rows(wl, hp) -> list[dict]:
  params = wl.init(0)
  x, y = wl.sample(wl.train, jax.random.key(0))
  opt = optax.adamw(hp["lr"], b1=0.9, b2=0.99, weight_decay=hp["wd"])

  def plain(p, s):
    g = jax.grad(wl.loss)(p, x, y)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  s0 = opt.init(params)
  compiled = jax.jit(plain).lower(params, s0).compile()
  t_plain = _median_time(lambda: compiled(params, s0), 200)
  rows = []
  for name, kw in VARIANTS.items():
    kw = {"solver_backend": tj.solvers.LineSearch(), "num_steps": 5, **kw}
    tele = tj.with_teleport(
      opt, wl.symmetry, tj.every(250, start=20), state_policy="transport", **kw
    )

    def step(p, s, tele=tele):
      v, g = jax.value_and_grad(wl.loss)(p, x, y)
      u, s = tele.update(g, s, p, value=v, value_fn=wl.loss, x=x, y=y, teleport=True)
      return optax.apply_updates(p, u), s

    state = tele.init(params)._replace(verified=jnp.asarray(True))  # as after the first
    c = jax.jit(step).lower(params, state).compile()
    t = _median_time(lambda c=c, state=state: c(params, state), 10)
    info = c(params, state)[1].info
    rows.append(
      {
        "variant": name.strip(),
        "ms": 1e3 * t,
        "adamw_steps": t / t_plain,
        "accepted": bool(info.accepted),
        "objective_before": float(info.objective_before),
        "objective_after": float(info.objective_after),
      }
    )
    print(f"{name:64s} {1e3 * t:8.1f} ms = {t / t_plain:6.0f} AdamW steps", flush=True)
  return [{"variant": "plain AdamW step", "ms": 1e3 * t_plain, "adamw_steps": 1.0}] + rows


def warm_rows(wl, hp, seeds=3) -> list[dict]:
  base = W.METHODS["tp_lookahead"]
  warm = dataclasses.replace(
    base,
    name="tp_lookahead_warm",
    build=lambda hp, lr, wl: W.lookahead_teleport(hp, lr, wl, warm_start=True),
  )
  rows = []
  for method in (base, warm):
    trainer = W.Trainer(wl, method)
    runs = [trainer.run(hp, s) for s in range(seeds)]
    finals = [r["val_loss"][-1] for r in runs]
    rows.append(
      {
        "method": method.name,
        "final_val_loss": finals,
        "median": statistics.median(finals),
        "train_s": [r["time_s"][-1] for r in runs],
        "teleports": [r["teleports"] for r in runs],
        "rejected": [r["rejected"] for r in runs],
        "max_rel_loss_drift": max(r["max_rel_loss_drift"] for r in runs),
      }
    )
    print(f"{method.name:20s} final val. loss {[round(f, 4) for f in finals]}", flush=True)
  return rows


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", type=Path, default=DEFAULT_OUT)
  args = p.parse_args(argv)
  wl = W.make_workload("cnn_digits", "full")
  hp = W.load_tuned()["full"]["cnn_digits"]["tp_lookahead"]["hp"]
  t = time.perf_counter()
  result = {"suite": "teleport_cost", "workload": "cnn_digits", "hp": hp}
  result["cost"] = cost_rows(wl, hp)
  result["warm_start"] = warm_rows(wl, hp)
  result["wall_s"] = time.perf_counter() - t
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "teleport_cost.json").write_text(json.dumps(result, indent=1) + "\n")
  return result


if __name__ == "__main__":
  main()

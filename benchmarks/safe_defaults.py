"""Are the defaults safe? Loss jumps after repeated teleports, with and without them.

Usage::

  python -m benchmarks.safe_defaults [--quick] [--out benchmarks/results]

Trains with a teleport every 50 steps for 2,000 steps (5 seeds) and measures,
after every teleport, the largest loss over the next 20 steps relative to the
loss just before the teleport (the *jump*; 1 means no rise); for ``none`` the
same windows without teleports measure the optimizer's own rises. Problems:

* ``regression``: the seed's problem (``teleport_jax.experiments.regression``:
  a 5-6-7-8 LeakyReLU(0.1) MLP on 4 samples, uniform weights) with the exact
  ``DataDependentGL``; SGD lr 1e-4 and Adam lr 1e-3;
* ``mlp``: a 8-32-32-4 LeakyReLU(0.1) MLP on 64 Gaussian samples with a random
  teacher, ``PositiveRescaling``; SGD lr 1e-2 and Adam lr 1e-3.

Variants: ``defaults`` (``tj.with_teleport(opt, symmetry, tj.every(50,
start=5))``: the optimizer look-ahead objective, stability-constrained because
the schedule repeats), ``no_stability`` (the same with ``stability=False``),
``max_grad_norm`` (the paper's objective without the constraint: what the
library did by default before) and ``none`` (no teleport). Every training loop
is one compiled ``lax.scan``. Writes ``safe_defaults.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import teleport_jax as tj
from teleport_jax.experiments import regression

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
PERIOD, START, WINDOW = 50, 5, 20
LEAKY = tj.activations.leaky_relu(0.1)


def _mlp_problem(seed: int):
  k = jax.random.split(jax.random.key(seed), 5)
  widths = (8, 32, 32, 4)
  params = [
    (
      jax.random.normal(k[i], (widths[i], widths[i + 1])) / np.sqrt(widths[i]),
      jnp.zeros(widths[i + 1]),
    )
    for i in range(3)
  ]
  x = jax.random.normal(k[3], (64, 8))
  teacher = jax.random.normal(k[4], (8, 4))
  y = jnp.tanh(x @ teacher)
  return params, x, y


def _mlp_loss(params, x, y):
  h = x
  for i, (w, b) in enumerate(params):
    h = h @ w + b
    if i < len(params) - 1:
      h = LEAKY(h)
  return 0.5 * jnp.mean(jnp.sum((h - y) ** 2, axis=-1))


PROBLEMS = {
  "regression": dict(
    make=lambda seed: regression.make_problem(seed),
    loss=regression.loss_fn,
    symmetry=lambda: regression.symmetry(),
    lrs={"sgd": 1e-4, "adam": 1e-3},
  ),
  "mlp": dict(
    make=_mlp_problem,
    loss=_mlp_loss,
    symmetry=lambda: tj.PositiveRescaling(),
    lrs={"sgd": 1e-2, "adam": 1e-3},
  ),
}
VARIANTS = ("defaults", "no_stability", "max_grad_norm", "none")


def make_optimizer(problem: str, opt_name: str, variant: str):
  spec = PROBLEMS[problem]
  lr = spec["lrs"][opt_name]
  base = optax.sgd(lr) if opt_name == "sgd" else optax.adam(lr)
  if variant == "none":
    return base
  schedule = tj.every(PERIOD, start=START)
  if variant == "defaults":
    return tj.with_teleport(base, spec["symmetry"](), schedule)
  if variant == "no_stability":
    return tj.with_teleport(base, spec["symmetry"](), schedule, stability=False)
  return tj.with_teleport(
    base, spec["symmetry"](), schedule, objective="max_grad_norm", stability=False
  )


def train(problem: str, opt_name: str, variant: str, seeds, steps: int):
  spec = PROBLEMS[problem]
  loss_fn = spec["loss"]
  opt = make_optimizer(problem, opt_name, variant)

  @jax.jit
  def run(params, x, y):
    def step(carry, _):
      p, s = carry
      loss, g = jax.value_and_grad(loss_fn)(p, x, y)
      u, s = opt.update(g, s, p, value_fn=loss_fn, x=x, y=y)
      return (optax.apply_updates(p, u), s), loss

    (p, s), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    counts = (s.num_teleports, s.num_rejected) if isinstance(s, tj.TeleportState) else (0, 0)
    return losses, counts

  out = []
  t0 = time.perf_counter()
  for seed in seeds:
    params, x, y = spec["make"](seed)
    losses, (acc, rej) = jax.device_get(run(params, x, y))
    out.append(dict(losses=np.asarray(losses, np.float64), accepted=int(acc), rejected=int(rej)))
  return out, time.perf_counter() - t0


def jumps(losses: np.ndarray, steps: int) -> np.ndarray:
  """Largest loss in the WINDOW steps after each teleport / the loss at the teleport step."""
  out = []
  for t in range(START, steps - 1, PERIOD):
    before = losses[t]
    after = losses[t + 1 : t + 1 + WINDOW]
    if not np.isfinite(before) or before <= 0:
      continue
    out.append(np.inf if not np.all(np.isfinite(after)) else float(np.max(after) / before))
  return np.asarray(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.safe_defaults")
  p.add_argument("--quick", action="store_true", help="2 seeds, 500 steps")
  p.add_argument("--out", type=Path, default=DEFAULT_OUT)
  args = p.parse_args(argv)
  seeds = range(2) if args.quick else range(5)
  steps = 500 if args.quick else 2000
  rows = []
  for problem in PROBLEMS:
    for opt_name in ("sgd", "adam"):
      baseline = None
      for variant in ("none",) + VARIANTS[:-1]:
        runs, wall = train(problem, opt_name, variant, seeds, steps)
        finals = np.asarray([r["losses"][-1] for r in runs])
        js = np.concatenate([jumps(r["losses"], steps) for r in runs])
        if variant == "none":  # the same windows without teleports: the optimizer's own rises
          baseline = finals
          rows.append(
            dict(
              problem=problem, optimizer=opt_name, variant=variant,
              max_jump=float(np.max(js)) if js.size else None,
              final_loss=_spread(finals), final_vs_none=None, nonfinite=int(np.sum(~np.isfinite(finals))),
              teleports_accepted=0, teleports_rejected=0, seconds=wall,
            )
          )  # fmt: skip
          print(_fmt_row(rows[-1]), flush=True)
          continue
        rows.append(
          dict(
            problem=problem,
            optimizer=opt_name,
            variant=variant,
            max_jump=float(np.max(js)) if js.size else None,
            final_loss=_spread(finals),
            final_vs_none=float(np.median(finals / baseline)),
            nonfinite=int(np.sum(~np.isfinite(finals))),
            teleports_accepted=sum(r["accepted"] for r in runs),
            teleports_rejected=sum(r["rejected"] for r in runs),
            seconds=wall,
          )
        )
        print(_fmt_row(rows[-1]), flush=True)
  print()
  print(_table(rows))
  ok = all(
    r["max_jump"] is not None and r["max_jump"] <= 10 and r["nonfinite"] == 0
    for r in rows
    if r["variant"] == "defaults"
  )
  print(
    f"\ntarget: with the defaults no post-teleport jump above 10x and no non-finite run: "
    f"{'PASS' if ok else 'MISS'}"
  )
  args.out.mkdir(parents=True, exist_ok=True)
  path = args.out / "safe_defaults.json"
  path.write_text(
    json.dumps(
      dict(
        protocol=dict(period=PERIOD, start=START, window=WINDOW, steps=steps, seeds=list(seeds)),
        rows=rows,
        target_met=ok,
        jax=jax.__version__,
        backend=jax.default_backend(),
      ),
      indent=2,
    )
  )
  print(f"wrote {path}")
  return 0


def _spread(values: np.ndarray) -> dict:
  v = np.asarray(values, np.float64)
  fin = v[np.isfinite(v)]
  return dict(
    median=float(np.median(fin)) if fin.size else None,
    min=float(np.min(fin)) if fin.size else None,
    max=float(np.max(fin)) if fin.size else None,
  )


def _fmt_row(r) -> str:
  j = "-" if r["max_jump"] is None else f"{r['max_jump']:.3g}"
  f = r["final_loss"]
  fl = "nan" if f["median"] is None else f"{f['median']:.3g} [{f['min']:.3g}, {f['max']:.3g}]"
  return (
    f"{r['problem']:10s} {r['optimizer']:4s} {r['variant']:13s} max jump {j:>8s}  final loss "
    f"{fl}  teleports {r['teleports_accepted']}"
    f"/{r['teleports_accepted'] + r['teleports_rejected']}  non-finite {r['nonfinite']}"
  )


def _table(rows) -> str:
  head = "| problem | optimizer | teleport | max jump (loss after / before) | final loss, median [min, max] | vs no teleport | teleports accepted | non-finite |"
  sep = "|---|---|---|---|---|---|---|---|"
  lines = [head, sep]
  for r in rows:
    f = r["final_loss"]
    fl = "nan" if f["median"] is None else f"{f['median']:.3g} [{f['min']:.3g}, {f['max']:.3g}]"
    j = "-" if r["max_jump"] is None else f"{r['max_jump']:.3g}"
    v = "-" if r["final_vs_none"] is None else f"{r['final_vs_none']:.3g}"
    acc = f"{r['teleports_accepted']}/{r['teleports_accepted'] + r['teleports_rejected']}"
    lines.append(
      f"| {r['problem']} | {r['optimizer']} | {r['variant']} | {j} | {fl} | {v} | {acc} | {r['nonfinite']} |"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  raise SystemExit(main())

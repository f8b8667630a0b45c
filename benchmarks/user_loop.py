"""Repeated ``tj.teleport`` calls in a user's own training loop: do they stay safe?

Usage::

  python -m benchmarks.user_loop [--quick] [--out benchmarks/results]

The loop a user writes without :func:`teleport_jax.with_teleport`: full-batch
gradient descent (lr 1e-4) or AdaGrad (lr 0.1) for 300 epochs on the seed's
regression problem (LeakyReLU(0.1) MLP, uniform weights, ``1/2 |Y - f(X)|^2``),
with ``tj.teleport`` and the exact ``DataDependentGL`` called between epochs
every 20 epochs (at epochs 20, 40, ..., 280). Three layer-width sets that no
test uses, 5 seeds each. Variants:

* ``none``: no teleport (the baseline every other variant is compared with);
* ``told``: ``tj.teleport(..., learning_rate=lr)`` for GD and
  ``tj.teleport(..., optimizer=adagrad, opt_state=state)`` for AdaGrad: the
  default objective simulates that optimizer and the stability bound uses its
  step;
* ``untold``: ``tj.teleport(...)`` with no optimizer: the default look-ahead
  of ``1/lambda_max`` steps and no stability bound (``info.stability_checked``
  is ``False``): how such a loop behaved before a teleport could be told;
* ``untold_bounded``: ``untold`` with ``stability=True``: the curvature
  ``|lambda_max|`` may not rise at a teleport.

For each run: whether every loss stayed finite, the final loss against the
same seed's ``none`` loss, the largest step sharpness ``lr * lambda_max``
after a teleport (GD only; GD is unstable above 2) and the teleports'
statuses. The epochs between teleports run in one compiled ``lax.scan``; the
teleport itself is one compiled program shared by all its calls. Writes
``user_loop.json``.
"""

from __future__ import annotations

import argparse
import collections
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
# (samples, input width, hidden widths..., output width): none used by the tests
WIDTH_SETS = ((4, 6, 9, 7, 5), (5, 8, 11, 10, 6), (3, 7, 6, 9, 4))
EPOCHS, EVERY = 300, 20
OPTIMIZERS = {"gd": (optax.sgd, 1e-4), "adagrad": (optax.adagrad, 1e-1)}
VARIANTS = ("none", "told", "untold", "untold_bounded")
SYMMETRY = tj.DataDependentGL(activation=regression.ACTIVATION)


def _loss(params, data):
  return regression.loss_fn(params, *data)


def _sharpness(params, data, lr):
  lam = tj.geometry.hessian_max_eigenvalue(_loss, params, data, num_iterations=30)
  return float(lr * jnp.abs(lam))


def run_one(dims, seed: int, opt_name: str, variant: str) -> dict:
  """One training run; returns its losses, final loss and teleport record."""
  make, lr = OPTIMIZERS[opt_name]
  opt = make(lr)
  params, x, y = regression.make_problem(seed, dims)
  data = (x, y)
  state = opt.init(params)

  @jax.jit
  def chunk(params, state):
    def body(carry, _):
      p, s = carry
      loss, g = jax.value_and_grad(_loss)(p, data)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss

    (params, state), losses = jax.lax.scan(body, (params, state), None, length=EVERY)
    return params, state, losses

  losses, statuses, sharp_after = [], collections.Counter(), []
  for epoch in range(0, EPOCHS, EVERY):
    if epoch > 0 and variant != "none":
      kwargs = {}
      if variant == "told":
        kwargs = (
          dict(learning_rate=lr) if opt_name == "gd" else dict(optimizer=opt, opt_state=state)
        )
      elif variant == "untold_bounded":
        kwargs = dict(stability=True)
      params, info = tj.teleport(_loss, params, data, symmetry=SYMMETRY, throw=False, **kwargs)
      statuses[tj.TeleportStatus(int(info.status)).name] += 1
      if opt_name == "gd":
        sharp_after.append(_sharpness(params, data, lr))
    params, state, chunk_losses = chunk(params, state)
    losses.extend(np.asarray(chunk_losses).tolist())
  final = float(_loss(params, data))
  return dict(
    losses=losses,
    final=final,
    finite=bool(np.all(np.isfinite(losses)) and np.isfinite(final)),
    statuses=dict(statuses),
    max_step_sharpness_after=max(sharp_after) if sharp_after else None,
  )


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="2 seeds, one width set")
  ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
  args = ap.parse_args(argv)
  seeds = range(2) if args.quick else range(5)
  width_sets = WIDTH_SETS[:1] if args.quick else WIDTH_SETS
  t0 = time.perf_counter()
  rows, runs = [], {}
  for dims in width_sets:
    for opt_name in OPTIMIZERS:
      base = {s: run_one(dims, s, opt_name, "none") for s in seeds}
      for variant in VARIANTS:
        res = base if variant == "none" else {s: run_one(dims, s, opt_name, variant) for s in seeds}
        key = f"{'-'.join(map(str, dims))}/{opt_name}/{variant}"
        runs[key] = {str(s): {k: v for k, v in r.items() if k != "losses"} for s, r in res.items()}
        finite = sum(r["finite"] for r in res.values())
        below = sum(r["finite"] and r["final"] < base[s]["final"] for s, r in res.items())
        ratios = [r["final"] / base[s]["final"] for s, r in res.items() if r["finite"]]
        sharp = [r["max_step_sharpness_after"] for r in res.values()]
        sharp = [v for v in sharp if v is not None and np.isfinite(v)]
        statuses = collections.Counter()
        for r in res.values():
          statuses.update(r["statuses"])
        rows.append(
          dict(
            dims="-".join(map(str, dims)),
            optimizer=opt_name,
            variant=variant,
            finite=f"{finite}/{len(res)}",
            below_none=f"{below}/{len(res)}" if variant != "none" else "-",
            final_ratio_median=float(np.median(ratios)) if ratios else float("nan"),
            final_ratio_max=float(np.max(ratios)) if ratios else float("nan"),
            max_lr_lambda_after=max(sharp) if sharp else None,
            accepted=statuses.get("SUCCESSFUL", 0),
            teleports=sum(statuses.values()),
          )
        )
        r = rows[-1]
        sharp_txt = "-" if r["max_lr_lambda_after"] is None else f"{r['max_lr_lambda_after']:.3g}"
        print(
          f"{r['dims']:>12} {opt_name:>8} {variant:>10}  finite {r['finite']}  "
          f"below none {r['below_none']:>4}  final/none median {r['final_ratio_median']:.3g} "
          f"max {r['final_ratio_max']:.3g}  max lr*lambda after {sharp_txt:>7}  "
          f"accepted {r['accepted']}/{r['teleports']}",
          flush=True,
        )
  out = dict(
    protocol=dict(
      epochs=EPOCHS,
      every=EVERY,
      seeds=list(seeds),
      width_sets=[list(d) for d in width_sets],
      optimizers={k: dict(name=v[0].__name__, lr=v[1]) for k, v in OPTIMIZERS.items()},
      symmetry="DataDependentGL(leaky_relu(0.1))",
    ),
    rows=rows,
    runs=runs,
    wall_s=time.perf_counter() - t0,
    jax_version=jax.__version__,
  )
  if not args.quick:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "user_loop.json").write_text(json.dumps(out, indent=1))
  return out


if __name__ == "__main__":
  main()

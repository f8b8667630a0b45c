"""Measured loss drift of every group action, float32 and float64.

For each action, applies random group elements ``exp(xi)`` (entries of ``xi``
normal with standard deviation ``scale / sqrt(width)``) to random networks on
random shapes and seeds and reports the largest relative change of the loss and
of the network outputs.

Usage::

  python -m benchmarks.action_drift [--trials 30] [--scale 0.5]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import teleport_jax as tj

jax.config.update("jax_enable_x64", True)


def _mlp(key, widths, dtype, bias):
  keys = jax.random.split(key, 2 * len(widths))
  params = []
  for i in range(len(widths) - 1):
    w = jax.random.normal(keys[2 * i], (widths[i + 1], widths[i]), dtype) / math.sqrt(widths[i])
    b = 0.1 * jax.random.normal(keys[2 * i + 1], (widths[i + 1],), dtype)
    params.append((w, b) if bias else w)
  return params


def _forward(params, x, act):
  h = x
  for i, p in enumerate(params):
    w, b = p if isinstance(p, tuple) else (p, None)
    h = w @ h + (0 if b is None else b[:, None])
    if i < len(params) - 1:
      h = act(h)
  return h


@functools.partial(jax.jit, static_argnums=(0, 1))
def _drift(sym, act, params, xi, x, y):
  new = sym.act(params, sym.exp(xi), x)
  o0, o1 = _forward(params, x, act), _forward(new, x, act)
  l0 = 0.5 * jnp.sum((y - o0) ** 2)
  l1 = 0.5 * jnp.sum((y - o1) ** 2)
  return jnp.abs(l1 - l0) / jnp.abs(l0), jnp.max(jnp.abs(o1 - o0)) / jnp.max(jnp.abs(o0))


def _random_xi(sym, params, key, scale):
  leaves, treedef = jax.tree_util.tree_flatten(sym.algebra_zeros(params))
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
    treedef,
    [
      scale * jax.random.normal(k, x.shape, x.dtype) / math.sqrt(max(x.shape[-1], 1))
      for k, x in zip(keys, leaves)
    ],
  )


ACT = tj.activations.leaky_relu(0.1)  # the published experiments' activation

# name -> (symmetry, activation, biases, batch rule)
CASES = {
  "PositiveRescaling (LeakyReLU, biases)": (tj.PositiveRescaling(), ACT, True, "any"),
  "LinearGL (linear network, biases)": (tj.LinearGL(), tj.activations.identity(), True, "any"),
  "DataDependentGL exact, batch = width - 1": (
    tj.DataDependentGL(activation=ACT),
    ACT,
    False,
    "width-1",
  ),
  "DataDependentGL exact, batch = width - 1, biases": (
    tj.DataDependentGL(activation=ACT),
    ACT,
    True,
    "width-1",
  ),
  "DataDependentGL exact, batch = width (square)": (
    tj.DataDependentGL(activation=ACT),
    ACT,
    False,
    "width",
  ),
  "DataDependentGL published, batch = width - 1": (
    tj.DataDependentGL(activation=ACT, variant="published"),
    ACT,
    False,
    "width-1",
  ),
}


def measure(trials: int, scale: float, seed: int = 0, num_shapes: int = 3) -> dict:
  """Max drift over ``num_shapes`` random architectures x ``trials`` random draws each.

  Draws within one architecture share a compiled function, so the cost is
  dominated by ``num_shapes`` compilations per action and dtype.
  """
  rng = np.random.default_rng(seed)
  shapes = []
  for _ in range(num_shapes):
    depth = int(rng.integers(3, 6))
    shapes.append([int(w) for w in rng.integers(4, 33, size=depth + 1)])
  out = {}
  for name, (sym, act, bias, batch) in CASES.items():
    row = {}
    for dtype in (jnp.float32, jnp.float64):
      loss_drift, out_drift, worst_cond = 0.0, 0.0, None
      for widths in shapes:
        n = {"any": 48, "width": min(widths[:-2]), "width-1": min(widths[:-2]) - 1}[batch]
        for _ in range(trials):
          key = jax.random.key(int(rng.integers(2**31)))
          k1, k2, k3, k4 = jax.random.split(key, 4)
          params = _mlp(k1, widths, dtype, bias)
          x = jax.random.normal(k2, (widths[0], n), dtype)
          y = jax.random.normal(k3, (widths[-1], n), dtype)
          xi = _random_xi(sym, params, k4, scale)
          sym.validate(params, x)
          ld, od = _drift(sym, act, params, xi, x, y)
          if float(ld) >= loss_drift and sym.needs_data:
            worst_cond = float(sym.rank_condition(params, x)["min_singular_ratio"])
          loss_drift = max(loss_drift, float(ld))
          out_drift = max(out_drift, float(od))
      row[jnp.dtype(dtype).name] = {
        "max_rel_loss_drift": loss_drift,
        "max_rel_output_change": out_drift,
        "min_singular_ratio_at_worst": worst_cond,
      }
    out[name] = row
  return {"shapes": shapes, "by_action": out}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--trials", type=int, default=10, help="random draws per architecture")
  p.add_argument("--shapes", type=int, default=3, help="random architectures")
  p.add_argument("--scale", type=float, default=0.5)
  p.add_argument(
    "--out", type=Path, default=Path(__file__).parent / "results" / "action_drift.json"
  )
  args = p.parse_args(argv)
  res = measure(args.trials, args.scale, num_shapes=args.shapes)
  print(
    f"max relative loss drift over {args.shapes} random architectures {res['shapes']} x "
    f"{args.trials} random networks and group elements each (|xi| scale {args.scale}, "
    "LeakyReLU(0.1))"
  )
  print(f"{'action':50s} {'float32':>10s} {'float64':>10s}   (max rel. output change f32 / f64)")
  for name, row in res["by_action"].items():
    f32, f64 = row["float32"], row["float64"]
    print(
      f"{name:50s} {f32['max_rel_loss_drift']:10.2e} {f64['max_rel_loss_drift']:10.2e}   "
      f"({f32['max_rel_output_change']:.1e} / {f64['max_rel_output_change']:.1e})"
      + (
        f"  worst-case sv ratio {f32['min_singular_ratio_at_worst']:.1e}"
        if f32["min_singular_ratio_at_worst"] is not None
        else ""
      )
    )
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps({"trials": args.trials, "scale": args.scale, **res}, indent=2))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

"""Builds the notebooks in this folder from their cell sources and executes them.

Usage::

  python notebooks/make_notebooks.py [NAME ...]

Each notebook is written, executed top to bottom with nbclient (so its plots
and outputs are saved in the file) and stored next to this script. The test
suite executes the saved notebooks again, so they cannot rot.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent


def md(s):
  return nbformat.v4.new_markdown_cell(s.strip())


def code(s):
  return nbformat.v4.new_code_cell(s.strip())


NOTEBOOKS: dict[str, list] = {}

NOTEBOOKS["01_quickstart.ipynb"] = [
  md("""
# Quick start: teleportation in an optax chain with a flax model

Symmetry teleportation moves the parameters along a loss-invariant orbit of a
symmetry group to a point where the next optimizer steps make more progress.
This notebook

1. builds a small `flax.linen` MLP with LeakyReLU,
2. teleports it once with the pure function `tj.teleport` and checks that the
   loss and the outputs are unchanged while the gradient changes,
3. adds teleportation to an optax training loop with one element,
   `tj.with_teleport`, inside `optax.chain`, under `jax.jit`,
4. shows what happens when a "teleport" would change the loss: it is rejected.
"""),
  code("""
import jax
import jax.numpy as jnp
import flax.linen as nn
import matplotlib.pyplot as plt
import optax

import teleport_jax as tj

class MLP(nn.Module):
    width: int = 16

    @nn.compact
    def __call__(self, x):
        x = nn.leaky_relu(nn.Dense(self.width)(x), 0.1)
        x = nn.leaky_relu(nn.Dense(self.width)(x), 0.1)
        return nn.Dense(3)(x)

kx, ky, kp = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(kx, (12, 6))           # 12 samples <= width 16: the GL action is exact
y = jax.random.normal(ky, (12, 3))
model = MLP()
params = model.init(kp, x)

def loss_fn(params, x, y):
    return 0.5 * jnp.mean(jnp.sum((model.apply(params, x) - y) ** 2, axis=-1))

print("layers found:", tj.infer_layout(params).num_layers)
"""),
  md("""
## One teleport with the pure function

`DataDependentGL` is the exact data-dependent `GL(n)` action of Zhao et al.
(2022): it maps each hidden layer's features of the batch to `h A` and adjusts
the weights so that the network output on the batch is unchanged.
"""),
  code("""
sym = tj.DataDependentGL(activation=tj.leaky_relu(0.1))
print(sym.rank_condition(params, (x, y)))

new_params, info = tj.teleport(
    lambda p, d: loss_fn(p, *d), params, (x, y), symmetry=sym, num_steps=10
)
print("accepted:", bool(info.accepted), "-", tj.status_message(info.status))
print(f"loss      {info.loss_before:.6f} -> {info.loss_after:.6f}  (rel. drift {info.rel_loss_drift:.1e})")
print(f"|grad|^2  {info.grad_norm_sq_before:.4f} -> {info.grad_norm_sq_after:.4f}")
out_change = jnp.max(jnp.abs(model.apply(new_params, x) - model.apply(params, x)))
print("max output change on the batch:", float(out_change))
"""),
  md("""
## Teleporting inside a jitted optax training loop

`tj.with_teleport(optimizer, symmetry, schedule)` is an
`optax.GradientTransformationExtraArgs`. Following optax's convention it takes
`value_fn` and the batch as keyword arguments of `update`. The schedule is
evaluated inside `jit`. Here the teleport minimises the loss after 5 steps of
the optimizer (`tj.lookahead_loss`), which knows the step size and so does not
teleport to points too steep for it.
"""),
  code("""
lr = 0.02

def make_train(opt, steps=150):
    @jax.jit
    def train(params):
        state = opt.init(params)
        def step(carry, _):
            params, state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = opt.update(grads, state, params, value_fn=loss_fn, x=x, y=y)
            return (optax.apply_updates(params, updates), state), loss
        (params, state), losses = jax.lax.scan(step, (params, state), None, length=steps)
        return losses, state
    return train

plain = optax.chain(optax.clip_by_global_norm(10.0), optax.sgd(lr))
teleporting = optax.chain(
    optax.clip_by_global_norm(10.0),
    tj.with_teleport(optax.sgd(lr), sym, schedule=tj.at_steps([0, 20]),
                     objective=tj.lookahead_loss(lr, 5), num_steps=20),
)
losses_plain, _ = make_train(plain)(params)
losses_tele, state = make_train(teleporting)(params)
tstate = state[1]
print("teleports accepted:", int(tstate.num_teleports), "rejected:", int(tstate.num_rejected))
print("last teleport:", {k: float(v) for k, v in tstate.info._asdict().items()})

plt.figure(figsize=(6, 4))
plt.semilogy(losses_plain, label="SGD")
plt.semilogy(losses_tele, label="SGD + teleport (steps 0 and 20)")
plt.xlabel("step"); plt.ylabel("training loss"); plt.legend(); plt.tight_layout()
plt.show()
"""),
  md("""
## A teleport that would change the loss is rejected

`LinearGL` is only a symmetry of *linear* networks. Used on this LeakyReLU
network, the candidate changes the loss, so the teleport is rejected, the
original parameters come back unchanged and the info record says why.
"""),
  code("""
rejected_params, info = tj.teleport(
    lambda p, d: loss_fn(p, *d), params, (x, y), symmetry=tj.LinearGL(), num_steps=3,
    safeguard=False,
)
print("accepted:", bool(info.accepted), "-", tj.status_message(info.status))
print(f"relative loss drift of the candidate: {info.rel_loss_drift:.2e}")
same = jax.tree_util.tree_all(jax.tree_util.tree_map(jnp.array_equal, rejected_params, params))
print("parameters unchanged:", bool(same))
"""),
]


NOTEBOOKS["02_mlp_regression.ipynb"] = [
  md("""
# MLP regression: the seed's Figure 2, reproduced honestly

The published protocol (Zhao et al. 2022): X is 5x4 (5 features, 4 samples),
W1 6x5, W2 7x6, W3 8x7, Y 8x4, all uniform on [0, 1); loss
1/2 |Y - W3 s(W2 s(W1 X))|^2 with s = LeakyReLU(0.1); GD with lr 1e-4 and
AdaGrad with lr 1e-1; one teleport at epoch 5 with the data-dependent GL
action. This notebook runs a reduced version (2 seeds, 100 epochs; the
`reproduce` command runs 5 seeds and 300 epochs) with the library's
experiment code, and compares our exact action with the published first-order
one.
"""),
  code("""
import numpy as np
import matplotlib.pyplot as plt
import teleport_jax as tj
from teleport_jax.experiments import regression

SEEDS, EPOCHS = range(2), 100
methods = ["gd", "gd_teleport", "adagrad", "adagrad_teleport", "gd_teleport_repeated",
           "gd_teleport_published"]
results = {m: regression.run_method(m, SEEDS, EPOCHS) for m in methods}
"""),
  md("""
## Loss per epoch and per second

The wall-clock axis is run time (compilation excluded, measured separately)
with the teleport's own cost included.
"""),
  code("""
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for m in methods:
    losses, times = results[m]["losses"], results[m]["times"]
    mean, std = losses.mean(0), losses.std(0)
    ls = "--" if "published" in m else "-"
    axes[0].plot(mean, ls, label=m)
    axes[0].fill_between(np.arange(EPOCHS), np.maximum(mean - std, 1e-9), mean + std, alpha=0.2)
    axes[1].plot(times.mean(0), mean, ls, label=m)
for ax, xl in zip(axes, ["epoch", "wall-clock (s)"]):
    ax.set_yscale("log"); ax.set_xlabel(xl); ax.set_ylabel("loss")
axes[0].legend(fontsize=8); plt.tight_layout(); plt.show()
"""),
  md("""
## How much does each teleport change the loss?

Our teleports must keep the loss within 1e-4 (relative); the published
first-order action is run without that check, so its change can be read off.
"""),
  code("""
for m in methods:
    if "teleport" in m:
        d = [x for seed in results[m]["drifts"] for x in seed]
        print(f"{m:24s} teleports={len(d):2d}  max relative loss change={max(d):.2e}")
e = 50
for m in methods:
    print(f"{m:24s} loss at epoch {e}: {results[m]['losses'][:, e].mean():10.4g}")
"""),
  md("""
## Gradient norm against loss

At the same loss, the teleported trajectories have larger gradients, which is
why they descend faster.
"""),
  code("""
plt.figure(figsize=(5, 4))
for m in ["gd", "gd_teleport", "adagrad", "adagrad_teleport"]:
    plt.loglog(results[m]["losses"].mean(0), results[m]["grad_norms"].mean(0), label=m)
plt.xlabel("loss"); plt.ylabel(r"$\\|\\nabla L\\|^2$"); plt.legend(); plt.tight_layout(); plt.show()
"""),
]


def build(names=None):
  for name, cells in NOTEBOOKS.items():
    if names and name not in names:
      continue
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {
      "name": "python3",
      "display_name": "Python 3",
      "language": "python",
    }
    NotebookClient(
      nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    nbformat.write(nb, HERE / name)
    print("wrote", HERE / name)


if __name__ == "__main__":
  build(sys.argv[1:] or None)

"""Builds the notebooks in this folder from their cell sources and executes them.

Usage::

  python notebooks/make_notebooks.py [NAME ...]

Each notebook is written, executed top to bottom with nbclient (so its plots
and outputs are saved in the file) and stored next to this script. The
notebooks only import ``teleport_jax`` and its experiment modules; they never
copy library code. ``tests/test_notebooks.py`` executes the saved notebooks
again, so they cannot rot.

Every notebook starts with ``%matplotlib inline`` so that its plots are saved
even where ``MPLBACKEND`` is set to a non-interactive backend. The experiment
modules switch matplotlib to ``Agg`` when they write their PNG files
(``teleport_jax.experiments.common.plt``), so notebooks that run an experiment
switch back to ``inline`` before plotting.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent


def md(s):
  return nbformat.v4.new_markdown_cell(s.strip())


def code(s):
  return nbformat.v4.new_code_cell(s.strip())


NOTEBOOKS: dict[str, list] = {}

# ---------------------------------------------------------------------------
NOTEBOOKS["01_quickstart.ipynb"] = [
  md("""
# Quick start: teleportation in an optax optimizer, with a flax model

Symmetry teleportation moves the parameters along a loss-invariant orbit of a
symmetry group, `w -> g·w` with `L(g·w) = L(w)`, to a point where the next
optimizer steps make more progress. This notebook

1. builds a small `flax.linen` MLP with LeakyReLU,
2. teleports it once with the pure function `tj.teleport` and checks that the
   loss and the outputs are unchanged while the gradient changes,
3. adds teleportation to a jitted optax training loop with `tj.with_teleport`
   wrapped around an `optax.chain`,
4. shows what happens when a "teleport" would change the loss: it is rejected.
"""),
  code("""
%matplotlib inline
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
x = jax.random.normal(kx, (12, 6))  # 12 samples, 6 features
y = jax.random.normal(ky, (12, 3))
model = MLP()
params = model.init(kp, x)


def loss_fn(params, x, y):
    return 0.5 * jnp.mean(jnp.sum((model.apply(params, x) - y) ** 2, axis=-1))


def loss_on_batch(params, batch):  # the signature tj.teleport expects: loss(params, data)
    return loss_fn(params, *batch)


print("dense layers found in the flax params:", tj.symmetries.infer_layout(params).num_layers)
"""),
  md("""
## One teleport with the pure function

`tj.DataDependentGL` is the data-dependent `GL(n)` action of Zhao et al.
(2022): for one invertible matrix `A_m` per hidden layer it maps that layer's
features of the batch to `h_m A_m` and changes the weights so that the network
output on the batch is unchanged. It is exact when the layer inputs of the
batch, with a column of ones for the bias, have full row rank, so the batch
can be at most as large as the layer input's width + 1.

`rank_condition` checks this on our batch. The batch has 12 samples but the
first hidden layer's input has only 6 features (+1 for the bias), so
`shape_ok` is `False` and `max_exact_batch` is 7. `tj.DataDependentGL` leaves
hidden layers fixed whose layer input is narrower than the batch (see
`DataDependentGL.active_layers`): here `active_layers` is `(False, True)`, so
the first hidden layer is not transformed and only the second one, whose input
has 16 + 1 columns, is teleported, and the action stays exact.
(`min_singular_ratio` is taken over all hidden layers, the fixed one included.)
"""),
  code("""
sym = tj.DataDependentGL(activation=tj.activations.leaky_relu(0.1))
condition = sym.rank_condition(params, (x, y))
for key, value in condition.items():
    print(f"{key:20s} {value}")
"""),
  md("""
Now teleport with the paper's objective, maximise `|∇L|²`, with 10 normalised
inner steps on the Lie algebra. Each inner step is kept only if it improves
the objective and keeps the loss within `rtol` (1e-4 in float32); its size
adapts and is capped by `max_step_size` (default 1.0). We run the default cap
and a cap of 0.1.
"""),
  code("""
for max_step_size in (1.0, 0.1):
    new_params, info = tj.teleport(
        loss_on_batch, params, (x, y), symmetry=sym, num_steps=10, max_step_size=max_step_size
    )
    gain = info.grad_norm_sq_after / info.grad_norm_sq_before
    out_change = jnp.max(jnp.abs(model.apply(new_params, x) - model.apply(params, x)))
    moved = {
        name: bool(jnp.any(new_params["params"][name]["kernel"] != layer["kernel"]))
        for name, layer in params["params"].items()
    }
    print(f"max_step_size={max_step_size}: {tj.status_message(info.status)}")
    print(f"  loss      {info.loss_before:.6f} -> {info.loss_after:.6f}"
          f"  (relative drift {info.rel_loss_drift:.1e})")
    print(f"  |grad|^2  {info.grad_norm_sq_before:.4g} -> {info.grad_norm_sq_after:.4g}"
          f"  (x {gain:.3g})")
    print(f"  max output change on the batch: {out_change:.1e}")
    print(f"  kernels changed: {moved}")
"""),
  md("""
The loss and the outputs on the batch are unchanged within the float32
tolerance (relative loss drift below `rtol` = 1e-4; the larger drift with the
default cap is rounding amplified by a badly conditioned group element),
while the gradient grows. `Dense_0` is untouched (its hidden layer is not
active), `Dense_1` absorbs `A` and `Dense_2` absorbs `A⁻¹`.

The squared gradient norm is unbounded along this orbit: with the default cap,
ten steps multiply it by many orders of magnitude, which gives a point far too
steep for SGD with a fixed step size. `max_step_size` and `num_steps` limit how
far the solver goes. For training it is better to use an objective that knows
the optimizer's step size, as in the next section.
"""),
  md("""
## Teleporting inside a jitted optax training loop

`tj.with_teleport(optimizer, symmetry, schedule, ...)` is an
`optax.GradientTransformationExtraArgs`. Following optax's convention it takes
`value_fn` and the batch as keyword arguments of `update`; the schedule is
evaluated inside `jit` (`lax.cond`). At a scheduled step it teleports `w -> w'`
and then takes the wrapped optimizer's step from `w'`, with the gradient
re-evaluated there, so the update it returns is `(w' - w) + opt(∇L(w'))`.

Hence `with_teleport` should be the outermost transformation: transformations
chained before it only see the gradient at the old point (which a teleport
step discards), and transformations chained after it would also act on the
jump `w' - w` and break the loss invariance. Gradient clipping therefore goes
inside: `tj.with_teleport(optax.chain(optax.clip_by_global_norm(...),
optax.sgd(lr)), ...)`.

Here the teleport minimises the loss after 5 steps of SGD with the training
step size (`tj.objectives.lookahead_loss(lr, 5)`); knowing the step size, it does not
teleport to points too steep for it. We teleport at steps 0 and 50.
"""),
  code("""
lr = 0.02
num_train_steps = 150
teleport_steps = [0, 50]


def make_train(opt):
    @jax.jit
    def train(params):
        def step(carry, _):
            params, state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = opt.update(grads, state, params, value_fn=loss_fn, x=x, y=y)
            return (optax.apply_updates(params, updates), state), loss

        init = (params, opt.init(params))
        (params, state), losses = jax.lax.scan(step, init, None, length=num_train_steps)
        return losses, state

    return train


sgd = optax.chain(optax.clip_by_global_norm(10.0), optax.sgd(lr))
sgd_teleport = tj.with_teleport(
    sgd,
    sym,
    schedule=tj.schedules.at_steps(teleport_steps),
    objective=tj.objectives.lookahead_loss(lr, 5),
    num_steps=20,
)
losses_plain, _ = make_train(sgd)(params)
losses_tele, state = make_train(sgd_teleport)(params)

print(f"teleports accepted: {int(state.num_teleports)}, rejected: {int(state.num_rejected)}, "
      f"largest relative loss drift: {float(state.max_rel_loss_drift):.1e}")
info = state.info
print(f"last teleport (step {teleport_steps[-1]}): loss {info.loss_before:.4f} -> "
      f"{info.loss_after:.4f}, |grad|^2 {info.grad_norm_sq_before:.3g} -> "
      f"{info.grad_norm_sq_after:.3g}")
print(f"loss after {num_train_steps} steps: SGD {losses_plain[-1]:.3g}, "
      f"SGD + teleport {losses_tele[-1]:.3g}")
"""),
  code("""
fig, ax = plt.subplots(figsize=(6, 4))
ax.semilogy(losses_plain, label="SGD")
ax.semilogy(losses_tele, label="SGD + teleport")
for s in teleport_steps:
    ax.axvline(s, color="0.7", lw=0.8, zorder=0)
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.set_title("full-batch SGD, lr 0.02 (grey lines: teleports)", fontsize=10)
ax.legend()
fig.tight_layout()
plt.show()
"""),
  md("""
The comparison is per optimizer step. A teleport is not free: here each one is
20 inner steps, and each inner step differentiates through 5 SGD steps (5
gradient evaluations, then the backward pass through them), so one teleport
costs a few hundred gradient evaluations' worth of work.

The look-ahead objective sees only the next 5 steps; it does not guarantee
that the loss keeps falling after them (with the second teleport at step 20
instead of 50 we saw transient loss spikes after it).

## A group that is not a symmetry is refused; a teleport that would change the loss is rejected

`LinearGL` is only a symmetry of *linear* networks. Before teleporting, the
driver checks numerically that the loss does not change to first order along
random generators of the group (at the parameters and at a perturbed copy).
On this LeakyReLU network the check fails: called eagerly, `tj.teleport`
raises a `ValueError` that names the layers and the likely cause; with
`throw=False` (or under `jit`) it returns the original parameters with status
`NOT_A_SYMMETRY`.
"""),
  code("""
try:
    tj.teleport(loss_on_batch, params, (x, y), symmetry=tj.LinearGL(), num_steps=3)
except ValueError as err:
    print("ValueError:", str(err)[:300], "...")
refused, info = tj.teleport(
    loss_on_batch, params, (x, y), symmetry=tj.LinearGL(), num_steps=3, throw=False
)
print(tj.TeleportStatus(int(info.status)).name, "-", tj.status_message(info.status))
print(f"symmetry check: first-order relative loss change {info.symmetry_error:.2g}")
"""),
  md("""
With the check and the safeguard turned off (`check=False, safeguard=False`)
the inner steps are taken regardless; the final check then rejects the
candidate, the original parameters come back bit for bit and the info record
says why.
"""),
  code("""
rejected_params, info = tj.teleport(
    loss_on_batch, params, (x, y), symmetry=tj.LinearGL(), num_steps=3,
    safeguard=False, check=False,
)
print("accepted:", bool(info.accepted), "-", tj.status_message(info.status))
print(f"relative loss drift of the candidate: {info.rel_loss_drift:.2e}")
same = jax.tree_util.tree_all(jax.tree_util.tree_map(jnp.array_equal, rejected_params, params))
print("parameters unchanged:", bool(same))
"""),
]

# ---------------------------------------------------------------------------
NOTEBOOKS["02_mlp_regression.ipynb"] = [
  md("""
# MLP regression: the seed's Figure 2 with the exact action

The published protocol (Zhao et al. 2022): `X` is 5×4 (5 features, 4
samples), `W1` 6×5, `W2` 7×6, `W3` 8×7, `Y` 8×4, all uniform on [0, 1); loss
`½‖Y − W3 σ(W2 σ(W1 X))‖²` with `σ` = LeakyReLU(0.1); GD with lr 1e-4 and
AdaGrad with lr 1e-1; one teleport at epoch 5 with the data-dependent `GL`
action (exact here: 4 samples ≤ every layer input width).

This notebook runs a reduced version (2 seeds, 100 epochs; the `reproduce`
command runs 5 seeds and 300 epochs) with the library's experiment code,
`teleport_jax.experiments.regression`. The methods:

| method | what |
|---|---|
| `gd`, `adagrad` | no teleport |
| `gd_teleport`, `adagrad_teleport` | one teleport at epoch 5, exact action, objective: minimise the loss after 5 GD steps of lr 1e-4 (`tj.objectives.lookahead_loss`; GD steps for AdaGrad too), 30 inner steps |
| `gd_teleport_repeated` | the same at epochs 5, 25 and 45 |
| `gd_teleport_published` | comparison: the published first-order action and hyper-parameters (max `‖∇L‖²`, 8 plain steps of 1e-7), no loss check |
| `gd_teleport_max_grad_norm` | comparison: the exact action with the paper's objective, max `‖∇L‖²`, 10 normalised steps |

Our teleports use the look-ahead objective instead of the paper's
max `‖∇L‖²`; the last comparison shows why.
"""),
  code("""
%matplotlib inline
import numpy as np
import matplotlib.pyplot as plt

from teleport_jax.experiments import regression

SEEDS, EPOCHS = range(2), 100
TELEPORT_EPOCH = regression.TELEPORT_EPOCH
methods = ["gd", "gd_teleport", "gd_teleport_repeated", "adagrad", "adagrad_teleport"]
comparisons = ["gd_teleport_published", "gd_teleport_max_grad_norm"]
results = {m: regression.run_method(m, SEEDS, EPOCHS) for m in methods + comparisons}
colors = {m: f"C{i}" for i, m in enumerate(methods + comparisons)}
"""),
  md("""
## Loss per epoch and per second

Lines are means over the seeds, shaded bands the range over seeds; dashed lines
are the comparisons. A line that leaves through the top has diverged (a mean
with a non-finite seed is not drawn). The wall-clock axis is run time
(compilation excluded, measured separately) with the teleport's own cost
included. An epoch of this tiny problem takes well under a millisecond, so
differences between the methods without teleport are mostly dispatch overhead
and timer noise; what the time axis does show is the cost of a teleport, the
horizontal stretch of each teleporting curve at epoch 5.
"""),
  code("""
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
epochs = np.arange(EPOCHS)
for m in methods + comparisons:
    losses = results[m]["losses"]
    mean = losses.mean(axis=0)
    style = dict(color=colors[m], ls="--" if m in comparisons else "-", label=m)
    axes[0].plot(epochs, mean, **style)
    low, high = losses.min(axis=0), losses.max(axis=0)
    axes[0].fill_between(epochs, low, high, color=colors[m], alpha=0.15)
    axes[1].plot(results[m]["times"].mean(axis=0), mean, **style)

top = 10 * max(float(r["losses"][:, 0].max()) for r in results.values())
for ax, xlabel in zip(axes, ["epoch", "wall-clock (s, run time, teleports included)"]):
    ax.set_yscale("log")
    ax.set_ylim(top=top)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss")
axes[0].axvline(TELEPORT_EPOCH, color="0.7", lw=0.8, zorder=0)
axes[0].set_title(f"loss per epoch (grey line: teleport at epoch {TELEPORT_EPOCH})", fontsize=10)
axes[1].set_title("loss against wall-clock time", fontsize=10)
axes[0].legend(fontsize=8)
fig.tight_layout()
plt.show()
"""),
  md("""
## How much does each teleport change the loss?

Our teleports are rejected if they change the loss by more than 1e-4
(relative, float32), so every accepted one is below that. The published
first-order action is run without the check, so its change of the loss can be
read off.
"""),
  code("""
print(f"{'method':27s} {'teleports':>9s} {'max rel. loss change':>21s} {'non-finite seeds':>17s}")
for m in methods + comparisons:
    if "teleport" not in m:
        continue
    r = results[m]
    drifts = [d for seed in r["drifts"] for d in seed]
    nonfinite = int(np.sum(~np.all(np.isfinite(r["losses"]), axis=1)))
    print(f"{m:27s} {sum(r['num_teleports']):9d} {max(drifts):21.2e} {nonfinite:17d}")

print()
shown = [TELEPORT_EPOCH, TELEPORT_EPOCH + 1, 50, EPOCHS - 1]
print(f"{'mean loss at epoch':27s}" + "".join(f"{e:>11d}" for e in shown))
for m in methods + comparisons:
    print(f"{m:27s}" + "".join(f"{results[m]['losses'][:, e].mean():11.4g}" for e in shown))
"""),
  md("""
## Gradient norm against loss

The paper's claim behind Figure 2: teleporting reaches points with a larger
gradient at the same loss, so the following steps descend faster. Each curve
below runs from right (high loss) to left. The recorded `‖∇L‖²` of an epoch is
taken at the point before that epoch's step, so the teleport itself (same
loss, larger gradient) is not a point on the curve; the effect shows in the
steps after it.
"""),
  code("""
main = ["gd", "gd_teleport", "adagrad", "adagrad_teleport"]
fig, ax = plt.subplots(figsize=(5.5, 4))
for m in main:
    ax.loglog(results[m]["losses"].mean(axis=0), results[m]["grad_norms"].mean(axis=0),
              ".-", ms=3, color=colors[m], label=m)
ax.set_xlabel("training loss")
ax.set_ylabel(r"$\\|\\nabla L\\|^2$")
ax.set_title("one dot per epoch, mean over seeds", fontsize=10)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
"""),
  md("""
To compare at equal loss, the table gives, for a few loss levels, the first
epoch at which the mean loss is at or below the level and the mean `‖∇L‖²`
there ("never": not within the epochs run).
"""),
  code("""
levels = [100.0, 10.0, 2.0]
print(f"{'method':18s}" + "".join(f"{'loss <= ' + format(v, 'g'):>29s}" for v in levels))
for m in main:
    loss = results[m]["losses"].mean(axis=0)
    grad = results[m]["grad_norms"].mean(axis=0)
    cells = []
    for level in levels:
        below = np.nonzero(loss <= level)[0]
        if below.size:
            e = below[0]
            cells.append(f"epoch {e:3d}, |g|^2 {grad[e]:9.3g}")
        else:
            cells.append("never")
    print(f"{m:18s}" + "".join(f"{c:>29s}" for c in cells))
"""),
]

# ---------------------------------------------------------------------------
NOTEBOOKS["03_classification.ipynb"] = [
  md("""
# Classification: does teleporting early make the model overfit earlier?

The seed's Figure 3 question. A three-layer network `x -> Dense(h) ->
LeakyReLU(0.1) -> Dense(h) -> LeakyReLU(0.1) -> Dense(classes)` is trained
with softmax cross-entropy and minibatch SGD, with and without teleportation;
after every epoch the loss on the whole training set and on a validation set
is recorded. If teleporting makes the model overfit earlier, the validation
loss of the teleported runs should reach its minimum, and start to rise while
the training loss keeps falling, at an earlier epoch.

We run `teleport_jax.experiments.classification`:

* `sgd`: plain SGD;
* `sgd_teleport`: teleport at the first step of each of the first 3 epochs,
  maximising `‖∇L‖²` (the paper's objective) with inner steps capped at 0.1;
* `sgd_teleport_lookahead`: the same schedule, minimising the loss after 5 SGD
  steps (`tj.objectives.lookahead_loss`).

The group is `tj.PositiveRescaling` of both hidden layers. It is a symmetry of
the network function itself (LeakyReLU is positively homogeneous), so a
teleport changes neither the training nor the validation predictions; the
data-dependent `GL` action only keeps the loss on the minibatch it was built
from and would change the predictions elsewhere.

Data: MNIST if `$TELEPORT_JAX_MNIST_DIR` holds the four IDX files, else
scikit-learn's bundled 8×8 digits (nothing is downloaded). The sizes are the
experiment's quick settings; on the digits we run 80 epochs and 3 seeds
instead of 30 and 2, which costs little (compilation dominates) and lets the
validation loss turn up within the run.
"""),
  code("""
%matplotlib inline
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from teleport_jax.experiments import classification
from teleport_jax.experiments import common
from teleport_jax.experiments import data

mnist_dir = os.environ.get("TELEPORT_JAX_MNIST_DIR")
data_dir = Path(mnist_dir) if mnist_dir else None
dataset_name = "mnist" if data.find_mnist(data_dir) is not None else "sklearn_digits"

out_dir = Path(tempfile.mkdtemp(prefix="teleport_classification_"))
config = common.RunConfig(quick=True, out_dir=out_dir, data_dir=data_dir)
settings = classification.default_settings(config, dataset_name)
if dataset_name == "sklearn_digits":
    settings = dataclasses.replace(settings, epochs=80, seeds=(0, 1, 2))
print(settings)

t0 = time.perf_counter()
summary = classification.run(config, settings=settings)
print(f"ran in {time.perf_counter() - t0:.0f} s (compilation included)")
print()
print(summary["dataset_note"])
protocol = summary["protocol"]
print(f"widths {protocol['widths']}, {protocol['n_train']} training / {protocol['n_val']} "
      f"validation examples, batch {protocol['batch_size']} ({protocol['steps_per_epoch']} "
      f"steps per epoch), lr {protocol['learning_rate']}")
"""),
  md("""
## Training and validation loss per epoch

Index 0 is the initial point and index `e` the point after `e` epochs; the grey
lines mark the teleports (at the first step of the epoch that starts there).
Left: all curves, solid = training, dashed = validation. Right: the validation
loss alone, zoomed in, with the band of ± one standard deviation over seeds and
a dot at its minimum.
"""),
  code("""
# The experiment switched matplotlib to Agg to write its PNG; switch back.
%matplotlib inline
runs = summary["runs"]


def curve(values):
    return np.array([np.nan if v is None else v for v in values], dtype=float)


fig, (ax, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
lowest = min(np.nanmin(curve(r["val_loss"])) for r in runs.values())
for i, (m, r) in enumerate(runs.items()):
    color = f"C{i}"
    train, val, val_std = curve(r["train_loss"]), curve(r["val_loss"]), curve(r["val_loss_std"])
    epochs = np.arange(len(train))
    ax.plot(epochs, train, color=color, label=f"{m} (train)")
    ax.plot(epochs, val, color=color, ls="--", label=f"{m} (validation)")
    ax_val.plot(epochs, val, color=color, label=m)
    ax_val.fill_between(epochs, val - val_std, val + val_std, color=color, alpha=0.15)
    best = int(np.nanargmin(val))
    ax_val.plot(best, val[best], "o", color=color, mec="k")
for e in protocol["teleport_epochs"]:
    ax.axvline(e, color="0.7", lw=0.8, zorder=0)
    ax_val.axvline(e, color="0.7", lw=0.8, zorder=0)
ax.set_yscale("log")
ax.set_xlabel("epoch")
ax.set_ylabel("cross-entropy")
ax.set_title(f"{summary['dataset']}: training (solid) and validation (dashed), "
             f"mean over {len(settings.seeds)} seeds", fontsize=10)
ax.legend(fontsize=8)
ax_val.set_ylim(0.9 * lowest, 1.6 * lowest)
ax_val.set_xlabel("epoch")
ax_val.set_ylabel("validation cross-entropy")
ax_val.set_title("validation loss (zoom), ± 1 std over seeds, dot = minimum", fontsize=10)
ax_val.legend(fontsize=8)
fig.tight_layout()
plt.show()
"""),
  md("""
## Did teleporting make the model overfit earlier?

The numbers below are read from the results. "Flat" is the range of epochs in
which the mean validation loss is within 1% of its minimum: the minimum of a
flat curve is poorly located, so an earlier minimum only means something if
it lies outside the other method's flat range. Differences between the lowest
validation losses should be compared with the spread over seeds.
"""),
  code("""
def flat_range(val, within=0.01):
    close = np.nonzero(val <= (1 + within) * np.nanmin(val))[0]
    return int(close[0]), int(close[-1])


stats = {}
for m, r in runs.items():
    train, val, val_std = curve(r["train_loss"]), curve(r["val_loss"]), curve(r["val_loss_std"])
    best = int(np.nanargmin(val))
    stats[m] = dict(train=train, val=val, best=best, best_std=val_std[best], flat=flat_range(val))

last = len(next(iter(stats.values()))["val"]) - 1
marks = [e for e in (1, 5, 10) if e < last] + [last]
print("training loss after epoch " + ", ".join(map(str, marks)) + ":")
for m, s in stats.items():
    print(f"  {m:24s}" + "".join(f"{s['train'][e]:10.4f}" for e in marks))
print()
print("validation loss:")
for m, s in stats.items():
    b, (lo, hi) = s["best"], s["flat"]
    rise = 100 * (s["val"][last] / s["val"][b] - 1)
    print(f"  {m:24s} lowest {s['val'][b]:.4f} ± {s['best_std']:.4f} after epoch {b:3d}, "
          f"flat {lo}-{hi}, last {s['val'][last]:.4f} (+{rise:.1f}%), "
          f"validation accuracy {runs[m]['val_accuracy'][last]:.3f}")
print()
base = stats["sgd"]
for m, s in stats.items():
    if m == "sgd":
        continue
    r = runs[m]
    early = marks[min(1, len(marks) - 1)]
    drift = r["max_rel_loss_drift"]
    drift = "-" if drift is None else f"{drift:.1e}"
    print(f"{m}: {sum(r['num_teleports'])} teleports accepted, {sum(r['num_rejected'])} rejected, "
          f"largest relative loss change {drift}; training loss after epoch {early} "
          f"{s['train'][early]:.4f} vs {base['train'][early]:.4f} for sgd.")
    if s["best"] < base["best"]:
        verdict = f"earlier than sgd ({s['best']} vs {base['best']})"
        if s["flat"][1] >= base["flat"][0]:
            verdict += ", but inside overlapping flat ranges, so the shift is not clear-cut"
        else:
            verdict += ", and its flat range ends before sgd's begins"
    elif s["best"] == base["best"]:
        verdict = f"at the same epoch as sgd ({s['best']})"
    else:
        verdict = f"later than sgd ({s['best']} vs {base['best']})"
    delta = s["val"][s["best"]] - base["val"][base["best"]]
    print(f"  validation minimum {verdict}; lowest validation loss {delta:+.4f} relative to sgd "
          f"(seed std {s['best_std']:.4f} and {base['best_std']:.4f}).")
"""),
  md("""
The experiment writes its own reading of the same numbers into the summary
(`summary["notes"]`):
"""),
  code("""
for note in summary["notes"]:
    print("-", note)
"""),
]

# ---------------------------------------------------------------------------
NOTEBOOKS["04_test_functions_newton.ipynb"] = [
  md("""
# Test functions and the Newton connection

Part 1 runs gradient descent (GD) with and without teleportation on Booth's
and Rosenbrock's functions (`teleport_jax.experiments.functions2d`). Both are
radial in a change of variables `z = φ(w)`:

* Booth, `(x + 2y − 7)² + (2x + y − 5)² = ‖M w − c‖²`, with `z = M w − c`;
* Rosenbrock, `(a − x)² + b (y − x²)²`, with `z = (a − x, √b (y − x²))`;

so rotating `z` keeps the loss exactly (`tj.problems.booth_symmetry()`,
`tj.problems.rosenbrock_symmetry()`), and a teleport moves `w` along its level set.

Part 2 checks the claim that connects teleportation to Newton's method on a
quadratic (`teleport_jax.experiments.newton`), first on one 2-D example with
`tj.teleport` and `tj.symmetries.QuadraticRotation` directly, then on random 5-D
quadratics. Everything runs in float64 in the experiments' quick mode.
"""),
  code("""
%matplotlib inline
import io
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import PIL.Image
from IPython.display import Image
from IPython.display import display

import teleport_jax as tj
from teleport_jax.experiments import common
from teleport_jax.experiments import functions2d
from teleport_jax.experiments import newton

out_dir = Path(tempfile.mkdtemp(prefix="teleport_functions_"))
config = common.RunConfig(quick=True, out_dir=out_dir)


def show_png(name):  # a PNG the experiment wrote, reduced to 256 colours: a smaller notebook
    image = PIL.Image.open(out_dir / name).convert("RGB")
    image = image.quantize(256, method=PIL.Image.Quantize.FASTOCTREE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    display(Image(data=buffer.getvalue()))


f2d = functions2d.run(config)

for p in (functions2d.BOOTH, functions2d.ROSENBROCK):
    print(f"{p.name}: GD step size {p.lr:g}, tolerance {p.tol:g}, at most {p.max_steps} steps, "
          f"starts {f2d['protocol']['functions'][p.name]['starts']}")
for name, method in f2d["protocol"]["functions"]["rosenbrock"]["methods"].items():
    if method.get("teleport") == "none":
        print(f"  {name:30s} no teleport")
        continue
    print(f"  {name:30s} teleports {method['schedule']}, objective {method['objective']}, "
          f"{method['num_steps']} inner steps")
"""),
  md("""
## Iterations to tolerance

GD steps until the loss is at or below the tolerance, per starting point
("never": not within the step budget; "non-finite": runs that diverged).
`lr·λmax` is the step size times the largest Hessian eigenvalue where the
first teleport landed: fixed-step GD is locally unstable above 2.
"""),
  code("""
def fmt(v):
    return "never" if v is None else f"{v:.0f}"


def fmt_sharpness(v):
    return "-" if v is None else f"{v:.2f}"


print(f"{'function':11s} {'method':30s} {'iterations per start':>22s} {'teleports':>9s} "
      f"{'inner steps':>11s} {'non-finite':>10s} {'max lr*lmax':>11s}")
for fn, methods in f2d["runs"].items():
    for name, r in methods.items():
        iters = ", ".join(fmt(i) for i in r["iters_to_tol"])
        print(f"{fn:11s} {name:30s} {iters:>22s} {r['num_teleports_total']:9d} "
              f"{r['teleport_inner_steps_total']:11d} {r['nonfinite_runs']:10d} "
              f"{fmt_sharpness(r['max_first_teleport_sharpness']):>11s}")
"""),
  md("""
## Trajectories

Contours of the loss, GD paths from each start (o), teleports as dashed arrows
to their landing points (*), the minimum (+). These are the PNG files the
experiment wrote.
"""),
  code("""
show_png("booth_trajectories.png")
show_png("rosenbrock_trajectories.png")
"""),
  code("""
show_png("rosenbrock_loss.png")
"""),
  md("""
**Reading it.** Booth is a quadratic: maximising `‖∇L‖²` on its level set
puts the gradient on the Hessian's top eigenvector, after which GD moves along
that line and contracts at the fast rate `1 − 18·lr` instead of `1 − 2·lr`;
one teleport is all there is to gain. On Rosenbrock, maximising `‖∇L‖²` moves
to the steep walls of the valley, where the fixed step size can exceed
`2/λmax` and GD can diverge; the look-ahead objective (minimise the loss after
5 GD steps) picks points the step size can handle. The experiment's notes,
with the numbers of this run:
"""),
  code("""
for note in f2d["notes"]:
    print("-", note)
"""),
  md("""
## Part 2: teleport to the maximum gradient norm, then a GD step = a Newton step

For `L(w) = ½ (w − c)ᵀ H (w − c)` with `H` symmetric positive definite, set
`z = H^{1/2}(w − c)`. Then `L = ½‖z‖²` and `‖∇L‖² = zᵀ H z`, so rotations of
`z` (`tj.symmetries.QuadraticRotation`) keep the loss, and on the level set `L = L0` the
squared gradient norm is largest, `2 L0 λmax`, where `z` is a top eigenvector
of `H`. There `∇L = H(w − c) = λmax (w − c)`: the gradient is an eigenvector
of the Hessian, it is parallel to the Newton direction `H⁻¹∇L = w − c`, and a
GD step of size `1/λmax` is the Newton step and lands on the minimiser `c`.

First one 2-D example, with `tj.teleport` and `tj.symmetries.QuadraticRotation` called
directly. The quadratic comes from `newton.make_quadratic`, with condition
number 10 so that the picture is readable; seed 6 gives a start whose gradient
is far from the top eigenvector.
"""),
  code("""
h, c, w = newton.make_quadratic(2, seed=6, kappa=10.0)
with jax.enable_x64(True):
    sym = tj.symmetries.QuadraticRotation(hessian=jnp.asarray(h), center=jnp.asarray(c))
    w_tele, info = tj.teleport(
        newton.loss_fn, jnp.asarray(w), (jnp.asarray(h), jnp.asarray(c)),
        symmetry=sym, objective="max_grad_norm", num_steps=300,
    )
    w_tele = np.asarray(w_tele)
print(tj.status_message(info.status), f"(relative loss drift {float(info.rel_loss_drift):.1e})")

eigenvalues, eigenvectors = np.linalg.eigh(h)
lam_max, v_max = eigenvalues[-1], eigenvectors[:, -1]


def loss(p):
    return 0.5 * (p - c) @ h @ (p - c)


def grad(p):
    return h @ (p - c)


def abs_cos(a, b):
    return abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))


L0 = loss(w)
for label, p in (("start", w), ("teleported", w_tele)):
    g = grad(p)
    eig_residual = np.linalg.norm(h @ g - lam_max * g) / np.linalg.norm(h @ g)
    print(f"{label:10s}: L/L0 = {loss(p) / L0:.12f}, |grad|^2 / (2 L0 lmax) = "
          f"{g @ g / (2 * L0 * lam_max):.6f}, |cos(grad, v_max)| = {abs_cos(g, v_max):.6f}, "
          f"|H g - lmax g| / |H g| = {eig_residual:.1e}")

steps = {
    "(a) GD step 1/lmax from the start": w - grad(w) / lam_max,
    "(b) teleport, then GD step 1/lmax": w_tele - grad(w_tele) / lam_max,
    "(c) Newton step from the start": w - np.linalg.solve(h, grad(w)),
}
for label, p in steps.items():
    distance = np.linalg.norm(p - c)
    print(f"{label:35s}: L/L0 = {loss(p) / L0:.2e}, distance to the minimiser {distance:.1e}")
"""),
  code("""
# functions2d.run switched matplotlib to Agg to write its PNGs; switch back.
%matplotlib inline
span = 1.3 * np.sqrt(2 * L0 / eigenvalues[0])  # the longest semi-axis of the level set L = L0
xs = np.linspace(c[0] - span, c[0] + span, 300)
ys = np.linspace(c[1] - span, c[1] + span, 300)
xx, yy = np.meshgrid(xs, ys)
d = np.stack([xx - c[0], yy - c[1]], axis=-1)
zz = 0.5 * np.einsum("...i,ij,...j->...", d, h, d)

fig, ax = plt.subplots(figsize=(9, 5.5))
ax.contour(xx, yy, zz, levels=L0 * np.array([0.05, 0.25, 2.0, 4.0]), colors="0.8", linewidths=0.7)
ax.contour(xx, yy, zz, levels=[L0], colors="k", linewidths=1.5)
arrow = dict(arrowstyle="->", lw=1.5)
ax.annotate("", xy=w_tele, xytext=w, arrowprops=dict(arrow, color="0.4", ls="--"))
ax.annotate("", xy=steps["(a) GD step 1/lmax from the start"], xytext=w,
            arrowprops=dict(arrow, color="C0"))
ax.annotate("", xy=steps["(b) teleport, then GD step 1/lmax"], xytext=w_tele,
            arrowprops=dict(arrow, color="C3"))
ax.annotate("", xy=steps["(c) Newton step from the start"], xytext=w,
            arrowprops=dict(arrow, color="C2", ls=":"))
ax.plot(*steps["(a) GD step 1/lmax from the start"], ".", color="C0", ms=6)
ax.plot(*w, "o", color="C0", ms=8, label="start w")
ax.plot(*w_tele, "*", color="C3", ms=14, mec="k", label="teleported w'")
ax.plot(*c, "P", color="gold", ms=12, mec="k", label="minimiser c")
ax.plot([], [], color="0.4", ls="--", label="teleport along the level set L = L0")
ax.plot([], [], color="C0", label="GD step 1/λmax from w (short: small gradient)")
ax.plot([], [], color="C3", label="GD step 1/λmax from w' (lands on c)")
ax.plot([], [], color="C2", ls=":", label="Newton step from w")
ax.set_aspect("equal")
ax.set_xlim(xs[0], xs[-1])
ax.set_ylim(ys[0], ys[-1])
ax.set_xlabel("$w_1$")
ax.set_ylabel("$w_2$")
ax.set_title("2-D quadratic, condition number 10 (black: level set of the start)", fontsize=10)
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
fig.tight_layout()
plt.show()
"""),
  md("""
Now the experiment: random SPD quadratics in 5 dimensions (condition number
100, 3 seeds), each teleported with 300 inner steps. The bars compare the
gradient with the top eigenvector and with the Newton direction, before and
after teleporting, and the loss after (a) one GD step of size `1/λmax` from the
start, (b) the teleport and then that step, (b') the teleport and a GD step of
size `2L/‖∇L‖²` (which needs no knowledge of `λmax`: at the teleported point it
equals `1/λmax`), (c) a Newton step.
"""),
  code("""
nt = newton.run(config)
print(f"{'n':>3s} {'seed':>4s} {'gap':>6s} {'|cos(g,v)| start':>17s} {'teleported':>11s} "
      f"{'drift':>8s} {'(a) GD':>9s} {'(b) tp+GD':>10s} {'(c) Newton':>10s}")
for r in nt["per_problem"]:
    print(f"{r['n']:3d} {r['seed']:4d} {r['gap']:6.2f} {r['cos_eig_before']:17.4f} "
          f"{r['cos_eig_after']:11.12f} {r['rel_loss_drift']:8.1e} {r['gd_step']:9.2e} "
          f"{r['teleport_gd_step']:10.1e} {r['newton_step']:10.1e}")
print("targets:", nt["targets"])
show_png("newton_check.png")
"""),
  code("""
for note in nt["notes"]:
    print("-", note)
"""),
]

# ---------------------------------------------------------------------------
NOTEBOOKS["05_beyond_the_seed.ipynb"] = [
  md("""
# Beyond the seed: safe repeated teleports, sharpness and curvature, every optimizer

The follow-up to the seed paper (Zhao, Gower, Walters, Yu, ICLR 2024) teleports
to change *sharpness* or *curvature* and combines teleportation with many
optimizers. This notebook shows the library's pieces for that, each on a run
that takes seconds:

1. **Teleports that are safe to repeat.** Maximising `‖∇L‖²` with a fixed step
   size makes gradient descent diverge; `tj.objectives.stability_constrained` keeps every
   teleported point where a step of the optimizer's size is stable
   (`lr·|λ_max(H)| ≤ 2`).
2. **Sharpness and orbit curvature** as teleport objectives (`tj.geometry.sharpness`,
   `tj.geometry.orbit_curvature`), each increasable or decreasable, on an exact orbit
   (loss and network outputs unchanged).
3. **Every common optimizer** with teleport, and what happens to its state
   (`state_policy="keep" | "reset" | "transport"`).

The main job (`reproduce`) runs the full-size versions: `mlp_regression`
(methods `gd_teleport_every20`, `gd_teleport_max_grad_norm_safe`),
`generalization` and `optimizers`.
"""),
  code("""
%matplotlib inline
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import teleport_jax as tj
from teleport_jax.experiments import common
from teleport_jax.experiments import optimizers
from teleport_jax.experiments import regression
"""),
  md("""
## 1. Repeated teleports on the published regression problem

Plain GD (lr 1e-4) against a teleport every 20 epochs for 300 epochs, on two
seeds:

* `gd_teleport_max_grad_norm`: the paper's objective, max `‖∇L‖²`, teleport at
  epoch 5 only: it already diverges;
* `gd_teleport_max_grad_norm_safe`: the same objective under
  `tj.objectives.stability_constrained(..., learning_rate=1e-4)`;
* `gd_teleport_every20`: every 20 epochs, `tj.objectives.stability_constrained(tj.objectives.lookahead_loss(1e-4, 5), 1e-4)`.
"""),
  code("""
seeds, epochs = range(2), 300
methods = ["gd", "gd_teleport_max_grad_norm", "gd_teleport_max_grad_norm_safe", "gd_teleport_every20"]
runs = {m: regression.run_method(m, seeds, epochs) for m in methods}
for m, r in runs.items():
    final = r["losses"][:, -1]
    print(f"{m:32s} final loss per seed: {np.array2string(final, precision=3)}  teleports: {r['num_teleports']}")
"""),
  code("""
fig, axes = plt.subplots(1, len(seeds), figsize=(11, 3.8), sharey=True)
for seed, ax in zip(seeds, axes):
    for m, r in runs.items():
        ax.semilogy(r["losses"][seed], label=m)
    ax.set_title(f"seed {seed}")
    ax.set_xlabel("epoch")
axes[0].set_ylabel("loss")
axes[0].legend(fontsize=8)
plt.tight_layout()
"""),
  md("""
The unconstrained max-`‖∇L‖²` run leaves the plot (its loss becomes NaN); with
the stability constraint the same objective stays finite, and the constrained
look-ahead teleports every 20 epochs end below plain GD.

What the constraint checks: `tj.geometry.hessian_max_eigenvalue` estimates the
largest-magnitude Hessian eigenvalue by power iteration on Hessian-vector
products. Here it is before and after one unconstrained and one constrained
teleport:
"""),
  code("""
params, x, y = regression.make_problem(0)
loss = lambda p, d: regression.loss_fn(p, *d)
sym = regression.symmetry()
lr = regression.GD_LR
for name, objective in [
    ("max |grad|^2", tj.objectives.grad_norm_sq()),
    ("max |grad|^2, stability-constrained", tj.objectives.stability_constrained(tj.objectives.grad_norm_sq(), lr)),
]:
    new, info = tj.teleport(loss, params, (x, y), symmetry=sym, objective=objective, num_steps=10)
    before = lr * tj.geometry.hessian_max_eigenvalue(loss, params, (x, y))
    after = lr * tj.geometry.hessian_max_eigenvalue(loss, new, (x, y))
    print(f"{name:38s} accepted={bool(info.accepted)}  rel. loss drift={float(info.rel_loss_drift):.1e}  "
          f"lr*lambda_max {float(before):.2f} -> {float(after):.2f}")
"""),
  md("""
## 2. Sharpness and orbit curvature

`tj.geometry.sharpness(radius)` is the expected loss increase under random
perturbations of norm `radius` (each used with both signs);
`tj.geometry.orbit_curvature(symmetry)` is the curvature of the orbit curve
`γ(t) = exp(tM)·w` at `t = 0`, averaged over random Lie-algebra directions `M`.
Both are ordinary teleport objectives. Below, a LeakyReLU MLP is teleported
with the exact `PositiveRescaling` group to increase and to decrease each; the
network outputs do not change.
"""),
  code("""
key = jax.random.key(0)
widths = (8, 16, 16, 4)
keys = jax.random.split(key, len(widths) + 1)
mlp = [  # [(W, b), ...] with W of shape (out, in), as torch and the experiments use
    (jax.random.normal(keys[i], (widths[i + 1], widths[i])) / np.sqrt(widths[i]), jnp.zeros(widths[i + 1]))
    for i in range(len(widths) - 1)
]
xb = jax.random.normal(keys[-2], (64, widths[0]))
yb = jax.random.normal(keys[-1], (64, widths[-1]))
act = tj.activations.leaky_relu(0.1)

def apply(p, x):
    for w, b in p[:-1]:
        x = act(x @ w.T + b)
    return x @ p[-1][0].T + p[-1][1]

def mse(p, data):
    return jnp.mean((apply(p, data[0]) - data[1]) ** 2)

rescale = tj.PositiveRescaling()
rows = []
for name, make in [
    ("sharpness", lambda up: tj.geometry.sharpness(0.5, num_samples=16, maximize=up)),
    ("orbit curvature", lambda up: tj.geometry.orbit_curvature(rescale, num_directions=8, maximize=up)),
]:
    for up in (True, False):
        new, info = tj.teleport(mse, mlp, (xb, yb), symmetry=rescale, objective=make(up),
                                num_steps=10, max_step_size=0.3)
        out_change = float(jnp.max(jnp.abs(apply(new, xb) - apply(mlp, xb))))
        rows.append((name, "increase" if up else "decrease", float(info.objective_before),
                     float(info.objective_after), float(info.rel_loss_drift), out_change))
print(f"{'objective':16s} {'direction':9s} {'before':>10s} {'after':>10s} {'loss drift':>11s} {'max |Δ output|':>15s}")
for r in rows:
    print(f"{r[0]:16s} {r[1]:9s} {r[2]:10.4g} {r[3]:10.4g} {r[4]:11.1e} {r[5]:15.1e}")
"""),
  md("""
Because a rescaling teleport does not change the network function, it cannot
change the validation loss at the moment of the teleport; any effect on
generalization has to come from the training that follows. The
`generalization` experiment of the main job measures exactly that (teleport at
epoch 20 of 40, 5 seeds, paired with the same minibatch order) and the
correlation between these measures and validation loss over 24 trained
minima; docs/results.md has its tables.

## 3. Every common optimizer, and its state at a teleport

Momentum, AdaGrad, RMSProp and Adam carry state computed in the coordinates
before the teleport. `with_teleport(..., state_policy=...)` keeps it, resets
it, or *transports* it: first moments are moved as cotangent vectors (exactly:
the transported gradient equals the gradient at the teleported point), second
moments by the squared factor under rescaling. Here Adam on the digits
classification problem (2 seeds, 10 epochs):
"""),
  code("""
config = common.RunConfig(quick=True, out_dir=Path(tempfile.mkdtemp(prefix="teleport_opt_")))
pairs = [("adam", "none"), ("adam", "keep"), ("adam", "reset"), ("adam", "transport")]
res = optimizers.run_problem("classification", config, seeds=(0, 1), epochs=10, pairs=pairs)
for (name, variant), r in res.items():
    print(f"{name:5s} {variant:9s} final train loss per seed {np.array2string(r['losses'][:, -1], precision=5)}")
"""),
  code("""
fig, ax = plt.subplots(figsize=(6, 3.8))
for (name, variant), r in res.items():
    ax.semilogy(r["losses"].mean(axis=0), label=f"{name}, {variant}")
ax.set_xlabel("epoch")
ax.set_ylabel("training loss (mean over seeds)")
ax.legend()
plt.tight_layout()
"""),
]


# ---------------------------------------------------------------------------
NOTEBOOKS["06_any_model.ipynb"] = [
  md("""
# Teleport any flax model: find its symmetries, check them, teleport

`tj.find_symmetries(apply_fn, params, *example_inputs)` reads the model's own
program (its jaxpr), proposes where a group can act (which parameter axes move
together and what lies between the layers that write and read them), and keeps
only the candidates that pass a numerical check: outputs unchanged under a
random group element, and a first-order change along random generators that
vanishes. What it returns is a symmetry like any other: `tj.teleport`,
`tj.group_action`, `tj.with_teleport` and `tj.transport_state` take it.

This notebook

1. finds the symmetries of a hand-written flax CNN and prints the report,
2. shows that a GELU network has none, and that a hand-declared site that is
   not a symmetry is refused,
3. finds the symmetries of a small transformer (ReLU MLPs, gain-free RMSNorm:
   neuron rescaling, per-head attention GL, and rotations of the residual
   stream), teleports it under `jax.jit`, and trains it with AdamW with and
   without teleports.
"""),
  code("""
%matplotlib inline
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax

import teleport_jax as tj
import teleport_jax.models as zoo


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(10)(x)


x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
cnn = CNN()
cnn_params = cnn.init(jax.random.key(1), x)
t0 = time.perf_counter()
cnn_sym = tj.find_symmetries(cnn.apply, cnn_params, x)
print(f"found in {time.perf_counter() - t0:.2f} s")
print(cnn_sym)
"""),
  md("""
Every ReLU channel can be rescaled (conv channels across the pooling, and the
flatten between the last convolution and the first dense layer), and the
output layer's parameters are left alone because the model's output is fixed.
Applying a random element of the whole product leaves the outputs unchanged:
"""),
  code("""
xi = jax.tree.map(lambda z: 0.3 * jax.random.normal(jax.random.key(2), z.shape, z.dtype),
                  cnn_sym.algebra_zeros(cnn_params))
moved = tj.group_action(cnn_params, cnn_sym.exp(xi), symmetry=cnn_sym)
before, after = cnn.apply(cnn_params, x), cnn.apply(moved, x)
print("relative output change:", float(jnp.linalg.norm(after - before) / jnp.linalg.norm(before)))
print("parameters moved by:", float(optax.tree.norm(optax.tree.sub(moved, cnn_params))))
"""),
  md("""
## No guessing

A GELU MLP has no continuous parameter symmetry, and `find_symmetries` says so
rather than returning an approximate one. A site declared by hand with the
wrong activation (here: "ReLU" for a GELU network) is refused by `tj.verify`
with the measured error; `tj.teleport` runs the same check and returns the
parameters unchanged with status `NOT_A_SYMMETRY`.
"""),
  code("""
gelu = zoo.mlp(widths=(8, 32, 32, 4), activation="gelu")
print(tj.find_symmetries(gelu.apply, gelu.params, gelu.inputs))

wrong = tj.finders.mlp_chain(gelu.params, activation="relu")
try:
    tj.verify(gelu.apply, gelu.params, wrong, gelu.inputs, strict=True)
except ValueError as e:
    print("ValueError:", str(e)[:400])
"""),
  md("""
## A transformer

A decoder-only language model from `teleport_jax.models` (one block, 4 heads,
width 32, ReLU MLP, gain-free RMSNorm, learned positions), on random tokens.
"""),
  code("""
m = zoo.transformer(vocab=32, d_model=32, heads=4, layers=1, context=16,
                    mlp="relu", norm="rmsnorm_gainfree", batch=8)
t0 = time.perf_counter()
sym = tj.find_symmetries(m.apply, m.params, m.inputs)
print(f"found in {time.perf_counter() - t0:.2f} s")
print(sym.report())
"""),
  code("""
tokens = m.inputs


def loss(params, tokens):
    logits = m.apply(params, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


teleport = jax.jit(lambda p, t: tj.teleport(loss, p, t, symmetry=sym))
new, info = teleport(m.params, tokens)
print(tj.status_message(info))
print(f"loss {float(info.loss_before):.6f} -> {float(info.loss_after):.6f} "
      f"(relative change {float(info.rel_loss_drift):.1e}); "
      f"|grad|^2 {float(info.grad_norm_sq_before):.3f} -> {float(info.grad_norm_sq_after):.3f}")
out_change = jnp.abs(m.apply(new, tokens) - m.apply(m.params, tokens)).max()
print("largest change of a logit:", float(out_change))
"""),
  md("""
## Training with teleports inside an optax chain

`tj.with_teleport` wraps the whole optimizer (clipping, AdamW and its
schedule), teleports every 25 steps with the default objective (the loss after
a few simulated steps, bounded) and moves AdamW's first moments with the
teleport (`state_policy="transport"`; second moments move exactly on the
diagonal parts of the product and are kept on the rest).
"""),
  code("""
schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, 150, 3e-4)
inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.99, weight_decay=0.1))


def train(opt, steps=150, teleports=False):
    state = opt.init(m.params)

    # `teleport=` is static: the steps the schedule skips run the plain optimizer step,
    # and the teleporting step is a second program, compiled at the first teleport
    @functools.partial(jax.jit, static_argnames="teleport")
    def step(params, state, tokens, teleport=None):
        value, grad = jax.value_and_grad(loss)(params, tokens)
        kw = dict(teleport=teleport) if teleports else {}
        updates, state = opt.update(grad, state, params, value=value, value_fn=loss,
                                    tokens=tokens, **kw)
        return optax.apply_updates(params, updates), state, value

    params, losses = m.params, []
    for i in range(steps):
        due = tj.teleport_due(state) if teleports else None
        params, state, value = step(params, state, tokens, teleport=due)
        losses.append(float(value))
    return losses, state


plain, _ = train(inner)
teleporting, state = train(tj.with_teleport(inner, sym, schedule=tj.every(25),
                                            state_policy="transport"), teleports=True)
print("teleports:", int(state.num_teleports), "rejected:", int(state.num_rejected))
print(f"final loss: plain {plain[-1]:.4f}, with teleports {teleporting[-1]:.4f}")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.semilogy(plain, label="AdamW")
ax.semilogy(teleporting, label="AdamW + teleport every 25 steps")
ax.set_xlabel("step")
ax.set_ylabel("training loss (one fixed batch)")
ax.legend()
plt.tight_layout()
"""),
  md("""
One fixed batch is memorised here, so the curves show mechanics, not a
training recipe: the teleports are exact (every accepted one within the
dtype's `rtol`) and the optimizer continues from the teleported point. Whether
teleporting pays on the clock for a real training run is measured by the
benchmarks, not by this notebook.
"""),
]

# ---------------------------------------------------------------------------
NOTEBOOKS["07_learned_teleports.ipynb"] = [
  md("""
# Learned teleports: a policy that teleports at every step for a small forward pass

A searched teleport costs several gradient evaluations. Zhao et al. (ICLR 2024)
learn where to teleport instead: a small network reads the gradients and
proposes the group element, and it is meta-trained over many training runs.
`tj.learned` does this for any symmetry of the library:

1. a policy (`tj.learned.EquivariantPolicy`) reads features in the Lie algebra
   (the exact algebra gradient of `|grad L|^2`, the weights' moment map, their
   cross term: `O(parameters)`, from the action alone) and proposes an element
   and a step size;
2. `tj.learned.meta_train` trains it by truncated back-propagation through
   unrolled runs (`lax.scan` over steps, `vmap` over tasks, one compiled meta-step);
3. `tj.learned.learned_teleport` applies it in an optax chain, with the exact
   action and the guard.

The problem is the published one: an MLP regression with 20 samples, 20
features, 20 hidden LeakyReLU units and 20 outputs, every entry uniform on
`[0, 1)`, and the data-dependent GL(20) symmetry (its exact action).
"""),
  code("""
%matplotlib inline
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import teleport_jax as tj
from teleport_jax import learned
from teleport_jax.experiments import learned as problem

family = problem.family(problem.DIMS)  # tasks: sample(key) -> (params, (X, Y)), the loss, the symmetry
params, data = family.sample(jax.random.key(0))
print([p.shape for p in params], float(problem.loss_fn(params, data)))
"""),
  md("""
## Meta-train a policy

The policy proposes a step size in the published range `[1e-7, 5e-3]`,
starting at plain GD's `3e-4`, and a teleport of root mean square at most
`3e-3` per element (six times the published magnitude; it starts at a tenth
of that and learns how far to go). Eight tasks per meta-step, ten optimizer
steps per unroll; each task runs 300 steps before it is drawn afresh, the
tasks staggered over those 300 steps. Every task's meta-gradient is
normalised, so that the tasks on a plateau count as much as the ones whose
loss is still falling fast.
"""),
  code("""
config = learned.PolicyConfig(hidden=32, max_rms=problem.MAX_RMS, move_init=problem.MOVE_INIT,
                              lr_range=problem.LR_RANGE, lr_init=problem.GD_LR)
policy = learned.make_policy(config)
result = learned.meta_train(
    policy, family,
    learned.MetaConfig(tasks=8, unroll=10, horizon=300, meta_steps=300, meta_lr=3e-3,
                       meta_lr_final=3e-4),
)
print(f"meta-training: {result.seconds:.0f} s ({result.compile_seconds:.0f} s compiling)")
plt.figure(figsize=(5, 3))
plt.plot(np.asarray(result.losses))
plt.xlabel("meta-step"); plt.ylabel("mean log loss of the unroll"); plt.show()
"""),
  md("""
## Apply it with the guard, against plain GD

`learned_teleport(optax.sgd(1.0), symmetry, policy)` moves the parameters
before every step and takes the SGD step at the proposed step size. The loss
is evaluated once at the moved point: a move beyond `rtol` is refused. Both
training loops are one compiled `lax.scan`; the tasks were never seen in
meta-training.
"""),
  code("""
def train(opt, params, data, epochs=300, guarded=True):
    x, y = data

    def step(carry, _):
        p, s = carry
        v, g = jax.value_and_grad(problem.loss_fn)(p, data)
        if guarded:
            u, s = opt.update(g, s, p, value=v, value_fn=lambda p, x, y: problem.loss_fn(p, (x, y)), x=x, y=y)
        else:
            u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), v

    (p, s), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=epochs)
    return losses, s

gd = jax.jit(lambda p, d: train(optax.sgd(problem.GD_LR), p, d, guarded=False))
tele = jax.jit(lambda p, d: train(learned.learned_teleport(optax.sgd(1.0), family.symmetry, result.policy), p, d))

curves = {"gd": [], "learned lr + teleport": []}
seconds = {k: [] for k in curves}
for i in range(3):
    p, d = family.sample(jax.random.key(problem.TEST_KEY + i))
    for name, fn in (("gd", gd), ("learned lr + teleport", tele)):
        jax.block_until_ready(fn(p, d))  # compiled
        t = time.perf_counter()
        losses, state = jax.block_until_ready(fn(p, d))
        seconds[name].append(time.perf_counter() - t)
        curves[name].append(np.asarray(losses))
print("teleports accepted / refused on the last task:", int(state.num_teleports), int(state.num_rejected))
print("largest relative loss change of an accepted teleport:", float(state.max_rel_loss_drift))

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for name, runs in curves.items():
    med = np.median(np.stack(runs), axis=0)
    axes[0].plot(med, label=name)
    axes[1].plot(np.median(seconds[name]) * np.arange(1, med.size + 1) / med.size, med, label=name)
for ax, xl in zip(axes, ("epoch", "seconds")):
    ax.set_yscale("log"); ax.set_xlabel(xl); ax.set_ylabel("training loss")
axes[0].legend(); plt.show()
for name in curves:
    print(f"{name}: loss at epoch 100 {np.median([c[100] for c in curves[name]]):.3g}, "
          f"{1e6 * np.median(seconds[name]) / 300:.0f} us per epoch")
"""),
  md("""
## Save it, load it, run it at another width

The equivariant policy shares its weights across units, so the policy trained
at width 20 runs unchanged on the same problem at width 32 (with the symmetry
of that model).
"""),
  code("""
path = learned.save_policy("policy_width20.msgpack", result.policy)
loaded = learned.load_policy(path)
print(loaded.config)

wide = problem.family(problem.WIDE)
p, d = wide.sample(jax.random.key(problem.TEST_KEY))
wide_run = jax.jit(lambda p, d: train(learned.learned_teleport(optax.sgd(1.0), wide.symmetry, loaded), p, d, epochs=100))
losses, state = wide_run(p, d)
print(f"width 32: loss {float(losses[0]):.3g} -> {float(losses[-1]):.3g}, "
      f"{int(state.num_teleports)} teleports, {int(state.num_rejected)} refused")
path.unlink()
"""),
  md("""
`reproduce --only learned` runs the published comparison (GD, learned step
size alone, learned step size with teleports, the published LSTM policy,
learned optimizers with and without teleports, the momentum variant and the
width transfer) on test tasks, with per-epoch losses and compiled-loop times.
It meta-trains each learned method at three seeds and keeps the one that does
best on validation tasks, because two seeds of one method can differ more than
two methods do. It then states which of the published claims hold here.
"""),
]


def build(names=None):
  unknown = set(names or ()) - set(NOTEBOOKS)
  if unknown:
    raise SystemExit(f"unknown notebook(s): {', '.join(sorted(unknown))}")
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
    t0 = time.perf_counter()
    NotebookClient(
      nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    nbformat.write(nb, HERE / name)
    print(f"wrote {HERE / name} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  build(sys.argv[1:] or None)

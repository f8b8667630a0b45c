"""Shared pieces of the experiments: configuration, timed training, plotting."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import teleport_jax as tj

# The loss check of every float32 teleport in the experiments: the library's default,
# passed explicitly so that it is recorded in each protocol.
RTOL_FLOAT32 = tj.default_rtol(jnp.float32)
# The relative improvement of the objective an inner step must bring to be kept, in
# float32: far above the objective's rounding level (about 1e-7), so that two machines
# (or two thread counts) take the same accept/reject decisions. Passed explicitly so
# that the figures do not change with the library's default.
IMPROVE_RTOL_FLOAT32 = 1e-4


XLA_CPU_DOTS = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"


def prefer_xla_cpu_dots() -> None:
  """Asks XLA for its own CPU dot kernels instead of YNNPACK's (unless ``XLA_FLAGS`` chooses).

  On the 2-core development machine a character-transformer training step
  takes 28.8 ms with XLA's kernels and 47.6 ms with YNNPACK's (jaxlib 0.10.2);
  the digits workloads do not change measurably. Takes effect only before JAX
  creates its CPU backend (the first computation).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {XLA_CPU_DOTS}".strip()


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What the ``reproduce`` command was asked to do.

  Attributes:
    quick: reduced seeds/epochs (about 2 minutes on 2 CPU cores in total).
    out_dir: where plots and ``summary.json`` go.
    data_dir: directory with MNIST IDX files (optional).
    data_source: where ``data_dir`` came from (the user, the cache, a download)
      or, without it, why MNIST is not used; it goes into the data set's note
      (see :func:`teleport_jax.experiments.data.locate_mnist`).
    text: a text file for the character-level workloads (default: the text that
      ships with CPython, ``pydoc_data.topics``).
    retune: tune the workloads' methods again instead of using the stored values.
    mode: sizes by name (``"smoke"``, ``"quick"``, ``"full"``) for experiments
      that have them; ``None``: from ``quick``.
  """

  quick: bool = False
  out_dir: Path = Path("runs")
  data_dir: Path | None = None
  data_source: str | None = None
  text: Path | None = None
  retune: bool = False
  mode: str | None = None


class NullProgress:
  """A progress sink that does nothing (tests, notebooks)."""

  def update(self, n: int = 1) -> None:
    del n

  def set_postfix_str(self, s: str) -> None:
    del s


def make_train_step(
  opt: optax.GradientTransformation, value_fn: Callable, compiler_options: dict | None = None
) -> Callable:
  """A jitted ``step(params, state, *batch) -> (params, state, loss, grad_norm_sq)``.

  ``value_fn(params, *batch)`` is the loss; the batch is handed to ``opt.update``
  as ``value_fn``'s keyword arguments so teleporting optimizers can use it.
  ``compiler_options`` go to XLA (``None``: its defaults).
  """
  import inspect

  names = [
    p.name
    for p in inspect.signature(value_fn).parameters.values()
    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
  ][1:]

  def step(params, state, *batch):
    loss, grads = jax.value_and_grad(value_fn)(params, *batch)
    kwargs = dict(zip(names, batch))
    updates, state = opt.update(grads, state, params, value_fn=value_fn, **kwargs)
    gn = optax.tree.vdot(grads, grads)
    return optax.apply_updates(params, updates), state, loss, gn

  return jax.jit(step, compiler_options=compiler_options)


def timed_training(
  step: Callable,
  params,
  state,
  batch_fn: Callable[[int], tuple],
  epochs: int,
  on_epoch: Callable[[int, Any, Any], None] | None = None,
):
  """Runs ``epochs`` jitted steps, timing each with ``block_until_ready``.

  The first call compiles; compile time is measured separately (by running
  the step once on the initial point and discarding the result), so the
  returned wall-clock is run time only.

  Returns:
    ``(params, state, losses, grad_norms, times, compile_s)``; ``times[i]`` is
    the cumulative wall-clock after epoch ``i``.
  """
  t0 = time.perf_counter()
  jax.block_until_ready(step(params, state, *batch_fn(0)))
  compile_s = time.perf_counter() - t0
  losses, gns, times = [], [], []
  elapsed = 0.0
  for epoch in range(epochs):
    batch = batch_fn(epoch)
    t = time.perf_counter()
    params, state, loss, gn = step(params, state, *batch)
    jax.block_until_ready((params, loss))
    elapsed += time.perf_counter() - t
    losses.append(float(loss))
    gns.append(float(gn))
    times.append(elapsed)
    if on_epoch is not None:
      on_epoch(epoch, params, state)
  return params, state, np.asarray(losses), np.asarray(gns), np.asarray(times), compile_s


def teleport_config(
  objective,
  num_steps: int,
  *,
  step_size: float = 0.1,
  max_step_size: float = 1.0,
  normalize: bool = True,
  grow: float = 1.5,
  shrink: float = 0.5,
  rtol: float | None = RTOL_FLOAT32,
  improve_rtol: float | None = IMPROVE_RTOL_FLOAT32,
  safeguard: bool = True,
  check: bool = True,
) -> tj.TeleportConfig:
  """A :class:`teleport_jax.TeleportConfig` with every setting spelled out.

  The experiments build their teleports from this record and store
  :func:`describe_teleport` of it in their protocol, so what ran and what is
  reported cannot differ.
  """
  return tj.TeleportConfig(
    objective=objective,
    solver=tj.solvers.Lie(
      step_size=step_size,
      normalize=normalize,
      max_step_size=max_step_size,
      grow=grow,
      shrink=shrink,
    ),
    num_steps=num_steps,
    rtol=rtol,
    improve_rtol=improve_rtol,
    safeguard=safeguard,
    check=check,
    stability=None,  # each experiment states its own (with_teleport's stability=...)
  )


def describe_stability(stability) -> str:
  """A one-line description of a ``with_teleport(stability=...)`` argument."""
  s = tj.objectives.Stability() if stability is True else stability
  if s is None or s is False:
    return "off"
  if not isinstance(s, tj.objectives.Stability):
    return str(s)
  bound = [] if s.threshold is None else [f"{s.threshold:g}"]
  if s.relative:
    bound.append(f"{1 + s.margin:g} x before")
  return f"on: step sharpness of the wrapped optimizer <= max({', '.join(bound)})"


def describe_teleport(
  config: tj.TeleportConfig, *, schedule: str, stability=None, state_policy: str | None = None
) -> dict:
  """The settings of one teleporting method, for the protocol (JSON-safe)."""
  lie = config.solver
  out = dict(
    schedule=schedule,
    objective=config.objective.name,
    num_steps=config.inner_steps,
    solver=(
      f"lie(step_size={lie.step_size:g}, normalize={lie.normalize}, "
      f"max_step_size={lie.max_step_size:g}, grow={lie.grow:g}, shrink={lie.shrink:g})"
      if isinstance(lie, tj.solvers.Lie)
      else type(lie).__name__
    ),
    rtol=(
      "none (no loss check)"
      if config.rtol == float("inf")
      else "library default for the dtype"
      if config.rtol is None
      else config.rtol
    ),
    improve_rtol=(
      "library default for the dtype" if config.improve_rtol is None else config.improve_rtol
    ),
    safeguard=config.safeguard,
    symmetry_check=config.check,
    stability=describe_stability(stability),
  )
  if state_policy is not None:
    out["state_policy"] = state_policy
  return out


def mean_std(rows) -> tuple[np.ndarray, np.ndarray]:
  """Mean and standard deviation over seeds (axis 0); non-finite runs give NaN."""
  a = np.asarray(rows, dtype=np.float64)
  with np.errstate(invalid="ignore", over="ignore"):
    return a.mean(axis=0), a.std(axis=0)


def log_band(rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Geometric mean and band ``exp(mean(log x) -+ std(log x))`` over seeds (axis 0).

  The band of a positive quantity on a log axis: it never reaches zero, unlike
  ``mean -+ std``. Where any seed is non-finite or not positive all three are NaN
  (a curve then stops where its first seed diverged).

  Args:
    rows: ``(seeds, points)`` values.

  Returns:
    ``(center, lower, upper)``, each of shape ``(points,)``.
  """
  a = np.asarray(rows, dtype=np.float64)
  ok = np.all(np.isfinite(a) & (a > 0), axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    logs = np.log(np.where(ok, a, 1.0))
  mu, sd = logs.mean(axis=0), logs.std(axis=0)
  nan = np.full_like(mu, np.nan)
  return (
    np.where(ok, np.exp(mu), nan),
    np.where(ok, np.exp(mu - sd), nan),
    np.where(ok, np.exp(mu + sd), nan),
  )


def first_nonfinite(rows) -> int | None:
  """The first index (axis 1) at which any seed is non-finite, or ``None``."""
  bad = np.any(~np.isfinite(np.asarray(rows, np.float64)), axis=0)
  return int(np.argmax(bad)) if np.any(bad) else None


def finite_list(a) -> list:
  """A JSON-safe list (NaN/inf become ``None``)."""
  return [float(v) if np.isfinite(v) else None for v in np.asarray(a, np.float64).ravel()]


class _FigureFactory:
  """The two pyplot calls the experiments use, without pyplot's global state.

  Figures are plain :class:`matplotlib.figure.Figure` objects rendered by the
  Agg canvas, so running an experiment neither needs a display nor changes the
  backend of the caller (a notebook keeps showing its own plots).
  """

  @staticmethod
  def subplots(*args, **kwargs):
    from matplotlib.figure import Figure

    fig_kw = {k: kwargs.pop(k) for k in ("figsize", "dpi", "layout") if k in kwargs}
    fig = Figure(**fig_kw)
    return fig, fig.subplots(*args, **kwargs)

  @staticmethod
  def close(fig) -> None:
    del fig  # nothing to release: the figure is not registered with pyplot


def plt() -> _FigureFactory:
  """``subplots``/``close`` for writing plot files (see :class:`_FigureFactory`)."""
  return _FigureFactory()

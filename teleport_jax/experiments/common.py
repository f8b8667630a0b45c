"""Shared pieces of the experiments: configuration, timed training, plotting."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What the ``reproduce`` command was asked to do.

  Attributes:
    quick: reduced seeds/epochs (about 2 minutes on 2 CPU cores in total).
    out_dir: where plots and ``summary.json`` go.
    data_dir: directory with MNIST IDX files (optional).
  """

  quick: bool = False
  out_dir: Path = Path("runs")
  data_dir: Path | None = None


class NullProgress:
  """A progress sink that does nothing (tests, notebooks)."""

  def update(self, n: int = 1) -> None:
    del n

  def set_postfix_str(self, s: str) -> None:
    del s


def make_train_step(opt: optax.GradientTransformation, value_fn: Callable) -> Callable:
  """A jitted ``step(params, state, *batch) -> (params, state, loss, grad_norm_sq)``.

  ``value_fn(params, *batch)`` is the loss; the batch is handed to ``opt.update``
  as ``value_fn``'s keyword arguments so teleporting optimizers can use it.
  """
  import inspect

  names = [
    p.name
    for p in inspect.signature(value_fn).parameters.values()
    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
  ][1:]

  @jax.jit
  def step(params, state, *batch):
    loss, grads = jax.value_and_grad(value_fn)(params, *batch)
    kwargs = dict(zip(names, batch))
    updates, state = opt.update(grads, state, params, value_fn=value_fn, **kwargs)
    gn = optax.tree.vdot(grads, grads)
    return optax.apply_updates(params, updates), state, loss, gn

  return step


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


def mean_std(rows) -> tuple[np.ndarray, np.ndarray]:
  """Mean and standard deviation over seeds (axis 0); non-finite runs give NaN."""
  a = np.asarray(rows, dtype=np.float64)
  with np.errstate(invalid="ignore", over="ignore"):
    return a.mean(axis=0), a.std(axis=0)


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

    fig_kw = {k: kwargs.pop(k) for k in ("figsize", "dpi") if k in kwargs}
    fig = Figure(**fig_kw)
    return fig, fig.subplots(*args, **kwargs)

  @staticmethod
  def close(fig) -> None:
    del fig  # nothing to release: the figure is not registered with pyplot


def plt() -> _FigureFactory:
  """``subplots``/``close`` for writing plot files (see :class:`_FigureFactory`)."""
  return _FigureFactory()

"""Shared fixtures: x64 on (float32 tests create float32 arrays explicitly)."""

import atexit
import math
import os
import shutil
import tempfile

# The suite is compile-bound (hundreds of small jitted programs, each run a few
# times): compile without XLA's expensive backend optimisations. This changes
# no semantics; notebook kernels and subprocesses inherit it.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()
# The suite never fetches MNIST (test_mnist_download.py serves its own files on
# 127.0.0.1) and never reads a user's cached copy: every run sees the same data.
os.environ["TELEPORT_JAX_NO_DOWNLOAD"] = "1"
os.environ["TELEPORT_JAX_CACHE"] = tempfile.mkdtemp(prefix="teleport_jax_test_cache_")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

# Identical programs recur across tests (the same teleport of the same problem,
# compiled afresh by each test's own closures): a compilation cache shared by
# the session's processes (xdist workers inherit the directory from the
# controller, which loads this file first) compiles each program once. It only
# stores executables that XLA would build identically; no semantics change.
if "TELEPORT_JAX_TEST_XLA_CACHE" not in os.environ:
  os.environ["TELEPORT_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="teleport_jax_test_xla_")
  atexit.register(shutil.rmtree, os.environ["TELEPORT_JAX_TEST_XLA_CACHE"], ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ["TELEPORT_JAX_TEST_XLA_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

DTYPES = (jnp.float32, jnp.float64)

# tests/sharded needs 8 devices: tests/test_sharding.py runs it in its own process.
collect_ignore = [] if os.environ.get("TELEPORT_JAX_SHARDED") else ["sharded"]


def tol(dtype) -> float:
  """Relative tolerance for 'unchanged up to rounding' in ``dtype``."""
  return 2e-4 if jnp.dtype(dtype) == jnp.float32 else 1e-9


def random_mlp(key, widths, dtype, *, fmt="out_in", bias=False, scale=1.0):
  """A random MLP in one of the supported parameter layouts.

  Args:
    widths: ``(d_0, ..., d_L)``.
    fmt: ``"out_in"`` (list of ``W`` with shape (out, in)), ``"pairs"`` (list of
      ``(W, b)``), or ``"linen"`` (flax-style dict with ``kernel`` (in, out)).
  """
  keys = jax.random.split(key, 2 * len(widths))
  ws, bs = [], []
  for i in range(len(widths) - 1):
    k = (
      scale
      * jax.random.normal(keys[2 * i], (widths[i + 1], widths[i]), dtype)
      / math.sqrt(widths[i])
    )
    ws.append(k)
    bs.append(0.1 * jax.random.normal(keys[2 * i + 1], (widths[i + 1],), dtype))
  if fmt == "out_in":
    assert not bias
    return ws
  if fmt == "pairs":
    return [(w, b) for w, b in zip(ws, bs)]
  if fmt == "linen":
    layers = {}
    for i, (w, b) in enumerate(zip(ws, bs)):
      layers[f"Dense_{i}"] = {"kernel": w.T, **({"bias": b} if bias else {})}
    return {"params": layers}
  raise ValueError(fmt)


def mlp_apply(params, x, act, fmt):
  """Forward pass matching :func:`random_mlp`; ``x`` is (features, n) for out_in
  and pairs, (n, features) for linen."""
  if fmt == "out_in":
    h = x
    for i, w in enumerate(params):
      h = w @ h
      if i < len(params) - 1:
        h = act(h)
    return h
  if fmt == "pairs":
    h = x
    for i, (w, b) in enumerate(params):
      h = w @ h + b[:, None]
      if i < len(params) - 1:
        h = act(h)
    return h
  layers = params["params"]
  names = sorted(layers, key=lambda s: int(s.split("_")[1]))
  h = x
  for i, name in enumerate(names):
    h = h @ layers[name]["kernel"]
    if "bias" in layers[name]:
      h = h + layers[name]["bias"]
    if i < len(names) - 1:
      h = act(h)
  return h


def mse_loss(act, fmt):
  def loss(params, data):
    x, y = data
    return 0.5 * jnp.mean((y - mlp_apply(params, x, act, fmt)) ** 2)

  return loss


def rel_change(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request):
  return request.param

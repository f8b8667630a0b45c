"""Teleports in sharded training: one device and eight give the same curve.

These tests need 8 devices; ``tests/test_sharding.py`` runs them in their own
process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the rest
of the suite keeps one device). Run them directly with::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 TELEPORT_JAX_SHARDED=1 \
    python -m pytest tests/sharded

Every scenario trains 12 steps with two accepted teleports (steps 3 and 8) on
a 1-device mesh and on an 8-device mesh with the same axis names, and checks
that the losses agree to the stated relative tolerance, that the step compiled
once, and that every output (parameters and the whole optimizer state) keeps
the sharding it came in with.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import teleport_jax as tj
from teleport_jax import models as zoo

pytestmark = pytest.mark.skipif(
  jax.device_count() < 8, reason="needs 8 devices (see the module docstring)"
)

STEPS = 12
TELEPORT_AT = (3, 8)
ACT = tj.activations.leaky_relu(0.1)


class Run(NamedTuple):
  losses: np.ndarray
  params: Any
  state: Any
  compiles: int
  in_shardings: Any
  out_shardings: Any


def _mesh(shape: dict[str, int], num_devices: int) -> Mesh:
  """A mesh with ``shape``'s axes; on one device every axis has size 1."""
  sizes = tuple(shape.values()) if num_devices > 1 else (1,) * len(shape)
  devices = np.array(jax.devices()[: int(np.prod(sizes))]).reshape(sizes)
  return Mesh(devices, tuple(shape))


def train(optimizer, loss_fn, params, batch, mesh, param_specs, batch_spec) -> Run:
  """``STEPS`` jitted steps of ``optimizer`` with the given shardings.

  ``loss_fn(params, x, y)``; ``batch = (x, y)``; the state's parameter-shaped
  leaves get the parameters' shardings (``optax.tree_map_params``), its other
  leaves are replicated.
  """
  replicated = NamedSharding(mesh, P())
  p_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs)
  params = jax.device_put(params, p_sh)
  state_sh = optax.tree_map_params(
    optimizer,
    lambda _, sh: sh,
    jax.eval_shape(optimizer.init, params),
    p_sh,
    transform_non_params=lambda _: replicated,
  )
  state = jax.jit(optimizer.init, out_shardings=state_sh)(params)
  x, y = jax.device_put(batch, NamedSharding(mesh, batch_spec))

  def step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, s = optimizer.update(g, s, p, value_fn=loss_fn, x=x, y=y)
    return optax.apply_updates(p, u), s, loss

  step = jax.jit(step)
  shardings_in = jax.tree.map(lambda a: a.sharding, (params, state))
  losses = []
  for _ in range(STEPS):
    params, state, loss = step(params, state, x, y)
    losses.append(loss)
  return Run(
    losses=np.asarray(jax.device_get(losses), np.float64),
    params=jax.device_get(params),
    state=state,
    compiles=step._cache_size(),
    in_shardings=shardings_in,
    out_shardings=jax.tree.map(lambda a: a.sharding, (params, state)),
  )


def check_same_training(one: Run, eight: Run, rtol: float) -> None:
  assert int(one.state.num_teleports) == len(TELEPORT_AT) == int(eight.state.num_teleports)
  assert int(eight.state.num_rejected) == 0
  for (path, s_in), s_out, leaf in zip(
    jax.tree_util.tree_flatten_with_path(eight.in_shardings)[0],
    jax.tree.leaves(eight.out_shardings),
    jax.tree.leaves((eight.params, eight.state)),
  ):
    assert s_out.is_equivalent_to(s_in, np.ndim(leaf)), (jax.tree_util.keystr(path), s_in, s_out)
  assert eight.compiles == 1, "the 8-device step compiled more than once"
  rel = np.max(np.abs(one.losses - eight.losses) / np.abs(one.losses))
  assert rel <= rtol, f"losses differ by {rel:.2e} (relative) between 1 and 8 devices"
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
    diff = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    assert diff <= 10 * rtol * np.linalg.norm(np.asarray(a, np.float64)) + 1e-12


# ------------------------------------------------------------------ MLP
DIMS = (32, 64, 64, 8)


def mlp_apply(params, x):
  h = x
  for i in range(len(DIMS) - 1):
    layer = params["params"][f"Dense_{i}"]
    h = h @ layer["kernel"] + layer["bias"]
    if i < len(DIMS) - 2:
      h = ACT(h)
  return h


def mlp_loss(params, x, y):
  return 0.5 * jnp.mean(jnp.sum((y - mlp_apply(params, x)) ** 2, axis=-1))


def mlp_problem(batch: int = 16):
  keys = jax.random.split(jax.random.key(0), 2 * len(DIMS))
  params = {
    "params": {
      f"Dense_{i}": {
        "kernel": jax.random.normal(keys[i], (DIMS[i], DIMS[i + 1]), jnp.float32)
        / float(np.sqrt(DIMS[i])),
        "bias": 0.1 * jax.random.normal(keys[-1 - i], (DIMS[i + 1],), jnp.float32),
      }
      for i in range(len(DIMS) - 1)
    }
  }
  x = jax.random.normal(keys[-4], (batch, DIMS[0]), jnp.float32)
  y = jax.random.normal(keys[-5], (batch, DIMS[-1]), jnp.float32)
  return params, (x, y)


def test_data_parallel_rescaling_teleports_match_one_device():
  params, batch = mlp_problem()
  opt = tj.with_teleport(
    optax.adam(1e-2), tj.PositiveRescaling(activation=ACT), tj.schedules.at_steps(TELEPORT_AT)
  )
  specs = jax.tree.map(lambda _: P(), params)
  runs = [
    train(opt, mlp_loss, params, batch, _mesh({"data": 8}, n), specs, P("data")) for n in (1, 8)
  ]
  check_same_training(*runs, rtol=1e-4)


def test_fsdp_sharded_parameters_and_state_stay_sharded_through_teleports():
  params, batch = mlp_problem()
  opt = tj.with_teleport(
    optax.adam(1e-2), tj.PositiveRescaling(activation=ACT), tj.schedules.at_steps(TELEPORT_AT)
  )
  # every leaf split along its first axis (FSDP); the batch along the same axis
  specs = jax.tree.map(lambda _: P("fsdp"), params)
  runs = [
    train(opt, mlp_loss, params, batch, _mesh({"fsdp": 8}, n), specs, P("fsdp")) for n in (1, 8)
  ]
  check_same_training(*runs, rtol=1e-4)
  eight = runs[1]
  kernel = eight.state.inner_state[0].mu["params"]["Dense_1"]["kernel"]
  assert kernel.addressable_shards[0].data.shape == (DIMS[1] // 8, DIMS[2])


def test_data_dependent_gl_with_the_batch_split_over_devices_matches_one_device():
  params, batch = mlp_problem()
  opt = tj.with_teleport(
    optax.adam(1e-2), tj.DataDependentGL(activation=ACT), tj.schedules.at_steps(TELEPORT_AT)
  )
  specs = jax.tree.map(lambda _: P(), params)
  runs = [
    train(opt, mlp_loss, params, batch, _mesh({"data": 8}, n), specs, P("data")) for n in (1, 8)
  ]
  check_same_training(*runs, rtol=1e-3)


# ------------------------------------------------------------------ heads
def test_attention_heads_split_over_a_model_axis_teleport_like_one_device():
  model = zoo.transformer(vocab=32, d_model=32, heads=4, layers=1, context=8, batch=8)
  params = jax.tree.map(lambda a: a.astype(jnp.float32), model.params)
  tokens, targets = zoo.example_batch(model)
  lm_loss = zoo.loss_for(model)

  def loss(p, x, y):
    return lm_loss(p, (x, y))

  symmetry = tj.product(tj.finders.attention_qk(params), tj.finders.attention_vo(params))
  opt = tj.with_teleport(optax.adam(3e-3), symmetry, tj.schedules.at_steps(TELEPORT_AT))

  def spec(path, leaf):
    name = jax.tree_util.keystr(path)
    if "'attn'" in name:
      if "'out'" in name:
        return P("model")  # (heads, d_head, d_model); jit returns specs without trailing Nones
      return P(None, "model", None)  # (d_model, heads, d_head)
    return P()

  specs = jax.tree_util.tree_map_with_path(spec, params)
  assert sum(s != P() for s in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))) == 4
  mesh_shape = {"data": 2, "model": 4}
  runs = [
    train(opt, loss, params, (tokens, targets), _mesh(mesh_shape, n), specs, P("data"))
    for n in (1, 8)
  ]
  check_same_training(*runs, rtol=1e-4)


# ------------------------------------------------------------ documentation
def test_the_multiple_devices_example_runs_and_keeps_its_shardings():
  page = pathlib.Path(__file__).resolve().parents[2] / "docs" / "multiple_devices.md"
  block = re.search(
    r"<!-- example:multiple-devices -->\n```python\n(.*?)```", page.read_text(), re.S
  )
  assert block, "docs/multiple_devices.md has no multiple-devices example"
  ns: dict[str, Any] = {}
  exec(compile(block.group(1), "docs/multiple_devices.md", "exec"), ns)  # noqa: S102
  assert ns["mesh"].size == 8
  assert int(ns["state"].num_teleports) == 1
  assert ns["step"]._cache_size() == 1
  for a, sh in zip(jax.tree.leaves(ns["params"]), jax.tree.leaves(ns["param_sh"])):
    assert a.sharding.is_equivalent_to(sh, a.ndim)
  assert np.isfinite(float(ns["loss"]))

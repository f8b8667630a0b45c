"""bfloat16 and float16 end to end: discovery and with_teleport around AdamW."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import teleport_jax as tj
from teleport_jax import models as zoo
from teleport_jax._src.core import tracing
from teleport_jax._src.discovery import labels as labels_lib
from teleport_jax._src.discovery.discovery import find_symmetries
from teleport_jax._src.discovery.discovery import verify
from teleport_jax._src.symmetries import check as check_lib

LOW = (jnp.bfloat16, jnp.float16)
LOW_IDS = ("bfloat16", "float16")
POLICIES = ("keep", "reset", "transport")
S = tj.TeleportStatus
# what a teleport may end with here: moved, or kept the parameters for a reason of the point
NON_FAILURE = (S.SUCCESSFUL, S.NO_IMPROVEMENT, S.UNSTABLE)
TELEPORT_STEPS = (2, 5)
NUM_STEPS = 7

# name -> (constructor, kwargs); small, and large enough for a teleport to find a better point
MODELS = {
  "mlp": (zoo.mlp, dict(widths=(4, 6, 5, 3), activation="relu", batch=4)),
  "cnn": (zoo.cnn, dict(channels=(3, 4), dense=(6, 10), image=(4, 4, 1), batch=16)),
  "transformer": (
    zoo.transformer,
    dict(vocab=16, d_model=8, heads=2, layers=1, context=4, mlp_ratio=2, batch=4),
  ),
}


@pytest.fixture(scope="module")
def model():
  cache = {}

  def get(name, dtype, framework="linen"):
    key = (name, jnp.dtype(dtype).name, framework)
    if key not in cache:
      make, kwargs = MODELS[name]
      cache[key] = make(framework=framework, dtype=dtype, **kwargs)
    return cache[key]

  return get


@pytest.fixture(scope="module")
def discover(model):
  cache = {}

  def get(name, dtype, framework="linen"):
    key = (name, jnp.dtype(dtype).name, framework)
    if key not in cache:
      m = model(name, dtype, framework)
      cache[key] = find_symmetries(m.apply, m.params, m.inputs)
    return cache[key]

  return get


def _sites(d) -> list[tuple[str, str, int]]:
  return [(c.name, c.group, c.dimension) for c in d.checks]


def _dtypes(tree):
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x).dtype, tree)


def _finite(tree) -> bool:
  return all(
    bool(np.all(np.isfinite(np.asarray(x, np.float64))))
    for x in jax.tree_util.tree_leaves(tree)
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
  )


# ----------------------------------------------------------------- discovery
def test_labels_count_bfloat16_as_floating():
  # NumPy's own test does not know ml_dtypes' bfloat16: the label propagation must not use it
  assert labels_lib._floating(jax.ShapeDtypeStruct((2,), jnp.bfloat16))
  assert labels_lib._floating(jax.ShapeDtypeStruct((2,), jnp.float16))
  assert not labels_lib._floating(jax.ShapeDtypeStruct((2,), jnp.int32))


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_low_precision_finds_the_float32_sites(name, dtype, discover):
  ref, low = discover(name, jnp.float32), discover(name, dtype)
  assert _sites(ref), str(ref)
  assert _sites(low) == _sites(ref), str(low)
  assert low.dimension == ref.dimension and not low.rejected, str(low)
  # checked on the same program in float32: exact symmetries at float32 rounding
  assert low.dtype == jnp.dtype(dtype).name and low.check_dtype == "float32"
  assert low.output_tol == ref.output_tol and "checked in float32" in str(low)
  assert low.joint_error <= low.output_tol


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_nnx_low_precision_finds_the_float32_sites(dtype, discover):
  assert _sites(discover("mlp", dtype, "nnx")) == _sites(discover("mlp", jnp.float32, "nnx"))


def test_widened_program_matches_the_float32_model(model):
  low, ref = model("cnn", jnp.bfloat16), model("cnn", jnp.float32)
  closed = jax.make_jaxpr(low.apply)(low.params, low.inputs)
  program = tracing.inline(closed)
  assert tracing.widenable(program)
  out = tracing.widened(program)(*jax.tree_util.tree_leaves((low.params, low.inputs)))[0]
  assert out.dtype == jnp.float32
  up = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), (low.params, low.inputs))
  expect = ref.apply(*up)
  assert float(jnp.max(jnp.abs(out - expect))) <= 1e-5 * float(jnp.max(jnp.abs(expect)))


def test_unwidenable_program_is_checked_in_its_own_dtype(model, monkeypatch):
  monkeypatch.setattr(tracing, "widenable", lambda program: False)
  m = model("mlp", jnp.bfloat16)
  d = find_symmetries(m.apply, m.params, m.inputs)
  assert d.check_dtype == "bfloat16" and d.output_tol > 1e-3
  assert d.dimension == 6 + 5, str(d)


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_verify_checks_low_precision_in_float32(dtype, model, discover):
  m = model("cnn", dtype)
  result = verify(m.apply, m.params, discover("cnn", dtype), m.inputs, strict=True)
  assert result.ok and result.check_dtype == "float32"
  assert "checked in float32" in str(result)


def test_symmetry_check_tolerance_follows_the_compute_dtype(model):
  # a bfloat16 model whose loss is float32: the check resolves bfloat16 rounding only
  m = model("cnn", jnp.bfloat16)
  loss = _f32_cross_entropy(m)
  batch = zoo.example_batch(m)
  of = lambda p: loss(p, batch)  # noqa: E731
  assert jax.eval_shape(of, m.params).dtype == jnp.float32
  assert check_lib.compute_resolution(of, m.params) == jnp.bfloat16
  assert check_lib.resolution_tol(of, m.params, 1e-4) == check_lib.default_check_tol(jnp.bfloat16)
  # the float32 model computes in float32: its check resolves float32 rounding
  f32 = model("cnn", jnp.float32)
  loss32 = _f32_cross_entropy(f32)
  assert check_lib.compute_resolution(lambda p: loss32(p, batch), f32.params) == jnp.float32


# ------------------------------------------------------------- with_teleport
def _f32_cross_entropy(m):
  """Cross-entropy of the model's logits in float32 (the usual mixed-precision loss)."""

  def loss(params, batch):
    inputs, targets = batch
    logits = m.apply(params, inputs).astype(jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

  return loss


def _train(m, sym, loss, inner, policy):
  """``NUM_STEPS`` jitted AdamW steps teleporting at ``TELEPORT_STEPS``."""
  opt = tj.with_teleport(
    inner, sym, schedule=tj.schedules.at_steps(list(TELEPORT_STEPS)), state_policy=policy
  )
  batch = zoo.example_batch(m)

  @jax.jit
  def step(p, s):
    value, grads = jax.value_and_grad(loss)(p, batch)
    updates, s = opt.update(grads, s, p, value_fn=loss, batch=batch)
    return optax.apply_updates(p, updates), s, value

  params, state = m.params, opt.init(m.params)
  before = _dtypes((params, state.inner_state))
  statuses, losses = [], []
  for i in range(NUM_STEPS):
    params, state, value = step(params, state)
    losses.append(float(value))
    if i in TELEPORT_STEPS:
      statuses.append(S(int(state.info.status)))
  return params, state, before, statuses, losses


def _check_run(run, dtype, *, need_teleport):
  params, state, before, statuses, losses = run
  assert all(s in NON_FAILURE for s in statuses), statuses
  assert int(state.num_teleports) + int(state.num_rejected) == len(TELEPORT_STEPS)
  if need_teleport:
    assert int(state.num_teleports) >= 1, statuses
  assert float(state.max_rel_loss_drift) <= tj.default_rtol(dtype)
  # parameters and optimizer state keep their dtypes (AdamW's moments follow the parameters)
  assert _dtypes((params, state.inner_state)) == before
  assert jax.tree_util.tree_leaves(params)[0].dtype == dtype
  assert _finite((params, state.inner_state)) and np.all(np.isfinite(losses))


@pytest.mark.parametrize(
  "name,policy",
  # the MLP in the default run; the CNN and the transformer, every policy, with -m slow
  [("mlp", "transport")]
  + [
    pytest.param(name, policy, marks=pytest.mark.slow)
    for name in ("cnn", "transformer")
    for policy in POLICIES
  ],
)
def test_with_teleport_adamw_trains_bfloat16(name, policy, model, discover):
  m = model(name, jnp.bfloat16)
  run = _train(m, discover(name, jnp.bfloat16), _f32_cross_entropy(m), optax.adamw(1e-3), policy)
  _check_run(run, jnp.bfloat16, need_teleport=True)
  mu = run[1].inner_state[0].mu
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(mu))


@pytest.mark.slow
def test_with_teleport_adamw_trains_float16(model, discover):
  m = model("cnn", jnp.float16)
  # AdamW's default eps (1e-8) is zero in float16: its update is 0/0 for any zero gradient
  inner = optax.adamw(1e-3, eps=1e-4)
  run = _train(m, discover("cnn", jnp.float16), _f32_cross_entropy(m), inner, "transport")
  _check_run(run, jnp.float16, need_teleport=True)


@pytest.mark.slow
def test_with_teleport_adamw_runs_on_a_bfloat16_loss(model, discover):
  # the loss itself in bfloat16: its resolution (2**-8 of the loss) is coarser than the gain
  # five AdamW(1e-3) steps show, so a teleport may find nothing; it must still run and keep
  # the dtypes
  m = model("cnn", jnp.bfloat16)
  loss = zoo.loss_for(m)
  assert jax.eval_shape(loss, m.params, zoo.example_batch(m)).dtype == jnp.bfloat16
  run = _train(m, discover("cnn", jnp.bfloat16), loss, optax.adamw(1e-3), "keep")
  _check_run(run, jnp.bfloat16, need_teleport=False)

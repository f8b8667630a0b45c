"""A teleport says what it did: refuses non-symmetries, reports when nothing moved."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp_apply
from conftest import random_mlp
from test_solver import loss as published_loss
from test_solver import published_problem

import teleport_jax as tj

LEAKY = tj.activations.leaky_relu(0.1)


class _MLP(nn.Module):
  """Dense-act-Dense-act-Dense with optional LayerNorm, residual path or custom names."""

  act: str = "relu"
  norm: bool = False
  residual: bool = False
  names: tuple | None = None

  @nn.compact
  def __call__(self, x):
    f = {
      "relu": nn.relu,
      "gelu": nn.gelu,
      "tanh": jnp.tanh,
      "leaky": lambda z: nn.leaky_relu(z, 0.1),
    }[self.act]
    names = self.names or (None, None, None)
    h = nn.Dense(8, name=names[0])(x)
    h = f(h)
    if self.norm:
      h = nn.LayerNorm()(h)
    h2 = nn.Dense(8, name=names[1])(h)
    h = h + f(h2) if self.residual else f(h2)
    return nn.Dense(3, name=names[2])(h)


def _flax_case(key=0, **kw):
  model = _MLP(**kw)
  x = jax.random.normal(jax.random.key(key), (16, 8))
  y = jax.random.normal(jax.random.key(key + 1), (16, 3))
  params = model.init(jax.random.key(key + 2), x)

  def loss(p, d):
    return jnp.mean((model.apply(p, d[0]) - d[1]) ** 2)

  return model, params, (x, y), loss


def _same(a, b):
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize(
  "kw,cause",
  [
    # one case in the default run; the other causes with -m slow
    pytest.param(dict(act="gelu"), "not positively homogeneous", marks=pytest.mark.slow),
    (dict(act="tanh"), "not positively homogeneous"),
    pytest.param(dict(act="relu", norm=True), "normalisation", marks=pytest.mark.slow),
    pytest.param(dict(act="relu", residual=True), "residual", marks=pytest.mark.slow),
  ],
  ids=["gelu", "tanh", "layernorm", "residual"],
)
def test_rescaling_that_is_not_a_symmetry_is_refused(kw, cause):
  _, params, data, loss = _flax_case(**kw)
  sym = tj.PositiveRescaling()
  new, info = tj.teleport(loss, params, data, symmetry=sym, num_steps=2, throw=False)
  assert int(info.status) == tj.TeleportStatus.NOT_A_SYMMETRY
  assert tj.TeleportStatus(int(info.status)).nothing_moved
  assert float(info.symmetry_error) > 1e-3
  _same(new, params)
  with pytest.raises(ValueError, match=f"not a symmetry of this loss.*{cause}"):
    tj.teleport(loss, params, data, symmetry=sym, num_steps=2)


def test_a_refused_teleport_under_jit_reports_the_status_and_keeps_the_input():
  _, params, data, loss = _flax_case(act="gelu")
  sym = tj.PositiveRescaling()
  run = jax.jit(lambda p, d: tj.teleport(loss, p, d, symmetry=sym, num_steps=2))
  new, info = run(params, data)
  assert int(info.status) == tj.TeleportStatus.NOT_A_SYMMETRY
  _same(new, params)


def test_exact_rescaling_passes_the_check_at_the_rounding_level(dtype):
  _, params, data, loss = _flax_case(act="relu")
  params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
  data = jax.tree_util.tree_map(lambda a: a.astype(dtype), data)
  new, info = tj.teleport(loss, params, data, symmetry=tj.PositiveRescaling(), num_steps=3)
  assert int(info.status) == tj.TeleportStatus.SUCCESSFUL
  assert float(info.symmetry_error) < (1e-3 if dtype == jnp.float32 else 1e-10)
  assert float(info.rel_loss_drift) <= tj.default_rtol(dtype)


@pytest.mark.slow
def test_layer_order_comes_from_the_call_not_the_names():
  # names sort as hidden, input, output; the call order is input, hidden, output
  names = ("input_layer", "hidden_layer", "output_layer")
  _, params, data, loss = _flax_case(act="relu", names=names)
  new, info = tj.teleport(loss, params, data, symmetry=tj.PositiveRescaling(), num_steps=3)
  assert int(info.status) == tj.TeleportStatus.SUCCESSFUL
  layout = tj.symmetries.infer_layout(params, call=(lambda p, d: loss(p, d), (params, data)))
  assert [p[-2].key for p in layout.kernel_paths] == list(names)
  # without a call the order is ambiguous, and the error says how to give it
  sym = tj.PositiveRescaling()
  with pytest.raises(ValueError, match="layer order is ambiguous.*MLPLayout"):
    tj.group_action(params, None, symmetry=sym)
  # a layout given in the wrong order is refused by the symmetry check
  wrong = tj.symmetries.infer_layout(params, call=(lambda p, d: loss(p, d), (params, data)))
  wrong = tj.symmetries.MLPLayout(
    (wrong.kernel_paths[1], wrong.kernel_paths[0], wrong.kernel_paths[2]),
    (wrong.bias_paths[1], wrong.bias_paths[0], wrong.bias_paths[2]),
  )
  with pytest.raises(ValueError, match="not a symmetry"):
    tj.teleport(loss, params, data, symmetry=tj.PositiveRescaling(layout=wrong), num_steps=3)


def test_wrong_declared_slope_reports_nothing_moved_with_the_reason():
  # a LeakyReLU(0.1) network with negative pre-activations (on the published
  # problem every pre-activation is positive and any slope is exact)
  params = random_mlp(jax.random.key(0), (5, 6, 7, 3), jnp.float32)
  x = jax.random.normal(jax.random.key(1), (5, 4))
  y = jax.random.normal(jax.random.key(2), (3, 4))
  data = (x, y)
  sym = tj.DataDependentGL()  # default slope 0.01
  new, info = tj.teleport(published_loss, params, data, symmetry=sym, num_steps=3, throw=False)
  status = tj.TeleportStatus(int(info.status))
  assert status == tj.TeleportStatus.NOT_A_SYMMETRY and status.nothing_moved
  assert status.message.startswith("nothing moved")
  _same(new, params)
  with pytest.raises(ValueError, match=r"declared activation differs"):
    tj.teleport(published_loss, params, data, symmetry=sym, num_steps=3)


def test_batch_larger_than_every_width_reports_nothing_to_move():
  widths = (4, 5, 5, 2)
  params = random_mlp(jax.random.key(0), widths, jnp.float32)
  x = jax.random.normal(jax.random.key(1), (4, 12))  # 12 samples > every width
  y = jax.random.normal(jax.random.key(2), (2, 12))
  loss = lambda p, d: 0.5 * jnp.sum((d[1] - mlp_apply(p, d[0], LEAKY, "out_in")) ** 2)
  new, info = tj.teleport(
    loss, params, (x, y), symmetry=tj.DataDependentGL(activation=LEAKY), num_steps=3
  )
  status = tj.TeleportStatus(int(info.status))
  assert status == tj.TeleportStatus.NOTHING_TO_MOVE and status.nothing_moved
  assert "no part of the group can move" in status.message
  _same(new, params)


def test_every_inner_step_nonfinite_reports_it():
  params, data = published_problem(4)

  def objective(loss_fn, p, d):  # NaN anywhere but at the start point
    moved = jnp.sum(p[0]) - jnp.sum(params[0])
    return jnp.where(jnp.abs(moved) > 0, jnp.nan, 0.0) + moved

  new, info = tj.teleport(
    published_loss, params, data, symmetry=tj.PositiveRescaling(), objective=objective, num_steps=3
  )
  assert int(info.status) == tj.TeleportStatus.STEPS_NONFINITE
  assert int(info.num_nonfinite_steps) == 3
  _same(new, params)


def test_accepted_drift_on_the_seed_problem_is_within_1e_5_in_float32():
  for seed in range(3):
    params, data = published_problem(seed)
    for sym in (tj.DataDependentGL(activation=LEAKY), tj.PositiveRescaling()):
      new, info = tj.teleport(published_loss, params, data, symmetry=sym, num_steps=10)
      assert bool(info.accepted), tj.status_message(info.status)
      assert float(info.rel_loss_drift) <= 1e-5
      l0, l1 = published_loss(params, data), published_loss(new, data)
      assert abs(float(l1 - l0)) <= 1e-5 * float(l0)


@pytest.mark.parametrize(
  "kind,low",
  [
    ("rescaling", jnp.bfloat16),
    pytest.param("rescaling", jnp.float16, marks=pytest.mark.slow),
    pytest.param("data_gl", jnp.bfloat16, marks=pytest.mark.slow),
    ("data_gl", jnp.float16),
  ],
  ids=["rescaling-bfloat16", "rescaling-float16", "data_gl-bfloat16", "data_gl-float16"],
)
def test_low_precision_params_teleport_in_float32_and_keep_their_dtype(kind, low):
  params, data = published_problem(1)
  params = [w.astype(low) for w in params]
  sym = tj.PositiveRescaling() if kind == "rescaling" else tj.DataDependentGL(activation=LEAKY)
  new, info = tj.teleport(published_loss, params, data, symmetry=sym, num_steps=5)
  assert all(a.dtype == low for a in new)
  assert info.loss_before.dtype == jnp.float32  # measured in float32
  if bool(info.accepted):
    up = lambda p: [w.astype(jnp.float32) for w in p]  # noqa: E731
    l0, l1 = published_loss(up(params), data), published_loss(up(new), data)
    assert abs(float(l1 - l0)) <= tj.default_rtol(low) * float(l0)
  else:
    _same(new, params)


@pytest.mark.parametrize(
  "low",
  [jnp.bfloat16, pytest.param(jnp.float16, marks=pytest.mark.slow)],
  ids=["bfloat16", "float16"],
)
def test_low_precision_teleports_are_within_tolerance_or_keep_the_input_bits(low):
  params, data = published_problem(4)
  params = [w.astype(low) for w in params]
  up = lambda p: [w.astype(jnp.float32) for w in p]  # noqa: E731
  l0 = float(published_loss(up(params), data))
  sym = tj.PositiveRescaling()
  new, info = tj.teleport(published_loss, params, data, symmetry=sym, num_steps=5)
  assert bool(info.accepted), tj.status_message(info)
  assert all(a.dtype == low for a in new)
  # the drift is measured on the parameters as returned (cast back), in float32
  assert abs(float(published_loss(up(new), data)) - l0) <= tj.default_rtol(low) * l0
  assert float(info.rel_loss_drift) <= tj.default_rtol(low)
  # a tolerance the cast back cannot meet: rejected, the input returned bit for bit
  kept, info = tj.teleport(published_loss, params, data, symmetry=sym, num_steps=5, rtol=1e-9)
  assert not bool(info.accepted)
  _same(kept, params)
  assert all(a.dtype == low for a in kept)


def test_numpy_and_jax_scalars_are_accepted_as_numbers():
  params, data = published_problem(2)
  new, info = tj.teleport(
    published_loss,
    params,
    data,
    symmetry=tj.PositiveRescaling(),
    num_steps=np.int64(3),
    step_size=np.float32(0.1),
    max_step_size=jnp.float32(1.0),
    objective=tj.objectives.lookahead_loss(np.float32(1e-4), np.int32(2)),
  )
  assert bool(info.accepted)


def test_inject_hyperparams_around_with_teleport_runs_under_jit():
  params, (x, y) = published_problem(3)
  sym = tj.DataDependentGL(activation=LEAKY)

  def make(learning_rate):
    return tj.with_teleport(
      optax.sgd(learning_rate),
      sym,
      [1],
      objective=tj.objectives.lookahead_loss(learning_rate, 2),
      num_steps=2,
    )

  opt = optax.inject_hyperparams(make)(learning_rate=1e-4)
  vf = lambda p, x, y: published_loss(p, (x, y))  # noqa: E731
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(vf)(p, x, y)
    u, s = opt.update(g, s, p, value_fn=vf, x=x, y=y)
    return optax.apply_updates(p, u), s

  for _ in range(3):
    params, state = step(params, state)
  assert int(state.inner_state.num_teleports) == 1


def test_equal_settings_built_afresh_share_compiled_code():
  from teleport_jax._src.solver import solver

  params, data = published_problem(5)

  def fresh():
    sym = tj.DataDependentGL(activation=tj.activations.leaky_relu(0.1))
    obj = tj.objectives.stability_constrained(tj.objectives.lookahead_loss(1e-4, 3), 1e-4)
    return tj.teleport(published_loss, params, data, symmetry=sym, objective=obj, num_steps=2)

  fresh()
  before = solver._run_jit._cache_size()
  fresh()
  assert solver._run_jit._cache_size() == before
  assert tj.activations.leaky_relu(0.1) == tj.activations.leaky_relu(0.1)
  assert tj.DataDependentGL(activation=tj.activations.leaky_relu(0.1)) == tj.DataDependentGL(
    activation=tj.activations.leaky_relu(0.1)
  )
  assert tj.objectives.lookahead_loss(1e-4, 3) == tj.objectives.lookahead_loss(1e-4, 3)


def test_an_element_in_the_published_convention_transposed_gives_the_published_features():
  # published code: features h (width x samples) -> (I + T) @ h; ours: h_rows -> h_rows A
  params, (x, y) = published_problem(6, jnp.float64)
  sym = tj.DataDependentGL(activation=LEAKY)
  keys = jax.random.split(jax.random.key(0), 2)
  ts = [
    0.05 * jax.random.normal(k, (w.shape[0], w.shape[0]), jnp.float64)
    for k, w in zip(keys, params[:-1])
  ]
  g = tuple((jnp.eye(t.shape[0]) + t).T for t in ts)  # transposed, as documented
  new = tj.group_action(params, g, symmetry=sym, data=(x, y))
  h, h_new = x, x
  for m in range(2):
    h, h_new = LEAKY(params[m] @ h), LEAKY(new[m] @ h_new)
    np.testing.assert_allclose(h_new, (jnp.eye(ts[m].shape[0]) + ts[m]) @ h, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(
    published_loss(new, (x, y)), published_loss(params, (x, y)), rtol=1e-12
  )


def test_with_teleport_inside_a_chain_is_refused():
  params, (x, y) = published_problem(7)
  vf = lambda p, x, y: published_loss(p, (x, y))  # noqa: E731
  sym = tj.PositiveRescaling()
  for opt in (
    optax.chain(optax.clip_by_global_norm(1e-3), tj.with_teleport(optax.sgd(1e-4), sym, 5)),
    optax.chain(tj.with_teleport(optax.sgd(1e-4), sym, 5), optax.scale(0.5)),
  ):
    state = opt.init(params)
    with pytest.raises(ValueError, match="outermost"):
      opt.update(jax.grad(vf)(params, x, y), state, params, value_fn=vf, x=x, y=y)


def test_transformed_updates_are_detected_and_the_teleport_rejected():
  params, (x, y) = published_problem(8)
  vf = lambda p, x, y: published_loss(p, (x, y))  # noqa: E731
  opt = tj.with_teleport(optax.sgd(1e-4), tj.PositiveRescaling(), [0], num_steps=2)
  state = opt.init(params)
  g = jax.grad(vf)(params, x, y)
  clipped = optax.clip_by_global_norm(1e-3).update(g, None)[0]
  u, state = opt.update(clipped, state, params, value_fn=vf, x=x, y=y)
  assert int(state.info.status) == tj.TeleportStatus.TRANSFORMED_UPDATES
  assert int(state.num_rejected) == 1
  assert float(optax.tree.norm(u)) <= 1e-4 * 1e-3 * 1.001  # the clipped step, not a jump


def test_defaults_are_bounded_and_repeating_schedules_stability_constrained():
  config = tj.TeleportConfig()
  assert isinstance(config.solver, tj.solvers.OneStep)
  assert config.resolved_objective(True).name == "optimizer_lookahead(steps=1)"
  assert config.resolved_objective(False).name.startswith("lookahead_loss")
  named = tj.TeleportConfig(objective="max_grad_norm")  # the published teleport, by name
  assert isinstance(named.solver, tj.solvers.Lie) and named.inner_steps == 10
  params, (x, y) = published_problem(9)
  vf = lambda p, x, y: published_loss(p, (x, y))  # noqa: E731
  opt = tj.with_teleport(
    optax.sgd(1e-4), tj.DataDependentGL(activation=LEAKY), tj.every(10, start=5)
  )
  state = opt.init(params)
  step = jax.jit(
    lambda p, s: (lambda g: opt.update(g, s, p, value_fn=vf, x=x, y=y))(jax.grad(vf)(p, x, y))
  )
  losses = []
  for _ in range(40):
    losses.append(float(vf(params, x, y)))
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
  assert np.all(np.isfinite(losses))
  assert int(state.num_teleports) >= 1
  assert np.isfinite(float(state.info.step_sharpness_before))  # the bound was measured
  jumps = np.asarray(losses[1:]) / np.asarray(losses[:-1])
  assert jumps.max() <= 10.0

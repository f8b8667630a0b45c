"""Learned teleports: exact features, equivariant policies, the guarded wrapper, meta-training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import teleport_jax as tj
from teleport_jax import learned as L
from teleport_jax import models

LEAKY = tj.activations.leaky_relu(0.1)


def _loss(p, data):
  x, y = data
  h = x
  for w in p[:-1]:
    h = jax.nn.leaky_relu(h @ w, 0.1)
  return 0.5 * jnp.mean((h @ p[-1] - y) ** 2)


def _problem(widths, n, dtype, seed=0):
  rng = np.random.default_rng(seed)
  params = [
    jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), dtype) for a, b in zip(widths, widths[1:])
  ]
  data = (
    jnp.asarray(rng.normal(size=(n, widths[0])), dtype),
    jnp.asarray(rng.normal(size=(n, widths[-1])), dtype),
  )
  return params, data


def _symmetry(name, params, data):
  sym = {
    "rescaling": tj.PositiveRescaling(),
    "data_gl": tj.DataDependentGL(activation=LEAKY),
    "published": tj.symmetries.PublishedDataDependentGL(activation=LEAKY),
  }[name]
  return sym.bind(_loss, params, data)


def _reference_grad_norm_gradient(sym, params, data, with_data):
  """The algebra gradient of 1/2 |grad L(g . w)|^2 at the identity, by autodiff through the model."""

  def objective(xi):
    w = sym.act(params, sym.retract(xi), data if with_data else None)
    return 0.5 * sum(jnp.sum(g**2) for g in jax.tree.leaves(jax.grad(_loss)(w, data)))

  return jax.tree.leaves(jax.jit(jax.grad(objective))(sym.algebra_zeros(params)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize(
  "name,widths,n", [("rescaling", (4, 5, 3, 2), 7), ("data_gl", (4, 6, 5, 2), 3)]
)
def test_the_gradient_norm_feature_is_the_exact_algebra_gradient_of_the_published_objective(
  name, widths, n, dtype
):
  params, data = _problem(widths, n, dtype)
  sym = _symmetry(name, params, data)
  with_data = sym.needs_data
  grads = jax.grad(_loss)(params, data)
  feats = jax.jit(L.algebra_features, static_argnums=0)(
    sym, params, grads, _loss(params, data), data if with_data else None
  )
  ref = _reference_grad_norm_gradient(sym, params, data, with_data)
  assert len(feats.leaves) == len(ref)
  rtol = 2e-4 if dtype == jnp.float32 else 1e-9
  for f, s, r in zip(feats.leaves, feats.log_scales, ref):
    assert f.shape == (len(L.FEATURES), *r.shape) and f.dtype == dtype
    np.testing.assert_allclose(f[1] * jnp.exp(s[1]), r, rtol=rtol, atol=rtol * np.abs(r).max())
    # each feature is scale-free: unit root mean square over its leaf; ``cross`` of a linear
    # action vanishes identically (the gradient is orthogonal to the orbit) and reads as zero,
    # not as its normalised rounding noise
    rms = jnp.sqrt(jnp.mean(f**2, axis=tuple(range(1, f.ndim))))
    linear = name == "rescaling"
    np.testing.assert_allclose(rms, [1, 1, 0 if linear else 1], rtol=1e-5)


def test_the_weights_feature_is_the_norm_balancing_direction_of_a_rescaling():
  params, data = _problem((3, 4, 2), 5, jnp.float64)
  sym = _symmetry("rescaling", params, data)
  feats = L.algebra_features(sym, params, jax.grad(_loss)(params, data), 0.0)
  (f,), (s,) = feats.leaves, feats.log_scales
  # d/dxi_i <w, T_w(xi)>: incoming minus outgoing squared norms of neuron i
  expect = jnp.sum(params[0] ** 2, axis=0) - jnp.sum(params[1] ** 2, axis=1)
  np.testing.assert_allclose(f[0] * jnp.exp(s[0]), expect, rtol=1e-10)


def _permute_units(f, perm):
  """Applies a permutation of units to a feature leaf ``(K, d)`` or ``(K, d, d)``."""
  if f.ndim == 3:
    return f[:, perm][:, :, perm]
  return f[:, perm]


@pytest.mark.parametrize("shape", [(6,), (5, 5), (2, 4, 4)])
def test_the_equivariant_policy_permutes_its_output_with_the_units_and_runs_at_any_width(shape):
  policy = L.make_policy(L.PolicyConfig(hidden=8, lr_range=(1e-4, 1e-1)))
  rng = np.random.default_rng(1)
  f = jnp.asarray(rng.normal(size=(len(L.FEATURES), *shape)), jnp.float32)
  s = jnp.asarray(rng.normal(size=(len(L.FEATURES),)), jnp.float32)

  def run(f):
    return policy(L.PolicyInputs(L.Features((f,), (s,), jnp.float32(1.0)), None))

  out = run(f)
  assert out.xi[0].shape == shape and 1e-4 <= float(out.lr) <= 1e-1
  assert float(jnp.sqrt(jnp.mean(out.xi[0] ** 2))) <= policy.config.max_rms * (1 + 1e-6)
  d = shape[-1]
  perm = np.roll(np.arange(d), 2)
  if len(shape) == 3:  # heads: units permute inside each head
    permuted = run(f[:, :, perm][:, :, :, perm]).xi[0]
    np.testing.assert_allclose(permuted, out.xi[0][:, perm][:, :, perm], rtol=1e-5, atol=1e-9)
  else:
    permuted = run(_permute_units(f, perm)).xi[0]
    expect = out.xi[0][perm][:, perm] if len(shape) == 2 else out.xi[0][perm]
    np.testing.assert_allclose(permuted, expect, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(out.lr, run(_permute_units(f, perm)).lr, rtol=1e-6)
  # the same weights at another width
  wider = jnp.asarray(rng.normal(size=(len(L.FEATURES), *shape[:-1], 2 * d)), jnp.float32)
  if len(shape) >= 2:
    wider = jnp.asarray(rng.normal(size=(len(L.FEATURES), *shape[:-2], 2 * d, 2 * d)), jnp.float32)
  assert np.isfinite(np.asarray(run(wider).xi[0])).all()


@functools.cache
def _teleporting_step(kind, scale, group="data_gl"):
  """A jitted train step of ``learned_teleport`` on a small MLP (sgd 0.05)."""
  params, data = _problem((4, 6, 5, 2), 3, jnp.float32)
  sym = _symmetry(group, params, data)
  policy = L.make_policy(L.PolicyConfig(kind=kind, hidden=8, max_rms=scale), sym, params)
  opt = L.learned_teleport(optax.sgd(0.05), sym, policy)

  def value_fn(p, x, y):
    return _loss(p, (x, y))

  @jax.jit
  def step(p, state):
    v, g = jax.value_and_grad(_loss)(p, data)
    u, state = opt.update(g, state, p, value=v, value_fn=value_fn, x=data[0], y=data[1])
    return optax.apply_updates(p, u), state

  return step, opt.init(params), params, data


@pytest.mark.parametrize("kind", ["equivariant", "lstm"])
def test_learned_teleports_keep_the_loss_and_are_counted(kind):
  step, state, params, data = _teleporting_step(kind, 1e-2)
  p = params
  for _ in range(4):
    p, state = step(p, state)
  # every step after the first moved (schedule every(1) fires from step 1)
  assert int(state.num_teleports) == 3 and int(state.num_rejected) == 0
  assert int(state.status) == int(tj.TeleportStatus.SUCCESSFUL)
  assert 0 <= float(state.max_rel_loss_drift) <= tj.default_rtol(jnp.float32)
  # the move itself is exact: applying the same policy once keeps the loss
  grads = jax.grad(_loss)(params, data)
  sym = _symmetry("data_gl", params, data)
  policy = L.make_policy(L.PolicyConfig(kind=kind, hidden=8, max_rms=1e-2), sym, params)
  mv = jax.jit(
    lambda p, g: L.learned_move(policy, sym, p, g, _loss(p, data), policy.initial_carry(), data)
  )(params, grads)
  np.testing.assert_allclose(_loss(mv.params, data), _loss(params, data), rtol=2e-5)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(mv.params, params))
  assert moved > 1e-4
  np.testing.assert_allclose(
    jax.tree.leaves(mv.grads)[0], jax.tree.leaves(jax.grad(_loss)(mv.params, data))[0], atol=1e-4
  )


def test_a_move_that_breaks_the_loss_is_refused_and_the_parameters_kept():
  # the published first-order action is not loss-invariant: its moves are refused
  step, state, params, data = _teleporting_step("equivariant", 0.1, "published")
  plain = jax.jit(lambda p: jax.tree.map(lambda w, g: w - 0.05 * g, p, jax.grad(_loss)(p, data)))
  p = q = params
  for _ in range(3):
    p, state = step(p, state)
    q = plain(q)
  assert int(state.num_rejected) == 2 and int(state.num_teleports) == 0
  assert int(state.status) == int(tj.TeleportStatus.LOSS_DRIFT)
  assert float(state.max_rel_loss_drift) == 0.0  # over accepted moves only
  # refused moves leave plain SGD steps
  for a, b in zip(p, q):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_proposed_step_size_scales_the_wrapped_optimizers_step():
  params, data = _problem((3, 4, 2), 5, jnp.float64)
  sym = _symmetry("rescaling", params, data)
  policy = L.make_policy(L.PolicyConfig(max_rms=1e-12, lr_range=(0.01, 0.02)))
  opt = L.learned_teleport(optax.sgd(1.0), sym, policy, schedule=100)
  state = opt.init(params)
  g = jax.grad(_loss)(params, data)
  u, state = opt.update(
    g, state, params, value_fn=lambda p, x, y: _loss(p, (x, y)), x=data[0], y=data[1]
  )
  lr = float(state.lr)
  assert 0.01 <= lr <= 0.02 and int(state.status) == int(tj.TeleportStatus.SKIPPED)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(g)):
    np.testing.assert_allclose(a, -lr * b, rtol=1e-10)


@pytest.mark.parametrize("group", ["rescaling", "data_gl"])
def test_meta_trainings_optimizer_step_is_the_step_the_wrapper_takes(group):
  # a policy is meta-trained on the move it will make: optimizer_step around Adam (its
  # state transported at every move) and learned_teleport around the same Adam agree
  params, data = _problem((4, 6, 5, 2), 9, jnp.float64)
  sym = _symmetry(group, params, data)
  policy = L.make_policy(L.PolicyConfig(hidden=8, max_rms=3e-2, move_init=0.5, lr_range=(0.5, 2.0)))
  adam = optax.adam(1e-2)
  family = L.TaskFamily(None, _loss, sym)
  step = jax.jit(L.optimizer_step(policy, family, adam))
  opt = L.learned_teleport(adam, sym, policy, schedule=tj.every(1, start=0), rtol=1e-6)
  value_fn = lambda p, x, y: _loss(p, (x, y))  # noqa: E731
  state = L.optimizer_carry(policy, adam)(params)
  p, q, ostate = params, params, opt.init(params)
  update = jax.jit(lambda g, s, w: opt.update(g, s, w, value_fn=value_fn, x=data[0], y=data[1]))
  for _ in range(4):
    (p, state), _ = step((p, state), data)
    u, ostate = update(jax.grad(_loss)(q, data), ostate, q)
    q = optax.apply_updates(q, u)
  assert int(ostate.num_teleports) == 4
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(p, params)) > 1e-3


@pytest.mark.parametrize("move_init", [0.02, 0.5])
def test_a_new_equivariant_policy_moves_by_its_initial_fraction_of_the_largest_move(move_init):
  params, data = _problem((4, 6, 5, 2), 3, jnp.float64)
  sym = _symmetry("data_gl", params, data)
  policy = L.make_policy(L.PolicyConfig(hidden=8, max_rms=1e-2, move_init=move_init))
  grads = jax.grad(_loss)(params, data)
  mv = jax.jit(lambda p, g: L.learned_move(policy, sym, p, g, _loss(p, data), (), data))(
    params, grads
  )
  for xi in mv.proposal.xi:
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(xi**2)), move_init * 1e-2, rtol=1e-6)


def test_the_wrapper_names_what_is_wrong():
  sym = tj.PositiveRescaling()
  policy = L.make_policy(L.PolicyConfig())
  with pytest.raises(TypeError, match="symmetry"):
    L.learned_teleport(optax.sgd(0.1), "rescaling", policy)
  with pytest.raises(TypeError, match="policy"):
    L.learned_teleport(optax.sgd(0.1), sym, lambda x: x)
  with pytest.raises(ValueError, match="state_policy"):
    L.learned_teleport(optax.sgd(0.1), sym, policy, state_policy="reset")
  with pytest.raises(ValueError, match="lr_range"):
    L.PolicyConfig(lr_range=(0.1, 0.01))
  with pytest.raises(ValueError, match="kind"):
    L.PolicyConfig(kind="transformer")
  with pytest.raises(ValueError, match="lstm"):
    L.make_policy(L.PolicyConfig(kind="lstm"))
  with pytest.raises(ValueError, match="multiple of unroll"):
    L.MetaConfig(unroll=3, horizon=10)
  with pytest.raises(ValueError, match="move_init"):
    L.PolicyConfig(move_init=1.0)
  with pytest.raises(ValueError, match="clip"):
    L.MetaConfig(clip=0.0)
  with pytest.raises(ValueError, match="base_lr"):
    L.inner_step(policy, L.TaskFamily(None, _loss, sym), base_lr=None)
  with pytest.raises(ValueError, match="meta_lr_final"):
    L.MetaConfig(meta_lr=1e-3, meta_lr_final=1e-2)
  opt = L.learned_teleport(optax.sgd(0.1), sym, policy)
  params = [jnp.ones((2, 3)), jnp.ones((3, 1))]
  with pytest.raises(ValueError, match="value_fn"):
    opt.update(params, opt.init(params), params)


def test_the_policy_applies_to_a_discovered_symmetry_of_a_flax_model():
  m = models.cnn(
    channels=(3, 4), dense=(5, 3), activation="relu", pool="max", image=(6, 6, 1), batch=2
  )
  sym = tj.find_symmetries(m.apply, m.params, m.inputs)

  def loss(p, x):
    return jnp.mean(m.apply(p, x) ** 2)

  grads = jax.grad(loss)(m.params, m.inputs)
  policy = L.make_policy(L.PolicyConfig(hidden=8, max_rms=1e-3))
  mv = jax.jit(lambda p, g: L.learned_move(policy, sym, p, g, loss(p, m.inputs)))(m.params, grads)
  np.testing.assert_allclose(loss(mv.params, m.inputs), loss(m.params, m.inputs), rtol=1e-5)
  assert any(
    float(jnp.max(jnp.abs(a - b))) > 0
    for a, b in zip(jax.tree.leaves(mv.params), jax.tree.leaves(m.params))
  )


@pytest.mark.parametrize("kind", ["equivariant", "lstm"])
def test_a_saved_policy_loads_with_its_configuration_and_weights(kind, tmp_path):
  params, data = _problem((4, 6, 5, 2), 3, jnp.float32)
  sym = _symmetry("data_gl", params, data)
  cfg = L.PolicyConfig(kind=kind, hidden=8, lr_range=(1e-5, 1e-2), seed=3)
  policy = L.make_policy(cfg, sym, params)
  path = L.save_policy(tmp_path / "p.msgpack", policy)
  loaded = L.load_policy(path)
  assert loaded.config == cfg and type(loaded) is type(policy)
  for a, b in zip(
    jax.tree.leaves(nnx.state(policy, nnx.Param)), jax.tree.leaves(nnx.state(loaded, nnx.Param))
  ):
    np.testing.assert_array_equal(a, b)
  (tmp_path / "bad").write_bytes(b"\x80")
  with pytest.raises(ValueError, match="not a policy"):
    L.load_policy(tmp_path / "bad")


def test_meta_training_lowers_the_meta_loss_of_a_family_of_runs():
  def sample(key):
    # one fixed task: every horizon restarts the same run; with two tasks staggered over two
    # unrolls, every meta-step after the first holds one run's first unroll and its second
    del key
    k = jax.random.split(jax.random.key(7), 4)
    p = [jax.random.uniform(k[0], (5, 5)), jax.random.uniform(k[1], (5, 5))]
    return p, (jax.random.uniform(k[2], (5, 5)), jax.random.uniform(k[3], (5, 5)))

  def loss(p, data):
    x, y = data
    return 0.5 * jnp.sum((jax.nn.leaky_relu(x @ p[0], 0.1) @ p[1] - y) ** 2)

  p0, d0 = sample(jax.random.key(0))
  sym = tj.DataDependentGL(activation=LEAKY).bind(loss, p0, d0)
  family = L.TaskFamily(sample, loss, sym)
  policy = L.make_policy(L.PolicyConfig(hidden=8, max_rms=1e-3, lr_range=(1e-4, 3e-2)))
  seen = []
  before = [np.array(a) for a in jax.tree.leaves(nnx.state(policy, nnx.Param))]
  res = L.meta_train(
    policy,
    family,
    L.MetaConfig(tasks=2, unroll=5, horizon=10, meta_steps=12, meta_lr=3e-2),
    callback=lambda i, v: seen.append(i),
  )
  losses = np.asarray(res.losses)
  assert seen == list(range(12)) and np.isfinite(losses).all()
  # the same two unrolls of the same run, early and late in meta-training
  assert losses[-1] < losses[1]
  assert res.seconds >= res.compile_seconds > 0
  # the policy passed in is unchanged
  after = jax.tree.leaves(nnx.state(policy, nnx.Param))
  assert all(np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("penalty", [0.0, 0.5])
def test_the_norm_penalty_charges_the_growth_of_the_parameters_norm_over_an_unroll(penalty):
  # a step that doubles the parameters at a constant loss of 1: the meta-loss is the
  # penalty alone, penalty * log(4 ** unroll)
  def sample(key):
    return [jnp.ones((3, 2)), jnp.full((2, 1), 0.5)], jnp.zeros(())

  family = L.TaskFamily(sample, lambda p, d: jnp.ones(()), tj.PositiveRescaling())

  def step(module):
    def fn(state, data):
      params, carry = state
      return (jax.tree.map(lambda a: 2 * a, params), carry), jnp.ones(())

    return fn

  res = L.meta_train(
    L.make_policy(L.PolicyConfig(hidden=4)),
    family,
    L.MetaConfig(tasks=2, unroll=3, horizon=6, meta_steps=2, norm_penalty=penalty),
    step=step,
  )
  np.testing.assert_allclose(np.asarray(res.losses), penalty * 3 * np.log(4.0), rtol=1e-5)
  with pytest.raises(ValueError, match="norm_penalty"):
    L.MetaConfig(norm_penalty=-1.0)


@pytest.mark.parametrize("group", ["rescaling", "data_gl"])
def test_the_transported_and_the_recomputed_gradient_give_the_same_step(group):
  params, data = _problem((4, 6, 5, 2), 3, jnp.float64)
  sym = _symmetry(group, params, data)
  policy = L.make_policy(L.PolicyConfig(hidden=8, max_rms=1e-2))
  kw = dict(value_fn=lambda p, x, y: _loss(p, (x, y)), x=data[0], y=data[1])
  g = jax.grad(_loss)(params, data)
  steps = {}
  # the first step does not move (every(1) fires from step 1): the second one does
  for how in ("transport", "recompute"):
    opt = L.learned_teleport(optax.sgd(0.1), sym, policy, gradient=how)
    state = opt.init(params)
    _, state = opt.update(g, state, params, **kw)
    # value= (optax's convention) in float64: compared in float64, nothing refused
    steps[how], state = opt.update(g, state, params, value=_loss(params, data), **kw)
    assert int(state.num_teleports) == 1 and int(state.num_rejected) == 0
  for a, b in zip(steps["transport"], steps["recompute"]):
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)
  with pytest.raises(ValueError, match="gradient"):
    L.learned_teleport(optax.sgd(0.1), sym, policy, gradient="exact")

"""with_teleport inside optax chains and jitted train steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp_apply
from test_solver import published_problem

import teleport_jax as tj

ACT = tj.activations.leaky_relu(0.1)
SYM = tj.DataDependentGL(activation=ACT)


def value_fn(params, x, y):
  return 0.5 * jnp.sum((y - mlp_apply(params, x, ACT, "out_in")) ** 2)


def make_step(opt):
  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(value_fn)(params, x, y)
    updates, state = opt.update(grads, state, params, value_fn=value_fn, x=x, y=y)
    return optax.apply_updates(params, updates), state, loss

  return step


def train(opt, params, data, steps):
  step = make_step(opt)
  state = opt.init(params)
  losses, infos = [], []
  for _ in range(steps):
    params, state, loss = step(params, state, *data)
    losses.append(float(loss))
    infos.append(state)
  return params, state, np.asarray(losses), step


@pytest.mark.parametrize(
  "make_opt,lr",
  [(optax.sgd, 1e-4), (optax.adagrad, 1e-1), (optax.adam, 1e-3)],
  ids=["sgd", "adagrad", "adam"],
)
def test_chain_with_common_optimizers_teleports_on_schedule_under_jit(make_opt, lr):
  params, data = published_problem(0)
  opt = optax.chain(
    tj.with_teleport(
      optax.chain(optax.identity(), make_opt(lr)),
      SYM,
      schedule=tj.schedules.at_steps([2, 5]),
      num_steps=3,
      stability=False,
    ),
  )
  new_params, state, losses, step = train(opt, params, data, 8)
  tstate = state[0]
  assert int(tstate.count) == 8
  assert int(tstate.num_teleports) + int(tstate.num_rejected) == 2
  assert int(tstate.num_teleports) >= 1
  assert np.all(np.isfinite(losses))
  assert step._cache_size() == 1  # one compilation for all steps, teleport or not
  # the teleport itself keeps the loss: recorded drift is within tolerance
  assert float(tstate.max_rel_loss_drift) <= tj.default_rtol(jnp.float32)


def test_update_between_teleports_is_exactly_the_inner_optimizer():
  params, data = published_problem(1)
  inner = optax.adam(1e-3)
  opt = tj.with_teleport(inner, SYM, schedule=tj.schedules.at_steps([100]))
  p1, _, l1, _ = train(opt, params, data, 5)
  p2, _, l2, _ = train(inner, params, data, 5)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(p1, p2):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_teleport_step_moves_params_along_orbit_then_takes_inner_step():
  params, data = published_problem(2)
  lr = 1e-4
  objective = tj.objectives.lookahead_loss(lr, 2)
  opt = tj.with_teleport(optax.sgd(lr), SYM, schedule=[0], num_steps=3, objective=objective)
  state = opt.init(params)
  grads = jax.grad(value_fn)(params, *data)
  updates, state = opt.update(grads, state, params, value_fn=value_fn, x=data[0], y=data[1])
  assert bool(state.info.accepted)
  new = optax.apply_updates(params, updates)
  expected, _ = tj.teleport(
    lambda p, d: value_fn(p, *d), params, data, symmetry=SYM, num_steps=3, objective=objective
  )
  g_expected = jax.grad(value_fn)(expected, *data)
  for a, b, g in zip(new, expected, g_expected):
    np.testing.assert_allclose(a, b - lr * g, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("policy", ["keep", "reset"])
def test_state_policy_keep_or_reset(policy):
  params, data = published_problem(3)
  opt = tj.with_teleport(
    optax.adam(1e-3), SYM, schedule=tj.schedules.at_steps([3]), num_steps=2, state_policy=policy
  )
  _, state, _, _ = train(opt, params, data, 4)
  adam_state = state.inner_state[0]
  assert int(state.num_teleports) == 1
  # adam's count restarts at the teleport with "reset" (init, then one update)
  assert int(adam_state.count) == (4 if policy == "keep" else 1)


@pytest.mark.slow
def test_schedules_every_and_first():
  params, data = published_problem(4)
  for schedule, expected in (
    (tj.every(3), 1),
    (tj.every(3, start=0), 2),
    (tj.schedules.first(2), 2),
    (2, 2),
    (tj.every(2, start=1, stop=5), 2),
  ):
    opt = tj.with_teleport(optax.sgd(1e-5), tj.PositiveRescaling(), schedule=schedule, num_steps=1)
    _, state, _, _ = train(opt, params, data, 6)
    assert int(state.num_teleports) + int(state.num_rejected) == expected, schedule


@pytest.mark.parametrize("k", [1, 3, 7])
def test_an_int_schedule_first_fires_after_k_steps_not_on_a_fresh_state(k):
  for schedule in (tj.schedules.as_schedule(k), tj.every(k)):
    fires = [c for c in range(3 * k + 1) if bool(schedule(jnp.asarray(c)))]
    assert fires == [k, 2 * k, 3 * k]
  assert bool(tj.every(k, start=0)(jnp.asarray(0)))  # a fresh-state teleport is opt-in


def test_changing_schedule_values_does_not_recompile():
  params, data = published_problem(5)
  opt_a = tj.with_teleport(
    optax.sgd(1e-5), tj.PositiveRescaling(), schedule=tj.every(2), num_steps=1
  )
  step = make_step(opt_a)
  state = opt_a.init(params)
  params1, state, _ = step(params, state, *data)
  state = state._replace(schedule=tj.every(5))
  params1, state, _ = step(params1, state, *data)
  assert step._cache_size() == 1


def test_accepts_unknown_extra_keywords_in_a_chain():
  params, data = published_problem(6)
  opt = tj.with_teleport(optax.sgd(1e-4), SYM, schedule=[0], num_steps=1)
  state = opt.init(params)
  grads = jax.grad(value_fn)(params, *data)
  _, state = opt.update(
    grads, state, params, value_fn=value_fn, x=data[0], y=data[1], some_other_link_arg=3
  )
  assert int(state.count) == 1


def test_vmap_over_seeds_of_a_teleporting_train_step():
  opt = tj.with_teleport(optax.sgd(1e-4), SYM, schedule=[0], num_steps=2)

  def run(params, x, y):
    state = opt.init(params)
    grads = jax.grad(value_fn)(params, x, y)
    updates, state = opt.update(grads, state, params, value_fn=value_fn, x=x, y=y)
    return state.info.accepted, state.info.grad_norm_sq_after

  problems = [published_problem(s) for s in range(3)]
  params = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[p for p, _ in problems])
  xs = jnp.stack([d[0] for _, d in problems])
  ys = jnp.stack([d[1] for _, d in problems])
  accepted, gn = jax.jit(jax.vmap(run))(params, xs, ys)
  assert accepted.shape == (3,) and bool(jnp.all(accepted))


def test_teleport_speeds_up_early_gd_on_published_problem():
  params, data = published_problem(0)
  lr = 1e-4
  plain = train(optax.sgd(lr), params, data, 50)[2]
  tele = train(
    tj.with_teleport(
      optax.sgd(lr), SYM, schedule=[5], num_steps=10, objective=tj.objectives.lookahead_loss(lr, 1)
    ),
    params,
    data,
    50,
  )[2]
  assert tele[-1] < plain[-1]


@pytest.mark.slow
def test_flax_linen_and_nnx_models_train_with_teleport():
  import flax.linen as nn
  from flax import nnx

  x = jax.random.normal(jax.random.key(0), (6, 8))
  y = jax.random.normal(jax.random.key(1), (6, 2))

  class Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.leaky_relu(nn.Dense(8)(x), 0.1)
      x = nn.leaky_relu(nn.Dense(8)(x), 0.1)
      return nn.Dense(2)(x)

  model = Linen()
  params = model.init(jax.random.key(2), x)
  vf = lambda p, x, y: jnp.mean((model.apply(p, x) - y) ** 2)
  opt = optax.chain(
    tj.with_teleport(
      optax.adam(1e-2),
      tj.DataDependentGL(activation=ACT),
      schedule=tj.schedules.at_steps([1]),
      num_steps=3,
    )
  )
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(vf)(p, x, y)
    u, s = opt.update(g, s, p, value_fn=vf, x=x, y=y)
    return optax.apply_updates(p, u), s, loss

  for _ in range(3):
    params, state, _ = step(params, state)
  assert int(state[0].num_teleports) == 1

  class NNX(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(8, 8, rngs=rngs)
      self.b = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
      return self.b(nnx.leaky_relu(self.a(x), 0.1))

  graphdef, params = nnx.split(NNX(nnx.Rngs(0)), nnx.Param)
  vf2 = lambda p, x, y: jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)
  opt = tj.with_teleport(optax.sgd(1e-2), tj.PositiveRescaling(), schedule=[0], num_steps=3)
  state = opt.init(params)
  loss0, g = jax.value_and_grad(vf2)(params, x, y)
  u, state = jax.jit(lambda g, s, p: opt.update(g, s, p, value_fn=vf2, x=x, y=y))(g, state, params)
  params = optax.apply_updates(params, u)
  assert int(state.num_teleports) == 1
  assert float(vf2(params, x, y)) < float(loss0)


def test_adam_lookahead_teleports_when_some_coordinates_have_zero_gradient():
  # A feature that is zero on every sample gives its first-layer weights an exactly
  # zero gradient, so Adam's second moment stays 0 there; differentiating the
  # simulated Adam steps must not turn sqrt'(0) into a NaN for the whole teleport.
  params, (x, y) = published_problem(0)
  x = x.at[0].set(0.0)
  opt = tj.with_teleport(optax.adam(1e-3), tj.PositiveRescaling(), schedule=[0, 3], num_steps=3)
  _, state, losses, _ = train(opt, params, (x, y), 4)
  assert np.all(np.isfinite(losses))
  assert int(state.num_teleports) == 2, tj.status_message(state.info)


@pytest.mark.parametrize(
  "backend", [pytest.param("linesearch", marks=pytest.mark.slow), "gradbalance"]
)
def test_teleport_on_a_sub_batch_is_exact_on_the_whole_batch(backend):
  import functools

  from conftest import random_mlp

  params = random_mlp(jax.random.key(4), (5, 8, 8, 3), jnp.float64, fmt="out_in")
  x = jax.random.normal(jax.random.key(5), (5, 32), jnp.float64)
  y = jax.random.normal(jax.random.key(6), (3, 32), jnp.float64)

  def loss(p, x, y):  # examples on the leading axis, as teleport_batch reads them
    return 0.5 * jnp.mean((y.T - mlp_apply(p, x.T, ACT, "out_in")) ** 2)

  lr = 0.05
  opt = tj.with_teleport(
    optax.sgd(lr),
    tj.PositiveRescaling(),
    [0],
    solver_backend=backend,
    objective=tj.objectives.lookahead_loss(0.5, 2) if backend == "linesearch" else None,
    num_steps=4,
    teleport_batch=8,
  )
  xs, ys = x.T, y.T
  g = jax.grad(loss)(params, xs, ys)
  update = jax.jit(functools.partial(opt.update, value_fn=loss))
  u, state = update(g, opt.init(params), params, x=xs, y=ys)
  assert int(state.num_teleports) == 1
  stepped = optax.apply_updates(params, u)
  # undo the SGD step: w' = stepped + lr * grad L_full(w'), solved by fixed point from stepped
  w = stepped
  for _ in range(50):
    w = jax.tree.map(lambda s, d: s + lr * d, stepped, jax.grad(loss)(w, xs, ys))
  assert abs(float(loss(w, xs, ys)) / float(loss(params, xs, ys)) - 1) <= 1e-10
  assert any(float(jnp.max(jnp.abs(a - b))) > 1e-6 for a, b in zip(w, params))
  np.testing.assert_allclose(
    mlp_apply(w, x, ACT, "out_in"), mlp_apply(params, x, ACT, "out_in"), rtol=1e-9, atol=1e-12
  )


def test_teleport_batch_is_refused_where_a_sub_batch_would_not_be_exact():
  with pytest.raises(ValueError, match="data-free symmetry"):
    tj.with_teleport(optax.sgd(0.1), SYM, [0], teleport_batch=4)
  with pytest.raises(ValueError, match="data-free symmetry"):
    tj.with_teleport(optax.sgd(0.1), None, [0], solver_backend="nullspace", teleport_batch=4)
  with pytest.raises(ValueError, match="positive int"):
    tj.with_teleport(optax.sgd(0.1), tj.PositiveRescaling(), [0], teleport_batch=0)


@pytest.mark.slow
def test_a_python_bool_decides_the_teleport_statically_without_a_conditional():
  params, data = published_problem(2)
  lr = 1e-4
  opt = tj.with_teleport(
    optax.sgd(lr), SYM, schedule=[0], num_steps=3, objective=tj.objectives.lookahead_loss(lr, 2)
  )
  state = opt.init(params)
  grads = jax.grad(value_fn)(params, *data)

  def update(teleport, state):
    return opt.update(
      grads, state, params, value_fn=value_fn, x=data[0], y=data[1], teleport=teleport
    )

  # a step that does not teleport holds no conditional (and no teleport) at all
  assert " cond[" not in str(jax.make_jaxpr(lambda s: update(False, s))(state))
  assert " cond[" in str(jax.make_jaxpr(lambda s: update(None, s))(state))
  # False at a step the schedule would teleport: exactly the inner optimizer's step
  u, s = update(False, state)
  assert int(s.count) == 1 and int(s.num_teleports) == 0
  for a, g in zip(u, grads):
    np.testing.assert_array_equal(a, -lr * g)
  # True where the schedule would not: the same teleport as the schedule's at step 0
  u_sched, _ = opt.update(grads, state, params, value_fn=value_fn, x=data[0], y=data[1])
  u_true, s = update(True, state._replace(count=jnp.asarray(5, jnp.int32)))
  assert int(s.num_teleports) == 1 and int(s.count) == 6
  for a, b in zip(u_true, u_sched):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  with pytest.raises(TypeError, match="Python bool"):
    update(jnp.asarray(True), state)


@pytest.mark.parametrize("backend", ["lie", pytest.param("linesearch", marks=pytest.mark.slow)])
def test_warm_start_begins_the_next_search_at_the_previous_final_step_size(backend):
  from conftest import random_mlp

  params = random_mlp(jax.random.key(7), (5, 8, 8, 3), jnp.float64, fmt="out_in")
  data = (
    jax.random.normal(jax.random.key(8), (5, 16), jnp.float64),
    jax.random.normal(jax.random.key(9), (3, 16), jnp.float64),
  )
  every_step = tj.every(1, start=0)  # the first teleport on the first step
  make = {"lie": tj.solvers.Lie, "linesearch": tj.solvers.LineSearch}[backend]
  kw = dict(objective=tj.objectives.lookahead_loss(0.05, 2), num_steps=3, stability=False)
  kw["solver_backend"] = make(step_size=0.05)
  warm = tj.with_teleport(
    optax.sgd(0.05), tj.PositiveRescaling(), every_step, warm_start=True, **kw
  )
  cold = tj.with_teleport(optax.sgd(0.05), tj.PositiveRescaling(), every_step, **kw)
  step_w, step_c = make_step(warm), make_step(cold)
  s_w, s_c = warm.init(params), cold.init(params)
  # the first teleport starts at step_size either way
  p_w, s_w, _ = step_w(params, s_w, *data)
  p_c, s_c, _ = step_c(params, s_c, *data)
  for a, b in zip(p_w, p_c):
    np.testing.assert_array_equal(a, b)
  prev = float(s_w.info.final_step_size)
  assert int(s_w.num_teleports) == 1 and prev != 0.05
  # the second starts where the first ended: as a cold search from that step size
  max_step = kw["solver_backend"].max_step_size
  kw["solver_backend"] = make(step_size=min(prev, max_step))
  restart = tj.with_teleport(optax.sgd(0.05), tj.PositiveRescaling(), every_step, **kw)
  p2_w, s2_w, _ = step_w(p_w, s_w, *data)
  p2_r, _, _ = make_step(restart)(p_w, s_w, *data)
  p2_c, _, _ = step_c(p_w, s_w, *data)
  for a, b in zip(p2_w, p2_r):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
  assert any(float(jnp.max(jnp.abs(a - b))) > 1e-9 for a, b in zip(p2_w, p2_c))
  assert int(s2_w.num_teleports) == 2


def test_warm_start_needs_a_back_end_with_a_step_size():
  with pytest.raises(ValueError, match="no step size"):
    tj.with_teleport(
      optax.sgd(0.1), tj.PositiveRescaling(), 1, solver_backend="gradbalance", warm_start=True
    )
  with pytest.raises(TypeError, match="warm_start must be a bool"):
    tj.with_teleport(optax.sgd(0.1), tj.PositiveRescaling(), 1, warm_start=1)


@pytest.mark.parametrize(
  "schedule",
  [
    tj.every(1),
    tj.every(3),
    tj.every(4, start=5),
    tj.every(3, start=2, stop=11),
    tj.schedules.first(2),
    tj.schedules.at_steps([0, 7, 8, 20]),
    tj.schedules.at_steps([4], pad_to=3),
    tj.schedules.at_steps([]),
  ],
)
@pytest.mark.parametrize("num_steps", [1, 2, 5])
def test_fires_within_agrees_with_the_schedule_at_every_step_of_the_window(schedule, num_steps):
  fires = [bool(schedule(jnp.asarray(c))) for c in range(30)]
  for count in range(25):
    expected = any(fires[count : count + num_steps])
    assert tj.schedules.fires_within(schedule, count, num_steps) == expected, (count, num_steps)


def test_fires_within_refuses_a_bad_window_or_a_non_schedule():
  with pytest.raises(ValueError, match="num_steps"):
    tj.schedules.fires_within(tj.every(2), 0, 0)
  with pytest.raises(ValueError, match="count"):
    tj.schedules.fires_within(tj.every(2), -1, 3)
  with pytest.raises(TypeError, match="schedule"):
    tj.schedules.fires_within(lambda c: True, 0, 3)


def test_chunks_the_schedule_skips_can_run_without_the_conditional_with_the_same_result():
  params, data = published_problem(3)
  opt = tj.with_teleport(optax.sgd(1e-4), tj.PositiveRescaling(), schedule=tj.every(4, start=1))

  def chunk(params, state, teleport):
    def body(carry, _):
      p, s = carry
      grads = jax.grad(value_fn)(p, *data)
      u, s = opt.update(grads, s, p, value_fn=value_fn, x=data[0], y=data[1], teleport=teleport)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(body, (params, state), None, length=2)[0]

  maybe = jax.jit(lambda p, s: chunk(p, s, None))
  plain = jax.jit(lambda p, s: chunk(p, s, False))
  p_ref, s_ref = params, opt.init(params)
  p_split, s_split = params, opt.init(params)
  used = []
  for _ in range(4):  # steps 0..7: the schedule fires at 1 and 5
    p_ref, s_ref = maybe(p_ref, s_ref)
    due = tj.teleport_due(s_split, 2)
    used.append(due)
    p_split, s_split = (maybe if due else plain)(p_split, s_split)
  assert used == [True, False, True, False]
  assert int(s_split.num_teleports) == int(s_ref.num_teleports) == 2
  assert int(s_split.count) == 8
  # a TeleportState inside a larger state (a chain's tuple, a dict) is found
  assert tj.teleport_due({"opt": (optax.EmptyState(), s_split)}, 2)  # fires at 9
  assert not tj.teleport_due((s_split,), 1)
  for a, b in zip(jax.tree.leaves(p_split), jax.tree.leaves(p_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  with pytest.raises(TypeError, match="TeleportState"):
    tj.teleport_due(optax.sgd(0.1).init(params), 2)
  with pytest.raises(ValueError, match="num_steps"):
    tj.teleport_due(s_split, 0)

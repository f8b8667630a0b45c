"""find_symmetries: discovered sites, analytic dimensions, exact invariance, reports, errors."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import teleport_jax as tj
from teleport_jax import models as zoo
from teleport_jax._src.discovery.discovery import Discovered
from teleport_jax._src.discovery.discovery import find_symmetries
from teleport_jax._src.discovery.discovery import verify

FRAMEWORKS = ("linen", "nnx")
# invariance and group laws: relative, per dtype (the acceptance bounds)
TOL = {jnp.float32: 1e-5, jnp.float64: 1e-12}

TINY_T = dict(vocab=16, d_model=8, heads=2, layers=2, context=4, mlp_ratio=2, batch=2)


def _transformer_dim(c, *, mlp, norm, positions, kv_heads=None) -> int:
  """Analytic dimension of the zoo transformer's symmetry group."""
  d, h, layers = c["d_model"], c["heads"], c["layers"]
  dh, kv, hidden = d // h, kv_heads or h, c["mlp_ratio"] * d
  qk = kv * dh if positions == "rotary" else kv * dh * dh  # rotary: 2 per pair of channels
  vo = kv * dh * dh  # GL(d_head) per key/value head
  per_layer = qk + vo
  if norm in ("layernorm", "rmsnorm"):
    per_layer += 2 * d  # the two norm gains into the dense layers reading them
  if mlp in ("relu", "reglu", "swiglu"):
    per_layer += hidden  # ReLU hidden units / the linear value branch of a GLU
  total = layers * per_layer
  if norm in ("layernorm", "rmsnorm"):
    total += d  # the final norm's gain into the unembedding
  else:
    total += d * (d - 1) // 2  # one rotation of the whole residual stream
  return total


# name -> (constructor, kwargs, analytic dimension)
CASES = {
  "mlp": (zoo.mlp, dict(widths=(4, 6, 5, 3), activation="relu", batch=4), 6 + 5),
  # Conv-ReLU-pool x2, Dense-ReLU-Dense: every channel through a ReLU
  "cnn": (zoo.cnn, dict(channels=(2, 3), dense=(5, 3), image=(4, 4, 1), batch=4), 2 + 3 + 5),
  # BatchNorm in train mode: conv channels are scale invariant, the gains feed the next layer
  "cnn_batchnorm": (
    zoo.cnn,
    dict(channels=(2, 3), dense=(5, 3), image=(4, 4, 1), batch=4, batchnorm=True),
    2 * (2 + 3) + 5,
  ),
  # GL on the residual stream (linear between writers and readers) + ReLU units per block
  "residual_mlp": (
    zoo.residual_mlp,
    dict(width=4, blocks=2, in_features=3, out_features=2, batch=4),
    4 * 4 + 2 * 4,
  ),
  "transformer": (
    zoo.transformer,
    dict(TINY_T),
    _transformer_dim(TINY_T, mlp="gelu", norm="layernorm", positions="learned"),
  ),
  "transformer_relu_rms": (
    zoo.transformer,
    dict(TINY_T, mlp="relu", norm="rmsnorm_gainfree"),
    _transformer_dim(TINY_T, mlp="relu", norm="rmsnorm_gainfree", positions="learned"),
  ),
  "transformer_reglu_rms": (
    zoo.transformer,
    dict(TINY_T, mlp="reglu", norm="rmsnorm_gainfree"),
    _transformer_dim(TINY_T, mlp="reglu", norm="rmsnorm_gainfree", positions="learned"),
  ),
  "transformer_rotary": (
    zoo.transformer,
    dict(TINY_T, positions="rotary"),
    _transformer_dim(TINY_T, mlp="gelu", norm="layernorm", positions="rotary"),
  ),
  "transformer_gqa": (
    zoo.transformer,
    dict(TINY_T, heads=4, kv_heads=2, d_model=8),
    _transformer_dim(
      dict(TINY_T, heads=4), mlp="gelu", norm="layernorm", positions="learned", kv_heads=2
    ),
  ),
  # GL(r) per LoRA pair + the ReLU hidden units (the base kernel and B both write them)
  "lora": (zoo.lora_mlp, dict(widths=(4, 6, 3), rank=2, batch=4), 2 * 2**2 + 6),
}
# float64 discoveries (the others check float64 invariance with the float32 discovery: sites
# depend on the architecture, not on the dtype)
F64_DISCOVERIES = ("cnn_batchnorm", "transformer_relu_rms")


@functools.cache
def model(name: str, framework: str, dtype=jnp.float32):
  make, kwargs, _ = CASES[name]
  return make(framework=framework, dtype=dtype, **kwargs)


@functools.cache
def discovered(name: str, framework: str, dtype=jnp.float32):
  m = model(name, framework, dtype)
  return m, find_symmetries(m.apply, m.params, m.inputs)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _tree_rel(a, b) -> float:
  errs = [
    _rel(x, y)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    if jnp.issubdtype(jnp.asarray(y).dtype, jnp.floating)
  ]
  return max(errs) if errs else 0.0


def _random_xi(sym, params, seed, scale=0.3):
  zeros = sym.algebra_zeros(params)
  leaves, treedef = jax.tree_util.tree_flatten(zeros)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for k, z in zip(keys, leaves):
    n = z.shape[-1] if z.ndim >= 2 and z.shape[-1] == z.shape[-2] else 1
    out.append(scale / math.sqrt(n) * jax.random.normal(k, z.shape, z.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------- the zoo
@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("name", list(CASES))
def test_dimension_matches_the_analytic_count(name, framework):
  m, d = discovered(name, framework)
  assert isinstance(d, Discovered) and isinstance(d, tj.symmetries.Product)
  assert d.dimension == CASES[name][2], str(d)
  assert not d.rejected, str(d)
  assert len(d.sites) == len(d.parts) == len(d.checks)


# float64 for one model of each kind in the default run, for every model with -m slow
FLOAT64_FAST = ("mlp", "cnn_batchnorm", "transformer", "lora")


@pytest.mark.parametrize(
  "name, framework, dtype",
  [(n, f, jnp.float32) for n in CASES for f in FRAMEWORKS]
  + [
    (n, "linen", jnp.float64)
    if n in FLOAT64_FAST
    else pytest.param(n, "linen", jnp.float64, marks=pytest.mark.slow)
    for n in CASES
  ],
)
def test_outputs_are_unchanged_under_random_elements(name, framework, dtype):
  m = model(name, framework, dtype)
  _, d = discovered(name, framework, dtype if name in F64_DISCOVERIES else jnp.float32)
  g = d.retract(_random_xi(d, m.params, 0))
  moved = tj.group_action(m.params, g, symmetry=d)
  assert _tree_rel(moved, m.params) > 1e-3  # the element really moves the parameters
  assert _rel(m.apply(moved, m.inputs), m.apply(m.params, m.inputs)) <= TOL[dtype], str(d)


@pytest.mark.parametrize(
  "name, dtype",
  [(n, jnp.float32) for n in ("mlp", "cnn_batchnorm", "transformer_rotary", "transformer_gqa")]
  + [(n, jnp.float64) for n in ("cnn_batchnorm", "transformer_relu_rms", "lora")],
)
def test_group_laws(name, dtype):
  m = model(name, "linen", dtype)
  _, d = discovered(name, "linen", dtype if name in F64_DISCOVERIES else jnp.float32)
  p = m.params
  tol = TOL[dtype]
  assert _tree_rel(tj.group_action(p, d.identity(p), symmetry=d), p) <= tol
  g1 = d.exp(_random_xi(d, p, 1))
  g2 = d.retract(_random_xi(d, p, 2))
  back = d.act(d.act(p, g1), d.inverse(g1))
  assert _tree_rel(back, p) <= tol
  two_steps = d.act(d.act(p, g1), g2)
  assert _tree_rel(d.act(p, d.compose(g1, g2)), two_steps) <= tol


def test_report_names_sites_groups_errors_and_untouched_leaves():
  m, d = discovered("transformer", "linen")
  text = str(d)
  assert text == d.report()
  for heading in ("site", "group", "dim", "output err", "1st-order err", "untouched leaves"):
    assert heading in text
  assert "GL(4) x 2 heads" in text  # queries/keys and values/outputs, per head
  assert "blocks_0/attn/query -> blocks_0/attn/key" in text
  # the GELU MLP and the LayerNorm'd residual stream carry no continuous symmetry
  assert "GELU" in d.untouched["params/blocks_0/mlp/up/bias"]
  assert "LayerNorm" in d.untouched["params/embed/embedding"]
  assert all(r for r in d.untouched.values())
  for c in d.checks:
    assert c.ok and c.output_error < d.output_tol and c.first_order_error < d.first_order_tol


def test_rotary_attention_gets_two_by_two_blocks_and_gqa_one_element_per_group():
  _, rot = discovered("transformer_rotary", "linen")
  groups = {type(p.group).__name__ for p in rot.parts}
  assert "RotaryGL" in groups
  _, gqa = discovered("transformer_gqa", "nnx")
  assert [p.site.name for p in gqa.parts if "query ->" in p.site.name]
  qk = [p for p in gqa.parts if p.site.name.endswith("attn/query -> blocks/0/attn/key")]
  assert len(qk) == 1 and qk[0].site.heads == 2  # kv_heads, not the 4 query heads


def test_residual_stream_of_gain_free_rms_norms_is_one_rotation():
  _, d = discovered("transformer_relu_rms", "linen")
  rotations = [p for p in d.parts if isinstance(p.group, tj.groups.Orthogonal)]
  assert len(rotations) == 1
  writers = {s.path[-2] for s in rotations[0].site.writers}
  assert {"embed", "pos_embed", "out", "down"} <= writers


# ------------------------------------------------------ what must not be found
class _ViTLike(nn.Module):
  """Patch embedding, attention blocks, an MLP head: names Dense_0 ... Dense_6."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8)(x)
    for _ in range(2):
      h = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=2)(h, h)
      h = nn.LayerNorm()(x)
      x = x + nn.Dense(8)(nn.gelu(nn.Dense(12)(h)))
    x = nn.relu(nn.Dense(10)(x.mean(axis=1)))
    return nn.Dense(3)(x)


def test_vit_like_tree_is_not_read_as_one_mlp_chain():
  x = jax.random.normal(jax.random.key(0), (2, 4, 6), jnp.float32)
  model = _ViTLike()
  params = model.init(jax.random.key(1), x)
  d = find_symmetries(model.apply, params, x)
  # LayerNorm gains (4 x 8), q/k and v/o per head (2 layers x 2 x 2 heads x 4^2), head units
  assert d.dimension == 4 * 8 + 2 * 2 * 2 * 16 + 10
  chains = [p.site.name for p in d.parts if p.site.name.startswith("Dense_0 ")]
  assert not chains, chains  # no site from the patch embedding into the next Dense
  assert "Dense_0" not in " ".join(p.site.name for p in d.parts)
  out0 = model.apply(params, x)
  moved = tj.group_action(params, d.exp(_random_xi(d, params, 0)), symmetry=d)
  assert _rel(model.apply(moved, x), out0) <= 1e-5


@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh"])
def test_smooth_activations_have_no_continuous_symmetry(activation):
  m = zoo.mlp(widths=(4, 6, 5, 3), activation=activation, batch=4)
  d = find_symmetries(m.apply, m.params, m.inputs)
  assert d.dimension == 0 and not d.parts
  assert set(d.untouched) == {
    "params/" + k
    for k in (
      "Dense_0/bias",
      "Dense_0/kernel",
      "Dense_1/bias",
      "Dense_1/kernel",
      "Dense_2/bias",
      "Dense_2/kernel",
    )
  }
  assert "between Dense_0 and Dense_1: no continuous symmetry" in d.untouched["params/Dense_0/bias"]
  assert "no continuous symmetry found" in str(d)


class _Sorted(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(5, name="a")(x)
    h = jnp.sort(h, axis=-1)  # no rule for sort
    h = nn.relu(nn.Dense(6, name="b")(h))
    return nn.Dense(2, name="c")(h)


def test_unsupported_primitive_is_reported_as_untouched_not_a_crash():
  x = jax.random.normal(jax.random.key(0), (4, 3), jnp.float32)
  model = _Sorted()
  params = model.init(jax.random.key(1), x)
  d = find_symmetries(model.apply, params, x)
  assert d.dimension == 6  # the ReLU units of b still move
  assert "unsupported primitive `sort`" in d.untouched["params/a/bias"]
  assert ("sort", 1) in d.unsupported_primitives
  assert "`sort`" in str(d)


class _Dropout(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic: bool = False):
    h = nn.relu(nn.Dense(6)(x))
    h = nn.Dropout(0.5, deterministic=deterministic)(h)
    return nn.Dense(2)(h)


def test_model_needing_an_rng_says_how_to_pass_one():
  x = jax.random.normal(jax.random.key(0), (4, 3), jnp.float32)
  model = _Dropout()
  params = model.init(jax.random.key(1), x, deterministic=True)
  with pytest.raises(ValueError, match=r"rngs=\{'dropout': key\}.*deterministic=True"):
    find_symmetries(model.apply, params, x)
  d = find_symmetries(model.apply, params, x, rngs={"dropout": jax.random.key(2)})
  assert d.dimension == 6  # a dropout mask is diagonal: the ReLU rescaling survives
  assert find_symmetries(model.apply, params, x, deterministic=True).dimension == 6


def test_nonfinite_inputs_and_params_are_refused():
  m = zoo.mlp(widths=(3, 4, 2), batch=2)
  with pytest.raises(ValueError, match=r"example input args\[0\].*non-finite"):
    find_symmetries(m.apply, m.params, m.inputs.at[0, 1].set(jnp.nan))
  bad = jax.tree_util.tree_map(lambda a: a.at[0].set(jnp.inf), m.params)
  with pytest.raises(ValueError, match=r"params contain non-finite values at .*Dense_0"):
    find_symmetries(m.apply, bad, m.inputs)
  with pytest.raises(TypeError, match="apply_fn must be callable"):
    find_symmetries(None, m.params, m.inputs)


def test_plain_jax_function_of_a_pytree():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"w1": jax.random.normal(k1, (3, 5)), "w2": jax.random.normal(k2, (5, 2))}
  x = jax.random.normal(k3, (6, 3))

  def f(p, x):
    return jax.nn.relu(x @ p["w1"]) @ p["w2"]

  d = find_symmetries(f, params, x)
  assert d.dimension == 5
  (site,) = d.sites
  assert {(s.path, s.role) for s in site.slots} == {(("w1",), "out"), (("w2",), "in")}
  linear = find_symmetries(lambda p, x: (x @ p["w1"]) @ p["w2"], params, x)
  assert linear.dimension == 25  # GL(5) between two linear maps
  assert find_symmetries(lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"], params, x).dimension == 0


# -------------------------------------------------------------------- verify
def test_verify_refuses_a_hand_declared_rescaling_across_gelu():
  m = zoo.mlp(widths=(4, 6, 3), activation="gelu", batch=4)
  site = tj.symmetries.Site(
    "Dense_0->Dense_1",
    (
      tj.symmetries.Slot("params/Dense_0/kernel", 1, "out"),
      tj.symmetries.Slot("params/Dense_0/bias", 0, "out"),
      tj.symmetries.Slot("params/Dense_1/kernel", 0, "in"),
    ),
    dim=6,
    between="homogeneous",  # a wrong declaration: GELU is not homogeneous
  )
  sym = tj.symmetries.SiteSymmetry(site, "scaling")
  with pytest.raises(ValueError, match=r"'Dense_0->Dense_1'.*relative output change [0-9.e-]+"):
    verify(m.apply, m.params, sym, m.inputs, strict=True)
  report = verify(m.apply, m.params, sym, m.inputs)
  assert not report.ok and report.checks[0].output_error > 1e-3
  relu = zoo.mlp(widths=(4, 6, 3), activation="relu", batch=4)
  good = verify(relu.apply, relu.params, tj.product(sym), relu.inputs, strict=True)
  assert good.ok and "Dense_0->Dense_1" in str(good)


# ------------------------------------------------------------------ teleport
@pytest.mark.parametrize(
  "make",
  [
    pytest.param(
      lambda: zoo.transformer(
        vocab=8, d_model=8, heads=2, layers=1, context=4, mlp_ratio=2, batch=2
      ),
      marks=pytest.mark.slow,
    ),
    lambda: zoo.cnn(channels=(2,), dense=(4, 3), image=(4, 4, 1), batch=4),
  ],
  ids=["transformer", "cnn"],
)
def test_teleport_accepts_the_discovered_symmetry_under_jit(make):
  m = make()
  d = find_symmetries(m.apply, m.params, m.inputs)
  loss = zoo.loss_for(m)
  batch = zoo.example_batch(m)

  @jax.jit
  def run(params, batch):
    return tj.teleport(
      loss, params, batch, symmetry=d, objective=tj.objectives.lookahead_loss(1e-2, 2), num_steps=3
    )

  new, info = run(m.params, batch)
  assert tj.TeleportStatus(int(info.status)) == tj.TeleportStatus.SUCCESSFUL
  assert abs(float(loss(new, batch)) - float(loss(m.params, batch))) <= 1e-4 * float(
    loss(m.params, batch)
  )
  assert _tree_rel(new, m.params) > 0


def test_diagonal_sites_transport_cotangents_elementwise():
  m, d = discovered("mlp", "linen")
  g = d.exp(_random_xi(d, m.params, 3))
  scale = d.cotangent_scale(m.params, g)
  assert set(scale) == {s.path for site in d.sites for s in site.slots}
  assert d.diagonal_transport


@pytest.mark.slow
def test_discovered_symmetry_teleports_a_vmap_over_seeds():
  models = [zoo.cnn(channels=(2,), dense=(4, 3), image=(4, 4, 1), batch=4, seed=s) for s in (0, 1)]
  d = find_symmetries(models[0].apply, models[0].params, models[0].inputs)
  loss = zoo.loss_for(models[0])
  batch = zoo.example_batch(models[0])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(m.params for m in models))

  @jax.jit
  @jax.vmap
  def run(params):
    return tj.teleport(
      loss, params, batch, symmetry=d, objective=tj.objectives.lookahead_loss(1e-2, 2), num_steps=3
    )

  new, info = run(stacked)
  for i, m in enumerate(models):
    assert tj.TeleportStatus(int(info.status[i])) == tj.TeleportStatus.SUCCESSFUL
    one = jax.tree.map(lambda x: x[i], new)
    before = float(loss(m.params, batch))
    assert abs(float(loss(one, batch)) - before) <= 1e-4 * before
    assert _tree_rel(one, m.params) > 0

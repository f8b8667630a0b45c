"""Every symmetry the finders build is exact on the model zoo, in flax linen and nnx.

For each zoo model and the finders that apply to it: outputs are unchanged by a
random group element, the group laws hold on the parameters, and the group has
its analytic dimension. Activations without a continuous symmetry are refused,
and a teleport of each model family under ``jax.jit`` is accepted.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import teleport_jax as tj
import teleport_jax.models as zoo
from teleport_jax._src.symmetries import finders
from teleport_jax._src.symmetries import groups

FRAMEWORKS = ("linen", "nnx")
DTYPES = {"float32": jnp.float32, "float64": jnp.float64}
TOL = {"float32": 1e-5, "float64": 1e-12}
# XLA's CPU back-end compiles teleports about twice as fast at optimisation level 0
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass(frozen=True)
class Case:
  """A zoo model, the product of the finders that apply to it, its dimension."""

  name: str
  build: Callable[..., zoo.Model]
  find: Callable[..., tj.symmetries.Product]
  dimension: int
  eval_mode: bool = False


def _tf(**kw):
  return functools.partial(zoo.transformer, **kw)


# transformer defaults: d_model 16, 4 heads of d_head 4, 2 layers, hidden 64
CASES = (
  Case("mlp_relu", zoo.mlp, lambda p: finders.mlp_chain(p), 16 + 16),
  Case(
    "mlp_leaky_relu",
    functools.partial(zoo.mlp, activation="leaky_relu"),
    lambda p: finders.mlp_chain(p, activation="leaky_relu"),
    16 + 16,
  ),
  Case(
    "mlp_linear",
    functools.partial(zoo.mlp, activation="identity"),
    lambda p: finders.mlp_chain(p, activation=None),
    2 * 16 * 16,
  ),
  Case(
    "cnn_maxpool",
    zoo.cnn,
    lambda p: tj.product(finders.conv_chain(p), finders.mlp_chain(p)),
    4 + 8 + 16,
  ),
  Case(
    "cnn_avgpool_batchnorm",
    functools.partial(zoo.cnn, pool="avg", batchnorm=True),
    lambda p: tj.product(finders.conv_chain(p), finders.mlp_chain(p), finders.batchnorm_scale(p)),
    4 + 8 + 16 + 4 + 8,
  ),
  Case(
    "cnn_batchnorm_eval",
    functools.partial(zoo.cnn, pool="avg", batchnorm=True),
    lambda p: tj.product(finders.batchnorm_scale(p, mode="eval"), finders.mlp_chain(p)),
    4 + 8 + 16,
    eval_mode=True,
  ),
  Case(
    "residual_mlp",
    zoo.residual_mlp,
    lambda p: tj.product(finders.feed_forward(p), finders.residual_stream(p, between="linear")),
    2 * 16 + 16 * 16,
  ),
  Case(
    "transformer_layernorm_gelu",
    _tf(attention_bias=True),
    lambda p: tj.product(
      finders.attention_qk(p), finders.attention_vo(p), finders.norm_into_dense(p)
    ),
    2 * (4 * 16 + 4 * 16 + 2 * 16) + 16,
  ),
  Case(
    "transformer_gqa_interleaved_rotary_reglu",
    _tf(kv_heads=2, positions="rotary", rotary_pairing="interleaved", mlp="reglu", norm="rmsnorm"),
    lambda p: tj.product(
      finders.attention_qk(p, rotary="interleaved"),
      finders.attention_vo(p),
      finders.norm_into_dense(p),
      finders.reglu(p, branch="gate"),
    ),
    2 * (2 * 4 + 2 * 16 + 2 * 16 + 64) + 16,
  ),
  Case(
    "transformer_gainfree_rotary_swiglu_tied",
    _tf(
      norm="rmsnorm_gainfree",
      mlp="swiglu",
      positions="rotary",
      tie_embeddings=True,
      attention_bias=True,
    ),
    lambda p: tj.product(
      finders.attention_qk(p, rotary="half"),
      finders.attention_vo(p),
      finders.reglu(p),
      finders.residual_stream(p),
    ),
    2 * (4 * 4 + 4 * 16 + 64) + 16 * 15 // 2,
  ),
  Case("lora_mlp", zoo.lora_mlp, lambda p: finders.lora(p), 2 * 2 * 2),
)
CASE = {c.name: c for c in CASES}


@functools.cache
def model(name: str, framework: str, dtype: str) -> zoo.Model:
  return CASE[name].build(framework=framework, dtype=DTYPES[dtype])


@functools.cache
def symmetry(name: str, framework: str, dtype: str) -> tj.symmetries.Product:
  return CASE[name].find(model(name, framework, dtype).params)


def apply_fn(name, framework, dtype):
  m = model(name, framework, dtype)
  return m.apply_eval if CASE[name].eval_mode else m.apply


def random_element(sym, params, seed, scale=0.3):
  """``exp`` of a random algebra element (matrix entries scaled by ``1/sqrt(d)``)."""
  zeros = sym.algebra_zeros(params)
  leaves, treedef = jax.tree_util.tree_flatten(zeros)
  rng = np.random.default_rng(seed)
  xi = []
  for z, part in zip(leaves, sym.parts):
    s = scale / np.sqrt(z.shape[-1]) if isinstance(part.group, groups.GL) else scale
    xi.append(jnp.asarray(s * rng.standard_normal(z.shape), z.dtype))
  return sym.exp(jax.tree_util.tree_unflatten(treedef, xi))


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def tree_rel_err(a, b) -> float:
  return max(
    rel_err(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
  )


# float64 proves every case exact (1e-12); float32 (1e-5) is checked where rounding
# has most room: GL chains, batch statistics, attention
FLOAT32_CASES = ("mlp_linear", "cnn_avgpool_batchnorm", "transformer_layernorm_gelu")
GRID = [(c.name, fw, "float64") for c in CASES for fw in FRAMEWORKS] + [
  (name, fw, "float32") for name in FLOAT32_CASES for fw in FRAMEWORKS
]


@pytest.mark.parametrize("name,framework,dtype", GRID)
def test_outputs_unchanged_by_a_random_group_element(name, framework, dtype):
  m, sym = model(name, framework, dtype), symmetry(name, framework, dtype)
  apply = apply_fn(name, framework, dtype)
  g = random_element(sym, m.params, seed=0)
  new = tj.group_action(m.params, g, symmetry=sym)
  assert tree_rel_err(m.params, new) > 1e-2  # the element moves the parameters
  assert rel_err(apply(m.params, m.inputs), apply(new, m.inputs)) <= TOL[dtype]


@pytest.mark.parametrize("name,framework", [(c.name, fw) for c in CASES for fw in FRAMEWORKS])
def test_group_dimension_is_analytic(name, framework):
  assert finders.dimension(symmetry(name, framework, "float64")) == CASE[name].dimension


# the group laws only touch the parameters: one framework per case suffices
LAWS = [(name, FRAMEWORKS[i % 2], dtype) for i, (name, _, dtype) in enumerate(GRID[::2])]


@pytest.mark.parametrize("name,framework,dtype", LAWS)
def test_group_laws_on_the_parameters(name, framework, dtype):
  m, sym = model(name, framework, dtype), symmetry(name, framework, dtype)
  g1, g2 = random_element(sym, m.params, 1), random_element(sym, m.params, 2)
  act = functools.partial(tj.group_action, symmetry=sym)
  assert tree_rel_err(m.params, act(m.params, sym.identity(m.params))) <= TOL[dtype]
  assert tree_rel_err(m.params, act(act(m.params, g1), sym.inverse(g1))) <= TOL[dtype]
  both = act(act(m.params, g1), g2)
  assert tree_rel_err(both, act(m.params, sym.compose(g1, g2))) <= TOL[dtype]


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh"])
def test_rescaling_across_a_smooth_activation_is_refused_by_the_site(activation):
  m = zoo.mlp(activation=activation)
  with pytest.raises(ValueError, match=f"mlp_chain.*not a symmetry across 'other'.*{activation}"):
    finders.mlp_chain(m.params, activation=activation)
  site = finders.sites(finders.mlp_chain(m.params, activation="relu"))[0]
  with pytest.raises(ValueError, match="Scaling is not a symmetry across 'other'"):
    tj.symmetries.SiteSymmetry(dataclasses.replace(site, between="other"), "scaling")


@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh"])
def test_rescaling_across_a_smooth_activation_is_refused_by_teleport(activation):
  m = zoo.mlp(widths=(4, 8, 3), activation=activation)
  sym = finders.mlp_chain(m.params, activation="relu")  # a false claim about the model
  loss = zoo.loss_for(m)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def teleport(params, batch):
    return tj.teleport(loss, params, batch, symmetry=sym, objective="max_grad_norm", num_steps=1)

  new, info = teleport(m.params, zoo.example_batch(m))
  assert int(info.status) == tj.TeleportStatus.NOT_A_SYMMETRY
  assert float(info.symmetry_error) > 1e-3
  assert tree_rel_err(m.params, new) == 0


def test_groups_that_are_not_exact_for_a_site_are_refused():
  p = model("transformer_gqa_interleaved_rotary_reglu", "linen", "float32").params
  qk = finders.sites(finders.attention_qk(p, rotary="interleaved"))[0]
  with pytest.raises(ValueError, match="GL is not a symmetry across 'rotary'"):
    tj.symmetries.SiteSymmetry(qk, "gl")
  norm = finders.sites(finders.norm_into_dense(p))[0]
  with pytest.raises(ValueError, match="GL is not a symmetry across 'homogeneous'"):
    tj.symmetries.SiteSymmetry(norm, "gl")
  p = model("transformer_layernorm_gelu", "nnx", "float32").params
  with pytest.raises(ValueError, match="residual_stream: norm parameters"):
    finders.residual_stream(p)
  p = model("transformer_gqa_interleaved_rotary_reglu", "nnx", "float32").params
  with pytest.raises(ValueError, match="reglu.*not a symmetry across 'other'"):
    finders.reglu(p, branch="gate", activation="silu")


def test_rotary_symmetry_is_not_gl_on_rotary_models():
  """GL(d_head) on queries and keys changes a rotary model's outputs."""
  name, fw, dt = "transformer_gqa_interleaved_rotary_reglu", "linen", "float64"
  m = model(name, fw, dt)
  site = finders.sites(finders.attention_qk(m.params, rotary="interleaved"))[0]
  sym = tj.symmetries.SiteSymmetry(dataclasses.replace(site, between="bilinear"), "gl")
  new = tj.group_action(m.params, random_element(tj.product(sym), m.params, 0)[0], symmetry=sym)
  assert rel_err(m.apply(m.params, m.inputs), m.apply(new, m.inputs)) > 1e-3


# ------------------------------------------------------------------ finders


def test_predicates_combine():
  path = ("params", "blocks_0", "attn", "query", "kernel")
  leaf = jnp.zeros((16, 4, 4))
  assert finders.PathContains("attn/query")(path, leaf)
  assert not finders.PathContains("attn/key")(path, leaf)
  assert (finders.PathEndsWith("kernel") & finders.OfNdim(3))(path, leaf)
  assert (finders.PathMatches("^nope") | "query")(path, leaf)
  assert not (~finders.PathContains("blocks_0"))(path, leaf)
  assert finders.as_predicate(lambda p, x: x.ndim == 3)(path, leaf)
  with pytest.raises(ValueError, match="bad regular expression"):
    finders.PathMatches("(")


def test_finders_name_the_predicate_when_nothing_matches():
  p = model("mlp_relu", "linen", "float32").params
  with pytest.raises(ValueError, match=r"mlp_chain: kernels=PathContains\('nothing'\) selects 0"):
    finders.mlp_chain(p, kernels="nothing")
  with pytest.raises(ValueError, match="conv_chain: no leaf matches kernels="):
    finders.conv_chain(p)
  with pytest.raises(ValueError, match="attention_qk: no leaf matches 'query/kernel'"):
    finders.attention_qk(p)
  with pytest.raises(ValueError, match="lora: no leaf matches"):
    finders.lora(p)


def test_finders_refuse_shapes_that_do_not_chain():
  p = model("mlp_relu", "nnx", "float32").params
  with pytest.raises(ValueError, match="does not feed"):
    finders.mlp_chain(p, order=["layers/1/kernel", "layers/0/kernel"])


def test_mlp_chain_order_by_auto_names():
  m = zoo.mlp(widths=(3,) + (4,) * 11 + (2,))  # Dense_0 ... Dense_11
  names = [s.name for s in finders.sites(finders.mlp_chain(m.params))]
  assert names[:3] == [
    "params/Dense_0 -> params/Dense_1",
    "params/Dense_1 -> params/Dense_2",
    "params/Dense_2 -> params/Dense_3",
  ]
  assert names[-1] == "params/Dense_10 -> params/Dense_11"


def test_flatten_reader_groups_dense_rows_per_channel():
  p = model("cnn_maxpool", "linen", "float64").params
  last = finders.sites(finders.conv_chain(p))[-1]
  reader = last.readers[0]
  assert reader.path == ("params", "Dense_0", "kernel")
  assert reader.reshape == (4, 8, 16) and reader.axis == 1
  sym = tj.symmetries.SiteSymmetry(last, "scaling")
  s = jnp.arange(1.0, 9.0, dtype=jnp.float64)
  new = tj.group_action(p, s, symmetry=sym)
  rows = np.arange(32) % 8  # the flatten of (2, 2, 8) puts channel c at rows c, c + 8, ...
  want = p["params"]["Dense_0"]["kernel"] / np.asarray(s)[rows][:, None]
  np.testing.assert_allclose(new["params"]["Dense_0"]["kernel"], want, rtol=1e-14)


def test_slot_reshape_is_validated():
  with pytest.raises(ValueError, match="at most one -1"):
    tj.symmetries.Slot("a/kernel", 1, "in", reshape=(-1, -1, 3))
  slot = tj.symmetries.Slot("a/kernel", 1, "in", reshape=(-1, 8, 16))
  assert slot.view_shape((32, 16)) == (4, 8, 16)
  with pytest.raises(ValueError, match="has no view"):
    slot.view_shape((30, 16))


def test_gqa_query_heads_share_their_kv_group_element():
  p = model("transformer_gqa_interleaved_rotary_reglu", "nnx", "float32").params
  site = finders.sites(finders.attention_vo(p))[0]
  assert site.heads == 2 and site.dim == 4
  (out,) = site.readers
  assert out.path[-2:] == ("out", "kernel") and out.head_group == 2


def test_batchnorm_train_site_changes_eval_outputs_and_eval_site_train_outputs():
  """Each BatchNorm site is exact in its own mode only (see batchnorm_scale)."""
  m = model("cnn_batchnorm_eval", "nnx", "float64")
  for mode, other in (("train", m.apply_eval), ("eval", m.apply)):
    sym = finders.batchnorm_scale(m.params, mode=mode)
    new = tj.group_action(m.params, random_element(sym, m.params, 0), symmetry=sym)
    assert rel_err(other(m.params, m.inputs), other(new, m.inputs)) > 1e-3


# ------------------------------------------------------------------ teleport

# one small model per family (compiling a teleport with a lookahead objective is
# what costs here: it differentiates through two gradient steps of the model)
FAMILIES = {
  "mlp": (lambda: zoo.mlp(widths=(4, 6, 3)), finders.mlp_chain),
  "cnn": (
    lambda: zoo.cnn(channels=(2,), dense=(3,), image=(4, 4, 1), batch=4, framework="nnx"),
    finders.conv_chain,
  ),
  "residual_mlp": (
    lambda: zoo.residual_mlp(width=4, blocks=1, in_features=3, out_features=3),
    lambda p: tj.product(finders.feed_forward(p), finders.residual_stream(p, between="linear")),
  ),
  "transformer": (
    lambda: zoo.transformer(
      vocab=4,
      d_model=4,
      heads=2,
      kv_heads=1,
      layers=1,
      context=3,
      mlp="relu",
      mlp_ratio=1,
      norm="rmsnorm",
      positions="rotary",
      batch=2,
      framework="nnx",
    ),
    lambda p: tj.product(finders.attention_qk(p, rotary="half"), finders.attention_vo(p)),
  ),
  "lora_mlp": (lambda: zoo.lora_mlp(widths=(4, 6, 3)), finders.lora),
}


# the MLP and CNN families in the default run; the larger ones with -m slow
SLOW_FAMILIES = ("transformer", "lora_mlp", "residual_mlp")


@pytest.mark.parametrize(
  "family",
  [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_FAMILIES else f for f in FAMILIES],
)
def test_jitted_teleport_of_each_family_is_accepted(family):
  build, find = FAMILIES[family]
  m = build()
  sym, loss, batch = find(m.params), zoo.loss_for(m), zoo.example_batch(m)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def teleport(params, batch):
    return tj.teleport(
      loss,
      params,
      batch,
      symmetry=sym,
      objective=tj.objectives.lookahead_loss(1e-2, 2),
      num_steps=3,
    )

  new, info = teleport(m.params, batch)
  assert int(info.status) == tj.TeleportStatus.SUCCESSFUL, tj.status_message(info.status)
  assert bool(info.accepted) and tree_rel_err(m.params, new) > 0
  assert float(info.objective_after) < float(info.objective_before)
  rtol = tj.default_rtol(jnp.float32)
  assert abs(float(loss(new, batch)) - float(info.loss_before)) <= rtol * float(info.loss_before)

"""The documentation runs and agrees with the code.

Every fenced ``python`` block of README.md and of ``docs/*.md`` is executed
(fragments get the setup they need, keyed by the heading they sit under), and
the call forms of the API tables (docs/api.md, and the README's overview) are
checked against the signatures.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pathlib
import re
from typing import Any

import pytest

import teleport_jax as tj

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# ------------------------------------------------------------ code blocks
@dataclasses.dataclass(frozen=True)
class Block:
  """A fenced ``python`` block: where it is, what it says."""

  file: str  # relative to the repository root
  heading: str  # the nearest heading above it
  index: int  # 1-based among the blocks under that heading
  line: int  # 1-based line of its first code line
  code: str

  @property
  def key(self) -> str:
    """A stable marker: ``docs/usage.md#notebooks`` (``#notebooks-2`` for a second block)."""
    slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
    return f"{self.file}#{slug}" + (f"-{self.index}" if self.index > 1 else "")


def _blocks(path: pathlib.Path) -> list[Block]:
  lines = path.read_text().splitlines()
  out: list[Block] = []
  heading, fence, counts = "", None, {}
  for i, line in enumerate(lines):
    if fence is None:
      if line.startswith("```"):
        fence = (line[3:].strip(), i + 1, [])
      elif line.startswith("#"):
        heading = line.lstrip("#").strip()
    elif line.startswith("```"):
      lang, start, body = fence
      fence = None
      if lang == "python":
        counts[heading] = counts.get(heading, 0) + 1
        rel = path.relative_to(ROOT).as_posix()
        out.append(Block(rel, heading, counts[heading], start + 1, "\n".join(body) + "\n"))
    else:
      fence[2].append(line)
  return out


BLOCKS = [b for path in DOCS for b in _blocks(path)]

# Code run in the block's namespace before (setup) and after (teardown) it.
# Setups give fragments what they refer to; teardowns check that the block did
# what its text says, at the smallest size that shows it.
_USING_IT_TEARDOWN = """
from teleport_jax.experiments import regression

params, x, y = regression.make_problem(0)
state = opt.init(params)
for _ in range(6):  # the schedule teleports at step 5
  params, state, l = step(params, state, x, y, teleport=tj.teleport_due(state))
assert int(state.num_teleports) == 1, tj.status_message(state.info)
# the steps the schedule skips run a program without the teleport's conditional
assert "case" not in step.lower(params, state, x, y, teleport=False).as_text()
assert "case" in jax.jit(lambda *a: opt.update(*a, value_fn=loss, x=x, y=y)).lower(
  jax.grad(loss)(params, x, y), state, params
).as_text()
assert int(state.info.status) == tj.TeleportStatus.SUCCESSFUL, tj.status_message(state.info)
assert bool(jnp.isfinite(l))
"""

_OWN_MODEL_TEARDOWN = """
assert isinstance(sym, tj.Discovered)
state = opt.init(m.params)
"""

_FLAX_MODEL_TEARDOWN = """
assert isinstance(sym, tj.Discovered)
assert int(state.num_teleports) == 1, tj.status_message(state.info)
assert int(state.info.status) == tj.TeleportStatus.SUCCESSFUL, tj.status_message(state.info)
assert bool(jnp.isfinite(l))
"""

# A training loop in chunks: `train_chunk(params, opt_state, batches, *, teleport)`
# runs one `lax.scan` over a chunk's batches.
_PERFORMANCE_SETUP = """
import functools

import jax
import jax.numpy as jnp
import optax
import teleport_jax as tj
from teleport_jax.experiments import regression

params, x, y = regression.make_problem(0)
num_chunks, chunk_len = 3, 2
batches = (jnp.stack([x] * chunk_len), jnp.stack([y] * chunk_len))
act = tj.activations.leaky_relu(0.1)


def value_fn(params, x, y):
  h = x
  for w in params[:-1]:
    h = act(w @ h)
  return 0.5 * jnp.sum((y - params[-1] @ h) ** 2)


opt = tj.with_teleport(
  optax.sgd(1e-4), tj.DataDependentGL(activation=act), tj.schedules.at_steps([2]), num_steps=2
)
opt_state = opt.init(params)


def train_chunk(params, opt_state, batches, *, teleport):
  def body(carry, batch):
    p, s = carry
    g = jax.grad(value_fn)(p, *batch)
    u, s = opt.update(g, s, p, value_fn=value_fn, teleport=teleport, x=batch[0], y=batch[1])
    return (optax.apply_updates(p, u), s), None

  (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), batches)
  return params, opt_state
"""

_PERFORMANCE_TEARDOWN = """
assert int(opt_state.num_teleports) == 1, tj.status_message(opt_state.info)
assert maybe._cache_size() == 1 and plain._cache_size() == 1
"""


# The compile-time block sets the process's compilation cache: the suite's own is restored.
_CACHE_SETUP = """
import jax

_saved_cache = (
  jax.config.jax_compilation_cache_dir,
  jax.config.jax_persistent_cache_min_compile_time_secs,
)
"""

_CACHE_TEARDOWN = """
assert jax.config.jax_compilation_cache_dir == "/tmp/jax_cache"
assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.5
jax.config.update("jax_compilation_cache_dir", _saved_cache[0])
jax.config.update("jax_persistent_cache_min_compile_time_secs", _saved_cache[1])
"""


# the published toy problem of docs/learned.md's first block (its definitions, without its
# meta-training)
_LEARNED_SETUP = """
import jax, jax.numpy as jnp, optax
import teleport_jax as tj
from teleport_jax import learned


def loss(params, x, y):
  h = jax.nn.leaky_relu(x @ params[0], 0.1)
  return 0.5 * jnp.sum((h @ params[1] - y) ** 2)


def sample(key):
  k = jax.random.split(key, 4)
  params = [jax.random.uniform(k[0], (20, 20)), jax.random.uniform(k[1], (20, 20))]
  return params, (jax.random.uniform(k[2], (20, 20)), jax.random.uniform(k[3], (20, 20)))


def task_loss(params, data):
  return loss(params, *data)


params, (x, y) = sample(jax.random.key(0))
symmetry = tj.DataDependentGL(activation=tj.activations.leaky_relu(0.1))
symmetry = symmetry.bind(task_loss, params, (x, y))
"""

_LEARNED_OPTIMIZER_TEARDOWN = """
import numpy as np

assert np.isfinite(np.asarray(result.losses)).all()
state = opt.init(params)
value, grads = jax.value_and_grad(loss)(params, x, y)
updates, state = opt.update(grads, state, params, value=value, value_fn=loss, x=x, y=y)
# the policy moved before Adam's first step, within the guard
assert int(state.num_teleports) == 1 and int(state.num_rejected) == 0
"""


@dataclasses.dataclass(frozen=True)
class Fixture:
  setup: str = ""
  teardown: str = ""
  skip: str = ""


FIXTURES: dict[str, Fixture] = {
  "README.md#the-seed-s-mlp-with-tj-with-teleport": Fixture(teardown=_USING_IT_TEARDOWN),
  "README.md#your-own-flax-model-with-tj-find-symmetries": Fixture(teardown=_FLAX_MODEL_TEARDOWN),
  "docs/symmetries.md#teleport-your-own-model": Fixture(teardown=_OWN_MODEL_TEARDOWN),
  "docs/multiple_devices.md#multiple-devices": Fixture(
    skip="needs 8 devices: tests/test_sharding.py runs this block on 8 emulated CPU devices "
    "in its own process (tests/sharded/test_sharded.py::"
    "test_the_multiple_devices_example_runs_and_keeps_its_shardings)"
  ),
  "docs/learned.md#around-any-optax-optimizer": Fixture(
    setup=_LEARNED_SETUP, teardown=_LEARNED_OPTIMIZER_TEARDOWN
  ),
  "docs/usage.md#compile-time": Fixture(setup=_CACHE_SETUP, teardown=_CACHE_TEARDOWN),
  "docs/usage.md#steps-that-do-not-teleport": Fixture(
    setup=_PERFORMANCE_SETUP, teardown=_PERFORMANCE_TEARDOWN
  ),
}


def _block_id(block: Block) -> str:
  first = next((ln.strip() for ln in block.code.splitlines() if ln.strip()), "")
  return f"{block.key}:{block.line}:{first[:40]}"


def _exec(code: str, filename: str, ns: dict[str, Any], first_line: int = 1) -> None:
  # padded so that tracebacks point at the documentation's own line numbers
  source = "\n" * (first_line - 1) + code
  exec(compile(source, filename, "exec"), ns)  # noqa: S102


def test_the_documentation_has_python_blocks_and_every_fixture_is_used():
  assert BLOCKS, "the documentation has no python blocks"
  keys = {b.key for b in BLOCKS}
  assert len(keys) == len(BLOCKS), "two blocks share a key"
  unused = sorted(set(FIXTURES) - keys)
  assert not unused, f"fixtures for blocks that no longer exist (a heading moved?): {unused}"


@pytest.mark.parametrize("block", BLOCKS, ids=_block_id)
def test_python_block_runs(block):
  fixture = FIXTURES.get(block.key, Fixture())
  if fixture.skip:
    pytest.skip(fixture.skip)
  ns: dict[str, Any] = {"__name__": "__readme__"}
  if fixture.setup:
    _exec(fixture.setup, f"<setup of {block.key}>", ns)
  _exec(block.code, block.file, ns, block.line)
  if fixture.teardown:
    _exec(fixture.teardown, f"<teardown of {block.key}>", ns)


# ---------------------------------------------------------------- API table
API_PAGES = [ROOT / "docs" / "api.md", ROOT / "README.md"]


def _api_rows(path: pathlib.Path) -> list[str]:
  """The first cells of the rows of ``path``'s API tables (those whose header is ``name``)."""
  cells, in_table = [], False
  for line in path.read_text().splitlines():
    if not line.startswith("|"):
      in_table = False
      continue
    first = re.split(r"(?<!\\)\|", line)[1].strip()
    if first == "name":
      in_table = True
    elif in_table and not first.startswith("---"):
      cells.append(first)
  return cells


def test_every_api_page_has_an_api_table():
  for path in API_PAGES:
    assert _api_rows(path), f"{path.relative_to(ROOT)} has no | name | ... | table"


def _spans(cell: str) -> list[str]:
  return re.findall(r"`([^`]+)`", cell)


_CELLS = [cell for path in API_PAGES for cell in _api_rows(path)]
CALLS = list(
  dict.fromkeys(s for cell in _CELLS for s in _spans(cell) if re.match(r"tj\.[\w.]+\(", s))
)
NAMES = list(
  dict.fromkeys(
    s for cell in _CELLS for s in _spans(cell) if re.fullmatch(r"(tj|teleport_jax)\.[\w.*]+", s)
  )
)


def _resolve(dotted: str) -> Any:
  parts = dotted.split(".")
  if parts[0] == "teleport_jax":
    return importlib.import_module(dotted)
  obj: Any = tj
  for part in parts[1:]:
    if part == "*":
      assert inspect.ismodule(obj), f"{dotted}: {obj!r} is not a module"
      continue
    obj = getattr(obj, part)
  return obj


@dataclasses.dataclass(frozen=True)
class Param:
  name: str
  kind: inspect._ParameterKind
  default: Any = inspect.Parameter.empty


def _parse_call(form: str) -> tuple[str, list[Param], bool]:
  """``tj.f(a, b=1, *, c, ...)`` as ``("tj.f", [params], more_follow)``."""
  m = re.fullmatch(r"(tj\.[\w.]+)\((.*)\)", form)
  assert m, form
  name, args = m.group(1), m.group(2).strip()
  more = args == "..." or args.endswith(", ...")
  args = args[: -len("...")].rstrip(", ") if more else args
  fn = ast.parse(f"def f({args}): pass").body[0]
  a = fn.args
  P = inspect.Parameter
  params: list[Param] = []
  positional = a.posonlyargs + a.args
  defaults = [P.empty] * (len(positional) - len(a.defaults)) + [
    ast.literal_eval(d) for d in a.defaults
  ]
  for arg, d in zip(positional, defaults):
    params.append(Param(arg.arg, P.POSITIONAL_OR_KEYWORD, d))
  if a.vararg:
    params.append(Param(a.vararg.arg, P.VAR_POSITIONAL))
  for arg, d in zip(a.kwonlyargs, a.kw_defaults):
    params.append(Param(arg.arg, P.KEYWORD_ONLY, P.empty if d is None else ast.literal_eval(d)))
  if a.kwarg:
    params.append(Param(a.kwarg.arg, P.VAR_KEYWORD))
  return name, params, more


def _problems(form: str) -> list[str]:
  """How the call form ``form`` of the documentation disagrees with the code's signature."""
  name, readme, more = _parse_call(form)
  code = inspect.signature(_resolve(name)).parameters
  P = inspect.Parameter
  problems = []
  for p in readme:
    c = code.get(p.name)
    if c is None:
      problems.append(f"{p.name}: no such parameter")
      continue
    kind = P.POSITIONAL_OR_KEYWORD if c.kind == P.POSITIONAL_ONLY else c.kind
    if kind != p.kind:
      problems.append(f"{p.name}: the docs say {p.kind.description}, code {c.kind.description}")
    if p.default is not P.empty and (
      c.default is P.empty or type(c.default) is not type(p.default) or c.default != p.default
    ):
      problems.append(f"{p.name}: documented default {p.default!r}, code {c.default!r}")
  positional = [p.name for p in readme if p.kind == P.POSITIONAL_OR_KEYWORD]
  code_positional = [
    n for n, c in code.items() if c.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
  ]
  if positional != code_positional[: len(positional)]:
    problems.append(f"positional order: docs {positional}, code {code_positional}")
  missing = [n for n in code if n not in {p.name for p in readme}]
  if missing and not more:
    problems.append(f"not documented and no '...': {missing}")
  return problems


def test_the_api_table_has_call_forms():
  assert len(CALLS) >= 20, CALLS
  assert any(c.startswith("tj.teleport(") for c in CALLS)


@pytest.mark.parametrize("name", NAMES)
def test_api_table_name_exists(name):
  _resolve(name)


@pytest.mark.parametrize("form", CALLS, ids=lambda f: f.split("(")[0])
def test_api_table_call_form_matches_the_signature(form):
  problems = _problems(form)
  assert not problems, f"{form}: {problems}"


NAMESPACES = [
  "activations",
  "finders",
  "geometry",
  "groups",
  "learned",
  "objectives",
  "problems",
  "schedules",
  "solvers",
  "symmetries",
]


def _documented() -> set[str]:
  text = (ROOT / "docs" / "api.md").read_text()
  return set(re.findall(r"tj\.[\w.]+", text))


@pytest.mark.parametrize("namespace", ["", *NAMESPACES])
def test_every_public_name_is_on_the_api_page(namespace):
  module = getattr(tj, namespace) if namespace else tj
  prefix = f"tj.{namespace}." if namespace else "tj."
  documented = _documented()
  missing = [
    n
    for n in module.__all__
    if not any(d == f"{prefix}{n}" or d.startswith(f"{prefix}{n}.") for d in documented)
  ]
  assert not missing, f"docs/api.md does not document {missing}"


def test_every_namespace_is_public_and_listed():
  assert set(NAMESPACES) <= set(tj.__all__)
  found = {n for n in tj.__all__ if inspect.ismodule(getattr(tj, n))}
  assert found == set(NAMESPACES)


def test_a_namespaced_name_at_the_top_level_says_where_it_lives():
  with pytest.raises(AttributeError, match=r"tj\.activations\.relu"):
    getattr(tj, "relu")  # noqa: B009
  with pytest.raises(AttributeError, match="no attribute 'nothing_here'$"):
    tj.nothing_here  # noqa: B018

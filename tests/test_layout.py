"""The layout of ``teleport_jax``: layers in order, no import cycles, small folders and units.

Every module under ``teleport_jax/_src`` is parsed with :mod:`ast` (nothing is
imported) and every import in it is read, at module level and inside
functions, classes and ``if`` blocks alike. The order of the layers is the one
line with ``->`` in the docstring of ``teleport_jax/_src/__init__.py``.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "teleport_jax" / "_src"
PREFIX = "teleport_jax._src"
MAX_MODULES = 15  # .py files in one folder, __init__.py included


def declared_order(root: pathlib.Path) -> tuple[str, ...]:
  """The layers, lowest first, from the ``a -> b -> c`` line of ``root/__init__.py``."""
  doc = ast.get_docstring(ast.parse((root / "__init__.py").read_text())) or ""
  lines = [line for line in doc.splitlines() if "->" in line]
  assert len(lines) == 1, f"{root / '__init__.py'}: expected one '->' line, found {lines}"
  return tuple(part.strip() for part in lines[0].split("->"))


def _name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = path.relative_to(root).with_suffix("").parts
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join((PREFIX, *parts))


def modules(root: pathlib.Path) -> dict[str, tuple[pathlib.Path, ast.Module]]:
  """Dotted name -> (file, syntax tree) for every .py file under ``root``."""
  return {
    _name(path, root): (path, ast.parse(path.read_text(), filename=str(path)))
    for path in sorted(root.rglob("*.py"))
  }


def imported(name: str, path: pathlib.Path, tree: ast.Module) -> set[str]:
  """Every dotted name an import anywhere in ``tree`` may load (``from p import m``
  gives ``p`` and ``p.m``; the caller keeps the ones that are modules)."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolved against the module's package
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = package[: len(package) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module
      out.add(module)
      out.update(f"{module}.{alias.name}" for alias in node.names)
  return out


def graph(mods) -> dict[str, set[str]]:
  """Module -> the modules of ``mods`` it imports (itself excluded)."""
  return {
    name: {m for m in imported(name, path, tree) if m in mods and m != name}
    for name, (path, tree) in mods.items()
  }


def _layer(name: str) -> str | None:
  parts = name.split(".")
  return parts[2] if len(parts) > 2 else None


def layer_violations(root: pathlib.Path) -> list[str]:
  order = declared_order(root)
  rank = {layer: i for i, layer in enumerate(order)}
  mods = modules(root)
  out = []
  folders = {p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.py"))}
  if folders != set(order):
    out.append(f"folders {sorted(folders)} are not the declared layers {list(order)}")
  for name, (path, tree) in mods.items():
    if path.parent == root:
      if path.name != "__init__.py":
        out.append(f"{name}: a module outside every layer")
      continue
    layer = _layer(name)
    if layer not in rank:
      out.append(f"{name}: in {layer!r}, which is not a declared layer")
      continue
    for target in sorted(imported(name, path, tree)):
      if target == "teleport_jax" or (
        target.startswith("teleport_jax.") and not target.startswith(PREFIX + ".")
      ):
        out.append(f"{name} imports {target}, outside {PREFIX}")
      elif target in mods and _layer(target) in rank and rank[_layer(target)] > rank[layer]:
        out.append(f"{name} ({layer}) imports {target} ({_layer(target)}), a layer above it")
  return out


def cycles(root: pathlib.Path) -> list[list[str]]:
  """The strongly connected components of the import graph with more than one module."""
  edges = graph(modules(root))
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):  # Tarjan
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return found


def crowded_folders(root: pathlib.Path) -> list[str]:
  folders = {root} | {p for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__"}
  return [
    f"{folder.relative_to(root.parent)}: {n} modules"
    for folder in sorted(folders)
    if (n := len(list(folder.glob("*.py")))) > MAX_MODULES
  ]


def init_problems(root: pathlib.Path) -> list[str]:
  """Each layer's ``__init__.py``: a docstring and nothing else."""
  out = []
  for layer in declared_order(root):
    init = root / layer / "__init__.py"
    if not init.exists():
      out.append(f"{layer}: no __init__.py")
      continue
    tree = ast.parse(init.read_text())
    if not ast.get_docstring(tree):
      out.append(f"{layer}/__init__.py: no docstring")
    if len(tree.body) != 1:
      out.append(f"{layer}/__init__.py: more than a docstring")
  return out


def test_layers_import_only_downwards():
  assert layer_violations(SRC) == []


def test_no_import_cycles():
  assert cycles(SRC) == []


def test_folders_stay_small():
  assert crowded_folders(SRC) == []


def test_layer_inits_are_docstrings():
  assert init_problems(SRC) == []


def test_every_layer_holds_modules():
  layers = {_layer(name) for name in modules(SRC)} - {None}
  assert layers == set(declared_order(SRC))


# ------------------------------------------------------------- the checks can fail
def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return root


@pytest.fixture
def bad_tree(tmp_path):
  files = {
    "__init__.py": '"""Layers::\n\n    low -> high\n"""\n',
    "low/__init__.py": '"""Low."""\n',
    "high/__init__.py": '"""High."""\nimport os\n',
    "high/top.py": "from teleport_jax._src.low import base\n",
    # an upward import hidden inside a function
    "low/base.py": "def f():\n  from teleport_jax._src.high import top\n  return top\n",
    # a cycle through a lazy, relative import
    "low/a.py": "from teleport_jax._src.low import b\n",
    "low/b.py": "def g():\n  from . import a\n  return a\n",
    # the public package from inside _src
    "low/public.py": "import teleport_jax\n",
  }
  files.update({f"high/m{i}.py": "" for i in range(MAX_MODULES)})
  return _write(tmp_path / "_src", files)


def test_the_checks_catch_a_bad_layout(bad_tree):
  assert declared_order(bad_tree) == ("low", "high")
  violations = layer_violations(bad_tree)
  assert any("low.base (low) imports teleport_jax._src.high.top (high)" in v for v in violations)
  assert any("imports teleport_jax, outside" in v for v in violations)
  assert not any(v.startswith("teleport_jax._src.high.top") for v in violations)
  found = cycles(bad_tree)
  assert ["teleport_jax._src.low.a", "teleport_jax._src.low.b"] in found
  assert any("teleport_jax._src.low.base" in c and "teleport_jax._src.high.top" in c for c in found)
  assert crowded_folders(bad_tree) == [f"_src/high: {MAX_MODULES + 2} modules"]
  assert init_problems(bad_tree) == ["high/__init__.py: more than a docstring"]


def test_a_module_outside_the_layers_is_caught(bad_tree):
  _write(bad_tree, {"stray.py": "", "extra/__init__.py": '"""Extra."""\n'})
  violations = layer_violations(bad_tree)
  assert "teleport_jax._src.stray: a module outside every layer" in violations
  assert any(v.startswith("folders ") for v in violations)
  assert any("in 'extra', which is not a declared layer" in v for v in violations)


MAX_UNIT_LINES = 300  # lines of code in one function or class, docstrings and comments apart
PACKAGE = SRC.parent


def _docstring_lines(node: ast.AST) -> set[int]:
  """The lines of every docstring inside ``node``."""
  out = set()
  for n in ast.walk(node):
    body = getattr(n, "body", None)
    if (
      isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
      and body
      and isinstance(body[0], ast.Expr)
      and isinstance(body[0].value, ast.Constant)
      and isinstance(body[0].value.value, str)
    ):
      out.update(range(body[0].lineno, body[0].end_lineno + 1))
  return out


def unit_sizes(root: pathlib.Path) -> dict[str, int]:
  """``"path:line name" -> lines of code`` of every function and class under ``root``."""
  sizes = {}
  for path in sorted(root.rglob("*.py")):
    text = path.read_text()
    lines = text.splitlines()
    for node in ast.walk(ast.parse(text)):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        continue
      docs = _docstring_lines(node)
      n = sum(
        1
        for i in range(node.lineno, node.end_lineno + 1)
        if i not in docs and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#")
      )
      sizes[f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"] = n
  return sizes


def test_no_function_or_class_is_longer_than_300_lines_of_code():
  sizes = unit_sizes(PACKAGE)
  assert len(sizes) > 100
  long = {k: n for k, n in sizes.items() if n > MAX_UNIT_LINES}
  assert not long, f"units over {MAX_UNIT_LINES} lines of code: {long}"


def test_the_unit_size_check_counts_code_not_docstrings(tmp_path):
  body = "\n".join(f"  x{i} = {i}" for i in range(5))
  (tmp_path / "m.py").write_text(f'def f():\n  """Doc.\n\n  More.\n  """\n  # note\n{body}\n')
  assert unit_sizes(tmp_path) == {f"{tmp_path.name}/m.py:1 f": 6}

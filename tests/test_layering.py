"""The package's layering, read from the source: no import cycles, dependencies only run
down the floors (layers -> model/vision -> generate -> data -> tasks -> train -> compress
-> entry points), training never imports compression, and function-local imports of gptjax exist
only to defer an optional dependency (qwix) or the heavy training stack."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gptjax")

# Floors, lowest first: a module may import its own floor and those below, never above.
FLOORS = [
    ("gptjax.tree", "gptjax.sharding", "gptjax.config", "gptjax.flops", "gptjax.init",
     "gptjax.layers"),
    ("gptjax.vision", "gptjax.model", "gptjax.layout", "gptjax.batch"),
    ("gptjax.generate",),
    ("gptjax.data",),
    ("gptjax.tasks",),  # what a trained model does: match, retrieve, draw; caption metrics
    ("gptjax.train",),
    ("gptjax.compress", "gptjax.interop"),
    ("gptjax.runs", "gptjax.sample", "gptjax"),
    # shipped configs and the command-line mains (those of gptjax.tasks load a run)
    ("gptjax.configs", "gptjax.cli", "gptjax.tasks.retrieve", "gptjax.tasks.draw"),
]
# Function-local imports of gptjax that are deliberate: quantization needs qwix (an optional
# dependency), and `import gptjax` defers the training stack until load_model is used.
DEFERRED_OK = ("gptjax.compress.quantize", "gptjax.runs")


def _modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


MODULES = _modules()


def _resolve(name: str) -> str:
  """The gptjax module an imported dotted name refers to (its longest known prefix)."""
  while name not in MODULES and "." in name:
    name = name.rsplit(".", 1)[0]
  return name


def _imports(path: str) -> list[tuple[str, bool]]:
  """(imported gptjax module, at module level?) for every import statement of ``path``."""
  tree = ast.parse(open(path).read(), path)
  local = {id(sub) for fn in ast.walk(tree)
           if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
           for sub in ast.walk(fn)}
  found = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names]
    for n in names:
      if n == "gptjax" or n.startswith("gptjax."):
        found.append((_resolve(n), id(node) not in local))
  return found


GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def _floor(module: str) -> int:
  best = None
  for i, names in enumerate(FLOORS):
    for n in names:
      if module == n or module.startswith(n + "."):
        if best is None or len(n) > best[1]:
          best = (i, len(n))
  assert best is not None, f"{module} is on no floor: add it to FLOORS"
  return best[0]


def test_every_module_has_a_floor():
  for m in MODULES:
    _floor(m)


def test_no_import_cycles():
  edges = {m: sorted({d for d, _ in deps if d != m}) for m, deps in GRAPH.items()}
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in edges.get(m, ()):
      if state.get(d) == "open":
        cycle = stack[stack.index(d):] + [d]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"

  for m in sorted(edges):
    if m not in state:
      visit(m)


def test_dependencies_run_down_the_floors():
  bad = [f"{m} (floor {_floor(m)}) imports {d} (floor {_floor(d)})"
         for m, deps in GRAPH.items() for d, _ in deps
         if m != "gptjax" and _floor(d) > _floor(m)]
  assert not bad, "\n".join(bad)


def test_training_never_imports_compression():
  bad = [(m, d) for m, deps in GRAPH.items() for d, _ in deps
         if _floor(m) < _floor("gptjax.compress") and d.startswith("gptjax.compress")]
  assert not bad, bad


def test_function_local_imports_only_defer_optional_dependencies():
  bad = [(m, d) for m, deps in GRAPH.items() for d, top in deps
         if not top and not any(d == ok or d.startswith(ok + ".") for ok in DEFERRED_OK)]
  assert not bad, f"function-local gptjax imports (import at the top instead): {bad}"


def test_files_stay_small():
  long = {m: n for m, p in MODULES.items() if (n := sum(1 for _ in open(p))) > 420}
  assert not long, f"split these by concept: {long}"


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
  """The rules above must be able to fail: a planted cycle and a train -> compress import
  are found."""
  monkeypatch.setitem(GRAPH, "gptjax.tree", GRAPH["gptjax.tree"] + [("gptjax.sharding", True)])
  monkeypatch.setitem(GRAPH, "gptjax.sharding", GRAPH["gptjax.sharding"] + [("gptjax.tree", True)])
  with pytest.raises(pytest.fail.Exception, match="import cycle"):
    test_no_import_cycles()
  monkeypatch.setitem(GRAPH, "gptjax.train.loop",
                      GRAPH["gptjax.train.loop"] + [("gptjax.compress.hooks", True)])
  with pytest.raises(AssertionError):
    test_training_never_imports_compression()
  with pytest.raises(AssertionError):
    test_dependencies_run_down_the_floors()

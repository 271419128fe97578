"""Import rules for ``src/flextron``: a one-way stack of layers, checked by parsing the source.

Every ``.py`` file under ``src/flextron`` is parsed with :mod:`ast` (nothing is imported) and
every import *edge* ``importer -> imported`` is collected, wherever it is written: at module
level, inside functions and methods, under ``if TYPE_CHECKING:`` or ``try:``. An edge comes from

* ``import flextron.x.y`` and ``from flextron.x import y`` (to ``flextron.x.y`` when that is a
  module of the tree, else to ``flextron.x``);
* relative imports of any level (``from . import x``, ``from ..model.space import ArchConfig``),
  resolved against the importing module's package (for a package ``__init__`` the package itself);
* ``importlib.import_module("flextron.x")`` and ``import_module(".x", __name__)`` /
  ``import_module(".x", package="flextron")`` with a constant string first argument.

Each module belongs to the *layer* of the longest dotted prefix in ``LAYERS`` that matches it
(lowest layer first). The rules:

1. **layer**: every module belongs to a layer other than the bare ``flextron`` package, which is
   the public API (``flextron/__init__.py``) only; a stray ``flextron/foo.py`` fails.
2. **backward edge**: a module may import from its own layer or a lower one, never a later one.
3. **cycle**: the module graph (all edges, function-level ones too) has no cycle, including
   ``package -> package.sub -> package``; a module importing itself is ignored.
4. **private name**: no ``from m import _x`` and no ``m._x`` where ``m`` is another flextron
   module (dunders such as ``__version__`` are public; a private submodule may be used inside
   its own package).
5. **benchmark code**: the library never imports the top-level ``benchmarks`` package, nor
   ``flextron.bench`` / ``flextron.baselines``.

Modules outside flextron (torch, the standard library, ...) are ignored, except for rule 5.
The checker is a set of pure functions over ``{module name: source text}``, so the same code runs
on the real tree and on the small synthetic packages of the tests below. Every real module must
also have a module docstring.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "flextron"

# The layers, lowest first. A module may import from its own layer and the ones above it in this list.
LAYERS = [
    ("base", ("flextron.errors", "flextron.version", "flextron.files")),
    ("config", ("flextron.config",)),
    ("data", ("flextron.data",)),
    ("model", ("flextron.model",)),
    ("cost", ("flextron.cost",)),
    ("routing", ("flextron.routing",)),
    ("train", ("flextron.train",)),
    ("eval", ("flextron.eval",)),
    ("report", ("flextron.report",)),
    ("pipeline", ("flextron.pipeline",)),
    ("cli", ("flextron.cli", "flextron.lm_eval", "flextron.__main__")),
    ("api", ("flextron",)),  # the package's own __init__ (lazy public names) only
]

BENCHMARK_MODULES = ("benchmarks", "flextron.bench", "flextron.baselines")

# rule names, as they appear in the violations
LAYER, BACKWARD, CYCLE, PRIVATE, BENCHMARK = "layer", "backward edge", "cycle", "private name", "benchmark code"


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    in_function: bool  # written inside a function or method (a deferred import)


@dataclass(frozen=True)
class Violation:
    rule: str
    module: str
    message: str

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------- names and layers


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the longest matching prefix; None for a module that only the bare
    ``flextron`` prefix covers (other than ``flextron`` itself) or that is not flextron's."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if _within(module, prefix) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is not None and LAYERS[best][0] == "api" and module != "flextron":
        return None
    return best


def _packages(sources: dict[str, str]) -> set[str]:
    """Names that are packages: ``flextron`` and every name another module sits under."""
    found = {"flextron"} if "flextron" in sources else set()
    for name in sources:
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return found


def _package_of(module: str, packages: set[str]) -> str:
    """The package relative imports start from: the module itself for a package ``__init__``."""
    return module if module in packages else module.rpartition(".")[0]


def _resolve_relative(name: str, level: int, package: str) -> str | None:
    """``from <level dots><name>`` inside ``package``; None when it climbs above the top."""
    parts = package.split(".") if package else []
    if level - 1 > len(parts) - 1 or not parts:
        return None
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# --------------------------------------------------------------------------- reading one module


class _ModuleScan(ast.NodeVisitor):
    """Edges, bindings of names to flextron modules, and raw findings of one module's source."""

    def __init__(self, module: str, modules: set[str], packages: set[str]):
        self.module, self.modules = module, modules
        self.package = _package_of(module, packages)
        self.edges: list[Edge] = []
        self.benchmark: list[tuple[int, str]] = []  # (line, imported name)
        self.private: list[tuple[int, str]] = []  # (line, "owner._name")
        self.bound: dict[str, str] = {}  # local name -> flextron module it names
        self.attributes: list[ast.Attribute] = []
        self._depth = 0  # > 0 inside a function

    # -- scopes
    def _function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    # -- helpers
    def _edge(self, target: str, line: int) -> None:
        if any(_within(target, b) for b in BENCHMARK_MODULES):
            self.benchmark.append((line, target))
        if _within(target, "flextron"):
            self.edges.append(Edge(self.module, target, line, self._depth > 0))

    def _private_use(self, owner: str, name: str, line: int) -> None:
        """``name`` taken from flextron module ``owner``: flag it if private and not our own."""
        if not _is_private(name) or not _within(owner, "flextron") or owner == self.module:
            return
        if f"{owner}.{name}" in self.modules and _within(self.module, owner):
            return  # a private submodule used inside its own package
        self.private.append((line, f"{owner}.{name}"))

    # -- import statements
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._edge(alias.name, node.lineno)
            if alias.asname:
                self.bound[alias.asname] = alias.name
            else:
                top = alias.name.partition(".")[0]
                self.bound[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            source = _resolve_relative(node.module or "", node.level, self.package)
            if source is None:
                return
        else:
            source = node.module or ""
        targets = {}  # one edge per imported module of the statement, in order
        for alias in node.names:
            candidate = f"{source}.{alias.name}"
            is_module = candidate in self.modules or (
                # a benchmark module need not be in the tree to be forbidden
                alias.name != "*" and any(_within(candidate, b) for b in BENCHMARK_MODULES)
            )
            targets[candidate if is_module else source] = None
            if is_module:
                self.bound[alias.asname or alias.name] = candidate
            self._private_use(source, alias.name, node.lineno)
        for target in targets:
            self._edge(target, node.lineno)

    # -- importlib.import_module("...")
    def _import_module_target(self, node: ast.Call) -> str | None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name != "import_module" or not node.args:
            return None
        first = node.args[0]
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            return None
        target = first.value
        if not target.startswith("."):
            return target
        package_arg = (
            node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "package"), None)
        )
        if isinstance(package_arg, ast.Constant) and isinstance(package_arg.value, str):
            package = package_arg.value
        elif isinstance(package_arg, ast.Name) and package_arg.id == "__name__":
            package = self.module
        elif isinstance(package_arg, ast.Name) and package_arg.id == "__package__":
            package = self.package
        else:
            return None
        level = len(target) - len(target.lstrip("."))
        return _resolve_relative(target[level:], level, package)

    def visit_Call(self, node: ast.Call) -> None:
        target = self._import_module_target(node)
        if target is not None:
            self._edge(target, node.lineno)
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        # m = importlib.import_module("flextron.x")  binds m like ``import flextron.x as m``
        if len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Call):
            target = self._import_module_target(node.value)
            if target is not None:
                self.bound[node.targets[0].id] = target
        self.generic_visit(node)

    # -- alias._x
    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.attributes.append(node)
        self.generic_visit(node)

    def finish(self) -> None:
        """Check ``alias._x`` once all bindings are known (a function may use a later import)."""
        for node in self.attributes:
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if not isinstance(value, ast.Name) or value.id not in self.bound:
                continue
            owner = ".".join([self.bound[value.id], *reversed(chain)])
            if owner == self.bound[value.id] or owner in self.modules:  # the value is a module
                self._private_use(owner, node.attr, node.lineno)


def scan(module: str, source: str, modules: set[str], packages: set[str]) -> _ModuleScan:
    scanner = _ModuleScan(module, modules, packages)
    scanner.visit(ast.parse(source, filename=module))
    scanner.finish()
    return scanner


# --------------------------------------------------------------------------- the rules


def find_cycles(edges: list[Edge]) -> list[list[str]]:
    """One cycle path (first node repeated at the end) per strongly connected group of modules."""
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        if e.importer != e.imported:
            graph[e.importer].add(e.imported)
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for group in groups:
        start = min(group)
        # shortest way back to start, inside the group (breadth first)
        previous: dict[str, str] = {}
        frontier = [start]
        while start not in previous:
            next_frontier = []
            for v in frontier:
                for w in sorted(graph[v] & group):
                    if w not in previous:
                        previous[w] = v
                        next_frontier.append(w)
            frontier = next_frontier
        path, v = [start], previous[start]
        while v != start:
            path.append(v)
            v = previous[v]
        cycles.append([start, *reversed(path[1:]), start])
    return sorted(cycles)


def collect(sources: dict[str, str], packages: set[str] | None = None) -> dict[str, _ModuleScan]:
    """Scan every module of ``{module name: source}``; ``packages`` defaults to the inferred ones."""
    packages = _packages(sources) if packages is None else packages
    modules = set(sources)
    return {name: scan(name, text, modules, packages) for name, text in sorted(sources.items())}


def check(
    sources: dict[str, str], packages: set[str] | None = None, scans: dict[str, _ModuleScan] | None = None
) -> list[Violation]:
    """All violations of the layer rules in the synthetic or real package ``sources``
    (``scans``: the result of ``collect(sources, packages)`` when already at hand)."""
    scans = collect(sources, packages) if scans is None else scans
    edges = [e for s in scans.values() for e in s.edges]
    found: list[Violation] = []

    for name in sorted(sources):
        if layer_of(name) is None:
            found.append(Violation(LAYER, name, f"module {name} belongs to no layer; add it to LAYERS or move it"))
    for e in edges:
        benchmark = any(_within(e.imported, b) for b in BENCHMARK_MODULES)  # reported as benchmark code
        if e.imported not in sources and layer_of(e.imported) is None and not benchmark:
            found.append(
                Violation(LAYER, e.importer, f"{e.importer}:{e.line} imports {e.imported}, which belongs to no layer")
            )

    for e in edges:
        low, high = layer_of(e.importer), layer_of(e.imported)
        if low is not None and high is not None and high > low:
            where = " (inside a function)" if e.in_function else ""
            found.append(
                Violation(
                    BACKWARD,
                    e.importer,
                    f"{e.importer}:{e.line} -> {e.imported}{where}: "
                    f"layer {LAYERS[low][0]!r} imports the later layer {LAYERS[high][0]!r}",
                )
            )

    for cycle in find_cycles(edges):
        found.append(Violation(CYCLE, cycle[0], " -> ".join(cycle)))

    for name, s in scans.items():
        for line, taken in s.private:
            found.append(Violation(PRIVATE, name, f"{name}:{line} uses the private name {taken}"))
        for line, imported in s.benchmark:
            found.append(Violation(BENCHMARK, name, f"{name}:{line} imports benchmark code {imported}"))
    return found


def missing_docstrings(sources: dict[str, str]) -> list[str]:
    return sorted(name for name, text in sources.items() if ast.get_docstring(ast.parse(text)) is None)


def report(violations: list[Violation]) -> str:
    """The violations grouped by rule, one per line, for an assertion message."""
    by_rule: dict[str, list[Violation]] = defaultdict(list)
    for v in violations:
        by_rule[v.rule].append(v)
    lines = [f"{len(violations)} import-rule violations in src/flextron:"]
    for rule in (LAYER, BACKWARD, CYCLE, PRIVATE, BENCHMARK):
        if by_rule[rule]:
            lines.append(f"  {rule} ({len(by_rule[rule])}):")
            lines.extend(f"    {v}" for v in by_rule[rule])
    return "\n".join(lines)


def read_tree(root: Path = SRC) -> tuple[dict[str, str], set[str]]:
    """``{module name: source}`` and the package names of the real tree under ``root``."""
    sources, packages = {}, set()
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts.pop()
            packages.add(".".join(parts))
        sources[".".join(parts)] = path.read_text(encoding="utf-8")
    return sources, packages


# --------------------------------------------------------------------------- the real tree


def test_real_tree_follows_the_layers():
    sources, packages = read_tree()
    scans = collect(sources, packages)
    edges = {(e.importer, e.imported) for s in scans.values() for e in s.edges}
    deferred = {(e.importer, e.imported) for s in scans.values() for e in s.edges if e.in_function}
    violations = check(sources, packages, scans)
    undocumented = missing_docstrings(sources)
    print(f"\nflextron import layers: {len(sources)} modules, {len(edges)} edges ({len(deferred)} inside functions)")
    print("layer order (lowest first): " + " < ".join(name for name, _ in LAYERS))
    print(f"{len(violations)} violations")
    problems = [report(violations)] if violations else []
    if undocumented:
        problems.append(f"modules without a module docstring: {', '.join(undocumented)}")
    if problems:  # raised directly: the message is the whole story, no introspection of the list
        raise AssertionError("\n".join(problems))


# --------------------------------------------------------------------------- synthetic packages


def rules(sources: dict[str, str]) -> list[tuple[str, str]]:
    return [(v.rule, v.module) for v in check(sources)]


def edges_of(sources: dict[str, str]) -> set[tuple[str, str]]:
    return {(e.importer, e.imported) for s in collect(sources).values() for e in s.edges}


CLEAN = {
    "flextron": '"""api"""\nimport importlib\n',
    "flextron.errors": "class FlextronError(Exception): pass\n",
    "flextron.config": "from flextron.errors import FlextronError\nfrom .errors import __doc__\n",
    "flextron.model": "from .space import ArchConfig\n",
    "flextron.model.space": "from ..config import x\nfrom . import _impl\nfrom ._impl import helper\n",
    "flextron.model._impl": "import torch\nimport flextron.errors as errors\n",
    "flextron.pipeline.runner": "from flextron.model.space import ArchConfig\nfrom flextron import model\n",
    "flextron.cli": "import flextron.pipeline.runner\nimport argparse\n",
}


def test_clean_synthetic_package_has_no_violations():
    assert check(CLEAN) == []
    assert ("flextron.model.space", "flextron.model._impl") in edges_of(CLEAN)
    assert ("flextron.pipeline.runner", "flextron.model") in edges_of(CLEAN)


def test_backward_edge_is_reported():
    sources = {
        "flextron.model.space": "from flextron.pipeline.runner import x\n",
        "flextron.pipeline.runner": "from flextron.config import RunConfig\n",
    }  # downward: fine
    found = check(sources)
    assert [(v.rule, v.module) for v in found] == [(BACKWARD, "flextron.model.space")]
    assert "flextron.model.space:1 -> flextron.pipeline.runner" in found[0].message
    assert "'model' imports the later layer 'pipeline'" in found[0].message


def test_lower_layers_may_not_use_the_public_api():
    assert rules({"flextron.config": "from flextron import load_config\n"}) == [(BACKWARD, "flextron.config")]


def test_function_level_import_is_seen():
    sources = {"flextron.data": "def load():\n    if True:\n        from flextron.train import loop\n"}
    assert rules(sources) == [(BACKWARD, "flextron.data")]
    assert "(inside a function)" in check(sources)[0].message


def test_cycle_is_reported_with_its_path():
    sources = {
        "flextron.eval.a": "from flextron.eval.b import x\n",
        "flextron.eval.b": "def f():\n    import flextron.eval.c\n",
        "flextron.eval.c": "import flextron.eval.a\nimport flextron.eval.c\n",
    }
    found = check(sources)
    assert [(v.rule, str(v)) for v in found] == [
        (CYCLE, "flextron.eval.a -> flextron.eval.b -> flextron.eval.c -> flextron.eval.a")
    ]


def test_package_and_its_submodule_importing_each_other_is_a_cycle():
    sources = {
        "flextron.model": "from .space import ArchConfig\n",
        "flextron.model.space": "from flextron.model import helper\n",
    }
    assert [str(v) for v in check(sources)] == ["flextron.model -> flextron.model.space -> flextron.model"]


def test_private_name_from_another_module_is_reported():
    sources = {
        "flextron.routing.router": "from flextron.model.space import _helper, __version__\n",
        "flextron.model.space": "_helper = 1\n",
    }
    assert [str(v) for v in check(sources)] == [
        "flextron.routing.router:1 uses the private name flextron.model.space._helper"
    ]


def test_private_attribute_through_an_import_alias_is_reported():
    sources = {
        "flextron.train.loop": "import flextron.model.space as sp\nfrom ..model import space\n"
        "def f():\n    return sp._cache, space._cache, sp.__doc__, sp.public\n",
        "flextron.model": "",
        "flextron.model.space": "_cache = {}\n",
    }
    assert [str(v) for v in check(sources)] == [
        "flextron.train.loop:4 uses the private name flextron.model.space._cache",
        "flextron.train.loop:4 uses the private name flextron.model.space._cache",
    ]


def test_benchmark_code_is_reported():
    sources = {
        "flextron.eval.speed": "import benchmarks.speed\n",
        "flextron.eval.memory": "from benchmarks import memory\n",
        "flextron.report": "def f():\n    from flextron import baselines\n    import flextron.bench\n",
    }
    assert sorted(rules(sources)) == [
        (BENCHMARK, "flextron.eval.memory"),
        (BENCHMARK, "flextron.eval.speed"),
        (BENCHMARK, "flextron.report"),
        (BENCHMARK, "flextron.report"),
    ]
    # names that merely start like them are not benchmark code
    assert check({"flextron.cli": "import benchmark_tools\nfrom flextron.cli.benchmarks import x\n"}) == []


def test_stray_top_level_module_belongs_to_no_layer():
    assert [str(v) for v in check({"flextron.foo": "x = 1\n"})] == [
        "module flextron.foo belongs to no layer; add it to LAYERS or move it"
    ]
    # prefixes match whole dotted parts: flextron.configs is not flextron.config
    assert layer_of("flextron.configs") is None and layer_of("flextron.lm_eval_model") is None
    assert [LAYERS[layer_of(m)][0] for m in ("flextron", "flextron.lm_eval", "flextron.model.space.x")] == [
        "api",
        "cli",
        "model",
    ]


def test_relative_imports_of_level_one_and_two():
    sources = {
        "flextron.routing": "from . import policy\nfrom .policy import Router\n",
        "flextron.routing.policy": "from ..model.space import ArchConfig\nfrom .. import errors\n"
        "from . import weights\n",
        "flextron.routing.weights": "",
        "flextron.model.space": "",
        "flextron.errors": "",
    }
    assert edges_of(sources) == {
        ("flextron.routing", "flextron.routing.policy"),
        ("flextron.routing.policy", "flextron.model.space"),
        ("flextron.routing.policy", "flextron.errors"),
        ("flextron.routing.policy", "flextron.routing.weights"),
    }
    assert check(sources) == []
    # the same level-2 import from a lower layer is a backward edge
    assert rules({"flextron.data.shards": "from ..routing.policy import Router\n"}) == [
        (BACKWARD, "flextron.data.shards")
    ]


def test_importlib_import_module_is_an_edge():
    sources = {
        "flextron": "import importlib\nimportlib.import_module('.pipeline', __name__)\n",
        "flextron.model.space": "from importlib import import_module\n"
        "def f():\n    return import_module('.cost.table', package='flextron')\n",
        "flextron.model.load": "import importlib\nm = importlib.import_module('flextron.train.loop')\n"
        "importlib.import_module('.io', __name__)\nm._private\n",
    }
    assert edges_of(sources) == {
        ("flextron", "flextron.pipeline"),
        ("flextron.model.space", "flextron.cost.table"),
        ("flextron.model.load", "flextron.train.loop"),
        ("flextron.model.load", "flextron.model.load.io"),
    }
    assert sorted(rules(sources)) == [
        (BACKWARD, "flextron.model.load"),
        (BACKWARD, "flextron.model.space"),
        (PRIVATE, "flextron.model.load"),
    ]


def test_missing_module_docstring_is_found():
    assert missing_docstrings({"flextron.a": '"""Doc."""\nx = 1\n', "flextron.b": "x = 1\n"}) == ["flextron.b"]

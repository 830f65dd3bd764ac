"""The layering reads bottom-up: no folder reaches up into the layers above it, and no module imports
itself back through others (not even inside a function)."""

import ast
from pathlib import Path

import splitlora

PACKAGE = Path(splitlora.__file__).parent
# folder -> splitlora modules its files must not import (directly or as a submodule)
# the top: benchmarks measure the framework, experiments (which run on the benchmarks' harness) the method
TOP = ("bench", "experiments")
ABOVE_MODELS = ("runtime", "algorithms", "transport", "simulation", "cli", "privacy", "eval", *TOP)
FORBIDDEN = {"data": ("models", *ABOVE_MODELS),
             "models": ("data", *ABOVE_MODELS),
             "eval": ("runtime", "algorithms", "transport", "simulation", "cli", "privacy", *TOP),
             "runtime": ("algorithms", "transport", "simulation", "cli", "privacy.audit", *TOP),
             "algorithms": ("transport", "simulation", "cli", "privacy.audit", *TOP),
             "transport": ("simulation", *TOP),
             "simulation": ("transport", "cli", *TOP),
             "bench": ("cli", "experiments"),
             "experiments": ("cli",)}
# the bottom layer: these files import no other splitlora module but each other
BOTTOM = ("errors", "registry", "device", "messages")
# beside the config, torch-free: the config's own helpers (what parses a command line into it)
CONFIG = ("config", "flags")


def _imports(path: Path, package: tuple[str, ...]) -> set[str]:
    """Every splitlora module ``path`` (a file of subpackage ``package``) imports, as a dotted name
    below the package ("transport.wire")."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(package[:len(package) - node.level + 1])
                names = base + (node.module.split(".") if node.module else [])
                found.add(".".join(names))
                found.update(".".join(names + [a.name]) for a in node.names)
            elif node.module and node.module.startswith("splitlora."):
                found.add(node.module.removeprefix("splitlora."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("splitlora.") for a in node.names if a.name.startswith("splitlora."))
    return found


def test_no_folder_imports_a_layer_above_it():
    bad = []
    for folder, forbidden in FORBIDDEN.items():
        files = sorted((PACKAGE / folder).glob("*.py"))
        assert files, folder
        for path in files:
            for name in _imports(path, (folder,)):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not bad, bad


def test_the_bottom_layer_imports_only_itself():
    bad = [f"{name}.py imports {m}" for name in BOTTOM
           for m in _imports(PACKAGE / f"{name}.py", ()) if m.split(".")[0] not in BOTTOM]
    assert not bad, bad


def test_the_config_layer_imports_only_the_bottom_and_itself():
    bad = [f"{name}.py imports {m}" for name in CONFIG
           for m in _imports(PACKAGE / f"{name}.py", ()) if m.split(".")[0] not in (*BOTTOM, *CONFIG)]
    assert not bad, bad


def _module_graph() -> dict[str, set[str]]:
    """splitlora module -> the splitlora modules it imports anywhere in its file (function bodies too)."""
    names = {".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    names.pop("__init__", None)

    def module_of(dotted: str) -> str | None:
        parts = dotted.split(".")
        return next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in names), None)

    graph = {}
    for name, path in names.items():
        package = tuple(path.relative_to(PACKAGE).parts[:-1])
        graph[name] = {m for m in map(module_of, _imports(path, package)) if m and m != name}
    return graph


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_circle():
    assert _circle(_module_graph()) is None, " -> ".join(_circle(_module_graph()))


def test_the_circle_finder_finds_one():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The scan above is not vacuous: a relative import of the transport is caught."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..transport.wire import tensor_to_proto\nfrom . import grid\nimport splitlora.simulation\n")
    assert {"transport.wire", "runtime.grid", "simulation"} <= _imports(probe, ("runtime",))


# ---- the algorithm owns its layout -----------------------------------------------------------------

ALGORITHM_NAMES = {"splitlora", "sl", "fed", "cen"}


def _names_an_algorithm(tree: ast.AST) -> list[int]:
    """Lines that branch on, or look up, an algorithm by name: ``x == "cen"``, ``x in ("cen", "sl")``,
    ``ALGORITHMS["fed"]``."""
    def named(node) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in ALGORITHM_NAMES
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(named(e) for e in node.elts)

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(named(x) for x in [node.left, *node.comparators]):
            lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and named(node.slice):
            lines.append(node.lineno)
    return lines


def test_no_algorithm_is_named_outside_algorithms():
    """Which parties exist, what data each holds and what crosses is the algorithm's to say
    (``Algorithm.parties``, ``party_items``, ``whole_clients``, ...), not a branch on its name elsewhere.
    Names stay data: the list of algorithms an experiment compares, a row's label."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "algorithms" or rel.name == "registry.py":
            continue
        bad += [f"{rel}:{line}" for line in _names_an_algorithm(ast.parse(path.read_text()))]
    assert not bad, bad


def test_the_name_checker_sees_a_branch_on_a_name():
    tree = ast.parse('if cfg.algorithm == "cen":\n    n = 1\nok = cfg.algorithm in ("x", "sl")\nA = ALGORITHMS["fed"]\n'
                     'help = "splitlora | sl | fed | cen"\n')
    assert _names_an_algorithm(tree) == [1, 3, 4]

"""The layering reads bottom-up: the schedules and roles never reach up into a transport or the loop."""

import ast
from pathlib import Path

import splitlora

PACKAGE = Path(splitlora.__file__).parent
# folder -> splitlora modules its files must not import (directly or as a submodule)
FORBIDDEN = {"runtime": ("transport", "train", "cli", "bench", "privacy.audit"),
             "algorithms": ("transport", "train", "cli", "bench", "privacy.audit")}


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


def test_runtime_and_algorithms_do_not_import_transport_or_the_loop():
    bad = []
    for folder, forbidden in FORBIDDEN.items():
        files = sorted((PACKAGE / folder).glob("*.py"))
        assert files, folder
        for path in files:
            for name in _imports(path, (folder,)):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not bad, bad


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The scan above is not vacuous: a relative import of the transport is caught."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..transport.wire import tensor_to_proto\nfrom . import grid\nimport splitlora.train\n")
    assert {"transport.wire", "runtime.grid", "train"} <= _imports(probe, ("runtime",))

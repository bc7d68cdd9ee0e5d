"""The layout shows the layers: commands -> driver -> training -> compile -> step ->
(distribute, data, models, regularizers) -> common.

Each module of the package (and of the experiments, installed as ``trainer.experiments``)
may import modules of its own layer or of a lower one, never of a higher one; nothing of
``trainer/``, ``experiments/`` or ``benchmarks/`` imports in a circle; no two modules share a
name; the top of ``trainer/`` holds only the package face and the commands. Imports inside
functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Lowest first. A name matches a module and everything under it; the longest match wins.
LAYERS = [
    ("common", ["trainer.common"]),
    ("building blocks", ["trainer.distribute", "trainer.data", "trainer.models",
                         "trainer.regularizers"]),
    ("step", ["trainer.step"]),
    ("compile", ["trainer.compile"]),
    ("training", ["trainer.training", "trainer.callbacks"]),
    ("driver", ["trainer.driver", "trainer.experiments"]),
    ("commands", ["trainer.__main__", "trainer.evaluate", "trainer.predict", "trainer.summary",
                  "trainer.export_data", "trainer.export", "trainer.launch", "trainer.lr_find"]),
]
#: The top of trainer/: the package face and one small module per command.
COMMANDS = {"__init__.py", "__main__.py", "evaluate.py", "predict.py", "summary.py",
            "export_data.py", "export.py", "launch.py", "lr_find.py"}


def _layer(module: str) -> int:
    best, level = "", None
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, level = name, i
    return level


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "experiments":
        parts = ("trainer", *parts)
    return ".".join(p for p in parts if p != "__init__")


def _sources(*folders):
    for folder in folders:
        yield from sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _modules():
    for path in _sources("trainer", "experiments"):
        yield _module_name(path), path


KNOWN = {_module_name(p) for p in _sources("trainer", "experiments", "benchmarks")}


def _imports(path: Path, prefixes=("trainer",)) -> set[str]:
    """The modules ``path`` imports whose names start with one of ``prefixes``: ``from a.b
    import c`` counts ``a.b.c`` when that is a module, else ``a.b``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith(prefixes):
                continue
            subs = {f"{node.module}.{a.name}" for a in node.names} & KNOWN
            found.update(subs or {node.module})
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(prefixes))
    return found


MODULES = [(name, path) for name, path in _modules() if name != "trainer"]


def test_every_module_has_a_layer():
    # The package facade (trainer/__init__.py, lazy re-exports) is the only module outside.
    missing = [name for name, _ in MODULES if _layer(name) is None]
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


@pytest.mark.parametrize("name,path", MODULES, ids=[name for name, _ in MODULES])
def test_imports_point_down(name, path):
    own = _layer(name)
    upward = [(imp, LAYERS[_layer(imp)][0]) for imp in sorted(_imports(path))
              if imp != "trainer" and _layer(imp) is not None and _layer(imp) > own]
    assert not upward, f"{name} ({LAYERS[own][0]} layer) imports from higher layers: {upward}"


def test_the_step_layer_knows_nothing_of_the_loop():
    for name in ("trainer.step.base", "trainer.step.tape_step", "trainer.step.tape",
                 "trainer.common.keys"):
        path = ROOT / (name.replace(".", "/") + ".py")
        loop = {"trainer.compile.executions", "trainer.training.trainer", "trainer.compile.xla"}
        assert not loop & _imports(path), name


def test_the_rule_catches_an_upward_import(tmp_path):
    # The checker itself: a step module importing the compiler is reported.
    bad = tmp_path / "step.py"
    bad.write_text("from trainer.compile.executions import make_execution\n")
    upward = [imp for imp in _imports(bad) if _layer(imp) > _layer("trainer.step.base")]
    assert upward == ["trainer.compile.executions"]


def _graph() -> dict[str, set[str]]:
    """Module -> the modules of trainer/, experiments/ and benchmarks/ it imports (a package
    imports its ``__init__``'s imports; importing ``a.b`` runs ``a`` too, which is not an
    arrow: packages' faces re-export, they are not depended on in a loop)."""
    graph = {}
    for path in _sources("trainer", "experiments", "benchmarks"):
        name = _module_name(path)
        graph[name] = {m for m in _imports(path, ("trainer", "benchmarks")) if m in KNOWN} - {
            name}
    return graph


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in colour and (found := visit(nxt)):
                return found
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if node not in colour and (found := visit(node)):
            return found
    return None


def test_nothing_imports_in_a_circle():
    assert _circle(_graph()) is None, " -> ".join(_circle(_graph()))


def test_the_circle_check_finds_one():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set()}) is None


def test_no_two_modules_share_a_name():
    names = Counter(p.name for p in _sources("trainer") if p.name not in ("__init__.py",
                                                                         "base.py"))
    assert not [n for n, count in names.items() if count > 1]


def test_the_top_of_the_package_is_its_face_and_the_commands():
    top = {p.name for p in (ROOT / "trainer").glob("*.py")}
    assert top == COMMANDS
    for name in COMMANDS - {"__init__.py"}:
        lines = len((ROOT / "trainer" / name).read_text().splitlines())
        assert lines <= 130, f"trainer/{name} has {lines} lines: move its logic to a sub-package"

"""Imports point down: driver -> trainer -> compiler -> step -> tape/regularizers -> bottom.

Each module of the package (and of the experiments, installed as ``trainer.experiments``)
may import modules of its own layer or of a lower one, never of a higher one. Imports inside
functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Lowest first. A name matches a module and everything under it; the longest match wins.
LAYERS = [
    ("bottom", ["trainer.errors", "trainer.keys", "trainer.metrics", "trainer.periodic",
                "trainer.config", "trainer.distribute", "trainer.replicas", "trainer.atomic"]),
    ("tape and building blocks", ["trainer.tape", "trainer.freeze", "trainer.optim",
                                  "trainer.schedules",
                                  "trainer.regularizers", "trainer.models", "trainer.data"]),
    ("step", ["trainer.step", "trainer.supervised"]),
    ("compiler", ["trainer.loop", "trainer.xla", "trainer.pacing"]),
    ("trainer", ["trainer.trainer", "trainer.state", "trainer.callbacks", "trainer.resume",
                 "trainer.preemption", "trainer.calibrate"]),
    ("driver", ["trainer.run", "trainer.__main__", "trainer.lock", "trainer.rundir",
                "trainer.validation",
                "trainer.experiments", "trainer.launch", "trainer.export_data",
                "trainer.summary", "trainer.inference",
                "trainer.evaluate", "trainer.predict"]),
]


def _layer(module: str) -> int:
    best, level = "", None
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, level = name, i
    return level


def _modules():
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        yield name, path
    for path in sorted((ROOT / "experiments").glob("*.py")):
        yield "trainer.experiments." + path.stem, path


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trainer"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("trainer"))
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
    for name in ("trainer.step", "trainer.supervised", "trainer.tape", "trainer.keys"):
        path = ROOT / (name.replace(".", "/") + ".py")
        assert not {"trainer.loop", "trainer.trainer", "trainer.xla"} & _imports(path), name


def test_the_rule_catches_an_upward_import(tmp_path):
    # The checker itself: a step module importing the compiler is reported.
    bad = tmp_path / "step.py"
    bad.write_text("from trainer.loop import make_execution\n")
    upward = [imp for imp in _imports(bad) if _layer(imp) > _layer("trainer.step")]
    assert upward == ["trainer.loop"]

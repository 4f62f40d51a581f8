"""The house's layering: imports point down only, and no module imports itself round a cycle.

Layers, from the bottom: files and plain data (``storage``, ``datasets``, ``machine``, ``pixel_space``, ``figures``) →
pure tensor math (``functional``) → LightningModules and their nets (``models``) → poisoning attacks (``poisons``) →
``datamodules`` and ``callbacks`` (side by side: neither imports the other) → ``run`` (the runner and console
scripts, the only place that composes everything). Every import of a ``lit_robust`` module, at any depth of a
function, is read from the source with ``ast``, so a lazy import counts too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

# package folder in the repository → dotted name it is installed as (pyproject's package-dir)
SOURCES = {REPO / "lit_robust": "lit_robust", REPO / "callbacks": "lit_robust.callbacks",
           REPO / "datamodules": "lit_robust.datamodules"}
LAYERS = [  # (dotted prefix, layer); the longest matching prefix decides
    ("lit_robust.storage", 0), ("lit_robust.datasets", 0), ("lit_robust.machine", 0), ("lit_robust.pixel_space", 0),
    ("lit_robust.figures", 0), ("lit_robust.conf", 0), ("lit_robust.functional", 1), ("lit_robust.models", 2),
    ("lit_robust.poisons", 3), ("lit_robust.datamodules", 4), ("lit_robust.callbacks", 4), ("lit_robust.run", 5),
    ("lit_robust", 6),  # the package's __init__: lazy re-exports of everything
]


def layer_of(module: str) -> tuple[str, int]:
    prefix, layer = max(((p, n) for p, n in LAYERS if module == p or module.startswith(p + ".")),
                        key=lambda pair: len(pair[0]))
    return prefix, layer


def modules() -> dict[str, Path]:
    found = {}
    for folder, dotted in SOURCES.items():
        for path in folder.rglob("*.py"):
            if folder == REPO / "lit_robust" and path.relative_to(folder).parts[0] in ("callbacks", "datamodules"):
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([dotted, *parts])] = path
    return found


def imported(path: Path, module: str, known: set[str]) -> set[str]:
    """The lit_robust modules ``path`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    return {name for name in names if name in known}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {module: imported(path, module, set(found)) - {module} for module, path in found.items()}


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        prefix, layer = layer_of(module)
        for target in targets:
            target_prefix, target_layer = layer_of(target)
            if target_layer > layer or (target_layer == layer and target_prefix != prefix):
                bad.append(f"{module} → {target}")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once (depth-first search; a package importing its own submodules is not a cycle)."""
    found, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if module.startswith(target + "."):  # a submodule importing its package's __init__
                continue
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_imports_point_down_only():
    assert upward_arrows(import_graph()) == []


def test_no_import_cycles():
    graph = {module: {t for t in targets if not t.startswith(module + ".")}
             for module, targets in import_graph().items() if module != "lit_robust"}
    assert cycles(graph) == []


@pytest.mark.parametrize("arrow", [
    ("lit_robust.datamodules.poisoned", "lit_robust.callbacks.metrics_file"),
    ("lit_robust.poisons.narcissus", "lit_robust.datamodules.digits"),
    ("lit_robust.functional.missingness_bias", "lit_robust.models.smoothed_vit"),
    ("lit_robust.models.classifier", "lit_robust.run.runner"),
])
def test_each_arrow_up_is_caught(arrow):
    """The check itself: each arrow that once pointed up, put back, is reported."""
    graph = import_graph()
    graph[arrow[0]] = graph[arrow[0]] | {arrow[1]}
    assert f"{arrow[0]} → {arrow[1]}" in upward_arrows(graph)


def test_a_cycle_is_caught():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_each_module_name_exists_once():
    """A name says what a file is: no two modules share one across lit_robust/, callbacks/ and datamodules/."""
    names = [path.name for path in modules().values() if path.name != "__init__.py"]
    assert sorted({name for name in names if names.count(name) > 1}) == []


def test_lit_robust_holds_at_most_eight_modules_directly():
    assert len(list((REPO / "lit_robust").glob("*.py"))) <= 8

"""The house rules of the package, read off its source with ast (function-level and
TYPE_CHECKING imports count too): no import circle, every import points down the rooms below,
no import by string in the harness, cli imported by nothing but __main__.

Rooms, lowest first; a module imports its own room or a lower rank, never a peer of its rank:

    0  kernels      attnbench.kernels: torch and triton only
    1  models       attnbench.models: mechanisms, positions, the transformer
    2  floor        attnbench.<module> at bench/'s top: errors, console, store, env, dtypes, flops, timing, ...
    3  speed, train attnbench.speed (timing sweeps), attnbench.train (training runs): peers
    4  distill      attnbench.distill: a student trained against a teacher, on train's machinery
    5  report       attnbench.report: the speed figures, quality against speed, the document
    6  devtools     attnbench.devtools: check, crosscheck, tile_sweep, host_overhead
    7  cli          attnbench.cli, attnbench.__main__
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import attnbench

RANKS = {"kernels": 0, "models": 1, "floor": 2, "speed": 3, "train": 3, "distill": 4, "report": 5, "devtools": 6, "cli": 7}
STRING_IMPORTS = ("import_module", "__import__")


def room(module: str) -> str:
    """attnbench.train.run -> train; attnbench.store -> floor; attnbench.cli -> cli."""
    parts = module.split(".")
    if len(parts) == 1:
        return "floor"
    if parts[1] in ("cli", "__main__"):
        return "cli"
    return parts[1] if parts[1] in RANKS else "floor"


def package_sources() -> dict[str, tuple[str, bool]]:
    """Every module of the installed package: name -> (source, is a package __init__)."""
    sources = {"attnbench": (Path(attnbench.__file__).read_text(), True)}
    for info in pkgutil.walk_packages(attnbench.__path__, "attnbench."):
        spec = info.module_finder.find_spec(info.name)
        sources[info.name] = (Path(spec.origin).read_text(), info.ispkg)
    return sources


def imports_of(module: str, source: str, is_package: bool, known: set[str]) -> tuple[set[str], list[str]]:
    """The attnbench modules ``module`` imports (each resolved to the longest name in ``known``)
    and its imports by string (import_module / __import__ calls)."""
    package = module if is_package else module.rpartition(".")[0]
    names, by_string = set(), []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in STRING_IMPORTS:
            by_string.append(f"{module} imports by string: {ast.unparse(node)[:80]}")
    targets = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            targets.add(name)
    return targets, by_string


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(graph: dict[str, set[str]], by_string: dict[str, list[str]]) -> list[str]:
    """Every broken rule of ``graph`` (module -> the modules it imports) and ``by_string``
    (module -> its imports by string), one line each."""
    found = [f"circle: {' <-> '.join(c)}" for c in circles(graph)]
    for module, targets in sorted(graph.items()):
        here = room(module)
        for target in sorted(targets):
            there = room(target)
            if target == "attnbench.cli" and module != "attnbench.__main__":
                found.append(f"{module} imports attnbench.cli (only __main__ may)")
            elif there != here and RANKS[there] >= RANKS[here]:
                found.append(f"{module} ({here}) imports {target} ({there}): not below it")
        if here not in ("kernels", "models"):  # the registry's discovery of models/attention/*.py is by design
            found += by_string.get(module, [])
    return found


def test_the_package_keeps_the_house():
    sources = package_sources()
    graph, by_string = {}, {}
    for module, (source, is_package) in sources.items():
        graph[module], by_string[module] = imports_of(module, source, is_package, set(sources))
    assert {"attnbench.speed.sweep", "attnbench.train.run", "attnbench.report.render", "attnbench.cli"} <= set(graph)
    assert "attnbench.train.spec" in graph["attnbench.train.run"]  # imports are really read
    assert violations(graph, by_string) == []


def test_the_check_finds_each_kind_of_break():
    """A small synthetic package with one break of each rule: each is reported, and the lawful
    edges are not."""
    graph = {
        "attnbench.store": {"attnbench.models.registry"},  # floor -> models: down, fine
        "attnbench.env": {"attnbench.speed.sweep"},  # floor -> speed: up
        "attnbench.speed.sweep": {"attnbench.train.run", "attnbench.env"},  # peer; and a circle with env
        "attnbench.train.run": {"attnbench.store"},
        "attnbench.report.render": {"attnbench.cli", "attnbench.train.run"},  # cli from below
        "attnbench.cli": {"attnbench.report.render"},
        "attnbench.__main__": {"attnbench.cli"},
        "attnbench.models.registry": {"attnbench.kernels.flash"},
        "attnbench.kernels.flash": set(),
    }
    by_string = {"attnbench.report.render": ["attnbench.report.render imports by string: importlib.import_module(name)"],
                 "attnbench.models.registry": ["attnbench.models.registry imports by string: importlib.import_module(f)"]}
    found = violations(graph, by_string)
    assert found == [
        "circle: attnbench.cli <-> attnbench.report.render",
        "circle: attnbench.env <-> attnbench.speed.sweep",
        "attnbench.env (floor) imports attnbench.speed.sweep (speed): not below it",
        "attnbench.report.render imports attnbench.cli (only __main__ may)",
        "attnbench.report.render imports by string: importlib.import_module(name)",
        "attnbench.speed.sweep (speed) imports attnbench.train.run (train): not below it",
    ]


def test_imports_are_read_from_source_as_python_resolves_them():
    source = (
        "import importlib\n"
        "from attnbench.train.spec import TrainSpec\n"
        "from . import columns\n"
        "def late():\n"
        "    from attnbench import store, errors as e\n"
        "    return importlib.import_module(name)\n"
    )
    known = {"attnbench", "attnbench.store", "attnbench.errors", "attnbench.train", "attnbench.train.spec", "attnbench.train.columns"}
    targets, by_string = imports_of("attnbench.train.run", source, False, known)
    assert targets == {"attnbench.train.spec", "attnbench.train.columns", "attnbench.store", "attnbench.errors"}
    assert by_string == ["attnbench.train.run imports by string: importlib.import_module(name)"]

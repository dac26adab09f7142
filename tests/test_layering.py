"""The package layering (README "Shape"), read from the source with `ast`: the core imports
no I/O, no config, no adapters or app code; no import cycle between agent modules."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

AGENT = ROOT / "agent"
# What agent/core may not import. cantools is allowed: decoding uses its conversion objects.
FORBIDDEN_IN_CORE = ("agent.config", "agent.adapters", "agent.app", "agent.cli", "agent.sim",
                     "agent.cloud", "paho", "socket", "sqlite3", "threading", "serial", "can",
                     "subprocess", "asyncio", "selectors")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (also inside functions)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.add(mod)
            # `from . import cose` imports the module agent.core.cose
            out.update(f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}"))
    return out


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(AGENT.rglob("*.py"))}


def test_core_imports_no_io_config_adapters_or_app():
    bad = []
    for name, path in modules().items():
        if not name.startswith("agent.core"):
            continue
        for imported in imports(path):
            if any(imported == f or imported.startswith(f + ".") for f in FORBIDDEN_IN_CORE):
                bad.append(f"{name} imports {imported}")
    assert not bad, bad


def test_the_checker_sees_relative_and_function_level_imports(tmp_path):
    """The scan must not pass by overlooking imports (the checks above would prove nothing)."""
    assert "agent.errors" in imports(AGENT / "core" / "conditions.py")  # `from ..errors`
    assert "agent.core.cose" in imports(AGENT / "core" / "commands.py")  # `from . import cose`
    assert "agent.adapters.modem" in imports(AGENT / "app" / "runtime.py")  # inside __init__


def find_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name)
    return cycles


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": ["b", "c"], "b": ["c"], "c": []}) == []


def test_no_import_cycle_between_agent_modules():
    mods = modules()
    graph = {name: sorted(i for i in imports(path) if i in mods and i != name)
             for name, path in mods.items()}
    cycles = find_cycles(graph)
    assert not cycles, [" -> ".join(c) for c in cycles]

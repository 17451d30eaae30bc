"""The package's floors, checked from its source: imports point downward, no import cycles, no private names across
packages, and no file or function grows past its size limit (see docs/architecture.md).

Every import counts, also one inside a function: a lazy import still ties two modules together."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "agentattn"

# Lowest first. A module may import from its own package and from packages on lower floors only.
FLOORS = [
    {"io", "measure", "device"},  # plumbing: files, checkpoints, timing, FLOPs, memory, device names
    {"ops"},  # the functional core
    {"layers"},
    {"models"},
    {"train"},
    {"report", "deploy", "dense", "diffusion"},  # integrations built on the models and the trainer
    {"bench"},
    {"lm"},
    {"cli"},
    {"__main__"},
]
FLOOR = {package: level for level, packages in enumerate(FLOORS) for package in packages}

MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
# The one exemption: a model family is one file, as in timm (their functions still obey the limit).
FAMILY_FILES = {
    "models/agent_deit.py",
    "models/agent_swin.py",
    "models/agent_pvt.py",
    "models/agent_cswin.py",
}
# Units over the limits today, with their size: they may shrink, never grow. Each is explained in
# docs/architecture.md ("Known debts"); a unit leaves this list when it is split.
FILE_DEBTS = {
    "ops/triton_agent.py": 770,  # four Triton kernels and their custom-op wrappers, read together
}
FUNCTION_DEBTS = {
    "ops/triton_agent.py:_read_bwd_kernel": 107,  # a Triton kernel is one function
    "ops/triton_agent.py:_gather_bwd_kernel": 102,
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = ["agentattn", *path.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "agentattn"


def _imports(module: str) -> list[tuple[str, str | None]]:
    """(imported agentattn module, imported name or None) for every import statement in ``module``."""
    path = MODULES[module]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None) if sub in MODULES else (target, alias.name))
    resolved = []
    for target, name in found:
        if not target.startswith("agentattn"):
            continue
        while target not in MODULES and "." in target:
            target = target.rsplit(".", 1)[0]
        resolved.append((target, name))
    return resolved


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_the_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = defaultdict(set)
    for module in MODULES:
        for target, _ in _imports(module):
            # a module importing its own package (``from . import x``) runs after that package began to load
            if target != module and not module.startswith(target + "."):
                graph[module].add(target)
    assert _cycles(graph) == []


def test_every_package_has_a_floor():
    packages = {_package(m) for m in MODULES} - {"agentattn", "py"}
    assert packages <= set(FLOOR), f"packages without a floor in FLOORS: {sorted(packages - set(FLOOR))}"


def test_imports_point_down():
    upward = []
    for module in MODULES:
        src = _package(module)
        if src == "agentattn":  # the top-level __init__ gathers the public API
            continue
        for target, _ in _imports(module):
            dst = _package(target)
            if dst not in (src, "agentattn") and FLOOR[dst] >= FLOOR[src]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from the same or a higher floor:\n  " + "\n  ".join(upward)


def test_no_private_names_across_packages():
    leaks = []
    for module in MODULES:
        for target, name in _imports(module):
            if _package(target) == _package(module):
                continue
            private = [
                p
                for p in [*target.split(".")[2:], name or ""]
                if p.startswith("_") and not p.startswith("__")
            ]
            if private:
                leaks.append(f"{module} imports {target}{'.' + name if name else ''}")
    assert not leaks, "private names used across packages:\n  " + "\n  ".join(leaks)


def _functions():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{rel}:{node.name}", node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("kind", ["files", "functions"])
def test_units_stay_within_their_limits(kind):
    if kind == "files":
        paths = [p for p in SRC.rglob("*.py") if p.relative_to(SRC).as_posix() not in FAMILY_FILES]
        sizes = [(p.relative_to(SRC).as_posix(), len(p.read_text().splitlines())) for p in paths]
        limit, debts = MAX_FILE_LINES, FILE_DEBTS
    else:
        sizes, limit, debts = list(_functions()), MAX_FUNCTION_LINES, FUNCTION_DEBTS
    over = [
        f"{unit}: {n} lines (limit {debts.get(unit, limit)})"
        for unit, n in sizes
        if n > debts.get(unit, limit)
    ]
    assert not over, f"{kind} over their size limit:\n  " + "\n  ".join(over)
    paid = sorted(unit for unit in debts if not any(u == unit and n > limit for u, n in sizes))
    assert not paid, f"no longer over the limit: remove from the debts list: {paid}"

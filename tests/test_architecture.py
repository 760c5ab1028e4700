"""The package's shape, as docs/architecture.md draws it, checked on the source (ast).

Layers may only import downwards: the spec at the bottom, then traffic, the xDS data
plane, the rollout engine, the outputs, and the wiring (`app.py`, the CLIs) on top.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "xds_server"
GENERATED = (PACKAGE / "admin" / "v1", PACKAGE / "lab" / "oip" / "v2")
MAX_FUNCTION_LINES = 80

WIRING = ("xds_server.app", "xds_server.cli", "xds_server.ctl")
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # importer (and its submodules): the modules (and their submodules) it must not import
    "xds_server.traffic": (
        "xds_server.xds",
        "xds_server.rollout",
        "xds_server.render",
        "xds_server.admin",
        "xds_server.lab",
        "xds_server.outputs",
        *WIRING,
    ),
    "xds_server.xds": (
        "xds_server.rollout",
        "xds_server.render",
        "xds_server.admin",
        "xds_server.lab",
        "xds_server.outputs",
        "xds_server.telemetry",
        *WIRING,
    ),
    "xds_server.rollout": (
        "xds_server.xds.publisher",
        "xds_server.xds.service",
        "xds_server.admin",
        "xds_server.lab",
        "xds_server.outputs",
        "xds_server.render",
        "xds_server.telemetry",
        *WIRING,
    ),
    "xds_server.ha": (
        "xds_server.admin",
        "xds_server.lab",
        "xds_server.outputs",
        "xds_server.render",
        "xds_server.telemetry",
        *WIRING,
    ),
    "xds_server.render": (
        "xds_server.xds.publisher",
        "xds_server.admin",
        "xds_server.lab",
        "xds_server.outputs",
        *WIRING,
    ),
}
"""The spec, at the bottom, imports nothing of the package but itself."""


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if any(folder in path.parents for folder in GENERATED):
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def imports(name: str, path: Path) -> set[str]:
    """Every xds_server module this one imports, wherever the import statement stands
    (a function-local import hides a dependency, it does not remove it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            out.add(base)
            # `from pkg import module` imports that module too.
            out.update(f"{base}.{a.name}" for a in node.names)
    known = dict(modules())
    return {m for m in out if m in known and m != name}


GRAPH = {name: imports(name, path) for name, path in modules()}


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def forbidden(importer: str, dep: str) -> bool:
    if within(importer, "xds_server.spec"):
        return not within(dep, "xds_server.spec")
    return any(
        within(importer, layer) and any(within(dep, f) for f in banned)
        for layer, banned in FORBIDDEN.items()
    )


@pytest.mark.parametrize("layer", ["xds_server.spec", *sorted(FORBIDDEN)])
def test_layers_import_only_downwards(layer: str) -> None:
    bad = [
        f"{mod} imports {dep}"
        for mod, deps in GRAPH.items()
        if within(mod, layer)
        for dep in sorted(deps)
        if forbidden(mod, dep)
    ]
    assert bad == []


def test_no_import_cycles() -> None:
    """Depth-first search for a back edge; the message is the cycle itself."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(mod: str) -> list[str] | None:
        state[mod] = 1
        stack.append(mod)
        for dep in sorted(GRAPH.get(mod, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[mod] = 2
        return None

    for mod in sorted(GRAPH):
        if mod not in state and (cycle := visit(mod)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checks_see_a_cycle_and_a_forbidden_import(tmp_path: Path) -> None:
    """The two rules above must be able to fail: a planted cycle is found."""
    saved = dict(GRAPH)
    try:
        GRAPH["xds_server.spec.model"] = {*GRAPH["xds_server.spec.model"], "xds_server.traffic"}
        with pytest.raises(pytest.fail.Exception, match="import cycle"):
            test_no_import_cycles()
        with pytest.raises(AssertionError):
            test_layers_import_only_downwards("xds_server.spec")
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def test_no_function_is_longer_than_80_lines() -> None:
    long = []
    for name, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []

"""The package's shape, as docs/architecture.md draws it, checked on the source (ast).

Every top-level package and module of `xds_server` (a *unit*) has a rule: the units it
may import. Imports only go down: the mesh spec at the bottom, then traffic, the xDS data
plane, the rollout engine and the replicas on etcd (together, the engine); beside and
above them the pure renderings, the outputs that act on the world, and the admin API;
the wiring (`app`) and the two command lines on top. The lab runs a whole control plane
on local processes, so it may use any part of it, and no part of the control plane may
import the lab: only the lab itself and the CLI (its `lab` command) do.

A unit with no rule fails `test_every_unit_has_a_rule`: a new package says where it
stands before it lands. Sizes are checked here too, on hand-written code (the generated
protobuf modules are left out).
"""

from __future__ import annotations

import ast
import re
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "xds_server"
GENERATED = (PACKAGE / "admin" / "v1", PACKAGE / "lab" / "oip" / "v2")
"""Written by hack/gen-protos.sh, never by hand: imported like any module, not sized."""

MAX_MODULE_LINES = 650
MAX_CLASS_LINES = 350
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Rule:
    """What one unit may import besides itself, and why."""

    may_import: tuple[str, ...]
    why: str
    but_not: tuple[str, ...] = ()
    """Modules inside the units of `may_import` that stay out of reach all the same."""


ENGINE = ("spec", "traffic", "xds", "rollout", "ha")
SERVER = (*ENGINE, "render", "outputs", "admin")
"""Every part of the control plane below its wiring."""
CLIENT = ("spec", "traffic", "xds", "rollout", "admin")
CLIENT_WHY = "it talks to a running server through the API's messages and runs no part of one"

RULES: dict[str, Rule] = {
    "spec": Rule((), "the mesh spec is at the bottom: everything else reads it"),
    "traffic": Rule(("spec",), "weights per pool, of the spec's pools"),
    "xds": Rule(("spec", "traffic"), "the data plane serves specs and weights, knows no rollout"),
    "rollout": Rule(
        ("spec", "traffic", "xds"),
        "the engine reaches the data plane through its port (`xds.dataplane`), not the server",
        but_not=("xds.publisher", "xds.service", "xds.metrics"),
    ),
    "ha": Rule(
        ("spec", "traffic", "xds", "rollout"),
        "replicas on etcd: the engine's ports (StateStore, DataPlane) on a shared store",
    ),
    "render": Rule(
        ("spec", "traffic", "xds", "rollout"),
        "pure renderings of specs and states: nothing that serves or runs",
        but_not=("xds.publisher", "xds.service"),
    ),
    "outputs": Rule((*ENGINE, "render"), "sinks that act on the world, from renderings"),
    "admin": Rule(
        (*ENGINE, "render", "outputs"),
        "the admin API and the dashboard: views of the running parts, operators' actions",
    ),
    "app": Rule(SERVER, "the wiring: `serve` builds the control plane, which has no lab in it"),
    "ctl_client": Rule(CLIENT, f"xdsctl's client of the admin API: {CLIENT_WHY}"),
    "ctl_output": Rule(CLIENT, f"how xdsctl prints the admin API's answers: {CLIENT_WHY}"),
    "ctl": Rule(
        (*CLIENT, "ctl_client", "ctl_output"), f"xdsctl, the admin API's command line: {CLIENT_WHY}"
    ),
    "cli_flags": Rule(
        ENGINE, "what xds-server's commands share (flags, one-line errors, logging): light"
    ),
    "cli_serve": Rule((*SERVER, "app", "cli_flags"), "`xds-server serve`: its flags, then app"),
    "cli": Rule(
        (*SERVER, "app", "lab", "cli_flags", "cli_serve"),
        "xds-server's command line: each command calls the unit that owns the work",
    ),
    "lab": Rule(
        (*SERVER, "app"),
        "the lab runs a control plane on local processes: it uses it, it is never used by it",
    ),
}

LAB = "xds_server.lab"
LAB_DOORS = ("xds_server.lab", "xds_server.cli")
"""The only importers of the lab: the lab itself and the CLI, for its `lab` command."""


# ---- the import graph ----


def modules(skip_generated: bool = False) -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if skip_generated and any(folder in path.parents for folder in GENERATED):
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


KNOWN = dict(modules())


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
    return {m for m in out if m in KNOWN and m != name}


GRAPH = {name: imports(name, path) for name, path in KNOWN.items()}


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def unit(module: str) -> str:
    """The top-level package or module a module belongs to ('' for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def units() -> set[str]:
    """The package's top-level packages and modules, as the folder holds them."""
    found = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    found.update(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    return found


def forbidden(importer: str, dep: str) -> str | None:
    """Why `importer` may not import `dep`; None when it may."""
    mine, theirs = unit(importer), unit(dep)
    if mine == theirs or not mine or not theirs:
        return None  # (`xds_server` itself is an empty package)
    rule = RULES.get(mine)
    if rule is None:
        return f"{mine} has no rule"
    if theirs not in rule.may_import:
        return f"{mine} may import only {', '.join(rule.may_import) or 'itself'}: {rule.why}"
    if any(within(dep, f"xds_server.{banned}") for banned in rule.but_not):
        return f"{mine} may not import {', '.join(rule.but_not)}: {rule.why}"
    return None


# ---- layering ----


def test_every_unit_has_a_rule(found: set[str] | None = None) -> None:
    """A new top-level package or module gets a rule here (and a row in the map) before
    it lands; a rule whose unit is gone goes too."""
    found = units() if found is None else found
    missing, stale = sorted(found - RULES.keys()), sorted(RULES.keys() - found)
    assert not missing, f"no rule in RULES for {missing}: say what each may import"
    assert not stale, f"RULES names {stale}, which the package no longer has"


def test_rules_name_only_units() -> None:
    for name, rule in RULES.items():
        assert set(rule.may_import) <= RULES.keys(), name
        assert name not in rule.may_import, f"{name} names itself"
        for banned in rule.but_not:
            assert unit(f"xds_server.{banned}") in rule.may_import, (name, banned)


Graph = dict[str, set[str]]


def violations(unit_name: str, graph: Graph = GRAPH) -> list[str]:
    return [
        f"{mod} imports {dep}: {why}"
        for mod, deps in sorted(graph.items())
        if unit(mod) == unit_name
        for dep in sorted(deps)
        if (why := forbidden(mod, dep)) is not None
    ]


def report(problems: list[str]) -> None:
    """Fail with every problem on its own line (an assert's diff would cut the list)."""
    if problems:
        pytest.fail(f"{len(problems)} found:\n" + "\n".join(problems), pytrace=False)


@pytest.mark.parametrize("unit_name", sorted(RULES))
def test_each_unit_imports_only_what_its_rule_allows(unit_name: str) -> None:
    report(violations(unit_name))


def test_the_rules_go_one_way() -> None:
    """No two units may import each other, through any chain of rules: the allowed
    imports themselves form no cycle, so the layers stay layers."""
    order: list[str] = []
    pending = dict(RULES)
    while pending:
        ready = [n for n, r in pending.items() if set(r.may_import) <= set(order)]
        assert ready, f"the rules of {sorted(pending)} allow a cycle"
        order.extend(sorted(ready))
        for n in ready:
            del pending[n]


def test_nothing_of_the_control_plane_imports_the_lab(graph: Graph = GRAPH) -> None:
    """The control plane installs and runs without the lab (an optional extra): only the
    lab and the CLI's `lab` command import it."""
    report(
        [
            f"{mod} imports {dep}"
            for mod, deps in sorted(graph.items())
            if not any(within(mod, door) for door in LAB_DOORS)
            for dep in sorted(deps)
            if within(dep, LAB)
        ]
    )


def test_no_import_cycles(graph: Graph = GRAPH) -> None:
    """Depth-first search for a back edge; the message is the cycle itself."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(mod: str) -> list[str] | None:
        state[mod] = 1
        stack.append(mod)
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[mod] = 2
        return None

    for mod in sorted(graph):
        if mod not in state and (cycle := visit(mod)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checks_can_fail() -> None:
    """The rules above must be able to fail: a planted cycle, an import upwards, an
    import of the lab and a unit with no rule are each found."""
    plant = {
        "xds_server.spec.model": "xds_server.traffic",
        "xds_server.admin.web": "xds_server.lab.mesh",
        "xds_server.rollout.observe": "xds_server.xds.service",
    }
    planted = {mod: {*deps, plant[mod]} if mod in plant else deps for mod, deps in GRAPH.items()}
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles(planted)
    assert violations("spec", planted) == [
        "xds_server.spec.model imports xds_server.traffic: spec may import only itself: "
        + RULES["spec"].why
    ]
    admin = violations("admin", planted)
    assert any("may import only" in v and "xds_server.lab.mesh" in v for v in admin)
    assert any("may not import" in v for v in violations("rollout", planted))
    with pytest.raises(pytest.fail.Exception, match=r"admin\.web imports xds_server\.lab\.mesh"):
        test_nothing_of_the_control_plane_imports_the_lab(planted)
    with pytest.raises(AssertionError, match="newthing"):
        test_every_unit_has_a_rule({*RULES, "newthing"})


# ---- sizes ----


def hand_written() -> Iterator[tuple[str, Path, ast.Module]]:
    for name, path in modules(skip_generated=True):
        yield name, path, ast.parse(path.read_text())


Definition = ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


def span(node: Definition) -> int:
    """Lines from `def` or `class` to the last line of the body."""
    return (node.end_lineno or node.lineno) - node.lineno + 1


def definitions(
    tree: ast.AST, kinds: tuple[type[Definition], ...], prefix: str
) -> Iterable[tuple[str, Definition]]:
    """Every definition of `kinds` in the tree, with its dotted name (Class.method)."""
    for node in ast.iter_child_nodes(tree):
        name = getattr(node, "name", None)
        here = f"{prefix}.{name}" if name else prefix
        if isinstance(node, kinds):
            yield here, node
        yield from definitions(node, kinds, here)


def too_long(kinds: tuple[type[Definition], ...], limit: int) -> list[str]:
    return [
        f"{qualified}: {span(node)} lines"
        for module, _, tree in hand_written()
        for qualified, node in definitions(tree, kinds, module)
        if span(node) > limit
    ]


def test_no_module_is_longer_than_650_lines() -> None:
    report(
        [
            f"{path.relative_to(ROOT)}: {lines} lines"
            for _, path, _ in hand_written()
            if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
        ]
    )


def test_no_class_is_longer_than_350_lines() -> None:
    report(too_long((ast.ClassDef,), MAX_CLASS_LINES))


def test_no_function_is_longer_than_60_lines() -> None:
    report(too_long((ast.FunctionDef, ast.AsyncFunctionDef), MAX_FUNCTION_LINES))


# ---- the repository stands on its own ----

OUTSIDE = ("../shared", "shared/ARCHITECTURE.md")
"""Documents that lived beside the repository once; nothing in it may lean on them."""
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def tracked() -> list[Path]:
    """The repository's files, as git lists them (the suite runs in a checkout: CI's is
    a fresh clone); a failure here fails the test rather than passing it unchecked."""
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
    ).stdout
    files = [ROOT / name for name in out.decode().split("\0") if name]
    return [f for f in files if f.is_file()]  # (a file deleted but not yet staged is gone)


def test_nothing_in_the_repository_points_outside_it() -> None:
    me = Path(__file__).resolve()
    report(
        [
            f"{path.relative_to(ROOT)} mentions {needle}"
            for path in tracked()
            if path != me
            for needle in OUTSIDE
            if needle.encode() in path.read_bytes()
        ]
    )


def test_markdown_links_stay_in_the_repository_and_arrive() -> None:
    bad = []
    for path in tracked():
        if path.suffix != ".md":
            continue
        for target in MARKDOWN_LINK.findall(path.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            resolved = (path.parent / target.split("#")[0]).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                bad.append(f"{path.relative_to(ROOT)}: {target}")
    report(bad)

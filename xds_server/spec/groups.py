"""Rollout groups (`rollout_groups:`) and ordering (`after:`) in the spec (issue 31):
their shape, and what makes them usable once every service is known.

A group's members move in lockstep ("step k of wave w" must mean the same for each), so
they share their number of steps and their waves; a `consistent` group's members share
their steps too (a request keeps its arm from one member to the next, so each member's
split is the first member's: other steps would read as a sample-ratio mismatch). A
service is in one group at most. `after:` names other services; together with the
groups (a group waits for, and is waited for, as one) it must not make a cycle, or
nothing in it would ever start.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from xds_server.spec.checker import Checker, join, shown
from xds_server.spec.model import RolloutGroup, Service
from xds_server.spec.values import NAME_RE, kind_of

GROUP_KEYS = ("name", "services", "consistent")


def parse_after(c: Checker, value: Any, path: str) -> tuple[str, ...]:
    """A service's `after:` as written: a list of service names (checked against the
    services by `check_after`, once they are all known)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        c.fail(path, f"expected a list of service names, got {kind_of(value)}")
        return ()
    out: list[str] = []
    for i, name in enumerate(value):
        if not isinstance(name, str) or not NAME_RE.match(name):
            c.fail(f"{path}[{i}]", f"expected a service name, got {shown(name)}")
        elif name in out:
            c.fail(f"{path}[{i}]", f"{name!r} is listed twice")
        else:
            out.append(name)
    return tuple(out)


def parse_groups(
    c: Checker, value: Any, services: Sequence[Service], regions: tuple[str, ...]
) -> tuple[RolloutGroup, ...]:
    """`rollout_groups:`: each group's name, members and `consistent`, checked against
    the services (which exist, share steps and waves, are in one group only)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        c.fail("rollout_groups", f"expected a list of groups, got {kind_of(value)}")
        return ()
    by_name = {s.name: s for s in services}
    member_of: dict[str, str] = {}
    out: list[RolloutGroup] = []
    for i, item in enumerate(value):
        path = f"rollout_groups[{i}]"
        group = _group(c, item, path, by_name, member_of)
        if group is None:
            continue
        if any(g.name == group.name for g in out):
            c.fail(join(path, "name"), f"duplicate rollout group {group.name!r}")
            continue
        _check_plans(c, group, path, by_name, regions)
        out.append(group)
    return tuple(out)


def _group(
    c: Checker,
    value: Any,
    path: str,
    services: Mapping[str, Service],
    member_of: dict[str, str],
) -> RolloutGroup | None:
    m = c.mapping(value, path, GROUP_KEYS)
    if not m:
        if isinstance(value, dict):
            c.fail(path, "required: name and services")
        return None
    name = m.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        c.fail(
            join(path, "name"),
            f"bad group name {shown(name)}: use lowercase letters, digits and '-' (at most 63)",
        )
        name = None
    consistent = c.boolean(m.get("consistent", False), join(path, "consistent"))
    members = _members(c, m.get("services"), join(path, "services"), services, member_of, name)
    if name is None or members is None or consistent is None:
        return None
    return RolloutGroup(name, members, consistent)


def _members(
    c: Checker,
    value: Any,
    path: str,
    services: Mapping[str, Service],
    member_of: dict[str, str],
    group: str | None,
) -> tuple[str, ...] | None:
    if not isinstance(value, list) or len(value) < 2:
        got = f"{len(value)}" if isinstance(value, list) else kind_of(value)
        c.fail(path, f"expected a list of at least 2 service names, got {got}")
        return None
    known = ", ".join(services) or "none"
    out: list[str] = []
    ok = True
    for j, name in enumerate(value):
        where = f"{path}[{j}]"
        if not isinstance(name, str) or name not in services:
            c.fail(where, f"unknown service {shown(name)} (services: {known})")
            ok = False
        elif name in out:
            c.fail(where, f"{name!r} is listed twice")
            ok = False
        elif name in member_of:
            c.fail(
                where,
                f"{name!r} is already in rollout group {member_of[name]!r}: "
                "a service is in one group at most",
            )
            ok = False
        else:
            out.append(name)
            if group is not None:
                member_of[name] = group
    return tuple(out) if ok else None


def _check_plans(
    c: Checker,
    group: RolloutGroup,
    path: str,
    services: Mapping[str, Service],
    regions: tuple[str, ...],
) -> None:
    """Members move in lockstep: the same number of steps and the same waves as the
    first member; in a `consistent` group the same steps."""
    first = services[group.services[0]]
    plan = first.rollout
    for j, name in enumerate(group.services[1:], start=1):
        where = f"{path}.services[{j}]"
        other = services[name].rollout
        if len(other.steps) != len(plan.steps):
            c.fail(
                where,
                f"{name} has {len(other.steps)} steps, {first.name} has {len(plan.steps)}: "
                "the members of a group advance step by step together, so they need "
                "as many steps",
            )
        elif group.consistent and other.steps != plan.steps:
            c.fail(
                where,
                f"{name}'s steps {_steps(other.steps)} differ from {first.name}'s "
                f"{_steps(plan.steps)}: a consistent group's members need the same steps "
                "(a request keeps its arm from member to member, so each member gets the "
                "first one's split)",
            )
        if other.wave_list(regions) != plan.wave_list(regions):
            c.fail(
                where,
                f"{name}'s waves {_waves(other.wave_list(regions))} differ from "
                f"{first.name}'s {_waves(plan.wave_list(regions))}: the members of a group "
                "need the same waves",
            )
        if group.consistent:
            _check_consistent(c, where, first, services[name])


def _check_consistent(c: Checker, where: str, first: Service, other: Service) -> None:
    """What a request's arm needs to mean the same at every member: a baseline at each
    or at none (a member without one sends no request marked `baseline`, and the next
    member's baseline would get none: a sample-ratio mismatch at every step), and a
    warm-up at each or at none (a member at 5% while its partner still warms up at 0%
    has no arm routes yet, so its partner's canary requests would reach its production)."""
    if other.has_baseline != first.has_baseline:
        has, lacks = (other, first) if other.has_baseline else (first, other)
        c.fail(
            where,
            f"{has.name} has a baseline pool and {lacks.name} has none: a consistent "
            "group's members need a baseline at each or at none (requests keep their arm "
            "from member to member)",
        )
    if other.rollout.warmup.needed != first.rollout.warmup.needed:
        warms, cold = (other, first) if other.rollout.warmup.needed else (first, other)
        c.fail(
            where,
            f"{warms.name} warms up and {cold.name} does not: a consistent group's members "
            "need a warm-up at each or at none (they take their first weight together)",
        )


def check_after(
    c: Checker,
    services: Sequence[Service],
    paths: Mapping[str, str],
    groups: Sequence[RolloutGroup],
) -> None:
    """Each service's `after:` names another existing service, not a member of its own
    group, and makes no cycle (a group counting as one). `paths`: each service's field
    path (`services[2]`)."""
    names = {s.name for s in services}
    node = {m: f"group {g.name}" for g in groups for m in g.services}
    edges: dict[str, set[str]] = {}
    for svc in services:
        for k, dep in enumerate(svc.after):
            where = f"{paths[svc.name]}.after[{k}]"
            if dep == svc.name:
                c.fail(where, f"{svc.name} cannot wait for itself")
            elif dep not in names:
                c.fail(where, f"unknown service {dep!r} (services: {', '.join(sorted(names))})")
            elif svc.name in node and node.get(dep) == node[svc.name]:
                c.fail(
                    where,
                    f"{dep} is in {svc.name}'s own rollout group ({node[dep]}): the group "
                    "moves as one, so a member cannot wait for another's promotion",
                )
            else:
                edges.setdefault(node.get(svc.name, svc.name), set()).add(node.get(dep, dep))
    for svc in services:
        for k, dep in enumerate(svc.after):
            start = node.get(svc.name, svc.name)
            target = node.get(dep, dep)
            if dep in names and start != target and (cycle := _path(edges, target, start)):
                c.fail(
                    f"{paths[svc.name]}.after[{k}]",
                    f"a cycle: {' -> '.join([start, *cycle])}: nothing in it could start",
                )


def _path(edges: Mapping[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A path from `start` to `goal` along `edges` (both ends included), if any."""
    todo: list[list[str]] = [[start]]
    seen = {start}
    while todo:
        path = todo.pop(0)
        if path[-1] == goal:
            return path
        for nxt in sorted(edges.get(path[-1], ())):
            if nxt not in seen:
                seen.add(nxt)
                todo.append([*path, nxt])
    return None


def _steps(steps: Sequence[float]) -> str:
    return "[" + ", ".join(f"{s:g}" for s in steps) + "]"


def _waves(waves: Sequence[Sequence[str]]) -> str:
    return "[" + ", ".join("[" + ", ".join(w) + "]" for w in waves) + "]"

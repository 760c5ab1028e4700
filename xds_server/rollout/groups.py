"""Rollout groups and `after:` ordering (issue 31): what the rollouts of several services
owe each other. Pure: no I/O, no clock; the controller asks, and commits what it is told.

- Lockstep (`lockstep_hold`): a member's wave that passed step k moves on only once
  every other member, in every region of that wave, has passed step k too (its step is
  past k, or is k and passed, or the region is promoted). Until then the wave holds,
  like a gate, with the reason `group NAME: waiting for MEMBER to pass 20% in REGION`.
  The last step counts as passed once its bake is over too: promotion is the one move
  a rollback cannot undo, so no member is promoted while another still bakes (and may
  yet roll the group back).
  Members keep their own plans, metrics and durations; the spec makes them share their
  number of steps and their waves, so "step k of wave w" means the same for all.
- One rollback (`rollback_targets`, `group_rollbacks`): a member's rollback rolls back
  every live member of its group, and every live service `after:` it, in turn; the
  controller commits each one's state and audit, then pushes once. `fallen` says the
  same level-triggered, for a rollback cut short between commits.
- Start (`start_block`): a member starts only when every member has a canary to roll
  out (and could start itself); a service with `after:` only once each dependency's
  current rollout has passed its last step in every region, or is promoted. Until then
  it is not started, and the reason is what `RolloutController.waiting` shows.
- Operators (`group_decisions`): pause, resume, abort or promote every member at once.
"""

from __future__ import annotations

from collections.abc import Mapping

from xds_server.rollout import decide as sm
from xds_server.rollout.decision import Decision
from xds_server.rollout.state import (
    FINISHED,
    LIVE,
    PENDING,
    PROGRESSING,
    PROMOTED,
    ROLLED_BACK,
    WARMUP_STEP,
    RegionState,
    RolloutState,
)
from xds_server.spec import MeshSpec, RolloutPlan, Service

GROUP_ACTIONS = ("pause", "resume", "abort", "promote")
"""What an operator may do to a whole group (`RolloutController.act_on_group`)."""

Rollouts = Mapping[str, RolloutState]
"""Every service's current rollout, by service (the controller's `rollouts`)."""


def passed(rs: RegionState, step: int) -> bool:
    """Has a member's region passed `step` (of the wave it is in)?"""
    return rs.phase == PROMOTED or rs.step > step or (rs.step == step and rs.step_passed)


def baked(plan: RolloutPlan, rs: RegionState, now: float) -> bool:
    """Has a region that passed the last step also held it for the plan's bake?"""
    since = rs.gate_since
    return plan.bake <= 0 or (since is not None and now - since >= plan.bake)


def lockstep_hold(spec: MeshSpec, service: str, rollouts: Rollouts, now: float) -> str | None:
    """Why `service`'s current wave may not move on past its step although its own
    regions passed it: a member of its group that has not passed that step in a region
    of the wave (the last step: and baked it); None: nothing of the group holds it (or
    it is in no group)."""
    group = spec.group_of(service)
    state = rollouts.get(service)
    if group is None or state is None or state.phase not in LIVE:
        return None
    wave = spec.service(service).rollout.wave_list(tuple(state.regions))[state.wave]
    live = [r for r in wave if state.regions[r].phase in LIVE]
    if not live:
        return None
    step = state.regions[live[0]].step
    for member in group.services:
        other = rollouts.get(member)
        # No rollout: it never started (start gating) or was retired, which rolled the
        # group back. Rolled back: the whole group is being rolled back.
        if member == service or other is None or other.phase in (PROMOTED, ROLLED_BACK):
            continue
        plan = _plan(spec, member)
        for region in wave:
            rs = other.regions.get(region)
            if rs is None or rs.phase == ROLLED_BACK:
                continue
            if not passed(rs, step):
                what = _step_text(plan, step)
                return f"group {group.name}: waiting for {member} to pass {what} in {region}"
            last = step == len(plan.steps) - 1
            if last and rs.phase != PROMOTED and not baked(plan, rs, now):
                return f"group {group.name}: waiting for {member} to bake in {region}"
    return None


def start_block(spec: MeshSpec, service: str, rollouts: Rollouts) -> str | None:
    """Why `service`'s canary may not start its rollout yet; None: it may. Asked only
    of a service with a canary and no rollout of it."""
    if why := after_block(spec, service, rollouts):
        return why
    group = spec.group_of(service)
    if group is None:
        return None
    for member in group.services:
        if member == service:
            continue
        version = spec.service(member).canary_version
        if version is None:
            return f"group {group.name}: waiting for a canary of {member}"
        other = rollouts.get(member)
        if other is not None and other.canary_version == version and other.phase in FINISHED:
            return (
                f"group {group.name}: waiting for a new canary of {member} "
                f"({member} {version} {other.phase})"
            )
        if other is None and (why := after_block(spec, member, rollouts)):
            return f"group {group.name}: waiting for {member}: {why}"
    return None


def after_block(spec: MeshSpec, service: str, rollouts: Rollouts) -> str | None:
    """Why `service`'s `after:` dependencies keep it from starting; None: they do not.
    A dependency with no canary has nothing to roll out: production serves it."""
    for dep in spec.service(service).after:
        version = spec.service(dep).canary_version
        if version is None:
            continue
        state = rollouts.get(dep)
        if state is None or state.canary_version != version:
            return f"after {dep}: {dep} {version} has not started"
        if state.phase == PROMOTED:
            continue
        if state.phase == ROLLED_BACK:
            return f"after {dep}: {dep} {version} was rolled back"
        plan = _plan(spec, dep)
        last = len(plan.steps) - 1
        for region, rs in state.regions.items():
            if rs.phase != PROMOTED and not (rs.step == last and rs.step_passed):
                return f"after {dep}: {dep} {_position(plan, rs)} in {region}"
    return None


def rollback_targets(spec: MeshSpec, service: str, rollouts: Rollouts) -> dict[str, str]:
    """The live rollouts that roll back because `service`'s does, each with why (the
    service whose rollback took it along): the members of its group, the services
    `after:` it, and, in turn, theirs."""
    out: dict[str, str] = {}
    todo = [service]
    while todo:
        name = todo.pop(0)
        found: list[tuple[str, str]] = []
        if (group := spec.group_of(name)) is not None:
            found += [(m, f"group {group.name}: member {name} rolled back") for m in group.services]
        found += [
            (s.name, f"after {name}: {name} rolled back") for s in spec.services if name in s.after
        ]
        for target, why in found:
            state = rollouts.get(target)
            live = state is not None and state.phase in LIVE
            if live and target != service and target not in out:
                out[target] = why
                todo.append(target)
    return out


def fallen(spec: MeshSpec, service: str, rollouts: Rollouts) -> str | None:
    """Why `service`'s live rollout must roll back because one it goes with already has
    (None: none has): a member of its group, or a service it is `after:`, whose current
    rollout is rolled back. Level-triggered, so that a group rollback interrupted
    between its members' commits (a crash, a store that failed half-way) still ends
    with every member rolled back once the controller runs again."""
    state = rollouts.get(service)
    if state is None or state.phase not in LIVE:
        return None
    group = spec.group_of(service)
    others = [(m, f"group {group.name}: member {m}") for m in group.services] if group else []
    others += [(d, f"after {d}: {d}") for d in spec.service(service).after]
    for other, who in others:
        theirs = rollouts.get(other)
        version = spec.service(other).canary_version if other != service else None
        if theirs is None or theirs.canary_version != version or theirs.phase != ROLLED_BACK:
            continue
        return f"{who} rolled back: {theirs.reason}"
    return None


def group_rollbacks(
    spec: MeshSpec, decision: Decision, rollouts: Rollouts, now: float
) -> list[tuple[Service, Decision]]:
    """`decision`, a rollback, taken along: the rollback of every rollout that goes with
    it (`rollback_targets`), each reason naming the service that took it and the cause."""
    state = decision.state
    cause = state.reason
    return [
        (spec.service(target), sm.rollback(rollouts[target], now, f"{why}: {cause}"))
        for target, why in rollback_targets(spec, state.service, rollouts).items()
    ]


def group_decisions(
    spec: MeshSpec, group: str, action: str, reason: str, rollouts: Rollouts, now: float
) -> list[tuple[Service, Decision]]:
    """An operator's `action` on every member of `group` that has a rollout it applies
    to. KeyError: no such group; ValueError: an unknown action, no member with a
    rollout, or a phase that allows it in no member (each member's refusal named)."""
    members = spec.group(group).services
    if action not in GROUP_ACTIONS:
        raise ValueError(f"no group action {action!r} (one of: {', '.join(GROUP_ACTIONS)})")
    why = f"{reason} (group {group})"
    out: list[tuple[Service, Decision]] = []
    refused: list[str] = []
    for member in members:
        state = rollouts.get(member)
        if state is None:
            continue
        svc = spec.service(member)
        try:
            out.append((svc, _act(svc.rollout, state, action, why, now)))
        except ValueError as exc:
            refused.append(f"{member}: {exc}")
    if not out and not refused:
        raise ValueError(f"group {group}: no member has a rollout")
    if not out:
        raise ValueError(f"group {group}: cannot {action}: {'; '.join(refused)}")
    return out


def _act(plan: RolloutPlan, state: RolloutState, action: str, reason: str, now: float) -> Decision:
    if action == "pause":
        return sm.pause(state, now, reason)
    if action == "resume":
        return sm.resume(state, now, reason)
    if action == "abort":
        return sm.abort(state, now, reason)
    return sm.promote(plan, state, now, reason)


def _plan(spec: MeshSpec, service: str) -> RolloutPlan:
    return spec.service(service).rollout


def _step_text(plan: RolloutPlan, step: int) -> str:
    if step == WARMUP_STEP or not 0 <= step < len(plan.steps):
        return "warm-up"
    return f"{plan.steps[step]:g}%"


def _position(plan: RolloutPlan, rs: RegionState) -> str:
    """Where a dependency's region stands, for a dependent waiting on it."""
    if rs.phase == PENDING:
        return "not started"
    if rs.step == WARMUP_STEP:
        return "warming up"
    last = " (not passed yet)" if rs.step == len(plan.steps) - 1 else ""
    phase = "" if rs.phase == PROGRESSING else f"{rs.phase} "
    return f"{phase}at {_step_text(plan, rs.step)}{last}"

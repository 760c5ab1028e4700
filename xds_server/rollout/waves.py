"""Moving a wave on: lockstep within a wave, one wave after another. Pure: no I/O, no clock.

A wave moves once every live region of it has passed its step and nothing holds it: a
gate (a `pause:` after the step, or the bake after the last step), its rollout group (a
member that has not passed the step: `groups.lockstep_hold`) or the `confirm_step`
hooks. Moving on is the next step for every region of the wave; after the last step it
is promotion, then the next wave's first step (or warm-up), or, after the last wave, the
whole rollout promoted. Judging goes on while a wave is held: a breach still rolls back
(`decide.fold` sees to that before it asks to advance).
"""

from __future__ import annotations

from dataclasses import replace

from xds_server.rollout.decision import Transition
from xds_server.rollout.state import (
    LIVE,
    PENDING,
    PROGRESSING,
    PROMOTED,
    WARMING,
    WARMUP_STEP,
    RegionState,
    RolloutState,
    step_label,
)
from xds_server.spec import Gate, RolloutPlan

Moved = tuple[RolloutState, list[Transition]]
"""The rollout's new state and what changed (transitions and check entries)."""


def first_state(plan: RolloutPlan, why: str) -> RegionState:
    """A region starting its rollout: warm-up first when the plan has one."""
    if plan.warmup.needed:
        return RegionState(WARMING, WARMUP_STEP, reason=f"{why}: warming up")
    return RegionState(PROGRESSING, 0, reason=why)


def awaiting_confirmation(plan: RolloutPlan, state: RolloutState, now: float) -> bool:
    """Would the current wave move to a higher weight now, but for the `confirm_step`
    hooks? The observer asks them only then."""
    if not plan.confirm_step or state.phase != PROGRESSING:
        return False
    ready = _wave_ready(plan, state)
    if ready is None or ready[1] + 1 >= len(plan.steps):
        return False
    live, step = ready
    gate = _gate(plan, step)
    return gate is None or _gate_open(gate, state.regions[live[0]].gate_since, now)


def advance(
    plan: RolloutPlan,
    state: RolloutState,
    now: float,
    *,
    release: bool = False,
    confirmation: str | None = None,
    group: str | None = None,
) -> Moved:
    """Lockstep within a wave: move every region of the wave once all have passed, and
    no gate, group or hook holds it (`release`: an operator's promote, which nothing
    holds). `group`: why the rollout group holds the wave (`groups.lockstep_hold`)."""
    ready = _wave_ready(plan, state)
    if ready is None:
        return state, []
    live, step = ready
    if release:
        held = None
    else:
        held = _hold(plan, state, live, step, now, confirmation) or _group_hold(
            state, live, now, group
        )
    if held is not None:
        return held
    if step + 1 < len(plan.steps):
        return _next_step(plan, state, live, step, now)
    return _promote_wave(plan, state, live, step, now)


def _wave_ready(plan: RolloutPlan, state: RolloutState) -> tuple[list[str], int] | None:
    """The current wave's live regions and their step, once every one has passed it and
    none is on a run of failed checks: a region that passed its step, then breached a
    guardrail on a later look, is failing now, and a wave moved on then would put more
    users on a canary one more look might roll back (rollback_latency saw 75% pushed in
    the tick of such a breach, rolled back a look later)."""
    wave = plan.wave_list(tuple(state.regions))[state.wave]
    live = [r for r in wave if state.regions[r].phase in LIVE]
    ready = (state.regions[r].step_passed and not state.regions[r].failures for r in live)
    if not live or not all(ready):
        return None
    return live, state.regions[live[0]].step


def _gate(plan: RolloutPlan, step: int) -> Gate | None:
    """What holds the wave after `step` passed: a `pause:` step, or the bake after the
    last step."""
    if step == len(plan.steps) - 1:
        return Gate(plan.bake) if plan.bake > 0 else None
    return plan.gates.get(step)


def _gate_open(gate: Gate, since: float | None, now: float) -> bool:
    return since is not None and gate.seconds is not None and now - since >= gate.seconds


def _hold(
    plan: RolloutPlan,
    state: RolloutState,
    live: list[str],
    step: int,
    now: float,
    confirmation: str | None,
) -> Moved | None:
    """Why the wave, having passed `step`, does not move on yet: a gate (a pause, the
    bake) or the `confirm_step` hooks; None: it may. Only recorded when it begins or its
    reason changes. Judging goes on meanwhile: a breach still rolls back."""
    gate = _gate(plan, step)
    if gate is not None:
        since = state.regions[live[0]].gate_since
        if since is None:
            if step == len(plan.steps) - 1:
                why = f"baking at 100% for {gate.seconds:g}s: old production kept warm at 0%"
            else:
                why = f"holding at {plan.steps[step]:g}%: {gate.describe()}"
            return _hold_all(state, live, now, why, start_gate=True)
        if not _gate_open(gate, since, now):
            return state, []
    if plan.confirm_step and step + 1 < len(plan.steps) and confirmation != "":
        nxt = f"{plan.steps[step + 1]:g}%"
        if confirmation is None:
            why = f"asking the confirm_step hooks before {nxt}"
        else:
            why = f"held before {nxt} by confirm_step: {confirmation}"
        if all(state.regions[r].reason == why for r in live):
            return state, []
        return _hold_all(state, live, now, why)
    return None


def _group_hold(
    state: RolloutState, live: list[str], now: float, group: str | None
) -> Moved | None:
    """Held by the rollout group (after any gate of its own has opened): recorded when
    it begins or its reason changes, like a gate."""
    if group is None:
        return None
    if all(state.regions[r].reason == group for r in live):
        return state, []
    return _hold_all(state, live, now, group)


def _hold_all(
    state: RolloutState, live: list[str], now: float, why: str, start_gate: bool = False
) -> Moved:
    regions = dict(state.regions)
    transitions = []
    for r in live:
        since = now if start_gate else regions[r].gate_since
        rs = regions[r] = replace(regions[r], reason=why, gate_since=since)
        transitions.append(Transition.check(r, rs, why))
    return replace(state, regions=regions, updated_at=now), transitions


def _next_step(
    plan: RolloutPlan, state: RolloutState, live: list[str], step: int, now: float
) -> Moved:
    """Every live region of the wave to the step after `step`, its clock not yet started."""
    passed = f"every region of the wave passed {step_label(plan, step)}"
    regions = dict(state.regions)
    transitions = []
    for r in live:
        regions[r] = RegionState(PROGRESSING, step + 1, reason=passed)
        transitions.append(
            Transition(
                r,
                state.regions[r].phase,
                PROGRESSING,
                step,
                step + 1,
                f"advance to {plan.steps[step + 1]:g}%: {passed}",
            )
        )
    return replace(state, regions=regions, updated_at=now), transitions


def _promote_wave(
    plan: RolloutPlan, state: RolloutState, live: list[str], step: int, now: float
) -> Moved:
    """The wave passed its last step: its regions are promoted, and the next wave starts
    (or, after the last wave, the whole rollout is promoted)."""
    regions = dict(state.regions)
    transitions: list[Transition] = []
    for r in live:
        regions[r] = replace(regions[r], phase=PROMOTED, reason="passed every step")
        transitions.append(
            Transition(r, PROGRESSING, PROMOTED, step, step, "promoted: passed every step")
        )
    waves = plan.wave_list(tuple(state.regions))
    if state.wave + 1 < len(waves):
        for r in waves[state.wave + 1]:
            rs = regions[r] = first_state(plan, "previous wave promoted")
            why = f"wave {state.wave + 2} starts: previous wave promoted"
            transitions.append(Transition(r, PENDING, rs.phase, -1, rs.step, why))
        return replace(state, regions=regions, wave=state.wave + 1, updated_at=now), transitions
    transitions.append(
        Transition(
            None,
            PROGRESSING,
            PROMOTED,
            step,
            step,
            "every region passed every step: canary serves 100%",
        )
    )
    return replace(
        state, regions=regions, phase=PROMOTED, updated_at=now, reason="promoted"
    ), transitions

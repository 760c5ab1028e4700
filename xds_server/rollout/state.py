"""Rollout state, and the weights it implies. Pure: no I/O, no clock.

Per region:   pending -> [warming] -> progressing(step i) -> promoted | rolled_back | paused
Per rollout:  progressing | paused | promoted | rolled_back

Weights are never stored: they are a function of each region's phase and step
(`region_split`), so whoever holds the state (the leader, a follower reading the store,
`xds-server manifests`) derives the same weights from it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum

from xds_server.spec import MeshSpec, RolloutPlan, Service
from xds_server.traffic import PRODUCTION_ONLY, WEIGHT_TOTAL, Split, TrafficState


class Phase(StrEnum):
    PENDING = "pending"
    WARMING = "warming"
    PROGRESSING = "progressing"
    PAUSED = "paused"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


PENDING, WARMING, PROGRESSING = Phase.PENDING, Phase.WARMING, Phase.PROGRESSING
PAUSED, PROMOTED, ROLLED_BACK = Phase.PAUSED, Phase.PROMOTED, Phase.ROLLED_BACK
LIVE = frozenset({WARMING, PROGRESSING, PAUSED})
FINISHED = frozenset({PROMOTED, ROLLED_BACK})
PHASE_GAUGES = (PENDING, PROGRESSING, PAUSED, PROMOTED, ROLLED_BACK)
"""The rollout-wide phases (`xds_rollout_phase`): a whole rollout is never `warming`."""
WARMUP_STEP = -1
"""Warm-up is step -1: the canary and baseline get no weight (shadow traffic at most)."""


@dataclass(frozen=True)
class RegionState:
    phase: Phase = PENDING
    step: int = -1
    step_started: float | None = None
    """When every Envoy of the region had applied this step: the step's clock."""
    step_passed: bool = False
    failures: int = 0
    """Consecutive failed checks in this step."""
    hold_since: float | None = None
    """When the current run of checks without evidence began."""
    reason: str = ""
    manual_canary: float | None = None
    """Canary percent set by hand (the rollout is paused meanwhile); None: by the plan."""
    manual_baseline: float | None = None
    shadowing: bool = False
    """Warm-up: pools are healthy and the hooks passed; shadow traffic is being judged."""
    gate_since: float | None = None
    """When the wave passed this step and began holding at its gate (a `pause:` after
    the step, or the bake after the last); None: not holding at a gate."""

    @property
    def warming(self) -> bool:
        return self.step == WARMUP_STEP and self.phase in LIVE


@dataclass(frozen=True)
class RolloutState:
    service: str
    canary_version: str
    phase: Phase
    regions: Mapping[str, RegionState]
    started_at: float
    updated_at: float
    wave: int = 0
    reason: str = ""


def step_label(plan: RolloutPlan, step: int) -> str:
    if step == WARMUP_STEP:
        return "warm-up"
    return f"step {step} ({plan.steps[step]:g}%)"


def region_split(plan: RolloutPlan, region: RegionState, has_baseline: bool) -> Split:
    """The weights a region gets in a given state."""
    if region.manual_canary is not None and region.phase in LIVE:
        return Split.from_percent(
            {"canary": region.manual_canary, "baseline": region.manual_baseline or 0.0}
        )
    if region.warming:
        # Paused in shadow keeps mirroring, as a paused step keeps its weights: the hold
        # clock runs on, and shadow traffic is the only evidence a warming region has.
        if region.shadowing:
            return Split(shadow=round(plan.warmup.shadow_percent * WEIGHT_TOTAL / 100))
        return PRODUCTION_ONLY
    if region.phase in LIVE:
        return Split.at_canary_percent(plan.steps[region.step], has_baseline)
    if region.phase == PROMOTED:
        return Split.at_canary_percent(100, has_baseline)
    return PRODUCTION_ONLY


def service_split(svc: Service, region: str, rollout: RolloutState | None) -> Split:
    """The split a service gets in a region, given its rollout (if any)."""
    rs = rollout.regions.get(region) if rollout is not None else None
    if rs is None:
        return PRODUCTION_ONLY
    return region_split(svc.rollout, rs, svc.has_baseline)


def rollout_traffic(spec: MeshSpec, rollouts: Mapping[str, RolloutState]) -> TrafficState:
    """The weights every rollout's state implies; production only where there is none.

    A state weighs only on the canary it judged: between a spec change and the
    controller's next reconcile, a promoted v2's 100% (or a v2 at 75%) must not go to
    the v3 the new spec names in the canary pool, unjudged."""
    splits = {}
    for svc in spec.services:
        state = rollouts.get(svc.name)
        canary = svc.pools.get("canary")
        if state is None or canary is None or canary.version != state.canary_version:
            continue
        for region in state.regions:
            if region in spec.regions:
                splits[(svc.name, region)] = service_split(svc, region, state)
    return TrafficState(splits)


def current_rollouts(spec: MeshSpec, stored: Iterable[RolloutState]) -> dict[str, RolloutState]:
    """Of the stored rollouts, the one of each service's *current* canary version."""
    by_key = {(s.service, s.canary_version): s for s in stored}
    out: dict[str, RolloutState] = {}
    for svc in spec.services:
        canary = svc.pools.get("canary")
        if canary is not None and (state := by_key.get((svc.name, canary.version))):
            out[svc.name] = state
    return out


def state_to_json(state: RolloutState) -> str:
    doc = asdict(state)
    doc["regions"] = {r: asdict(s) for r, s in state.regions.items()}
    return json.dumps(doc)


def state_from_json(text: str) -> RolloutState:
    doc = json.loads(text)
    doc["regions"] = {
        r: RegionState(**{**s, "phase": Phase(s["phase"])}) for r, s in doc["regions"].items()
    }
    doc["phase"] = Phase(doc["phase"])
    return RolloutState(**doc)

"""Audit entries: what each committed decision leaves in the append-only log, and how
they are assembled from a decision. Pure: the store writes them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from xds_server.rollout.decide import Decision, Transition
from xds_server.rollout.judge import MetricClass
from xds_server.rollout.state import RolloutState
from xds_server.traffic import WEIGHT_TOTAL, Split, TrafficState


@dataclass(frozen=True)
class AuditEntry:
    time: float
    service: str
    canary_version: str
    region: str | None
    kind: str
    step: int | None
    phase_from: str | None
    phase_to: str | None
    weights_before: dict[str, Any] | None
    weights_after: dict[str, Any] | None
    measurements: dict[str, Any] | None
    verdict: dict[str, Any] | None
    reason: str
    snapshot_version: int | None
    actor: str
    id: int = 0
    """Assigned by the store, in commit order; 0 until then."""


def transition_entry(
    state: RolloutState,
    t: Transition,
    now: float,
    weights_before: Mapping[str, Any] | None,
    weights_after: Mapping[str, Any] | None,
    measurements: Mapping[str, Any] | None,
    snapshot_version: int | None,
    actor: str = "controller",
) -> AuditEntry:
    verdict = None
    if t.verdict is not None:
        verdict = {
            "outcome": str(t.verdict.outcome),
            "reason": t.verdict.reason,
            "checks": [asdict(c) for c in t.verdict.checks],
            "score": t.verdict.score,
            "conclusive": t.verdict.conclusive,
            "metrics": [m.as_dict() for m in t.verdict.metrics],
        }
    return AuditEntry(
        time=now,
        service=state.service,
        canary_version=state.canary_version,
        region=t.region,
        kind=str(t.kind),
        step=t.step_to,
        phase_from=str(t.phase_from),
        phase_to=str(t.phase_to),
        weights_before=dict(weights_before) if weights_before is not None else None,
        weights_after=dict(weights_after) if weights_after is not None else None,
        measurements=dict(measurements) if measurements is not None else None,
        verdict=verdict,
        reason=t.reason,
        snapshot_version=snapshot_version,
        actor=actor,
    )


def decision_entries(
    decision: Decision,
    before: TrafficState,
    after: TrafficState,
    versions: Mapping[str, int],
    now: float,
    actor: str,
) -> list[AuditEntry]:
    """One entry per transition: the weights before and after in its region, what was
    measured there, and the snapshot version that carries the new weights."""
    service = decision.state.service
    entries = []
    for t in decision.transitions:
        region = t.region
        obs = decision.observations.get(region) if region else None
        measurements = None
        if obs is not None and obs.canary is not None:
            step = obs.step
            measurements = {
                "canary": obs.canary.as_dict(),
                "canary_step": step.canary.as_dict() if step else None,
                "comparator": step.comparator_pool if step else None,
                "baseline": step.comparator.as_dict() if step and step.comparator else None,
            }
        entries.append(
            transition_entry(
                decision.state,
                t,
                now,
                audit_weights(before.split(service, region)) if region else None,
                audit_weights(after.split(service, region)) if region else None,
                measurements,
                versions.get(region) if region else None,
                actor,
            )
        )
    return entries


def audit_weights(split: Split) -> dict[str, float]:
    """Percent per pool, and the mirrored share when there is one (warm-up)."""
    out = split.percent()
    if split.shadow:
        out["shadow"] = split.shadow * 100 / WEIGHT_TOTAL
    return out


@dataclass(frozen=True)
class RollbackCause:
    """Why a rollout was rolled back, as an operator paged by it wants it first: the
    region whose evidence (or whose operator) started it, and the metric that failed."""

    region: str | None
    metric: str | None
    """None when no metric did it: an operator's abort, an Envoy's NACK, a timeout."""
    reason: str
    actor: str
    time: float
    entry_id: int


def rollback_cause(entries: Sequence[AuditEntry]) -> RollbackCause | None:
    """The cause of the rollback among one rollout's entries (in commit order), or None
    if it was not rolled back. A rollback is one decision: the region that breached
    carries the verdict; the others, and the rollout-wide entry, repeat its reason."""
    rolled_back = [e for e in entries if e.kind == "transition" and e.phase_to == "rolled_back"]
    if not rolled_back:
        return None
    regional = [e for e in rolled_back if e.region is not None]
    cause = next((e for e in regional if e.verdict), None)
    if cause is None:
        cause = regional[0] if regional else rolled_back[0]
    return RollbackCause(
        region=cause.region,
        metric=failed_metric(cause.verdict),
        reason=cause.reason,
        actor=cause.actor,
        time=cause.time,
        entry_id=cause.id,
    )


def failed_metric(verdict: Mapping[str, Any] | None) -> str | None:
    """The first failed guardrail of a verdict, else its first analysis metric the
    judge held against the canary (outside its allowance, either way)."""
    if not verdict:
        return None
    for check in verdict.get("checks") or ():
        if not check.get("ok", True):
            return str(check.get("metric"))
    for metric in verdict.get("metrics") or ():
        if metric.get("classification") in (MetricClass.HIGH, MetricClass.LOW):
            return str(metric.get("name"))
    return None

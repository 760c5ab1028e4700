"""Audit entries: what each committed decision leaves in the append-only log, and how
they are assembled from a decision. Pure: the stores write them, through
`audit_codec.py` (the one place that turns an entry into JSON and back).

An entry is typed all the way down: the region's weights (`Weights`), what was measured
there (`Measurements`, one `PoolNumbers` per pool and window) and the judge's own
`Verdict` (its `Check`s and `MetricResult`s, every field of which the log keeps), so a
reader (`xdsctl`, the dashboard, the lab, notifications) never digs with string keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from xds_server.rollout.audit_chain import Link
from xds_server.rollout.decision import Decision, EntryKind, Transition
from xds_server.rollout.evidence import HIGH, LOW, Measurement, Verdict, finite
from xds_server.rollout.state import ROLLED_BACK, Phase, RolloutState
from xds_server.traffic import WEIGHT_TOTAL, Split, TrafficState


@dataclass(frozen=True)
class Weights:
    """One region's split of a service as the log shows it: percent per pool, and the
    share of production's requests mirrored to canary and baseline (warm-up's shadow
    traffic; not a weight: it is outside the 100%)."""

    production: float
    baseline: float
    canary: float
    shadow: float | None = None
    """None when nothing is mirrored (the log then has no `shadow` at all)."""

    @classmethod
    def of(cls, split: Split) -> Weights:
        pct = split.percent()
        shadow = split.shadow * 100 / WEIGHT_TOTAL if split.shadow else None
        return cls(pct["production"], pct["baseline"], pct["canary"], shadow)


@dataclass(frozen=True)
class PoolNumbers:
    """One pool's numbers over a window, as the log keeps a `judge.Measurement` (no
    histograms, readings or tenants; NaN and infinity as None)."""

    requests: float | None = None
    errors: float | None = None
    error_rate: float | None = None
    p99_ms: float | None = None
    problem: str | None = None
    """Why the numbers could not be read (Prometheus unreachable, a query error)."""

    @classmethod
    def of(cls, m: Measurement) -> PoolNumbers:
        return cls(
            finite(m.requests),
            finite(m.errors),
            finite(m.error_rate),
            finite(m.p99_ms),
            m.problem,
        )


@dataclass(frozen=True)
class Measurements:
    """What one region's judgement saw: the canary over the sliding window (what the
    guardrails judge), and canary and comparator over the whole step (the analysis)."""

    canary: PoolNumbers
    canary_step: PoolNumbers | None = None
    comparator_pool: str | None = None
    """`baseline` or `production`; None: no comparison this interval."""
    comparator: PoolNumbers | None = None
    """The comparator's numbers over the step; None at 100% (nothing to compare with)."""


@dataclass(frozen=True)
class AuditEntry:
    time: float
    service: str
    canary_version: str
    region: str | None
    """None for an entry of the whole rollout."""
    kind: EntryKind
    step: int | None
    phase_from: Phase | None
    phase_to: Phase | None
    weights_before: Weights | None
    weights_after: Weights | None
    measurements: Measurements | None
    verdict: Verdict | None
    """The judge's verdict, whole (its checks and analysis metrics)."""
    reason: str
    snapshot_version: int | None
    actor: str
    id: int = 0
    """Assigned by the store, in commit order; 0 until then."""
    group: str | None = None
    """The rollout group (`rollout_groups:`) of the entry's service; None: not in one
    (and every entry written before groups). A group's decision leaves one entry set
    per member: the member that decided is the one whose reason does not begin with
    `group NAME: member ...`."""
    chain: Link | None = None
    """Its place in its rollout's hash chain (`audit_chain.py`), set by the store when it
    writes the entry; None before that, and for entries written before the chain."""


def transition_entry(
    state: RolloutState,
    t: Transition,
    now: float,
    weights_before: Weights | None,
    weights_after: Weights | None,
    measurements: Measurements | None,
    snapshot_version: int | None,
    actor: str = "controller",
    group: str | None = None,
) -> AuditEntry:
    return AuditEntry(
        time=now,
        service=state.service,
        canary_version=state.canary_version,
        region=t.region,
        kind=t.kind,
        step=t.step_to,
        phase_from=t.phase_from,
        phase_to=t.phase_to,
        weights_before=weights_before,
        weights_after=weights_after,
        measurements=measurements,
        verdict=t.verdict,
        reason=t.reason,
        snapshot_version=snapshot_version,
        actor=actor,
        group=group,
    )


def decision_entries(
    decision: Decision,
    before: TrafficState,
    after: TrafficState,
    versions: Mapping[str, int],
    now: float,
    actor: str,
    group: str | None = None,
) -> list[AuditEntry]:
    """One entry per transition: the weights before and after in its region, what was
    measured there, and the snapshot version that carries the new weights; `group`, the
    rollout group of the service, if any."""
    service = decision.state.service
    entries = []
    for t in decision.transitions:
        region = t.region
        obs = decision.observations.get(region) if region else None
        measurements = None
        if obs is not None and obs.canary is not None:
            step = obs.step
            measurements = Measurements(
                canary=PoolNumbers.of(obs.canary),
                canary_step=PoolNumbers.of(step.canary) if step else None,
                comparator_pool=step.comparator_pool if step else None,
                comparator=PoolNumbers.of(step.comparator) if step and step.comparator else None,
            )
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
                group,
            )
        )
    return entries


def audit_weights(split: Split) -> Weights:
    """Percent per pool, and the mirrored share when there is one (warm-up)."""
    return Weights.of(split)


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
    rolled_back = [
        e for e in entries if e.kind == EntryKind.TRANSITION and e.phase_to == ROLLED_BACK
    ]
    if not rolled_back:
        return None
    regional = [e for e in rolled_back if e.region is not None]
    cause = next((e for e in regional if e.verdict is not None), None)
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


def failed_metric(verdict: Verdict | None) -> str | None:
    """The first failed guardrail of a verdict, else its first analysis metric the
    judge held against the canary (outside its allowance, either way)."""
    if verdict is None:
        return None
    for check in verdict.checks:
        if not check.ok:
            return check.metric
    for metric in verdict.metrics:
        if metric.classification in (HIGH, LOW):
            return metric.name
    return None

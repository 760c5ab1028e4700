"""What the decision function reads and what it returns: one region's `Observation`, what
it means (`RegionEvent`), and the `Decision` with its `Transition`s, which become audit
entries. Plain frozen records, so that `decide.py` (judging regions and folding their
events) and `waves.py` (moving a wave on) share them without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from xds_server.rollout.evidence import Comparison, Measurement, Verdict
from xds_server.rollout.state import Phase, RegionState, RolloutState


class EntryKind(StrEnum):
    TRANSITION = "transition"
    """A change of phase or step."""
    CHECK = "check"
    """A judgement (or a warm-up note) that changed no phase or step."""


@dataclass(frozen=True)
class Observation:
    """What the controller saw of one region this interval."""

    applied_at: float | None = None
    """When the region's quorum of Envoys (`ack_quorum`; every one by default) had ACKed
    the current weights; None: not yet."""
    apply_error: str | None = None
    """NACKs beyond `nack_tolerance`, or the quorum not ACKed within `ack_timeout`
    (each node's from its send): the step fails."""
    apply_unknown: str | None = None
    """Not applied yet, and the quorum needs nodes not known to have applied the step
    (their replica is gone or silent): which and why, without durations (the same text
    while the reason is the same). No evidence either way: the region holds, on its
    hold clock (`max_hold`, then `on_max_hold`), not `ack_timeout`; audited when the
    hold begins or this changes."""
    canary: Measurement | None = None
    """The canary over the sliding window: what the SLA guardrails judge."""
    step: Comparison | None = None
    """Canary and comparator over the whole step: what the analysis judges."""
    warmup_pending: tuple[str, ...] = ()
    """Warm-up: what the pools are still waiting for (health, a webhook)."""
    warmup_error: str | None = None
    """Warm-up: a webhook failed; the rollout is blocked until resumed."""
    confirmation: str | None = None
    """The `confirm_step` hooks' answer, when the wave waits on them (`awaiting_
    confirmation`): "" to go on, else why not; None when they were not asked."""
    nodes: tuple[int, int, int] | None = None
    """The region's data-plane nodes on the current routes: (applied, unknown, lagging),
    as the `DataPlane` counts them (signal health); None: not asked."""
    no_hosts: str | None = None
    """The canary pool has no host left in the region (every registered instance gone)
    while it takes traffic: the step holds, and fails at max_hold."""
    stragglers: tuple[str, ...] = ()
    """Nodes that missed the step while the quorum holds (`xds.acks`), 'NODE (why)'."""
    stragglers_changed: str = ""
    """The straggler set changed since the last look: the note to audit, else ""."""


@dataclass(frozen=True)
class Transition:
    region: str | None
    """None for a change of the whole rollout."""
    phase_from: Phase
    phase_to: Phase
    step_from: int
    step_to: int
    reason: str
    verdict: Verdict | None = None
    kind: EntryKind = EntryKind.TRANSITION

    @classmethod
    def check(
        cls, region: str, rs: RegionState, reason: str, verdict: Verdict | None = None
    ) -> Transition:
        """A check entry: the region stays where it is, with a note of why."""
        return cls(region, rs.phase, rs.phase, rs.step, rs.step, reason, verdict, EntryKind.CHECK)


@dataclass(frozen=True)
class Decision:
    state: RolloutState
    transitions: tuple[Transition, ...] = ()
    rollback: bool = False
    observations: Mapping[str, Observation] = field(default_factory=dict)


@dataclass(frozen=True)
class RegionEvent:
    """What one region's observation means: its next state, and what it asks for."""

    region: RegionState
    check: str = ""
    """A judgement or warm-up note to record (a check entry); "" for none."""
    pause: str = ""
    """Why the rollout must pause; "" for no pause."""
    rollback: str = ""
    """Why every region must roll back; "" for no rollback."""
    verdict: Verdict | None = None

"""The ACK gate (issue 28): has a region applied its current routes, by a rollout's plan?

At fleet scale one broken proxy must not decide for everyone. So:

- each node's time to ACK starts when THAT node was sent the routes (`NodeAck.since`),
  not when they were first published: a node connecting late in a step gets its own
  `ack_timeout`;
- the region counts as applied once `ceil(ack_quorum * nodes)` have ACKed, the step's
  clock starting at that ACK; nodes past their `ack_timeout` without an ACK, and NACKing
  nodes up to `nack_tolerance` (they keep their last good config, as Envoy does), are
  *stragglers*: named, left out of the analysis, not a rollback while the quorum holds;
- beyond that (more NACKs, or the quorum out of reach): the step fails, as before.

Unknown nodes (of a silent or gone replica: nobody can see them) are never applied, and
never a failure either (issues 27 and 29): no evidence, neither way. `ack_timeout`
decides for the nodes that are known (connected to a replica heard from) and do not
ACK; a region whose quorum can be reached only with its unknown nodes *holds* (`Gate.
unknown`), however long they have been unknown, and the controller's hold clock
(`max_hold`, then `on_max_hold`) ends that hold, not `ack_timeout`. A cut-off region
is held, not rolled back at `ack_timeout` (region-partition). An unknown node past
`ack_timeout` is named among the stragglers while the quorum holds without it.
A straggler that ACKs later is applied again: it rejoins.
With the defaults (quorum 1.0, no NACK tolerated) this is the gate of every node.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from xds_server.xds.dataplane import Applied, NodeAck, Pending, Rejected, RouteStatus


@dataclass(frozen=True)
class Gate:
    """What the ACK gate makes of a region's nodes on its current routes."""

    applied_at: float | None = None
    """The region counts as applied (its quorum ACKed) since then; None: not yet."""
    error: str | None = None
    """Why the step fails: NACKs beyond the tolerance, or the quorum out of reach."""
    unknown: str | None = None
    """Not applied yet, and the quorum needs nodes that are not known to have applied
    anything (their replica silent or gone): which and why, without durations (the
    same text while the same nodes are unknown for the same reason, so the hold is
    audited when it begins or its reason changes, not at every look). The region
    holds: `ack_timeout` does not end this, `max_hold` does."""
    stragglers: tuple[str, ...] = ()
    """Nodes that missed the step, each 'NODE (why)': no ACK within `ack_timeout` of
    their send, or a NACK tolerated."""
    excluded: tuple[str, ...] = ()
    """Node ids not known to route by the step's weights (every node not applied:
    stragglers, nodes still within their time, unknown ones): the analysis leaves
    their traffic out where it can (`rollout.metrics`)."""


def quorum_of(nodes: int, quorum: float) -> int:
    """How many of `nodes` must ACK: ceil(quorum * nodes), at least 1 of a non-empty
    region (0.9 * 20 is 18.000000000000004 in floating point: 18, not 19)."""
    if nodes == 0:
        return 0
    return max(1, math.ceil(round(quorum * nodes, 9)))


def ack_gate(
    status: RouteStatus, quorum: float, nack_tolerance: int, ack_timeout: float, now: float
) -> Gate:
    """The gate over `status` (see the module's docstring); `now` on the wall clock."""
    if not status.acked_times and not status.holdouts:
        return _coarse(status, ack_timeout, now)
    held = status.holdouts
    total = len(status.acked_times) + len(held)
    need = quorum_of(total, quorum)
    applied = len(status.acked_times)
    nacks = [a for a in held if a.nack]
    silent = [a for a in held if not a.nack]
    unknown = [a for a in silent if a.unknown]  # no evidence: never late, never applied
    late = [a for a in silent if not a.unknown and now - a.since > ack_timeout]
    waiting = [a for a in silent if not a.unknown and now - a.since <= ack_timeout]
    stragglers = tuple(
        [f"{_who(a)} (rejected routes {status.version}: {a.nack})" for a in nacks]
        + [f"{a.node} ({_late_why(a, ack_timeout)})" for a in late]
    )
    excluded = tuple(a.node for a in held)
    if len(nacks) > nack_tolerance:
        first = nacks[0]
        more = len(nacks) - 1
        tail = (
            f" ({more} more NACKing, {nack_tolerance} tolerated)" if nack_tolerance or more else ""
        )
        error = f"Envoy {_who(first)} rejected routes {status.version}: {first.nack}{tail}"
        return Gate(error=error, stragglers=stragglers, excluded=excluded)
    if applied >= need:
        # Unknown nodes the quorum did without are stragglers too once past their time
        # (while the region holds for them, they are the hold's reason instead).
        lost = [a for a in unknown if now - a.since > ack_timeout]
        stragglers += tuple(f"{a.node} ({_late_why(a, ack_timeout)})" for a in lost)
        at = _nth_smallest(status.acked_times, need)
        return Gate(applied_at=at, stragglers=stragglers, excluded=excluded)
    if applied + len(waiting) + len(unknown) >= need:  # the quorum may still ACK: hold
        note = None
        if unknown:
            listing = _listing([*unknown, *waiting], timeless=True)
            note = f"routes {status.version} not known to be applied ({listing})"
        return Gate(unknown=note, stragglers=stragglers, excluded=excluded)
    error = f"no ACK of routes {status.version} within {ack_timeout:g}s ({_listing(late)})"
    if quorum < 1 or nacks or unknown:
        error += (
            f": quorum {need} of {total} nodes out of reach ({applied} applied"
            + (f", {len(unknown)} unknown" if unknown else "")
            + (f", {len(nacks)} NACKing" if nacks else "")
            + ")"
        )
    return Gate(error=error, stragglers=stragglers, excluded=excluded)


def _coarse(status: RouteStatus, ack_timeout: float, now: float) -> Gate:
    """A status without its nodes' standing (a data plane that does not tell): every
    node must ACK, the clock from `Pending.since`."""
    if isinstance(status, Rejected):
        who = f"{status.node} ({status.identity})" if status.identity else status.node
        return Gate(error=f"Envoy {who} rejected routes {status.version}: {status.error}")
    if isinstance(status, Pending):
        # Known nodes that did not ACK in time fail the step; unknown ones hold it.
        lagging = bool(status.lagging) or not status.unknown
        if lagging and now - status.since > ack_timeout:
            return Gate(
                error=f"no ACK of routes {status.version} within "
                f"{ack_timeout:g}s ({status.waiting_for()})"
            )
        if status.unknown:
            return Gate(
                unknown=f"routes {status.version} not known to be applied "
                f"({steady(status.waiting_for())})"
            )
        return Gate()
    assert isinstance(status, Applied)
    return Gate(applied_at=status.at)


def _nth_smallest(times: Sequence[float], n: int) -> float:
    """The n-th (from 1) smallest of `times`: the ACK that made the quorum. A quorum
    near 1 needs only the few largest (heapq), not a sort of the whole fleet."""
    rest = len(times) - n + 1
    if rest <= 64:
        return heapq.nlargest(rest, times)[-1]
    return sorted(times)[n - 1]


def _who(a: NodeAck) -> str:
    return f"{a.node} ({a.identity})" if a.identity else a.node


def _late_why(a: NodeAck, ack_timeout: float) -> str:
    if a.unknown:
        return f"not known to have applied them within {ack_timeout:g}s: {a.unknown}"
    return f"no ACK within {ack_timeout:g}s of its send"


_DURATION = re.compile(r"(?: for)? \d+(?:\.\d+)?s(?: ago)?\b")


def steady(text: str) -> str:
    """`text` without its durations ('replica X gone 4.6s ago' -> 'replica X gone';
    'silent for 2.7s' -> 'silent'; 'left X 0.3s ago, not seen since' -> 'left X, not
    seen since'): an unknown node's why (`ha.replicas`) grows at every look, and the
    hold's note must stay the same while its reason does."""
    return _DURATION.sub("", text)


def _listing(nodes: Sequence[NodeAck], timeless: bool = False) -> str:
    """'unknown: A (why); not ACKed yet: B, C', as `Pending.waiting_for` says it
    (`timeless`: each why without its durations, `steady`)."""
    unknown = [
        f"{a.node} ({steady(a.unknown) if timeless else a.unknown})" for a in nodes if a.unknown
    ]
    lagging = [a.node for a in nodes if not a.unknown]
    parts = [f"unknown: {', '.join(unknown)}"] if unknown else []
    if lagging:
        parts.append(f"not ACKed yet: {', '.join(lagging)}")
    return "; ".join(parts)

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

Unknown nodes (of a silent or gone replica) are never applied; their clock runs from
when they went unknown. A straggler that ACKs later is applied again: it rejoins.
With the defaults (quorum 1.0, no NACK tolerated) this is the gate of every node.
"""

from __future__ import annotations

import heapq
import math
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
    """Not applied yet, and some nodes waited for are not known to have applied
    anything (their replica silent or gone): which and why."""
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
    late = [a for a in silent if now - a.since > ack_timeout]
    waiting = [a for a in silent if now - a.since <= ack_timeout]
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
        at = _nth_smallest(status.acked_times, need)
        return Gate(applied_at=at, stragglers=stragglers, excluded=excluded)
    if applied + len(waiting) >= need:  # the quorum may still ACK: hold
        unknown = [a for a in waiting if a.unknown]
        note = None
        if unknown:
            note = f"routes {status.version} not known to be applied ({_listing(waiting)})"
        return Gate(unknown=note, stragglers=stragglers, excluded=excluded)
    error = f"no ACK of routes {status.version} within {ack_timeout:g}s ({_listing(late)})"
    if quorum < 1 or nacks:
        error += (
            f": quorum {need} of {total} nodes out of reach ({applied} applied"
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
        if now - status.since > ack_timeout:
            return Gate(
                error=f"no ACK of routes {status.version} within "
                f"{ack_timeout:g}s ({status.waiting_for()})"
            )
        if status.unknown:
            return Gate(
                unknown=f"routes {status.version} not known to be applied ({status.waiting_for()})"
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


def _listing(nodes: Sequence[NodeAck]) -> str:
    """'unknown: A (why); not ACKed yet: B, C', as `Pending.waiting_for` says it."""
    unknown = [f"{a.node} ({a.unknown})" for a in nodes if a.unknown]
    lagging = [a.node for a in nodes if not a.unknown]
    parts = [f"unknown: {', '.join(unknown)}"] if unknown else []
    if lagging:
        parts.append(f"not ACKed yet: {', '.join(lagging)}")
    return "; ".join(parts)

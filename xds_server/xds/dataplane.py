"""The data plane as the rollout controller sees it: set the weights, and learn whether
a region's proxies have applied them. `xds.publisher.XdsPublisher` implements it over
ADS; controller tests use an in-memory double."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from xds_server.traffic import TrafficState
from xds_server.xds.status import NodeStatus


class NodeAck(NamedTuple):
    """A node that has not ACKed (or is not known to have ACKed) its region's current
    routes: what the ACK gate weighs of it (`xds.acks.ack_gate`: quorum, stragglers,
    each node's own clock). The nodes that did ACK are only their ACK times."""

    node: str
    since: float
    """When the node's time to ACK these routes began: when it was sent them (if not
    yet: when it connected or they were published, the later); for an unknown node,
    when it went unknown (or the publish, the later)."""
    nack: str = ""
    """Its NACK of these routes (the error), else "": it keeps its last good config."""
    identity: str = ""
    """Its certificate identity (xDS over mTLS), else ""."""
    unknown: str = ""
    """Why it is not known to have applied anything (its replica silent or gone), else ""."""


@dataclass(frozen=True)
class Applied:
    """Every connected node of the region has ACKed the current routes."""

    version: str
    at: float
    """When the last of them ACKed (the publish time when no node is connected)."""
    nodes: int
    acked_times: tuple[float, ...] = field(default=(), repr=False)
    """When each node that ACKed these routes did (empty from a data plane that does
    not tell: then `holdouts` is too)."""
    holdouts: tuple[NodeAck, ...] = field(default=(), repr=False)
    """Every other node's standing (`xds.acks`)."""

    @property
    def counts(self) -> tuple[int, int, int]:
        """(applied, unknown, lagging) nodes."""
        return self.nodes, 0, 0


@dataclass(frozen=True)
class Pending:
    """Some nodes have not ACKed the current routes yet, or are not known to have: the
    region is not judged (it holds) until they are seen applying them; `ack_timeout`
    decides for the lagging ones, `max_hold` for the unknown ones (`xds.acks`)."""

    version: str
    since: float
    """When these routes were published (or, when only unknown nodes hold them, when the
    first of those went unknown, if later): what `ack_timeout` counts from."""
    lagging: tuple[str, ...]
    """Nodes seen (on a replica that is heard from) that have not ACKed these routes."""
    unknown: tuple[str, ...] = ()
    """Nodes of a replica that is gone or silent, each as 'NODE (why)': not known to have
    applied anything newer than what that replica last published, so never counted as
    applied; they are waited for until seen applying the routes on some replica."""
    applied: int = 0
    """Nodes seen that have ACKed these routes."""
    acked_times: tuple[float, ...] = field(default=(), repr=False)
    """When each node that ACKed these routes did (empty from a data plane that does
    not tell: then `holdouts` is too)."""
    holdouts: tuple[NodeAck, ...] = field(default=(), repr=False)
    """Every other node's standing (`xds.acks`)."""

    @property
    def counts(self) -> tuple[int, int, int]:
        """(applied, unknown, lagging) nodes."""
        return self.applied, len(self.unknown), len(self.lagging)

    def waiting_for(self) -> str:
        """The nodes waited for, and why, for a log line or an audit entry."""
        parts = [f"unknown: {', '.join(self.unknown)}"] if self.unknown else []
        if self.lagging:
            parts.append(f"not ACKed yet: {', '.join(self.lagging)}")
        return "; ".join(parts)


@dataclass(frozen=True)
class Rejected:
    """A node NACKed the current routes: it keeps serving its last good config (the
    first one; `holdouts` has every node that did not ACK, NACKs tolerated or not:
    `xds.acks`)."""

    version: str
    node: str
    error: str
    identity: str = ""
    """The node's certificate identity (xDS over mTLS), else ""."""
    acked_times: tuple[float, ...] = field(default=(), repr=False)
    """When each node that ACKed these routes did (empty from a data plane that does
    not tell: then `holdouts` is too)."""
    holdouts: tuple[NodeAck, ...] = field(default=(), repr=False)
    """Every other node's standing (`xds.acks`)."""

    @property
    def counts(self) -> tuple[int, int, int]:
        """(applied, unknown, lagging) nodes (NACKing ones lag); without the nodes'
        standing, not known once one rejected the routes."""
        if not self.holdouts:
            return 0, 0, 1
        unknown = sum(bool(a.unknown) for a in self.holdouts)
        return len(self.acked_times), unknown, len(self.holdouts) - unknown


RouteStatus = Applied | Pending | Rejected


class DataPlane(Protocol):
    def set_traffic(self, traffic: TrafficState, *, urgent: bool, reason: str) -> None:
        """Serve these weights. Urgent (a step, a rollback): published before returning;
        otherwise coalesced with changes that land within a few milliseconds."""
        ...

    def next_version(self, region: str) -> int:
        """The snapshot version the region's next push will carry (recorded with a
        decision before its push)."""
        ...

    def routes_applied(self, region: str) -> RouteStatus:
        """Where the region's nodes stand on its current routes; `counts` gives the
        applied, unknown and lagging nodes (signal health)."""
        ...

    def node_status(self, region: str | None = None) -> list[NodeStatus]:
        """Every connected node (of one region), with what it was sent and ACKed."""
        ...

    def pool_hosts(self, region: str, cluster: str) -> int | None:
        """How many hosts a pool really has in the region (static, or registered and
        alive); None when not known. 0 holds the rollout there."""
        ...

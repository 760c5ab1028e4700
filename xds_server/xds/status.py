"""What each connected node has been sent, has applied (ACK) and has rejected (NACK).

The ADS streams write here; the rollout controller reads it to know when a region's
data plane has a step's weights, and the admin API shows it. One NodeStatus per stream:
two Envoys that share a node id are still two entries.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from xds_server.xds.types import ROUTE, SEND_ORDER, short

log = logging.getLogger("xds_server.status")

ECHO_LIMIT = 100
"""The most characters of a client-supplied string (node id, region, type URL, nonce)
that a log line or a gRPC status message repeats: enough to recognise it (real node ids
and type URLs are shorter), and a status message always fits gRPC's trailers."""
NACK_ERROR_LIMIT = 1_000
"""The most characters of a NACK's error_detail kept and logged: Envoy's rejection
reasons fit, a client cannot fill the log (or the admin API) with megabytes."""


def clip(text: str, limit: int = ECHO_LIMIT, *, quote: bool = False) -> str:
    """`text`, cut to `limit` characters plus "... (N more characters)"; quoted (repr)
    when `quote`, the suffix outside the quotes."""
    head = text[:limit]
    shown = repr(head) if quote else head
    rest = len(text) - len(head)
    return f"{shown}... ({rest} more characters)" if rest else shown


@dataclass
class TypeStatus:
    sent_version: str = ""
    sent_at: float | None = None
    """When `sent_version` was first sent to the node (its time to ACK runs from there)."""
    acked_version: str = ""
    acked_at: float | None = None
    nack_version: str = ""
    nack_error: str = ""
    nack_at: float | None = None
    sent_response: bytes = field(default=b"", repr=False)
    """The encoded DiscoveryResponse last sent (without nonce), shared with other streams."""
    subscribed: bool = False
    """Does the node subscribe to the type now (to all of it, or to some names)?"""


@dataclass
class NodeStatus:
    stream_id: int
    node_id: str
    region: str
    connected_since: float
    listen: str = ""
    user_agent: str = ""
    identity: str = ""
    """The SPIFFE identity of the node's client certificate (xDS over mTLS), else ""."""
    types: dict[str, TypeStatus] = field(
        default_factory=lambda: {t: TypeStatus() for t in SEND_ORDER}
    )

    @property
    def client_type(self) -> str:
        """ "envoy", "grpc" (an application with the gRPC library's own xDS client) or,
        for anything else, the user agent's name as the client gave it."""
        name = self.user_agent.partition("/")[0].strip().lower()
        if name == "envoy":
            return "envoy"
        if name.startswith("grpc"):  # grpcio 1.85: "gRPC C-core linux Python"
            return "grpc"
        return name or "unknown"

    def judged_on(self, type_url: str) -> bool:
        """Does this node's ACK of the type count when the rollout asks whether the region
        applied it? An Envoy's always: it subscribes to every type as it starts, and until
        it has ACKed it has not applied the type. A proxyless gRPC client's only while it
        subscribes to the type: it asks only for what its channels' targets need (no
        routes at all for a target the spec lacks), and must not hold up the rollout
        for routes it never asked for."""
        return self.client_type != "grpc" or self.types[type_url].subscribed

    def overall_sync(self, current: dict[str, str]) -> str:
        """The worst sync state over the types this node was sent."""
        states = [self.sync_state(t, v) for t, v in current.items() if self.types[t].sent_version]
        for worst in ("NACKED", "STALE", "NOT SENT"):
            if worst in states:
                return worst
        return "SYNCED" if states else "NOT SENT"

    def sync_state(self, type_url: str, current_version: str) -> str:
        """SYNCED, NACKED, STALE (sent, not yet applied) or NOT SENT, like istioctl."""
        ts = self.types[type_url]
        if not ts.sent_version:
            return "NOT SENT"
        if ts.acked_version == current_version:
            return "SYNCED"
        if ts.nack_version and ts.nack_version == ts.sent_version:
            return "NACKED"
        return "STALE"


Listener = Callable[[NodeStatus], None]


class NodeRegistry:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        """The wall clock its times are on (the rollout controller's; a test may skew both)."""
        self._nodes: dict[int, NodeStatus] = {}
        self._per_region: Counter[str] = Counter()
        self._next_id = 0
        self._listeners: tuple[Listener, ...] = ()
        self._routes_first_sent: dict[tuple[str, str], tuple[str, float]] = {}
        """(region, node id) -> (routes version, when that node was first sent it, on
        any of its streams): a node that reconnects keeps its time to ACK the routes
        (a node flapping without ever ACKing must not hold a step forever)."""

    def connect(
        self,
        node_id: str,
        region: str,
        listen: str = "",
        user_agent: str = "",
        identity: str = "",
    ) -> NodeStatus:
        self._next_id += 1
        status = NodeStatus(
            self._next_id, node_id, region, self.clock(), listen, user_agent, identity
        )
        self._nodes[status.stream_id] = status
        self._per_region[region] += 1
        log.info(
            "node connected: %s region=%s stream=%d%s",
            clip(node_id),
            region,
            status.stream_id,
            f" listen={clip(listen)}" if listen else "",
        )
        self._notify(status)
        return status

    def disconnect(self, status: NodeStatus, reason: str) -> None:
        if self._nodes.pop(status.stream_id, None) is not None:
            self._per_region[status.region] -= 1
            log.info(
                "node disconnected: %s region=%s stream=%d (%s)",
                clip(status.node_id),
                status.region,
                status.stream_id,
                reason,
            )
            self._notify(status)

    def record_sent(
        self, status: NodeStatus, type_url: str, version: str, response: bytes = b""
    ) -> None:
        ts = status.types[type_url]
        if version != ts.sent_version or ts.sent_at is None:
            # (A version sent again, a subscription's change, keeps its first send: the
            # node's time to ACK it runs from there, `xds.acks`.)
            ts.sent_at = self.clock()
            if type_url == ROUTE:
                ts.sent_at = self._first_route_send(status, version, ts.sent_at)
        ts.sent_version, ts.sent_response = version, response

    def _first_route_send(self, status: NodeStatus, version: str, now: float) -> float:
        """When this node (by id, over its streams) was first sent routes `version`.
        The memory is kept to the connected nodes when it grows past twice their number."""
        key = (status.region, status.node_id)
        first = self._routes_first_sent.get(key)
        if first is not None and first[0] == version:
            return first[1]
        self._routes_first_sent[key] = (version, now)
        if len(self._routes_first_sent) > 2 * len(self._nodes) + 1_000:
            live = {(n.region, n.node_id) for n in self._nodes.values()}
            self._routes_first_sent = {
                k: v for k, v in self._routes_first_sent.items() if k in live
            }
        return now

    def record_subscription(self, status: NodeStatus, type_url: str, subscribed: bool) -> None:
        """The node now subscribes to some of the type (or all of it), or to none of it."""
        status.types[type_url].subscribed = subscribed

    def record_ack(self, status: NodeStatus, type_url: str, version: str) -> None:
        ts = status.types[type_url]
        ts.acked_version, ts.acked_at = version, self.clock()
        if log.isEnabledFor(logging.DEBUG):  # (every ACK of a fleet: no arguments made)
            log.debug(
                "ACK from %s region=%s type=%s version=%s",
                clip(status.node_id),
                status.region,
                short(type_url),
                version,
            )
        self._notify(status)

    def record_nack(self, status: NodeStatus, type_url: str, version: str, error: str) -> None:
        """Record a NACK; its error is kept (and logged) cut to NACK_ERROR_LIMIT characters."""
        ts = status.types[type_url]
        error = clip(error, NACK_ERROR_LIMIT)
        ts.nack_version, ts.nack_error, ts.nack_at = version, error, self.clock()
        log.warning(
            "NACK from %s region=%s type=%s version=%s: %s",
            clip(status.node_id),
            status.region,
            short(type_url),
            version,
            error,
        )
        self._notify(status)

    def connected(self, status: NodeStatus) -> bool:
        return status.stream_id in self._nodes

    def count(self, region: str) -> int:
        """Connected nodes of a region, in O(1) (listeners call it on every ACK)."""
        return self._per_region[region]

    def find(self, node_id: str) -> list[NodeStatus]:
        return [n for n in self._nodes.values() if n.node_id == node_id]

    def nodes(self, region: str | None = None) -> list[NodeStatus]:
        return [n for n in self._nodes.values() if region is None or n.region == region]

    def __iter__(self) -> Iterator[NodeStatus]:
        return iter(list(self._nodes.values()))

    def judged(self, region: str, type_url: str) -> list[NodeStatus]:
        """The connected nodes of the region whose ACKs of the type count (`judged_on`)."""
        return [n for n in self.nodes(region) if n.judged_on(type_url)]

    def all_acked(self, region: str, type_url: str, version: str) -> bool:
        """True when every connected node of the region that is judged on the type (every
        Envoy; gRPC clients subscribed to it) has applied `version` of the type."""
        judged = self.judged(region, type_url)
        return all(n.types[type_url].acked_version == version for n in judged)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` on every connect, disconnect, ACK and NACK; returns unsubscribe."""
        self._listeners = (*self._listeners, listener)

        def unsubscribe() -> None:
            at = self._listeners.index(listener)
            self._listeners = self._listeners[:at] + self._listeners[at + 1 :]

        return unsubscribe

    def _notify(self, status: NodeStatus) -> None:
        for listener in self._listeners:  # (a tuple: a listener may unsubscribe meanwhile)
            listener(status)

"""What state-of-the-world and delta streams share: who the node is, the route gate of
make-before-break, nonces, and the shape of a stream's protocol state. No I/O."""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

from envoy.config.core.v3 import base_pb2

from xds_server.spec import parse_host_port
from xds_server.xds.snapshot import ListenAddress, NameSet, Snapshot
from xds_server.xds.status import NodeRegistry, NodeStatus, clip
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTEN_METADATA_KEY, ROUTE, SEND_ORDER, short

log = logging.getLogger("xds_server.stream")

MAX_NAMES_PER_TYPE = 10_000
"""The most resource names one stream may subscribe to per type (state of the world: in
one request; delta: all its subscriptions together, and its initial_resource_versions).
A node asks for endpoints by cluster name and routes by route configuration name, so a
real node asks for as many names as its region has clusters: three pools a service, a
3,000-name mesh at the 1,000 services the builder is benchmarked with. 10,000 is over
three times that, and caps what one stream can make the server hold at a few MB (a name
costs the server 100 to 250 bytes: the string and its places in sets; measured, 10,000
names of 60 characters held 2.5 MB)."""

MAX_UNKNOWN_PENDING = 8
"""Unknown types one stream may have waiting for their empty answer at once."""

UNKNOWN_TYPE_VERSION = "0"
"""The version of the empty answer to a type this server does not serve: it never changes."""


class StreamProtocol(Protocol):
    """The protocol state of one stream (SotW or delta): no I/O."""

    def on_request(self, req: Any) -> bool: ...

    def due(self, snap: Snapshot) -> list[bytes]: ...


class StreamError(Exception):
    """A request the server will not serve: the stream ends with the gRPC status named by
    `code` (a grpc.StatusCode name) and this message, which echoes nothing unclipped."""

    code = "INVALID_ARGUMENT"


class ProtocolError(StreamError):
    """A request that breaks the ADS protocol (INVALID_ARGUMENT)."""


class TooManyNames(StreamError):
    """A subscription past MAX_NAMES_PER_TYPE: RESOURCE_EXHAUSTED, gRPC's code for a
    quota the server sets (the request is well-formed; a server may allow more)."""

    code = "RESOURCE_EXHAUSTED"


def check_type_url(req: Any) -> None:
    """On an aggregated stream every request must name its type (only a single-type xDS
    service may leave it empty); no response could say which request it answers."""
    if not req.type_url:
        raise ProtocolError(
            "a request has an empty type_url: on an aggregated (ADS) stream every "
            "request must name the resource type it is for"
        )


def check_names(type_url: str, count: int, limit: int) -> None:
    if count > limit:
        raise TooManyNames(
            f"{clip(short(type_url))}: the stream subscribes to {count} resource names; "
            f"this server serves at most {limit} names per type on one stream"
        )


_NAME_SETS: weakref.WeakValueDictionary[tuple[int, int], NameSet] = weakref.WeakValueDictionary()


def shared_names(names: Iterable[str]) -> NameSet:
    """One `NameSet` object for every stream that asks for the same names: a fleet asks
    for the same thousands of endpoint names, and a copy per stream adds up. A set is
    kept only while some stream holds it (weak references), so a churn of distinct
    subscriptions leaves nothing behind."""
    key = frozenset(names)
    index = (hash(key), len(key))
    hit = _NAME_SETS.get(index)
    if hit is None or hit != key:  # (an unequal set of the same hash: not shared)
        hit = NameSet(sys.intern(n) for n in key)
        _NAME_SETS[index] = hit
    return hit


_NOTHING_PENDING: Mapping[str, set[str]] = MappingProxyType({})


class UnknownTypes:
    """Requests for types this server does not serve get an empty answer, so a node need
    not wait for a timeout: state of the world, a response with no resources; delta, the
    names asked for in removed_resources. Only a request that asks (SotW: no nonce;
    delta: no nonce, or new names) is answered, never an ACK of the empty answer.
    Logged once per stream (at info; later ones at debug)."""

    def __init__(self, status: NodeStatus, limit: int) -> None:
        self.status = status
        self.limit = limit
        self.pending: dict[str, set[str]] = {}
        self._logged = False

    def request(self, type_url: str, names: Collection[str], answer: bool) -> bool:
        """Note a request for the unknown `type_url`; True when an answer is now due."""
        level = logging.DEBUG if self._logged else logging.INFO
        self._logged = True
        log.log(
            level,
            "%s asked for %s, a type this server does not serve: answered empty",
            clip(self.status.node_id),
            clip(type_url),
        )
        if not answer:
            return False
        if type_url not in self.pending and len(self.pending) >= MAX_UNKNOWN_PENDING:
            log.debug("%s: too many unknown types at once; not answered", clip(self.status.node_id))
            return False
        waiting = self.pending.setdefault(type_url, set())
        waiting.update(n for n in names if n != "*")
        check_names(type_url, len(waiting), self.limit)
        return True

    def take(self) -> Mapping[str, set[str]]:
        """The unknown types to answer now (nothing allocated when there are none: it is
        asked at every wake-up of every stream)."""
        if not self.pending:
            return _NOTHING_PENDING
        out, self.pending = self.pending, {}
        return out


def stale(status: NodeStatus, req: Any, latest: str) -> bool:
    """Is this an answer to a response other than the last one sent for its type?"""
    if req.response_nonce == latest:
        return False
    log.debug(
        "%s: stale nonce %s for %s (latest %s)",
        clip(status.node_id),
        clip(req.response_nonce),
        short(req.type_url),
        latest,
    )
    return True


def record_answer(
    registry: NodeRegistry, status: NodeStatus, req: Any, sent: str, acked: str
) -> bool:
    """Record the node's answer to the last response: a NACK (of version `sent`) when it
    carries `error_detail`, else an ACK (of `acked`); ACK and NACK are never told apart
    by comparing versions. True for an ACK."""
    if req.HasField("error_detail"):
        registry.record_nack(status, req.type_url, sent, req.error_detail.message)
        return False
    registry.record_ack(status, req.type_url, acked)
    return True


class TypeProgress(Protocol):
    """What the route gate needs to know of one type on a stream."""

    subscribed: bool
    acked_resources: frozenset[str]

    def named(self) -> Collection[str] | None:
        """The names subscribed to; None for a wildcard subscription (every resource)."""
        ...


class TypeState(TypeProgress, Protocol):
    """What the send order needs to know of one type on a stream, whatever the variant."""

    in_flight: bool
    """A response of this type awaits the node's answer."""

    def up_to_date(self, version: str) -> bool:
        """Has the node been sent this type at the snapshot's `version`, for its current
        subscription, with no answer owed?"""
        ...


S = TypeVar("S", bound=TypeState)


class StreamBase(Generic[S]):
    """What a stream's protocol state holds whatever its variant (SotW or delta); a
    variant says what it keeps per type (`new_type_state`)."""

    def __init__(
        self,
        status: NodeStatus,
        registry: NodeRegistry,
        listen: ListenAddress | None = None,
        max_names: int = MAX_NAMES_PER_TYPE,
    ) -> None:
        self.status = status
        self.registry = registry
        self.listen = listen
        self.max_names = max_names
        self.unknown = UnknownTypes(status, max_names)
        self.types: dict[str, S] = {t: self.new_type_state() for t in SEND_ORDER}
        self.held = False
        """Something was due but waited (an answer outstanding, routes not ready)."""

    def new_type_state(self) -> S:
        raise NotImplementedError

    def sendable(self, snap: Snapshot) -> Iterator[tuple[str, S, str]]:
        """Make before break: in send order (clusters, endpoints, listeners, routes), each
        subscribed type that has something to send now, with its version in `snap`. A
        type whose last response is unanswered waits, and so do routes until the node
        has ACKed the clusters and endpoints they use; either sets `held`."""
        self.held = False
        versions = snap.type_version_texts
        for type_url in SEND_ORDER:
            ts = self.types[type_url]
            if not ts.subscribed:
                continue
            version = versions[type_url]
            if ts.up_to_date(version):
                continue
            if ts.in_flight or (type_url == ROUTE and not routes_ready(self.types, snap)):
                self.held = True
                continue
            yield type_url, ts, version


def routes_ready(types: Mapping[str, TypeProgress], snap: Snapshot) -> bool:
    """Make before break: routes go out only once the node has ACKed every cluster they
    use, with its endpoints (checked for the types the stream subscribes to: proxyless
    gRPC clients ask for routes before clusters). A node that asks for clusters by name
    (a proxyless gRPC client: it asks for those its routes use, once it has them) is
    judged on the clusters it asked for; one that asks for all (Envoy) on all."""
    clusters, endpoints = types[CLUSTER], types[ENDPOINT]
    return snap.routes_ready(
        clusters.acked_resources if clusters.subscribed else None,
        endpoints.acked_resources if endpoints.subscribed else None,
        clusters.named() if clusters.subscribed else None,
    )


class NodeError(StreamError, ValueError):
    """A node the server cannot serve; the message is sent to it as a gRPC status."""


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    region: str
    listen: ListenAddress | None
    user_agent: str


def identify(node: base_pb2.Node, regions: Collection[str]) -> NodeIdentity:
    """Region from `node.locality.region`, else `node.cluster`; listen address from metadata."""
    region = node.locality.region or node.cluster
    if not region:
        raise NodeError(
            f"node {clip(node.id, quote=True)} names no region: set node.locality.region "
            "(or node.cluster) in its bootstrap"
        )
    if region not in regions:
        raise NodeError(
            f"node {clip(node.id, quote=True)} is in region {clip(region, quote=True)}, "
            f"which the mesh spec does not have (regions: {', '.join(regions)})"
        )
    listen = None
    field = node.metadata.fields.get(LISTEN_METADATA_KEY)
    if field is not None:
        listen = parse_listen(field.string_value, node.id)
    agent = node.user_agent_name
    if node.HasField("user_agent_build_version"):
        v = node.user_agent_build_version.version
        agent = f"{agent}/{v.major_number}.{v.minor_number}.{v.patch}"
    elif node.user_agent_version:
        agent = f"{agent}/{node.user_agent_version}"
    return NodeIdentity(node.id, region, listen, agent)


def parse_listen(text: str, node_id: str = "") -> ListenAddress:
    try:
        return parse_host_port(text, port_from=1)
    except ValueError:
        raise NodeError(
            f"node {clip(node_id, quote=True)}: metadata "
            f"{LISTEN_METADATA_KEY}={clip(text, quote=True)} is not ADDRESS:PORT"
        ) from None

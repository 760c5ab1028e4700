"""What state-of-the-world and delta streams share: who the node is, the route gate of
make-before-break, nonces, and the shape of a stream's protocol state. No I/O."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from envoy.config.core.v3 import base_pb2

from xds_server.spec import parse_host_port
from xds_server.xds.snapshot import ListenAddress, Snapshot
from xds_server.xds.status import NodeRegistry, NodeStatus
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTEN_METADATA_KEY, short

log = logging.getLogger("xds_server.stream")
_nonces = itertools.count(1)


def next_nonce() -> str:
    """A nonce unique in this process, for any stream's next response."""
    return str(next(_nonces))


class StreamProtocol(Protocol):
    """The protocol state of one stream (SotW or delta): no I/O."""

    def on_request(self, req: Any) -> bool: ...

    def due(self, snap: Snapshot) -> list[bytes]: ...


def unsupported(status: NodeStatus, type_url: str) -> None:
    log.debug("%s asked for unsupported type %s; ignored", status.node_id, type_url)


def stale(status: NodeStatus, req: Any, latest: str) -> bool:
    """Is this an answer to a response other than the last one sent for its type?"""
    if req.response_nonce == latest:
        return False
    log.debug(
        "%s: stale nonce %s for %s (latest %s)",
        status.node_id,
        req.response_nonce,
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


def routes_ready(types: Mapping[str, TypeProgress], snap: Snapshot) -> bool:
    """Make before break: routes go out only once the node has ACKed every cluster they
    use, with its endpoints (checked for the types the stream subscribes to: proxyless
    gRPC clients ask for routes before clusters)."""
    clusters, endpoints = types[CLUSTER], types[ENDPOINT]
    return snap.routes_ready(
        clusters.acked_resources if clusters.subscribed else None,
        endpoints.acked_resources if endpoints.subscribed else None,
    )


class NodeError(ValueError):
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
            f"node {node.id!r} names no region: set node.locality.region "
            "(or node.cluster) in its bootstrap"
        )
    if region not in regions:
        raise NodeError(
            f"node {node.id!r} is in region {region!r}, which the mesh spec "
            f"does not have (regions: {', '.join(regions)})"
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
            f"node {node_id!r}: metadata {LISTEN_METADATA_KEY}={text!r} is not ADDRESS:PORT"
        ) from None

"""The ADS server (state of the world) on grpc.aio.

Each stream is level-triggered: whenever a request arrives or the region's snapshot
changes, `SotwStream.due` compares what the node should have with what it was sent and
sends what is missing, in make-before-break order (clusters, endpoints, listeners,
routes):

- each type has at most one response awaiting the node's answer;
- routes are sent only when every cluster they use has been ACKed by the node, with its
  endpoints, so Envoy never routes to a cluster it has not warmed;
- ACK and NACK are told apart by `error_detail`, never by comparing versions; a NACKed
  version is not sent again: the node keeps its last good config until the config
  changes;
- a request whose nonce is not the last one sent for its type is stale and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from xds_server.xds.cache import SnapshotCache
from xds_server.xds.delta import DeltaStream
from xds_server.xds.snapshot import ListenAddress, Snapshot, with_nonce
from xds_server.xds.status import NodeRegistry, NodeStatus
from xds_server.xds.types import CLUSTER, ENDPOINT, ROUTE, SEND_ORDER, WILDCARD_TYPES, short

log = logging.getLogger("xds_server.ads")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
LISTEN_METADATA_KEY = "xds_server.listen"
"""Node metadata key naming the address the node's listener should bind to."""


class StreamProtocol(Protocol):
    """The protocol state of one stream (SotW or delta): no I/O."""

    def on_request(self, req: Any) -> bool: ...

    def due(self, snap: Snapshot) -> list[bytes]: ...


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
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NodeError(
            f"node {node_id!r}: metadata {LISTEN_METADATA_KEY}={text!r} is not ADDRESS:PORT"
        )
    return host.strip("[]"), int(port)


@dataclass
class _TypeState:
    subscribed: bool = False
    names: frozenset[str] | None = None
    """Requested resource names; None asks for every resource (wildcard)."""
    nonce: str = ""
    in_flight: bool = False
    sent_version: str = ""
    sent_names: frozenset[str] | None = None
    sent_resources: frozenset[str] = frozenset()
    acked_resources: frozenset[str] = frozenset()
    answer_due: bool = False
    """A fresh request (empty nonce) always gets an answer, even at the same version."""


class SotwStream:
    """The protocol state of one state-of-the-world stream; no I/O."""

    _nonces = itertools.count(1)

    def __init__(
        self, status: NodeStatus, registry: NodeRegistry, listen: ListenAddress | None = None
    ) -> None:
        self.status = status
        self.registry = registry
        self.listen = listen
        self.types = {t: _TypeState() for t in SEND_ORDER}
        self.held = False
        """Something was due but waited (an answer outstanding, routes not ready)."""

    def on_request(self, req: discovery_pb2.DiscoveryRequest) -> bool:
        """Apply a request; True when it may have made something due (worth a `due`)."""
        ts = self.types.get(req.type_url)
        if ts is None:
            log.debug(
                "%s asked for unsupported type %s; ignored", self.status.node_id, req.type_url
            )
            return False
        names = None if req.type_url in WILDCARD_TYPES else _shared(req.resource_names)
        if req.response_nonce:
            if req.response_nonce != ts.nonce:
                log.debug(
                    "%s: stale nonce %s for %s (latest %s); ignored",
                    self.status.node_id,
                    req.response_nonce,
                    short(req.type_url),
                    ts.nonce,
                )
                return False
            ts.in_flight = False
            if req.HasField("error_detail"):
                self.registry.record_nack(
                    self.status, req.type_url, ts.sent_version, req.error_detail.message
                )
            else:
                ts.acked_resources = ts.sent_resources
                self.registry.record_ack(self.status, req.type_url, req.version_info)
            # A plain ACK makes nothing due unless something waited for it.
            wake = self.held or names != ts.names
        else:  # a new subscription, or the node re-asking: it gets an answer
            ts.answer_due, ts.in_flight = True, False
            wake = True
        ts.subscribed = True
        ts.names = names
        return wake

    def due(self, snap: Snapshot) -> list[bytes]:
        """The responses to send now, in make-before-break order.

        Each type has at most one response awaiting its answer. Only routes wait for
        other types: Envoy holds its CDS ACK until a warming cluster has its endpoints,
        so endpoints must flow while clusters are unanswered.
        """
        out = []
        self.held = False
        for type_url in SEND_ORDER:
            ts = self.types[type_url]
            if not ts.subscribed:
                continue
            version = snap.type_version(type_url)
            if ts.sent_version == version and ts.sent_names == ts.names and not ts.answer_due:
                continue
            if ts.in_flight or (type_url == ROUTE and not self._clusters_ready(snap)):
                self.held = True
                continue
            encoded = snap.encoded(type_url, ts.names, self.listen)
            ts.nonce = str(next(self._nonces))
            ts.in_flight, ts.answer_due = True, False
            ts.sent_version, ts.sent_names = version, ts.names
            ts.sent_resources = encoded.names
            self.registry.record_sent(self.status, type_url, version, encoded.body)
            out.append(with_nonce(encoded.body, ts.nonce))
        return out

    def _clusters_ready(self, snap: Snapshot) -> bool:
        c, e = self.types[CLUSTER], self.types[ENDPOINT]
        return snap.routes_ready(
            c.acked_resources if c.subscribed else None, e.acked_resources if e.subscribed else None
        )


_NAME_SETS: dict[frozenset[str], frozenset[str]] = {}


def _shared(names: Any) -> frozenset[str]:
    """One frozenset object for every stream that asks for the same names: a fleet asks
    for the same thousands of endpoint names, and a copy per stream adds up."""
    key = frozenset(names)
    hit = _NAME_SETS.get(key)
    if hit is None:
        if len(_NAME_SETS) > 1000:  # bounded: old subscriptions are dropped
            _NAME_SETS.clear()
        hit = _NAME_SETS[key] = frozenset(sys.intern(n) for n in key)
    return hit


class AdsServer:
    """Serves ADS, state of the world and delta, for every region of the cache."""

    def __init__(
        self, cache: SnapshotCache, registry: NodeRegistry, regions: Collection[str]
    ) -> None:
        self.cache = cache
        self.registry = registry
        self.regions = regions
        self._wakes: set[asyncio.Event] = set()
        self.closing = False

    def close(self) -> None:
        """End every stream normally (the nodes reconnect), before the gRPC server stops."""
        self.closing = True
        for wake in self._wakes:
            wake.set()

    def set_regions(self, regions: Collection[str]) -> None:
        self.regions = regions

    def add_to(self, server: grpc.aio.Server) -> None:
        handler = grpc.method_handlers_generic_handler(
            ADS_SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.stream_aggregated_resources,
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=None,  # responses are already encoded bytes
                ),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.delta_aggregated_resources,
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=None,
                ),
            },
        )
        server.add_generic_rpc_handlers((handler,))

    async def stream_aggregated_resources(self, requests: AsyncIterator[Any], context: Any) -> None:
        await self._serve(requests, context, SotwStream)

    async def delta_aggregated_resources(self, requests: AsyncIterator[Any], context: Any) -> None:
        await self._serve(requests, context, DeltaStream)

    async def _serve(
        self,
        requests: AsyncIterator[Any],
        context: Any,
        protocol: Callable[[NodeStatus, NodeRegistry, ListenAddress | None], StreamProtocol],
    ) -> None:
        """One stream, either variant: identify the node, then send what it lacks
        whenever it asks or the region's snapshot changes, until either side ends it."""
        reader = aiter(requests)
        try:
            first = await anext(reader)
        except StopAsyncIteration:
            return
        try:
            ident = identify(first.node, self.regions)
        except NodeError as exc:
            log.warning("refused stream: %s", exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        listen = f"{ident.listen[0]}:{ident.listen[1]}" if ident.listen else ""
        status = self.registry.connect(ident.node_id, ident.region, listen, ident.user_agent)
        stream = protocol(status, self.registry, ident.listen)
        stream.on_request(first)
        wake = asyncio.Event()
        wake.set()
        self.cache.watch(ident.region, wake)
        self._wakes.add(wake)

        async def read() -> None:
            async for req in reader:
                if stream.on_request(req):
                    wake.set()

        reader_task = asyncio.create_task(read())
        reader_task.add_done_callback(lambda _: wake.set())
        reason = "stream closed by the node"
        try:
            while True:
                await wake.wait()
                wake.clear()
                if self.closing:
                    reason = "server stopping"
                    break
                if reader_task.done():
                    error = None if reader_task.cancelled() else reader_task.exception()
                    if error is not None:
                        reason = f"stream error: {error}"
                    break
                snap = self.cache.get(ident.region)
                if snap is None:
                    continue
                for body in stream.due(snap):
                    await context.write(body)
        except asyncio.CancelledError:
            reason = "stream cancelled"
            raise
        finally:
            self.cache.unwatch(ident.region, wake)
            self._wakes.discard(wake)
            reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader_task
            self.registry.disconnect(status, reason)

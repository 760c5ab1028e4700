"""The ADS gRPC service (grpc.aio): one coroutine per stream, state of the world or delta.

A stream is identified by its first request's node, then woken whenever the node asks
or its region's snapshot changes, and sends what its protocol state (`SotwStream` or
`DeltaStream`) says is due. One event loop serves every stream; no thread per stream.

A request that does not decode ends its stream with INVALID_ARGUMENT and one log line:
the requests are decoded leniently (`_lenient`), because a deserializer that raises
makes grpc log a traceback per request (issue 30: 150 per 1,500 garbage requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from xds_server.xds.cache import SnapshotCache
from xds_server.xds.delta import DeltaStream
from xds_server.xds.identity import IdentityError, IdentityPolicy
from xds_server.xds.snapshot import ListenAddress
from xds_server.xds.sotw import SotwStream
from xds_server.xds.status import NodeRegistry, NodeStatus, clip
from xds_server.xds.stream import (
    MAX_NAMES_PER_TYPE,
    NodeError,
    NodeIdentity,
    ProtocolError,
    StreamError,
    StreamProtocol,
    identify,
)

log = logging.getLogger("xds_server.ads")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
HEALTH_SERVICE = "grpc.health.v1.Health"
SERVING = b"\x08\x01"
"""grpc.health.v1 HealthCheckResponse{status: SERVING}, encoded (field 1, varint 1): the
one message of that service this server sends, written out so that the server does not
depend on the grpcio-health-checking package."""
NOT_SERVING = b"\x08\x02"


class AdsService:
    """Serves ADS, state of the world and delta, for every region of the cache."""

    def __init__(
        self, cache: SnapshotCache, registry: NodeRegistry, regions: Collection[str]
    ) -> None:
        self.cache = cache
        self.registry = registry
        self.regions = regions
        self._wakes: set[asyncio.Event] = set()
        self.closing = False
        self.max_names = MAX_NAMES_PER_TYPE
        """The most resource names a stream may subscribe to per type (see stream.py)."""
        self.identity: IdentityPolicy | None = None
        """mTLS: what a node's client certificate must say; None: no certificates."""
        self._by_node: dict[str, tuple[int, asyncio.Event]] = {}
        """The live stream of each node id, and how to wake it."""
        self._replaced: set[int] = set()
        """Streams ended because a newer stream of the same node id came."""
        self.served: Collection[str] | None = None
        """A regional replica's regions (`serve --regions`); None: every region."""
        self.elsewhere: Callable[[str], str] = lambda region: ""
        """Where a region this replica does not serve is served (for the refusal)."""
        self.aside: str | None = None
        """Why this server must not present itself as current (a replica that lost the
        store): health checks get NOT_SERVING, streams are ended and refused with
        UNAVAILABLE, so nodes move to the next server of their bootstrap; None: serving."""

    def step_aside(self, reason: str | None) -> None:
        """Stop presenting this server as current (`reason`), ending every stream; or,
        with None, serve again."""
        self.aside = reason
        if reason is not None:
            for wake in self._wakes:
                wake.set()

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
                    request_deserializer=_lenient(discovery_pb2.DiscoveryRequest),
                    response_serializer=None,  # responses are already encoded bytes
                ),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.delta_aggregated_resources,
                    request_deserializer=_lenient(discovery_pb2.DeltaDiscoveryRequest),
                    response_serializer=None,
                ),
            },
        )
        health = grpc.method_handlers_generic_handler(
            HEALTH_SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.check_health, request_deserializer=None, response_serializer=None
                ),
            },
        )
        server.add_generic_rpc_handlers((handler, health))

    async def check_health(self, request: bytes, context: Any) -> bytes:
        """grpc.health.v1's Check, for any service name: what Envoy's active health check
        of its xDS servers asks (a stopped process never answers it: the check times out,
        and Envoy closes the stream and moves on)."""
        return SERVING if self.aside is None and not self.closing else NOT_SERVING

    async def stream_aggregated_resources(self, requests: AsyncIterator[Any], context: Any) -> None:
        await self._serve(requests, context, SotwStream)

    async def delta_aggregated_resources(self, requests: AsyncIterator[Any], context: Any) -> None:
        await self._serve(requests, context, DeltaStream)

    async def _serve(
        self,
        requests: AsyncIterator[Any],
        context: Any,
        protocol: Callable[[NodeStatus, NodeRegistry, ListenAddress | None, int], StreamProtocol],
    ) -> None:
        """One stream, either variant: identify the node, then send what it lacks
        whenever it asks or the region's snapshot changes, until either side ends it (a
        request the server will not serve ends it with a status: `StreamError`)."""
        reader = aiter(requests)
        try:
            first = await anext(reader)
        except StopAsyncIteration:
            return
        admitted = await self._admit(first, context, protocol)
        if admitted is None:
            return
        ident, status, stream = admitted
        del first  # (it may be large; the stream keeps what it needs)
        wake = self._watch(ident, status.stream_id)
        reader_task = _reading(reader, stream, wake)
        reason = "stream closed by the node"
        try:
            while True:
                await wake.wait()
                wake.clear()
                if self.closing:
                    reason = "server stopping"
                    break
                if self.aside is not None:
                    reason = f"stepped aside: {self.aside}"
                    await context.abort(grpc.StatusCode.UNAVAILABLE, self.aside)
                if status.stream_id in self._replaced:
                    reason = "replaced by a newer stream of the same node id"
                    break
                if reader_task.done():
                    error = None if reader_task.cancelled() else reader_task.exception()
                    if isinstance(error, StreamError):
                        reason = f"refused: {error}"
                        await _refuse(context, error, ident.node_id)
                    elif error is not None:
                        reason = f"stream error: {error}"
                    break
                snap = self.cache.get(ident.region)
                if snap is None:
                    continue
                for body in stream.due(snap):
                    await context.write(body)
                body = b""  # (a waiting stream keeps no response alive: a fleet's add up)
        except asyncio.CancelledError:
            reason = "stream cancelled"
            raise
        finally:
            self._unwatch(ident, status.stream_id, wake)
            reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader_task
            self.registry.disconnect(status, reason)

    def _watch(self, ident: NodeIdentity, stream_id: int) -> asyncio.Event:
        """The event that wakes a stream: set now (its first response is due), by its
        region's new snapshots, by `close`, and by a newer stream of its node id."""
        wake = asyncio.Event()
        wake.set()
        self.cache.watch(ident.region, wake)
        self._wakes.add(wake)
        self._replace_older(ident.node_id, stream_id, wake)
        return wake

    def _unwatch(self, ident: NodeIdentity, stream_id: int, wake: asyncio.Event) -> None:
        """Forget an ended stream everywhere `_watch` put it."""
        self.cache.unwatch(ident.region, wake)
        self._wakes.discard(wake)
        self._replaced.discard(stream_id)
        if self._by_node.get(ident.node_id, (0,))[0] == stream_id:
            del self._by_node[ident.node_id]

    async def _admit(
        self,
        first: Any,
        context: Any,
        protocol: Callable[[NodeStatus, NodeRegistry, ListenAddress | None, int], StreamProtocol],
    ) -> tuple[NodeIdentity, NodeStatus, StreamProtocol] | None:
        """Who the node is (and, with mTLS, whether its certificate says so), and its
        first request applied; None when the stream was refused (with a status)."""
        if self.aside is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.aside)
        try:
            _check_decoded(first)
            ident = identify(first.node, self.regions)
            if self.served is not None and ident.region not in self.served:
                where = self.elsewhere(ident.region)
                raise NodeError(
                    f"node {clip(ident.node_id, quote=True)} is in region {ident.region}, "
                    f"which this replica does not serve (it serves {', '.join(self.served)}); "
                    + (
                        f"{ident.region} is served by {where}"
                        if where
                        else f"no replica serving {ident.region} is known"
                    )
                )
        except StreamError as exc:
            await _refuse(context, exc)
            return None
        spiffe_id = ""
        if self.identity is not None:
            try:
                spiffe_id = self.identity.check(
                    context.auth_context(), ident.node_id, ident.region
                ).spiffe_id
            except IdentityError as exc:
                log.warning("refused stream: %s", exc)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
                return None
        listen = f"{ident.listen[0]}:{ident.listen[1]}" if ident.listen else ""
        status = self.registry.connect(
            ident.node_id, ident.region, listen, ident.user_agent, spiffe_id
        )
        stream = protocol(status, self.registry, ident.listen, self.max_names)
        try:
            stream.on_request(first)
        except StreamError as exc:
            self.registry.disconnect(status, f"refused: {exc}")
            await _refuse(context, exc, ident.node_id)
            return None
        return ident, status, stream

    def _replace_older(self, node_id: str, stream_id: int, wake: asyncio.Event) -> None:
        """One stream per node id: a newer one replaces the older (which ends). A node
        that reconnects before its old stream is seen to close (a half-open connection)
        must not be locked out; with mTLS only the holder of the node's certificate can
        open a stream under its id, so replacing cannot be used to push a node out."""
        older = self._by_node.get(node_id)
        self._by_node[node_id] = (stream_id, wake)
        if older is not None:
            self._replaced.add(older[0])
            older[1].set()


def _reading(
    reader: AsyncIterator[Any], stream: StreamProtocol, wake: asyncio.Event
) -> asyncio.Task[None]:
    """The node's requests, applied to the stream's protocol state as they come; one that
    may have made something due wakes the stream, and so does the end of the requests
    (the task's result then says how they ended)."""

    async def read() -> None:
        async for req in reader:
            _check_decoded(req)
            if stream.on_request(req):
                wake.set()

    task = asyncio.create_task(read())
    task.add_done_callback(lambda _: wake.set())
    return task


async def _refuse(context: Any, exc: StreamError, node_id: str = "") -> None:
    """End the stream with the error's status; its message echoes nothing unclipped."""
    who = f" of {clip(node_id)}" if node_id else f" from {clip(str(context.peer()))}"
    log.warning("refused stream%s: %s", who, exc)
    await context.abort(grpc.StatusCode[exc.code], str(exc))


class Undecodable:
    """A request that did not decode: what `_lenient` hands the stream instead of
    raising (which would make grpc log a traceback), for the stream to refuse."""

    def __init__(self, message: str, size: int, error: Exception) -> None:
        self.message = message
        self.size = size
        text = " ".join(str(error).split())
        # protobuf's "Error parsing message with type 'X': why": the type is said already
        self.error = (text.rpartition("': ")[2] if "': " in text else text)[:200]


def _lenient(message: Any) -> Callable[[bytes], Any]:
    """`message.FromString`, returning an `Undecodable` rather than raising."""
    name = str(message.DESCRIPTOR.name)

    def decode(raw: bytes) -> Any:
        try:
            return message.FromString(raw)
        except Exception as exc:  # DecodeError, or anything protobuf raises on garbage
            return Undecodable(name, len(raw), exc)

    return decode


def _check_decoded(request: Any) -> None:
    """A request that did not decode ends the stream: INVALID_ARGUMENT, one log line."""
    if isinstance(request, Undecodable):
        raise ProtocolError(
            f"the request does not decode as a {request.message} ({request.size} bytes): "
            f"{request.error}"
        )

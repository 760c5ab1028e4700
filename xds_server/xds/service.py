"""The ADS gRPC service (grpc.aio): one coroutine per stream, state of the world or delta.

A stream is identified by its first request's node, then woken whenever the node asks
or its region's snapshot changes, and sends what its protocol state (`SotwStream` or
`DeltaStream`) says is due. One event loop serves every stream; no thread per stream.
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
from xds_server.xds.snapshot import ListenAddress
from xds_server.xds.sotw import SotwStream
from xds_server.xds.status import NodeRegistry, NodeStatus
from xds_server.xds.stream import NodeError, StreamProtocol, identify

log = logging.getLogger("xds_server.ads")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


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

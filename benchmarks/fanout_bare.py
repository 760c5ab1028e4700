"""The floor for benchmarks/push_fanout.py: a bare grpc.aio ADS server.

It does only what no xDS server can skip: one coroutine per stream (as `AdsService`),
requests decoded, a cached, pre-serialized response per type written to every stream,
and ACKs counted. No node identity, no protocol state, no make-before-break, no
registry: at the start of a stream it writes all four types at once, and at each push
the next routes response, the same bytes object to every stream (one nonce a push).
Its bytes are the real server's own encodings of the same spec (`bare_responses`), so
both write exactly as much.

It runs in the benchmark's process, on its own event loop thread, like the in-process
server it is compared with (`push_fanout.py` reports the ratio of the two).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from xds_server.spec import MeshSpec
from xds_server.traffic import Split
from xds_server.xds.publisher import XdsPublisher, tune_gc_for_many_streams
from xds_server.xds.snapshot import Snapshot, delta_response, with_nonce
from xds_server.xds.stream import shared_names
from xds_server.xds.types import ENDPOINT, ROUTE, SEND_ORDER

T = TypeVar("T")
ADS = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_concurrent_streams", 100_000),
]
"""The gRPC server's options as `XdsPublisher.start` sets them: the same transport."""


def push_split(i: int) -> Split:
    """The weights of push `i` (every push changes svc-0's routes)."""
    return Split.from_percent({"canary": 5 * (i + 1) % 100 or 1})


def bare_responses(
    spec: MeshSpec, mode: str, eds_names: list[str], pushes: int
) -> tuple[list[bytes], list[tuple[str, bytes]]]:
    """The initial response of each type, and each push's routes (nonce, bytes): what the
    real server would send for the same spec and weights, encoded by its own code."""
    publisher = XdsPublisher(spec)  # (never started: only its snapshots are used)
    region = spec.regions[0]
    names = {ENDPOINT: shared_names(eds_names), ROUTE: shared_names(["ingress"])}

    def body(snap: Snapshot, type_url: str, nonce: str, only: str | None = None) -> bytes:
        if mode == "delta":
            items = snap.delta_items(type_url)
            chosen = [items[only].encoded] if only else [i.encoded for i in items.values()]
            return delta_response(type_url, snap.type_version(type_url), chosen, [], nonce)
        encoded = snap.encoded(type_url, names.get(type_url))
        return with_nonce(encoded.body, nonce)

    snap = publisher.snapshot(region)
    initial = [body(snap, t, "initial") for t in SEND_ORDER]
    routes = []
    for i in range(pushes):
        publisher.set_split("svc-0", push_split(i), urgent=True)
        nonce = f"push-{i}"
        routes.append((nonce, body(publisher.snapshot(region), ROUTE, nonce, "ingress")))
    return initial, routes


class BareAds:
    """The bare server: `start`, then `push(i)` and `acked(key)` from any thread."""

    def __init__(self, mode: str, initial: list[bytes], pushes: list[tuple[str, bytes]]) -> None:
        self.mode = mode
        self.initial = initial
        self.pushes = pushes
        self.routes: tuple[str, bytes] = ("initial", initial[SEND_ORDER.index(ROUTE)])
        self._wakes: set[asyncio.Event] = set()
        self._ids = itertools.count()
        self._acks: dict[str, dict[int, float]] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bare", daemon=True)
        self.thread.start()
        self._server: grpc.aio.Server | None = None

    def call(self, fn: Callable[[], T], timeout: float = 30) -> T:
        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def start(self) -> list[int]:
        async def start() -> list[int]:
            tune_gc_for_many_streams()  # (as the real server: a process-wide setting)
            server = grpc.aio.server(options=SERVER_OPTIONS)
            request = (
                discovery_pb2.DeltaDiscoveryRequest
                if self.mode == "delta"
                else discovery_pb2.DiscoveryRequest
            )
            method = grpc.stream_stream_rpc_method_handler(
                self._stream, request_deserializer=request.FromString, response_serializer=None
            )
            name = (
                "DeltaAggregatedResources" if self.mode == "delta" else "StreamAggregatedResources"
            )
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(ADS, {name: method}),)
            )
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            self._server = server
            return [port]

        return asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)

    def settle(self) -> None:
        """Collect what the fleet's connections left (see `InProcess.settle`)."""
        self.call(gc.collect)

    def connected(self) -> int:
        return self.call(lambda: len(self._wakes))

    def push(self, i: int) -> str:
        """Push `i`'s routes to every stream; the key its ACKs are counted under."""

        def push() -> str:
            self.routes = self.pushes[i]
            for wake in self._wakes:
                wake.set()
            return self.routes[0]

        return self.call(push)

    def acked(self, key: str) -> dict[int, float]:
        return dict(self._acks.get(key, {}))  # (a copy made under the GIL, in one go)

    def acked_count(self, key: str) -> int:
        return len(self._acks.get(key, ()))

    def cpu_seconds(self) -> float:
        return time.process_time()

    def rss_mb(self) -> float:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) / 1024 for x in f if x.startswith("VmRSS:"))

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                for wake in self._wakes:
                    wake.set()
                await self._server.stop(1.0)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _stream(self, requests: AsyncIterator[Any], context: Any) -> None:
        reader = aiter(requests)
        try:
            await anext(reader)
        except StopAsyncIteration:
            return
        stream = next(self._ids)
        wake = asyncio.Event()
        reading = asyncio.create_task(self._read(reader, stream))
        reading.add_done_callback(lambda _: wake.set())
        self._wakes.add(wake)
        try:
            sent = self.routes
            for body in self.initial[:-1]:
                await context.write(body)
            await context.write(sent[1])
            while True:
                await wake.wait()
                wake.clear()
                if reading.done():
                    break
                if self.routes is not sent:
                    sent = self.routes
                    await context.write(sent[1])
        finally:
            self._wakes.discard(wake)
            reading.cancel()

    async def _read(self, reader: AsyncIterator[Any], stream: int) -> None:
        async for req in reader:
            if (
                req.type_url == ROUTE
                and req.response_nonce == self.routes[0]
                and not req.HasField("error_detail")
            ):
                self._acks.setdefault(req.response_nonce, {}).setdefault(stream, time.time())

"""The client side of benchmarks/push_fanout.py: a fleet of ADS streams in worker processes.

The clients are grpc.aio streams spread over worker processes, one TCP connection each,
like a fleet of Envoys. (gRPC shares one connection between a process's channels to the
same address unless told not to: a whole client process would then be one HTTP/2
connection, which the kernel hands to one of `serve --workers`' processes.) Each syncs
clusters, endpoints, listener and routes (state of the world or delta), then ACKs every
response it gets, reconnecting with backoff and jitter when a stream fails. Client i
dials `ports[i % len(ports)]` (several replicas: the fleet spread over them).

Each client writes into one shared array when it ACKs routes (`time.time()`, one clock
for every process of the machine): a server in another process (`serve --workers`,
replicas) is timed from there, from the decision to the last client's ACK.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing as mp
import os
import random
import time
from collections.abc import Sequence
from typing import Any

from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

REGION = "us-east"
CLK_TCK = os.sysconf("SC_CLK_TCK")
POOLS = ("production", "baseline", "canary")


class _Client:
    """One fleet member: sync, then ACK everything; count what each response carries."""

    def __init__(
        self,
        port: int,
        index: int,
        mode: str,
        services: int,
        stamps: Any,
        retries: Any,
        shared: bool = False,
    ) -> None:
        self.port, self.index, self.mode = port, index, mode
        self.options = [] if shared else [("grpc.use_local_subchannel_pool", 1)]
        self.node_id = f"node-{index}"
        self.stamps = stamps
        self.retries = retries
        self.eds_names = [f"svc-{i}|{p}" for i in range(services) for p in POOLS]
        self.synced = asyncio.Event()
        self.last_route_resources = 0

    def initial_requests(self) -> list[Any]:
        from envoy.config.core.v3 import base_pb2
        from envoy.service.discovery.v3 import discovery_pb2

        node = base_pb2.Node(id=self.node_id, locality=base_pb2.Locality(region=REGION))
        names = {ENDPOINT: self.eds_names, ROUTE: ["ingress"]}
        if self.mode == "delta":
            reqs = [
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=t, resource_names_subscribe=names.get(t, [])
                )
                for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)
            ]
        else:
            reqs = [
                discovery_pb2.DiscoveryRequest(type_url=t, resource_names=names.get(t, []))
                for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)
            ]
        reqs[0].node.CopyFrom(node)
        return reqs

    def ack(self, resp: Any) -> Any:
        from envoy.service.discovery.v3 import discovery_pb2

        if resp.type_url == ROUTE:
            self.last_route_resources = len(resp.resources)
            self.stamps[self.index] = time.time()
        if self.mode == "delta":
            return discovery_pb2.DeltaDiscoveryRequest(
                type_url=resp.type_url, response_nonce=resp.nonce
            )
        names = {ENDPOINT: self.eds_names, ROUTE: ["ingress"]}.get(resp.type_url, [])
        return discovery_pb2.DiscoveryRequest(
            type_url=resp.type_url,
            version_info=resp.version_info,
            response_nonce=resp.nonce,
            resource_names=names,
        )

    async def run(self, stop: asyncio.Event, errors: list[str], reconnects: list[str]) -> None:
        import grpc
        from envoy.service.discovery.v3 import ads_pb2_grpc

        for attempt in range(20):  # reconnect like Envoy: backoff with jitter
            if attempt:
                reconnects.append(self.node_id)
                self.retries.value += 1
                await asyncio.sleep(min(2.0, 0.25 * 2 ** (attempt - 1)) * random.random())
            target = f"127.0.0.1:{self.port}"
            async with grpc.aio.insecure_channel(target, options=self.options) as channel:
                stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                queue: asyncio.Queue[Any] = asyncio.Queue()
                for req in self.initial_requests():
                    queue.put_nowait(req)

                async def requests(q: asyncio.Queue[Any] = queue) -> Any:
                    while (item := await q.get()) is not None:
                        yield item

                method = (
                    stub.DeltaAggregatedResources
                    if self.mode == "delta"
                    else stub.StreamAggregatedResources
                )
                call = method(requests())
                seen: set[str] = set()
                try:
                    async for resp in call:
                        queue.put_nowait(self.ack(resp))
                        seen.add(resp.type_url)
                        if len(seen) == 4:
                            self.synced.set()
                    return
                except grpc.aio.AioRpcError as exc:
                    if stop.is_set():
                        return
                    errors.append(f"{exc.code().name}: {(exc.details() or '')[:60]}")
                finally:
                    queue.put_nowait(None)
                    call.cancel()


def _worker(
    ports: Sequence[int],
    indexes: Sequence[int],
    mode: str,
    services: int,
    rate: float,
    shared: bool,
    stamps: Any,
    retries: Any,
    ready: Any,
    push: Any,
    done: Any,
    out: Any,
) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        errors: list[str] = []
        reconnects: list[str] = []
        clients = [
            _Client(ports[i % len(ports)], i, mode, services, stamps, retries, shared)
            for i in indexes
        ]
        tasks = []
        for i in range(0, len(clients), 100):  # open connections in batches, as a fleet ramps
            tasks += [
                asyncio.create_task(c.run(stop, errors, reconnects)) for c in clients[i : i + 100]
            ]
            await asyncio.sleep(100 / rate)
        deadline = time.monotonic() + 300
        while not all(c.synced.is_set() for c in clients):
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"worker: only {sum(c.synced.is_set() for c in clients)} of "
                    f"{len(indexes)} streams synced; errors: {errors[:5]}"
                )
            await asyncio.sleep(0.2)
        # The fleet's own collector, as the server's (`tune_gc_for_many_streams`): at
        # thousands of streams a collection of everything the sync left came in
        # whichever push was next, and the clients' CPU per push varied 2x.
        gc.freeze()
        gc.set_threshold(1_000_000, 50, 100)
        ready.put(len(indexes))
        loop = asyncio.get_running_loop()
        resources: list[int] = []
        while not await loop.run_in_executor(None, done.wait, 0.5):
            if push.is_set():  # after the pushes the parent asks what the clients received
                resources = [c.last_route_resources for c in clients]
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        out.put((errors, reconnects, max(resources, default=0)))

    asyncio.run(main())


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of these processes so far (their own, not their children's)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        except (OSError, ValueError, IndexError):
            continue
    return total / CLK_TCK


class Fleet:
    """`n` clients in `processes` worker processes (spawned: no state of the parent);
    `shared_connections`: each process's streams on one connection (as this benchmark
    ran before 2026-12-06; its older figures were measured so)."""

    def __init__(
        self,
        ports: Sequence[int],
        n: int,
        mode: str,
        services: int,
        processes: int,
        rate: float,
        shared_connections: bool = False,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.n = n
        self.stamps = ctx.RawArray("d", n)
        """Client i's latest ACK of routes (epoch seconds; 0: none yet)."""
        self._ready, self._out = ctx.Queue(), ctx.Queue()
        self._done, self._push = ctx.Event(), ctx.Event()
        self.retries = [ctx.RawValue("i", 0) for _ in range(processes)]
        """Each worker's reconnection attempts so far (a push during which some came
        was also serving full syncs)."""
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(
                    list(ports),
                    range(w, n, processes),
                    mode,
                    services,
                    rate / processes,
                    shared_connections,
                    self.stamps,
                    self.retries[w],
                    self._ready,
                    self._push,
                    self._done,
                    self._out,
                ),
            )
            for w in range(processes)
        ]

    def start(self, timeout: float = 600) -> None:
        """Start every client and wait until each has synced every type."""
        for p in self.procs:
            p.start()
        for _ in self.procs:
            self._ready.get(timeout=timeout)

    def cpu_seconds(self) -> float:
        """The client processes' CPU so far: what the fleet itself takes of the
        machine's cores during a push."""
        return cpu_seconds([p.pid for p in self.procs if p.pid is not None])

    def reconnections(self) -> int:
        return sum(r.value for r in self.retries)

    def acked_since(self, t: float) -> list[float]:
        """Each client's routes ACK at or after `t`, as seconds after `t` (those that
        have not ACKed since are left out)."""
        return [s - t for s in self.stamps[:] if s >= t]

    def finish(self) -> tuple[list[str], set[str], int]:
        """Stop the clients: failed stream attempts, reconnected nodes, and the most route
        resources a client got in its last routes response."""
        self._push.set()
        time.sleep(1.0)  # let the workers read their clients' counters (bounded, not a sync)
        self._done.set()
        outcomes = [self._out.get(timeout=300) for _ in self.procs]
        for p in self.procs:
            p.join(60)
        errors = [e for o in outcomes for e in o[0]]
        return errors, {x for o in outcomes for x in o[1]}, max(o[2] for o in outcomes)

    def kill(self) -> None:
        """After a failure: end every worker that is still running."""
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(5)

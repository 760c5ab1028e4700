"""Push fan-out: how long one weight change takes to be ACKed by N ADS streams.

The server runs in this process (one asyncio loop, as `xds-server serve` runs it). The
clients are grpc.aio streams spread over worker processes, one connection each, like a
fleet of Envoys: each syncs clusters, endpoints, listener and routes (state of the world
or delta), then ACKs every response it gets, reconnecting with backoff and jitter when a
stream fails. For each push we record, on the server, when each node's ACK of the new
routes arrives; the server process's CPU time from the push to the last ACK; its
resident memory; and how many resources the clients received for the change.

    python benchmarks/push_fanout.py [--clients 100 1000 5000] [--mode sotw delta]
                                     [--services 1] [--pushes 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import statistics
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry

from xds_server.lab.background import BackgroundServer
from xds_server.spec import validate_spec
from xds_server.traffic import Split
from xds_server.xds.metrics import XdsMetrics
from xds_server.xds.status import NodeStatus
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

REGION = "us-east"
POOLS = ("production", "baseline", "canary")


def spec_doc(services: int) -> dict[str, Any]:
    port = iter(range(10_000, 65_000))
    return {
        "regions": [REGION],
        "services": [
            {
                "name": f"svc-{i}",
                "domains": [f"svc-{i}.example"],
                "prefix": "/",
                "pools": {
                    pool: {
                        "version": "v2" if pool == "canary" else "v1",
                        "endpoints": {REGION: [f"127.0.0.1:{next(port)}"]},
                    }
                    for pool in POOLS
                },
            }
            for i in range(services)
        ],
    }


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---- the clients (worker processes) ----


class _Client:
    """One fleet member: sync, then ACK everything; count what each response carries."""

    def __init__(self, port: int, node_id: str, mode: str, services: int) -> None:
        self.port, self.node_id, self.mode = port, node_id, mode
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
                await asyncio.sleep(min(2.0, 0.25 * 2 ** (attempt - 1)) * random.random())
            async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
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
                    errors.append(exc.code().name)
                finally:
                    queue.put_nowait(None)
                    call.cancel()


def _worker(
    port: int,
    ids: list[str],
    mode: str,
    services: int,
    rate: float,
    ready: Any,
    push: Any,
    done: Any,
    out: Any,
) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        errors: list[str] = []
        reconnects: list[str] = []
        clients = [_Client(port, i, mode, services) for i in ids]
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
                    f"{len(ids)} streams synced; errors: {errors[:5]}"
                )
            await asyncio.sleep(0.2)
        ready.put(len(ids))
        loop = asyncio.get_running_loop()
        resources: list[int] = []
        while not await loop.run_in_executor(None, done.wait, 0.5):
            if push.is_set():  # after each push the parent asks what the clients received
                resources = [c.last_route_resources for c in clients]
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        out.put((errors, reconnects, max(resources, default=0)))

    asyncio.run(main())


# ---- the server side ----


def run_case(
    n: int, mode: str, services: int, pushes: int, workers: int, rate: float
) -> dict[str, Any]:
    t0 = time.perf_counter()
    spec = validate_spec(spec_doc(services), "benchmark")
    server = BackgroundServer(spec)
    build_s = time.perf_counter() - t0
    # As `xds-server serve` runs it: with its own metrics listening to every node event.
    server.call(lambda: XdsMetrics(CollectorRegistry()).attach(server.server))
    port = server.start()
    ack_times: dict[str, dict[int, float]] = {}
    lock = threading.Lock()

    def on_node(status: NodeStatus) -> None:
        v = status.types[ROUTE].acked_version
        if v:
            with lock:
                ack_times.setdefault(v, {}).setdefault(status.stream_id, time.time())

    server.call(lambda: server.server.nodes.subscribe(on_node))
    ctx = mp.get_context("spawn")
    ready, out, done, push = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    ids = [f"node-{i}" for i in range(n)]
    procs = [
        ctx.Process(
            target=_worker,
            args=(port, ids[w::workers], mode, services, rate / workers, ready, push, done, out),
        )
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    sum(ready.get(timeout=600) for _ in procs)
    connected = server.call(lambda: len(server.server.nodes.nodes(REGION)))
    results: list[dict[str, float]] = []
    for i in range(pushes):
        cpu0 = time.process_time()
        t_push = time.time()
        server.call(
            lambda i=i: server.server.set_split(  # type: ignore[misc]
                "svc-0", Split.from_percent({"canary": 5 * (i + 1)}), urgent=True
            )
        )
        version = server.call(lambda: server.server.snapshot(REGION).type_version(ROUTE))
        deadline = time.time() + 120
        while time.time() < deadline:
            with lock:
                if len(ack_times.get(version, {})) >= connected:
                    break
            time.sleep(0.005)  # poll period of the measurement, bounded by the deadline
        cpu = time.process_time() - cpu0
        with lock:
            lat = sorted(t - t_push for t in ack_times.get(version, {}).values())
        results.append(
            {
                "acked": len(lat),
                "p50_s": statistics.median(lat) if lat else float("nan"),
                "p99_s": lat[max(0, int(len(lat) * 0.99) - 1)] if lat else float("nan"),
                "max_s": lat[-1] if lat else float("nan"),
                "server_cpu_s": cpu,
            }
        )
    push.set()
    time.sleep(1.0)  # let the workers read their clients' counters (bounded, not a sync)
    rss = rss_mb()
    done.set()
    outcomes = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    server.close()
    return {
        "mode": mode,
        "clients": n,
        "services": services,
        "connected": connected,
        "build_s": build_s,
        "failed_stream_attempts": sum(len(e) for e, _, _ in outcomes),
        "nodes_reconnected": len({x for _, r, _ in outcomes for x in r}),
        "route_resources_per_push": max(m for _, _, m in outcomes),
        "pushes": results,
        "p50_s": statistics.median(r["p50_s"] for r in results),
        "p99_s": max(r["p99_s"] for r in results),
        "max_s": max(r["max_s"] for r in results),
        "server_cpu_s_per_push": statistics.mean(r["server_cpu_s"] for r in results),
        "server_rss_mb": rss,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 5000])
    p.add_argument("--mode", nargs="+", default=["sotw"], choices=["sotw", "delta"])
    p.add_argument("--services", type=int, default=1)
    p.add_argument("--pushes", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--connect-rate",
        type=float,
        default=1000,
        help="new connections per second while the fleet connects",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    rows = []
    for n in a.clients:
        for mode in a.mode:
            rows.append(run_case(n, mode, a.services, a.pushes, a.workers, a.connect_rate))
            if not a.json:
                _print_row(rows[-1], header=len(rows) == 1, a=a)
    if a.json:
        print(json.dumps(rows, indent=2))


def _print_row(r: dict[str, Any], header: bool, a: argparse.Namespace) -> None:
    if header:
        print(
            f"push fan-out on {os.cpu_count()} cores, {a.pushes} pushes per case, "
            f"{a.services} services, fleet connecting at {a.connect_rate:g}/s "
            "(latency: push -> server has the node's ACK)"
        )
        print(
            f"{'mode':>5} {'clients':>7} {'acked':>6} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'max ms':>7} {'cpu s/push':>10} {'rss MB':>7} {'res/push':>8} "
            f"{'reconnected':>11}"
        )
    acked = min(x["acked"] for x in r["pushes"])
    print(
        f"{r['mode']:>5} {r['clients']:>7} {acked:>6} {r['p50_s'] * 1000:>7.1f} "
        f"{r['p99_s'] * 1000:>7.1f} {r['max_s'] * 1000:>7.1f} "
        f"{r['server_cpu_s_per_push']:>10.3f} {r['server_rss_mb']:>7.0f} "
        f"{r['route_resources_per_push']:>8} {r['nodes_reconnected']:>11}",
        flush=True,
    )


if __name__ == "__main__":
    main()

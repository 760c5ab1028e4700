"""Push fan-out: how long one weight change takes to be ACKed by N ADS streams.

The server runs in this process (one asyncio loop, as `xds-server serve` runs it). The
clients are grpc.aio streams spread over worker processes, one connection each, like a
fleet of Envoys: each syncs clusters, endpoints, listener and routes, then ACKs every
response it gets. For each push we record, on the server, when each node's ACK of the
new routes arrives, and the server process's CPU time from the push until the last ACK.

    python benchmarks/push_fanout.py [--clients 100 1000 5000] [--pushes 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import threading
import time
from typing import Any

from xds_server.config import validate_spec
from xds_server.lab.background import BackgroundServer
from xds_server.traffic import Split
from xds_server.xds.status import NodeStatus
from xds_server.xds.types import ROUTE

REGION = "us-east"


def spec_doc() -> dict[str, Any]:
    return {
        "regions": [REGION],
        "services": [
            {
                "name": "recommender",
                "domains": ["*"],
                "prefix": "/",
                "pools": {
                    "production": {"version": "v1", "endpoints": {REGION: ["127.0.0.1:9101"]}},
                    "baseline": {"version": "v1", "endpoints": {REGION: ["127.0.0.1:9102"]}},
                    "canary": {"version": "v2", "endpoints": {REGION: ["127.0.0.1:9103"]}},
                },
            }
        ],
    }


# ---- the clients (worker processes) ----


async def _client(
    port: int,
    node_id: str,
    synced: asyncio.Event,
    stop: asyncio.Event,
    errors: list[str],
    reconnects: list[str],
) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER

    node = base_pb2.Node(id=node_id, locality=base_pb2.Locality(region=REGION))
    names = {
        ENDPOINT: ["recommender|production", "recommender|baseline", "recommender|canary"],
        ROUTE: ["ingress"],
    }

    def requests_for_sync() -> list[Any]:
        reqs = [
            discovery_pb2.DiscoveryRequest(type_url=t, resource_names=names.get(t, []))
            for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)
        ]
        reqs[0].node.CopyFrom(node)
        return reqs

    for attempt in range(20):  # reconnect like Envoy: backoff with jitter
        if attempt:
            reconnects.append(node_id)
            await asyncio.sleep(min(2.0, 0.25 * 2 ** (attempt - 1)) * random.random())
        first = requests_for_sync()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            queue: asyncio.Queue[Any] = asyncio.Queue()
            for req in first:
                queue.put_nowait(req)

            async def requests(q: asyncio.Queue[Any] = queue) -> Any:
                while (item := await q.get()) is not None:
                    yield item

            call = stub.StreamAggregatedResources(requests())
            seen: set[str] = set()
            try:
                async for resp in call:
                    queue.put_nowait(
                        discovery_pb2.DiscoveryRequest(
                            type_url=resp.type_url,
                            version_info=resp.version_info,
                            response_nonce=resp.nonce,
                            resource_names=names.get(resp.type_url, []),
                        )
                    )
                    seen.add(resp.type_url)
                    if len(seen) == 4:
                        synced.set()
                return
            except grpc.aio.AioRpcError as exc:
                if stop.is_set():
                    return
                errors.append(exc.code().name)
            finally:
                queue.put_nowait(None)
                call.cancel()


def _worker(port: int, ids: list[str], rate: float, ready: Any, done: Any, out: Any) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        errors: list[str] = []
        reconnects: list[str] = []
        synced = [asyncio.Event() for _ in ids]
        tasks = []
        for i in range(0, len(ids), 100):  # open connections in batches, as a fleet ramps
            for j in range(i, min(i + 100, len(ids))):
                tasks.append(
                    asyncio.create_task(_client(port, ids[j], synced[j], stop, errors, reconnects))
                )
            await asyncio.sleep(100 / rate)
        deadline = time.monotonic() + 120
        while not all(e.is_set() for e in synced):
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"worker: only {sum(e.is_set() for e in synced)} of "
                    f"{len(ids)} streams synced; errors: {errors[:5]}"
                )
            await asyncio.sleep(1)
        ready.put(len(ids))
        await asyncio.get_running_loop().run_in_executor(None, done.wait)
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        out.put((errors, reconnects))

    asyncio.run(main())


# ---- the server side ----


def run_case(n: int, pushes: int, workers: int, rate: float) -> dict[str, Any]:
    server = BackgroundServer(validate_spec(spec_doc(), "benchmark"))
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
    ready, out, done = ctx.Queue(), ctx.Queue(), ctx.Event()
    ids = [f"node-{i}" for i in range(n)]
    procs = [
        ctx.Process(target=_worker, args=(port, ids[w::workers], rate / workers, ready, done, out))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    synced = sum(ready.get(timeout=300) for _ in procs)
    connected = server.call(lambda: len(server.server.nodes.nodes(REGION)))
    results: list[dict[str, float]] = []
    for i in range(pushes):
        cpu0 = time.process_time()
        t0 = time.time()
        server.call(
            lambda i=i: server.server.set_split(  # type: ignore[misc]
                "recommender", Split.from_percent({"canary": 5 * (i + 1)}), urgent=True
            )
        )
        version = server.call(lambda: server.server.snapshot(REGION).type_version(ROUTE))
        deadline = time.time() + 60
        while time.time() < deadline:
            with lock:
                if len(ack_times.get(version, {})) >= connected:
                    break
            time.sleep(0.005)
        cpu = time.process_time() - cpu0
        with lock:
            lat = sorted(t - t0 for t in ack_times.get(version, {}).values())
        results.append(
            {
                "acked": len(lat),
                "p50_s": statistics.median(lat) if lat else float("nan"),
                "p99_s": lat[max(0, int(len(lat) * 0.99) - 1)] if lat else float("nan"),
                "max_s": lat[-1] if lat else float("nan"),
                "server_cpu_s": cpu,
            }
        )
    done.set()
    outcomes = [out.get(timeout=120) for _ in procs]
    errors = [e for errs, _ in outcomes for e in errs]
    reconnected = {n for _, recs in outcomes for n in recs}
    for p in procs:
        p.join(30)
    server.close()
    return {
        "clients": n,
        "synced": synced,
        "connected": connected,
        "failed_stream_attempts": len(errors),
        "nodes_reconnected": len(reconnected),
        "pushes": results,
        "p50_s": statistics.median(r["p50_s"] for r in results),
        "p99_s": max(r["p99_s"] for r in results),
        "max_s": max(r["max_s"] for r in results),
        "server_cpu_s_per_push": statistics.mean(r["server_cpu_s"] for r in results),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 5000])
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
    rows = [run_case(n, a.pushes, a.workers, a.connect_rate) for n in a.clients]
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"push fan-out on {os.cpu_count()} cores, {a.pushes} pushes per case, fleet "
        f"connecting at {a.connect_rate:g}/s (latency: push -> server has the node's ACK)"
    )
    print(
        f"{'clients':>8} {'acked':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'cpu s/push':>10} {'reconnected':>11}"
    )
    for r in rows:
        acked = min(x["acked"] for x in r["pushes"])
        print(
            f"{r['clients']:>8} {acked:>7} {r['p50_s'] * 1000:>8.1f} {r['p99_s'] * 1000:>8.1f} "
            f"{r['max_s'] * 1000:>8.1f} {r['server_cpu_s_per_push']:>10.3f} "
            f"{r['nodes_reconnected']:>11}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""`serve --workers N` against one process: one weight change to N ADS streams.

`xds-server serve` runs as an operator starts it (SQLite state, one region, one
service), with `--workers 1` and `--workers 2` in turn. The clients are grpc.aio ADS
streams in client processes, each on its own TCP connection (by default grpc shares
one connection between a process's channels, which would put a whole client process on
one worker), syncing clusters, endpoints, listener and routes and ACKing everything. A
push is an operator's decision: `SetWeights` on the admin API (the decision, its commit,
the push). For each push: the time from the call to each client sending its ACK of the
new routes (same clock: one machine), and the CPU seconds every server process (the
supervisor and its workers) used from the call to the last ACK, from /proc. It also
reports how the kernel spread the streams over the workers (`ListReplicas`).

    python benchmarks/workers_fanout.py [--clients 10000] [--workers 1 2] [--pushes 3]
                                        [--client-procs 4] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import yaml

from xds_server.admin.v1 import admin_pb2, admin_pb2_grpc
from xds_server.admin.wire import ACTOR_KEY
from xds_server.lab.polling import wait_for
from xds_server.lab.procs import Process, free_port
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

REGION = "us-east"
SERVICE = "svc-0"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def spec_doc() -> dict[str, Any]:
    pools = {
        pool: {"version": version, "endpoints": {REGION: [f"127.0.0.1:{port}"]}}
        for pool, version, port in (("production", "v1", 9201), ("canary", "v2", 9203))
    }
    return {
        "regions": [REGION],
        "listener": {"port": 10000},
        "rollout": {"step_duration": "1h", "max_hold": "1h", "ack_timeout": "10m"},
        "services": [{"name": SERVICE, "domains": ["*"], "prefix": "/", "pools": pools}],
    }


# ---- the clients (processes of their own) ----


async def _client(port: int, node_id: str, acks: list[float], synced: Any) -> None:
    """One stream on its own connection: sync, then ACK everything; each routes ACK's
    send time is appended to `acks`."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    names = {ENDPOINT: [f"{SERVICE}|production", f"{SERVICE}|canary"], ROUTE: ["ingress"]}
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
            req = discovery_pb2.DiscoveryRequest(type_url=t, resource_names=names.get(t, []))
            if t == CLUSTER:
                req.node.CopyFrom(
                    base_pb2.Node(id=node_id, locality=base_pb2.Locality(region=REGION))
                )
            queue.put_nowait(req)

        async def requests() -> Any:
            while True:
                yield await queue.get()

        seen: set[str] = set()
        async for resp in stub.StreamAggregatedResources(requests()):
            queue.put_nowait(
                discovery_pb2.DiscoveryRequest(
                    type_url=resp.type_url,
                    version_info=resp.version_info,
                    response_nonce=resp.nonce,
                    resource_names=names.get(resp.type_url, []),
                )
            )
            if resp.type_url == ROUTE:
                acks.append(time.time())
            if len(seen) < 4:
                seen.add(resp.type_url)
                if len(seen) == 4:
                    with synced.get_lock():
                        synced.value += 1


def _clients(port: int, ids: list[str], rate: float, synced: Any, asks: Any, answers: Any) -> None:
    async def main() -> None:
        acks: dict[str, list[float]] = {i: [] for i in ids}
        tasks = []
        for n in range(0, len(ids), 100):  # connect as a fleet ramps up
            tasks += [
                asyncio.create_task(_client(port, i, acks[i], synced)) for i in ids[n : n + 100]
            ]
            await asyncio.sleep(100 / rate)
        loop = asyncio.get_running_loop()
        while True:
            since = await loop.run_in_executor(None, asks.get)
            if since is None:
                break
            # Each client's first routes ACK sent after `since`, or None.
            answers.put([next((t for t in acks[i] if t >= since), None) for i in ids])
        for t in tasks:
            t.cancel()

    asyncio.run(main())


# ---- the server ----


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except OSError:
            pass
    return total


def server_pids(root: int) -> list[int]:
    kids = Path(f"/proc/{root}/task/{root}/children").read_text().split()
    return [root, *map(int, kids)]


def run_case(workers: int, clients: int, pushes: int, procs: int, rate: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="workers-fanout-"))
    spec = work / "mesh.yaml"
    spec.write_text(yaml.safe_dump(spec_doc(), sort_keys=False))
    xds, admin_port = free_port(), free_port()
    argv = [sys.executable, "-m", "xds_server.cli", "serve", "--spec", str(spec),
            "--state-dir", str(work / "state"), "--xds-address", f"127.0.0.1:{xds}",
            "--admin-address", f"127.0.0.1:{admin_port}", "--metrics-address", "127.0.0.1:0",
            "--ui-address", "", "--prometheus-url", f"http://127.0.0.1:{free_port()}",
            "--log-level", "warning", "--workers", str(workers)]  # fmt: skip
    server = Process("serve", argv, work / "serve.log")
    admin = admin_pb2_grpc.AdminStub(grpc.insecure_channel(f"127.0.0.1:{admin_port}"))

    def listed() -> list[admin_pb2.Replica] | None:
        try:
            got = admin.ListReplicas(admin_pb2.ListReplicasRequest(), timeout=2).replicas
        except grpc.RpcError:
            return None
        return list(got) if len(got) == workers else None

    try:
        wait_for(listed, "the server's workers", timeout=120, interval=0.2)
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # (the clients' processes)
        ctx = mp.get_context("spawn")
        synced = ctx.Value("i", 0)
        ids = [f"node-{i}" for i in range(clients)]
        queues = [(ctx.Queue(), ctx.Queue()) for _ in range(procs)]
        fleet = [
            ctx.Process(
                target=_clients, args=(xds, ids[p::procs], rate / procs, synced, *queues[p])
            )
            for p in range(procs)
        ]
        for p in fleet:
            p.start()
        wait_for(
            lambda: synced.value >= clients,
            f"every stream synced ({clients})",
            timeout=900,
            interval=0.5,
        )
        spread = {r.id: r.nodes for r in listed() or []} if workers > 1 else {"serve": clients}
        rows = []
        for i in range(pushes):
            pids = server_pids(server.pid)
            each0 = [cpu_seconds([pid]) for pid in pids]
            t0 = time.time()
            request = admin_pb2.SetWeightsRequest(
                service=SERVICE, canary_percent=10 + 10 * i, reason="benchmark"
            )
            admin.SetWeights(request, timeout=30, metadata=((ACTOR_KEY, "benchmark"),))
            lat = _wait_acks(queues, t0, clients)
            each = [round(cpu_seconds([pid]) - c, 3) for pid, c in zip(pids, each0, strict=True)]
            cpu = sum(each)
            rows.append(
                {
                    "acked": len(lat),
                    "p50_s": statistics.median(lat),
                    "p99_s": lat[max(0, int(len(lat) * 0.99) - 1)],
                    "max_s": lat[-1],
                    "server_cpu_s": cpu,
                    "cpu_s_by_process": each,
                }
            )
        for asks, _ in queues:
            asks.put(None)
        for p in fleet:
            p.join(60)
    finally:
        server.stop(30)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "workers": workers,
        "clients": clients,
        "streams_per_worker": spread,
        "pushes": rows,
        "p50_s": statistics.median(r["p50_s"] for r in rows),
        "p99_s": max(r["p99_s"] for r in rows),
        "max_s": max(r["max_s"] for r in rows),
        "server_cpu_s_per_push": statistics.mean(r["server_cpu_s"] for r in rows),
        "cpu_s_by_process": [r["cpu_s_by_process"] for r in rows],
    }


def _wait_acks(queues: list[tuple[Any, Any]], since: float, clients: int) -> list[float]:
    """Every client's first routes ACK after `since`, as latencies, sorted (asked again
    every 50 ms until each client has one, or 120 s)."""
    deadline = time.monotonic() + 120
    while True:
        for asks, _ in queues:
            asks.put(since)
        got = [t for _, answers in queues for t in answers.get(timeout=60)]
        done = [t - since for t in got if t is not None]
        if len(done) == clients or time.monotonic() > deadline:
            return sorted(done)
        time.sleep(0.05)  # the poll period of the measurement, bounded by its deadline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pushes", type=int, default=3)
    p.add_argument("--client-procs", type=int, default=4)
    p.add_argument("--connect-rate", type=float, default=1000, help="connections per second")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    rows = [run_case(w, a.clients, a.pushes, a.client_procs, a.connect_rate) for w in a.workers]
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"serve --workers on {os.cpu_count()} cores, {a.clients} streams, {a.pushes} pushes")
    print(f"{'workers':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'cpu s/push':>10}  streams")
    for r in rows:
        print(
            f"{r['workers']:>7} {r['p50_s'] * 1000:>7.1f} {r['p99_s'] * 1000:>7.1f} "
            f"{r['max_s'] * 1000:>7.1f} {r['server_cpu_s_per_push']:>10.3f}  "
            f"{r['streams_per_worker']}"
        )
        print(f"{'':>7} cpu s by process (supervisor first) per push: {r['cpu_s_by_process']}")


if __name__ == "__main__":
    main()

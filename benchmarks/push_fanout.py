"""Push fan-out: N ADS streams ACK one weight change; the time and the server's CPU.

Each is set against the floor: a bare grpc.aio server that only writes cached bytes
(`fanout_bare.py`).

The clients are grpc.aio ADS streams in worker processes (`fanout_fleet.py`), one TCP
connection each, like a fleet of Envoys (`--shared-connections`: one per client process,
as this benchmark measured before 2026-12-06). The server is, by default, `XdsPublisher` in
this process (one asyncio loop, as `xds-server serve` runs it); `--serve-workers N`
runs `xds-server serve --workers N` instead, and `--replicas R` runs R replicas on a
real three-member etcd with the clients spread over them (`fanout_servers.py`). Each
case then runs again against the bare server, in this process, with the same fleet and
the same bytes, and the row reports both and their ratio.

For each push: the time from the push (in process: `set_split`; as processes: the
operator's `SetWeights`, the decision) to each node's ACK of the new routes: in process,
when the server has the ACK; as processes, when the client sends it. The server's CPU
time from the push to the last ACK (as processes: every server process's, from /proc);
its resident memory; how many resources the clients received for the change; the
clients' own CPU (on a machine of few cores they share them with the server, so a
push's latency is bounded by both). Server processes are let go quiet before each push
(`ServeProcesses.settle`): a rollout's decisions come a step apart, not back to back
into the previous one's directory rewrites.

    python benchmarks/push_fanout.py [--clients 100 1000 5000] [--mode sotw delta]
                                     [--services 1] [--pushes 3] [--serve-workers N]
                                     [--replicas R] [--no-bare] [--shared-connections]
                                     [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from fanout_bare import BareAds, bare_responses
from fanout_fleet import POOLS, REGION, Fleet
from fanout_servers import InProcess, ServeProcesses

from xds_server.spec import validate_spec


def spec_doc(services: int, rollouts: int | None = None) -> dict[str, Any]:
    """`services` services of three pools each; the first `rollouts` (None: all) have a
    canary of a new version (a rollout, for a server that runs the controller), the
    others' canary has production's version (no rollout: the same resources)."""
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
                        "version": "v2"
                        if pool == "canary" and (rollouts is None or i < rollouts)
                        else "v1",
                        "endpoints": {REGION: [f"127.0.0.1:{next(port)}"]},
                    }
                    for pool in POOLS
                },
            }
            for i in range(services)
        ],
    }


Server = InProcess | ServeProcesses | BareAds


def measure(
    server: Server,
    n: int,
    mode: str,
    services: int,
    pushes: int,
    processes: int,
    rate: float,
    extra_cpu: Callable[[], float] = lambda: 0.0,
    settle: bool = True,
    shared: bool = False,
    idle_s: float = 0.0,
) -> dict[str, Any]:
    """One server, one fleet: connect `n` clients, `idle_s` seconds of the server's CPU
    with every client synced and nothing pushed, then `pushes` pushes, each timed to the
    last client's ACK; the fleet stopped, the server left running."""
    ports = server.start()
    fleet = Fleet(ports, n, mode, services, processes, rate, shared)
    try:
        fleet.start()
        connected = server.connected()
        if connected < 0:  # (servers in other processes: every client has synced)
            connected = n
        if settle:
            server.settle()
        idle = _idle_cpu(server, extra_cpu, idle_s)
        results = []
        for i in range(pushes):
            if i and isinstance(server, ServeProcesses):
                server.settle()  # (decisions come a step apart: each from quiet servers)
            results.append(_one_push(server, fleet, i, connected, extra_cpu))
        rss = server.rss_mb()
        errors, reconnected, resources = fleet.finish()
    except BaseException:
        fleet.kill()
        raise
    return {
        "connected": connected,
        "failed_stream_attempts": len(errors),
        "stream_errors": dict(Counter(errors)),
        "nodes_reconnected": len(reconnected),
        "route_resources_per_push": resources,
        "pushes": results,
        "p50_s": statistics.median(r["p50_s"] for r in results),
        "p99_s": max(r["p99_s"] for r in results),
        "max_s": max(r["max_s"] for r in results),
        "server_cpu_s_per_push": statistics.mean(r["server_cpu_s"] for r in results),
        "fleet_cpu_s_per_push": statistics.mean(r["fleet_cpu_s"] for r in results),
        "server_rss_mb": rss,
        **idle,
        **(
            {"etcd_cpu_s_per_push": statistics.mean(r["etcd_cpu_s"] for r in results)}
            if isinstance(server, ServeProcesses) and server.etcd is not None
            else {}
        ),
    }


def _idle_cpu(server: Server, extra_cpu: Callable[[], float], seconds: float) -> dict[str, float]:
    """The server's (and etcd's) CPU per second while nothing is pushed: heartbeats,
    the store's watch, timers; what every push then shares the cores with."""
    if seconds <= 0:
        return {}
    cpu0, etcd0 = server.cpu_seconds(), extra_cpu()
    time.sleep(seconds)  # the idle window measured
    return {
        "idle_cpu_s_per_s": (server.cpu_seconds() - cpu0) / seconds,
        "idle_etcd_cpu_s_per_s": (extra_cpu() - etcd0) / seconds,
    }


def _one_push(
    server: Server, fleet: Fleet, i: int, connected: int, extra_cpu: Callable[[], float]
) -> dict[str, float]:
    cpu0, etcd0, retries0 = server.cpu_seconds(), extra_cpu(), fleet.reconnections()
    fleet0 = fleet.cpu_seconds()
    t_push = time.time()
    key = server.push(i)

    def latencies() -> list[float]:
        acked = server.acked(key)
        if acked is None:  # (timed by the clients' own stamps)
            return fleet.acked_since(t_push)
        return [t - t_push for t in acked.values()]

    def count() -> int:  # (cheap: it is polled while the server works, in this process)
        n = server.acked_count(key)
        return len(fleet.acked_since(t_push)) if n is None else n

    deadline = time.time() + 120
    while count() < connected and time.time() < deadline:
        time.sleep(0.005)  # poll period of the measurement, bounded by the deadline
    cpu, etcd = server.cpu_seconds() - cpu0, extra_cpu() - etcd0
    fleet_cpu = fleet.cpu_seconds() - fleet0
    lat = sorted(latencies())
    return {
        "acked": len(lat),
        "p50_s": statistics.median(lat) if lat else float("nan"),
        "p99_s": lat[max(0, int(len(lat) * 0.99) - 1)] if lat else float("nan"),
        "max_s": lat[-1] if lat else float("nan"),
        "server_cpu_s": cpu,
        "etcd_cpu_s": etcd,
        "fleet_cpu_s": fleet_cpu,
        "reconnections": fleet.reconnections() - retries0,
    }


def run_case(
    n: int,
    mode: str,
    services: int,
    pushes: int,
    processes: int,
    rate: float,
    serve_workers: int = 0,
    replicas: int = 0,
    bare: bool = True,
    settle: bool = True,
    shared: bool = False,
    idle_s: float = 0.0,
) -> dict[str, Any]:
    """The server (in process, or `serve` processes), then the bare server, each with a
    fleet of `n` clients of its own: one row with both."""
    server: InProcess | ServeProcesses
    if serve_workers or replicas:
        doc = spec_doc(services, rollouts=1)  # (the controller runs: one rollout)
        server = ServeProcesses(doc, max(1, serve_workers), replicas)
    else:
        doc = spec_doc(services)
        server = InProcess(validate_spec(doc, "benchmark"))
    try:
        extra = server.etcd_cpu_seconds if isinstance(server, ServeProcesses) else lambda: 0.0
        row = measure(
            server, n, mode, services, pushes, processes, rate, extra, settle, shared, idle_s
        )
    finally:
        server.close()
    row = {
        "mode": mode,
        "clients": n,
        "services": services,
        "server": server.where,
        "serve_workers": serve_workers,
        "replicas": replicas,
        "build_s": server.build_s,
        "measured_at": (
            "the node sends its ACK"
            if isinstance(server, ServeProcesses)
            else "the server has the node's ACK"
        ),
        **row,
    }
    if bare:
        spec = validate_spec(doc, "benchmark")
        eds = [f"svc-{i}|{p}" for i in range(services) for p in POOLS]
        floor = BareAds(mode, *bare_responses(spec, mode, eds, pushes))
        try:
            got = measure(
                floor, n, mode, services, pushes, processes, rate, settle=settle, shared=shared
            )
        finally:
            floor.close()
        row["bare_p50_s"] = got["p50_s"]
        row["bare_p99_s"] = got["p99_s"]
        row["bare_max_s"] = got["max_s"]
        row["bare_cpu_s_per_push"] = got["server_cpu_s_per_push"]
        row["bare_pushes"] = got["pushes"]
        row["bare_nodes_reconnected"] = got["nodes_reconnected"]
        row["bare_stream_errors"] = got["stream_errors"]
        row["cpu_ratio"] = row["server_cpu_s_per_push"] / got["server_cpu_s_per_push"]
        row["p99_ratio"] = row["p99_s"] / got["p99_s"]
    return row


def main() -> None:
    # `timeout` (or a CI's cancel) sends SIGTERM, which by default ends Python without its
    # `finally`s: the `serve` processes and etcd members this run started were left
    # running, taking CPU from every later run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 5000])
    p.add_argument("--mode", nargs="+", default=["sotw"], choices=["sotw", "delta"])
    p.add_argument("--services", type=int, default=1)
    p.add_argument("--pushes", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="the clients' worker processes")
    p.add_argument(
        "--serve-workers",
        type=int,
        default=0,
        metavar="N",
        help="run the server as `xds-server serve --workers N` (default: in this process)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=0,
        metavar="R",
        help="R replicas on a three-member etcd, the clients spread over them",
    )
    p.add_argument(
        "--no-bare", action="store_true", help="skip the bare grpc.aio baseline (no ratio)"
    )
    p.add_argument(
        "--no-settle",
        action="store_true",
        help="do not collect what the connections left before the pushes (in process): "
        "the first push then pays the collector's pass, as before this flag",
    )
    p.add_argument(
        "--shared-connections",
        action="store_true",
        help="each client process's streams on one connection (gRPC's default, and this "
        "benchmark's before 2026-12-06): not a fleet, and one worker gets a whole process",
    )
    p.add_argument(
        "--connect-rate",
        type=float,
        default=1000,
        help="new connections per second while the fleet connects",
    )
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=0.0,
        metavar="S",
        help="before the pushes, measure the server's CPU over S quiet seconds",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    rows = []
    for n in a.clients:
        for mode in a.mode:
            rows.append(
                run_case(
                    n,
                    mode,
                    a.services,
                    a.pushes,
                    a.workers,
                    a.connect_rate,
                    a.serve_workers,
                    a.replicas,
                    not a.no_bare,
                    not a.no_settle,
                    a.shared_connections,
                    a.idle_seconds,
                )
            )
            if not a.json:
                _print_row(rows[-1], header=len(rows) == 1, a=a)
    if a.json:
        print(json.dumps(rows, indent=2))


def _print_row(r: dict[str, Any], header: bool, a: argparse.Namespace) -> None:
    if header:
        print(
            f"push fan-out on {os.cpu_count()} cores, {a.pushes} pushes per case, "
            f"{a.services} services, fleet connecting at {a.connect_rate:g}/s; "
            f"server: {r['server']} (latency: push -> {r['measured_at']}); "
            "bare: the bare grpc.aio server in this process, same fleet and bytes"
        )
        print(
            f"{'mode':>5} {'clients':>7} {'acked':>6} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'max ms':>7} {'cpu s/push':>10} {'rss MB':>7} {'res/push':>8} "
            f"{'reconnected':>11} | {'bare p99':>8} {'bare cpu':>8} {'cpu x':>6} {'p99 x':>6}"
        )
    acked = min(x["acked"] for x in r["pushes"])
    line = (
        f"{r['mode']:>5} {r['clients']:>7} {acked:>6} {r['p50_s'] * 1000:>7.1f} "
        f"{r['p99_s'] * 1000:>7.1f} {r['max_s'] * 1000:>7.1f} "
        f"{r['server_cpu_s_per_push']:>10.3f} {r['server_rss_mb']:>7.0f} "
        f"{r['route_resources_per_push']:>8} {r['nodes_reconnected']:>11}"
    )
    if "bare_p99_s" in r:
        line += (
            f" | {r['bare_p99_s'] * 1000:>8.1f} {r['bare_cpu_s_per_push']:>8.3f} "
            f"{r['cpu_ratio']:>6.2f} {r['p99_ratio']:>6.2f}"
        )
    line += f"  (clients' cpu s/push {r['fleet_cpu_s_per_push']:.3f}"
    if "etcd_cpu_s_per_push" in r:
        line += f", etcd's {r['etcd_cpu_s_per_push']:.3f}"
    if "idle_cpu_s_per_s" in r:
        line += f"; idle: server {r['idle_cpu_s_per_s']:.3f} cpu s/s"
        line += f", etcd {r['idle_etcd_cpu_s_per_s']:.3f}" if "etcd_cpu_s_per_push" in r else ""
    line += ")"
    print(line, flush=True)


if __name__ == "__main__":
    main()

"""Proxyless convergence: N real gRPC xDS clients; K weight changes; the time from
`set_split` on the server to every client having ACKed the new routes (the rollout's
ACK gate), and to each client's first call landing on the new split.

Everything real, on 127.0.0.1: the xDS server (`BackgroundServer`), a lab model server
per (region, pool) answering the Open Inference Protocol over gRPC (threads of this
process), and N proxyless clients, one process each (`python -m xds_server.lab.proxyless`
dialing `xds:///recommender`; gRPC's xDS client is one per process), each with the
bootstrap `xds-server bootstrap --proxyless` prints for its own node id, spread over
the regions.

Each change flips the canary between 0% and `--canary` (default 100%) in every region,
urgently (as a step or a rollback is pushed). Measured per change, on the server's
clock (`time.time()` in this process):

- server: how long `set_split` (rebuild + publish of every region) holds the server's
  loop thread;
- sent: until the last client was sent the new routes (`TypeStatus.sent_at`);
- ACK gate: until the last client ACKed them (`TypeStatus.acked_at`; a 1 ms poll of
  `routes_applied` sees the gate open, and that poll's view is shown too);
- first call: until each client's first call reached the pool that gained its weight
  from 0 (the model servers record, per client, the first call after the change: every
  client sends `x-tenant: <its node id>`). A pool left out of the routes at 0% must be
  fetched (CDS, EDS) and dialled before a call lands on it; the figure also includes
  the wait for the client's next call (up to 1/--rate s). With `--canary` below 100
  only the flips up are measured (production never leaves the routes).

Between changes the fleet settles (every client SYNCED on every type, no retained
cluster, every client's calls on the new pool); no change overlaps another.

    python benchmarks/proxyless_convergence.py [--clients 20] [--changes 10] [--regions 1]
        [--rate 10] [--canary 100] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xds_server.lab.background import BackgroundServer
from xds_server.lab.procs import Process
from xds_server.lab.upstream import ModelServer
from xds_server.spec import validate_spec
from xds_server.traffic import Split
from xds_server.xds.dataplane import Applied, Rejected
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

SERVICE = "recommender"
REGIONS = ("us-east", "eu-west", "ap-south", "us-west", "eu-north")
VERSIONS = {"production": "v1", "canary": "v2"}
MAX_CLIENTS = 100
POLL_S = 0.001
"""The ACK gate's poll period (the acked_at figures do not depend on it)."""
CHANGE_TIMEOUT_S = 30.0
"""Per change: the most time for the gate, for the first calls, and for settling."""


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def spread(values: list[float]) -> dict[str, float]:
    """p50/p90/max in ms of values in seconds ({} for none)."""
    if not values:
        return {}
    return {
        "p50_ms": percentile(values, 50) * 1000,
        "p90_ms": percentile(values, 90) * 1000,
        "max_ms": max(values) * 1000,
        "n": len(values),
    }


class Arrivals:
    """The first call of each client (its `x-tenant`) at each pool since `arm`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._first: dict[str, dict[str, float]] = {pool: {} for pool in VERSIONS}

    def arm(self, pool: str) -> None:
        with self._lock:
            self._first[pool] = {}

    def seen(self, pool: str, client: str) -> None:
        now = time.time()
        with self._lock:
            self._first[pool].setdefault(client, now)

    def first(self, pool: str) -> dict[str, float]:
        with self._lock:
            return dict(self._first[pool])


class RecordingModelServer(ModelServer):
    """A lab model server that also tells `arrivals` who called (at the call's arrival:
    `tenant` is the first thing a gRPC inference asks)."""

    def __init__(self, region: str, pool: str, arrivals: Arrivals) -> None:
        super().__init__(("127.0.0.1", 0), region, pool, VERSIONS[pool], model=SERVICE, grpc_port=0)
        self.arrivals = arrivals

    def tenant(self, header: str | None) -> str:
        if header:
            self.arrivals.seen(self.pool, header)
        return super().tenant(header)


@dataclass
class Client:
    node_id: str
    region: str
    proc: Process
    counts_path: Path

    def counts(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.counts_path.read_text()))
        except (OSError, ValueError):
            return {}


def start_client(
    workdir: Path, region: str, node_id: str, xds_port: int, rate: float, seconds: float
) -> Client:
    """A proxyless client process with the real CLI's bootstrap for its node."""
    made = subprocess.run(
        [sys.executable, "-m", "xds_server.cli", "bootstrap", "--proxyless",
         "--region", region, "--node-id", node_id, "--xds-address", f"127.0.0.1:{xds_port}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if made.returncode != 0:
        raise RuntimeError(f"bootstrap --proxyless for {node_id}: {made.stderr.strip()}")
    boot = workdir / f"{node_id}-bootstrap.json"
    boot.write_text(made.stdout)
    counts = workdir / f"{node_id}-counts.json"
    argv = [sys.executable, "-m", "xds_server.lab.proxyless",
            "--target", f"xds:///{SERVICE}", "--model", SERVICE,
            "--rate", f"{rate:g}", "--duration", f"{seconds:g}", "--out", str(counts),
            "--tenant-share", f"{node_id}=1"]  # fmt: skip
    proc = Process(node_id, argv, workdir / f"{node_id}.log", {"GRPC_XDS_BOOTSTRAP": str(boot)})
    return Client(node_id, region, proc, counts)


def spec_doc(regions: tuple[str, ...], ports: dict[tuple[str, str], int]) -> dict[str, Any]:
    return {
        "regions": list(regions),
        "services": [
            {
                "name": SERVICE,
                "pools": {
                    pool: {
                        "version": version,
                        "endpoints": {r: [f"127.0.0.1:{ports[(r, pool)]}"] for r in regions},
                    }
                    for pool, version in VERSIONS.items()
                },
            }
        ],
    }


def poll(check: Callable[[], bool], timeout: float, interval: float) -> float | None:
    """Call `check` every `interval` s until it is true (the time.time() then) or the
    timeout passes (None)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.time()
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)  # the poll period, until the deadline


@dataclass
class Change:
    canary: float
    server_s: float
    sent_s: float | None = None
    acked_s: float | None = None
    gate_seen_s: float | None = None
    first_call_s: float | None = None
    per_client_acked: list[float] = field(default_factory=list)
    per_client_first: list[float] = field(default_factory=list)
    per_client_first_after_ack: list[float] = field(default_factory=list)
    first_calls: int = 0


class Bench:
    def __init__(
        self, server: BackgroundServer, clients: list[Client], regions: tuple[str, ...]
    ) -> None:
        self.server = server
        self.clients = clients
        self.regions = regions
        self.per_region = Counter(c.region for c in clients)

    def check_alive(self) -> None:
        for c in self.clients:
            if not c.proc.alive():
                raise RuntimeError(f"client {c.node_id} exited:\n{c.proc.tail()}")

    def settled(self) -> bool:
        """Every client connected and SYNCED on every type it was sent, in every region,
        and no cluster kept for make-before-break (its removal is a push of its own)."""
        self.check_alive()
        pub = self.server.server

        def check() -> bool:
            for r in self.regions:
                snap = pub.snapshot(r)
                if snap.retained:
                    return False
                current = {t: snap.type_version(t) for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)}
                nodes = pub.node_status(r)
                if len(nodes) != self.per_region[r]:
                    return False
                for n in nodes:
                    if n.client_type != "grpc" or n.overall_sync(current) != "SYNCED":
                        return False
                    if n.types[ROUTE].acked_version != current[ROUTE]:
                        return False
            return True

        return self.server.call(check)

    def gate_open(self, want: dict[str, str]) -> bool:
        """The rollout's ACK gate, in every region, for exactly the expected clients."""

        def check() -> bool:
            for r in self.regions:
                status = self.server.server.routes_applied(r)
                if isinstance(status, Rejected):
                    raise RuntimeError(f"{status.node} rejected routes {status.version}: {status}")
                if not isinstance(status, Applied) or status.version != want[r]:
                    return False
                if status.nodes != self.per_region[r]:
                    return False
            return True

        return self.server.call(check)

    def route_times(self, want: dict[str, str]) -> dict[str, tuple[float, float]]:
        """node id -> (sent_at, acked_at) of the wanted routes, for the clients that
        have both."""

        def read() -> dict[str, tuple[float, float]]:
            out = {}
            for n in self.server.server.node_status():
                ts = n.types[ROUTE]
                if (
                    ts.sent_version == want[n.region]
                    and ts.acked_version == want[n.region]
                    and ts.sent_at is not None
                    and ts.acked_at is not None
                ):
                    out[n.node_id] = (ts.sent_at, ts.acked_at)
            return out

        return self.server.call(read)

    def change(self, canary: float, gained: str | None, arrivals: Arrivals) -> Change:
        if gained is not None:
            arrivals.arm(gained)
        pub = self.server.server

        def push() -> tuple[float, float, dict[str, str]]:
            t0 = time.time()
            c0 = time.perf_counter()
            pub.set_split(SERVICE, Split.from_percent({"canary": canary}), urgent=True)
            cost = time.perf_counter() - c0
            return t0, cost, {r: pub.snapshot(r).type_version(ROUTE) for r in self.regions}

        t0, cost, want = self.server.call(push)
        out = Change(canary, cost)
        seen = poll(lambda: self.gate_open(want), CHANGE_TIMEOUT_S, POLL_S)
        times: dict[str, tuple[float, float]] = {}
        if seen is not None:
            out.gate_seen_s = seen - t0
            times = self.route_times(want)
            out.sent_s = max(s for s, _ in times.values()) - t0
            out.per_client_acked = [a - t0 for _, a in times.values()]
            out.acked_s = max(out.per_client_acked)
        if gained is not None:
            n = len(self.clients)
            poll(lambda: len(arrivals.first(gained)) >= n, CHANGE_TIMEOUT_S, POLL_S)
            first = arrivals.first(gained)
            out.first_calls = len(first)
            out.per_client_first = [t - t0 for t in first.values()]
            if len(first) == n:
                out.first_call_s = max(out.per_client_first)
            out.per_client_first_after_ack = [
                t - times[c][1] for c, t in first.items() if c in times
            ]
        if poll(self.settled, CHANGE_TIMEOUT_S, 0.01) is None:
            raise TimeoutError(f"the fleet did not settle in {CHANGE_TIMEOUT_S:g}s after a change")
        return out


def run(
    n: int, changes: int, regions: tuple[str, ...], rate: float, canary: float, workdir: Path
) -> dict[str, Any]:
    arrivals = Arrivals()
    models: list[ModelServer] = []
    clients: list[Client] = []
    server: BackgroundServer | None = None
    rounds: list[Change] = []
    startup_s = 0.0
    ready_s = 60 + 0.5 * n
    lifetime = ready_s + changes * 3 * CHANGE_TIMEOUT_S + 60  # SIGTERM ends them sooner
    try:
        for r in regions:
            for pool in VERSIONS:
                models.append(RecordingModelServer(r, pool, arrivals).start_in_thread())
        ports = {(m.region, m.pool): m.grpc_port for m in models}
        server = BackgroundServer(validate_spec(spec_doc(regions, ports), "proxyless-bench"))
        port = server.start()
        started = time.monotonic()
        for i in range(n):
            region = regions[i % len(regions)]
            clients.append(
                start_client(workdir, region, f"grpc-{region}-{i}", port, rate, lifetime)
            )
        bench = Bench(server, clients, regions)
        # Ready: every client SYNCED, and every client's calls reaching production.
        if poll(bench.settled, ready_s, 0.01) is None:
            raise TimeoutError(f"{n} clients not connected and SYNCED in {ready_s:g}s")
        if poll(lambda: len(arrivals.first("production")) >= n, ready_s, 0.01) is None:
            raise TimeoutError("not every client's calls reached production")
        startup_s = time.monotonic() - started
        for k in range(changes):
            up = k % 2 == 0
            target = canary if up else 0.0
            gained = "canary" if up else ("production" if canary == 100 else None)
            rounds.append(bench.change(target, gained, arrivals))
    finally:
        for c in clients:
            c.proc.signal(signal.SIGTERM)  # all at once: they finish in parallel
        for c in clients:
            c.proc.stop(10)
        if server is not None:
            server.close()
        for m in models:
            m.shutdown()
            m.server_close()
    # After SIGTERM: each client's last counts are written.
    return summarise(n, changes, regions, rate, canary, startup_s, rounds, clients)


def summarise(
    n: int,
    changes: int,
    regions: tuple[str, ...],
    rate: float,
    canary: float,
    startup_s: float,
    rounds: list[Change],
    clients: list[Client],
) -> dict[str, Any]:
    def each(name: str) -> list[float]:
        return [v for r in rounds if (v := getattr(r, name)) is not None]

    def pooled(name: str) -> list[float]:
        return [v for r in rounds for v in getattr(r, name)]

    ok = failed = 0
    failures: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    for c in clients:
        counts = c.counts()
        ok += int(counts.get("ok", 0))
        failed += int(counts.get("failed", 0))
        failures.update(counts.get("failures", {}))
        versions.update(counts.get("by_version", {}))
    measured = [r for r in rounds if r.per_client_first or r.first_calls]
    return {
        "clients": n,
        "regions": list(regions),
        "changes": changes,
        "rate_per_client": rate,
        "canary_percent": canary,
        "cpus": os.cpu_count(),
        "startup_s": startup_s,
        "gate_converged": len(each("acked_s")),
        "first_call_rounds": len(measured),
        "first_call_complete": len(each("first_call_s")),
        "server_set_split": spread(each("server_s")),
        "last_sent": spread(each("sent_s")),
        "gate_acked": spread(each("acked_s")),
        "gate_seen_by_poll": spread(each("gate_seen_s")),
        "last_first_call": spread(each("first_call_s")),
        "client_acked": spread(pooled("per_client_acked")),
        "client_first_call": spread(pooled("per_client_first")),
        "client_first_call_after_ack": spread(pooled("per_client_first_after_ack")),
        "calls": {
            "ok": ok,
            "failed": failed,
            "failures": dict(failures),
            "by_version": dict(versions),
        },
        "rounds": [r.__dict__ for r in rounds],
    }


def print_report(s: dict[str, Any], load: tuple[float, float, float]) -> None:
    print(
        f"{s['clients']} proxyless gRPC clients (one process each) in "
        f"{len(s['regions'])} region(s), {s['changes']} weight changes "
        f"(canary 0% <-> {s['canary_percent']:g}%, urgent), {s['rate_per_client']:g} calls/s "
        f"per client; {s['cpus']} CPUs, load average {load[0]:.2f} at the start"
    )
    print(f"startup: every client SYNCED and calling in {s['startup_s']:.1f}s")
    print(
        f"ACK gate open after {s['gate_converged']}/{s['changes']} changes; every client's "
        f"first call on the new pool after {s['first_call_complete']}/"
        f"{s['first_call_rounds']} measured changes"
    )
    rows = [
        ("per change (from set_split)", None),
        ("server: set_split + publish (loop)", s["server_set_split"]),
        ("routes sent to the last client", s["last_sent"]),
        ("ACK gate: last client ACKed", s["gate_acked"]),
        ("ACK gate: seen by the 1 ms poll", s["gate_seen_by_poll"]),
        ("last client's first call, new pool", s["last_first_call"]),
        ("per client, all changes pooled", None),
        ("client ACKed the routes", s["client_acked"]),
        ("client's first call on the new pool", s["client_first_call"]),
        ("first call minus the client's ACK", s["client_first_call_after_ack"]),
    ]
    print(f"{'':<38} {'p50 ms':>8} {'p90 ms':>8} {'max ms':>8} {'n':>5}")
    for name, row in rows:
        if row is None:
            print(name)
        elif not row:
            print(f"  {name:<36} {'-':>8} {'-':>8} {'-':>8} {0:>5}")
        else:
            print(
                f"  {name:<36} {row['p50_ms']:>8.2f} {row['p90_ms']:>8.2f} "
                f"{row['max_ms']:>8.2f} {row['n']:>5}"
            )
    calls = s["calls"]
    print(
        f"calls: {calls['ok']} answered {dict(sorted(calls['by_version'].items()))}, "
        f"{calls['failed']} failed {calls['failures'] or ''}".rstrip()
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=20, help=f"client processes (1-{MAX_CLIENTS})")
    p.add_argument("--changes", type=int, default=10, help="weight changes (1-1000)")
    p.add_argument("--regions", type=int, default=1, help=f"regions (1-{len(REGIONS)})")
    p.add_argument("--rate", type=float, default=10.0, help="calls per second per client")
    p.add_argument("--canary", type=float, default=100.0, help="the canary share flipped to")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if not 1 <= a.clients <= MAX_CLIENTS:
        p.error(f"--clients must be from 1 to {MAX_CLIENTS}")
    if not 1 <= a.changes <= 1000:
        p.error("--changes must be from 1 to 1000")
    if not 1 <= a.regions <= len(REGIONS):
        p.error(f"--regions must be from 1 to {len(REGIONS)}")
    if not 0 < a.rate <= 1000:
        p.error("--rate must be > 0 and at most 1000")
    if not 0 < a.canary <= 100:
        p.error("--canary must be > 0 and at most 100")
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="proxyless-") as d:
        summary = run(a.clients, a.changes, REGIONS[: a.regions], a.rate, a.canary, Path(d))
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        print_report(summary, load)


if __name__ == "__main__":
    main()

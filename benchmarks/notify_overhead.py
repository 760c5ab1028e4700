"""Notification overhead: what the `Notifier` sink costs a decision, with receivers that
answer at once and with one that never answers.

Each configuration runs the real `RolloutController` on a real SQLite store (in a temp
dir), an in-memory data plane and a metric source whose canary is always healthy, and
times, on the controller's own loop:
- `commit`: an operator's pause or resume (store write, push, every sink told: two
  notification events per pause and resume, rendered and queued);
- `tick`: one interval of judging (the rollout stays at its first step: a check entry
  per tick, no notification event);
- `follow`: `Notifier.follow` alone on a rollback view (render the evidence, Slack and
  CloudEvents bodies, queue them).

Configurations: no notifier; a notifier and no targets; a webhook and a Slack target on
a local receiver (its own process) that answers 204; the same two on a receiver that
accepts each connection and never answers (timeout 30 s, 3 retries, queue 1000).

    python benchmarks/notify_overhead.py [--cycles 300] [--ticks 300] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from xds_server.outputs.notify import Notifier
from xds_server.rollout import decide as sm
from xds_server.rollout.controller import RolloutController
from xds_server.rollout.evidence import Comparison, Measurement
from xds_server.rollout.ports import Committed, QueryCheck
from xds_server.rollout.state import RegionState, rollout_traffic
from xds_server.rollout.store import Store
from xds_server.spec import (
    MeshSpec,
    Notifications,
    NotificationTarget,
    NotifyKind,
    RolloutPlan,
    validate_spec,
)
from xds_server.traffic import TrafficState
from xds_server.xds.dataplane import Applied, RouteStatus
from xds_server.xds.status import NodeStatus

REGIONS = ("us-east", "eu-west", "ap-south")
SERVICE = "recommender"
LATENCY = ((10.0, 300.0), (25.0, 800.0), (50.0, 980.0), (100.0, 1000.0), (float("inf"), 1000.0))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Plane:
    """The DataPlane port in memory: every push applied at once."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.traffic = TrafficState()
        self.versions: dict[str, int] = {}
        self.at: dict[str, float] = {}

    def set_traffic(self, traffic: TrafficState, *, urgent: bool, reason: str) -> None:
        for region in self.traffic.regions_changed(traffic):
            self.versions[region] = self.next_version(region)
            self.at[region] = self.clock()
        self.traffic = traffic

    def next_version(self, region: str) -> int:
        return self.versions.get(region, 0) + 1

    def routes_applied(self, region: str) -> RouteStatus:
        return Applied(str(self.versions.get(region, 0)), at=self.at.get(region, 0.0), nodes=1)

    def node_status(self, region: str | None = None) -> list[NodeStatus]:
        return []


class Healthy:
    """The MetricSource port: every pool healthy."""

    async def measure(
        self,
        plan: RolloutPlan,
        region: str,
        cluster: str,
        window_s: float,
        *,
        p99: bool = True,
        buckets: bool = False,
    ) -> Measurement:
        return Measurement(1000, 0, 50 if p99 else None, None, LATENCY if buckets else None)

    async def pool_health(
        self, plan: RolloutPlan, region: str, cluster: str
    ) -> tuple[float, float]:
        return 1.0, 1.0

    async def check_queries(
        self,
        plan: RolloutPlan,
        region: str,
        cluster: str,
        serving: str | None = None,
        versions: Any = None,
    ) -> QueryCheck:
        return QueryCheck()

    async def read(self, plan: RolloutPlan, metric: Any, where: Any, window_s: float) -> Any:
        raise NotImplementedError("no user metrics in this benchmark")

    async def tenant(self, plan: RolloutPlan, where: Any, tenant: str, window_s: float) -> Any:
        raise NotImplementedError("no tenants in this benchmark")

    async def throughput(
        self, plan: RolloutPlan, where: Any, window_s: float
    ) -> tuple[float | None, float | None]:
        return None, None


def make_spec() -> MeshSpec:
    def pool(version: str, port: int) -> dict[str, Any]:
        return {"version": version, "endpoints": {r: [f"127.0.0.1:{port}"] for r in REGIONS}}

    return validate_spec(
        {
            "regions": list(REGIONS),
            "listener": {"port": 10000},
            "rollout": {"steps": [5, 20, 100], "step_duration": "100000s", "interval": "1s"},
            "services": [
                {
                    "name": SERVICE,
                    "domains": ["*"],
                    "prefix": "/",
                    "pools": {
                        "production": pool("v1", 9101),
                        "baseline": pool("v1", 9102),
                        "canary": pool("v2", 9103),
                    },
                }
            ],
        }
    )


class Receiver:
    """A local HTTP receiver in its own process (so that it takes no CPU from the
    controller's): answers 204 at once, or (hang) never."""

    def __init__(self, hang: bool) -> None:
        argv = [sys.executable, __file__, "--receiver", "hang" if hang else "answer"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def targets(self) -> tuple[NotificationTarget, ...]:
        url = f"http://127.0.0.1:{self.port}"
        return (
            NotificationTarget("bus", NotifyKind.WEBHOOK, f"{url}/events", timeout=30),
            NotificationTarget("team", NotifyKind.SLACK, f"{url}/slack", timeout=30),
        )

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def serve_receiver(mode: str) -> None:
    """The receiver process: print the port, then serve until terminated."""
    never = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if mode == "hang":
                never.wait()
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_port, flush=True)
    server.serve_forever()


def rollback_view(spec: MeshSpec) -> Committed:
    plan = spec.service(SERVICE).rollout
    state = sm.start(plan, SERVICE, "v2", REGIONS, 0).state
    state = replace(
        state, regions={r: RegionState(sm.PROGRESSING, 1, step_started=10.0) for r in REGIONS}
    )
    good = Measurement(1000, 0, 50, None, LATENCY)
    bad = Measurement(1000, 300, 50, None, LATENCY)
    obs = {
        r: sm.Observation(10.0, canary=good, step=Comparison(good, good, "baseline"))
        for r in REGIONS
    }
    obs["eu-west"] = sm.Observation(10.0, canary=bad, step=Comparison(bad, good, "baseline"))
    decision = sm.decide(plan, state, obs, 20.0)
    rollouts = {SERVICE: decision.state}
    return Committed(20.0, spec, rollouts, rollout_traffic(spec, rollouts), decision)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


async def run_config(
    workdir: Path, targets: tuple[NotificationTarget, ...] | None, cycles: int, ticks: int
) -> dict[str, Any]:
    spec = make_spec()
    if targets:
        spec = replace(spec, notifications=Notifications(targets, 1000))
    clock = Clock()
    store = Store.in_dir(workdir)
    controller = RolloutController(lambda: spec, Plane(clock), store, Healthy(), clock=clock)
    notifier = Notifier() if targets is not None else None
    if notifier is not None:
        controller.subscribe(notifier)
    controller.restore()
    await controller.reconcile()
    commits: list[float] = []
    for i in range(cycles):
        clock.now += 0.01
        commits.append(timed(lambda i=i: controller.pause(SERVICE, f"look {i}", "bench")))  # type: ignore[misc]
        commits.append(timed(lambda i=i: controller.resume(SERVICE, f"go {i}", "bench")))  # type: ignore[misc]
    tick_ms: list[float] = []
    for _ in range(ticks):
        clock.now += 1
        t0 = time.perf_counter()
        await controller.tick(SERVICE)
        tick_ms.append((time.perf_counter() - t0) * 1000)
    follow_ms: list[float] = []
    if notifier is not None:
        view = rollback_view(spec)
        follow_ms = [timed(lambda: notifier.follow(view)) for _ in range(200)]
    stats = notifier.stats() if notifier else {}
    if notifier is not None:
        notifier.close(timeout=0.5)
    store.close()
    return {
        "commit_ms": summary(commits),
        "tick_ms": summary(tick_ms),
        "follow_ms": summary(follow_ms),
        "targets": {
            name: {"sent": s.sent, "failed": s.failed, "dropped": s.dropped, "queued": s.queued}
            for name, s in stats.items()
        },
    }


def summary(samples: list[float]) -> dict[str, float] | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return {
        "median": statistics.median(ordered),
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
        "p99": ordered[int(0.99 * (len(ordered) - 1))],
        "max": ordered[-1],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=300, help="pause+resume pairs per config")
    p.add_argument("--ticks", type=int, default=300)
    p.add_argument("--json", action="store_true")
    p.add_argument("--receiver", choices=["answer", "hang"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.receiver:
        serve_receiver(a.receiver)
        return
    # (The hanging receiver's requests fail when it is stopped at the end: not news.)
    logging.basicConfig(level=logging.ERROR)
    results: dict[str, Any] = {}
    for name, hang in (
        ("no notifier", None),
        ("notifier, no targets", None),
        ("answering receiver", False),
        ("hanging receiver", True),
    ):
        receiver = Receiver(hang) if hang is not None else None
        targets = receiver.targets() if receiver else (None if name == "no notifier" else ())
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = asyncio.run(run_config(Path(tmp), targets, a.cycles, a.ticks))
        if receiver is not None:
            receiver.close()
    if a.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{a.cycles * 2} commits (pause/resume), {a.ticks} ticks per configuration; ms")
    print(f"{'configuration':<22} {'what':<7} {'median':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    for name, r in results.items():
        for what in ("commit", "tick", "follow"):
            s = r[f"{what}_ms"]
            if s is None:
                continue
            print(
                f"{name:<22} {what:<7} {s['median']:8.3f} {s['p90']:8.3f} "
                f"{s['p99']:8.3f} {s['max']:8.3f}"
            )
        for target, st in r["targets"].items():
            print(f"{'':<22} target {target}: {st}")


if __name__ == "__main__":
    main()

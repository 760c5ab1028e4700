"""The server's own Prometheus metrics, served on `/metrics` (prometheus-client)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from xds_server.config import POOL_NAMES
from xds_server.rollout import decide as sm
from xds_server.rollout.controller import RolloutController, RolloutEvent
from xds_server.server import Push, XdsServer
from xds_server.xds.status import NodeStatus
from xds_server.xds.types import short

PHASES = (sm.PENDING, sm.PROGRESSING, sm.PAUSED, sm.PROMOTED, sm.ROLLED_BACK)


class Telemetry:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.weight = Gauge(
            "xds_traffic_weight_percent",
            "Share of a service's traffic per pool",
            ["service", "region", "pool"],
            registry=r,
        )
        self.phase = Gauge(
            "xds_rollout_phase",
            "1 for the rollout's current phase",
            ["service", "phase"],
            registry=r,
        )
        self.step = Gauge(
            "xds_rollout_step",
            "Current step index per region (-1: not started)",
            ["service", "region"],
            registry=r,
        )
        self.decisions = Counter(
            "xds_rollout_decisions",
            "Rollout decisions by outcome",
            ["service", "outcome"],
            registry=r,
        )
        self.push_seconds = Histogram(
            "xds_push_duration_seconds",
            "Time to build and publish a region's snapshot",
            ["region"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
        )
        self.pushes = Counter("xds_pushes", "Snapshots published", ["region"], registry=r)
        self.nodes = Gauge("xds_connected_nodes", "Connected xDS streams", ["region"], registry=r)
        self.nacks = Counter("xds_nacks", "NACKs received", ["region", "type"], registry=r)

    def attach(self, server: XdsServer, controller: RolloutController | None) -> None:
        server.on_push(self._on_push)
        seen_nacks: dict[tuple[int, str], str] = {}

        def on_node(status: NodeStatus) -> None:
            self.nodes.labels(status.region).set(server.nodes.count(status.region))
            for type_url, ts in status.types.items():
                key = (status.stream_id, type_url)
                if ts.nack_version and seen_nacks.get(key) != ts.nack_version:
                    seen_nacks[key] = ts.nack_version
                    self.nacks.labels(status.region, short(type_url)).inc()

        server.nodes.subscribe(on_node)
        if controller is not None:
            controller.subscribe(lambda ev: self._on_rollout(controller, ev))
        for svc in server.spec.services:
            for region in server.spec.regions:
                split = server.traffic.split(svc.name, region)
                for pool, pct in split.percent().items():
                    self.weight.labels(svc.name, region, pool).set(pct)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def _on_push(self, push: Push) -> None:
        self.push_seconds.labels(push.region).observe(push.seconds)
        self.pushes.labels(push.region).inc()

    def _on_rollout(self, controller: RolloutController, ev: RolloutEvent) -> None:
        state = ev.state
        for phase in PHASES:
            self.phase.labels(state.service, phase).set(1 if state.phase == phase else 0)
        traffic = controller.server.traffic
        for region, rs in state.regions.items():
            self.step.labels(state.service, region).set(rs.step)
            split = traffic.split(state.service, region).percent()
            for pool in POOL_NAMES:
                self.weight.labels(state.service, region, pool).set(split[pool])
        for t in ev.decision.transitions:
            outcome = t.verdict.outcome if t.kind == "check" and t.verdict else t.phase_to
            if t.kind == "transition" and t.step_to != t.step_from and t.phase_to == sm.PROGRESSING:
                outcome = "advance"
            self.decisions.labels(state.service, outcome).inc()

"""The server's own Prometheus metrics, served on `/metrics` (prometheus-client).

It follows the xDS publisher (pushes, nodes, NACKs), committed rollout decisions (as a
`TrafficSink`), the Istio applier and the notifier, whichever this process runs.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from xds_server.ha.instances import Instance
from xds_server.outputs.istio_apply import IstioApplier, RegionApplyStatus
from xds_server.outputs.notify import DROPPED, FAILED, RETRY, SENT, Notifier, NotifyResult
from xds_server.rollout.controller import StoreHealth
from xds_server.rollout.decide import EntryKind
from xds_server.rollout.ports import Committed
from xds_server.rollout.state import PHASE_GAUGES, PROGRESSING
from xds_server.spec import POOL_NAMES
from xds_server.traffic import TrafficState
from xds_server.xds.publisher import Push, XdsPublisher
from xds_server.xds.status import NodeStatus
from xds_server.xds.types import SEND_ORDER, short

SYNC_STATES = ("SYNCED", "STALE", "NACKED", "NOT SENT")


class Telemetry:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._store_failures_seen = 0
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
        self.score = Gauge(
            "xds_rollout_score",
            "The canary analysis score (0-100) of a region's latest verdict",
            ["service", "region"],
            registry=r,
        )
        self.metric_results = Counter(
            "xds_rollout_metric_results",
            "Canary analysis metric classifications (pass, high, low, no_data)",
            ["service", "metric", "classification"],
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
        self.node_sync = Gauge(
            "xds_nodes_sync",
            "Connected nodes per sync state (sampled every few seconds; STALE: sent, not ACKed)",
            ["region", "state"],
            registry=r,
        )
        self._store_metrics(r)
        self._istio_metrics(r)
        self._notify_metrics(r)

    def _store_metrics(self, r: CollectorRegistry) -> None:
        self.store_writable = Gauge(
            "xds_store_writable",
            "1 while the rollout state store accepts writes, 0 while they fail",
            registry=r,
        )
        self.store_writable.set(1)
        self.store_failures = Counter(
            "xds_store_write_failures",
            "Failed writes to the rollout state store (retries included)",
            registry=r,
        )
        self.store_unsaved = Gauge(
            "xds_store_unsaved_rollbacks",
            "Rollbacks pushed to the data plane but not yet committed to the store",
            registry=r,
        )
        self.leader = Gauge(
            "xds_leader",
            "1 while this process decides rollouts (holds the lock file, or the leader key "
            "of replicas on etcd), else 0",
            registry=r,
        )
        self.registered = Gauge(
            "xds_registered_instances",
            "Instances in the shared registry (replicas on etcd)",
            ["service", "version", "region"],
            registry=r,
        )
        self.elections = Counter(
            "xds_leader_elections",
            "Times this replica became the leader (replicas on etcd)",
            registry=r,
        )

    def _istio_metrics(self, r: CollectorRegistry) -> None:
        self.istio_applies = Counter(
            "xds_istio_apply",
            "Server-side applies of a region's Istio objects to its cluster, by result",
            ["region", "result"],
            registry=r,
        )
        self.istio_pending = Gauge(
            "xds_istio_apply_pending",
            "1 while a region's cluster does not hold the newest Istio objects",
            ["region"],
            registry=r,
        )
        self.istio_failures = Gauge(
            "xds_istio_apply_consecutive_failures",
            "Failed applies in a row to a region's cluster (0 once one succeeds)",
            ["region"],
            registry=r,
        )

    def _notify_metrics(self, r: CollectorRegistry) -> None:
        self.notify_sent = Counter(
            "xds_notifications_sent",
            "Notifications a target accepted (2xx), by target name and event type",
            ["target", "type"],
            registry=r,
        )
        self.notify_failed = Counter(
            "xds_notifications_failed",
            "Notifications given up on after their retries, by target name and event type",
            ["target", "type"],
            registry=r,
        )
        self.notify_retries = Counter(
            "xds_notifications_retries",
            "Failed attempts to send a notification that were tried again",
            ["target"],
            registry=r,
        )
        self.notify_dropped = Counter(
            "xds_notifications_dropped",
            "Notifications dropped unsent: the target's queue was full, or it left the spec",
            ["target"],
            registry=r,
        )
        self.notify_queued = Gauge(
            "xds_notifications_queued",
            "Notifications waiting in a target's queue",
            ["target"],
            registry=r,
        )

    def attach(self, server: XdsPublisher) -> None:
        """Follow the publisher's pushes and nodes; weights start as it serves them."""
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
        self._set_weights(
            server.traffic, [s.name for s in server.spec.services], server.spec.regions
        )

    def _set_weights(
        self, traffic: TrafficState, services: list[str], regions: tuple[str, ...]
    ) -> None:
        for service in services:
            for region in regions:
                split = traffic.split(service, region).percent()
                for pool in POOL_NAMES:
                    self.weight.labels(service, region, pool).set(split[pool])

    def set_registry(self, instances: Iterable[Instance]) -> None:
        counts = collections.Counter((i.service, i.version, i.region) for i in instances)
        self.registered.clear()
        for (service, version, region), n in counts.items():
            self.registered.labels(service, version, region).set(n)

    def on_leadership(self, leading: bool) -> None:
        self.leader.set(1 if leading else 0)
        if leading:
            self.elections.inc()

    def on_store_health(self, health: StoreHealth) -> None:
        self.store_writable.set(1 if health.ok else 0)
        self.store_unsaved.set(health.unsaved_rollbacks)
        grown = health.failed_writes - self._store_failures_seen
        if grown > 0:
            self.store_failures.inc(grown)
            self._store_failures_seen = health.failed_writes

    def attach_istio(self, applier: IstioApplier) -> None:
        """Apply results and pending state per region, from the `istio` output mode."""
        for st in applier.status():
            for result in ("success", "failure", "prune_failure"):
                self.istio_applies.labels(st.region, result)
            self._on_apply(st, "")
        applier.subscribe(self._on_apply)

    def _on_apply(self, status: RegionApplyStatus, what: str) -> None:
        if what in ("success", "failure", "prune_failure"):
            self.istio_applies.labels(status.region, what).inc()
        self.istio_pending.labels(status.region).set(1 if status.pending else 0)
        self.istio_failures.labels(status.region).set(status.consecutive_failures)

    def attach_notifier(self, notifier: Notifier) -> None:
        """Sent, failed, retried, dropped and waiting notifications per target."""
        notifier.subscribe(self._on_notify)

    def _on_notify(self, r: NotifyResult) -> None:
        if r.result == SENT:
            self.notify_sent.labels(r.target, r.type).inc()
        elif r.result == FAILED:
            self.notify_failed.labels(r.target, r.type).inc()
        elif r.result == RETRY:
            self.notify_retries.labels(r.target).inc()
        elif r.result == DROPPED:
            self.notify_dropped.labels(r.target).inc()
        self.notify_queued.labels(r.target).set(r.queued)

    def sample_nodes(self, server: XdsPublisher) -> None:
        """Count connected nodes per region and sync state against the current snapshots."""
        counts = {(r, s): 0 for r in server.spec.regions for s in SYNC_STATES}
        for region in server.spec.regions:
            snap = server.cache.get(region)
            current = {t: snap.type_version(t) if snap else "" for t in SEND_ORDER}
            for node in server.nodes.nodes(region):
                key = (region, node.overall_sync(current))
                counts[key] = counts.get(key, 0) + 1
        for (region, state), n in counts.items():
            self.node_sync.labels(region, state).set(n)

    async def sample_nodes_forever(self, server: XdsPublisher, every: float = 5.0) -> None:
        """Node sync states for alerting; a scan every few seconds, not one per ACK."""
        while True:
            self.sample_nodes(server)
            await asyncio.sleep(every)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def _on_push(self, push: Push) -> None:
        self.push_seconds.labels(push.region).observe(push.seconds)
        self.pushes.labels(push.region).inc()

    def follow(self, event: Committed) -> None:
        """The `TrafficSink`: weights, phase, steps and decisions of a committed view."""
        self._set_weights(event.traffic, [s.name for s in event.spec.services], event.spec.regions)
        state = event.state
        if state is None or event.decision is None:
            return
        for phase in PHASE_GAUGES:
            self.phase.labels(state.service, phase).set(1 if state.phase == phase else 0)
        for region, rs in state.regions.items():
            self.step.labels(state.service, region).set(rs.step)
        for t in event.decision.transitions:
            outcome = str(
                t.verdict.outcome if t.kind == EntryKind.CHECK and t.verdict else t.phase_to
            )
            if (
                t.kind == EntryKind.TRANSITION
                and t.step_to != t.step_from
                and t.phase_to == PROGRESSING
            ):
                outcome = "advance"
            self.decisions.labels(state.service, outcome).inc()
            if t.verdict is not None and t.region is not None:
                if t.verdict.score is not None:
                    self.score.labels(state.service, t.region).set(t.verdict.score)
                for m in t.verdict.metrics:
                    self.metric_results.labels(state.service, m.name, m.classification).inc()

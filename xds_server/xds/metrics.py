"""What the xDS side exports on `/metrics`: pushes, connected nodes, NACKs, sync states.

The collectors live on the process's registry; `attach` follows one publisher."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from xds_server.xds.publisher import Push, XdsPublisher
from xds_server.xds.status import NodeStatus
from xds_server.xds.types import SEND_ORDER, short

SYNC_STATES = ("SYNCED", "STALE", "NACKED", "NOT SENT")


class XdsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.push_seconds = Histogram(
            "xds_push_duration_seconds",
            "Time to build and publish a region's snapshot",
            ["region"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
        )
        self.pushes = Counter("xds_pushes", "Snapshots published", ["region"], registry=registry)
        self.nodes = Gauge(
            "xds_connected_nodes", "Connected xDS streams", ["region"], registry=registry
        )
        self.nacks = Counter("xds_nacks", "NACKs received", ["region", "type"], registry=registry)
        self.node_sync = Gauge(
            "xds_nodes_sync",
            "Connected nodes per sync state (sampled every few seconds; STALE: sent, not ACKed)",
            ["region", "state"],
            registry=registry,
        )

    def attach(self, publisher: XdsPublisher) -> None:
        """Follow the publisher's pushes and nodes (a NACK counts once per version)."""
        publisher.on_push(self._on_push)
        seen_nacks: dict[tuple[int, str], str] = {}
        counted: dict[str, int] = {}

        def on_node(status: NodeStatus) -> None:  # (at every ACK of a fleet: little work)
            count = publisher.nodes.count(status.region)
            if counted.get(status.region) != count:
                counted[status.region] = count
                self.nodes.labels(status.region).set(count)
            for type_url, ts in status.types.items():
                if not ts.nack_version:
                    continue
                key = (status.stream_id, type_url)
                if seen_nacks.get(key) != ts.nack_version:
                    seen_nacks[key] = ts.nack_version
                    self.nacks.labels(status.region, short(type_url)).inc()

        publisher.nodes.subscribe(on_node)

    def _on_push(self, push: Push) -> None:
        self.push_seconds.labels(push.region).observe(push.seconds)
        self.pushes.labels(push.region).inc()

    def sample_nodes(self, publisher: XdsPublisher) -> None:
        """Count connected nodes per region and sync state against the current snapshots."""
        counts = {(r, s): 0 for r in publisher.spec.regions for s in SYNC_STATES}
        for region in publisher.spec.regions:
            snap = publisher.cache.get(region)
            current = {t: snap.type_version(t) if snap else "" for t in SEND_ORDER}
            for node in publisher.nodes.nodes(region):
                key = (region, node.overall_sync(current))
                counts[key] = counts.get(key, 0) + 1
        for (region, state), n in counts.items():
            self.node_sync.labels(region, state).set(n)

    async def sample_nodes_forever(self, publisher: XdsPublisher, every: float = 5.0) -> None:
        """Node sync states for alerting; a scan every few seconds, not one per ACK."""
        while True:
            self.sample_nodes(publisher)
            await asyncio.sleep(every)

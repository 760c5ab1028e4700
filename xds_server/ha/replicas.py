"""The replica directory: who runs, what each serves, and what its nodes have applied.

Each replica keeps one key, `replicas/<id>`, on its own lease: its addresses, the
regions it serves, whether it leads, and the route versions its nodes have ACKed. The
key is rewritten when that changes (at most every `PUBLISH_INTERVAL`) and vanishes
with the replica's lease when it dies. From every replica's key:

- the leader's ACK gate counts a region's nodes across all replicas (`ClusterDataPlane`);
- a node that dials the wrong replica is told which ones serve its region;
- `xdsctl status` shows every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from xds_server.ha.etcd import Keys
from xds_server.ha.leader import wait_event
from xds_server.ha.store import EtcdStore
from xds_server.traffic import TrafficState
from xds_server.xds.dataplane import RouteStatus
from xds_server.xds.publisher import XdsPublisher, judge_routes
from xds_server.xds.status import NodeStatus, TypeStatus
from xds_server.xds.types import ROUTE

log = logging.getLogger("xds_server.ha.replicas")

PUBLISH_INTERVAL = 0.1
"""The most often a replica rewrites its key (node ACKs coalesce into one write)."""
DEPARTED_GRACE_TTLS = 2
"""How long (in leader TTLs) the nodes of a replica whose key expired still count, as
not having applied anything newer: they are between replicas (their Envoys reconnect to
the next server of their bootstrap within a couple of seconds) or stuck on a frozen
one. Without it a region whose only replica died would count as applied, with no node
having the new weights."""


@dataclass(frozen=True)
class ReplicaInfo:
    replica_id: str
    regions: tuple[str, ...]
    """The regions it serves; () for all of them."""
    xds_address: str
    admin_address: str
    started: float


class Directory:
    """This replica's key (kept alive on a lease) and everyone's, from the store's view."""

    def __init__(
        self, store: EtcdStore, info: ReplicaInfo, publisher: XdsPublisher, ttl: float
    ) -> None:
        self.store = store
        self.keys: Keys = store.keys
        self.info = info
        self.publisher = publisher
        self.ttl = max(2, round(ttl))
        self.leading = False
        self._dirty = asyncio.Event()
        publisher.nodes.subscribe(lambda _status: self._dirty.set())

    def changed(self) -> None:
        """Something this replica publishes changed (leadership): write it soon."""
        self._dirty.set()

    def document(self) -> dict[str, Any]:
        return {
            "id": self.info.replica_id,
            "regions": list(self.info.regions),
            "xds": self.info.xds_address,
            "admin": self.info.admin_address,
            "started": self.info.started,
            "leader": self.leading,
            "updated": time.time(),
            "nodes": [node_document(n) for n in self.publisher.node_status()],
        }

    async def run(self) -> None:
        """Keep this replica's key until cancelled: a lease renewed every third of its
        TTL, the key rewritten on change. A failing store is retried."""
        client = self.store.client
        while True:
            try:
                await client.connect()
                lease = await client.lease(self.ttl)
                await self._publish(lease.id)
                renew_at = time.monotonic() + self.ttl / 3
                while True:
                    await wait_event(self._dirty, max(0.0, renew_at - time.monotonic()))
                    if time.monotonic() >= renew_at:
                        reply = await client.refresh_lease(lease.id)
                        if reply is None or reply.TTL <= 0:
                            raise LookupError("the replica's lease expired")
                        renew_at = time.monotonic() + self.ttl / 3
                    if self._dirty.is_set():
                        await asyncio.sleep(PUBLISH_INTERVAL)  # coalesce a burst of ACKs
                        await self._publish(lease.id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cannot keep this replica's key in the store: %s", exc)
                await asyncio.sleep(0.5)  # the store's retry backoff

    async def _publish(self, lease: int) -> None:
        self._dirty.clear()
        doc = json.dumps(self.document()).encode()
        await self.store.client.put(self.keys.replica(self.info.replica_id).encode(), doc, lease)

    async def withdraw(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.store.client.delete(self.keys.replica(self.info.replica_id).encode()), 1.0
            )

    # ---- everyone's ----

    def others(self) -> dict[str, dict[str, Any]]:
        return {
            rid: doc for rid, doc in self.store.view.replicas.items() if rid != self.info.replica_id
        }

    def serving(self, region: str) -> list[str]:
        """'id (xds address)' of every replica that serves `region`."""
        return [
            f"{rid} ({doc.get('xds', '?')})"
            for rid, doc in sorted(self.store.view.replicas.items())
            if not doc.get("regions") or region in doc["regions"]
        ]

    def remote_nodes(self, region: str | None = None) -> list[NodeStatus]:
        """The nodes other replicas hold, as they last published them; then those of
        replicas that went away within DEPARTED_GRACE_TTLS, unless seen elsewhere."""
        out: dict[str, NodeStatus] = {}
        for rid, doc in self.others().items():
            for n in doc.get("nodes", []):
                if region is None or n.get("region") == region:
                    out.setdefault(n["id"], node_from_document(n, rid))
        since = time.monotonic() - DEPARTED_GRACE_TTLS * self.ttl
        for rid, (doc, gone) in self.store.view.departed.items():
            if gone < since or rid == self.info.replica_id:
                continue
            for n in doc.get("nodes", []):
                if (region is None or n.get("region") == region) and n["id"] not in out:
                    out[n["id"]] = node_from_document(n, f"{rid} (gone)")
        return list(out.values())


def node_document(n: NodeStatus) -> dict[str, Any]:
    ts = n.types[ROUTE]
    return {
        "id": n.node_id,
        "region": n.region,
        "agent": n.user_agent,
        "since": n.connected_since,
        "routes": {
            "sent": ts.sent_version,
            "acked": ts.acked_version,
            "acked_at": ts.acked_at,
            "nack": ts.nack_version,
            "error": ts.nack_error,
            "subscribed": ts.subscribed,
        },
    }


def node_from_document(doc: dict[str, Any], replica: str) -> NodeStatus:
    r = doc.get("routes", {})
    status = NodeStatus(
        -1, doc["id"], doc["region"], doc.get("since", 0.0), user_agent=doc.get("agent", "")
    )
    status.listen = f"via {replica}"
    status.types[ROUTE] = TypeStatus(
        sent_version=r.get("sent", ""),
        acked_version=r.get("acked", ""),
        acked_at=r.get("acked_at"),
        nack_version=r.get("nack", ""),
        nack_error=r.get("error", ""),
        subscribed=bool(r.get("subscribed")),
    )
    return status


class ClusterDataPlane:
    """The leader's `DataPlane`: its own publisher for pushes, and for the ACK gate every
    node of a region, on whichever replica it is connected."""

    def __init__(
        self,
        publisher: XdsPublisher,
        directory: Directory,
        live_hosts: Callable[[str, str], int | None] | None = None,
    ) -> None:
        self.publisher = publisher
        self.directory = directory
        self.live_hosts = live_hosts

    def set_traffic(self, traffic: TrafficState, *, urgent: bool, reason: str) -> None:
        self.publisher.set_traffic(traffic, urgent=urgent, reason=reason)

    def next_version(self, region: str) -> int:
        return self.publisher.next_version(region)

    def routes_applied(self, region: str) -> RouteStatus:
        local = self.publisher.nodes.judged(region, ROUTE)
        local_ids = {n.node_id for n in local}
        remote = [
            n
            for n in self.directory.remote_nodes(region)
            if n.node_id not in local_ids and n.judged_on(ROUTE)
        ]
        # (A node that left a dead replica counts as lagging until it is seen again.)
        return judge_routes(
            self.publisher.snapshot(region).type_version(ROUTE),
            self.publisher.routes_published(region),
            [*local, *remote],
        )

    def node_status(self, region: str | None = None) -> list[NodeStatus]:
        return self.publisher.node_status(region)

    def pool_hosts(self, region: str, cluster: str) -> int | None:
        if self.live_hosts is not None:
            return self.live_hosts(region, cluster)
        return self.publisher.pool_hosts(region, cluster)


def served_regions(regions: Collection[str], spec_regions: Collection[str]) -> tuple[str, ...]:
    """The regions a replica serves: `regions` (checked against the spec), or all."""
    unknown = sorted(set(regions) - set(spec_regions))
    if unknown:
        raise ValueError(
            f"--regions: {', '.join(unknown)} not in the spec (regions: {', '.join(spec_regions)})"
        )
    return tuple(regions)

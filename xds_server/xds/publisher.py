"""The xDS publisher: spec + traffic weights -> snapshots -> ADS streams.

`XdsPublisher` serves the spec and weights it is given: it rebuilds a region's snapshot
when either changes and publishes it to the cache, where the ADS streams pick it up.
Changes that land within a few milliseconds of each other coalesce into one push; an
urgent change (a rollback) is pushed at once. It is the `DataPlane` the rollout
controller drives. Its methods are called on the server's event loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc

from xds_server.spec import MeshSpec
from xds_server.traffic import Split, TrafficState, WeightError
from xds_server.xds.cache import SnapshotCache
from xds_server.xds.dataplane import Applied, NodeAck, Pending, Rejected, RouteStatus
from xds_server.xds.identity import IdentityPolicy
from xds_server.xds.resources import RegionBuilder, RegionResources
from xds_server.xds.service import AdsService
from xds_server.xds.snapshot import Snapshot, SnapshotError
from xds_server.xds.status import NodeRegistry, NodeStatus
from xds_server.xds.types import CLUSTER, ENDPOINT, ROUTE, SEND_ORDER, short

log = logging.getLogger("xds_server.publisher")

COALESCE_SECONDS = 0.005
YOUNG_GC_SECONDS = 10.0
"""How often `collect_garbage` collects the young generations (see there)."""
FULL_GC_EVERY = 60
"""Every this many of them (10 minutes), a full collection."""


@dataclass(frozen=True)
class Push:
    """One published snapshot, as reported to push listeners."""

    region: str
    version: int
    types: tuple[str, ...]
    nodes: int
    reason: str
    seconds: float


class XdsPublisher:
    def __init__(
        self,
        spec: MeshSpec,
        *,
        coalesce_seconds: float = COALESCE_SECONDS,
        tls: tuple[bytes, bytes] | None = None,
        client_ca: bytes | None = None,
        trust_domain: str | None = None,
        routes_version: Callable[[str], int] | None = None,
        traffic: TrafficState | None = None,
        clock: Callable[[], float] = time.time,
        reuse_port: bool = False,
    ) -> None:
        """`traffic`: the weights to build the first snapshots with (a replica starts
        from the store's, so its first routes are the ones every replica serves).
        `clock`: the wall clock of its nodes' send and ACK times and of its publishes,
        which the rollout's `ack_timeout` is counted on (the controller's).
        `reuse_port`: share the xDS port with other processes (`serve --workers`:
        SO_REUSEPORT, the kernel spreads new connections over them)."""
        self.reuse_port = reuse_port
        self.spec = spec
        self.tls = tls
        """(certificate chain, private key) in PEM: serve xDS over TLS."""
        self.client_ca = client_ca
        """With TLS: require client certificates signed by this CA (PEM), naming the node."""
        self.traffic = traffic if traffic is not None else TrafficState()
        self.cache = SnapshotCache()
        self.clock = clock
        self.nodes = NodeRegistry(clock)
        self.identity = IdentityPolicy(trust_domain) if client_ca is not None else None
        """What a node's client certificate must say (mTLS); None: no client certificates."""
        self.ads = AdsService(self.cache, self.nodes, spec.regions)
        self.ads.identity = self.identity
        self.coalesce_seconds = coalesce_seconds
        self._routes_published: dict[str, float] = {}
        """When each region's current routes were published: the ACK clock's start."""
        self._builders: dict[str, RegionBuilder] = {}
        self._dirty: dict[str, str] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self._push_listeners: list[Callable[[Push], None]] = []
        self._grpc: grpc.aio.Server | None = None
        self._gc: asyncio.Task[None] | None = None
        self.port = 0
        # Versions start from the wall clock (ms) so that they keep growing across restarts.
        self.initial_version = int(time.time() * 1000)
        self.routes_version = routes_version
        """Replicas on a shared store: a region's routes version, derived from the store
        (equal on every replica for equal state). None: versions count from
        `initial_version`, as one process needs."""
        self.nodes.subscribe(self._on_node_event)
        for region in spec.regions:
            self._rebuild(region, "initial spec")

    # ---- the DataPlane port ----

    def next_version(self, region: str) -> int:
        return self.snapshot(region).version + 1

    def routes_applied(self, region: str) -> RouteStatus:
        """Has every connected node of the region ACKed the current routes? (Every Envoy,
        and every proxyless gRPC client that subscribes to routes: `judged_on`.)"""
        return judge_routes(
            self.snapshot(region).type_version(ROUTE),
            self._routes_published.get(region, self.clock()),
            self.nodes.judged(region, ROUTE),
        )

    def node_status(self, region: str | None = None) -> list[NodeStatus]:
        return self.nodes.nodes(region)

    def pool_hosts(self, region: str, cluster: str) -> int | None:
        """The hosts the spec gives a pool in a region; None for an unknown pool."""
        service, _, pool = cluster.partition("|")
        try:
            found = self.spec.service(service).pools.get(pool)
        except KeyError:
            return None
        return None if found is None else len(found.endpoints.get(region, ()))

    def routes_published(self, region: str) -> float:
        """When the region's current routes were published (the ACK clock's start)."""
        return self._routes_published.get(region, self.clock())

    def refresh_versions(self, reason: str) -> None:
        """The store's versions moved (`routes_version`): rebuild every region, so routes
        whose content did not change still carry the version other replicas give them."""
        self._mark_dirty(self.spec.regions, reason, urgent=True)

    # ---- serving ----

    def snapshot(self, region: str) -> Snapshot:
        snap = self.cache.get(region)
        if snap is None:
            raise KeyError(f"unknown region {region!r}")
        return snap

    def set_split(
        self,
        service: str,
        split: Split,
        regions: Iterable[str] | None = None,
        *,
        urgent: bool = False,
        reason: str = "weights changed",
    ) -> None:
        """Route `service` by `split` in `regions` (default: all). Raises WeightError."""
        try:
            svc = self.spec.service(service)
        except KeyError:
            raise WeightError(f"unknown service {service!r}") from None
        split.check_pools(svc)
        chosen = list(self.spec.regions if regions is None else regions)
        unknown = set(chosen) - set(self.spec.regions)
        if unknown:
            raise WeightError(f"unknown region(s): {', '.join(sorted(unknown))}")
        self.set_traffic(
            self.traffic.with_split(service, chosen, split), urgent=urgent, reason=reason
        )

    def set_traffic(
        self, traffic: TrafficState, *, urgent: bool = False, reason: str = "weights changed"
    ) -> None:
        changed = self.traffic.regions_changed(traffic)
        self.traffic = traffic
        self._mark_dirty(changed, reason, urgent=urgent)

    def apply_spec(self, spec: MeshSpec, reason: str = "spec changed") -> None:
        """Serve a new, already validated spec; regions whose resources change get a push."""
        self.spec = spec
        self.ads.set_regions(spec.regions)
        self._mark_dirty(spec.regions, reason, urgent=False)

    def flush(self) -> list[Push]:
        """Build and publish every pending region now."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        dirty, self._dirty = self._dirty, {}
        pushes = [p for region, why in dirty.items() if (p := self._rebuild(region, why))]
        return pushes

    def on_push(self, listener: Callable[[Push], None]) -> None:
        self._push_listeners.append(listener)

    # ---- building and publishing ----

    def _mark_dirty(self, regions: Iterable[str], reason: str, *, urgent: bool) -> None:
        for region in regions:
            self._dirty.setdefault(region, reason)
        if not self._dirty:
            return
        if urgent:
            self.flush()
            return
        if self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop yet (construction, tests of the builder)
                self.flush()
                return
            self._flush_handle = loop.call_later(self.coalesce_seconds, self.flush)

    def _rebuild(self, region: str, reason: str) -> Push | None:
        start = time.perf_counter()
        if region not in self.spec.regions:
            return None
        old = self.cache.get(region)
        resources, retained = self._keep_removed_clusters(self.build_resources(region), old)
        listen = (self.spec.listener.address, self.spec.listener.port)
        floor = self.routes_version(region) if self.routes_version is not None else 0
        try:
            snap = (
                Snapshot.first(resources, listen, floor or self.initial_version)
                if old is None
                else old.successor(resources, listen, retained, routes_version=floor)
            )
        except SnapshotError as exc:
            log.error("not pushing an inconsistent snapshot (%s): %s", reason, exc)
            return None
        if (
            old is not None
            and snap.type_versions == old.type_versions
            and snap.retained == old.retained
        ):
            return None
        self.cache.set(snap)
        if old is None or snap.type_version(ROUTE) != old.type_version(ROUTE):
            self._routes_published[region] = self.clock()
        changed = tuple(
            short(t)
            for t in SEND_ORDER
            if old is None or snap.type_versions[t] != old.type_versions[t]
        )
        push = Push(
            region,
            snap.version,
            changed,
            self.nodes.count(region),
            reason,
            time.perf_counter() - start,
        )
        log.info(
            "push region=%s version=%d types=%s nodes=%d reason=%s%s",
            region,
            snap.version,
            ",".join(changed) or "-",
            push.nodes,
            reason,
            f" retained={sorted(retained)}" if retained else "",
        )
        for listener in list(self._push_listeners):
            listener(push)
        return push

    def build_resources(self, region: str) -> RegionResources:
        """The region's resources for the current spec and weights (a test that needs an
        Envoy to NACK overrides this to serve something the builder never makes)."""
        builder = self._builders.setdefault(region, RegionBuilder(region))
        return builder.build(self.spec, self.traffic)

    def _keep_removed_clusters(
        self, resources: RegionResources, old: Snapshot | None
    ) -> tuple[RegionResources, frozenset[str]]:
        """Make before break: a cluster leaves only after no node's routes can use it.

        A cluster that the previous routes used stays (with its endpoints) until every
        connected node of the region has ACKed routes without it.
        """
        if old is None:
            return resources, frozenset()
        gone = set(old.resources.by_type[CLUSTER]) - set(resources.by_type[CLUSTER])
        if not gone:  # (most pushes: and the nodes' ACKs are not looked at, a fleet's worth)
            return resources, frozenset()
        routes_applied = self.nodes.all_acked(resources.region, ROUTE, old.type_version(ROUTE))
        keep = frozenset(
            c for c in gone if c in old.route_targets or (c in old.retained and not routes_applied)
        )
        if not keep:
            return resources, keep
        by_type = dict(resources.by_type)
        for type_url in (CLUSTER, ENDPOINT):
            merged = dict(by_type[type_url])
            merged.update({c: old.resources.by_type[type_url][c] for c in keep})
            by_type[type_url] = merged
        return RegionResources(resources.region, by_type), keep

    def _on_node_event(self, status: NodeStatus) -> None:
        """While clusters are retained, a node applying the current routes may be the last
        one they waited for: rebuild (coalesced; the rebuild checks every node once)."""
        snap = self.cache.get(status.region)
        if (
            snap is not None
            and snap.retained
            and status.types[ROUTE].acked_version == snap.type_version(ROUTE)
        ):
            self._mark_dirty(
                [status.region], "routes applied: removing unused clusters", urgent=False
            )

    # ---- gRPC lifecycle ----

    def _add_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.tls is None:
            return server.add_insecure_port(address)
        creds = grpc.ssl_server_credentials(
            [(self.tls[1], self.tls[0])],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )
        return server.add_secure_port(address, creds)

    async def start(self, address: str = "127.0.0.1:18000") -> int:
        tune_gc_for_many_streams()
        if self._gc is None:
            self._gc = asyncio.get_running_loop().create_task(collect_garbage())
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.keepalive_time_ms", 30_000),
                # Envoy PINGs its xDS server every second (the bootstrap's keepalive, so
                # a frozen server is left fast): never answer that with GOAWAY.
                ("grpc.http2.min_ping_interval_without_data_ms", 500),
                ("grpc.http2.max_ping_strikes", 0),
                ("grpc.max_concurrent_streams", 100_000),
                # gRPC sets SO_REUSEPORT unless told not to: a second server started on
                # a taken port would silently share it. Only `serve --workers` shares.
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
            ]
        )
        self.ads.add_to(self._grpc)
        try:
            self.port = self._add_port(self._grpc, address)
        except RuntimeError:  # grpc's "Failed to bind": in use, or not this machine's
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {address}: in use, or not an address here")
        await self._grpc.start()
        log.info(
            "xDS server listening on %s (port %d, %s), regions: %s",
            address,
            self.port,
            "mTLS" if self.client_ca else "TLS" if self.tls else "plaintext",
            ", ".join(self.spec.regions),
        )
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        if self._gc is not None:
            self._gc.cancel()
            self._gc = None
        if self._grpc is not None:
            self.ads.close()
            await self._grpc.stop(grace)
            self._grpc = None
            self.ads.closing = False


def judge_routes(
    version: str,
    published: float,
    nodes: Iterable[NodeStatus],
    unknown: tuple[str, ...] = (),
    unknown_since: float | None = None,
) -> RouteStatus:
    """Where these nodes stand on routes `version`, published at `published`; `unknown`:
    nodes not heard from (their replica is gone or silent), each 'NODE (why)', which
    keep the routes pending whatever the others did. Each node's clock (what
    `ack_timeout` counts from, `NodeAck.since`) starts when that node was sent the
    routes (`node_clock`); an unknown node's at the publish, or when the first went
    unknown if that is later. `Pending.since` is the earliest clock of a node held for.
    Every status carries the ACK times and the other nodes' standing for the ACK gate
    (`xds.acks`)."""
    nodes = list(nodes)
    acked: list[float] = []
    holdouts: list[NodeAck] = []
    nack: NodeStatus | None = None
    for n in nodes:  # (one pass: a fleet's thousands of nodes at every look)
        ts = n.types[ROUTE]
        if ts.acked_version == version:
            acked.append(ts.acked_at or published)
            continue
        error = ts.nack_error if ts.nack_version == version else ""
        if error and nack is None:
            nack = n
        since = node_clock(n, version, published)
        holdouts.append(NodeAck(n.node_id, since, error, n.identity))
    lagging = tuple(a.node for a in holdouts)
    lost = max(published, unknown_since) if unknown_since is not None else published
    holdouts.extend(NodeAck(node, lost, unknown=why) for node, why in map(_unknown_parts, unknown))
    times, held = tuple(acked), tuple(holdouts)
    if nack is not None:
        ts = nack.types[ROUTE]
        return Rejected(version, nack.node_id, ts.nack_error, nack.identity, times, held)
    if held:
        since = min(a.since for a in held)
        return Pending(version, since, lagging, unknown, len(acked), times, held)
    return Applied(version, max([published, *acked]), len(nodes), times, held)


def node_clock(n: NodeStatus, version: str, published: float) -> float:
    """When node `n`'s time to ACK routes `version` began: when it was sent them (a node
    that connects late in a step gets its own `ack_timeout`); not sent yet (it has not
    asked, or waits for its clusters): when it connected, or the publish if later."""
    ts = n.types[ROUTE]
    if ts.sent_version == version and ts.sent_at is not None:
        return max(published, ts.sent_at)
    return max(published, n.connected_since)


def _unknown_parts(text: str) -> tuple[str, str]:
    """'NODE (why)' -> (NODE, why)."""
    node, _, why = text.partition(" (")
    return node, why.removesuffix(")")


def tune_gc_for_many_streams() -> None:
    """Collect young objects far less often than CPython's default (700, 10, 10).

    A server holds millions of long-lived objects (streams, their state, snapshots), and
    with the default thresholds the cyclic collector keeps rescanning them: it cost a
    third of the server's CPU in a push to 10,000 streams (benchmarks/push_fanout.py:
    1.64 -> 1.07 CPU s per push, p99 2.02 -> 1.48 s). Everything is still collected.

    The young generation's threshold is above what a push keeps alive at once: each
    woken stream holds about ten objects until its write is done, so at 100,000 every
    push to 10,000 streams set off a collection that walked 100,000 live objects for
    nothing (18% of the push's CPU; 0.86-1.02 -> 0.73-0.85 CPU s per push at
    1,000,000, issue 28). What cycles leave is collected by `collect_garbage`.
    """
    gc.set_threshold(1_000_000, 50, 100)


async def collect_garbage(
    period: float = YOUNG_GC_SECONDS, full_every: int = FULL_GC_EVERY
) -> None:
    """What those thresholds leave out: a quiet server (a few Envoys' health checks, the
    store's calls) takes hours to reach the young threshold, and meanwhile the reference
    cycles its RPCs leave (grpc's own handler lookup makes one per call) pin memory: a
    replica's RSS grew about 1 MiB per rollout, without end, in benchmarks/soak.py
    (issue 30), and never came back, as a full collection only comes after 100 of the
    rare middle ones. So the young generations are collected every `period` (their cost
    is the objects made since, never the long-lived ones), and everything every
    `full_every` of them. With it, over the soak's 98 rollouts in 30 minutes, the
    followers' RSS moved 0.4 MiB and the leader's 4.4 MiB, most of it in the first ten."""
    n = 0
    while True:
        await asyncio.sleep(period)  # (a period, not a wait for state)
        n += 1
        gc.collect(2 if n % full_every == 0 else 1)

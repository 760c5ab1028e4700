"""The replica directory: who runs, what each serves, and what its nodes have applied.

Each replica keeps one key, `replicas/<id>`, on its own lease: its addresses, the
regions it serves, whether it leads, and the route versions its nodes have ACKed (in
parts beside it when they are too many for one value: `directory_parts`). The
key is rewritten when that changes (at most every `PUBLISH_INTERVAL`) and vanishes
with the replica's lease when it dies. At every renewal of the lease the replica also
writes a small beat key, `replica-beats/<id>`, which says it is alive (`Directory._beat`).
From every replica's key:

- the leader's ACK gate counts a region's nodes across all replicas (`ClusterDataPlane`);
  a replica not heard from at its heartbeat (frozen, cut off) or gone is silent, and
  its nodes are unknown, never applied, until seen elsewhere;
- a node that dials the wrong replica is told which ones serve its region;
- `xdsctl status` shows every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _encode_ascii
from typing import Any, Protocol

from xds_server.ha import directory_parts
from xds_server.ha.etcd import Keys, renew, retrying
from xds_server.ha.leader import wait_event
from xds_server.ha.maintenance import is_nospace
from xds_server.ha.store import EtcdStore
from xds_server.traffic import TrafficState
from xds_server.xds.dataplane import RouteStatus
from xds_server.xds.publisher import XdsPublisher, judge_routes
from xds_server.xds.status import NodeStatus, TypeStatus
from xds_server.xds.types import ROUTE

log = logging.getLogger("xds_server.ha.replicas")

PUBLISH_INTERVAL = 0.1
"""The most often a replica rewrites its key (node ACKs coalesce into one write)."""
READ_SHARE = 0.01
"""At most about this share of a core for each replica reading this replica's key: a
key of thousands of nodes waits longer between rewrites while its nodes keep changing
(`Directory.coalesce`, `_gather`), up to half a heartbeat, and is written once they
stop. Measured at 3 replicas x 3,000 nodes (0.8 MB keys rewritten every 0.1 s):
reading the others' keys took 10-14% of each replica's CPU during a push's ACKs,
writing its own 15%; at 0.025 (a rewrite every 0.22 s) the replicas' CPU per push
still went from 0.8 to 2.0 s with the number of rewrites a push happened to take."""
READ_RATE = 150e6
"""Bytes of a key's JSON a replica decodes per second (about; this machine: 0.83 MB in
5 ms)."""
NODE_MEMORY = 300.0
"""How long (seconds) the nodes of a replica whose key went away are remembered. Until
they are seen on a replica that is heard from, they are *unknown*: never counted as
having applied anything newer than what their replica last published, so a region
with such a node holds (until `max_hold`: no evidence, never a failure). An Envoy of a
dead replica moves to the next server of its bootstrap within a few seconds and is seen
there; one that is never seen again (it died with its replica) is forgotten after this
long."""


VANISHED_GRACE = 10.0
"""How long (seconds) a node that was listed (on some replica, or as unknown) and is
listed nowhere now stays unknown: an Envoy between replicas (its stream ended: it
reconnects within a few seconds, with back-off), or a node whose frozen replica woke
up and dropped it. Then it is forgotten (an Envoy that went away for good)."""


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
        self.lost_after = self.ttl * 2 / 3 + 0.5
        """No renewal for this long: the store is lost (two renewals missed, and a
        margin for a busy event loop), before the key's lease can run out."""
        self._renewed = time.monotonic()
        self.full = False
        """etcd refused the last rewrite of this replica's key for NOSPACE."""
        self._fragments: dict[int, tuple[tuple[Any, ...], str]] = {}
        """Stream id -> (its route standing, its node's JSON) as last written."""
        self._written_bytes = 0
        """What the last rewrite wrote (`coalesce`)."""
        self._parts_lease = 0
        self._parts_written: list[bytes] = []
        """The node parts (`directory_parts`) last written on `_parts_lease`."""
        self._dirty = asyncio.Event()
        publisher.nodes.subscribe(lambda _status: self._dirty.set())

    def changed(self) -> None:
        """Something this replica publishes changed (leadership): write it soon."""
        self._dirty.set()

    def document(self, with_nodes: bool = True) -> dict[str, Any]:
        doc = {
            "id": self.info.replica_id,
            "regions": list(self.info.regions),
            "xds": self.info.xds_address,
            "admin": self.info.admin_address,
            "started": self.info.started,
            "leader": self.leading,
            "updated": time.time(),
            "heartbeat": self.ttl / 3,
            "beats": True,  # (it beats, and hears others' beats: `_peers_hear_beats`)
        }
        if with_nodes:
            doc["nodes"] = [node_document(n) for n in self.publisher.node_status()]
        return doc

    def _node_fragments(self) -> list[tuple[str, str]]:
        """Each node's (id, JSON), encoded again only when its route standing changed
        since the last rewrite (a push's ACKs rewrite the key several times)."""
        fragments: dict[int, tuple[tuple[Any, ...], str]] = {}
        out = []
        for n in self.publisher.node_status():
            ts = n.types[ROUTE]
            key = (ts.sent_version, ts.sent_at, ts.acked_version, ts.acked_at,
                   ts.nack_version, ts.nack_error, ts.subscribed)  # fmt: skip
            hit = self._fragments.get(n.stream_id)
            text = hit[1] if hit is not None and hit[0] == key else node_json(n)
            fragments[n.stream_id] = (key, text)
            out.append((n.node_id, text))
        self._fragments = fragments
        return out

    async def run(self) -> None:
        """Keep this replica's key until cancelled: a lease renewed every third of its
        TTL, the key rewritten at each renewal (a heartbeat others see: `heard`) and on
        change. Each call gives up after CALL_TIMEOUT and is tried again, on the next
        etcd member when the one dialled went silent, while the lease may last; then
        the store is lost and a new lease is asked for."""
        client = self.store.client
        while True:
            try:
                granted = time.monotonic()
                lease = await client.bounded(
                    lambda: client.lease(self.ttl), self.ttl / 3, "replica lease"
                )
                await self._keep(lease.id, granted)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "cannot keep this replica's key in the store: %s",
                    exc or type(exc).__name__,
                )
                await asyncio.sleep(0.5)  # the store's retry backoff

    async def _keep(self, lease: int, granted: float) -> None:
        """Publish this replica's key on `lease` and keep both, until an error: the
        lease gone, or no answer from any member while the lease may last."""
        client = self.store.client
        beat = self.ttl / 3
        alive = granted + self.ttl  # (the lease cannot outlive this)
        await self._rewrite(lease, alive)
        renew_at = time.monotonic() + beat
        while True:
            await wait_event(self._dirty, max(0.0, renew_at - time.monotonic()))
            if time.monotonic() >= renew_at:
                sent = time.monotonic()
                reply = await renew(client, lease, alive, "replica lease")
                if reply is None or reply.TTL <= 0:
                    raise LookupError("the replica's lease expired")
                alive = sent + self.ttl
                renew_at = time.monotonic() + beat
                if self.full or not self._peers_hear_beats():
                    self._dirty.set()  # the heartbeat: the whole key
                else:
                    await self._write(lambda: self._beat(lease), alive, "replica beat")
            if self._dirty.is_set():
                await self._gather(self.coalesce(beat))
                await self._rewrite(lease, alive)

    async def _gather(self, longest: float) -> None:
        """Let a burst of changes (a push's ACKs) gather: until none came for
        PUBLISH_INTERVAL, or `longest` passed. A big key is so rewritten a few times
        while thousands of nodes ACK, and once just after the last of them."""
        deadline = time.monotonic() + longest
        while (left := deadline - time.monotonic()) > 0:
            self._dirty.clear()
            await asyncio.sleep(min(PUBLISH_INTERVAL, left))  # the burst's quiet check
            if not self._dirty.is_set():
                return
        self._dirty.set()  # (what came during the last interval: written now)

    def coalesce(self, beat: float) -> float:
        """How long to gather changes before the next rewrite: PUBLISH_INTERVAL, or
        longer for a big key, so that reading it costs each replica at most READ_SHARE
        of a core."""
        wait = self._written_bytes / (READ_RATE * READ_SHARE)
        return min(max(PUBLISH_INTERVAL, wait), max(PUBLISH_INTERVAL, beat / 2))

    def _peers_hear_beats(self) -> bool:
        """Whether every other replica hears this one's beat key. A release before beat
        keys hears a replica only when its key is rewritten (and says so by leaving
        `beats` out of its own): while one runs (a rolling upgrade), the heartbeat
        rewrites the whole key, as that release's did."""
        return all(doc.get("beats") is True for doc in self.others().values())

    async def _beat(self, lease: int) -> None:
        """The heartbeat other replicas hear (`store.View.heard`). It used to be a rewrite
        of the whole key: at 3,000 nodes 0.8 MB, written and decoded by every replica
        every third of the lease, nothing in it changed."""
        value = json.dumps({"updated": time.time()}).encode()
        await self.store.client.put(
            self.keys.replica_beat(self.info.replica_id).encode(), value, lease
        )

    async def _rewrite(self, lease: int, alive: float) -> None:
        await self._write(lambda: self._publish(lease), alive, "replica key")

    async def _write(self, write: Callable[[], Awaitable[None]], alive: float, what: str) -> None:
        """Write this replica's key or its beat (while the lease may last). etcd refusing
        it for NOSPACE is not a store lost: the lease was renewed, and while nobody can
        write, what this replica follows is current; so it serves on (its key as it was,
        which the leader's ACK gate takes for silence) and writes the key again at the
        next heartbeat, until etcd has room."""
        client = self.store.client
        try:
            await retrying(client, write, alive, what)
        except Exception as exc:
            if not is_nospace(exc):
                raise
            if not self.full:
                log.warning("etcd refuses this replica's key (NOSPACE): serving on")
            self.full = True
        else:
            if self.full:
                log.info("etcd has room again: this replica's key is current")
            self.full = False
        self._renewed = time.monotonic()

    def store_lost(self) -> str | None:
        """Why this replica must not present itself as current (it has not renewed its
        key for `lost_after` seconds: cut off from the store, so its routes may be
        stale), or None."""
        silent = time.monotonic() - self._renewed
        if silent <= self.lost_after:
            return None
        return f"replica {self.info.replica_id} has not reached the store for {silent:.1f}s"

    async def watch_store(self, interval: float = 0.25) -> None:
        """Until cancelled: tell the xDS server whenever this replica loses the store
        (it answers NOT_SERVING to health checks and ends its streams, so its nodes move
        to a replica that can reach the store) and when it has it again."""
        ads = self.publisher.ads
        while True:
            lost = self.store_lost()
            if (lost is None) != (ads.aside is None):
                if lost:
                    log.warning("%s: stepping aside (NOT_SERVING, streams ended)", lost)
                else:
                    log.info("the store is reachable again: serving xDS as current")
                ads.step_aside(lost)
            await asyncio.sleep(interval)

    async def _publish(self, lease: int) -> None:
        """Write this replica's key, after the node parts that changed, if it has parts
        (`directory_parts`: past about 4,000 nodes)."""
        self._dirty.clear()
        if lease != self._parts_lease:  # parts written on an old lease went with it
            self._parts_lease, self._parts_written = lease, []
        head, parts = directory_parts.encode(
            self.document(with_nodes=False), self._node_fragments(), len(self._parts_written)
        )
        client, rid = self.store.client, self.info.replica_id
        written = self._parts_written + [b""] * (len(parts) - len(self._parts_written))
        changed = [k for k, value in enumerate(parts) if value != written[k]]
        self._written_bytes = len(head) + sum(len(parts[k]) for k in changed)
        await asyncio.gather(
            *(
                client.put(self.keys.replica_nodes(rid, k).encode(), parts[k], lease)
                for k in changed
            )
        )
        self._parts_written = parts
        await client.put(self.keys.replica(rid).encode(), head, lease)

    async def withdraw(self) -> None:
        """Remove this replica's key, then its node parts and its beat (in that order: a
        part or a beat read without its replica is never merged in)."""
        rid = self.info.replica_id
        keys = [self.keys.replica(rid)]
        keys += [self.keys.replica_nodes(rid, k) for k in range(len(self._parts_written))]
        keys.append(self.keys.replica_beat(rid))
        with contextlib.suppress(Exception):
            for key in keys:
                await asyncio.wait_for(self.store.client.delete(key.encode()), 1.0)

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

    @property
    def replica_id(self) -> str:
        return self.info.replica_id

    def region_nodes(self, region: str) -> tuple[list[NodeStatus], dict[str, tuple[str, float]]]:
        """The region's nodes on other replicas (`peer_nodes`): those on replicas heard
        from recently, and the nodes known only from a silent or gone replica."""
        now = time.monotonic()
        heard = [
            PeerDoc(rid, doc, self.store.view.heard.get(rid, (0, now))[1])
            for rid, doc in self.others().items()
        ]
        departed = [
            PeerDoc(rid, doc, gone)
            for rid, (doc, gone) in self.store.view.departed.items()
            if rid != self.info.replica_id
        ]
        return peer_nodes(region, heard, departed)


class Peers(Protocol):
    """Where the leader's ACK gate learns of the nodes connected to other processes:
    the other replicas on etcd (`Directory`), or the other workers of `serve --workers`
    on one state directory (`app.workers.BoardPeers`)."""

    @property
    def replica_id(self) -> str:
        """This process's name among its peers."""
        ...

    def region_nodes(self, region: str) -> tuple[list[NodeStatus], dict[str, tuple[str, float]]]:
        """The region's nodes on the other processes: (those on peers heard from
        recently; node id -> (why it is unknown, since when: wall clock) for those known
        only from a silent or gone peer)."""
        ...


@dataclass(frozen=True)
class PeerDoc:
    """One peer's document (`Directory.document`'s shape) and when it was last heard
    from (a departed peer: when it went away), on the monotonic clock."""

    peer: str
    doc: dict[str, Any]
    at: float
    kind: str = "replica"
    """What the peer is called in a reason ("replica", "worker")."""
    judged_nodes: list[NodeStatus] | None = None
    """The region's judged nodes, when the peer's reader decoded them itself (the
    workers' board); else they come from `doc` (`_judged`)."""

    def judged(self, region: str) -> list[NodeStatus]:
        if self.judged_nodes is not None:
            return self.judged_nodes
        return _judged(self.doc, region, self.peer)


def peer_nodes(
    region: str, heard: Iterable[PeerDoc], departed: Iterable[PeerDoc]
) -> tuple[list[NodeStatus], dict[str, tuple[str, float]]]:
    """The region's nodes on peers: (those on peers heard from recently, as they last
    published them, the newest stream of a node listed twice; node id -> (why it is
    unknown, since when: wall clock), for the nodes known only from a peer that is
    silent (its document not rewritten for two heartbeats and 0.5 s) or departed
    within NODE_MEMORY)."""
    now = time.monotonic()
    wall = time.time() - now  # (monotonic -> wall clock)
    seen: dict[str, NodeStatus] = {}
    unknown: dict[str, tuple[str, float]] = {}
    for p in heard:
        quiet = now - p.at
        beat = p.doc.get("heartbeat")
        silent = isinstance(beat, (int, float)) and quiet > 2 * beat + 0.5
        for n in p.judged(region):
            if silent:
                why = f"{p.kind} {p.peer} silent for {quiet:.1f}s"
                unknown.setdefault(n.node_id, (why, wall + p.at))
            else:
                before = seen.get(n.node_id)
                if before is None or n.connected_since >= before.connected_since:
                    seen[n.node_id] = n  # (a newer stream: the older one is dying)
    for p in departed:
        if now - p.at > NODE_MEMORY:
            continue
        for n in p.judged(region):
            why = f"{p.kind} {p.peer} gone {now - p.at:.1f}s ago"
            unknown.setdefault(n.node_id, (why, wall + p.at))
    return list(seen.values()), {k: v for k, v in unknown.items() if k not in seen}


def _judged(doc: dict[str, Any], region: str, replica: str) -> list[NodeStatus]:
    """A replica document's nodes of `region` whose route ACKs count. Decoded once per
    document (`_JUDGED`): the ACK gate and every admin reply ask again and again, and
    at thousands of nodes the decoding was a quarter of a leader's CPU during a push."""
    listed = doc.get("nodes", [])
    hit = _JUDGED.get((replica, region))
    if hit is not None and hit[0] is listed:
        return hit[1]
    nodes = [node_from_document(n, replica) for n in listed if n.get("region") == region]
    judged = [n for n in nodes if n.judged_on(ROUTE)]
    if len(_JUDGED) > 1_000:  # (replicas x regions; more only with churning replica ids)
        _JUDGED.clear()
    _JUDGED[(replica, region)] = (listed, judged)
    return judged


_JUDGED: dict[tuple[str, str], tuple[list[Any], list[NodeStatus]]] = {}
"""(replica, region) -> (the node list of the replica's document last decoded, its
judged nodes): a document is replaced, never changed, when its replica rewrites it."""


def node_document(n: NodeStatus) -> dict[str, Any]:
    ts = n.types[ROUTE]
    return {
        "id": n.node_id,
        "region": n.region,
        "agent": n.user_agent,
        "since": n.connected_since,
        "routes": {
            "sent": ts.sent_version,
            "sent_at": ts.sent_at,
            "acked": ts.acked_version,
            "acked_at": ts.acked_at,
            "nack": ts.nack_version,
            "error": ts.nack_error,
            "subscribed": ts.subscribed,
        },
    }


def node_json(n: NodeStatus) -> str:
    """`json.dumps(node_document(n))`, the very same text, twice as fast: at 3 x 3,000
    nodes every push re-encodes each node once or twice (sent, then ACKed), and
    `json.dumps` of the nested dict was a fifth of a replica's Python time in the push.
    (Its text fields are `str`, as `NodeStatus` types them; `_encode_ascii` is what
    `json.dumps` does with one.)"""
    ts, text = n.types[ROUTE], _encode_ascii
    return (
        f'{{"id": {text(n.node_id)}, "region": {text(n.region)}, '
        f'"agent": {text(n.user_agent)}, "since": {_number(n.connected_since)}, '
        f'"routes": {{"sent": {text(ts.sent_version)}, "sent_at": {_number(ts.sent_at)}, '
        f'"acked": {text(ts.acked_version)}, "acked_at": {_number(ts.acked_at)}, '
        f'"nack": {text(ts.nack_version)}, "error": {text(ts.nack_error)}, '
        f'"subscribed": {"true" if ts.subscribed else "false"}}}}}'
    )


def _number(value: float | None) -> str:
    if value is None:
        return "null"
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)  # (what json.dumps does with a finite float)
    return json.dumps(value)


def node_from_document(doc: dict[str, Any], replica: str) -> NodeStatus:
    r = doc.get("routes", {})
    status = NodeStatus(
        -1, doc["id"], doc["region"], doc.get("since", 0.0), user_agent=doc.get("agent", "")
    )
    status.listen = f"via {replica}"
    status.types[ROUTE] = TypeStatus(
        sent_version=r.get("sent", ""),
        sent_at=r.get("sent_at"),
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
        directory: Peers,
        live_hosts: Callable[[str, str], int | None] | None = None,
    ) -> None:
        self.publisher = publisher
        self.directory = directory
        """The other processes' nodes: replicas on etcd, or `serve --workers`' workers."""
        self.live_hosts = live_hosts
        self._known: dict[str, dict[str, tuple[float, str]]] = {}
        """Region -> node id -> (when it was last listed anywhere, monotonic; where)."""

    def set_traffic(self, traffic: TrafficState, *, urgent: bool, reason: str) -> None:
        self.publisher.set_traffic(traffic, urgent=urgent, reason=reason)

    def next_version(self, region: str) -> int:
        return self.publisher.next_version(region)

    def routes_applied(self, region: str) -> RouteStatus:
        """Every node of the region on a replica heard from (this one's, then others'),
        and, as unknown, the nodes known only from a silent or gone replica, or listed
        somewhere within VANISHED_GRACE and nowhere now: they hold the region until seen
        applying the routes somewhere (`Pending.unknown`), or the rollout's `max_hold`
        (their clock, `NodeAck.since`, runs from when they went unknown when the routes
        are older)."""
        local = self.publisher.nodes.judged(region, ROUTE)
        local_ids = {n.node_id for n in local}
        seen, silent = self.directory.region_nodes(region)
        remote = [n for n in seen if n.node_id not in local_ids]
        silent = {node: v for node, v in silent.items() if node not in local_ids}
        listed = {n.node_id: self.directory.replica_id for n in local}
        listed.update({n.node_id: n.listen.removeprefix("via ") for n in remote})
        silent.update(self._vanished(region, listed, silent))
        return judge_routes(
            self.publisher.snapshot(region).type_version(ROUTE),
            self.publisher.routes_published(region),
            [*local, *remote],
            tuple(f"{node} ({why})" for node, (why, _) in sorted(silent.items())),
            min((since for _, since in silent.values()), default=None),
        )

    def _vanished(
        self, region: str, listed: dict[str, str], unknown: dict[str, tuple[str, float]]
    ) -> dict[str, tuple[str, float]]:
        """Remember where (`listed`: node id -> replica) each of the region's nodes is
        listed now; return the nodes
        listed within VANISHED_GRACE and nowhere now (a frozen replica that woke up
        without them, a stream that ended), as unknown: (why, since when, wall clock)."""
        now, wall = time.monotonic(), time.time()
        known = self._known.setdefault(region, {})
        for node, where in listed.items():
            known[node] = (now, where)
        for node in unknown:
            known[node] = (now, known.get(node, (now, "a silent replica"))[1])
        out: dict[str, tuple[str, float]] = {}
        for node, (last, where) in list(known.items()):
            if now - last > VANISHED_GRACE:
                del known[node]
            elif last < now:
                why = f"left {where} {now - last:.1f}s ago, not seen since"
                out[node] = (why, wall - (now - last))
        return out

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

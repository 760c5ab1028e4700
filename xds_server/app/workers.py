"""One worker of `serve --workers N`: N processes on one state directory serve the same
xDS port (SO_REUSEPORT: the kernel spreads new connections over them), one decides.

On SQLite the worker holding `controller.lock` decides, and the workers share the board
(`board.py`):

- the leader writes what it serves (spec text, weights, a generation per region) to the
  board before its own push (`BoardDataPlane`, `WorkerSpecSource`); the others read it
  every `FOLLOW_POLL` and serve exactly that, under the same versions (`BoardFollower`);
- every worker writes its nodes' route standing there (`BoardPeers`), which the
  leader's ACK gate counts (`ha.replicas.ClusterDataPlane`, the gate replicas on etcd
  use) and `xdsctl status` lists.

On etcd each worker is a replica like any other (its own key, its nodes, the etcd watch);
only one worker per host campaigns: the holder of `STATE_DIR/workers.lock` (`HostLock`).
Either way the admin API, the dashboard and `/metrics` are bound by the worker that may
decide (SQLite: the leader; etcd: the host lock's holder), so a change sent to the
host's admin address reaches a process that can make it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from xds_server.app.board import VERSION_SCALE, Board, Served
from xds_server.app.follower import Follower
from xds_server.app.specs import SpecTarget, Task
from xds_server.app.supervisor import WorkerId
from xds_server.ha.leader import wait_event
from xds_server.ha.replicas import (
    ClusterDataPlane,
    Directory,
    PeerDoc,
    node_from_document,
    node_json,
    peer_nodes,
)
from xds_server.rollout.ports import StateStore
from xds_server.spec import MeshSpec, SpecError, parse_spec
from xds_server.spec.document import utf8_text
from xds_server.traffic import TrafficState
from xds_server.xds.publisher import XdsPublisher
from xds_server.xds.status import NodeStatus
from xds_server.xds.types import ROUTE

log = logging.getLogger("xds_server.app")

FOLLOW_POLL = 0.02
"""How often a follower looks at the board's served row (one indexed read)."""
BEAT = 1.0
"""A worker's heartbeat on the board; silent after two of them and 0.5 s (a worker that
dies is marked gone at once by its supervisor)."""
NODES_COALESCE = 0.05
"""Node changes within this long are one write of the board."""
SPEC_POLL = 0.2


# ---- SQLite: what is served, from the board ----


class Generations:
    """The routes version of each region (`routes_version` of the publisher): the board's
    served row as this worker last applied it. Before any leader wrote one, the wall
    clock's second before the board was read, times VERSION_SCALE: below the first row's
    (`board._next`: the second after it was written), so every worker takes the first
    row's versions."""

    def __init__(self, served: Served | None, read_at: float) -> None:
        """`read_at`: the wall clock just before `served` was read."""
        self.served = served
        self.before = int(read_at) * VERSION_SCALE

    def version(self, region: str) -> int:
        return self.served.version(region) if self.served is not None else self.before

    def next_version(self, region: str) -> int:
        if self.served is None:
            return 0
        return (self.served.generation(region) + 1) * VERSION_SCALE


class WorkerSpecSource:
    """The spec on SQLite workers: the leader reads the file (every SPEC_POLL, and on
    SIGHUP) and publishes each valid change to the board before serving it; the others
    serve the board's text (`BoardFollower`). A bad edit is logged once and changes
    nothing."""

    def __init__(self, path: Path, served: Served | None, leading: Callable[[], bool]) -> None:
        self.path = path
        self.leading = leading
        self.text = utf8_text(path.read_bytes(), str(path))
        self.current = parse_spec(self.text, str(path))  # SpecError: the one-line usage error
        self._rejected: str | None = None
        if served is not None and served.spec_text != self.text:
            try:
                self.current = parse_spec(served.spec_text, f"{path} (as the leader served it)")
                self.text = served.spec_text
            except SpecError as exc:
                log.warning("the board's spec does not parse here (%s): serving the file", exc)
        self.publish: Callable[[str], None] = lambda text: None
        """Tell the board (set by the leader's data plane)."""

    @property
    def spec(self) -> MeshSpec:
        return self.current

    def follow(self, spec: MeshSpec, text: str) -> None:
        self.current, self.text = spec, text

    def tasks(self, target: SpecTarget) -> list[Task]:
        return [lambda: self._watch(target)]

    async def _watch(self, target: SpecTarget) -> None:
        while True:
            await asyncio.sleep(SPEC_POLL)  # the file's poll period
            if self.leading():
                self.poll(target)

    def reload(self, target: SpecTarget, reason: str) -> None:
        if self.leading():
            self.poll(target, reason, force=True)

    def poll(
        self, target: SpecTarget, reason: str = "spec file changed", force: bool = False
    ) -> None:
        try:
            text = utf8_text(self.path.read_bytes(), str(self.path))
        except (OSError, SpecError) as exc:
            log.error("spec file not read, keeping the last good spec: %s", exc)
            return
        if not force and text in (self.text, self._rejected):
            return  # (unchanged, or a rejected text: logged once)
        try:
            spec = parse_spec(text, str(self.path))
        except SpecError as exc:
            self._rejected = text
            for line in exc.render().splitlines():
                log.error("spec rejected (%s), keeping the last good one: %s", reason, line)
            return
        self._rejected = None
        self.publish(text)
        self.follow(spec, text)
        target.spec_changed(spec, reason)


class BoardFollower(Follower):
    """A worker that does not decide serves the board's row: spec, weights and routes
    versions together (never the store's state under versions of its own)."""

    def __init__(
        self,
        store: StateStore,
        publisher: XdsPublisher,
        board: Board,
        specs: WorkerSpecSource,
        generations: Generations,
    ) -> None:
        super().__init__(lambda: specs.spec, store, publisher, FOLLOW_POLL)
        self.board = board
        self.specs = specs
        self.generations = generations
        self.publisher = publisher
        self._seq = 0

    def refresh(self) -> None:
        served = self.board.served()
        if served is None or served.seq == self._seq:
            return
        self._seq = served.seq
        self.generations.served = served  # (the versions first: the rebuilds read them)
        if served.spec_text != self.specs.text:
            try:
                spec = parse_spec(served.spec_text, f"{self.board.path} (the leader's spec)")
            except SpecError as exc:
                log.error("the leader's spec does not parse here, keeping mine: %s", exc)
                return
            self.specs.follow(spec, served.spec_text)
            self.publisher.apply_spec(spec, "spec from the leader")
        self.publisher.set_traffic(served.traffic, urgent=True, reason="following the leader")
        self.publisher.refresh_versions("following the leader")

    async def watch(self, leading: Callable[[], bool]) -> None:
        """Until cancelled: apply the board's row as soon as it moves (while not leading)."""
        while True:
            if not leading():
                self.try_refresh()
            await asyncio.sleep(FOLLOW_POLL)  # the board's poll period


class BoardDataPlane(ClusterDataPlane):
    """The SQLite leader's `DataPlane`: each change of weights is written to the board
    (a new generation for each region it changes) before its own push; the ACK gate
    counts every worker's nodes (`BoardPeers`)."""

    def __init__(
        self,
        publisher: XdsPublisher,
        peers: BoardPeers,
        specs: WorkerSpecSource,
        generations: Generations,
    ) -> None:
        super().__init__(publisher, peers)
        self.peers = peers
        self.specs = specs
        self.generations = generations
        specs.publish = lambda text: self.publish(text, self.publisher.traffic)

    def publish(self, spec_text: str, traffic: TrafficState) -> None:
        self.generations.served = self.peers.board.publish(
            spec_text, traffic, self.peers.replica_id
        )

    def set_traffic(self, traffic: TrafficState, *, urgent: bool, reason: str) -> None:
        self.publish(self.specs.text, traffic)
        super().set_traffic(traffic, urgent=urgent, reason=reason)

    def next_version(self, region: str) -> int:
        return self.generations.next_version(region) or super().next_version(region)


# ---- SQLite: who serves whom, on the board ----


def _route_key(n: NodeStatus) -> tuple[str, str, str, bool]:
    ts = n.types[ROUTE]
    return ts.sent_version, ts.acked_version, ts.nack_version, ts.subscribed


class NodeTexts:
    """The other workers' judged nodes, each document decoded once: the leader's ACK gate
    and every admin reply ask again and again (a SetWeights reply before the leader's
    own streams are written), and at 5,000 nodes a worker decoding them all took 45% of
    a leader's CPU during a push (py-spy, `push_fanout.py --serve-workers 2`)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], tuple[list[str], dict[str, NodeStatus | None]]] = {}
        """(worker, region) -> (its texts as last read, text -> its node if judged)."""

    def judged(self, worker: str, region: str, texts: list[str]) -> list[NodeStatus]:
        """The judged nodes among `texts` (the worker's documents of `region`)."""
        key = (worker, region)
        before, decoded = self._seen.get(key, (None, {}))
        if texts != before:
            decoded = {t: decoded[t] if t in decoded else _judged_node(t, worker) for t in texts}
            self._seen[key] = (texts, decoded)
        return [n for n in decoded.values() if n is not None]


def _judged_node(text: str, worker: str) -> NodeStatus | None:
    n = node_from_document(json.loads(text), worker)
    return n if n.judged_on(ROUTE) else None


class BoardPeers:
    """This worker's row and its nodes' on the board (rewritten when they change, within
    NODES_COALESCE, and at each BEAT), and the other workers' (the `ha.replicas.Peers`
    of the leader's ACK gate; what `xdsctl status` lists)."""

    def __init__(self, board: Board, me: WorkerId, publisher: XdsPublisher, xds: str) -> None:
        self.board = board
        self.me = me
        self.publisher = publisher
        self.xds = xds
        self.admin = ""
        """The admin address, once this worker binds it."""
        self.leading: Callable[[], bool] = lambda: False
        self.started = time.time()
        self._written: dict[int, tuple[str, str, str, bool]] = {}
        self._dirty: dict[int, NodeStatus] = {}
        self._texts = NodeTexts()
        self._wake = asyncio.Event()
        publisher.nodes.subscribe(self._on_node)
        members = [WorkerId(i, me.count, me.parent).name for i in range(1, me.count + 1)]
        board.join(me.name, self.document(), members)

    @property
    def replica_id(self) -> str:
        return self.me.name

    def _on_node(self, status: NodeStatus) -> None:
        self._dirty[status.stream_id] = status
        self._wake.set()

    def document(self) -> dict[str, Any]:
        return {
            "id": self.me.name,
            "pid": os.getpid(),
            "regions": [],
            "xds": self.xds,
            "admin": self.admin,
            "started": self.started,
            "leader": self.leading(),
            "updated": time.time(),
            "heartbeat": BEAT,
        }

    async def run(self) -> None:
        """Until cancelled: node changes (coalesced) and a heartbeat every BEAT."""
        beat_at = 0.0
        while True:
            await wait_event(self._wake, max(0.0, beat_at - time.monotonic()))
            if self._wake.is_set():
                await asyncio.sleep(NODES_COALESCE)  # a burst of ACKs: one write
            self._wake.clear()
            full = time.monotonic() >= beat_at
            try:
                await self._write(full)
                if full:
                    await asyncio.to_thread(self.board.beat, self.me.name, self.document())
                    beat_at = time.monotonic() + BEAT
            except Exception as exc:  # a busy or failing board: the next beat tries again
                log.warning("cannot write this worker's nodes to the board: %s", exc)
                await asyncio.sleep(BEAT)  # the board's retry backoff

    async def _write(self, full: bool) -> None:
        """Rewrite the streams whose route standing changed (every stream's is compared
        at a beat: a send is not an event), drop the ended ones."""
        registry = self.publisher.nodes
        dirty, self._dirty = self._dirty, {}
        if full:
            dirty = {n.stream_id: n for n in registry.nodes()}
            dirty.update({s: self._gone_marker for s in self._written if s not in dirty})
        changed: list[tuple[int, str, str]] = []
        removed: list[int] = []
        for stream, n in dirty.items():
            if n is self._gone_marker or not registry.connected(n):
                if self._written.pop(stream, None) is not None:
                    removed.append(stream)
                continue
            key = _route_key(n)
            if self._written.get(stream) != key:
                self._written[stream] = key
                changed.append((stream, n.region, node_json(n)))
        if changed or removed:
            await asyncio.to_thread(self.board.write_nodes, self.me.name, changed, removed)

    _gone_marker = NodeStatus(-1, "", "", 0.0)

    def region_nodes(self, region: str) -> tuple[list[NodeStatus], dict[str, tuple[str, float]]]:
        """The other workers' nodes of `region` (`ha.replicas.peer_nodes`): a worker that
        died (its supervisor marked it gone) or missed two beats: its nodes unknown."""
        now, wall = time.monotonic(), time.time()
        heard: list[PeerDoc] = []
        departed: list[PeerDoc] = []
        for row in self.board.workers(region, but=self.me.name):
            judged = self._texts.judged(row.worker, region, row.node_texts)
            if row.gone is not None:
                at = now - (wall - row.gone)
                departed.append(PeerDoc(row.worker, row.doc, at, "worker", judged))
            else:
                at = now - (wall - row.beat)
                heard.append(PeerDoc(row.worker, row.doc, at, "worker", judged))
        return peer_nodes(region, heard, departed)

    # ---- what the admin API lists ----

    def nodes(self, region: str | None) -> list[NodeStatus]:
        """The other running workers' nodes (their route standing)."""
        return [
            node_from_document(n, row.worker)
            for row in self.board.workers(region, but=self.me.name)
            if row.gone is None
            for n in row.nodes
        ]

    def documents(self) -> list[dict[str, Any]]:
        """Every running worker's document, this one's as of now, each with its nodes'
        regions (`xdsctl status`)."""
        mine = {
            **self.document(),
            "nodes": [{"region": n.region} for n in self.publisher.node_status()],
        }
        others = [
            {**row.doc, "nodes": [{"region": n.get("region", "")} for n in row.nodes]}
            for row in self.board.workers(None, but=self.me.name)
            if row.gone is None
        ]
        return sorted([mine, *others], key=lambda d: str(d.get("id", "")))


# ---- etcd: one campaigner per host ----


class EtcdSiblings:
    """What the admin API lists of the other workers of this host on etcd: their nodes,
    from their replica keys (the replicas' listing covers the rest)."""

    def __init__(self, directory: Directory, group: str) -> None:
        self.directory = directory
        self.group = group

    def nodes(self, region: str | None) -> list[NodeStatus]:
        return [
            node_from_document(n, rid)
            for rid, doc in sorted(self.directory.others().items())
            if rid.startswith(self.group)
            for n in doc.get("nodes", [])
            if region is None or n.get("region") == region
        ]

    def documents(self) -> list[dict[str, Any]]:
        return []  # (ListReplicas lists every replica from the directory)


class HostLock:
    """`STATE_DIR/workers.lock`: the worker holding it binds the host's admin, dashboard
    and metrics ports and is the only one of the host that campaigns. The kernel frees
    it when its holder dies; the others try every `interval`."""

    def __init__(self, state_dir: Path, interval: float = 0.25) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "workers.lock"
        self.interval = interval
        self._handle: IO[str] | None = None

    def try_hold(self) -> bool:
        if self._handle is not None:
            return True
        handle = open(self.path, "a")  # noqa: SIM115 (held for the life of the process)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._handle = handle
        return True

    async def hold(self) -> None:
        while not self.try_hold():
            await asyncio.sleep(self.interval)  # the lock's poll period


class Listing(Protocol):
    """The other workers, as the admin API lists them (`app.Running`)."""

    def nodes(self, region: str | None) -> list[NodeStatus]: ...

    def documents(self) -> list[dict[str, Any]]: ...


@dataclass
class WorkerRole:
    """What makes a server one worker of several (`Deployment.worker`)."""

    me: WorkerId
    listing: Listing
    host_lock: HostLock | None = None
    """etcd: the host's lock, held before campaigning; None on SQLite (the controller's
    lock is the host's)."""
    on_ports: list[Callable[[str], None]] = field(default_factory=list)
    """Told the admin address once this worker binds the host's ports."""

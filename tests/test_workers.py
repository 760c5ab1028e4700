"""`xds-server serve --workers 2` (issue 28): two processes share the xDS port
(SO_REUSEPORT), one decides, both serve the same routes under the same versions, and the
leader's ACK gate counts the nodes of both.

Real processes (the supervisor and its workers, as an operator starts them) and real
gRPC xDS clients: simulated ADS nodes that sync as Envoy does (CDS, EDS for the clusters
CDS named, LDS, RDS), each on its own TCP connection, so the kernel spreads them over
the workers. Which worker serves a node is read from the admin API (`xdsctl nodes`: the
other workers' nodes are listed `via worker-N`). Every wait polls.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from tests.support import wait_for
from xds_server.admin.v1 import admin_pb2
from xds_server.admin.v1.admin_pb2_grpc import AdminStub
from xds_server.admin.wire import ACTOR_KEY
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.procs import Process, free_port
from xds_server.xds.resources import ROUTE_CONFIG_NAME
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

CLI = [sys.executable, "-m", "xds_server.cli"]
CTL = [sys.executable, "-m", "xds_server.ctl"]
SERVICE = "recommender"
REGIONS = ("us-east", "eu-west")
REGION = "us-east"
"""Where the simulated nodes run."""


def spec_doc(ack_timeout: str) -> dict[str, Any]:
    """Steps far apart and no Prometheus: nothing moves the rollout but the operator
    and the ACK gate (addresses never contacted)."""
    pools = {
        pool: {"version": version, "endpoints": {r: [f"127.0.0.1:{port}"] for r in REGIONS}}
        for pool, version, port in (
            ("production", "v1", 9201),
            ("baseline", "v1", 9202),
            ("canary", "v2", 9203),
        )
    }
    return {
        "regions": list(REGIONS),
        "listener": {"port": 10000},
        "rollout": {"step_duration": "10m", "max_hold": "10m", "ack_timeout": ack_timeout},
        "services": [{"name": SERVICE, "domains": ["*"], "prefix": "/", "pools": pools}],
    }


# ---- simulated nodes ----


class Node:
    """One simulated node on its own connection: ACKs everything, or (`routes`) answers
    routes with nothing ("quiet") or a NACK ("nack"); reconnects when its stream ends."""

    def __init__(self, port: int, node_id: str, routes: str = "ack") -> None:
        self.port, self.node_id, self.routes = port, node_id, routes
        self.acked_routes = ""
        self.weights: dict[str, int] = {}
        self.streams = 0
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._eds: list[str] = []
        self._last_routes: Any = None
        self._call: Any = None

    async def run(self) -> None:
        while True:
            self.streams += 1
            try:
                await self._stream()
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)  # reconnect backoff, as Envoy's

    async def _stream(self) -> None:
        # Its own TCP connection (by default channels share one): the kernel picks a
        # worker per connection.
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=options) as ch:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch)
            self._queue = asyncio.Queue()
            self._eds = []
            first = discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
            first.node.CopyFrom(
                base_pb2.Node(id=self.node_id, locality=base_pb2.Locality(region=REGION))
            )
            for req in (
                first,
                discovery_pb2.DiscoveryRequest(type_url=LISTENER),
                discovery_pb2.DiscoveryRequest(type_url=ROUTE, resource_names=[ROUTE_CONFIG_NAME]),
            ):
                self._queue.put_nowait(req)
            self._call = stub.StreamAggregatedResources(self._requests())
            async for resp in self._call:
                self._answer(resp)

    def nack_now(self) -> None:
        """NACK the routes last received (a "quiet" node that turns bad)."""
        self.routes = "nack"
        if self._last_routes is not None:
            self._route(self._last_routes)

    async def _requests(self) -> AsyncIterator[Any]:
        queue = self._queue
        while True:
            yield await queue.get()

    def _request(self, resp: Any, names: list[str], **kw: Any) -> Any:
        return discovery_pb2.DiscoveryRequest(
            type_url=resp.type_url, response_nonce=resp.nonce, resource_names=names, **kw
        )

    def _answer(self, resp: Any) -> None:
        put = self._queue.put_nowait
        if resp.type_url == ROUTE:
            self._last_routes = resp
            self._route(resp)
        elif resp.type_url == CLUSTER:
            put(self._request(resp, [], version_info=resp.version_info))
            names = []
            for any_msg in resp.resources:
                c = cluster_pb2.Cluster()
                any_msg.Unpack(c)
                names.append(c.name)
            if sorted(names) != self._eds:
                self._eds = sorted(names)
                put(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=self._eds))
        elif resp.type_url == ENDPOINT:
            put(self._request(resp, self._eds, version_info=resp.version_info))
        else:
            put(self._request(resp, [], version_info=resp.version_info))

    def _route(self, resp: Any) -> None:
        names = [ROUTE_CONFIG_NAME]
        if self.routes == "quiet":
            return
        if self.routes == "nack":
            error = status_pb2.Status(code=3, message="routes rejected by this test node")
            self._queue.put_nowait(
                self._request(resp, names, version_info=self.acked_routes, error_detail=error)
            )
            return
        self.weights = route_weights(resp)
        self.acked_routes = resp.version_info
        self._queue.put_nowait(self._request(resp, names, version_info=resp.version_info))


def route_weights(resp: Any) -> dict[str, int]:
    """The service's pools and their weights in a routes response."""
    out: dict[str, int] = {}
    for any_msg in resp.resources:
        rc = route_pb2.RouteConfiguration()
        any_msg.Unpack(rc)
        for vhost in rc.virtual_hosts:
            for route in vhost.routes:
                for wc in route.route.weighted_clusters.clusters:
                    if wc.name.startswith(f"{SERVICE}|") and wc.weight:
                        out[wc.name.partition("|")[2]] = wc.weight.value
    return out


class Fleet:
    """Simulated nodes on an event loop of their own (a thread), while the test polls."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.nodes: dict[str, Node] = {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def add(self, node_id: str, routes: str = "ack") -> Node:
        node = self.nodes[node_id] = Node(self.port, node_id, routes)
        self._tasks[node_id] = asyncio.run_coroutine_threadsafe(
            self._spawn(node), self.loop
        ).result()
        return node

    def stop(self, node_id: str) -> None:
        """The node goes away (its stream ends)."""
        del self.nodes[node_id]
        self.loop.call_soon_threadsafe(self._tasks.pop(node_id).cancel)

    async def _spawn(self, node: Node) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(node.run())

    def call(self, fn: Any) -> None:
        self.loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        if not self.loop.is_running():
            return

        async def cancel() -> None:
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


# ---- the server ----


@dataclass
class Workers:
    """`xds-server serve --workers 2` and its ports."""

    process: Process
    xds_port: int
    admin_port: int
    fleet: Fleet = field(init=False)
    _admin: AdminStub | None = None

    def __post_init__(self) -> None:
        self.fleet = Fleet(self.xds_port)

    @property
    def admin(self) -> AdminStub:
        if self._admin is None:
            channel = grpc.insecure_channel(f"127.0.0.1:{self.admin_port}")
            self._admin = AdminStub(channel)
        return self._admin

    def replicas(self) -> list[admin_pb2.Replica]:
        try:
            listed = self.admin.ListReplicas(admin_pb2.ListReplicasRequest(), timeout=2)
            return list(listed.replicas)
        except grpc.RpcError:  # (not up yet)
            return []

    def leader(self) -> str:
        return next(r.id for r in self.replicas() if r.leader)

    def where(self) -> dict[str, str]:
        """Node id -> the worker serving its stream (what `xdsctl nodes` lists: the other
        workers' nodes `via worker-N`)."""
        leader = self.leader()
        nodes = self.admin.ListNodes(admin_pb2.ListNodesRequest(), timeout=5).nodes
        return {
            n.id: n.listen.removeprefix("via ") if n.listen.startswith("via ") else leader
            for n in nodes
        }

    def rollout(self) -> admin_pb2.Rollout:
        return self.admin.GetRollout(admin_pb2.GetRolloutRequest(service=SERVICE), timeout=5)

    def set_weights(self, canary: float, baseline: float = 0) -> None:
        request = admin_pb2.SetWeightsRequest(
            service=SERVICE, canary_percent=canary, baseline_percent=baseline, reason="test"
        )
        self.admin.SetWeights(request, timeout=5, metadata=((ACTOR_KEY, "test"),))

    def children(self) -> dict[str, int]:
        """Worker name -> pid, from the supervisor's children."""
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        out = {}
        for pid in path.read_text().split():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            for var in env:
                if var.startswith(b"XDS_SERVER_WORKER="):
                    out[f"worker-{var.split(b'=')[1].split(b'/')[0].decode()}"] = int(pid)
        return out

    def stop(self) -> int | None:
        self.fleet.close()
        return self.process.stop(15)


def start_workers(
    started: list[Workers], tmp: Path, ack_timeout: str = "30s", *store: str
) -> Workers:
    spec = tmp / "mesh.yaml"
    spec.write_text(yaml.safe_dump(spec_doc(ack_timeout), sort_keys=False))
    xds_port, admin_port = free_port(), free_port()
    argv = [*CLI, "serve", "--workers", "2", "--spec", str(spec),
            "--xds-address", f"127.0.0.1:{xds_port}",
            "--admin-address", f"127.0.0.1:{admin_port}",
            "--metrics-address", "127.0.0.1:0", "--ui-address", "",
            "--state-dir", str(tmp / "state"),
            "--prometheus-url", f"http://127.0.0.1:{free_port()}", *store]  # fmt: skip
    w = Workers(Process("workers", argv, tmp / "workers.log"), xds_port, admin_port)
    started.append(w)  # (stopped by the fixture whatever happens next)
    wait_for(lambda: len(w.replicas()) == 2, "both workers listed by `xdsctl status`", timeout=60)
    return w


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Workers]]:
    started: list[Workers] = []
    try:
        yield started
    finally:
        for w in started:
            w.stop()


def spread(w: Workers, per_worker: int, prefix: str = "node") -> dict[str, str]:
    """Connect nodes until each worker serves `per_worker` of them (or more); node id
    -> its worker."""
    for i in range(40):
        w.fleet.add(f"{prefix}-{i}")
        if i + 1 < 2 * per_worker:
            continue

        def listed(n: int = i + 1) -> dict[str, str] | None:
            got = w.where()
            return got if len(got) == n else None

        where = wait_for(listed, "every node listed", timeout=10)
        counts = [list(where.values()).count(x) for x in set(where.values())]
        if len(counts) == 2 and min(counts) >= per_worker:
            return where
    raise AssertionError(f"40 connections, not {per_worker} on each worker: {w.where()}")


def synced(w: Workers, nodes: dict[str, str]) -> dict[str, tuple[str, dict[str, int]]]:
    """Node id -> (routes version it ACKed, the weights they carry)."""
    return {n: (w.fleet.nodes[n].acked_routes, w.fleet.nodes[n].weights) for n in nodes}


def signals(w: Workers) -> admin_pb2.SignalHealth:
    return next(r.signals for r in w.rollout().regions if r.region == REGION)


def rolled_back_by_a_nack_on_a_follower(w: Workers) -> None:
    """A node that takes the routes and answers nothing, moved until it is on a worker
    that does not decide; then it NACKs them: the leader's gate sees it there and rolls
    the rollout back, as one process would."""
    leader = w.leader()
    for attempt in range(30):
        bad = w.fleet.add(f"bad-{attempt}", routes="quiet")
        at = wait_for(lambda: w.where().get(bad.node_id), "the quiet node listed", timeout=10)  # noqa: B023
        if at != leader:
            break
        w.fleet.stop(bad.node_id)  # (it holds nothing: a NACK decides before any timeout)
    else:
        raise AssertionError("30 connections, all to the leader")
    w.fleet.call(bad.nack_now)

    def rolled_back() -> admin_pb2.Rollout | None:
        r = w.rollout()
        return r if r.phase == "rolled_back" else None

    state = wait_for(rolled_back, "the rollback", timeout=15)
    assert bad.node_id in state.reason and "rejected routes" in state.reason, state.reason


def test_workers_share_the_port_and_serve_one_decision(
    tmp_path: Path, workers: list[Workers]
) -> None:
    w = start_workers(workers, tmp_path)
    nodes = spread(w, per_worker=2)

    # Both workers serve the leader's step under one version, and the leader's gate
    # counts every node, on whichever worker it is.
    def one_version() -> set[tuple[str, str]] | None:
        got = synced(w, nodes)
        versions = {(v, json.dumps(wt, sort_keys=True)) for v, wt in got.values()}
        return versions if len(versions) == 1 and "" not in {v for v, _ in versions} else None

    (first,) = wait_for(one_version, "every node on the step's routes", timeout=10)
    # `xdsctl status` lists every node and, per worker, how many it serves.
    res = subprocess.run(
        [*CTL, "--server", f"127.0.0.1:{w.admin_port}", "--output", "json", "status"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    status = json.loads(res.stdout)
    listed = sum(sum(by_sync.values()) for by_sync in status["nodes"].values())
    assert listed == len(nodes), status["nodes"]
    per_worker = {r["id"]: r["nodes"] for r in status["replicas"]}
    assert per_worker == {x: list(nodes.values()).count(x) for x in per_worker}, per_worker
    assert json.loads(first[1]).get("canary", 0) > 0, first
    wait_for(lambda: signals(w).nodes_applied == len(nodes), "the gate counts all", timeout=10)

    # A weight change reaches every node, on both workers, with the same version.
    w.set_weights(30, 10)
    want = {"production": 6000, "baseline": 1000, "canary": 3000}
    (after,) = wait_for(
        lambda: (v := one_version()) and json.loads(next(iter(v))[1]) == want and v,
        "every node at canary 30%",
        timeout=10,
    )
    assert after[0] != first[0], (first, after)

    # A worker killed loses its streams only: they reconnect, to the survivor or to the
    # worker the supervisor starts again, and get the same routes under the same version.
    pids = w.children()
    leader = w.leader()
    victim = "worker-1" if leader == "worker-2" else "worker-2"
    moved = [n for n, at in nodes.items() if at == victim]
    streams = {n: w.fleet.nodes[n].streams for n in moved}
    os.kill(pids[victim], signal.SIGKILL)
    wait_for(
        lambda: w.children().get(victim, pids[victim]) != pids[victim],
        f"the supervisor restarting {victim}",
        timeout=10,
    )
    wait_for(
        lambda: all(w.fleet.nodes[n].streams > streams[n] for n in moved),
        "the killed worker's nodes reconnecting",
        timeout=10,
    )
    wait_for(lambda: len(w.where()) == len(nodes), "every node listed again", timeout=10)
    assert one_version() == {after}, synced(w, nodes)
    assert w.children()[leader] == pids[leader], "the leader was not restarted"
    wait_for(lambda: len(w.replicas()) == 2, "both workers listed again", timeout=60)

    # The rollout resumed (on the weights set by hand); a node on the worker that does
    # not decide NACKs them.
    w.admin.ResumeRollout(
        admin_pb2.RolloutActionRequest(service=SERVICE, reason="test"),
        timeout=5,
        metadata=((ACTOR_KEY, "test"),),
    )
    rolled_back_by_a_nack_on_a_follower(w)
    assert w.stop() == 0, w.process.tail()


def test_workers_on_etcd_are_replicas_of_one_leader(
    tmp_path: Path, workers: list[Workers], shared_etcd: EtcdCluster
) -> None:
    w = start_workers(workers, tmp_path, "30s", "--store", shared_etcd.url, "--store-prefix", "/w")
    ids = sorted(r.id for r in w.replicas())
    assert len(ids) == 2 and all(i.rsplit(".w", 1)[1] in ("1", "2") for i in ids), ids
    nodes = spread(w, per_worker=1)
    w.set_weights(40)
    want = {"production": 6000, "canary": 4000}

    def same() -> bool:
        got = synced(w, nodes)
        return len({v for v, _ in got.values()}) == 1 and all(wt == want for _, wt in got.values())

    wait_for(same, "every node at canary 40%, one version", timeout=10)
    assert w.stop() == 0, w.process.tail()


def test_the_board_gives_a_region_a_new_version_only_when_what_it_serves_changes(
    tmp_path: Path,
) -> None:
    """The rule every worker's versions follow (`app/board.py`): a region's generation
    moves with its weights, every region's with the spec's text, never otherwise."""
    from xds_server.app.board import VERSION_SCALE, Board
    from xds_server.traffic import Split, TrafficState

    board = Board.in_dir(tmp_path)
    assert board.served() is None
    quiet = TrafficState()
    first = board.publish("spec 1", quiet, "worker-1")
    assert first.version("us-east") == first.version("eu-west") == first.base * VERSION_SCALE
    assert board.publish("spec 1", quiet, "worker-1") == first  # (nothing written)

    canary = quiet.with_split(SERVICE, ["us-east"], Split.from_percent({"canary": 20}))
    second = board.publish("spec 1", canary, "worker-1")
    assert second.generation("us-east") == first.generation("us-east") + 1
    assert second.generation("eu-west") == first.generation("eu-west")
    back = board.publish("spec 1", quiet, "worker-1")  # (the same weights as the first row:
    assert back.generation("us-east") == second.generation("us-east") + 1  # a new version)

    third = board.publish("spec 2", quiet, "worker-2")
    top = max(back.generation(r) for r in REGIONS)
    assert all(third.generation(r) == top + 1 for r in (*REGIONS, "ap-south"))
    # Another worker reads the same row: spec, weights and versions together.
    other = Board.in_dir(tmp_path).served()
    assert other is not None
    assert (other.seq, other.spec_text, other.traffic) == (third.seq, "spec 2", quiet)
    assert other.version("us-east") == third.version("us-east")


def test_the_leader_reads_other_workers_nodes_from_the_board_decoding_each_change_once(
    tmp_path: Path,
) -> None:
    """The ACK gate asks for the other workers' nodes at every look and in every admin
    reply: a node whose document did not change is the same object as last time, a
    changed one is read anew, a node the gate does not judge (a gRPC client that never
    subscribed to routes) is left out, and a node that left is gone."""
    import json

    from xds_server.app.board import Board
    from xds_server.app.workers import NodeTexts
    from xds_server.ha.replicas import node_document
    from xds_server.xds.status import NodeStatus
    from xds_server.xds.types import ROUTE

    def doc(i: int, acked: str = "", subscribed: bool = True) -> str:
        n = NodeStatus(i, f"node-{i}", "us-east", 100.0 + i, user_agent="gRPC C-core linux")
        n.types[ROUTE].sent_version, n.types[ROUTE].acked_version = "7000", acked
        n.types[ROUTE].subscribed = subscribed
        return json.dumps(node_document(n))

    board = Board.in_dir(tmp_path)
    board.join("w2", {"id": "w2"}, ["w1", "w2"])
    board.write_nodes("w2", [(i, "us-east", doc(i)) for i in range(3)], [])
    board.write_nodes("w2", [(9, "eu-west", doc(9)), (8, "us-east", doc(8, subscribed=False))], [])
    texts = NodeTexts()

    def judged() -> dict[str, NodeStatus]:
        (row,) = board.workers("us-east", but="w1")
        return {n.node_id: n for n in texts.judged(row.worker, "us-east", row.node_texts)}

    first = judged()
    assert sorted(first) == ["node-0", "node-1", "node-2"]
    assert all(n.listen == "via w2" for n in first.values())
    again = judged()
    assert all(again[k] is first[k] for k in first)

    board.write_nodes("w2", [(1, "us-east", doc(1, acked="7000"))], [2])
    after = judged()
    assert sorted(after) == ["node-0", "node-1"]
    assert after["node-0"] is first["node-0"]
    assert after["node-1"].types[ROUTE].acked_version == "7000"
    assert first["node-1"].types[ROUTE].acked_version == ""

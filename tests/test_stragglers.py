"""Stragglers and quorum (issue 28): one broken proxy does not decide for a fleet.

A real publisher serves ADS over loopback to simulated nodes (grpc.aio streams that
sync as Envoy does: CDS, EDS for the clusters CDS named, LDS, RDS), one region of them;
the real controller drives a rollout over it, with the SQLite store and the scripted
metric source of tests/test_controller.py (every pool healthy). The controller's clock
is the wall clock plus a skew the test moves on, so steps pass without sleeping while
every send and ACK keeps its real time; every wait polls (`wait_for_async`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry

from tests.support import wait_for, wait_for_async
from tests.test_controller import ScriptedMetricSource
from xds_server.admin.v1 import admin_pb2
from xds_server.ctl_output import Status
from xds_server.rollout.controller import RolloutController
from xds_server.rollout.decision import EntryKind
from xds_server.rollout.exported import RolloutMetrics
from xds_server.rollout.metrics import PrometheusSource
from xds_server.rollout.ports import Committed
from xds_server.rollout.state import PROMOTED, ROLLED_BACK, RolloutState
from xds_server.rollout.store import Store
from xds_server.spec import MeshSpec, validate_spec
from xds_server.spec.model import SpecError
from xds_server.xds.acks import ack_gate, quorum_of
from xds_server.xds.dataplane import Applied, NodeAck, Pending
from xds_server.xds.publisher import XdsPublisher
from xds_server.xds.resources import ROUTE_CONFIG_NAME
from xds_server.xds.status import NodeRegistry
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

REGION = "us-east"
SERVICE = "recommender"
FLEET = 20
ACK_TIMEOUT = 3.0
PLAN: dict[str, Any] = {
    "steps": [50, 100],
    "step_duration": "5s",
    "interval": "1s",
    "window": "2s",
    "ack_timeout": f"{ACK_TIMEOUT:g}s",
    "max_hold": "30s",
}


def make_spec(**rollout: Any) -> MeshSpec:
    """One region; `recommender` with production, baseline and canary pools (addresses
    never contacted)."""
    pools = {
        pool: {"version": version, "endpoints": {REGION: [f"127.0.0.1:{port}"]}}
        for pool, version, port in (
            ("production", "v1", 9201),
            ("baseline", "v1", 9202),
            ("canary", "v2", 9203),
        )
    }
    return validate_spec(
        {
            "regions": [REGION],
            "listener": {"port": 10000},
            "rollout": {**PLAN, **rollout},
            "services": [{"name": SERVICE, "domains": ["*"], "prefix": "/", "pools": pools}],
        }
    )


class Node:
    """One simulated node: syncs as Envoy does and ACKs everything, except that its
    routes may be never ACKed ("never"), NACKed ("nack"), or ACKed once released
    ("hold": `release`)."""

    def __init__(self, port: int, node_id: str, routes: str = "ack") -> None:
        self.port, self.node_id, self.routes = port, node_id, routes
        self.release = asyncio.Event()
        self.routes_seen = 0
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._eds: list[str] = []
        self._acked_routes = ""

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
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
            call = stub.StreamAggregatedResources(self._requests())
            async for resp in call:
                self._answer(resp)

    async def _requests(self) -> AsyncIterator[Any]:
        while True:
            yield await self._queue.get()

    def _request(self, resp: Any, names: list[str], **kw: Any) -> Any:
        return discovery_pb2.DiscoveryRequest(
            type_url=resp.type_url, response_nonce=resp.nonce, resource_names=names, **kw
        )

    def _answer(self, resp: Any) -> None:
        put = self._queue.put_nowait
        if resp.type_url == ROUTE:
            self.routes_seen += 1
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
        if self.routes == "never":
            return
        if self.routes == "nack":
            error = status_pb2.Status(code=3, message="route rejected by this test node")
            self._queue.put_nowait(
                self._request(resp, names, version_info=self._acked_routes, error_detail=error)
            )
            return
        ack = self._request(resp, names, version_info=resp.version_info)
        if self.routes == "hold" and not self.release.is_set():

            async def later() -> None:
                await self.release.wait()
                self._queue.put_nowait(ack)

            asyncio.get_running_loop().create_task(later())
            return
        self._acked_routes = resp.version_info
        self._queue.put_nowait(ack)


class Recorder(ScriptedMetricSource):
    """The scripted source (every pool healthy), also a `NodeFilter`: what the analysis
    was told to leave out, per region."""

    def __init__(self) -> None:
        super().__init__()
        self.excluded: dict[str, set[str]] = {}
        self.ever_excluded: set[str] = set()

    def exclude_nodes(self, region: str, nodes: Collection[str]) -> None:
        self.excluded[region] = set(nodes)
        self.ever_excluded |= set(nodes)


class Seen:
    """A sink beside the controller: after each commit, the region's `xds_stragglers`
    (the real `RolloutMetrics`) and the stragglers the admin API would show."""

    def __init__(self, controller: RolloutController) -> None:
        self.registry = CollectorRegistry()
        self.metrics = RolloutMetrics(self.registry)
        self.controller = controller
        self.gauge: list[float | None] = []
        self.named: set[str] = set()

    def follow(self, event: Committed) -> None:
        self.metrics.follow(event)
        labels = {"service": SERVICE, "region": REGION}
        self.gauge.append(self.registry.get_sample_value("xds_stragglers", labels))
        self.named |= set(self.controller.observer.stragglers(SERVICE, REGION))


class Rig:
    """A publisher on loopback, its nodes, and a controller over it."""

    def __init__(self, tmp: Path, spec: MeshSpec) -> None:
        self.spec = spec
        self.skew = 0.0
        self.publisher = XdsPublisher(spec, clock=self.clock)
        self.store = Store.in_dir(tmp)
        self.metrics = Recorder()
        self.controller = RolloutController(
            lambda: self.spec, self.publisher, self.store, self.metrics, clock=self.clock
        )
        self.nodes: list[Node] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.seen = Seen(self.controller)
        self.controller.subscribe(self.seen)

    def clock(self) -> float:
        """The wall clock, `skew` ahead: the controller's and the publisher's."""
        return time.time() + self.skew

    async def start(self, fleet: dict[str, str]) -> None:
        """Serve, connect `fleet` (node id -> how it treats routes), wait until every
        node that ACKs routes has, then start the rollout."""
        port = await self.publisher.start("127.0.0.1:0")
        for node_id, routes in fleet.items():
            self.connect(port, node_id, routes)
        await self.settled()
        self.controller.restore()
        await self.controller.reconcile()

    def connect(self, port: int, node_id: str, routes: str = "ack") -> Node:
        node = Node(port, node_id, routes)
        self.nodes.append(node)
        self._tasks.append(asyncio.get_running_loop().create_task(node.run()))
        return node

    def acked(self) -> int:
        """Nodes that ACKed the region's current routes."""
        version = self.publisher.snapshot(REGION).type_version(ROUTE)
        return sum(
            n.types[ROUTE].acked_version == version for n in self.publisher.nodes.nodes(REGION)
        )

    async def settled(self) -> None:
        """Every node that ACKs routes right away has ACKed the current ones."""
        want = sum(n.routes == "ack" for n in self.nodes)
        await wait_for_async(lambda: self.acked() >= want, f"{want} nodes to ACK the routes")

    def state(self) -> RolloutState:
        return self.controller.rollouts[SERVICE]

    async def tick(self, seconds: float = 1.0) -> None:
        """One interval later (the controller's clock), once the nodes have settled."""
        await self.settled()
        self.skew += seconds
        await self.controller.tick(SERVICE)

    async def tick_until(self, done: Callable[[], bool], limit: int = 30) -> None:
        for _ in range(limit):
            if done():
                return
            await self.tick()
        raise AssertionError(f"not done after {limit} ticks: {self.state()}")

    def checks(self) -> list[str]:
        return [e.reason for e in self.store.audit(SERVICE) if e.kind == EntryKind.CHECK]

    def rollback_reason(self) -> str:
        return next(
            e.reason for e in self.store.audit(SERVICE) if e.phase_to == ROLLED_BACK and e.region
        )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.publisher.stop(0)


@pytest.fixture
def rig_for(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(**rollout: Any) -> Rig:
        made.append(Rig(tmp_path / f"state{len(made)}", make_spec(**rollout)))
        return made[-1]

    yield make
    for rig in made:
        rig.store.close()


def fleet(**odd: str) -> dict[str, str]:
    """FLEET node ids of the region, ACKing everything but those named in `odd`."""
    ids = [f"{REGION}-envoy-{i}" for i in range(1, FLEET + 1)]
    return {i: odd.get(i.replace("-", "_"), "ack") for i in ids}


def run(rig: Rig, body: Callable[[], Any]) -> None:
    async def main() -> None:
        try:
            await body()
        finally:
            await rig.close()

    asyncio.run(main())


# ---- the tests ----


def test_quorum_lets_a_rollout_promote_past_a_node_that_never_acks(
    rig_for: Callable[..., Rig],
) -> None:
    """20 nodes, one never ACKs routes, quorum 0.9: each step counts as applied at the
    18th ACK, the silent node is named a straggler in the audit once past its
    ack_timeout, its traffic is left out of the analysis, and the rollout promotes."""
    rig = rig_for(ack_quorum=0.9)
    straggler = f"{REGION}-envoy-20"

    async def body() -> None:
        await rig.start(fleet(us_east_envoy_20="never"))
        await rig.tick_until(lambda: rig.state().phase == PROMOTED)

    run(rig, body)
    notes = [c for c in rig.checks() if "stragglers" in c]
    assert notes and straggler in notes[0] and "no ACK within 3s of its send" in notes[0], notes
    assert rig.metrics.ever_excluded == {straggler}
    assert 1.0 in rig.seen.gauge and rig.seen.gauge[-1] == 0.0, rig.seen.gauge
    assert {n.partition(" (")[0] for n in rig.seen.named} == {straggler}
    stored = rig.store.rollout(SERVICE, "v2")
    assert stored is not None and stored.phase == PROMOTED


def test_full_quorum_rolls_back_on_a_node_that_never_acks(rig_for: Callable[..., Rig]) -> None:
    """The same fleet at quorum 1.0 (the default): today's rollback after ack_timeout."""
    rig = rig_for()

    async def body() -> None:
        await rig.start(fleet(us_east_envoy_20="never"))
        await rig.tick_until(lambda: rig.state().phase == ROLLED_BACK)

    run(rig, body)
    why = rig.rollback_reason()
    assert "no ACK of routes" in why and f"{REGION}-envoy-20" in why, why


def test_a_node_joining_late_in_a_step_gets_its_own_ack_timeout(
    rig_for: Callable[..., Rig],
) -> None:
    """Every node must ACK (quorum 1.0). Well into a step (past ack_timeout since its
    routes were published) a node connects and ACKs them a moment later, within
    ack_timeout of its own send: the step holds while it is pending, never rolls back,
    and the rollout promotes. (The bug: its ACK was counted from the publish, so the
    region rolled back as soon as the controller looked.)"""
    rig = rig_for(step_duration="10s")

    async def body() -> None:
        await rig.start(fleet())
        await rig.tick_until(lambda: rig.state().regions[REGION].step_started is not None)
        await rig.tick(ACK_TIMEOUT + 1)  # (the step's routes are older than ack_timeout)
        port = rig.publisher.port
        late = rig.connect(port, f"{REGION}-envoy-late", routes="hold")
        await wait_for_async(lambda: late.routes_seen > 0, "the late node to be sent routes")
        await rig.controller.tick(SERVICE)  # a look while it has not ACKed yet
        assert rig.state().phase != ROLLED_BACK, rig.rollback_reason()
        late.release.set()
        late.routes = "ack"
        await rig.tick_until(lambda: rig.state().phase == PROMOTED)

    run(rig, body)


def test_one_nack_is_a_straggler_within_nack_tolerance(rig_for: Callable[..., Rig]) -> None:
    """nack_tolerance 1 (quorum 0.9): a node NACKing every step's routes keeps its last
    good config and is a straggler; the rollout promotes."""
    rig = rig_for(ack_quorum=0.9, nack_tolerance=1)
    nacker = f"{REGION}-envoy-7"

    async def body() -> None:
        await rig.start(fleet(us_east_envoy_7="nack"))
        await rig.tick_until(lambda: rig.state().phase == PROMOTED)

    run(rig, body)
    notes = [c for c in rig.checks() if "stragglers" in c]
    assert notes and nacker in notes[0] and "rejected routes" in notes[0], notes


def test_two_nacks_beyond_the_tolerance_roll_back(rig_for: Callable[..., Rig]) -> None:
    """nack_tolerance 1: a second NACKing node rolls the rollout back, naming a NACK."""
    rig = rig_for(ack_quorum=0.9, nack_tolerance=1)

    async def body() -> None:
        await rig.start(fleet(us_east_envoy_7="nack", us_east_envoy_8="nack"))
        await rig.tick_until(lambda: rig.state().phase == ROLLED_BACK)

    run(rig, body)
    why = rig.rollback_reason()
    assert "rejected routes" in why and "1 more NACKing, 1 tolerated" in why, why


# ---- the gate itself, on hand-made standings ----


def test_quorum_counts_whole_nodes() -> None:
    assert [quorum_of(n, 0.9) for n in (1, 10, 20, 21)] == [1, 9, 18, 19]
    assert quorum_of(0, 0.9) == 0 and quorum_of(3, 1.0) == 3


def test_the_gate_starts_the_step_at_the_quorum_ack_and_names_stragglers() -> None:
    times = tuple(100.0 + i for i in range(9))
    status = Pending(
        "v", 100.0, ("n9",), applied=9, acked_times=times, holdouts=(NodeAck("n9", 100.0),)
    )
    early = ack_gate(status, 0.9, 0, ACK_TIMEOUT, 102.0)
    assert early.applied_at == 108.0 and early.stragglers == () and early.excluded == ("n9",)
    late = ack_gate(status, 0.9, 0, ACK_TIMEOUT, 104.0)
    assert late.applied_at == 108.0 and late.stragglers == ("n9 (no ACK within 3s of its send)",)
    full = ack_gate(status, 1.0, 0, ACK_TIMEOUT, 104.0)
    assert full.applied_at is None and full.error is not None and "n9" in full.error
    rejoined = Applied("v", 109.0, 10, (*times, 109.0))
    assert ack_gate(rejoined, 0.9, 0, ACK_TIMEOUT, 110.0).stragglers == ()


def test_xdsctl_status_lists_the_stragglers() -> None:
    """`xdsctl status` names each straggler with its region and why (table and JSON)."""
    nodes = [
        admin_pb2.Node(id="us-east-envoy-1", region=REGION, sync_state="SYNCED"),
        admin_pb2.Node(
            id="us-east-envoy-20",
            region=REGION,
            sync_state="STALE",
            straggler="recommender: no ACK within 3s of its send",
        ),
    ]
    status = Status(
        "127.0.0.1:1",
        nodes,
        admin_pb2.ListRolloutsResponse(),
        admin_pb2.GetIstioApplyStatusResponse(),
        None,
    )
    table = status.table()
    assert "STRAGGLER" in table and "us-east-envoy-20" in table and "within 3s" in table
    assert status.document()["stragglers"] == [
        {
            "node": "us-east-envoy-20",
            "region": REGION,
            "why": "recommender: no ACK within 3s of its send",
        }
    ]


def test_the_analysis_leaves_excluded_nodes_series_out_by_their_node_label() -> None:
    """Every `region="R"` matcher of a query gets `node!~"..."` for R's excluded nodes
    (each id a regex literal), and no other region's (not one whose name R begins);
    an empty set puts every node back."""
    source = PrometheusSource("http://127.0.0.1:1")
    source.exclude_nodes(REGION, ["us-east-envoy-20", "odd.node"])
    query = 'sum(x{region="us-east",a="b"}) + sum(x{region="us-east-2"}) and up{region="us-east"}'
    scoped = source.scoped(query)
    matcher = 'node!~"odd\\\\.node|us-east-envoy-20"'
    assert scoped.count(matcher) == 2 and 'x{region="us-east-2"}' in scoped, scoped
    source.exclude_nodes(REGION, ())
    assert source.scoped(query) == query


def test_a_real_prometheus_reads_without_the_excluded_nodes(tmp_path: Path) -> None:
    """Two Envoy-like targets of one region, scraped by a real Prometheus with `region`
    and `node` target labels (as the lab scrapes Envoys): the pool's hosts read 1 + 100
    with every node, 1 once node b (a straggler) is excluded, 101 again once it rejoins."""
    from xds_server.lab.procs import free_port
    from xds_server.lab.prometheus import Prometheus, ScrapeTarget

    hosts = {"a": 1, "b": 100}
    servers = []
    for node, n in hosts.items():
        body = (
            "# TYPE envoy_cluster_membership_total gauge\n"
            f'envoy_cluster_membership_total{{envoy_cluster_name="{SERVICE}|canary"}} {n}\n'
        ).encode()

        class Stats(BaseHTTPRequestHandler):
            payload = body

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(self.payload)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Stats)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append((node, server))
    targets = [
        ScrapeTarget(
            f"127.0.0.1:{s.server_port}", "/stats/prometheus", {"region": REGION, "node": node}
        )
        for node, s in servers
    ]
    prometheus = Prometheus(tmp_path / "prometheus", free_port(), targets)
    source = PrometheusSource(prometheus.url)
    plan = make_spec().service(SERVICE).rollout
    canary = f"{SERVICE}|canary"

    def hosts_read() -> float:
        return asyncio.run(source.pool_health(plan, REGION, canary))[0]

    try:
        prometheus.wait_ready()
        wait_for(lambda: hosts_read() == 101, "both targets scraped")
        source.exclude_nodes(REGION, ["b"])
        assert hosts_read() == 1
        source.exclude_nodes(REGION, ())
        assert hosts_read() == 101
    finally:
        prometheus.stop()
        for _, server in servers:
            server.shutdown()
            server.server_close()


def test_a_node_that_reconnects_keeps_its_time_to_ack() -> None:
    """A node's time to ACK routes runs from when it (by id) was first sent them, over
    its streams: one that reconnects again and again without ever ACKing is not given a
    fresh ack_timeout each time; new routes start a new one."""
    now = [100.0]
    registry = NodeRegistry(lambda: now[0])
    first = registry.connect("n1", REGION)
    registry.record_sent(first, ROUTE, "v1")
    registry.disconnect(first, "stream ended")
    now[0] = 105.0
    again = registry.connect("n1", REGION)
    registry.record_sent(again, ROUTE, "v1")
    assert again.types[ROUTE].sent_at == 100.0
    registry.record_sent(again, ROUTE, "v2")
    assert again.types[ROUTE].sent_at == 105.0


@pytest.mark.parametrize(
    ("rollout", "problem"),
    [
        ({"ack_quorum": 0}, "rollout.ack_quorum: expected a share of the region's nodes above 0"),
        ({"ack_quorum": "150%"}, "rollout.ack_quorum: expected a share"),
        ({"ack_quorum": 0.9, "nack_tolerance": -1}, "rollout.nack_tolerance: expected a whole"),
        (
            {"nack_tolerance": 1},
            "rollout.nack_tolerance: tolerating NACKs needs ack_quorum below 1",
        ),
    ],
)
def test_bad_quorum_settings_are_named(rollout: dict[str, Any], problem: str) -> None:
    with pytest.raises(SpecError) as caught:
        make_spec(**rollout)
    assert problem in str(caught.value)


def test_quorum_settings_parse() -> None:
    plan = make_spec(ack_quorum="90%", nack_tolerance=2).service(SERVICE).rollout
    assert (plan.ack_quorum, plan.nack_tolerance) == (0.9, 2)
    default = make_spec().service(SERVICE).rollout
    assert (default.ack_quorum, default.nack_tolerance) == (1.0, 0)

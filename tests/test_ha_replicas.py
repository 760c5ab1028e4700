"""Replicas on etcd, as processes: followers serve what the leader committed, under the
same routes version; a regional replica refuses other regions' nodes naming who serves
them; a spec file's change reaches every replica through the store; `manifests istio
--store` renders the stored weights. (Faults: tests/test_ha_faults.py.)"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from aetcd import rpc
from envoy.config.route.v3 import route_pb2

from tests.conftest import AdsClient, make_spec_doc
from tests.support import wait_for, wait_for_async
from tests.test_ads_protocol import ALL_CLUSTERS, sync_all
from xds_server.admin.v1 import admin_pb2, admin_pb2_grpc
from xds_server.ha.etcd import async_client, parse_store_url
from xds_server.ha.replicas import VANISHED_GRACE, ClusterDataPlane, Directory, ReplicaInfo
from xds_server.ha.store import EtcdStore, View, _apply
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.procs import Process, free_port, http_get
from xds_server.spec import validate_spec
from xds_server.xds.dataplane import Applied, Pending
from xds_server.xds.publisher import XdsPublisher, judge_routes
from xds_server.xds.resources import ROUTE_CONFIG_NAME
from xds_server.xds.status import NodeStatus, TypeStatus
from xds_server.xds.types import CLUSTER, ENDPOINT, ROUTE

REGIONS = ("us-east", "eu-west")
CLI = [sys.executable, "-m", "xds_server.cli"]


@dataclass
class Replica:
    name: str
    process: Process
    xds: int
    admin: int
    metrics: int


def start_replica(
    workdir: Path, store: str, name: str, *extra: str, spec: Path | None = None
) -> Replica:
    xds, admin, metrics = free_port(), free_port(), free_port()
    argv = [*CLI, "serve", "--store", store, "--replica-id", name, "--leader-ttl", "2",
            "--xds-address", f"127.0.0.1:{xds}", "--admin-address", f"127.0.0.1:{admin}",
            "--metrics-address", f"127.0.0.1:{metrics}", "--ui-address", "",
            "--prometheus-url", f"http://127.0.0.1:{free_port()}", *extra]  # fmt: skip
    if spec is not None:
        argv += ["--spec", str(spec)]
    process = Process(f"replica-{name}", argv, workdir / f"{name}.log")
    return Replica(name, process, xds, admin, metrics)


def store_view(url: str) -> EtcdStore:
    store = EtcdStore(parse_store_url(url))
    store.read()
    return store


@pytest.fixture
def replicas(tmp_path: Path, etcd_cluster: EtcdCluster) -> Iterator[dict[str, Replica]]:
    """Replica `a` serves us-east only (and pushes the spec file); `b` every region. The
    spec has a canary, so a rollout starts (no Prometheus: its steps hold)."""
    ports = {(r, p): free_port() for r in REGIONS for p in ("production", "canary")}
    spec = tmp_path / "mesh.yaml"
    spec.write_text(yaml.safe_dump(make_spec_doc(ports, regions=REGIONS)))
    a = start_replica(tmp_path, etcd_cluster.url, "a", "--regions", "us-east", spec=spec)
    wait_for(lambda: store_view(etcd_cluster.url).view.spec, "replica a's spec push", timeout=20)
    b = start_replica(tmp_path, etcd_cluster.url, "b")
    started = {"a": a, "b": b}
    try:
        wait_for(
            lambda: set(store_view(etcd_cluster.url).view.replicas) == {"a", "b"},
            "both replicas in the store",
            timeout=20,
        )
        wait_for(lambda: store_view(etcd_cluster.url).load_rollouts(), "the rollout", timeout=20)
        yield started
    finally:
        for r in started.values():
            r.process.stop()


def leader_of(url: str) -> str:
    lead = wait_for(lambda: store_view(url).view.leader, "a leader", timeout=20)
    return lead.replica


NAMES = {ENDPOINT: ALL_CLUSTERS, ROUTE: [ROUTE_CONFIG_NAME]}


def subscribe(port: int, region: str, node: str) -> tuple[AdsClient, Any]:
    """A node that has walked through CDS, EDS, LDS and RDS, as Envoy does, and the
    routes it got first."""
    client = AdsClient(port, region=region, node_id=node)
    return client, sync_all(client)[ROUTE]


def parse_routes(resp: Any) -> tuple[str, dict[str, int]]:
    """A routes response's version and the recommender's weights by pool."""
    config = route_pb2.RouteConfiguration()
    resp.resources[0].Unpack(config)
    (vhost,) = [v for v in config.virtual_hosts if v.name == "recommender"]
    weighted = [r for r in vhost.routes if r.route.HasField("weighted_clusters")][-1]
    clusters = weighted.route.weighted_clusters.clusters
    return resp.version_info, {c.name.split("|")[1]: c.weight.value for c in clusters}


def next_routes(client: AdsClient) -> Any:
    """The next routes response (every response before it ACKed, as Envoy would)."""
    while True:
        resp = client.recv(10)
        client.ack(resp, NAMES.get(resp.type_url))
        if resp.type_url == ROUTE:
            return resp


def latest_routes(client: AdsClient, until: Callable[[str, dict[str, int]], bool]) -> float:
    """Read routes responses until one satisfies `until`; when it came (monotonic)."""

    def seen() -> float | None:
        version, weights = parse_routes(next_routes(client))
        return time.monotonic() if until(version, weights) else None

    return wait_for(seen, "the routes asked for", timeout=20, interval=0)


def test_followers_serve_the_leaders_weights_under_the_same_version(
    tmp_path: Path, replicas: dict[str, Replica], etcd_cluster: EtcdCluster
) -> None:
    leader = replicas[leader_of(etcd_cluster.url)]
    follower = replicas["b" if leader.name == "a" else "a"]
    on_leader, _ = subscribe(leader.xds, "us-east", "node-on-leader")
    on_follower, _ = subscribe(follower.xds, "us-east", "node-on-follower")
    with grpc.insecure_channel(f"127.0.0.1:{leader.admin}") as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        admin.SetWeights(
            admin_pb2.SetWeightsRequest(
                service="recommender", canary_percent=30, reason="test: by hand"
            ),
            timeout=10,
        )
    decided = time.monotonic()
    store = store_view(etcd_cluster.url)
    version = str(store.routes_version("us-east"))
    want = {"production": 7000, "canary": 3000}
    at_leader = latest_routes(on_leader, lambda v, w: v == version and w == want)
    at_follower = latest_routes(on_follower, lambda v, w: v == version and w == want)
    print(
        f"set-weights -> routes {version} on the leader's node {at_leader - decided:.3f} s, "
        f"on the follower's {at_follower - decided:.3f} s"
    )
    # The decision's audit entry names the version both replicas serve.
    (entry,) = [e for e in store.audit(region="us-east") if e.reason.endswith("test: by hand")]
    assert str(entry.snapshot_version) == version
    # A replica started now serves the same routes under the same version from the start.
    late = start_replica(tmp_path, etcd_cluster.url, "late")
    try:
        wait_for(
            lambda: "late" in store_view(etcd_cluster.url).view.replicas, "late up", timeout=20
        )
        _, first = subscribe(late.xds, "us-east", "node-on-late")
        assert parse_routes(first) == (version, want)
    finally:
        late.process.stop()
    # Each replica says on /metrics whether it leads.
    for name, r in replicas.items():
        want_gauge = 1.0 if name == leader.name else 0.0
        wait_for(
            lambda r=r, want_gauge=want_gauge: leader_gauge(r) == want_gauge,  # type: ignore[misc]
            f"{name}'s xds_leader {want_gauge}",
            timeout=10,
        )


def leader_gauge(r: Replica) -> float | None:
    _, body, _ = http_get(f"http://127.0.0.1:{r.metrics}/metrics")
    for line in body.decode().splitlines():
        if line.startswith("xds_leader "):
            return float(line.split()[1])
    return None


def test_a_regional_replica_refuses_other_regions_naming_who_serves_them(
    replicas: dict[str, Replica],
) -> None:
    client = AdsClient(replicas["a"].xds, region="eu-west", node_id="lost-node")
    client.send(CLUSTER)
    with pytest.raises(grpc.RpcError) as raised:
        client.recv(10)
    error: Any = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = error.details()
    assert "region eu-west, which this replica does not serve (it serves us-east)" in message
    assert f"eu-west is served by b (127.0.0.1:{replicas['b'].xds})" in message
    # Its own region's node is served.
    _, first = subscribe(replicas["a"].xds, "us-east", "home-node")
    assert parse_routes(first)[1]["production"] > 0


def test_a_spec_file_change_reaches_every_replica_through_the_store(
    tmp_path: Path, replicas: dict[str, Replica], etcd_cluster: EtcdCluster
) -> None:
    on_b, _ = subscribe(replicas["b"].xds, "eu-west", "node-b")
    doc = yaml.safe_load((tmp_path / "mesh.yaml").read_text())
    doc["services"][0]["prefix"] = "/v2/"
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(doc))  # replica a watches it

    def prefix_served() -> bool:
        resp = next_routes(on_b)
        config = route_pb2.RouteConfiguration()
        resp.resources[0].Unpack(config)
        return any(r.match.prefix == "/v2/" for v in config.virtual_hosts for r in v.routes)

    wait_for(prefix_served, "replica b serving the edited spec", timeout=20, interval=0)
    history = subprocess.run(
        [*CLI, "spec", "history", "--store", etcd_cluster.url],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.splitlines()
    assert len(history) == 3 and str(tmp_path / "mesh.yaml") in history[-1]
    assert int(history[-1].split()[0]) == 2


def test_manifests_istio_from_the_store_carry_the_committed_weights(
    replicas: dict[str, Replica], etcd_cluster: EtcdCluster
) -> None:
    leader = replicas[leader_of(etcd_cluster.url)]
    with grpc.insecure_channel(f"127.0.0.1:{leader.admin}") as channel:
        admin_pb2_grpc.AdminStub(channel).SetWeights(
            admin_pb2.SetWeightsRequest(
                service="recommender", canary_percent=40, reason="test: istio"
            ),
            timeout=10,
        )
    out = subprocess.run(
        [*CLI, "manifests", "istio", "--store", etcd_cluster.url, "--region", "eu-west"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    (vs,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "VirtualService"]
    weights = {r["destination"]["subset"]: r["weight"] for r in vs["spec"]["http"][-1]["route"]}
    assert weights.get("canary") == 40 and weights.get("production") == 60


def test_the_nodes_of_a_silent_or_gone_replica_are_unknown_until_seen_applying() -> None:
    """A region whose Envoys are on a replica that stopped rewriting its key (frozen, cut
    off from the store) or whose key went away has nodes that are *unknown*: never
    applied, whatever the rest did. They hold the region until seen, on a replica heard
    from, with the current routes; a replica heard from again vouches for its nodes."""
    ports = {(r, p): 1 for r in REGIONS for p in ("production", "canary")}
    spec = validate_spec(make_spec_doc(ports, regions=REGIONS), "grace")
    publisher = XdsPublisher(spec)
    store = EtcdStore(parse_store_url("etcd://127.0.0.1:1"))  # (its view, filled by hand)
    info = ReplicaInfo("me", (), "127.0.0.1:1", "127.0.0.1:2", 0.0)
    directory = Directory(store, info, publisher, ttl=3)
    dataplane = ClusterDataPlane(publisher, directory)
    current = publisher.snapshot("us-east").type_version(ROUTE)
    old = {"id": "e1", "region": "us-east", "agent": "envoy/1.40.0",
           "routes": {"acked": "1", "sent": "1"}}  # fmt: skip
    moved = {**old, "routes": {"acked": current, "sent": current, "acked_at": 1.0}}
    live = {"id": "e2", "region": "us-east", "agent": "envoy/1.40.0", "routes": moved["routes"]}
    # A silent replica: its key not rewritten for more than two heartbeats.
    store.view.replicas["frozen"] = {"id": "frozen", "heartbeat": 1.0, "nodes": [moved, live]}
    store.view.heard["frozen"] = (7, time.monotonic() - 2.6)
    held = dataplane.routes_applied("us-east")
    assert isinstance(held, Pending) and held.lagging == () and held.version == current
    assert held.counts == (0, 2, 0), held
    assert "e1 (replica frozen silent for 2." in held.unknown[0], held.unknown
    # Heard from again: what it says counts.
    store.view.heard["frozen"] = (8, time.monotonic())
    assert isinstance(dataplane.routes_applied("us-east"), Applied)
    # Gone: its nodes are unknown (not lagging, not applied) until seen elsewhere.
    store.view.departed["frozen"] = (store.view.replicas.pop("frozen"), time.monotonic() - 60)
    held = dataplane.routes_applied("us-east")
    assert isinstance(held, Pending) and held.counts == (0, 2, 0), held
    assert "replica frozen gone 60." in held.waiting_for(), held.waiting_for()
    # e1 seen on a live replica, still with the old routes: lagging; e2 still unknown.
    store.view.replicas["alive"] = {"id": "alive", "heartbeat": 1.0, "nodes": [old]}
    store.view.heard["alive"] = (9, time.monotonic())
    held = dataplane.routes_applied("us-east")
    assert isinstance(held, Pending) and held.counts == (0, 1, 1), held
    # Both seen applying the current routes: applied.
    store.view.replicas["alive"]["nodes"] = [moved, live]
    applied = dataplane.routes_applied("us-east")
    assert isinstance(applied, Applied) and applied.nodes == 2, applied
    # Listed nowhere now (their stream ended, their replica gone long ago): unknown for
    # VANISHED_GRACE, then forgotten.
    del store.view.replicas["alive"]
    store.view.departed["frozen"] = (store.view.departed["frozen"][0], time.monotonic() - 301)
    held = dataplane.routes_applied("us-east")
    assert isinstance(held, Pending) and held.counts == (0, 2, 0), held
    assert "e1 (left alive 0.0s ago, not seen since)" in held.unknown, held.unknown
    for nodes in dataplane._known.values():  # (as if VANISHED_GRACE had passed)
        for node, (last, where) in nodes.items():
            nodes[node] = (last - VANISHED_GRACE - 1, where)
    assert isinstance(dataplane.routes_applied("us-east"), Applied)
    store.close()


def test_ack_timeout_for_unknown_nodes_counts_from_when_they_went_unknown() -> None:
    """Routes applied long ago, then a replica lost: its nodes are waited for from the
    loss (a long step is not failed at once); a node that has not ACKed the routes
    still counts from their publish."""
    n = NodeStatus(1, "e1", "us-east", 0.0, user_agent="envoy/1.40.0")
    n.types[ROUTE] = TypeStatus(acked_version="old")
    held = judge_routes("v", 100.0, [], ("e2 (replica x gone 1.0s ago)",), 150.0)
    assert isinstance(held, Pending) and held.since == 150.0 and held.counts == (0, 1, 0)
    lagging = judge_routes("v", 100.0, [n], ("e2 (replica x gone 1.0s ago)",), 150.0)
    assert isinstance(lagging, Pending) and lagging.since == 100.0
    assert lagging.counts == (0, 1, 1) and lagging.waiting_for().startswith("unknown: e2")
    fresh = judge_routes("v", 200.0, [], ("e2 (replica x gone 1.0s ago)",), 150.0)
    assert isinstance(fresh, Pending) and fresh.since == 200.0


def test_a_big_directory_key_waits_out_a_burst_of_acks_and_is_written_when_it_ends() -> None:
    """While a push's ACKs keep coming, a big key is not rewritten at every one (each
    rewrite is a MB to etcd and to every replica's decoder): the rewrite waits until
    the burst pauses, or until its longest wait; a quiet key waits one interval."""
    ports = {(r, p): 1 for r in REGIONS for p in ("production", "canary")}
    publisher = XdsPublisher(validate_spec(make_spec_doc(ports, regions=REGIONS), "burst"))
    node = publisher.nodes.connect("us-east-envoy-0", "us-east", user_agent="envoy/1.40.0")
    store = EtcdStore(parse_store_url("etcd://127.0.0.1:1", "/burst"))  # (never dialled)
    info = ReplicaInfo("r", (), "127.0.0.1:1", "127.0.0.1:2", 0.0)
    directory = Directory(store, info, publisher, ttl=30)

    async def acks(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            publisher.nodes.record_ack(node, ROUTE, "1")
            await asyncio.sleep(0.03)  # an ACK every 30 ms: the burst's pace

    async def gather_during(burst: float, longest: float) -> tuple[float, bool]:
        task = asyncio.get_running_loop().create_task(acks(burst))  # (runs in the gather)
        start = time.monotonic()
        await directory._gather(longest)
        waited = time.monotonic() - start
        await task
        return waited, directory._dirty.is_set()

    async def scenario() -> None:
        quiet, _ = await gather_during(0.0, longest=10.0)
        assert quiet < 1.0  # (one interval: 0.1 s)
        after_burst, _ = await gather_during(1.0, longest=10.0)
        assert 1.0 <= after_burst < 3.0  # the burst's end, not the longest wait
        capped, pending = await gather_during(3.0, longest=1.0)
        assert 1.0 <= capped < 2.5 and pending  # written while the burst goes on

    asyncio.run(scenario())
    store.close()


def test_a_replica_with_more_nodes_than_one_etcd_value_holds_lists_every_one(
    shared_etcd: EtcdCluster,
) -> None:
    """9,000 nodes make a document of about 2.4 MB, past etcd's 1.5 MiB request limit:
    it is written in parts beside the replica's key, and another replica reads every
    node back and judges the region on them. One node's ACK rewrites one part only."""
    ports = {(r, p): 1 for r in REGIONS for p in ("production", "canary")}
    spec = validate_spec(make_spec_doc(ports, regions=REGIONS), "parts")
    publisher, leader = XdsPublisher(spec), XdsPublisher(spec)
    current = leader.snapshot("us-east").type_version(ROUTE)  # (what the leader judges)
    nodes = []
    for i in range(9_000):
        n = publisher.nodes.connect(f"us-east-envoy-{i:05d}", "us-east", user_agent="envoy/1.40.0")
        publisher.nodes.record_sent(n, ROUTE, current)
        if i:  # the first node has not ACKed yet
            publisher.nodes.record_ack(n, ROUTE, current)
        nodes.append(n)
    url = parse_store_url(shared_etcd.url, "/parts-test")
    info = ReplicaInfo("big", (), "127.0.0.1:1", "127.0.0.1:2", 0.0)

    async def publish(directory: Directory, lease: int) -> None:
        await directory._publish(lease)

    async def run() -> tuple[dict[str, int], dict[str, int]]:
        store = EtcdStore(url, async_client(url))
        await store.start()
        directory = Directory(store, info, publisher, ttl=30)
        lease = (await store.client.lease(30)).id
        await publish(directory, lease)
        before = await part_revisions(store)
        publisher.nodes.record_ack(nodes[0], ROUTE, current)
        await publish(directory, lease)
        after = await part_revisions(store)
        store.close()
        await store.client.close()
        return before, after

    async def part_revisions(store: EtcdStore) -> dict[str, int]:
        prefix = f"{store.keys.prefix}/replica-nodes/".encode()
        return {kv.key.decode(): kv.mod_revision for kv in await store.client.get_prefix(prefix)}

    before, after = asyncio.run(run())
    assert len(before) >= 8, before  # (2.4 MB in parts of about 256 KB)
    assert len([k for k in after if after[k] != before[k]]) == 1, (before, after)
    reader = EtcdStore(url)
    reader.read()
    doc = reader.view.replicas["big"]
    assert len(doc["nodes"]) == 9_000 and doc["node_parts"] == len(before)
    me = ReplicaInfo("leader", (), "127.0.0.1:3", "127.0.0.1:4", 0.0)
    dataplane = ClusterDataPlane(leader, Directory(reader, me, leader, ttl=30))
    applied = dataplane.routes_applied("us-east")
    assert isinstance(applied, Applied) and applied.nodes == 9_000, applied
    reader.close()


def test_a_replica_beats_without_rewriting_its_key_unless_an_older_release_listens(
    shared_etcd: EtcdCluster,
) -> None:
    """A replica's heartbeat is its small beat key: another replica hears it (`heard`
    moves on, `updated` with it) while the replica's key, its nodes unchanged, is not
    written again. A replica of a release before beats (its document without `beats`)
    hears only rewrites of the key: while one is in the directory, the heartbeat
    rewrites the whole key, as that release's did."""
    ports = {(r, p): 1 for r in REGIONS for p in ("production", "canary")}
    spec = validate_spec(make_spec_doc(ports, regions=REGIONS), "beats")
    publisher = XdsPublisher(spec)
    for i in range(3):
        publisher.nodes.connect(f"us-east-envoy-{i}", "us-east", user_agent="envoy/1.40.0")
    url = parse_store_url(shared_etcd.url, "/beats-test")
    info = ReplicaInfo("a", (), "127.0.0.1:1", "127.0.0.1:2", 0.0)

    async def scenario() -> None:
        writer, reader = EtcdStore(url, async_client(url)), EtcdStore(url, async_client(url))
        await writer.start()
        await reader.start()
        directory = Directory(writer, info, publisher, ttl=2)  # (a beat every 0.67 s)
        key = writer.keys.replica("a").encode()
        tasks = [asyncio.create_task(c) for c in (directory.run(), writer.watch(), reader.watch())]

        async def key_revision() -> int:
            (kv,) = await writer.client.get_prefix(key)
            return int(kv.mod_revision)

        try:
            await wait_for_async(lambda: "a" in reader.view.replicas, "a's key", timeout=10)
            written = await key_revision()
            heard = [reader.view.heard["a"]]
            first_update = reader.view.replicas["a"]["updated"]

            def heard_again() -> bool:
                if reader.view.heard["a"] != heard[-1]:
                    heard.append(reader.view.heard["a"])
                return len(heard) > 3

            await wait_for_async(heard_again, "three beats heard", timeout=10)
            assert await key_revision() == written, "the heartbeat rewrote the whole key"
            assert reader.view.replicas["a"]["updated"] > first_update
            assert reader.view.replicas["a"]["nodes"] and reader.view.replicas["a"]["beats"]
            # An older release joins: it hears a only when a's key is rewritten.
            older = {"id": "old", "regions": [], "xds": "127.0.0.1:3", "heartbeat": 0.67}
            await writer.client.put(writer.keys.replica("old").encode(), json.dumps(older).encode())
            rewrites = {written}

            async def rewritten_twice() -> bool:
                rewrites.add(await key_revision())
                return len(rewrites) > 2

            deadline = time.monotonic() + 10
            while not await rewritten_twice():
                assert time.monotonic() < deadline, (
                    "no rewrite at the heartbeat for the older release"
                )
                await asyncio.sleep(0.1)  # (the poll's interval)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await directory.withdraw()
            await writer.client.delete(writer.keys.replica("old").encode())
            for store in (writer, reader):
                store.close()
                await store.client.close()

    asyncio.run(scenario())


def test_a_beat_that_is_not_what_a_replica_writes_is_heard_and_breaks_nothing() -> None:
    """A beat key's value is only read for `updated`: one that is not a JSON object (or
    not JSON: logged) still counts as the replica heard from, and the watch that
    brought it goes on (an exception there would break it, retried for good); a
    replica's key that is not an object is logged and left out."""
    view = View()
    prefix = "/p"

    def kv(value: bytes, revision: int) -> rpc.KeyValue:  # (what a watch event carries)
        return rpc.KeyValue(value=value, mod_revision=revision, create_revision=1, version=1)

    doc = {"id": "a", "heartbeat": 1.0, "nodes": [], "updated": 1.0}
    _apply(view, prefix, f"{prefix}/replicas/a", kv(json.dumps(doc).encode(), 5), deleted=False)
    for revision, value in ((6, b"[1]"), (7, b"not json"), (8, b'{"updated": 9.5}')):
        _apply(view, prefix, f"{prefix}/replica-beats/a", kv(value, revision), deleted=False)
        assert view.heard["a"][0] == revision
    assert view.replicas["a"]["updated"] == 9.5 and view.replicas["a"]["nodes"] == []
    _apply(view, prefix, f"{prefix}/replicas/b", kv(b"[1]", 9), deleted=False)  # (nor a key)
    assert "b" not in view.replicas

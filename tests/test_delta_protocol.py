"""Delta (incremental) ADS, spoken by a gRPC test client to the real server over loopback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.support import set_canary, wait_for
from xds_server.traffic import Split
from xds_server.xds.resources import ROUTE_CONFIG_NAME
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

from .conftest import DeltaClient, ServerThread
from .test_ads_protocol import ALL_CLUSTERS, _without_canary

Make = Callable[..., DeltaClient]


def names(resp: Any) -> list[str]:
    return sorted(r.name for r in resp.resources)


def sync(c: DeltaClient) -> dict[str, Any]:
    got = {}
    c.send(CLUSTER)
    got[CLUSTER] = r = c.recv()
    c.ack(r)
    c.send(ENDPOINT, subscribe=ALL_CLUSTERS)
    got[ENDPOINT] = r = c.recv()
    c.ack(r)
    c.send(LISTENER)
    got[LISTENER] = r = c.recv()
    c.ack(r)
    c.send(ROUTE, subscribe=[ROUTE_CONFIG_NAME])
    got[ROUTE] = r = c.recv()
    c.ack(r)
    return got


def test_wildcard_and_named_subscriptions_with_per_resource_versions(
    server: ServerThread, delta_clients: Make
) -> None:
    c = delta_clients(server.port)
    got = sync(c)
    assert names(got[CLUSTER]) == ALL_CLUSTERS
    assert all(r.version and r.resource.type_url == CLUSTER for r in got[CLUSTER].resources)
    assert names(got[ENDPOINT]) == ALL_CLUSTERS
    assert names(got[ROUTE]) == [ROUTE_CONFIG_NAME]
    # A name that does not exist is answered as removed, so the node does not wait.
    c.send(ENDPOINT, subscribe=["no-such-cluster"])
    nxt = c.recv()
    assert nxt.type_url == ENDPOINT and names(nxt) == []
    assert list(nxt.removed_resources) == ["no-such-cluster"]


def test_a_weight_change_sends_one_resource(server: ServerThread, delta_clients: Make) -> None:
    c = delta_clients(server.port)
    got = sync(c)
    set_canary(server, 30)
    r = c.recv()
    assert r.type_url == ROUTE and names(r) == [ROUTE_CONFIG_NAME]
    assert r.resources[0].version != got[ROUTE].resources[0].version
    assert list(r.removed_resources) == []


def test_removed_resources(server: ServerThread, delta_clients: Make) -> None:
    c = delta_clients(server.port)
    sync(c)
    server.call(lambda: server.server.apply_spec(_without_canary(server)))
    server.call(server.server.flush)
    removals: dict[str, list[str]] = {}
    for _ in range(6):  # bounded: clusters and endpoints each say it once
        r = c.recv()
        c.ack(r)
        if r.removed_resources:
            removals[r.type_url] = list(r.removed_resources)
        if len(removals) == 2:
            break
    assert removals == {CLUSTER: ["recommender|canary"], ENDPOINT: ["recommender|canary"]}


def test_reconnect_with_initial_versions_gets_only_what_changed(
    server: ServerThread, delta_clients: Make
) -> None:
    first = delta_clients(server.port, node_id="a")
    got = sync(first)
    versions = {r.name: r.version for r in got[CLUSTER].resources}
    again = delta_clients(server.port, node_id="a")
    again.send(CLUSTER, initial=versions)
    r = again.recv()
    assert names(r) == [] and list(r.removed_resources) == []
    stale = {**versions, "recommender|canary": "old-version", "gone|cluster": "x"}
    third = delta_clients(server.port, node_id="a")
    third.send(CLUSTER, initial=stale)
    r = third.recv()
    assert names(r) == ["recommender|canary"]
    assert list(r.removed_resources) == ["gone|cluster"]


def test_nack_is_recorded_and_not_resent(server: ServerThread, delta_clients: Make) -> None:
    c = delta_clients(server.port)
    sync(c)
    set_canary(server, 10)
    bad = c.recv()
    c.send(ROUTE, nonce=bad.nonce, error="rejected by test")
    node = wait_for(
        lambda: next(
            (
                n
                for n in server.call(lambda: server.server.nodes.nodes("us-east"))
                if n.types[ROUTE].nack_error
            ),
            None,
        ),
        "the NACK",
        timeout=5,
    )
    assert node.types[ROUTE].nack_version == bad.system_version_info
    c.send(LISTENER, unsubscribe=["*"])
    c.send(LISTENER, subscribe=["*"])
    assert c.recv().type_url == LISTENER  # no routes re-sent in between


def test_subscription_change_with_stale_nonce_is_applied(
    server: ServerThread, delta_clients: Make
) -> None:
    c = delta_clients(server.port)
    c.send(CLUSTER)
    cds = c.recv()
    c.ack(cds)
    c.send(ENDPOINT, subscribe=["recommender|production"])
    eds = c.recv()
    c.ack(eds)
    c.send(ENDPOINT, subscribe=["recommender|canary"], nonce="not-the-latest")
    r = c.recv()
    assert r.type_url == ENDPOINT and names(r) == ["recommender|canary"]


def test_delta_resources_are_encoded_once_for_all_streams(
    server: ServerThread, delta_clients: Make
) -> None:
    a, b = delta_clients(server.port, node_id="a"), delta_clients(server.port, node_id="b")
    for c in (a, b):
        c.send(CLUSTER)
    ra, rb = a.recv(), b.recv()
    assert [r.SerializeToString() for r in ra.resources] == [
        r.SerializeToString() for r in rb.resources
    ]
    snap = server.call(lambda: server.server.snapshot("us-east"))
    assert len(snap._delta_out) == 1


def test_a_thousand_services_one_weight_change_one_resource(delta_clients: Make) -> None:
    """1,000 services x 3 pools x 3 regions load, build and serve; changing one service's
    weights sends one resource (the route configuration) and rebuilds only that service."""
    from xds_server.lab.background import BackgroundServer
    from xds_server.spec import validate_spec

    regions = ["us-east", "eu-west", "ap-south"]
    port = iter(range(20_000, 65_000))
    spec = validate_spec(
        {
            "regions": regions,
            "services": [
                {
                    "name": f"svc-{i}",
                    "domains": [f"svc-{i}.example"],
                    "pools": {
                        p: {
                            "version": "v1",
                            "endpoints": {r: [f"127.0.0.1:{next(port)}"] for r in regions},
                        }
                        for p in ("production", "baseline", "canary")
                    },
                }
                for i in range(1000)
            ],
        },
        "big",
    )
    server = BackgroundServer(spec)
    try:
        server.start()
        c = delta_clients(server.port)
        c.send(CLUSTER)
        cds = c.recv()
        assert len(cds.resources) == 3000
        c.ack(cds)
        c.send(ROUTE, subscribe=[ROUTE_CONFIG_NAME])
        c.ack(c.recv())
        before = server.call(lambda: server.server.snapshot("us-east").resources)
        server.call(
            lambda: server.server.set_split(
                "svc-500", Split.from_percent({"canary": 5, "baseline": 5}), urgent=True
            )
        )
        r = c.recv()
        assert r.type_url == ROUTE and names(r) == [ROUTE_CONFIG_NAME]
        after = server.call(lambda: server.server.snapshot("us-east").resources)
        # Every cluster and endpoint object is the one built before; one vhost is new.
        for t in (CLUSTER, ENDPOINT):
            assert all(after.by_type[t][n] is m for n, m in before.by_type[t].items())
        old_vh = before.by_type[ROUTE][ROUTE_CONFIG_NAME].virtual_hosts
        new_vh = after.by_type[ROUTE][ROUTE_CONFIG_NAME].virtual_hosts
        assert [a.name for a, b in zip(old_vh, new_vh, strict=True) if a != b] == ["svc-500"]
    finally:
        server.close()

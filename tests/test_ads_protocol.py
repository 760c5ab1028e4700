"""The ADS protocol, spoken by a gRPC test client to the real server over loopback.

Negative checks ("nothing was sent") never sleep: the client sends a request that must
produce a different response, and checks that this response is the next one on the
stream (gRPC keeps a stream's messages in order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

from tests.support import set_canary, wait_for
from xds_server.xds.resources import ROUTE_CONFIG_NAME
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

from .conftest import AdsClient, ServerThread

ALL_CLUSTERS = ["recommender|canary", "recommender|production"]


def unpack(resp: Any, cls: type) -> list[Any]:
    out = []
    for a in resp.resources:
        m = cls()
        a.Unpack(m)
        out.append(m)
    return out


def sync_all(c: AdsClient) -> dict[str, Any]:
    """Walk a fresh stream through CDS, EDS, LDS, RDS as Envoy does; return the responses."""
    got = {}
    c.send(CLUSTER)
    got[CLUSTER] = r = c.recv()
    assert r.type_url == CLUSTER
    c.ack(r)
    c.send(ENDPOINT, ALL_CLUSTERS)
    got[ENDPOINT] = r = c.recv()
    assert r.type_url == ENDPOINT
    c.ack(r, ALL_CLUSTERS)
    c.send(LISTENER)
    got[LISTENER] = r = c.recv()
    assert r.type_url == LISTENER
    c.ack(r)
    c.send(ROUTE, [ROUTE_CONFIG_NAME])
    got[ROUTE] = r = c.recv()
    assert r.type_url == ROUTE
    c.ack(r, [ROUTE_CONFIG_NAME])
    return got


def weights(resp: Any) -> dict[str, int]:
    (rc,) = unpack(resp, route_pb2.RouteConfiguration)
    return {
        c.name: c.weight.value
        for c in rc.virtual_hosts[0].routes[0].route.weighted_clusters.clusters
    }


def test_initial_sync_and_versions(
    server: ServerThread, ads_clients: Callable[..., AdsClient]
) -> None:
    c = ads_clients(server.port)
    got = sync_all(c)
    clusters = unpack(got[CLUSTER], cluster_pb2.Cluster)
    assert sorted(x.name for x in clusters) == ALL_CLUSTERS
    cla = unpack(got[ENDPOINT], endpoint_pb2.ClusterLoadAssignment)
    assert sorted(x.cluster_name for x in cla) == ALL_CLUSTERS
    (listener,) = unpack(got[LISTENER], listener_pb2.Listener)
    assert listener.address.socket_address.port_value == 10000
    assert weights(got[ROUTE]) == {"recommender|production": 10_000}
    nonces = [r.nonce for r in got.values()]
    assert len(set(nonces)) == 4 and all(nonces)
    (node,) = server.call(lambda: server.server.nodes.nodes("us-east"))
    wait_for(
        lambda: all(node.sync_state(t, got[t].version_info) == "SYNCED" for t in got),
        "every type to be SYNCED",
        timeout=5,
    )


def test_weight_change_sends_only_routes(
    server: ServerThread, ads_clients: Callable[..., AdsClient]
) -> None:
    c = ads_clients(server.port)
    got = sync_all(c)
    set_canary(server, 50)
    r = c.recv()
    assert r.type_url == ROUTE
    assert int(r.version_info) > int(got[ROUTE].version_info)
    assert weights(r) == {"recommender|production": 5000, "recommender|canary": 5000}


def test_eds_honours_resource_names(
    server: ServerThread, ads_clients: Callable[..., AdsClient]
) -> None:
    c = ads_clients(server.port)
    c.send(CLUSTER)
    c.ack(c.recv())
    c.send(ENDPOINT, ["recommender|canary", "no-such-cluster"])
    r = c.recv()
    assert [x.cluster_name for x in unpack(r, endpoint_pb2.ClusterLoadAssignment)] == [
        "recommender|canary"
    ]
    # Changing the subscription in an ACK gets the newly named resources at once.
    c.ack(r, ALL_CLUSTERS)
    r2 = c.recv()
    assert r2.type_url == ENDPOINT and r2.version_info == r.version_info
    assert len(r2.resources) == 2


def test_nack_is_recorded_and_not_resent(
    server: ServerThread, ads_clients: Callable[..., AdsClient]
) -> None:
    c = ads_clients(server.port)
    got = sync_all(c)
    set_canary(server, 10)
    bad = c.recv()
    c.send(
        ROUTE,
        [ROUTE_CONFIG_NAME],
        version=got[ROUTE].version_info,
        nonce=bad.nonce,
        error="route: weights invalid",
    )
    node = wait_for(
        lambda: next(
            (
                n
                for n in server.call(lambda: server.server.nodes.nodes("us-east"))
                if n.types[ROUTE].nack_error
            ),
            None,
        ),
        "the NACK to be recorded",
        timeout=5,
    )
    assert node.types[ROUTE].nack_version == bad.version_info
    assert node.types[ROUTE].acked_version == got[ROUTE].version_info
    assert node.sync_state(ROUTE, bad.version_info) == "NACKED"
    # The NACKed routes are not sent again: the next response is the one a new request asks.
    c.send(ENDPOINT, ALL_CLUSTERS)
    eds = c.recv()
    assert eds.type_url == ENDPOINT
    c.ack(eds, ALL_CLUSTERS)
    # A new config is sent, even to a node that NACKed the previous one.
    set_canary(server, 20)
    nxt = c.recv()
    assert nxt.type_url == ROUTE and int(nxt.version_info) > int(bad.version_info)


def test_stale_nonce_is_ignored(
    server: ServerThread, ads_clients: Callable[..., AdsClient]
) -> None:
    c = ads_clients(server.port)
    c.send(CLUSTER)
    first = c.recv()
    c.ack(first)
    server.call(lambda: server.server.apply_spec(_without_canary(server)))
    second = c.recv()
    assert second.type_url == CLUSTER
    # A NACK quoting the first (stale) nonce must change nothing and get no answer.
    c.send(CLUSTER, version=first.version_info, nonce=first.nonce, error="late complaint")
    # The stale NACK got no answer: the next response is the one this new request asks for.
    c.send(ENDPOINT, ["recommender|production"])
    assert c.recv().type_url == ENDPOINT
    c.ack(second)
    (node,) = server.call(lambda: server.server.nodes.nodes("us-east"))
    wait_for(lambda: node.types[CLUSTER].acked_version == second.version_info, "the ACK", timeout=5)
    assert node.types[CLUSTER].nack_error == ""


def _without_canary(server: ServerThread) -> Any:
    from xds_server.spec import validate_spec

    spec = server.server.spec
    doc = dict(spec.raw)
    svc = dict(doc["services"][0])
    svc["pools"] = {"production": svc["pools"]["production"]}
    doc["services"] = [svc]
    return validate_spec(doc, "test")


def test_routes_wait_for_new_clusters(
    server: ServerThread, ads_clients: Callable[..., AdsClient]
) -> None:
    """Make before break: routes using a new cluster wait until it and its endpoints are ACKed."""
    c = ads_clients(server.port)
    c.send(CLUSTER)
    cds = c.recv()
    c.send(ROUTE, [ROUTE_CONFIG_NAME])
    # Endpoints flow while clusters are unanswered (Envoy ACKs CDS only once they warm) ...
    c.send(ENDPOINT, ALL_CLUSTERS)
    eds = c.recv()
    assert eds.type_url == ENDPOINT
    # ... but routes wait for both: after the CDS ACK alone, a listener request is
    # answered and still no routes come.
    c.ack(cds)
    c.send(LISTENER)
    assert c.recv().type_url == LISTENER
    c.ack(eds, ALL_CLUSTERS)
    rds = c.recv()
    assert rds.type_url == ROUTE


def test_removed_cluster_outlives_routes_using_it(
    server: ServerThread, ads_clients: Callable[..., AdsClient]
) -> None:
    c = ads_clients(server.port)
    sync_all(c)
    set_canary(server, 30)
    c.ack(c.recv(), [ROUTE_CONFIG_NAME])
    wait_for(
        lambda: server.call(
            lambda: server.server.nodes.all_acked(
                "us-east", ROUTE, server.server.snapshot("us-east").type_version(ROUTE)
            )
        ),
        "ACK",
        timeout=5,
    )
    # The canary pool leaves the spec while routes send it traffic: the cluster stays, so
    # the first thing sent is routes without it ...
    server.call(lambda: server.server.apply_spec(_without_canary(server)))
    server.call(server.server.flush)
    rds = c.recv()
    assert rds.type_url == ROUTE
    assert weights(rds) == {"recommender|production": 10_000}
    assert "recommender|canary" in server.call(
        lambda: server.server.snapshot("us-east").resources.by_type[CLUSTER]
    )
    # ... and only once the node has ACKed them does the cluster go.
    c.ack(rds, [ROUTE_CONFIG_NAME])
    cds = c.recv()
    assert cds.type_url == CLUSTER
    assert [x.name for x in unpack(cds, cluster_pb2.Cluster)] == ["recommender|production"]


def test_listen_metadata_sets_the_listener_address(
    server: ServerThread, ads_clients: Callable[..., AdsClient]
) -> None:
    c = ads_clients(server.port, listen="127.0.0.5:12345")
    c.send(LISTENER)
    (listener,) = unpack(c.recv(), listener_pb2.Listener)
    sa = listener.address.socket_address
    assert (sa.address, sa.port_value) == ("127.0.0.5", 12345)


def test_unknown_region_gets_a_clear_error(
    server: ServerThread, ads_clients: Callable[..., AdsClient]
) -> None:
    c = ads_clients(server.port, region="mars")
    c.send(CLUSTER)
    with pytest.raises(grpc.RpcError) as err:
        c.recv()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "region 'mars'" in err.value.details()
    assert "us-east" in err.value.details()


def test_response_is_encoded_once_for_all_streams(
    server: ServerThread, ads_clients: Callable[..., AdsClient]
) -> None:
    a, b = ads_clients(server.port, node_id="a"), ads_clients(server.port, node_id="b")
    for c in (a, b):
        c.send(CLUSTER)
        c.recv()
    snap = server.call(lambda: server.server.snapshot("us-east"))
    assert len(snap._encoded) == 1  # one encoding of CDS, shared by both streams

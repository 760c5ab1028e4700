"""A push costs each stream only its write (issue 28): every stream sent a type's new
version is written the very same bytes object, the snapshot's encoding with its nonce;
a stream sent a version again gets a nonce of its own, so no nonce ever repeats on a
stream and a late answer to an earlier response is still told stale. The protocol state
of streams (state of the world and delta), without gRPC: what `due` returns is written."""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2

from xds_server.spec import validate_spec
from xds_server.traffic import Split
from xds_server.xds.delta import DeltaStream
from xds_server.xds.publisher import XdsPublisher
from xds_server.xds.sotw import SotwStream
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

REGION = "us-east"
NAMES = {ENDPOINT: ["web|production", "web|canary"], ROUTE: ["ingress"]}


def publisher() -> XdsPublisher:
    pools = {
        pool: {"version": version, "endpoints": {REGION: [f"127.0.0.1:{port}"]}}
        for pool, version, port in (("production", "v1", 9001), ("canary", "v2", 9002))
    }
    doc = {"regions": [REGION], "services": [{"name": "web", "domains": ["*"], "pools": pools}]}
    return XdsPublisher(validate_spec(doc, "test"))


def request(
    type_url: str, resp: discovery_pb2.DiscoveryResponse | None = None
) -> discovery_pb2.DiscoveryRequest:
    """The node's first request of a type (no response), or its ACK of `resp`."""
    return discovery_pb2.DiscoveryRequest(
        type_url=type_url,
        resource_names=NAMES.get(type_url, []),
        version_info=resp.version_info if resp else "",
        response_nonce=resp.nonce if resp else "",
    )


def synced(pub: XdsPublisher, node: str) -> tuple[SotwStream, list[str]]:
    """A stream that asked for every type and ACKed everything, as Envoy does; and the
    nonces it was sent."""
    stream = SotwStream(pub.nodes.connect(node, REGION), pub.nodes)
    for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
        stream.on_request(request(t))
    nonces = []
    while sent := stream.due(pub.snapshot(REGION)):
        for body in sent:
            resp = discovery_pb2.DiscoveryResponse.FromString(body)
            nonces.append(resp.nonce)
            stream.on_request(request(resp.type_url, resp))
    return stream, nonces


def test_every_stream_is_written_the_same_bytes_for_a_new_version() -> None:
    pub = publisher()
    streams = [synced(pub, f"node-{i}")[0] for i in range(3)]
    pub.set_split("web", Split.from_percent({"canary": 20}), urgent=True)
    snap = pub.snapshot(REGION)
    sent = [s.due(snap) for s in streams]
    assert all(len(out) == 1 for out in sent)
    assert sent[0][0] is sent[1][0] is sent[2][0]
    resp = discovery_pb2.DiscoveryResponse.FromString(sent[0][0])
    assert (resp.type_url, resp.version_info) == (ROUTE, snap.type_version(ROUTE))
    assert resp.nonce and all(s.types[ROUTE].nonce == resp.nonce for s in streams)
    for s in streams:
        s.on_request(request(ROUTE, resp))
    assert pub.nodes.all_acked(REGION, ROUTE, snap.type_version(ROUTE))


def test_a_version_sent_again_has_a_nonce_of_its_own() -> None:
    pub = publisher()
    stream, nonces = synced(pub, "node-1")
    other, _ = synced(pub, "node-2")
    snap = pub.snapshot(REGION)
    stream.on_request(request(ROUTE))  # the node asks again (no nonce): answered again
    (again,) = stream.due(snap)
    resp = discovery_pb2.DiscoveryResponse.FromString(again)
    assert resp.version_info == snap.type_version(ROUTE)
    assert resp.nonce not in nonces and resp.nonce == stream.types[ROUTE].nonce
    assert (
        resp.resources
        == discovery_pb2.DiscoveryResponse.FromString(
            snap.encoded(ROUTE, stream.types[ROUTE].names).body
        ).resources
    )
    # The answer to the first response is stale now, the one to this one is not.
    first = discovery_pb2.DiscoveryResponse(
        type_url=ROUTE, version_info=resp.version_info, nonce=nonces[-1]
    )
    assert not stream.on_request(request(ROUTE, first)) and stream.types[ROUTE].in_flight
    stream.on_request(request(ROUTE, resp))
    assert not stream.types[ROUTE].in_flight
    # Another stream's next version is shared again; no nonce repeats on either stream.
    pub.set_split("web", Split.from_percent({"canary": 50}), urgent=True)
    (a,), (b,) = stream.due(pub.snapshot(REGION)), other.due(pub.snapshot(REGION))
    assert a is b
    assert discovery_pb2.DiscoveryResponse.FromString(a).nonce not in [*nonces, resp.nonce]


def delta_synced(pub: XdsPublisher, node: str, extra: tuple[str, ...] = ()) -> DeltaStream:
    """A delta stream subscribed to every type (routes also by `extra` names), in sync."""
    stream = DeltaStream(pub.nodes.connect(node, REGION), pub.nodes)
    for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
        names = [*NAMES.get(t, []), *(extra if t == ROUTE else ())]
        stream.on_request(
            discovery_pb2.DeltaDiscoveryRequest(type_url=t, resource_names_subscribe=names)
        )
    while sent := stream.due(pub.snapshot(REGION)):
        for body in sent:
            resp = discovery_pb2.DeltaDiscoveryResponse.FromString(body)
            stream.on_request(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=resp.type_url, response_nonce=resp.nonce
                )
            )
    return stream


def test_delta_streams_in_step_share_one_response() -> None:
    pub = publisher()
    streams = [delta_synced(pub, f"node-{i}") for i in range(3)]
    odd = delta_synced(pub, "node-odd", extra=("no-such-routes",))  # told it is missing
    pub.set_split("web", Split.from_percent({"canary": 20}), urgent=True)
    snap = pub.snapshot(REGION)
    (a,), (b,), (c,), (own,) = (s.due(snap) for s in [*streams, odd])
    assert a is b is c and own is not a
    shared = discovery_pb2.DeltaDiscoveryResponse.FromString(a)
    mine = discovery_pb2.DeltaDiscoveryResponse.FromString(own)
    assert [r.name for r in shared.resources] == [r.name for r in mine.resources] == ["ingress"]
    assert shared.resources == mine.resources and shared.nonce != mine.nonce
    assert shared.system_version_info == snap.type_version(ROUTE)
    for s, resp in ((streams[0], shared), (odd, mine)):
        s.on_request(discovery_pb2.DeltaDiscoveryRequest(type_url=ROUTE, response_nonce=resp.nonce))
        assert s.types[ROUTE].acked_resources == {"ingress"} and not s.due(snap)

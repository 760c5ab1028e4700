"""xDS over mTLS: a node's region and id must be the ones its client certificate names.

Certificates come from hack/make-certs.sh (a real CA, openssl); the peers are a real
Envoy and the gRPC library's own client, over loopback TLS.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tests.support import wait_for
from xds_server.lab.background import BackgroundServer
from xds_server.lab.procs import Envoy, free_port, http_get
from xds_server.render.bootstrap import BootstrapOptions
from xds_server.rollout.observe import Observer
from xds_server.spec import RolloutPlan, load_spec
from xds_server.xds.dataplane import Rejected
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

from .conftest import AdsClient

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "mesh.test"
NODES = ("us-east/us-east-1", "eu-west/eu-west-1")


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    subprocess.run(
        ["bash", str(ROOT / "hack" / "make-certs.sh"), str(out), "--trust-domain", DOMAIN, *NODES],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out


@pytest.fixture
def server(spec_file: Path, certs: Path) -> Iterator[BackgroundServer]:
    tls = ((certs / "server.pem").read_bytes(), (certs / "server.key").read_bytes())
    st = BackgroundServer(load_spec(spec_file), tls=tls, client_ca=(certs / "ca.pem").read_bytes())
    st.start()
    yield st
    st.close()


def credentials(certs: Path, node: str | None) -> grpc.ChannelCredentials:
    """Trust the CA; present `node`'s certificate (REGION/NODE_ID), or none."""
    ca = (certs / "ca.pem").read_bytes()
    if node is None:
        return grpc.ssl_channel_credentials(ca)
    return grpc.ssl_channel_credentials(
        ca, (certs / f"{node}.key").read_bytes(), (certs / f"{node}.pem").read_bytes()
    )


def first_response_or_status(client: AdsClient) -> object:
    client.send(CLUSTER)
    try:
        return client.recv(10)
    except grpc.RpcError as exc:
        return exc.code()


def test_an_envoy_with_its_own_certificate_is_served(
    server: BackgroundServer, certs: Path, tmp_path: Path
) -> None:
    node = certs / "us-east" / "us-east-1"
    listen = f"127.0.0.1:{free_port()}"
    envoy = Envoy(
        BootstrapOptions(
            region="us-east",
            node_id="us-east-1",
            xds_port=server.port,
            admin_port=free_port(),
            listen=listen,
            xds_tls_ca=str(certs / "ca.pem"),
            xds_tls_cert=f"{node}.pem",
            xds_tls_key=f"{node}.key",
        ),
        tmp_path / "envoy",
    )
    try:
        envoy.wait_ready()
        status, body, _ = http_get(f"http://{listen}/predict")
        assert status == 200 and json.loads(body)["pool"] == "production", body
        (seen,) = server.call(lambda: server.server.nodes.nodes("us-east"))
        assert seen.identity == f"spiffe://{DOMAIN}/region/us-east/node/us-east-1"
    finally:
        envoy.stop()


@pytest.mark.parametrize(
    ("cert", "region", "node_id", "why"),
    [
        ("us-east/us-east-1", "eu-west", "us-east-1", "in region 'eu-west' presents"),
        ("eu-west/eu-west-1", "eu-west", "us-east-1", "presents the certificate of"),
        ("us-east/us-east-1", "us-east", "us-east-2", "presents the certificate of"),
    ],
)
def test_a_node_claiming_what_its_certificate_does_not_say_is_refused(
    server: BackgroundServer,
    certs: Path,
    ads_clients: Callable[..., AdsClient],
    cert: str,
    region: str,
    node_id: str,
    why: str,
) -> None:
    client = ads_clients(
        server.port, region=region, node_id=node_id, credentials=credentials(certs, cert)
    )
    client.send(CLUSTER)
    with pytest.raises(grpc.RpcError) as err:
        client.recv(10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert why in err.value.details()  # type: ignore[attr-defined]
    assert server.call(lambda: server.server.nodes.nodes()) == []


def test_no_client_certificate_no_stream(
    server: BackgroundServer, certs: Path, ads_clients: Callable[..., AdsClient]
) -> None:
    client = ads_clients(server.port, credentials=credentials(certs, None))
    assert first_response_or_status(client) == grpc.StatusCode.UNAVAILABLE
    assert server.call(lambda: server.server.nodes.nodes()) == []


def test_a_second_stream_of_a_node_replaces_the_first(
    server: BackgroundServer, certs: Path, ads_clients: Callable[..., AdsClient]
) -> None:
    creds = credentials(certs, "us-east/us-east-1")
    first = ads_clients(server.port, node_id="us-east-1", credentials=creds)
    assert first_response_or_status(first) is not None
    wait_for(
        lambda: len(server.call(lambda: server.server.nodes.nodes())) == 1, "1 node", timeout=5
    )
    second = ads_clients(server.port, node_id="us-east-1", credentials=creds)
    second.send(CLUSTER)
    second.recv(10)

    def one_left() -> bool:
        nodes = server.call(lambda: server.server.nodes.nodes("us-east"))
        return [n.stream_id for n in nodes] == [nodes[0].stream_id] and len(nodes) == 1

    wait_for(one_left, "the older stream to end", timeout=10)
    (node,) = server.call(lambda: server.server.nodes.nodes("us-east"))
    assert node.types[CLUSTER].sent_version  # the newer stream is the one left


def test_a_nack_names_the_node_and_its_certificate_identity(
    server: BackgroundServer, certs: Path, ads_clients: Callable[..., AdsClient]
) -> None:
    client = ads_clients(
        server.port, node_id="us-east-1", credentials=credentials(certs, "us-east/us-east-1")
    )
    client.send(CLUSTER)
    clusters = client.recv(10)
    client.ack(clusters)
    names = sorted(
        server.call(lambda: server.server.snapshot("us-east").resources.by_type[ENDPOINT])
    )
    client.send(ENDPOINT, names)
    client.ack(client.recv(10), names)
    client.send(LISTENER)
    listeners = client.recv(10)
    client.ack(listeners)
    client.send(ROUTE, ["ingress"])
    routes = client.recv(10)
    client.send(ROUTE, ["ingress"], routes.version_info, routes.nonce, error="bad route")

    def rejected() -> Rejected | None:
        status = server.call(lambda: server.server.routes_applied("us-east"))
        return status if isinstance(status, Rejected) else None

    status = wait_for(rejected, "the NACK to be recorded", timeout=10)
    assert status.node == "us-east-1"
    assert status.identity == f"spiffe://{DOMAIN}/region/us-east/node/us-east-1"
    observer = Observer(server.server, None, lambda: 0.0)  # type: ignore[arg-type]
    error = observer.applied("us-east", RolloutPlan(), 0.0).apply_error
    assert error is not None and status.identity in error and "us-east-1" in error

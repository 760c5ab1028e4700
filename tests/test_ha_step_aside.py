"""A replica that loses the store stops presenting itself as current (issue 27): it
answers grpc.health.v1 NOT_SERVING on its xDS port (what Envoy's bootstrap checks),
ends its ADS streams with UNAVAILABLE and refuses new ones, so its nodes go to a
replica that can reach the store; with the store back it serves again. Real etcd, a
real `serve --store` replica whose store traffic passes through a relay that the test
cuts (a partition between the replica and etcd only)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from tests.conftest import AdsClient, make_spec_doc
from tests.support import wait_for
from tests.test_ha_replicas import start_replica
from xds_server.ha.etcd import parse_store_url
from xds_server.ha.store import EtcdStore
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.procs import free_port
from xds_server.lab.relay import Relay
from xds_server.xds.service import HEALTH_SERVICE, NOT_SERVING, SERVING
from xds_server.xds.types import CLUSTER

PREFIX = "/test-step-aside"


def health(port: int) -> bytes | str:
    """The replica's answer to grpc.health.v1 Check on its xDS port (raw bytes), or the
    gRPC status code's name when it gives none."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary(f"/{HEALTH_SERVICE}/Check")
        try:
            return bytes(check(b"", timeout=2))
        except grpc.RpcError as exc:
            return str(exc.code().name)


def registered(url: str) -> bool:
    store = EtcdStore(parse_store_url(url, PREFIX))
    try:
        store.read()
        return "cut" in store.view.replicas
    finally:
        store.close()


@pytest.fixture
def relay(shared_etcd: EtcdCluster) -> Iterator[Relay]:
    member = shared_etcd.members[0]
    relay = Relay(("127.0.0.1", member.client_port))
    yield relay
    relay.close()


def test_a_replica_cut_off_from_the_store_steps_aside_and_comes_back(
    tmp_path: Path, shared_etcd: EtcdCluster, relay: Relay
) -> None:
    ports = {(r, p): free_port() for r in ("us-east",) for p in ("production", "canary")}
    spec = tmp_path / "mesh.yaml"
    spec.write_text(yaml.safe_dump(make_spec_doc(ports, regions=("us-east",))))
    replica = start_replica(
        tmp_path, f"etcd://{relay.address}", "cut", "--store-prefix", PREFIX, spec=spec
    )
    try:
        wait_for(lambda: registered(shared_etcd.url), "its key in the store", timeout=20)
        wait_for(lambda: health(replica.xds) == SERVING, "SERVING", timeout=10)
        node = AdsClient(replica.xds, node_id="n1")
        node.send(CLUSTER)
        assert node.recv().type_url == CLUSTER

        relay.cut()
        wait_for(lambda: health(replica.xds) == NOT_SERVING, "NOT_SERVING", timeout=10)
        with pytest.raises(grpc.RpcError) as ended:
            while True:  # (responses already queued come first)
                node.recv(timeout=5)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "has not reached the store" in str(ended.value.details())
        refused = AdsClient(replica.xds, node_id="n2")
        refused.send(CLUSTER)
        with pytest.raises(grpc.RpcError) as raised:
            refused.recv()
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        node.close()
        refused.close()

        relay.heal()
        wait_for(lambda: health(replica.xds) == SERVING, "SERVING again", timeout=15)
        back = AdsClient(replica.xds, node_id="n3")
        back.send(CLUSTER)
        assert back.recv().type_url == CLUSTER
        back.close()
        assert "stepping aside" in replica.process.tail(400)
    finally:
        replica.process.stop()

"""Shared fixtures: an in-process xDS server on its own event loop thread, model servers,
real Envoys, and a gRPC test client for the ADS protocol."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2

from xds_server.lab.background import BackgroundServer
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.procs import Envoy, free_port
from xds_server.lab.upstream import ModelServer
from xds_server.render.bootstrap import BootstrapOptions
from xds_server.spec import MeshSpec, load_spec
from xds_server.xds.publisher import XdsPublisher
from xds_server.xds.resources import RegionResources

T = TypeVar("T")
REGIONS = ("us-east", "eu-west", "ap-south")


ServerThread = BackgroundServer


class HandEditedPublisher(XdsPublisher):
    """A real publisher that can serve a hand-made resource in place of the built one of
    the same name: the builder never makes a config Envoy rejects, so a test that needs
    an Envoy to NACK makes one here."""

    def __init__(self, spec: MeshSpec, **kw: Any) -> None:
        self.replaced: dict[tuple[str, str, str], Any] = {}
        super().__init__(spec, **kw)  # (builds every region, through build_resources)

    def replace_resource(self, region: str, type_url: str, resource: Any) -> None:
        name = getattr(resource, "name", "") or getattr(resource, "cluster_name", "")
        self.replaced[(region, type_url, name)] = resource
        self.apply_spec(self.spec, "hand-edited resource")
        self.flush()

    def build_resources(self, region: str) -> RegionResources:
        built = super().build_resources(region)
        mine = {(t, n): r for (reg, t, n), r in self.replaced.items() if reg == region}
        if not mine:
            return built
        by_type = {t: dict(items) for t, items in built.by_type.items()}
        for (type_url, name), resource in mine.items():
            by_type[type_url][name] = resource
        return RegionResources(region, by_type)


def make_spec_doc(
    ports: dict[tuple[str, str], int],
    pools: tuple[str, ...] = ("production", "canary"),
    regions: tuple[str, ...] = REGIONS,
) -> dict[str, Any]:
    return {
        "regions": list(regions),
        "listener": {"port": 10000},
        "services": [
            {
                "name": "recommender",
                "domains": ["*"],
                "prefix": "/",
                "pools": {
                    pool: {
                        "version": "v2" if pool == "canary" else "v1",
                        "endpoints": {r: [f"127.0.0.1:{ports[(r, pool)]}"] for r in regions},
                    }
                    for pool in pools
                },
            }
        ],
    }


def write_spec(path: Path, doc: dict[str, Any]) -> MeshSpec:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_spec(path)


@pytest.fixture
def upstreams() -> Iterator[dict[tuple[str, str], ModelServer]]:
    """A model server per (region, pool), on free loopback ports."""
    servers = {
        (r, pool): ModelServer(
            ("127.0.0.1", 0), r, pool, "v2" if pool == "canary" else "v1"
        ).start_in_thread()
        for r in REGIONS
        for pool in ("production", "baseline", "canary")
    }
    yield servers
    for s in servers.values():
        s.shutdown()
        s.server_close()


@pytest.fixture
def spec_file(tmp_path: Path, upstreams: dict[tuple[str, str], ModelServer]) -> Path:
    path = tmp_path / "mesh.yaml"
    write_spec(path, make_spec_doc({k: s.port for k, s in upstreams.items()}))
    return path


@pytest.fixture
def server(spec_file: Path) -> Iterator[ServerThread]:
    st = ServerThread(load_spec(spec_file), spec_file, publisher=HandEditedPublisher)
    st.start()
    yield st
    st.close()


class EnvoyFactory:
    def __init__(self, workdir: Path, delta: bool = False) -> None:
        self.workdir = workdir
        self.delta = delta
        self.tls_ca: str | None = None
        self.started: list[Envoy] = []

    def start(
        self, region: str, xds_port: int, node_id: str | None = None, listen_port: int | None = None
    ) -> Envoy:
        listen_port = listen_port or free_port()
        node_id = node_id or f"{region}-{len(self.started) + 1}"
        envoy = Envoy(
            BootstrapOptions(
                region=region,
                node_id=node_id,
                xds_port=xds_port,
                admin_port=free_port(),
                listen=f"127.0.0.1:{listen_port}",
                delta=self.delta,
                xds_tls_ca=self.tls_ca,
            ),
            self.workdir,
        )
        envoy.listen_port = listen_port  # type: ignore[attr-defined]
        self.started.append(envoy)
        return envoy

    def stop_all(self) -> None:
        for e in self.started:
            e.stop()


@pytest.fixture(params=["sotw", "delta"])
def envoys(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EnvoyFactory]:
    """Real Envoys, speaking state-of-the-world xDS or delta xDS (each test runs twice)."""
    factory = EnvoyFactory(tmp_path / "envoy", delta=request.param == "delta")
    yield factory
    factory.stop_all()


class _RawStream:
    """One raw ADS stream over real gRPC; a thread reads responses into a queue."""

    method = ""

    def __init__(
        self,
        port: int,
        region: str = "us-east",
        node_id: str = "test-node",
        listen: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        target = f"127.0.0.1:{port}"
        self.channel = (
            grpc.secure_channel(target, credentials)
            if credentials is not None
            else grpc.insecure_channel(target)
        )
        self.requests: queue.Queue[Any] = queue.Queue()
        self.responses: queue.Queue[Any] = queue.Queue()
        self.node = base_pb2.Node(
            id=node_id, cluster=region, locality=base_pb2.Locality(region=region)
        )
        if listen:
            self.node.metadata.CopyFrom(
                struct_pb2.Struct(
                    fields={"xds_server.listen": struct_pb2.Value(string_value=listen)}
                )
            )
        self._first = True
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = getattr(stub, self.method)(iter(self.requests.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                self.responses.put(resp)
        except Exception as exc:
            self.responses.put(exc)

    def _put(self, req: Any, error: str | None) -> None:
        if self._first:  # the node goes in the first request only, as Envoy sends it
            req.node.CopyFrom(self.node)
            self._first = False
        if error is not None:
            req.error_detail.code = 3
            req.error_detail.message = error
        self.requests.put(req)

    def recv(self, timeout: float = 5.0) -> Any:
        item = self.responses.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.channel.close()


class AdsClient(_RawStream):
    """State of the world."""

    method = "StreamAggregatedResources"

    def send(
        self,
        type_url: str,
        names: list[str] | None = None,
        version: str = "",
        nonce: str = "",
        error: str | None = None,
    ) -> None:
        self._put(
            discovery_pb2.DiscoveryRequest(
                type_url=type_url,
                resource_names=names or [],
                version_info=version,
                response_nonce=nonce,
            ),
            error,
        )

    def ack(self, resp: Any, names: list[str] | None = None) -> None:
        self.send(resp.type_url, names, resp.version_info, resp.nonce)


class DeltaClient(_RawStream):
    """Delta (incremental)."""

    method = "DeltaAggregatedResources"

    def send(
        self,
        type_url: str,
        subscribe: list[str] | None = None,
        unsubscribe: list[str] | None = None,
        nonce: str = "",
        initial: dict[str, str] | None = None,
        error: str | None = None,
    ) -> None:
        self._put(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url,
                resource_names_subscribe=subscribe or [],
                resource_names_unsubscribe=unsubscribe or [],
                response_nonce=nonce,
                initial_resource_versions=initial or {},
            ),
            error,
        )

    def ack(self, resp: Any) -> None:
        self.send(resp.type_url, nonce=resp.nonce)


def _factory(cls: type[T]) -> Iterator[Callable[..., T]]:
    made: list[Any] = []

    def make(port: int, **kw: Any) -> T:
        made.append(cls(port, **kw))
        return made[-1]  # type: ignore[no-any-return]

    yield make
    for c in made:
        c.close()


@pytest.fixture
def ads_clients() -> Iterator[Callable[..., AdsClient]]:
    yield from _factory(AdsClient)


@pytest.fixture
def delta_clients() -> Iterator[Callable[..., DeltaClient]]:
    yield from _factory(DeltaClient)


def broken_route() -> Any:
    """A route whose weighted_clusters names no cluster: Envoy's validation rejects it."""
    from envoy.config.route.v3 import route_components_pb2, route_pb2

    from xds_server.xds.resources import ROUTE_CONFIG_NAME

    return route_pb2.RouteConfiguration(
        name=ROUTE_CONFIG_NAME,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="broken",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(
                            weighted_clusters=route_components_pb2.WeightedCluster()
                        ),
                    )
                ],
            )
        ],
    )


@pytest.fixture
def self_signed_cert(tmp_path: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, made by openssl: the certificate is its own CA."""
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A real three-member etcd cluster (Debian's etcd-server) on loopback ports."""
    with EtcdCluster(tmp_path / "etcd") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One cluster for a test file's tests that neither kill nor pause a member (each
    test keeps to its own prefix, as meshes do); those that do get their own
    (`etcd_cluster`)."""
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster

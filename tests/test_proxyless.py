"""Proxyless gRPC clients: an application dialing `xds:///recommender` with the gRPC
library's own xDS client gets the split of its region, as the region's Envoys do.

Real parts only: the real server on loopback, two gRPC upstream servers in this process
(a generic handler answering its version), the grpcio xDS client in a process of its
own (bootstrap from the real `xds-server bootstrap --proxyless`), the real `xdsctl`, a
real Envoy beside it. Protocol details are checked with the raw ADS clients of
conftest.py. Nothing sleeps to synchronise: every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from tests.support import wait_for
from xds_server.admin.service import AdminService, run_admin_server
from xds_server.app import Running
from xds_server.lab.background import BackgroundServer
from xds_server.lab.procs import free_port
from xds_server.spec import validate_spec
from xds_server.traffic import Split
from xds_server.xds.dataplane import Applied
from xds_server.xds.resources import LISTENER_NAME, ROUTE_CONFIG_NAME, proxyless_route_name
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

from .conftest import AdsClient, DeltaClient, EnvoyFactory
from .test_ads_protocol import unpack

SERVICE = "recommender"
OTHER = "ranker"
REGIONS = ("us-east", "eu-west")
METHOD = "/test.Version/Get"
GRPC_AGENT = "gRPC C-core linux Python"
"""What grpcio 1.85 sends as node.user_agent_name (the raw clients pose as it)."""
CALLS = 300
MAX_OFF_POINTS = 8.0
"""300 calls at 20%: a binomial sd of 2.3 points; 8 points is 3.5 sd (p ~ 5e-4)."""

CLIENT_SCRIPT = """
import collections, json, sys
import grpc

channel = grpc.insecure_channel(sys.argv[1])
call = channel.unary_unary(sys.argv[2])  # raw bytes: no serializers


def one():
    try:
        return call(b"", timeout=5).decode()
    except grpc.RpcError as exc:
        return "error " + exc.code().name


for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "count":  # count N: N calls, answers per version
        out = collections.Counter(one() for _ in range(int(args[0])))
    elif cmd == "settle":  # settle V RUN LIMIT: call until RUN answers in a row are V
        run = calls = 0
        while run < int(args[1]) and calls < int(args[2]):
            calls += 1
            run = run + 1 if one() == args[0] else 0
        out = {"settled": run >= int(args[1]), "calls": calls}
    else:
        out = {"error": "unknown command " + cmd}
    print(json.dumps(out), flush=True)
"""


# ---- upstreams, the server, the client process ----


def _upstream(version: str) -> tuple[grpc.Server, int]:
    """A gRPC server whose one method answers `version` (bytes in, bytes out)."""
    handler = grpc.method_handlers_generic_handler(
        "test.Version",
        {"Get": grpc.unary_unary_rpc_method_handler(lambda req, ctx: version.encode())},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.fixture
def grpc_upstreams() -> Iterator[dict[str, int]]:
    """Production answers v1, canary v2; pool -> port."""
    made = {"production": _upstream("v1"), "canary": _upstream("v2")}
    yield {pool: port for pool, (_, port) in made.items()}
    for server, _ in made.values():
        server.stop(0)


def spec_doc(ports: dict[str, int], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """recommender (production + canary, by name and by a domain), ranker (production),
    and any `extra` services (production only), in both regions."""

    def service(name: str, pools: tuple[str, ...], domains: list[str]) -> dict[str, Any]:
        return {
            "name": name,
            "domains": domains,
            "prefix": "/",
            "pools": {
                p: {
                    "version": "v2" if p == "canary" else "v1",
                    "endpoints": {r: [f"127.0.0.1:{ports[p]}"] for r in REGIONS},
                }
                for p in pools
            },
        }

    return {
        "regions": list(REGIONS),
        "listener": {"port": 10000},
        "services": [
            service(SERVICE, ("production", "canary"), ["recommender.mesh.test", "*"]),
            service(OTHER, ("production",), ["ranker.mesh.test"]),
            *(service(name, ("production",), [f"{name}.mesh.test"]) for name in extra),
        ],
    }


@pytest.fixture
def xds(grpc_upstreams: dict[str, int]) -> Iterator[BackgroundServer]:
    server = BackgroundServer(validate_spec(spec_doc(grpc_upstreams), "proxyless"))
    server.start()
    yield server
    server.close()


def bootstrap(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI: `xds-server bootstrap ARGS`."""
    return subprocess.run(
        [sys.executable, "-m", "xds_server.cli", "bootstrap", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


class GrpcClient:
    """The grpcio xDS client in a process of its own, on one channel to `xds:///SERVICE`
    for its whole life (so it follows every change), driven line by line over stdin."""

    def __init__(self, workdir: Path, port: int, region: str, node_id: str, *tls: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        made = bootstrap(
            "--proxyless",
            *("--region", region, "--node-id", node_id, "--xds-address", f"127.0.0.1:{port}"),
            *tls,
        )
        assert made.returncode == 0, made.stderr
        boot = workdir / f"{node_id}-bootstrap.json"
        boot.write_text(made.stdout)
        script = workdir / "grpc_client.py"
        script.write_text(CLIENT_SCRIPT)
        self.log = workdir / f"{node_id}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), f"xds:///{SERVICE}", METHOD],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(boot)},
            )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def ask(self, command: str, timeout: float = 60) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        try:
            return json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise AssertionError(f"the gRPC client did not answer {command!r}:\n{tail}") from None

    def count(self, calls: int = CALLS) -> Counter[str]:
        return Counter(self.ask(f"count {calls}"))

    def settle(self, version: str, run: int = 20, limit: int = 500) -> None:
        """Let the client's balancer take the routes it ACKed (that happens just after
        the ACK): call until `run` answers in a row come from `version` (bounded)."""
        got = self.ask(f"settle {version} {run} {limit}")
        assert got["settled"], f"no {run} answers in a row from {version} in {limit} calls"

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the client's loop ends: it exits
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def grpc_clients(tmp_path: Path) -> Iterator[Callable[..., GrpcClient]]:
    made: list[GrpcClient] = []

    def make(port: int, region: str, node_id: str, *tls: str) -> GrpcClient:
        made.append(GrpcClient(tmp_path / "grpc", port, region, node_id, *tls))
        return made[-1]

    yield make
    for c in made:
        c.close()


def set_canary(server: BackgroundServer, percent: float, region: str = "us-east") -> str:
    """Route `percent` of the region's recommender calls to the canary; the new routes
    version."""
    split = Split.from_percent({"canary": percent})
    server.call(lambda: server.server.set_split(SERVICE, split, [region], urgent=True))
    return server.route_version(region)


def wait_applied(server: BackgroundServer, region: str, version: str, nodes: int) -> Applied:
    """The rollout's ACK gate: every node of the region that counts ACKed `version`."""

    def applied() -> Applied | None:
        status = server.call(lambda: server.server.routes_applied(region))
        if isinstance(status, Applied) and status.version == version and status.nodes == nodes:
            return status
        return None

    return wait_for(applied, f"{region}'s routes {version} applied by {nodes} node(s)", timeout=20)


def share(counts: Counter[str], version: str) -> float:
    return 100 * counts[version] / sum(counts.values())


@pytest.fixture
def admin_port(xds: BackgroundServer) -> Iterator[int]:
    """The admin API (what `xdsctl` talks to) on the server's loop; its port."""
    port = free_port()
    admin = AdminService(Running(xds.server))
    serving = asyncio.run_coroutine_threadsafe(
        run_admin_server(admin, f"127.0.0.1:{port}"), xds.loop
    )
    yield port
    serving.cancel()


def xdsctl_nodes(port: int, region: str) -> list[dict[str, Any]]:
    """`xdsctl nodes --region R --output json`, the real CLI; [] when it fails."""
    argv = [sys.executable, "-m", "xds_server.ctl", "--server", f"127.0.0.1:{port}"]
    argv += ["--output", "json", "nodes", "--region", region]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return list(json.loads(res.stdout)) if res.returncode == 0 else []


# ---- real gRPC clients ----


def test_grpc_client_follows_its_regions_split_and_the_rollback(
    xds: BackgroundServer, grpc_clients: Callable[..., GrpcClient], admin_port: int
) -> None:
    """One channel to `xds:///recommender` per client, for the whole test: us-east's
    client takes 0% -> 20% -> 0% canary as the weights change (its ACKs are what the
    rollout's gate waits for), eu-west's keeps its region's split (production only);
    `xdsctl nodes` shows the client SYNCED, and it is a gRPC client."""
    east = grpc_clients(xds.port, "us-east", "grpc-east-1")
    west = grpc_clients(xds.port, "eu-west", "grpc-west-1")
    assert east.count(50) == Counter({"v1": 50})
    version = set_canary(xds, 20)
    wait_applied(xds, "us-east", version, nodes=1)  # the gRPC client's ACK counts
    east.settle("v2", run=1)
    counts = east.count()
    assert set(counts) == {"v1", "v2"}, counts
    assert abs(share(counts, "v2") - 20) <= MAX_OFF_POINTS, counts
    # eu-west keeps its own split: production only.
    assert west.count(100) == Counter({"v1": 100})
    # Rollback: every call reaches production again.
    version = set_canary(xds, 0)
    wait_applied(xds, "us-east", version, nodes=1)
    east.settle("v1", run=50)
    assert east.count() == Counter({"v1": CALLS})

    # The admin API, through the real xdsctl: SYNCED, and a gRPC client.
    def synced() -> dict[str, Any] | None:
        nodes = xdsctl_nodes(admin_port, "us-east")
        return next((n for n in nodes if n["sync_state"] == "SYNCED"), None)

    node = wait_for(synced, "the gRPC node to show SYNCED in xdsctl nodes", timeout=20)
    assert node["id"] == "grpc-east-1" and node["user_agent"].startswith(GRPC_AGENT)
    assert node["client_type"] == "grpc"
    route = next(t for t in node["types"] if t["type"] == "route")
    assert route["acked_version"] == version
    (status,) = xds.call(lambda: xds.server.node_status("us-east"))
    assert status.client_type == "grpc"


def test_an_envoy_beside_grpc_clients_gets_only_its_listener(
    xds: BackgroundServer, grpc_clients: Callable[..., GrpcClient], envoys: EnvoyFactory
) -> None:
    """A real Envoy (state of the world, then delta) on the same server as a gRPC
    client: it gets its `ingress` listener and routes only (an API listener would make
    it reject the update), both nodes' ACKs count, and both stay SYNCED."""
    client = grpc_clients(xds.port, "us-east", "grpc-east-1")
    assert client.count(20) == Counter({"v1": 20})
    envoy = envoys.start("us-east", xds.port)
    envoy.wait_ready()
    version = set_canary(xds, 30)
    wait_applied(xds, "us-east", version, nodes=2)  # both ACKs count
    dump = envoy.config_dump()["configs"]
    listeners = next(c for c in dump if c["@type"].endswith(".ListenersConfigDump"))
    names = [x["name"] for x in listeners.get("dynamic_listeners", [])]
    assert names == [LISTENER_NAME]
    routes = next(c for c in dump if c["@type"].endswith(".RoutesConfigDump"))
    got = [r["route_config"]["name"] for r in routes.get("dynamic_route_configs", [])]
    assert got == [ROUTE_CONFIG_NAME]

    def both_synced() -> bool:
        nodes = xds.call(lambda: xds.server.node_status("us-east"))
        snap = xds.call(lambda: xds.server.snapshot("us-east"))
        current = {t: snap.type_version(t) for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)}
        kinds = sorted(n.client_type for n in nodes if n.overall_sync(current) == "SYNCED")
        return kinds == ["envoy", "grpc"]

    wait_for(both_synced, "the Envoy and the gRPC client to be SYNCED", timeout=20)


@pytest.fixture
def mtls_xds(
    grpc_upstreams: dict[str, int], tmp_path: Path
) -> Iterator[tuple[BackgroundServer, Path]]:
    root = Path(__file__).resolve().parent.parent
    certs = tmp_path / "certs"
    subprocess.run(
        ["bash", str(root / "hack" / "make-certs.sh"), str(certs), "us-east/grpc-east-1"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    tls = ((certs / "server.pem").read_bytes(), (certs / "server.key").read_bytes())
    spec = validate_spec(spec_doc(grpc_upstreams), "proxyless")
    server = BackgroundServer(spec, tls=tls, client_ca=(certs / "ca.pem").read_bytes())
    server.start()
    yield server, certs
    server.close()


def test_grpc_client_over_mtls_with_the_bootstraps_tls_options(
    mtls_xds: tuple[BackgroundServer, Path], grpc_clients: Callable[..., GrpcClient]
) -> None:
    """`--xds-tls-*` become gRPC's `tls` channel credentials; the server checks the
    client certificate names the node (region and id) as it does for Envoys."""
    server, certs = mtls_xds
    node = certs / "us-east" / "grpc-east-1"
    client = grpc_clients(
        server.port,
        "us-east",
        "grpc-east-1",
        *("--xds-tls-ca", str(certs / "ca.pem")),
        *("--xds-tls-cert", f"{node}.pem", "--xds-tls-key", f"{node}.key"),
    )
    assert client.count(20) == Counter({"v1": 20})
    (status,) = server.call(lambda: server.server.node_status("us-east"))
    assert status.identity.endswith("/region/us-east/node/grpc-east-1"), status.identity


# ---- the protocol, with raw clients posing as gRPC ----


def grpc_like(make: Callable[..., Any], port: int, node_id: str = "grpc-raw") -> Any:
    client = make(port, node_id=node_id)
    client.node.user_agent_name = GRPC_AGENT
    return client


def api_listener_route(listener: listener_pb2.Listener) -> str:
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.api_listener.api_listener.Unpack(hcm)
    assert [f.name for f in hcm.http_filters] == ["envoy.filters.http.router"]
    assert hcm.rds.config_source.HasField("ads")
    return str(hcm.rds.route_config_name)


def test_named_listeners_are_api_listeners_of_services_and_domains(
    xds: BackgroundServer, ads_clients: Callable[..., AdsClient]
) -> None:
    c = grpc_like(ads_clients, xds.port)
    c.send(LISTENER, [SERVICE, "ranker.mesh.test", "no-such-service", "*.mesh.test"])
    got = {x.name: x for x in unpack(c.recv(), listener_pb2.Listener)}
    assert sorted(got) == sorted([SERVICE, "ranker.mesh.test"])  # unknown names: absent
    assert not got[SERVICE].HasField("address")
    assert api_listener_route(got[SERVICE]) == proxyless_route_name(SERVICE)
    assert api_listener_route(got["ranker.mesh.test"]) == proxyless_route_name(OTHER)
    # Envoy's wildcard subscription gets its listener, and only it.
    envoy = ads_clients(xds.port, node_id="envoy-like")
    envoy.send(LISTENER)
    (only,) = unpack(envoy.recv(), listener_pb2.Listener)
    assert only.name == LISTENER_NAME and only.address.socket_address.port_value == 10000


def test_a_grpc_client_gets_its_services_routes_and_only_the_clusters_it_names(
    xds: BackgroundServer, ads_clients: Callable[..., AdsClient]
) -> None:
    set_canary(xds, 25)
    c = grpc_like(ads_clients, xds.port)
    c.send(ROUTE, [proxyless_route_name(SERVICE)])
    (rc,) = unpack(c.recv(), route_pb2.RouteConfiguration)
    (vh,) = rc.virtual_hosts
    assert list(vh.domains) == ["*"]  # whatever authority the client dials
    ingress = xds.call(lambda: xds.server.snapshot("us-east").resources.by_type[ROUTE])
    envoys_vh = next(v for v in ingress[ROUTE_CONFIG_NAME].virtual_hosts if v.name == SERVICE)
    assert list(vh.routes) == list(envoys_vh.routes)  # the region's split, exactly
    c.send(CLUSTER, ["recommender|canary"])
    (cluster,) = unpack(c.recv(), cluster_pb2.Cluster)
    assert cluster.name == "recommender|canary"  # named: only what it names
    c.send(ENDPOINT, ["recommender|canary"])
    (cla,) = unpack(c.recv(), endpoint_pb2.ClusterLoadAssignment)
    (locality,) = cla.endpoints
    assert locality.load_balancing_weight.value == 1  # gRPC drops a locality without one


def sync_like_grpc(c: AdsClient) -> dict[str, Any]:
    """A gRPC client's order: its listener, its routes, then the clusters those use."""
    got = {}
    for type_url, names in (
        (LISTENER, [SERVICE]),
        (ROUTE, [proxyless_route_name(SERVICE)]),
        (CLUSTER, ["recommender|production"]),
        (ENDPOINT, ["recommender|production"]),
    ):
        c.send(type_url, names)
        got[type_url] = r = c.recv()
        assert r.type_url == type_url and len(r.resources) == 1
        c.ack(r, names)
    return got


def test_the_route_gate_judges_a_grpc_client_on_the_clusters_it_asked_for(
    xds: BackgroundServer, ads_clients: Callable[..., AdsClient]
) -> None:
    """A canary cluster a gRPC client has not asked for (it asks once routes name it)
    does not hold its routes back; their ACK is what the rollout's gate counts. A gRPC
    client of a target the spec lacks never asks for routes and is not waited for."""
    c = grpc_like(ads_clients, xds.port)
    got = sync_like_grpc(c)
    lost = grpc_like(ads_clients, xds.port, node_id="grpc-lost")
    lost.send(LISTENER, ["no-such-service"])
    assert lost.recv().resources == []
    version = set_canary(xds, 20)
    rds = c.recv()
    assert rds.type_url == ROUTE and rds.version_info == version
    status = xds.call(lambda: xds.server.routes_applied("us-east"))
    assert not isinstance(status, Applied)  # sent, not yet ACKed
    c.ack(rds, [proxyless_route_name(SERVICE)])
    assert wait_applied(xds, "us-east", version, nodes=1).nodes == 1
    # It then asks for the canary's cluster and endpoints, and gets them.
    both = ["recommender|canary", "recommender|production"]
    c.send(CLUSTER, both, got[CLUSTER].version_info, got[CLUSTER].nonce)
    cds = c.recv()
    assert sorted(x.name for x in unpack(cds, cluster_pb2.Cluster)) == both


def test_a_new_service_reaches_a_grpc_client_waiting_for_it(
    xds: BackgroundServer, ads_clients: Callable[..., AdsClient], grpc_upstreams: dict[str, int]
) -> None:
    """API listeners follow the spec's services: the listeners' version changes when
    they do, so a client that asked for a name before it existed gets it."""
    c = grpc_like(ads_clients, xds.port)
    c.send(LISTENER, ["scorer"])
    first = c.recv()
    assert first.resources == []
    c.ack(first, ["scorer"])
    spec = validate_spec(spec_doc(grpc_upstreams, extra=("scorer",)), "grown")
    xds.call(lambda: xds.server.apply_spec(spec, "a new service"))
    xds.call(xds.server.flush)
    nxt = c.recv()
    assert nxt.type_url == LISTENER and int(nxt.version_info) > int(first.version_info)
    (listener,) = unpack(nxt, listener_pb2.Listener)
    assert api_listener_route(listener) == proxyless_route_name("scorer")


def test_delta_api_listeners_and_routes(
    xds: BackgroundServer, delta_clients: Callable[..., DeltaClient]
) -> None:
    """gRPC speaks state of the world; a delta client asking by name gets the same."""
    c = grpc_like(delta_clients, xds.port)
    c.send(LISTENER, subscribe=[SERVICE, "no-such-service"])
    r = c.recv()
    assert [x.name for x in r.resources] == [SERVICE]
    assert list(r.removed_resources) == ["no-such-service"]
    listener = listener_pb2.Listener()
    assert r.resources[0].resource.Unpack(listener)
    assert api_listener_route(listener) == proxyless_route_name(SERVICE)
    c.ack(r)
    c.send(ROUTE, subscribe=[proxyless_route_name(SERVICE)])
    first = c.recv()
    assert [x.name for x in first.resources] == [proxyless_route_name(SERVICE)]
    c.ack(first)
    set_canary(xds, 40)
    nxt = c.recv()
    assert nxt.type_url == ROUTE and [x.name for x in nxt.resources] == [
        proxyless_route_name(SERVICE)
    ]
    assert nxt.resources[0].version != first.resources[0].version
    rc = route_pb2.RouteConfiguration()
    assert nxt.resources[0].resource.Unpack(rc)
    split = {
        w.name: w.weight.value
        for w in rc.virtual_hosts[0].routes[-1].route.weighted_clusters.clusters
    }
    assert split == {"recommender|production": 6000, "recommender|canary": 4000}
    # Envoy's wildcard: its listener only.
    envoy = delta_clients(xds.port, node_id="envoy-like")
    envoy.send(LISTENER)
    assert [x.name for x in envoy.recv().resources] == [LISTENER_NAME]


# ---- the bootstrap ----


def test_bootstrap_proxyless_shape() -> None:
    made = bootstrap(
        "--proxyless",
        *("--region", "us-east", "--node-id", "grpc-1"),
        *("--xds-address", "127.0.0.1:18000,xds.mesh.test:18001,[::1]:18002"),
    )
    assert made.returncode == 0, made.stderr
    doc = json.loads(made.stdout)
    assert doc["node"] == {"id": "grpc-1", "cluster": "us-east", "locality": {"region": "us-east"}}
    servers = doc["xds_servers"]
    assert [s["server_uri"] for s in servers] == [
        "127.0.0.1:18000",
        "xds.mesh.test:18001",
        "[::1]:18002",
    ]
    for s in servers:
        assert s["channel_creds"] == [{"type": "insecure"}]
        assert s["server_features"] == ["xds_v3"]
    tls = bootstrap(
        "--proxyless",
        *("--region", "us-east", "--node-id", "grpc-1", "--xds-address", "10.0.0.1:18000"),
        *("--xds-tls-ca", "/certs/ca.pem"),
        *("--xds-tls-cert", "/certs/n.pem", "--xds-tls-key", "/certs/n.key"),
    )
    assert tls.returncode == 0, tls.stderr
    (server,) = json.loads(tls.stdout)["xds_servers"]
    assert server["channel_creds"] == [
        {
            "type": "tls",
            "config": {
                "ca_certificate_file": "/certs/ca.pem",
                "certificate_file": "/certs/n.pem",
                "private_key_file": "/certs/n.key",
            },
        }
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--xds-address", "nowhere"), "--xds-address: expected 'HOST:PORT', got 'nowhere'"),
        (("--xds-address", "127.0.0.1:0"), "--xds-address: port must be from 1 to 65535"),
        (("--xds-address", "a:1,,b:2"), "--xds-address: expected 'HOST:PORT', got ''"),
        (("--delta",), "--delta: Envoy options, not for --proxyless"),
        (("--listen", "127.0.0.1:1"), "--listen: Envoy options, not for --proxyless"),
        (("--xds-tls-cert", "/c.pem"), "--xds-tls-cert and --xds-tls-key go together"),
        (("--node-id", " "), "--node-id: must not be empty"),
    ],
)
def test_bootstrap_proxyless_bad_input_is_one_clear_line(
    args: tuple[str, ...], message: str
) -> None:
    made = bootstrap("--proxyless", "--region", "us-east", "--node-id", "grpc-1", *args)
    assert made.returncode == 2 and made.stdout == ""
    (line,) = made.stderr.splitlines()
    assert line.startswith("xds-server: " + message), line

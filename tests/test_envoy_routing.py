"""The xDS server driving real Envoy 1.40 processes, one per region, over loopback."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import yaml

from tests.support import set_canary, wait_for
from xds_server.lab.procs import Envoy, http_get
from xds_server.lab.upstream import ModelServer
from xds_server.traffic import Split
from xds_server.xds.types import ROUTE

from .conftest import REGIONS, EnvoyFactory, HandEditedPublisher, ServerThread, broken_route


def get(envoy: Envoy, path: str = "/predict") -> tuple[int, dict[str, str]]:
    status, body, _ = http_get(f"http://127.0.0.1:{envoy.listen_port}{path}")  # type: ignore[attr-defined]
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {"raw": body.decode(errors="replace")}


def pools_seen(envoy: Envoy, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        status, body = get(envoy)
        seen[body.get("pool", f"HTTP {status}")] += 1
    return seen


def wait_applied(server: ServerThread, envoy: Envoy, timeout: float = 10) -> None:
    """Wait until the Envoy's own admin endpoint reports the server's current routes."""
    want = server.route_version(envoy.opts.region, envoy.opts.delta)
    wait_for(
        lambda: envoy.applied_versions().get("route") == want,
        f"{envoy.name} to apply route version {want}",
        timeout=timeout,
    )


def start_region_envoys(server: ServerThread, envoys: EnvoyFactory) -> dict[str, Envoy]:
    started = {r: envoys.start(r, server.port) for r in REGIONS}
    for e in started.values():
        e.wait_ready()
    return started


def test_each_region_routes_to_its_production_pool(
    server: ServerThread, envoys: EnvoyFactory
) -> None:
    for region, envoy in start_region_envoys(server, envoys).items():
        status, body = get(envoy)
        assert status == 200
        assert (body["region"], body["pool"], body["version"]) == (region, "production", "v1")
        nodes = server.call(lambda r=region: server.server.nodes.nodes(r))
        assert [n.node_id for n in nodes] == [envoy.opts.node_id]


def test_fifty_fifty_split(server: ServerThread, envoys: EnvoyFactory) -> None:
    started = start_region_envoys(server, envoys)
    set_canary(server, 50, urgent=False)
    n = 400
    for envoy in started.values():
        wait_applied(server, envoy)
        seen = pools_seen(envoy, n)
        assert set(seen) == {"production", "canary"}, seen
        # Binomial(400, 0.5): sd = 10; 4 sd either side fails a correct split ~1 in 16,000.
        assert abs(seen["canary"] - n / 2) <= 40, seen


def test_spec_file_edit_reroutes_live_envoys(
    server: ServerThread,
    envoys: EnvoyFactory,
    spec_file: Path,
    upstreams: dict[tuple[str, str], ModelServer],
) -> None:
    server.watch_spec()
    envoy = envoys.start("eu-west", server.port)
    envoy.wait_ready()
    assert get(envoy)[1]["pool"] == "production"
    doc = yaml.safe_load(spec_file.read_text())
    new_target = upstreams[("eu-west", "baseline")].port
    doc["services"][0]["pools"]["production"]["endpoints"]["eu-west"] = [f"127.0.0.1:{new_target}"]
    spec_file.write_text(yaml.safe_dump(doc))
    # The baseline model server answers "baseline": the Envoy now uses the new endpoint.
    wait_for(
        lambda: get(envoy)[1].get("pool") == "baseline", "Envoy to use the new endpoint", timeout=5
    )


def test_invalid_spec_edit_keeps_serving(
    server: ServerThread, envoys: EnvoyFactory, spec_file: Path
) -> None:
    server.watch_spec()
    envoy = envoys.start("us-east", server.port)
    envoy.wait_ready()
    version = server.route_version("us-east")
    spec_file.write_text(spec_file.read_text().replace("production:", "prodution:"))
    server.reload_spec("test")
    assert server.route_version("us-east") == version
    assert get(envoy)[1]["pool"] == "production"


def test_nack_keeps_last_good_config(server: ServerThread, envoys: EnvoyFactory) -> None:
    envoy = envoys.start("us-east", server.port)
    envoy.wait_ready()
    good = server.route_version("us-east")
    good_as_envoy_says = server.route_version("us-east", envoy.opts.delta)
    edited = server.server
    assert isinstance(edited, HandEditedPublisher)
    server.call(lambda: edited.replace_resource("us-east", ROUTE, broken_route()))
    bad_version = server.route_version("us-east")

    def nacked() -> object:
        (node,) = server.call(lambda: server.server.nodes.nodes("us-east"))
        ts = node.types[ROUTE]
        return node if ts.nack_version == bad_version else None

    node = wait_for(nacked, "Envoy to NACK the broken route", timeout=10)
    ts = node.types[ROUTE]  # type: ignore[attr-defined]
    assert "clusters" in ts.nack_error.lower(), ts.nack_error
    assert ts.acked_version == good
    assert node.sync_state(ROUTE, bad_version) == "NACKED"  # type: ignore[attr-defined]
    assert envoy.applied_versions()["route"] == good_as_envoy_says
    assert pools_seen(envoy, 20) == Counter({"production": 20})


def test_restarted_envoy_gets_current_config(server: ServerThread, envoys: EnvoyFactory) -> None:
    envoy = envoys.start("ap-south", server.port)
    envoy.wait_ready()
    envoy.stop()
    set_canary(server, 100, urgent=False)
    again = envoys.start("ap-south", server.port, node_id=envoy.opts.node_id)
    again.wait_ready()
    wait_applied(server, again)
    assert pools_seen(again, 10) == Counter({"canary": 10})


def test_envoys_keep_serving_while_server_is_away(
    server: ServerThread, envoys: EnvoyFactory
) -> None:
    envoy = envoys.start("us-east", server.port)
    envoy.wait_ready()
    results: Counter[int] = Counter()
    stop = threading.Event()

    def load() -> None:
        for _ in range(5000):  # bounded; stopped by the event long before
            if stop.is_set():
                return
            results[get(envoy)[0]] += 1

    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_for(lambda: results.total() >= 20, "load to start", timeout=10)
        server.stop()
        wait_for(
            lambda: not server.call(lambda: server.server.nodes.nodes()),
            "the server to see the stream go",
            timeout=10,
        )
        during = results.total()
        wait_for(lambda: results.total() >= during + 100, "requests while away", timeout=20)
        server.start(server.port)
        server.call(
            lambda: server.server.set_split("recommender", Split.from_percent({"canary": 100}))
        )
        wait_applied(server, envoy, timeout=15)
    finally:
        stop.set()
        loader.join(30)
    assert set(results) == {200}, results
    assert pools_seen(envoy, 5) == Counter({"canary": 5})


def test_pool_added_live_takes_traffic_once_warm(
    server: ServerThread, envoys: EnvoyFactory, spec_file: Path
) -> None:
    """A new cluster, then routes to it: Envoy ACKs CDS only once the cluster has warmed
    (got its endpoints), so endpoints must flow while CDS is unanswered."""
    from xds_server.spec import validate_spec

    envoy = envoys.start("us-east", server.port)
    envoy.wait_ready()
    doc = yaml.safe_load(spec_file.read_text())
    pools = doc["services"][0]["pools"]
    doc["services"][0]["pools"] = {"production": pools["production"]}
    server.call(lambda: server.server.apply_spec(validate_spec(doc, "one pool")))
    wait_applied(server, envoy)
    doc["services"][0]["pools"] = pools
    server.call(lambda: server.server.apply_spec(validate_spec(doc, "two pools")))
    set_canary(server, 100, urgent=False)
    wait_applied(server, envoy)
    assert pools_seen(envoy, 10) == Counter({"canary": 10})


def test_xds_over_tls(
    self_signed_cert: tuple[Path, Path], spec_file: Path, envoys: EnvoyFactory
) -> None:
    """A server with a TLS certificate, and an Envoy whose bootstrap (--xds-tls-ca) speaks
    only TLS to it: the Envoy gets its config, connects as a node and routes with it."""
    from xds_server.lab.background import BackgroundServer
    from xds_server.spec import load_spec

    cert, key = self_signed_cert
    server = BackgroundServer(load_spec(spec_file), tls=(cert.read_bytes(), key.read_bytes()))
    try:
        server.start()
        envoys.tls_ca = str(cert)
        envoy = envoys.start("eu-west", server.port)
        envoy.wait_ready()
        assert get(envoy)[1]["pool"] == "production"
        (node,) = server.call(lambda: server.server.nodes.nodes("eu-west"))
        assert node.node_id == envoy.opts.node_id
    finally:
        server.close()

"""The admin API and `xdsctl`, against real Envoys, a real Prometheus and real gRPC."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from tests.support import wait_for, wait_shares, xds_fetch
from xds_server.admin.service import AdminService, _checked, run_admin_server
from xds_server.app import Running
from xds_server.lab.layout import MeshOptions
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.procs import free_port, http_get
from xds_server.lab.traffic import envoy_weights
from xds_server.traffic import Split
from xds_server.xds.resources import ROUTE_CONFIG_NAME
from xds_server.xds.types import ROUTE, SEND_ORDER

from .conftest import AdsClient, EnvoyFactory, HandEditedPublisher, ServerThread, broken_route
from .test_ads_protocol import sync_all

TOKEN = "s3cret-token"
PLAN = {
    "steps": [5, 20, 75, 100],
    "step_duration": "3s",
    "interval": "1s",
    "window": "4s",
    "ack_timeout": "10s",
    "max_hold": "60s",
    "guardrails": {"min_requests": 5, "max_p99_ms": 250},
    "analysis": {"metrics": {"error_rate": {"ignore_below": 0.3, "confidence": 0.95}}},
}


def xdsctl(
    port: int,
    *args: str,
    token: Path | None = None,
    output: str = "json",
    check: bool = True,
    extra: tuple[str, ...] = (),
) -> Any:
    argv = [
        sys.executable,
        "-m",
        "xds_server.ctl",
        "--server",
        f"127.0.0.1:{port}",
        "--output",
        output,
        "--actor",
        "test-operator",
        *extra,
    ]
    if token is not None:
        argv += ["--token-file", str(token)]
    res = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60)
    if not check:
        return res
    assert res.returncode == 0, res.stderr
    if output == "json":
        return json.loads(res.stdout)
    if output == "yaml":
        return yaml.safe_load(res.stdout)
    return res.stdout


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    m = LocalMesh(tmp_path / "mesh", MeshOptions(rollout=PLAN, admin_token=TOKEN))
    with m:
        yield m


def test_nodes_are_synced_with_what_envoy_reports(mesh: LocalMesh) -> None:
    def all_synced() -> list[dict[str, Any]] | None:
        nodes = xdsctl(mesh.layout.admin_port, "nodes")
        return (
            nodes if len(nodes) == 3 and all(n["sync_state"] == "SYNCED" for n in nodes) else None
        )

    nodes = wait_for(all_synced, "every Envoy SYNCED", timeout=20)
    for envoy in mesh.processes.envoys:
        (node,) = [n for n in nodes if n["id"] == envoy.opts.node_id]
        assert node["region"] == envoy.opts.region and node["client_type"] == "envoy"
        acked = {t["type"]: t["acked_version"] for t in node["types"]}
        for kind, version in envoy.applied_versions().items():
            assert acked[kind] == version, (kind, acked, envoy.applied_versions())
    # The same listing as YAML and as a table.
    assert xdsctl(mesh.layout.admin_port, "nodes", output="yaml") == xdsctl(
        mesh.layout.admin_port, "nodes"
    )
    table = xdsctl(mesh.layout.admin_port, "nodes", "--region", "eu-west", output="table")
    assert table.splitlines()[0].split()[:4] == ["NODE", "REGION", "TYPE", "SYNC"]
    assert "eu-west-envoy-1" in table and "us-east" not in table
    assert table.splitlines()[1].split()[:3] == ["eu-west-envoy-1", "eu-west", "envoy"]
    config = xdsctl(mesh.layout.admin_port, "config", "us-east-envoy-1", "--type", "route")
    (rc,) = config["types"]["route"]["resources"]
    assert rc["name"] == ROUTE_CONFIG_NAME


def test_rollout_control_through_xdsctl(mesh: LocalMesh) -> None:
    load = mesh.processes.start_load()
    wait_for(lambda: len(load.snapshot()) >= 30, "load", timeout=10)
    mesh.spec.add_canary()
    port, token = mesh.layout.admin_port, mesh.workdir / "admin-token"
    wait_for(lambda: xdsctl(port, "rollout", "list"), "the rollout to start", timeout=20)
    watch_log = (mesh.workdir / "watch.jsonl").open("w")
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xds_server.ctl",
            "--server",
            f"127.0.0.1:{port}",
            "-o",
            "json",
            "rollout",
            "watch",
            "recommender",
        ],
        stdout=watch_log,
        stderr=subprocess.STDOUT,
    )

    # Without the token, changes are refused.
    res = xdsctl(port, "rollout", "pause", "recommender", "--reason", "x", check=False)
    assert res.returncode == 1
    assert res.stderr.startswith("xdsctl: UNAUTHENTICATED: ")
    # Pause stops progress: over two step durations nothing advances.
    got = xdsctl(port, "rollout", "pause", "recommender", "--reason", "look closer", token=token)
    assert got["phase"] == "paused"
    step = {r["region"]: r["step"] for r in got["regions"]}
    paused_at = max(e["time"] for e in xdsctl(port, "audit", "--service", "recommender"))

    def judged_for_two_steps() -> bool:
        checks = [
            e
            for e in xdsctl(port, "audit", "--service", "recommender")
            if e["kind"] == "check" and e["time"] > paused_at
        ]
        return bool(checks) and max(e["time"] for e in checks) - paused_at >= 6

    wait_for(judged_for_two_steps, "two step durations of checks while paused", timeout=30)
    now = xdsctl(port, "rollout", "get", "recommender")
    assert now["phase"] == "paused" and {r["region"]: r["step"] for r in now["regions"]} == step
    # Resume continues; promote advances at once.
    assert (
        xdsctl(port, "rollout", "resume", "recommender", "--reason", "fine", token=token)["phase"]
        == "progressing"
    )
    promoted = xdsctl(port, "rollout", "promote", "recommender", "--reason", "hurry", token=token)
    target = max(r["step"] for r in promoted["regions"])
    assert target >= 1
    share = PLAN["steps"][target]  # type: ignore[index]
    wait_shares(mesh.processes.envoys, share)
    # Weights by hand, in one region.
    pinned = xdsctl(
        port,
        "rollout",
        "set-weights",
        "recommender",
        "--canary",
        "50",
        "--region",
        "us-east",
        "--reason",
        "probe",
        token=token,
    )
    us = next(r for r in pinned["regions"] if r["region"] == "us-east")
    assert us["canary_percent"] == 50 and us["manual"] and pinned["phase"] == "paused"
    us_envoy = next(e for e in mesh.processes.envoys if e.opts.region == "us-east")
    wait_for(
        lambda: envoy_weights(us_envoy) == {"production": 5000, "canary": 5000},
        "us-east at 50/50",
        timeout=10,
    )
    # Abort rolls back every region, as Envoy and traffic both show.
    aborted = xdsctl(port, "rollout", "abort", "recommender", "--reason", "enough", token=token)
    assert aborted["phase"] == "rolled_back"
    wait_shares(mesh.processes.envoys, 0)
    for e in mesh.processes.envoys:
        pools = {json.loads(http_get(f"http://{e.opts.listen}/")[1])["pool"] for _ in range(20)}
        assert pools == {"production"}
    # Errors a person can act on.
    for argv, code in (
        (("rollout", "pause", "nope", "--reason", "x"), "NOT_FOUND: unknown service 'nope'"),
        (
            ("rollout", "set-weights", "recommender", "--canary", "150", "--reason", "x"),
            "INVALID_ARGUMENT: bad weights",
        ),
        (
            ("rollout", "pause", "recommender", "--reason", "x"),
            "FAILED_PRECONDITION: rollout is rolled_back",
        ),
    ):
        res = xdsctl(port, *argv, token=token, check=False)
        assert res.returncode == 1 and res.stderr.startswith(f"xdsctl: {code}"), res.stderr

    # The event stream saw the operator's changes as they happened.
    def watched() -> list[dict[str, Any]] | None:
        lines = (mesh.workdir / "watch.jsonl").read_text().splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        return events if any(e["rollout"]["phase"] == "rolled_back" for e in events) else None

    try:
        events = wait_for(watched, "the watch stream to show the abort", timeout=10)
    finally:
        watcher.terminate()
        watcher.wait(10)
        watch_log.close()
    actions = [e for e in events if e["actor"] == "admin (claims: test-operator)"]
    assert [e["rollout"]["phase"] for e in actions][-1] == "rolled_back"
    assert any("look closer" in t for e in actions for t in e["transitions"])
    # Every change is in the audit log with who and why.
    audit = xdsctl(port, "audit", "--service", "recommender", "--since", "10m")
    mine = [e for e in audit if e["actor"] == "admin (claims: test-operator)"]
    reasons = " ".join(e["reason"] for e in mine)
    for why in ("look closer", "fine", "hurry", "probe", "enough"):
        assert why in reasons
    assert xdsctl(port, "audit", "--region", "us-east", output="yaml") == xdsctl(
        port, "audit", "--region", "us-east"
    )


def test_xds_fetch_prints_what_the_envoy_of_that_region_holds(mesh: LocalMesh) -> None:
    envoy = mesh.processes.envoys[1]
    fetched = {}
    for kind in ("cluster", "route"):
        res = xds_fetch(f"127.0.0.1:{mesh.layout.xds_port}", envoy.opts.region, kind)
        assert res.returncode == 0, res.stderr
        fetched[kind] = json.loads(res.stdout)
    names = sorted(r["name"] for r in fetched["cluster"]["resources"])
    dump = envoy.config_dump()["configs"]
    clusters = next(c for c in dump if c["@type"].endswith("ClustersConfigDump"))
    held = sorted(c["cluster"]["name"] for c in clusters["dynamic_active_clusters"])
    assert names == held
    (route,) = fetched["route"]["resources"]
    vh = route["virtual_hosts"][0]
    weights = {
        c["name"].split("|")[1]: int(c["weight"])
        for c in vh["routes"][0]["route"]["weighted_clusters"]["clusters"]
    }
    assert weights == envoy_weights(envoy)
    # CSDS, for standard tooling, agrees.
    with grpc.insecure_channel(f"127.0.0.1:{mesh.layout.admin_port}") as ch:
        resp = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(ch).FetchClientStatus(
            csds_pb2.ClientStatusRequest(), timeout=10
        )
    ids = sorted(c.node.id for c in resp.config)
    assert ids == sorted(e.opts.node_id for e in mesh.processes.envoys)
    cfg = next(c for c in resp.config if c.node.id == envoy.opts.node_id)
    routes = [x for x in cfg.generic_xds_configs if x.type_url == ROUTE]
    assert [x.name for x in routes] == [ROUTE_CONFIG_NAME]
    assert routes[0].config_status == csds_pb2.SYNCED


def _start_admin(server: ServerThread, **kw: Any) -> int:
    port = free_port()
    admin = AdminService(Running(server.server))
    asyncio.run_coroutine_threadsafe(
        run_admin_server(admin, f"127.0.0.1:{port}", **kw), server.loop
    )
    return port


def test_a_changes_streams_are_written_before_its_reply_is_built(server: ServerThread) -> None:
    """An admin change (new weights, an abort's rollback) wakes the streams of its push,
    and its reply counts every node of every replica (`signal_health`: tens of ms at
    thousands). The streams go first: once the change's call returns, before the reply
    is built, the node has been sent the new routes."""
    client = AdsClient(server.port, node_id="e1")
    sync_all(client)
    publisher = server.server
    service = publisher.spec.services[0].name

    def synced() -> bool:
        nodes = server.call(lambda: publisher.node_status("us-east"))
        current = server.call(lambda: publisher.snapshot("us-east").type_version(ROUTE))
        return len(nodes) == 1 and nodes[0].types[ROUTE].acked_version == current

    wait_for(synced, "the node to ACK the routes (nothing of it in flight)", timeout=10)

    async def change() -> list[str]:
        before = publisher.snapshot("us-east")

        def push() -> list[str]:
            traffic = publisher.traffic.with_split(service, ["us-east"], Split(5_000, 0, 5_000))
            publisher.set_traffic(traffic, urgent=True, reason="a test's change")
            after = publisher.snapshot("us-east")
            return [t for t in SEND_ORDER if after.type_version(t) != before.type_version(t)]

        changed = await _checked(None, push)  # type: ignore[arg-type]  # (no abort here)
        (node,) = publisher.node_status("us-east")
        now = publisher.snapshot("us-east")
        return [t for t in changed if node.types[t].sent_version == now.type_version(t)]

    sent = server.run(change())
    assert sent, "the reply was built before the stream wrote anything of the change"
    client.close()


def test_a_nack_shows_as_nacked_with_envoys_message(
    server: ServerThread, envoys: EnvoyFactory
) -> None:
    envoy = envoys.start("us-east", server.port)
    envoy.wait_ready()
    port = _start_admin(server)
    edited = server.server
    assert isinstance(edited, HandEditedPublisher)
    server.call(lambda: edited.replace_resource("us-east", ROUTE, broken_route()))

    def nacked() -> dict[str, Any] | None:
        res = xdsctl(port, "nodes", check=False)
        if res.returncode:
            return None
        (node,) = json.loads(res.stdout)
        return node if node["sync_state"] == "NACKED" else None

    node = wait_for(nacked, "the node to show NACKED", timeout=15)
    route = next(t for t in node["types"] if t["type"] == "route")
    assert "clusters" in route["nack_error"].lower()
    table = xdsctl(port, "nodes", output="table")
    assert "NACKED" in table and "route:" in table


def test_unreachable_admin_api_is_one_clear_line() -> None:
    port = free_port()
    res = xdsctl(port, "status", check=False)
    assert res.returncode == 1
    assert res.stderr.strip() == (
        f"xdsctl: cannot reach admin API at 127.0.0.1:{port}: connection refused"
    )


def test_admin_api_over_tls(server: ServerThread, self_signed_cert: tuple[Path, Path]) -> None:
    cert, key = self_signed_cert
    port = _start_admin(server, tls=(cert.read_bytes(), key.read_bytes()))
    ok = wait_for(
        lambda: (
            (r := xdsctl(port, "status", check=False, extra=("--tls-ca", str(cert)))).returncode
            == 0
            and r
        ),
        "the TLS admin API",
        timeout=15,
    )
    assert "reachable" in ok.stdout or '"server"' in ok.stdout
    plain = xdsctl(port, "status", check=False)
    assert plain.returncode == 1 and plain.stderr.startswith("xdsctl: ")

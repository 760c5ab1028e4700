"""Warm-up before a pool takes traffic, end to end: `xds-server serve`, real Envoys that
health-check the model servers and mirror requests to them, real Prometheus, and a real
HTTP webhook receiver on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support import holds_for, mesh_steps, wait_for, wait_shares
from xds_server.lab.layout import SERVICE, MeshOptions
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.procs import Envoy
from xds_server.lab.scenarios import FAST_PLAN
from xds_server.lab.traffic import canary_share

WARMUP = {
    "health_check": {"path": "/healthz", "interval": "500ms", "timeout": "500ms"},
    "shadow": {"percent": 50, "duration": "4s"},
    "slow_start": "10s",
}


def mesh_with(tmp_path: Path, warmup: dict[str, Any]) -> LocalMesh:
    return LocalMesh(tmp_path / "mesh", MeshOptions(rollout={**FAST_PLAN, "warmup": warmup}))


def route_and_clusters(envoy: Envoy) -> tuple[dict[str, Any], dict[str, Any]]:
    """The service's route and its clusters, as this Envoy applied them."""
    route: dict[str, Any] = {}
    clusters: dict[str, Any] = {}
    for cfg in envoy.config_dump().get("configs", []):
        kind = cfg.get("@type", "")
        if kind.endswith("RoutesConfigDump"):
            for dyn in cfg.get("dynamic_route_configs", []):
                for vh in dyn["route_config"].get("virtual_hosts", []):
                    if vh["name"] == SERVICE:
                        route = vh["routes"][0]["route"]
        if kind.endswith("ClustersConfigDump"):
            for c in cfg.get("dynamic_active_clusters", []):
                clusters[c["cluster"]["name"]] = c["cluster"]
    return route, clusters


def mirrored_pools(envoy: Envoy) -> set[str]:
    route, _ = route_and_clusters(envoy)
    return {m["cluster"].split("|")[1] for m in route.get("request_mirror_policies", [])}


def test_shadow_traffic_reaches_the_canary_while_users_only_see_production(
    tmp_path: Path,
) -> None:
    with mesh_with(tmp_path, WARMUP) as mesh:
        load = mesh.processes.start_load()
        wait_for(lambda: len(load.snapshot()) >= 30, "load through every Envoy", timeout=10)
        began = time.time()
        mesh.spec.add_canary()
        wait_for(
            lambda: all(mirrored_pools(e) == {"canary", "baseline"} for e in mesh.processes.envoys),
            "every Envoy mirroring to canary and baseline",
            timeout=30,
        )
        # Envoy applied what the warm-up asks for: health checks, slow start, the mirror.
        route, clusters = route_and_clusters(mesh.processes.envoys[0])
        assert [c["name"].split("|")[1] for c in route["weighted_clusters"]["clusters"]] == [
            "production"
        ]
        canary = clusters[f"{SERVICE}|canary"]
        assert canary["health_checks"][0]["http_health_check"]["path"] == "/healthz"
        assert canary["round_robin_lb_config"]["slow_start_config"]["slow_start_window"] == "10s"
        assert "round_robin_lb_config" not in clusters[f"{SERVICE}|production"]
        assert mesh_steps(mesh) == {-1}
        wait_for(
            lambda: all(
                mesh.traffic.model_stats(r, "canary")["shadow_requests"] >= 20
                for r in mesh.opts.regions
            ),
            "shadow requests at every region's canary",
            timeout=20,
        )
        # While the canary is warming, no user request reaches it, and users are answered
        # by production alone.
        seen = [mesh.traffic.model_stats(r, "canary")["user_requests"] for r in mesh.opts.regions]
        assert mesh_steps(mesh) == {-1}  # still warming after those counts were read
        assert seen == [0] * len(mesh.opts.regions)
        first_step = [e.time for e in mesh.state.audit() if e.kind == "transition" and e.step == 0]
        cut = min(first_step, default=time.time())
        during = [r for r in load.snapshot() if began <= r.time < cut]
        assert during and {r.pool for r in during} == {"production"}
        assert load.failures() == []
        # Shadow traffic passed its judgement: every region moves to its first real step.
        wait_for(
            lambda: mesh_steps(mesh) == {0}, "every region at step 0 after warm-up", timeout=30
        )
        wait_shares(mesh.processes.envoys, 5)
        assert all(mirrored_pools(e) == set() for e in mesh.processes.envoys)
        reasons = [e.reason for e in mesh.state.audit() if e.region == "us-east"]
        assert any("mirroring 50% of requests for 4s" in r for r in reasons), reasons
        assert any("passed warm-up" in r for r in reasons), reasons
        assert load.failures() == []


def test_a_canary_that_is_not_healthy_gets_no_weight(tmp_path: Path) -> None:
    warmup = {"health_check": WARMUP["health_check"]}
    with mesh_with(tmp_path, warmup) as mesh:
        mesh.faults.set("eu-west", "canary", healthy=False)
        mesh.spec.add_canary()
        # Envoy counts the unhealthy host; the control plane asks it why (issue 26).
        port = mesh.layout.model_ports[("eu-west", "canary")]
        why = f"canary: 0 of 1 hosts healthy (127.0.0.1:{port}: HTTP 503 from GET /healthz)"
        wait_for(
            lambda: any(why in e.reason for e in mesh.state.audit() if e.region == "eu-west"),
            "the controller to wait for eu-west's canary to be healthy, naming why",
            timeout=30,
        )

        def no_weight_anywhere() -> None:
            assert mesh_steps(mesh) == {-1}
            assert all(canary_share(e) == 0 for e in mesh.processes.envoys)

        # Bounded observation: for several check intervals nothing gets any weight.
        holds_for(no_weight_anywhere, 5, interval=0.25)
        mesh.faults.set("eu-west", "canary", healthy=True)
        wait_for(lambda: mesh_steps(mesh) == {0}, "every region at step 0 once healthy", timeout=30)
        wait_shares(mesh.processes.envoys, 5)


class _Receiver(ThreadingHTTPServer):
    """A real webhook receiver on loopback that answers with a status the test sets."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Hook)
        self.status = 500
        self.calls: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/pre-rollout"


class _Hook(BaseHTTPRequestHandler):
    server: _Receiver

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.calls.append(json.loads(body))
        data = b"smoke test failed: model returned NaN"
        self.send_response(self.server.status)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    r = _Receiver()
    threading.Thread(target=r.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield r
    r.shutdown()
    r.server_close()


def test_a_failing_warmup_webhook_blocks_the_start_and_is_audited(
    tmp_path: Path, receiver: _Receiver
) -> None:
    hook = {"name": "smoke", "url": receiver.url, "timeout": "2s", "retries": 1}
    with mesh_with(tmp_path, {"webhooks": [hook]}) as mesh:
        mesh.spec.add_canary()
        state = mesh.state.wait_phase({"paused", "rolled_back", "promoted"}, 30)
        assert state["phase"] == "paused"
        assert "warm-up webhook 'smoke' failed: HTTP 500: smoke test failed" in state["reason"]
        assert "(after 2 attempts)" in state["reason"]
        assert mesh_steps(mesh) == {-1}
        assert all(canary_share(e) == 0 for e in mesh.processes.envoys)
        paused = [e for e in mesh.state.audit() if e.region is None and e.phase_to == "paused"]
        assert paused and "webhook 'smoke' failed" in paused[-1].reason
        call = receiver.calls[0]
        assert call["service"] == SERVICE and call["canary_version"] == "v2"
        assert call["phase"] == "warmup" and call["region"] in mesh.opts.regions


def test_a_canary_that_fails_only_under_shadow_traffic_is_rolled_back_unseen(
    tmp_path: Path,
) -> None:
    with mesh_with(tmp_path, WARMUP) as mesh:
        load = mesh.processes.start_load()
        wait_for(lambda: len(load.snapshot()) >= 30, "load through every Envoy", timeout=10)
        mesh.faults.set("ap-south", "canary", shadow_error_rate=1.0)
        mesh.spec.add_canary()
        state = mesh.state.wait_phase({"rolled_back", "promoted"}, 60)
        assert state["phase"] == "rolled_back"
        assert "ap-south: warm-up" in state["reason"] and "error_rate" in state["reason"]
        # It failed on mirrored requests alone: no user request ever reached a canary.
        assert mesh.traffic.model_stats("ap-south", "canary")["shadow_requests"] > 0
        assert all(
            mesh.traffic.model_stats(r, "canary")["user_requests"] == 0 for r in mesh.opts.regions
        )
        assert load.failures() == []
        wait_for(
            lambda: all(mirrored_pools(e) == set() for e in mesh.processes.envoys),
            "mirroring off",
            timeout=10,
        )

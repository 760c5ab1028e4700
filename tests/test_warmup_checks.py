"""Warm-up checks that real model servers answer (issue 26), end to end: `xds-server
serve`, real Envoys, real Prometheus, the lab's model servers.

- A check that production itself fails is a misconfigured check: the rollout pauses
  before any weight moves, naming each production host and its cause, and production's
  serving hosts are never health-checked by Envoy (nothing marks them unhealthy).
- An Open Inference Protocol `ModelReady` on a gRPC port, which Envoy cannot send: the
  control plane asks it, names the cause while the canary is not ready, and lets the
  canary in once it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support import holds_for, mesh_steps, wait_for
from xds_server.lab.layout import SERVICE, MeshOptions
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.scenarios import FAST_PLAN
from xds_server.lab.traffic import canary_share

FAST_CHECK = {"interval": "300ms", "timeout": "300ms"}


def mesh_with(tmp_path: Path, check: dict[str, Any], protocol: str = "http") -> LocalMesh:
    rollout = {**FAST_PLAN, "warmup": {"health_check": {**FAST_CHECK, **check}}}
    opts = MeshOptions(regions=("us-east", "eu-west"), rollout=rollout, protocol=protocol)
    return LocalMesh(tmp_path / "mesh", opts)


def production_hosts_flagged(mesh: LocalMesh) -> list[dict[str, Any]]:
    """Production's hosts as each Envoy holds them, with any health flag set."""
    flagged = []
    for envoy in mesh.processes.envoys:
        for c in envoy.admin_get("/clusters?format=json")["cluster_statuses"]:
            if c["name"] == f"{SERVICE}|production":
                flagged += [h for h in c.get("host_statuses", []) if len(h["health_status"]) > 1]
    return flagged


def test_a_check_production_fails_pauses_before_any_weight_moves(tmp_path: Path) -> None:
    with mesh_with(tmp_path, {"type": "oip", "model": "iris"}) as mesh:
        mesh.spec.add_canary()
        state = mesh.state.wait_phase({"paused", "rolled_back", "promoted"}, 30)
        assert state["phase"] == "paused", state
        assert "misconfigured" in state["reason"], state
        # Every region's production fails it: the pause names the first region seen.
        named = [
            (region, port)
            for (region, pool), port in mesh.layout.model_ports.items()
            if pool == "production"
            and f"in {region} too" in state["reason"]
            and f"127.0.0.1:{port}: HTTP 404 from GET /v2/models/iris/ready" in state["reason"]
        ]
        assert len(named) == 1, state["reason"]
        assert mesh_steps(mesh) == {-1}

        def nothing_moves() -> None:
            assert all(canary_share(e) == 0 for e in mesh.processes.envoys)
            assert production_hosts_flagged(mesh) == []  # Envoy never checks production

        holds_for(nothing_moves, 2, interval=0.25)


def test_a_grpc_canary_is_let_in_when_the_control_plane_sees_its_model_ready(
    tmp_path: Path,
) -> None:
    with mesh_with(tmp_path, {"type": "oip", "model": SERVICE}, protocol="grpc") as mesh:
        mesh.faults.set("eu-west", "canary", healthy=False)
        mesh.spec.add_canary()
        port = mesh.layout.grpc_ports[("eu-west", "canary")]
        why = f"(127.0.0.1:{port}: ModelReady: model '{SERVICE}' not ready)"
        wait_for(
            lambda: any(why in e.reason for e in mesh.state.audit() if e.region == "eu-west"),
            "the warm-up to name why eu-west's canary is not ready",
            timeout=30,
        )
        assert mesh_steps(mesh) == {-1}
        mesh.faults.set("eu-west", "canary", healthy=True)
        wait_for(lambda: mesh_steps(mesh) == {0}, "every region at step 0 once ready", timeout=30)

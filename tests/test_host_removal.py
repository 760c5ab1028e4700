"""Removal is removal (issue 26): a host the spec drops from a health-checked pool gets
no new request once Envoy has the new endpoints, even though its active health check
still passes. Real Envoy, the lab's real model servers, the spec file watched as `serve`
watches it.

Without `ignore_health_on_host_removal` Envoy keeps such a host
(`/pending_dynamic_removal`) and goes on sending it requests: half of them here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import wait_for
from xds_server.lab.background import BackgroundServer
from xds_server.lab.procs import Envoy, http_get
from xds_server.lab.upstream import ModelServer
from xds_server.spec import load_spec
from xds_server.traffic import Split
from xds_server.xds.types import ENDPOINT

from .conftest import EnvoyFactory

REGION = "us-east"
SERVICE = "recommender"
CANARY = f"{SERVICE}|canary"


@pytest.fixture
def servers() -> Iterator[dict[str, ModelServer]]:
    out = {
        name: ModelServer(("127.0.0.1", 0), REGION, pool, version).start_in_thread()
        for name, pool, version in [
            ("prod", "production", "v1"),
            ("a", "canary", "v2"),
            ("b", "canary", "v2"),
        ]
    }
    yield out
    for s in out.values():
        s.shutdown()
        s.server_close()


def spec_doc(servers: dict[str, ModelServer], canary: list[str]) -> dict[str, Any]:
    def eps(names: list[str]) -> dict[str, list[str]]:
        return {REGION: [f"127.0.0.1:{servers[n].port}" for n in names]}

    return {
        "regions": [REGION],
        "rollout": {"warmup": {"health_check": {"interval": "0.2s", "timeout": "0.5s"}}},
        "services": [
            {
                "name": SERVICE,
                "pools": {
                    "production": {"version": "v1", "endpoints": eps(["prod"])},
                    "canary": {"version": "v2", "endpoints": eps(canary)},
                },
            }
        ],
    }


def canary_hosts(envoy: Envoy) -> dict[int, dict[str, Any]]:
    """The canary cluster's hosts as Envoy holds them: port -> health flags."""
    for c in envoy.admin_get("/clusters?format=json")["cluster_statuses"]:
        if c["name"] == CANARY:
            return {
                h["address"]["socket_address"]["port_value"]: h["health_status"]
                for h in c.get("host_statuses", [])
            }
    return {}


def served_without(server: BackgroundServer, port: int) -> str | None:
    """The endpoints version the server serves once the canary has lost `port`."""

    def check() -> str | None:
        server.server.flush()
        snap = server.server.snapshot(REGION)
        cla = snap.resources.by_type[ENDPOINT][CANARY]
        ports = {
            lb.endpoint.address.socket_address.port_value for lb in cla.endpoints[0].lb_endpoints
        }  # type: ignore[attr-defined]
        return snap.type_version(ENDPOINT) if port not in ports else None

    return server.call(check)


def test_a_host_removed_from_a_health_checked_pool_gets_no_new_request(
    servers: dict[str, ModelServer], tmp_path: Path
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(spec_doc(servers, ["a", "b"])))
    server = BackgroundServer(load_spec(path), path)
    envoys = EnvoyFactory(tmp_path / "envoy")
    try:
        server.start()
        server.watch_spec(0.05)
        server.call(
            lambda: server.server.set_split(
                SERVICE, Split.from_percent({"canary": 100}), urgent=True
            )
        )
        envoy = envoys.start(REGION, server.port)
        envoy.wait_ready()
        a, b = servers["a"].port, servers["b"].port
        wait_for(
            lambda: (
                (h := canary_hosts(envoy)).keys() == {a, b}
                and not any(s.get("failed_active_health_check") for s in h.values())
            ),
            "both canary hosts healthy in Envoy",
            timeout=15,
        )
        url = f"http://127.0.0.1:{envoy.listen_port}/predict"  # type: ignore[attr-defined]
        wait_for(
            lambda: http_get(url)[0] == 200 and servers["b"].stats()["user_requests"] > 0,
            "requests reaching host b",
            timeout=10,
        )
        path.write_text(yaml.safe_dump(spec_doc(servers, ["a"])))
        version = wait_for(lambda: served_without(server, b), "the spec served without b")
        wait_for(
            lambda: all(
                n.types[ENDPOINT].acked_version == version
                for n in server.call(lambda: server.server.node_status(REGION))
            ),
            "Envoy to ACK the endpoints without b",
            timeout=10,
        )
        before = servers["b"].stats()["user_requests"]
        answers = [http_get(url)[0] for _ in range(40)]
        assert answers == [200] * 40
        assert servers["b"].stats()["user_requests"] == before, "the removed host was sent more"
        assert canary_hosts(envoy).keys() == {a}  # gone, not pending_dynamic_removal
    finally:
        envoys.stop_all()
        server.close()

"""Real MLServer processes behind a real Envoy, judged from a real Prometheus (issue 26).

One mesh for every case: one region, one Envoy, the lab's MLServers (production v1,
baseline v1, a healthy canary v2: scikit-learn models trained at start) and one more
whose canary serves its model under another name. Two services share them: `rest`
(OIP over HTTP, to MLServer's REST ports) and `grpc` (OIP over gRPC, to its gRPC ports;
MLServer has no grpc.health.v1, so the warm-up checks `/v2/health/ready` on each
endpoint's `health_port`). The cases run in order on that mesh: a healthy canary warms
up and promotes on both services (and its scores' histogram, which the lab's MLServer
runtime exports, reaches Prometheus); production moved to v2 leaves v1 without a request;
a canary answering NOT_FOUND / 404 to every call rolls back on both.

MLServer lives in its own virtual environment (`make mlserver`). Without it the test
fails under `make test` (CI=1) and skips elsewhere, saying why.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml

from tests.support import wait_for
from xds_server.lab import mlserver
from xds_server.lab.layout import MeshOptions
from xds_server.lab.load import LoadGenerator
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.procs import Process, free_port, http_get
from xds_server.rollout.state import FINISHED, PAUSED, RolloutState
from xds_server.rollout.store import Store

REGION = "us-east"
SERVICES = {"rest": "http", "grpc": "grpc"}
PLAN: dict[str, Any] = {
    "steps": [50, 100],
    "step_duration": "3s",
    "interval": "1s",
    "window": "4s",
    "ack_timeout": "10s",
    "max_hold": "30s",
    "failures_before_rollback": 2,
    "guardrails": {"max_error_rate": 0.05, "max_p99_ms": 1000, "min_requests": 5},
    "analysis": {
        "metrics": {"error_rate": {"ignore_below": 0.3}, "client_errors": {"ignore_below": 0.3}}
    },
    # An HTTP check for both: on the REST service's traffic port, on each gRPC
    # endpoint's health_port (MLServer's REST port).
    "warmup": {
        "health_check": {
            "type": "http",
            "path": mlserver.READY_PATH,
            "interval": "500ms",
            "timeout": "500ms",
        }
    },
}


def mlserver_venv() -> Path:
    try:
        return mlserver.find_venv()
    except mlserver.MLServerMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (CI is set: `make test` makes it)")
        pytest.skip(f"{exc}; under CI=1 this fails instead")


@dataclass
class Lab:
    mesh: LocalMesh
    wrong_name: tuple[int, int]
    """The canary serving under another name: its REST and gRPC ports."""
    loads: dict[str, LoadGenerator]
    store: Store

    def servers(self, pool: str) -> tuple[int, int]:
        key = (REGION, pool)
        return self.mesh.layout.model_ports[key], self.mesh.layout.grpc_ports[key]

    def write_spec(self, pools: dict[str, tuple[str, tuple[int, int]]]) -> None:
        """Both services with these pools: pool -> (version, (REST port, gRPC port))."""

        def endpoint(protocol: str, ports: tuple[int, int]) -> Any:
            if protocol == "http":
                return f"127.0.0.1:{ports[0]}"
            return {"address": f"127.0.0.1:{ports[1]}", "health_port": ports[0]}

        doc = {
            "regions": [REGION],
            "listener": {"port": 10000},
            "rollout": PLAN,
            "services": [
                {
                    "name": name,
                    "domains": [name],
                    "protocol": protocol,
                    "pools": {
                        pool: {"version": v, "endpoints": {REGION: [endpoint(protocol, ports)]}}
                        for pool, (v, ports) in pools.items()
                    },
                }
                for name, protocol in SERVICES.items()
            ],
        }
        path = self.mesh.layout.spec_path
        path.with_suffix(".tmp").write_text(yaml.safe_dump(doc, sort_keys=False))
        path.with_suffix(".tmp").replace(path)

    def hosts(self, service: str, pool: str) -> set[int]:
        """The ports of a service's pool's hosts in the Envoy, from its /clusters."""
        doc = self.mesh.processes.envoys[0].admin_get("/clusters?format=json")
        return {
            h["address"]["socket_address"]["port_value"]
            for c in doc.get("cluster_statuses", [])
            if c["name"] == f"{service}|{pool}"
            for h in c.get("host_statuses", [])
        }

    def prom(self, query: str) -> list[dict[str, Any]]:
        """An instant query's result vector, from the lab's Prometheus."""
        assert self.mesh.processes.prometheus is not None
        url = self.mesh.processes.prometheus.url
        status, body, _ = http_get(f"{url}/api/v1/query?query={quote(query)}")
        assert status == 200, body
        return list(json.loads(body)["data"]["result"])

    def rollouts(self, version: str) -> dict[str, RolloutState]:
        """Each service's rollout of this canary version, from the server's store."""
        states = self.store.load_rollouts()
        return {s.service: s for s in states if s.canary_version == version}

    def wait_phases(self, version: str, phase: str, timeout: float = 90) -> dict[str, Any]:
        def ended() -> dict[str, RolloutState] | None:
            got = self.rollouts(version)
            over = FINISHED | {PAUSED}
            done = set(got) == set(SERVICES) and all(s.phase in over for s in got.values())
            return got if done else None

        states = wait_for(ended, f"both services' rollouts of {version} to end", timeout=timeout)
        assert {n: s.phase for n, s in states.items()} == dict.fromkeys(SERVICES, phase), {
            n: s.reason for n, s in states.items()
        }
        return states

    def answers_since(self, since: float, n: int) -> dict[str, list[Any]]:
        """At least `n` results per service after `since`."""

        def enough() -> dict[str, list[Any]] | None:
            got = {
                name: [r for r in load.snapshot() if r.time >= since]
                for name, load in self.loads.items()
            }
            return got if all(len(v) >= n for v in got.values()) else None

        return wait_for(enough, f"{n} answers per service", timeout=30)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    venv = mlserver_venv()
    workdir = tmp_path_factory.mktemp("mlserver")
    opts = MeshOptions(regions=(REGION,), rollout=PLAN, models="mlserver")
    with LocalMesh(workdir, opts) as mesh:
        rest, grpc_port = free_port(), free_port()
        slot = mlserver.MLServerSlot(
            "wrong-name", rest, grpc_port, None,
            workdir / "mlserver" / "trained" / "v2.joblib", "v3", "recommender-v2",
        )  # fmt: skip
        extra: Process = mlserver.start_mlserver(venv, workdir / "mlserver" / slot.name, slot)
        loads: dict[str, LoadGenerator] = {}
        try:
            wait_for(mlserver.ready(rest), "the wrong-name MLServer ready", timeout=90)
            db = mesh.layout.state_dir / "rollouts.sqlite3"
            wait_for(db.exists, "the server's store", timeout=30)
            lab = Lab(mesh, (rest, grpc_port), loads, Store.in_dir(mesh.layout.state_dir))
            lab.write_spec({"production": ("v1", lab.servers("production"))})
            wait_for(
                lambda: all(lab.hosts(s, "production") for s in SERVICES),
                "both services' production in the Envoy",
                timeout=20,
            )
            listen = {e.opts.node_id: e.opts.listen or "" for e in mesh.processes.envoys}
            for name, protocol in SERVICES.items():
                loads[name] = LoadGenerator(
                    listen, rate=20, max_seconds=600, protocol=protocol, authority=name,
                    model=mlserver.MODEL_NAME, n_features=mlserver.N_FEATURES, tenants=(),
                ).start()  # fmt: skip
            lab.answers_since(0, 20)
            # A rollout's start checks that production's latency answers (a rate(): two
            # samples): Prometheus has scraped both services' production twice.
            scraped = (
                "count(count_over_time(envoy_cluster_upstream_rq_time_count"
                '{envoy_cluster_name=~"(rest|grpc)[|]production"}[1m]) >= 2) >= 2'
            )
            wait_for(lambda: lab.prom(scraped), "production's latency in Prometheus", timeout=20)
            yield lab
            lab.store.close()
        finally:
            for load in loads.values():
                load.stop()
            extra.stop()


def test_a_healthy_canary_warms_up_and_promotes(lab: Lab) -> None:
    """The warm-up passes on MLServer's readiness (REST: the traffic port; gRPC: each
    endpoint's health_port), then both services promote v2."""
    for load in lab.loads.values():
        assert load.failures() == [], load.failures()[:3]
    lab.write_spec(
        {
            "production": ("v1", lab.servers("production")),
            "baseline": ("v1", lab.servers("baseline")),
            "canary": ("v2", lab.servers("canary")),
        }
    )
    lab.wait_phases("v2", "promoted")
    # The lab runtime's score histogram reaches Prometheus with the pool's labels, as
    # the MLServer plan's prediction_shift reads it: the canary's answers, 10 buckets.
    query = mlserver.SCORE_QUERY.format(region=REGION, pool="canary", window="5m")

    def scored() -> list[dict[str, Any]] | None:
        got = lab.prom(query)
        return got if any(float(b["value"][1]) > 0 for b in got) else None

    buckets = wait_for(scored, "the canary's scores in Prometheus", timeout=20)
    assert len(buckets) == 11, buckets
    audit = lab.store.audit()
    for name in SERVICES:
        warmups = [e.reason for e in audit if e.service == name and e.step == -1]
        assert any("warm-up passed: pools healthy" in r for r in warmups), warmups
    since = max(r.time for r in lab.loads["rest"].snapshot())
    for name, results in lab.answers_since(since, 20).items():
        assert {r.version for r in results} == {"v2"}, name


def test_a_removed_host_gets_no_request(lab: Lab) -> None:
    """Production moves to v2's servers: once Envoy's cluster lists only them, v1's
    server answers no request of either service."""
    lab.write_spec({"production": ("v2", lab.servers("canary"))})
    rest, grpc_port = lab.servers("canary")
    wanted = {"rest": {rest}, "grpc": {grpc_port}}
    wait_for(
        lambda: all(lab.hosts(s, "production") == wanted[s] for s in SERVICES),
        "v1's hosts out of production",
        timeout=20,
    )
    since = time.time()
    for name, results in lab.answers_since(since, 30).items():
        assert [r for r in results if r.version != "v2"] == [], name


def test_a_canary_serving_another_model_name_rolls_back(lab: Lab) -> None:
    """Every call to the canary is NOT_FOUND (gRPC) / 404 (REST) while production
    answers the same requests: both services roll back, and production keeps
    answering."""
    lab.write_spec(
        {
            "production": ("v2", lab.servers("canary")),
            "canary": ("v3", lab.wrong_name),
        }
    )
    states = lab.wait_phases("v3", "rolled_back")
    assert all("client_errors" in s.reason for s in states.values()), {
        n: s.reason for n, s in states.items()
    }
    since = time.time()
    for name, results in lab.answers_since(since, 20).items():
        assert {r.status for r in results} == {200}, name


def test_lab_run_refuses_what_mlserver_cannot_do() -> None:
    """A scenario that sets a knob only the built-in servers have, or proxyless clients
    (the built-in model's inputs), is refused in one line naming what runs."""
    import subprocess
    import sys

    for extra in (["--scenario", "slow-canary"], ["--proxyless", "1"]):
        done = subprocess.run(
            [sys.executable, "-m", "xds_server.cli", "lab", "run", "--models", "mlserver", *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert "--models mlserver" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr

"""gRPC pools: `protocol: grpc` in the spec, what the builder makes of it, and a real
Envoy 1.40 forwarding gRPC over HTTP/2, health-checking over `grpc.health.v1` and
counting calls by gRPC status for the queries to read."""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.support import wait_for, wait_shares
from xds_server.lab.background import BackgroundServer
from xds_server.lab.layout import MeshOptions
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.procs import Envoy, http_get
from xds_server.lab.scenarios import FAST_PLAN
from xds_server.lab.traffic import canary_share
from xds_server.rollout.metrics import PrometheusSource
from xds_server.spec import (
    DEFAULT_QUERIES,
    Protocol,
    SpecError,
    validate_spec,
)
from xds_server.spec.rollout import GRPC_SERVER_FAULTS
from xds_server.traffic import Split, TrafficState
from xds_server.xds.resources import (
    GRPC_STATS_FILTER,
    HTTP_PROTOCOL_OPTIONS,
    build_listener,
    build_region,
)
from xds_server.xds.types import CLUSTER

from .conftest import EnvoyFactory

REGION = "us-east"
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def grpc_doc(ports: dict[str, int], **service: Any) -> dict[str, Any]:
    return {
        "regions": [REGION],
        "listener": {"port": 10000},
        "rollout": {"warmup": {"health_check": {"interval": "0.2s", "timeout": "0.5s"}}},
        "services": [
            {
                "name": "recommender",
                "domains": ["*"],
                "protocol": "grpc",
                "pools": {
                    pool: {
                        "version": "v2" if pool == "canary" else "v1",
                        "endpoints": {REGION: [f"127.0.0.1:{port}"]},
                    }
                    for pool, port in ports.items()
                },
                **service,
            }
        ],
    }


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as err:
        validate_spec(doc, "mesh.yaml")
    return [f"{p.path}: {p.message}" for p in err.value.problems]


# ---- the spec ----


def test_grpc_service_reads_errors_from_envoys_grpc_stats() -> None:
    spec = validate_spec(grpc_doc({"production": 1, "canary": 2}), "mesh.yaml")
    svc = spec.services[0]
    assert svc.protocol == Protocol.GRPC
    assert svc.grpc_error_codes == GRPC_SERVER_FAULTS
    queries = svc.rollout.queries
    # UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS: a
    # term each (one `__name__=~` selector fails once two statuses of a cluster exist)
    assert grpc_codes(queries["errors"]) == [2, 4, 12, 13, 14, 15]
    assert "envoy_cluster_grpc_total" in queries["requests"]
    assert queries["service_requests"] == DEFAULT_QUERIES["service_requests"]
    # Delivered: completed upstream requests (a series that exists from the cluster's
    # start) less the errors; never a status series Envoy creates on first use alone.
    assert queries["delivered"].startswith(
        "clamp_min(sum(increase(envoy_cluster_upstream_rq_completed"
    )
    assert grpc_codes(queries["delivered"]) == [2, 4, 12, 13, 14, 15]
    # Latency is the same histogram for both protocols.
    assert queries["p99_ms"] == DEFAULT_QUERIES["p99_ms"]
    filled = queries["errors"].format(region=REGION, cluster="recommender|canary", window="30s")
    assert filled.startswith(
        '(sum(increase(envoy_cluster_grpc_2{region="us-east",'
        'envoy_cluster_name="recommender|canary"}[30s]) unless '
    )


def grpc_codes(query: str) -> list[int]:
    """The gRPC statuses a query counts (`envoy_cluster_grpc_<code>` series)."""
    return sorted({int(n) for n in re.findall(r"envoy_cluster_grpc_(\d+)\{", query)})


def test_grpc_error_codes_are_configurable_and_own_queries_are_kept() -> None:
    own = 'sum(increase(my_errors{{region="{region}"}}[{window}]))'
    doc = grpc_doc(
        {"production": 1},
        grpc={"error_codes": ["unavailable", "RESOURCE_EXHAUSTED"]},
        rollout={"queries": {"requests": own}},
    )
    svc = validate_spec(doc, "mesh.yaml").services[0]
    assert svc.grpc_error_codes == ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
    assert grpc_codes(svc.rollout.queries["errors"]) == [8, 14]
    assert svc.rollout.queries["requests"] == own  # the user's, not replaced


def test_http_service_keeps_the_http_queries() -> None:
    doc = grpc_doc({"production": 1})
    del doc["services"][0]["protocol"]
    svc = validate_spec(doc, "mesh.yaml").services[0]
    assert svc.protocol == Protocol.HTTP
    assert svc.rollout.queries["errors"] == DEFAULT_QUERIES["errors"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"protocol": "grpc-web"}, "services[0].protocol: "),
        ({"grpc": {"error_codes": ["UNAVAILBLE"]}}, "services[0].grpc.error_codes[0]: unknown"),
        ({"grpc": {"error_codes": ["OK"]}}, "services[0].grpc.error_codes[0]: unknown"),
        ({"grpc": {"error_codes": []}}, "services[0].grpc.error_codes: expected a non-empty"),
        ({"grpc": {"codes": ["UNAVAILABLE"]}}, "services[0].grpc.codes: unknown field"),
        ({"protocol": "http", "grpc": {}}, "services[0].grpc: only a service with"),
    ],
)
def test_bad_grpc_settings_name_the_field(change: dict[str, Any], expected: str) -> None:
    doc = grpc_doc({"production": 1})
    doc["services"][0].update(change)
    found = problems(doc)
    assert any(p.startswith(expected) for p in found), found


def test_health_check_grpc_service_is_validated() -> None:
    doc = grpc_doc({"production": 1})
    doc["rollout"]["warmup"]["health_check"]["grpc_service"] = 7
    assert any("health_check.grpc_service" in p for p in problems(doc))


# ---- the builder ----


def _clusters(doc: dict[str, Any]) -> dict[str, cluster_pb2.Cluster]:
    spec = validate_spec(doc, "mesh.yaml")
    res = build_region(spec, TrafficState(), REGION)
    return dict(res.by_type[CLUSTER])  # type: ignore[arg-type]


def test_grpc_pools_get_http2_and_grpc_health_checks() -> None:
    doc = grpc_doc({"production": 1, "canary": 2})
    doc["rollout"]["warmup"]["health_check"]["grpc_service"] = "inference.GRPCInferenceService"
    for name, cluster in _clusters(doc).items():
        options = http_protocol_options_pb2.HttpProtocolOptions()
        assert cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].Unpack(options)
        assert options.explicit_http_config.HasField("http2_protocol_options"), name
        if name.endswith("|production"):  # serving hosts: the control plane probes them
            assert not cluster.health_checks
            continue
        (check,) = cluster.health_checks
        assert check.WhichOneof("health_checker") == "grpc_health_check"
        assert check.grpc_health_check.service_name == "inference.GRPCInferenceService"


def test_http_pools_stay_http1_with_http_health_checks() -> None:
    doc = copy.deepcopy(grpc_doc({"production": 1, "canary": 2}))
    del doc["services"][0]["protocol"]
    for name, cluster in _clusters(doc).items():
        assert not cluster.typed_extension_protocol_options
        if name.endswith("|production"):  # serving hosts: the control plane probes them
            assert not cluster.health_checks
            continue
        (check,) = cluster.health_checks
        assert check.http_health_check.path == "/healthz"


def test_listener_counts_grpc_calls_before_anything_else() -> None:
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    hcm = hcm_pb2.HttpConnectionManager()
    build_listener("127.0.0.1", 10000).filter_chains[0].filters[0].typed_config.Unpack(hcm)
    names = [f.name for f in hcm.http_filters]
    assert names[0] == GRPC_STATS_FILTER
    assert names[-1] == "envoy.filters.http.router"


# ---- a real Envoy forwarding gRPC ----


class GrpcPool:
    """A real gRPC server (one pool's host): answers ModelInfer with its version, or with
    `fail_with`; serves grpc.health.v1 whose status a test flips."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.fail_with: grpc.StatusCode | None = None
        self.calls = 0
        self._lock = threading.Lock()
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handler = grpc.unary_unary_rpc_method_handler(self._infer)
        self.server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "inference.GRPCInferenceService", {"ModelInfer": handler}
                )
            ]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.set_serving(True)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else 2  # NOT_SERVING
        self.health.set("", status)

    def _infer(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.calls += 1
        if self.fail_with is not None:
            context.abort(self.fail_with, f"{self.version} is failing on purpose")
        return self.version.encode()


@pytest.fixture
def grpc_pools() -> Iterator[dict[str, GrpcPool]]:
    pools = {"production": GrpcPool("v1"), "canary": GrpcPool("v2")}
    for p in pools.values():
        p.server.start()
    yield pools
    for p in pools.values():
        p.server.stop(grace=None)


def _calls(envoy: Envoy, n: int) -> dict[str, int]:
    """`n` gRPC calls through Envoy's listener (h2c): answers by version or status."""
    out: dict[str, int] = {}
    with grpc.insecure_channel(f"127.0.0.1:{envoy.listen_port}") as channel:  # type: ignore[attr-defined]
        call = channel.unary_unary(METHOD)
        for _ in range(n):
            try:
                key = call(b"x", timeout=2).decode()
            except grpc.RpcError as exc:
                key = exc.code().name
            out[key] = out.get(key, 0) + 1
    return out


def _stat(envoy: Envoy, name: str, cluster: str) -> float:
    _, body, _ = http_get(f"http://127.0.0.1:{envoy.opts.admin_port}/stats/prometheus")
    pattern = rf'^{name}{{[^}}]*envoy_cluster_name="{re.escape(cluster)}"[^}}]*}} (\S+)$'
    return sum(float(m) for m in re.findall(pattern, body.decode(), re.MULTILINE))


def test_envoy_forwards_grpc_health_checks_and_counts_statuses(
    grpc_pools: dict[str, GrpcPool], envoys: EnvoyFactory
) -> None:
    ports = {pool: p.port for pool, p in grpc_pools.items()}
    server = BackgroundServer(validate_spec(grpc_doc(ports), "mesh.yaml"))
    try:
        server.start()
        split = Split.from_percent({"canary": 100})
        server.call(lambda: server.server.set_split("recommender", split, urgent=True))
        envoy = envoys.start(REGION, server.port)
        envoy.wait_ready()
        _exercise(envoy, grpc_pools)
    finally:
        server.close()


def _exercise(envoy: Envoy, grpc_pools: dict[str, GrpcPool]) -> None:
    """Calls reach the canary over h2; UNAVAILABLE is counted as such; health follows."""
    canary = "recommender|canary"
    wait_for(
        lambda: _stat(envoy, "envoy_cluster_membership_healthy", canary) == 1,
        "the canary healthy by grpc.health.v1",
        timeout=15,
    )
    assert wait_for(lambda: _calls(envoy, 5).get("v2") == 5, "calls reach v2 over h2", timeout=15)

    grpc_pools["canary"].fail_with = grpc.StatusCode.UNAVAILABLE
    got = _calls(envoy, 20)
    assert got == {"UNAVAILABLE": 20}
    # HTTP sees 200s; the gRPC stats see the failures the queries count.
    wait_for(
        lambda: _stat(envoy, "envoy_cluster_grpc_14", canary) >= 20,
        "UNAVAILABLE counted as envoy_cluster_grpc_14",
        timeout=10,
    )
    assert _stat(envoy, "envoy_cluster_grpc_total", canary) >= 25

    grpc_pools["canary"].set_serving(False)
    wait_for(
        lambda: _stat(envoy, "envoy_cluster_membership_healthy", canary) == 0,
        "the canary unhealthy once it reports NOT_SERVING",
        timeout=15,
    )


def test_the_shadow_phase_reads_envoys_upstream_stats_for_grpc_too() -> None:
    """Envoy drops a mirrored call's answer before its gRPC stats filter: the shadow
    phase of a gRPC service counts what the cluster's upstream stats see."""
    plan = validate_spec(grpc_doc({"production": 1}), "mesh.yaml").services[0].rollout
    shadow = plan.for_shadow()
    assert shadow.queries["requests"] == DEFAULT_QUERIES["shadow_requests"]
    assert shadow.queries["errors"] == DEFAULT_QUERIES["shadow_errors"]
    assert "envoy_cluster_grpc_" in plan.queries["errors"]  # the plan itself unchanged


# ---- a rollout of a gRPC service, end to end ----


def _prometheus_sum(mesh: LocalMesh, promql: str) -> float:
    source = PrometheusSource(f"http://127.0.0.1:{mesh.layout.prometheus_port}")
    return source.query(promql, source._client()) or 0.0


def test_a_canary_answering_unavailable_is_rolled_back_on_its_grpc_errors(
    tmp_path: Path,
) -> None:
    """Real Envoys forward gRPC (h2c in, HTTP/2 out) to the lab's Open Inference Protocol
    servers; the canary's calls fail UNAVAILABLE in an HTTP 200. The rollout rolls back
    on errors that only the gRPC statistics could count: Envoy's 5xx for the canary
    stays at zero."""
    opts = MeshOptions(regions=("us-east", "eu-west"), rollout=FAST_PLAN, protocol="grpc")
    with LocalMesh(tmp_path / "mesh", opts) as mesh:
        load = mesh.processes.start_load()
        wait_for(lambda: len(load.versions()) >= 1, "gRPC answers through Envoy", timeout=15)
        mesh.spec.add_canary()
        wait_for(
            lambda: all(canary_share(e) >= 5 for e in mesh.processes.envoys),
            "the canary at 5%",
            timeout=60,
        )
        mesh.faults.set("eu-west", "canary", error_rate=0.5)
        state = mesh.state.wait_phase({"rolled_back", "promoted"}, 90)
        assert state["phase"] == "rolled_back", state
        wait_shares(mesh.processes.envoys, 0, timeout=20)

        (rollback,) = [
            e for e in mesh.state.audit() if e.region is None and e.phase_to == "rolled_back"
        ]
        assert "eu-west" in rollback.reason and "error_rate" in rollback.reason
        # The checks, and the region's rollback itself: a failure certain at its first
        # look rolls back at once, its measurements in the transition's entry only.
        checks = [e for e in mesh.state.audit() if e.region == "eu-west" and e.measurements]
        errors = max((e.measurements.canary.errors or 0) for e in checks if e.measurements)
        assert errors >= 1
        canary = 'region="eu-west",envoy_cluster_name="recommender|canary"'
        http_5xx = _prometheus_sum(
            mesh,
            f'sum(envoy_cluster_upstream_rq_xx{{{canary},envoy_response_code_class="5"}})',
        )
        unavailable = _prometheus_sum(mesh, f"sum(envoy_cluster_grpc_14{{{canary}}})")
        # (Not `unavailable >= errors`: the audit's counts are Prometheus increases,
        # extrapolated to the window's edges.)
        assert unavailable >= 1 and http_5xx == 0, (unavailable, http_5xx, errors)
        # The callers saw the same, as gRPC statuses.
        assert any(r.grpc_code == "UNAVAILABLE" for r in load.failures())

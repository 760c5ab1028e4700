"""The control plane's own probe of a host (rollout/probes.py) against the lab's real
model servers: REST and gRPC (the Open Inference Protocol, grpc.health.v1), a gRPC
server without grpc.health.v1 (as MLServer is), a closed port and a port that never
answers. Each cause reads as an operator needs it: status, UNIMPLEMENTED, refused,
timeout."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from typing import Any

import grpc
import pytest

from xds_server.lab.procs import free_port
from xds_server.lab.upstream import ModelServer
from xds_server.lab.upstream_grpc import InferenceServicer, inference_handler
from xds_server.lab.upstream_model import ServedModel
from xds_server.rollout.health import HealthBook
from xds_server.rollout.probes import NetworkProber, describe
from xds_server.spec import Endpoint, HealthCheck, validate_spec
from xds_server.spec.rollout import CheckType

MODEL = "recommender"
HTTP = HealthCheck()
GRPC = HealthCheck(type=CheckType.GRPC)
OIP = HealthCheck(type=CheckType.OIP, model=MODEL)


@pytest.fixture(scope="module")
def server() -> Iterator[ModelServer]:
    """One lab model server, REST and gRPC, for the whole module."""
    s = ModelServer(("127.0.0.1", 0), "us-east", "canary", "v2", MODEL, grpc_port=0)
    s.start_in_thread()
    yield s
    s.shutdown()
    s.server_close()


@pytest.fixture
def healthy(server: ModelServer) -> Iterator[ModelServer]:
    yield server
    server.served.faults = replace(server.served.faults, healthy=True)


def probe(hc: HealthCheck, grpc_service: bool, ep: Endpoint, timeout: float = 2) -> str | None:
    return asyncio.run(NetworkProber().probe(hc, grpc_service, ep, timeout))


def test_http_checks_pass_and_say_the_status_when_they_fail(healthy: ModelServer) -> None:
    rest = Endpoint("127.0.0.1", healthy.port)
    assert probe(HTTP, False, rest) is None
    assert probe(OIP, False, rest) is None
    assert probe(replace(OIP, model="iris"), False, rest) == (
        "HTTP 404 from GET /v2/models/iris/ready"
    )
    healthy.served.faults = replace(healthy.served.faults, healthy=False)
    assert probe(HTTP, False, rest) == "HTTP 503 from GET /healthz"
    assert probe(replace(HTTP, path="/v2/health/ready"), False, rest) == (
        "HTTP 400 from GET /v2/health/ready"
    )


def test_grpc_checks_speak_grpc_health_and_oip_model_ready(healthy: ModelServer) -> None:
    ep = Endpoint("127.0.0.1", healthy.grpc_port)
    assert probe(GRPC, True, ep) is None
    assert probe(replace(GRPC, grpc_service="inference.GRPCInferenceService"), True, ep) is None
    assert probe(OIP, True, ep) is None  # ModelReady over gRPC: no HTTP port involved
    assert probe(replace(OIP, model="iris"), True, ep).startswith("NOT_FOUND: ")  # type: ignore[union-attr]
    assert probe(replace(GRPC, grpc_service="nope"), True, ep).startswith("NOT_FOUND")  # type: ignore[union-attr]
    healthy.served.faults = replace(healthy.served.faults, healthy=False)
    assert probe(GRPC, True, ep) == "grpc.health.v1 says NOT_SERVING"
    assert probe(OIP, True, ep) == f"ModelReady: model {MODEL!r} not ready"


def test_a_grpc_check_of_a_host_on_another_port(healthy: ModelServer) -> None:
    """The REST port beside the gRPC one (MLServer, KServe): the endpoint's health port
    or the check's port, and the cause names the port asked."""
    traffic = Endpoint("127.0.0.1", healthy.grpc_port, health_port=healthy.port)
    check = replace(HTTP, type=CheckType.HTTP, path="/v2/health/ready")
    assert probe(check, True, traffic) is None
    assert probe(OIP, True, traffic) is None  # an HTTP port: the readiness path
    healthy.served.faults = replace(healthy.served.faults, healthy=False)
    assert probe(OIP, True, traffic) == f"HTTP 400 from GET /v2/models/{MODEL}/ready"
    named = describe(check, True, traffic)
    assert named == f"127.0.0.1:{healthy.grpc_port} (checked on port {healthy.port})"
    other = Endpoint("127.0.0.1", healthy.grpc_port)
    assert probe(replace(check, port=healthy.port), True, other) == (
        "HTTP 400 from GET /v2/health/ready"
    )


@pytest.fixture(scope="module")
def no_health_port() -> Iterator[int]:
    """A gRPC server of the Open Inference Protocol alone, as MLServer serves it: no
    grpc.health.v1."""
    served = ServedModel("us-east", "canary", "v2", MODEL)
    s = grpc.server(futures.ThreadPoolExecutor(4))
    s.add_generic_rpc_handlers((inference_handler(InferenceServicer(served)),))
    port = s.add_insecure_port("127.0.0.1:0")
    s.start()
    yield port
    s.stop(None)


def test_a_server_without_grpc_health_is_unimplemented_and_oip_still_works(
    no_health_port: int,
) -> None:
    ep = Endpoint("127.0.0.1", no_health_port)
    assert probe(GRPC, True, ep) == "UNIMPLEMENTED: no grpc.health.v1 service"
    assert probe(OIP, True, ep) is None


def test_refused_and_timeout() -> None:
    closed = Endpoint("127.0.0.1", free_port())
    assert probe(HTTP, False, closed) == "connection refused"
    assert probe(GRPC, True, closed) == "connection refused"
    assert probe(OIP, True, closed) == "connection refused"
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        ep = Endpoint("127.0.0.1", silent.getsockname()[1])
        assert probe(HTTP, False, ep, 0.3) == "timeout: no answer within 0.3s"
        assert probe(GRPC, True, ep, 0.3) == "timeout: no answer within 0.3s"


def _grpc_service(port: int, threshold: int) -> object:
    doc = {
        "regions": ["us-east"],
        "rollout": {
            "warmup": {
                "health_check": {
                    "type": "oip",
                    "model": MODEL,
                    "healthy_threshold": threshold,
                    "interval": "1s",
                }
            }
        },
        "services": [
            {
                "name": MODEL,
                "protocol": "grpc",
                "pools": {
                    "production": {"version": "v1", "endpoints": {"us-east": ["127.0.0.1:1"]}},
                    "canary": {"version": "v2", "endpoints": {"us-east": [f"127.0.0.1:{port}"]}},
                },
            }
        ],
    }
    return validate_spec(doc, "mesh.yaml").services[0]


def test_the_control_plane_keeps_envoys_arithmetic_for_the_hosts_it_checks(
    no_health_port: int,
) -> None:
    """healthy_threshold passes in a row, at most one probe per interval (the clock is
    the caller's: here a number the test moves)."""
    svc = _grpc_service(no_health_port, threshold=2)
    book = HealthBook()

    async def check(now: float) -> tuple[int, int, str]:
        return await book.check(NetworkProber(), svc, "canary", "us-east", 1.0, now)  # type: ignore[arg-type]

    total, ok, why = asyncio.run(check(100.0))
    assert (total, ok) == (1, 0) and "passed 1 of 2 times in a row" in why
    assert asyncio.run(check(100.5))[1] == 0  # within the interval: not asked again
    assert asyncio.run(check(101.0))[:2] == (1, 1)


def test_production_that_does_not_answer_at_all_is_no_evidence_against_the_check() -> None:
    """A control plane that cannot reach the hosts (another network than its Envoys')
    must not call every check misconfigured; a host that refuses, or answers no, does."""
    from xds_server.rollout.health import production_fails

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        quiet = f"127.0.0.1:{silent.getsockname()[1]}"
        svc = _service_with_production(quiet)
        assert asyncio.run(production_fails(NetworkProber(), svc, "us-east", 0.3)) is None
    refused = f"127.0.0.1:{free_port()}"
    why = asyncio.run(
        production_fails(NetworkProber(), _service_with_production(refused), "us-east", 0.3)
    )
    assert why is not None and f"{refused}: connection refused" in why and "misconfigured" in why


def _service_with_production(address: str) -> Any:
    doc = {
        "regions": ["us-east"],
        "rollout": {"warmup": {"health_check": {}}},
        "services": [
            {
                "name": MODEL,
                "pools": {
                    "production": {"version": "v1", "endpoints": {"us-east": [address]}},
                    "canary": {"version": "v2", "endpoints": {"us-east": ["127.0.0.1:1"]}},
                },
            }
        ],
    }
    return validate_spec(doc, "mesh.yaml").services[0]

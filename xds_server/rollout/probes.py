"""The control plane's own health probe of a host: the warm-up's check, asked directly.

Envoy's statistics say how many hosts of a pool are healthy, never why one is not, and
Envoy cannot send every check real model servers answer (an Open Inference Protocol
`ModelReady` over gRPC). `NetworkProber` asks a host what the spec's check asks, over
real HTTP (aiohttp) or gRPC (grpc.aio), and answers None (healthy) or the cause in a
few words: `HTTP 404 from GET /v2/health/ready`, `UNIMPLEMENTED: no grpc.health.v1
service`, `connection refused`, `timeout: no answer within 0.5s`.

The two gRPC requests are sent without generated stubs: `grpc.health.v1.HealthCheck
Request` and `inference.ModelReadyRequest` are each one string in field 1, which is the
wire form of `google.protobuf.StringValue`; their answers one varint in field 1 (the
status enum, the `ready` bool), that of `Int32Value` and `BoolValue`. So the control
plane needs neither the lab's generated OIP code nor grpcio-health-checking.
"""

from __future__ import annotations

import aiohttp
import grpc
from google.protobuf import wrappers_pb2

from xds_server.spec import Endpoint, HealthCheck
from xds_server.spec.rollout import CheckType

HEALTH_METHOD = "/grpc.health.v1.Health/Check"
MODEL_READY_METHOD = "/inference.GRPCInferenceService/ModelReady"
SERVING = 1
"""`grpc.health.v1.HealthCheckResponse.SERVING`."""
_HEALTH_STATUSES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


UNREACHED = ("timeout", "cannot connect", "UNAVAILABLE")
"""How the causes begin when nothing answered (no route, no answer in time): the probe
says nothing about the check then. "connection refused" is an answer: nothing listens
on that port of that host."""


def unreached(cause: str) -> bool:
    return cause.startswith(UNREACHED)


def check_port(hc: HealthCheck, ep: Endpoint) -> int:
    """The port a host is checked on: its own health port, else the check's, else its
    traffic port (what Envoy's `health_check_config.port_value` does too)."""
    return ep.health_port or hc.port or ep.port


def describe(hc: HealthCheck, grpc_service: bool, ep: Endpoint) -> str:
    """The host as a cause names it: its address, and the port checked when another."""
    port = check_port(hc, ep)
    return str(ep) if port == ep.port else f"{ep} (checked on port {port})"


class NetworkProber:
    """The `HostProber` on the network: one check of one host, bounded by `timeout`."""

    async def probe(
        self, hc: HealthCheck, grpc_service: bool, ep: Endpoint, timeout: float
    ) -> str | None:
        """None when the host passes `hc`, else why not. Never raises."""
        port = check_port(hc, ep)
        try:
            if hc.over_http(grpc_service, ep.health_port):
                return await _http(ep.host, port, hc.http_path, timeout)
            if hc.for_protocol(grpc_service) == CheckType.GRPC:
                return await _grpc_health(ep.host, port, hc.grpc_service, timeout)
            return await _model_ready(ep.host, port, hc.model, timeout)
        except Exception as exc:  # a probe's failure is a cause, never a crash
            return f"probe failed: {exc!r}"


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _http(host: str, port: int, path: str, timeout: float) -> str | None:
    """GET the path; 200 is healthy, as Envoy's HTTP check expects by default."""
    url = f"http://{_target(host, port)}{path}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url, allow_redirects=False) as answer,
        ):
            if answer.status == 200:
                return None
            return f"HTTP {answer.status} from GET {path}"
    except TimeoutError:
        return f"timeout: no answer within {timeout:g}s"
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection refused"
        return f"cannot connect: {exc.os_error.strerror or exc.os_error!r}"
    except aiohttp.ClientError as exc:
        return f"HTTP request failed: {type(exc).__name__}: {exc}"


async def _unary(host: str, port: int, method: str, request: bytes, timeout: float) -> bytes:
    async with grpc.aio.insecure_channel(_target(host, port)) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        answer: bytes = await call(request, timeout=timeout)
        return answer


def _rpc_cause(exc: grpc.aio.AioRpcError, timeout: float, what: str) -> str:
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"timeout: no answer within {timeout:g}s"
    if code == grpc.StatusCode.UNAVAILABLE and "refused" in details.lower():
        return "connection refused"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"UNIMPLEMENTED: no {what}"
    return f"{code.name}: {details}" if details else code.name


async def _grpc_health(host: str, port: int, service: str, timeout: float) -> str | None:
    request = wrappers_pb2.StringValue(value=service).SerializeToString()
    try:
        answer = await _unary(host, port, HEALTH_METHOD, request, timeout)
    except grpc.aio.AioRpcError as exc:
        return _rpc_cause(exc, timeout, "grpc.health.v1 service")
    except TimeoutError:
        return f"timeout: no answer within {timeout:g}s"
    status = wrappers_pb2.Int32Value.FromString(answer).value
    if status == SERVING:
        return None
    return f"grpc.health.v1 says {_HEALTH_STATUSES.get(status, str(status))}"


async def _model_ready(host: str, port: int, model: str, timeout: float) -> str | None:
    request = wrappers_pb2.StringValue(value=model).SerializeToString()
    try:
        answer = await _unary(host, port, MODEL_READY_METHOD, request, timeout)
    except grpc.aio.AioRpcError as exc:
        return _rpc_cause(exc, timeout, "inference.GRPCInferenceService (OIP) service")
    except TimeoutError:
        return f"timeout: no answer within {timeout:g}s"
    if wrappers_pb2.BoolValue.FromString(answer).value:
        return None
    return f"ModelReady: model {model!r} not ready"

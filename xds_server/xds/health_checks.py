"""The warm-up's active health checks as Envoy gets them: which clusters carry one, what
it asks (`grpc.health.v1`, an HTTP path, an OIP model's readiness path), and the port
each host is checked on. Pure, like the rest of the builder (`resources.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.core.v3 import health_check_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from xds_server.spec import HealthCheck, Protocol, Service
from xds_server.spec.rollout import CheckType

WARMING_POOLS = ("canary", "baseline")
"""The pools whose clusters carry the warm-up's active health checks. Production's
serving hosts never do: a check they fail (a misconfigured one) would mark them
unhealthy under traffic; the control plane probes them instead (`rollout.probes`)."""


def envoy_health_check(svc: Service, pool: str) -> HealthCheck | None:
    """The warm-up check Envoy runs on a pool's hosts; None for production, without a
    check, and for an `oip` check of a gRPC host's traffic port (`ModelReady`: Envoy's
    gRPC checks speak `grpc.health.v1` only, so the control plane asks it itself)."""
    hc = svc.health_check(pool)
    if hc is None or pool not in WARMING_POOLS:
        return None
    grpc = svc.protocol == Protocol.GRPC
    if hc.for_protocol(grpc) == CheckType.OIP and grpc and hc.port is None:
        p = svc.pools[pool]
        hosts = [ep for eps in p.endpoints.values() for ep in eps]
        if p.registered or not all(ep.health_port for ep in hosts):
            return None
    return hc


@dataclass(frozen=True)
class HealthPorts:
    """A health-checked cluster's endpoints: each is checked on its `health_port`, else
    on the check's `port`, else (None) on its traffic port."""

    default: int | None = None


def health_ports(hc: HealthCheck | None) -> HealthPorts | None:
    return None if hc is None else HealthPorts(hc.port)


def build_health_check(hc: HealthCheck, grpc: bool) -> health_check_pb2.HealthCheck:
    check = health_check_pb2.HealthCheck(
        timeout=_duration(hc.timeout),
        interval=_duration(hc.interval),
        # A warming pool has no traffic by design; Envoy would otherwise check it only
        # every 60 s, and a healed canary would wait that long for weight.
        no_traffic_interval=_duration(hc.interval),
        healthy_threshold=wrappers_pb2.UInt32Value(value=hc.healthy_threshold),
        unhealthy_threshold=wrappers_pb2.UInt32Value(value=hc.unhealthy_threshold),
    )
    if hc.for_protocol(grpc) == CheckType.GRPC:
        check.grpc_health_check.service_name = hc.grpc_service
    else:  # http, or oip over HTTP (its model's readiness path)
        check.http_health_check.path = hc.http_path
    return check


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d

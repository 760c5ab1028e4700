"""The warm-up's health check, field by field: every field the spec accepts changes what
Envoy is sent (or what the control plane asks), and every field that would be ignored is
an error naming the file and the field (issue 26: "no silent settings")."""

from __future__ import annotations

import copy
from dataclasses import fields
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from xds_server.spec import HealthCheck, SpecError, validate_spec
from xds_server.traffic import TrafficState
from xds_server.xds.health_checks import envoy_health_check
from xds_server.xds.resources import build_region
from xds_server.xds.types import CLUSTER, ENDPOINT

REGION = "us-east"
SERVICE = "recommender"
HC = "rollout.warmup.health_check"


def doc(check: dict[str, Any] | None, protocol: str = "http", **canary: Any) -> dict[str, Any]:
    """One service with production and canary, the check at the top level."""
    pools = {
        "production": {"version": "v1", "endpoints": {REGION: ["127.0.0.1:9001"]}},
        "canary": {"version": "v2", "endpoints": {REGION: ["127.0.0.1:9003"]}, **canary},
    }
    out: dict[str, Any] = {
        "regions": [REGION],
        "services": [{"name": SERVICE, "protocol": protocol, "pools": pools}],
    }
    if check is not None:
        out["rollout"] = {"warmup": {"health_check": check}}
    return out


def built(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(clusters, endpoints) by pool."""
    res = build_region(validate_spec(d, "mesh.yaml"), TrafficState(), REGION)
    clusters = {n.split("|")[1]: c for n, c in res.by_type[CLUSTER].items()}
    endpoints = {n.split("|")[1]: e for n, e in res.by_type[ENDPOINT].items()}
    return clusters, endpoints


def canary_check(d: dict[str, Any]) -> Any:
    clusters, _ = built(d)
    cluster = clusters["canary"]
    assert isinstance(cluster, cluster_pb2.Cluster)
    (check,) = cluster.health_checks
    return check


def checked_port(d: dict[str, Any], pool: str = "canary") -> int:
    _, endpoints = built(d)
    cla = endpoints[pool]
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    return int(cla.endpoints[0].lb_endpoints[0].endpoint.health_check_config.port_value)


def problems(d: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as err:
        validate_spec(d, "mesh.yaml")
    return err.value.render().splitlines()


def test_every_cluster_drops_a_removed_host_and_production_is_never_checked_by_envoy() -> None:
    clusters, _ = built(doc({}))
    assert all(c.ignore_health_on_host_removal for c in clusters.values())
    assert not clusters["production"].health_checks
    assert len(clusters["canary"].health_checks) == 1
    clusters, _ = built(doc(None))  # no warm-up check: none anywhere
    assert all(not c.health_checks for c in clusters.values())


# ---- each accepted field has an effect ----

ACCEPTED: dict[str, tuple[dict[str, Any], str, Any]] = {
    # field: (the check, protocol, what Envoy gets (or the control plane asks))
    "type": ({"type": "http", "port": 9100}, "grpc", "http"),
    "path": ({"path": "/v2/health/ready"}, "http", "/v2/health/ready"),
    "grpc_service": ({"grpc_service": "inference.GRPCInferenceService"}, "grpc", None),
    "model": ({"type": "oip", "model": "iris"}, "http", "/v2/models/iris/ready"),
    "port": ({"port": 9100}, "http", 9100),
    "interval": ({"interval": "3s"}, "http", 3),
    "timeout": ({"timeout": "250ms"}, "http", 0.25),
    "healthy_threshold": ({"healthy_threshold": 4}, "http", 4),
    "unhealthy_threshold": ({"unhealthy_threshold": 5}, "http", 5),
}


def test_the_walk_covers_every_field_of_a_health_check() -> None:
    spec_fields = {f.name for f in fields(HealthCheck) if f.init and f.compare}
    assert spec_fields == set(ACCEPTED)


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_each_accepted_field_changes_what_envoy_is_sent(name: str) -> None:
    check, protocol, want = ACCEPTED[name]
    default = (canary_check(doc({}, protocol)), checked_port(doc({}, protocol)))
    got = canary_check(doc(check, protocol))
    assert (got, checked_port(doc(check, protocol))) != default, name
    if name in ("type", "path", "model"):
        assert got.http_health_check.path == (want if name != "type" else "/healthz")
    elif name == "grpc_service":
        assert got.grpc_health_check.service_name == "inference.GRPCInferenceService"
    elif name == "port":
        assert checked_port(doc(check, protocol)) == want
        assert checked_port(doc(check, protocol), "production") == 0  # never checked by Envoy
    elif name in ("interval", "timeout"):
        assert getattr(got, name).ToNanoseconds() == round(want * 1e9)
        if name == "interval":  # a warming pool has no traffic: checked as often
            assert got.no_traffic_interval.ToNanoseconds() == round(want * 1e9)
    else:
        assert getattr(got, name).value == want


def test_an_endpoint_health_port_is_where_envoy_checks_that_host() -> None:
    d = doc({"type": "http", "path": "/v2/health/ready"}, "grpc")
    d["services"][0]["pools"]["canary"]["endpoints"][REGION] = [
        {"address": "127.0.0.1:9003", "health_port": 9004}
    ]
    d["services"][0]["pools"]["production"]["endpoints"][REGION] = [
        {"address": "127.0.0.1:9001", "health_port": 9002}
    ]
    assert checked_port(d) == 9004
    assert canary_check(d).http_health_check.path == "/v2/health/ready"
    # the endpoint's own port wins over the check's
    d["rollout"]["warmup"]["health_check"]["port"] = 9100
    assert checked_port(d) == 9004


def test_an_oip_check_of_a_grpc_port_is_asked_by_the_control_plane() -> None:
    """Envoy's gRPC checks speak grpc.health.v1 only: an OIP ModelReady on the traffic
    port of a gRPC host is left to the control plane (no Envoy check, so the pool is
    not marked unhealthy by a check Envoy cannot send); with an HTTP port, Envoy asks
    the model's readiness path there."""
    d = doc({"type": "oip", "model": "iris"}, "grpc")
    spec = validate_spec(d, "mesh.yaml")
    assert envoy_health_check(spec.services[0], "canary") is None
    clusters, _ = built(d)
    assert not clusters["canary"].health_checks
    d["rollout"]["warmup"]["health_check"]["port"] = 8080
    assert canary_check(d).http_health_check.path == "/v2/models/iris/ready"
    assert checked_port(d) == 8080


# ---- each misuse is an error naming the file and the field ----

MISUSED: list[tuple[dict[str, Any], str, str, str]] = [
    # (the check, protocol, the field named, words of the message)
    ({"path": "/ready"}, "grpc", f"{HC}.path", "only a `type: http` check reads it"),
    ({"type": "oip", "model": "m", "path": "/x"}, "http", f"{HC}.path", "type: oip"),
    ({"grpc_service": "x"}, "http", f"{HC}.grpc_service", "only a `type: grpc` check"),
    ({"model": "iris"}, "http", f"{HC}.model", "only a `type: oip` check reads it"),
    ({"model": "iris", "type": "grpc"}, "grpc", f"{HC}.model", "only a `type: oip`"),
    ({"type": "oip"}, "http", f"{HC}.model", "required for `type: oip`"),
    ({"type": "http"}, "grpc", f"{HC}.port", "required"),
    ({"type": "grpc"}, "http", f"{HC}.type", "need `protocol: grpc`"),
    ({"type": "tcp"}, "http", f"{HC}.type", "expected one of"),
    ({"port": 0}, "http", f"{HC}.port", "expected an integer from 1 to 65535"),
    ({"port": "9100"}, "http", f"{HC}.port", "expected an integer"),
    ({"model": ""}, "http", f"{HC}.model", "expected the name"),
    ({"path": "ready"}, "http", f"{HC}.path", "starting with '/'"),
    ({"interval": "soon"}, "http", f"{HC}.interval", ""),
    ({"timeout": -1}, "http", f"{HC}.timeout", ""),
    ({"healthy_threshold": 0}, "http", f"{HC}.healthy_threshold", ""),
    ({"unhealthy_threshold": "x"}, "http", f"{HC}.unhealthy_threshold", ""),
    ({"grpc_service": 7}, "grpc", f"{HC}.grpc_service", ""),
    ({"paht": "/ready"}, "http", f"{HC}.paht", ""),
]


@pytest.mark.parametrize("check, protocol, field, words", MISUSED)
def test_each_misused_field_is_an_error_naming_file_and_field(
    check: dict[str, Any], protocol: str, field: str, words: str
) -> None:
    lines = problems(doc(check, protocol))
    mine = [line for line in lines if line.startswith(f"mesh.yaml: {field}: ")]
    assert mine and words in mine[0], lines


def test_a_service_level_check_is_named_at_the_service() -> None:
    d = doc(None, "grpc")
    d["services"][0]["rollout"] = {"warmup": {"health_check": {"path": "/ready"}}}
    (line,) = problems(d)
    assert line.startswith("mesh.yaml: services[0].rollout.warmup.health_check.path: ")
    assert "'recommender'" in line


@pytest.mark.parametrize(
    "endpoint, field, words",
    [
        ({"address": "127.0.0.1:9003", "health_port": 0}, ".health_port", "1 to 65535"),
        ({"address": "127.0.0.1:9003", "health_port": True}, ".health_port", "expected"),
        ({"health_port": 9004}, ".address", "required"),
        ({"address": "nowhere", "health_port": 9004}, ".address", "bad address"),
        ({"address": "127.0.0.1:9003", "health": 9004}, ".health", ""),
    ],
)
def test_endpoint_mappings_are_checked(endpoint: dict[str, Any], field: str, words: str) -> None:
    d = doc({})
    d["services"][0]["pools"]["canary"]["endpoints"][REGION] = [endpoint]
    at = f"mesh.yaml: services[0].pools.canary.endpoints.{REGION}[0]{field}: "
    lines = problems(d)
    assert any(line.startswith(at) and words in line for line in lines), lines


def test_a_health_port_with_no_check_is_an_error_and_duplicates_are_by_address() -> None:
    d = doc(None)
    d["services"][0]["pools"]["canary"]["endpoints"][REGION] = [
        {"address": "127.0.0.1:9003", "health_port": 9004}
    ]
    at = f"mesh.yaml: services[0].pools.canary.endpoints.{REGION}[0].health_port: "
    assert any(line.startswith(at) for line in problems(d))
    d = doc({})
    d["services"][0]["pools"]["canary"]["endpoints"][REGION] = [
        {"address": "127.0.0.1:9003", "health_port": 9004},
        "127.0.0.1:9003",
    ]
    assert any("duplicate address '127.0.0.1:9003'" in line for line in problems(d))


def test_an_http_check_of_a_grpc_service_is_fine_with_a_health_port_on_every_host() -> None:
    d = doc({"type": "http", "path": "/v2/health/ready"}, "grpc")
    for pool in ("production", "canary"):
        eps = d["services"][0]["pools"][pool]["endpoints"][REGION]
        eps[0] = {"address": eps[0], "health_port": 9100 + len(pool)}
    validate_spec(d, "mesh.yaml")
    missing = copy.deepcopy(d)
    missing["services"][0]["pools"]["production"]["endpoints"][REGION] = ["127.0.0.1:9001"]
    assert any(f"{HC}.port: required" in line for line in problems(missing))


def test_a_registered_instance_brings_its_health_port_to_envoy() -> None:
    """`xds-server register --health-port`: the instance's key carries it, the served
    spec's endpoint has it, Envoy checks the host there."""
    from xds_server.ha.instances import (
        Instance,
        instance_from_json,
        instance_to_json,
        with_registered,
    )

    d = doc({"type": "http", "path": "/v2/health/ready", "port": 9100}, "grpc")
    del d["services"][0]["pools"]["canary"]["endpoints"]  # the registry's instances
    i = Instance(SERVICE, "v2", REGION, "127.0.0.1:9005", 1.0, 10.0, health_port=9006)
    again = instance_from_json(instance_to_json(i))
    assert again.endpoint.health_port == 9006
    old = Instance(SERVICE, "v2", REGION, "127.0.0.1:9007", 1.0, 10.0)
    assert instance_from_json(instance_to_json(old)).endpoint.health_port is None
    served = with_registered(validate_spec(d, "mesh.yaml"), [again, old]).spec
    cla = build_region(served, TrafficState(), REGION).by_type[ENDPOINT][f"{SERVICE}|canary"]
    ports = {
        lb.endpoint.address.socket_address.port_value: lb.endpoint.health_check_config.port_value
        for lb in cla.endpoints[0].lb_endpoints  # type: ignore[attr-defined]
    }
    assert ports == {9005: 9006, 9007: 9100}  # its own, else the check's


def test_a_pool_may_have_a_check_of_its_own() -> None:
    """`pools.<pool>.health_check` replaces the service's for that pool: a canary served
    by another server (another model name) is asked what it answers."""
    d = doc(None, health_check={"type": "oip", "model": "iris"})
    spec = validate_spec(d, "mesh.yaml")
    svc = spec.services[0]
    assert svc.rollout.warmup.needed  # warm-up runs for the pool's own check
    assert svc.health_check("production") is None
    assert canary_check(d).http_health_check.path == "/v2/models/iris/ready"
    d["rollout"] = {"warmup": {"health_check": {"path": "/v2/health/ready"}}}
    assert canary_check(d).http_health_check.path == "/v2/models/iris/ready"  # its own wins
    assert validate_spec(d, "mesh.yaml").services[0].health_check("production").path == (  # type: ignore[union-attr]
        "/v2/health/ready"
    )
    bad = doc(None, health_check={"path": "/ready", "model": "iris"})
    at = "mesh.yaml: services[0].pools.canary.health_check.model: "
    assert any(line.startswith(at) for line in problems(bad))
    grpc = doc({"type": "oip", "model": "iris"}, "grpc", health_check={"type": "http"})
    at = "mesh.yaml: services[0].pools.canary.health_check.port: required"
    assert any(line.startswith(at) for line in problems(grpc)), problems(grpc)

"""Istio `DestinationRule` + `VirtualService` per service and region, from rollout state.

A pure function of the spec and the rollout states (no I/O, no clock), so the same
objects come out of `xds-server manifests istio` and out of the controller's `istio`
output mode, and a test can validate every one of them against Istio's CRD schemas.

`canary_match` rules become a route before the weighted one that sends what they match
to the canary subset; sticky users (`sticky:`) have no Istio form (a consistent hash
picks an endpoint within one subset, not the subset) and render nothing. A member of a
`consistent` rollout group gets what its xDS routes have (`xds.resources.arm_routes`):
before the `canary_match` route, one route per arm matching `x-xds-arm` exactly to that
arm's subset (while the canary has weight), and the weighted route's destinations each
setting `x-xds-arm` to their own subset.

The weights are the ones the controller pushes over xDS (`rollout.state.service_split`,
with pools the spec no longer has giving their share to production), turned into the whole
percentages Istio's `weight` field takes. Rounding never gives the canary more than
its exact share when production can take the remainder: ties go to production.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from xds_server.rollout.state import RolloutState, service_split
from xds_server.spec import (
    ARM_HEADER,
    POOL_NAMES,
    IstioConfig,
    MatchRule,
    MeshSpec,
    Protocol,
    Service,
)
from xds_server.spec.rollout import CANARY_MATCH_HEADER
from xds_server.traffic import WEIGHT_TOTAL, Split
from xds_server.xds.resources import ARMS, cookie_regex, is_consistent

GROUP = "networking.istio.io"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"
PLURALS: Mapping[str, str] = {
    "DestinationRule": "destinationrules",
    "VirtualService": "virtualservices",
}
"""Kinds we write, in apply order: subsets exist before any route names them."""

FIELD_MANAGER = "xds-server"
LABEL_PREFIX = "xds-server/"
MANAGED_BY = {"app.kubernetes.io/managed-by": FIELD_MANAGER}


def owner_labels(cfg: IstioConfig) -> dict[str, str]:
    """Who made an object: xds-server, and which instance of it (`istio.instance`). The
    istio output mode deletes only objects carrying these (and its region's label)."""
    return {**MANAGED_BY, f"{LABEL_PREFIX}instance": cfg.instance}


def percent_weights(split: Split, pools: Sequence[str]) -> dict[str, int]:
    """Whole percentages for `pools` that sum to 100 (largest remainder; ties: production).

    A pool not in `pools` must have no share. Production wins ties because it is listed
    first, so a 0.5% canary becomes 0%, never 1%.
    """
    units = {p: split.get(p) for p in pools}
    if sum(units.values()) != WEIGHT_TOTAL:
        missing = [p for p in POOL_NAMES if p not in pools and split.get(p)]
        raise ValueError(f"split gives a share to pools not listed: {', '.join(missing)}")
    per_percent = WEIGHT_TOTAL // 100
    out = {p: u // per_percent for p, u in units.items()}
    left = 100 - sum(out.values())
    by_remainder = sorted(pools, key=lambda p: (-(units[p] % per_percent), pools.index(p)))
    for p in by_remainder[:left]:
        out[p] += 1
    return out


def region_objects(
    spec: MeshSpec,
    region: str,
    rollouts: Mapping[str, RolloutState],
    istio: IstioConfig | None = None,
) -> list[dict[str, Any]]:
    """Every service's DestinationRule, then every service's VirtualService, for one region."""
    cfg = istio or spec.istio or IstioConfig()
    if region not in spec.regions:
        raise KeyError(region)
    rules, routes = [], []
    for svc in spec.services:
        rollout = rollouts.get(svc.name)
        rules.append(destination_rule(svc, region, rollout, cfg))
        routes.append(virtual_service(svc, region, rollout, cfg, is_consistent(spec, svc.name)))
    return rules + routes


def all_objects(
    spec: MeshSpec,
    rollouts: Mapping[str, RolloutState],
    regions: Sequence[str] | None = None,
    istio: IstioConfig | None = None,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for region in regions or spec.regions:
        out += region_objects(spec, region, rollouts, istio)
    return out


def object_name(service: str, region: str) -> str:
    return f"{service}-{region}"


def _metadata(
    svc: Service, region: str, rollout: RolloutState | None, cfg: IstioConfig, split: Split
) -> dict[str, Any]:
    labels = {
        **owner_labels(cfg),
        f"{LABEL_PREFIX}service": svc.name,
        f"{LABEL_PREFIX}region": region,
    }
    annotations = {
        f"{LABEL_PREFIX}rollout": "none",
        f"{LABEL_PREFIX}weights": ", ".join(
            f"{p}={pct:g}%" for p, pct in split.percent().items() if p in svc.pools
        ),
    }
    rs = rollout.regions.get(region) if rollout else None
    if rollout is not None and rs is not None:
        labels[f"{LABEL_PREFIX}canary-version"] = rollout.canary_version
        labels[f"{LABEL_PREFIX}phase"] = str(rs.phase)
        step = ""
        if 0 <= rs.step < len(svc.rollout.steps):
            step = f" ({svc.rollout.steps[rs.step]:g}%)"
        annotations.update(
            {
                f"{LABEL_PREFIX}rollout": f"{svc.name} canary {rollout.canary_version}: "
                f"{rollout.phase}",
                f"{LABEL_PREFIX}step": f"{rs.step}{step}"
                + (" set by hand" if rs.manual_canary is not None else ""),
                f"{LABEL_PREFIX}reason": rs.reason[:500],
            }
        )
    return {
        "name": object_name(svc.name, region),
        "namespace": cfg.namespace,
        "labels": labels,
        "annotations": annotations,
    }


def destination_rule(
    svc: Service, region: str, rollout: RolloutState | None, cfg: IstioConfig
) -> dict[str, Any]:
    split = service_split(svc, region, rollout).within(svc)
    subsets = []
    for pool in svc.pools.values():
        labels = {cfg.version_label: pool.version}
        if cfg.pool_label:
            labels[cfg.pool_label] = pool.name
        subsets.append({"name": pool.name, "labels": labels})
    spec: dict[str, Any] = {"host": cfg.host(svc.name), "subsets": subsets}
    if svc.protocol == Protocol.GRPC:
        # HTTP/2 to the pods whatever the Service's port is named, as xDS clusters of a
        # gRPC service are.
        spec["trafficPolicy"] = {"connectionPool": {"http": {"h2UpgradePolicy": "UPGRADE"}}}
    return {
        "apiVersion": API_VERSION,
        "kind": "DestinationRule",
        "metadata": _metadata(svc, region, rollout, cfg, split),
        "spec": spec,
    }


def virtual_service(
    svc: Service,
    region: str,
    rollout: RolloutState | None,
    cfg: IstioConfig,
    consistent: bool = False,
) -> dict[str, Any]:
    """`consistent`: the service is a member of a `consistent` rollout group."""
    split = service_split(svc, region, rollout).within(svc)
    host = cfg.host(svc.name)
    weights = percent_weights(split, svc.pool_names())
    route: list[dict[str, Any]] = [
        {"destination": {"host": host, "subset": pool}, "weight": weights[pool]}
        for pool in svc.pool_names()
    ]
    if consistent:
        for r in route:
            r["headers"] = {"request": {"set": {ARM_HEADER: r["destination"]["subset"]}}}
    arms = arm_http(svc, host) if consistent and weights.get("canary", 0) > 0 else []
    http: dict[str, Any] = {
        "name": "rollout",
        "match": [{"uri": {"prefix": svc.prefix}}],
        "route": route,
        # Only a canary-match route may mark a request as its own (as over xDS).
        "headers": {"request": {"remove": [CANARY_MATCH_HEADER]}},
    }
    if split.shadow:
        # Warm-up shadow traffic, as the xDS route mirrors it (answers are dropped).
        http["mirrors"] = [
            {
                "destination": {"host": host, "subset": pool},
                "percentage": {"value": split.shadow * 100 / WEIGHT_TOTAL},
            }
            for pool in ("canary", "baseline")
            if pool in svc.pools
        ]
    return {
        "apiVersion": API_VERSION,
        "kind": "VirtualService",
        "metadata": _metadata(svc, region, rollout, cfg, split),
        "spec": {"hosts": [host], "http": [*arms, *canary_match_http(svc, host, consistent), http]},
    }


def arm_http(svc: Service, host: str) -> list[dict[str, Any]]:
    """A consistent member's routes by the arm a request carries, as over xDS: `canary`
    to the canary subset, `baseline` to the baseline's (production's without one),
    `production` to production's; the header passes on unchanged."""
    return [
        {
            "name": f"arm-{arm}",
            "match": [{"uri": {"prefix": svc.prefix}, "headers": {ARM_HEADER: {"exact": arm}}}],
            "route": [
                {
                    "destination": {
                        "host": host,
                        "subset": arm if arm in svc.pools else "production",
                    },
                    "weight": 100,
                }
            ],
            "headers": {"request": {"remove": [CANARY_MATCH_HEADER]}},
        }
        for arm in ARMS
    ]


def canary_match_http(svc: Service, host: str, consistent: bool = False) -> list[dict[str, Any]]:
    """The `canary_match` rules as one route (any of its matches) to the canary subset,
    placed before the weighted route, whatever the step, while there is a canary pool.
    Unlike xDS (a cluster of their own), Istio counts them with the canary subset. A
    consistent member's sets the canary arm too, as over xDS."""
    rules = svc.rollout.canary_match
    if "canary" not in svc.pools or not rules:
        return []
    mark = {CANARY_MATCH_HEADER: "true", **({ARM_HEADER: "canary"} if consistent else {})}
    return [
        {
            "name": "canary-match",
            "match": [{"uri": {"prefix": svc.prefix}, "headers": _header_match(r)} for r in rules],
            "route": [{"destination": {"host": host, "subset": "canary"}, "weight": 100}],
            # Model servers label what they export with it: the analysis leaves it out.
            "headers": {"request": {"set": mark}},
        }
    ]


def _header_match(rule: MatchRule) -> dict[str, Any]:
    if rule.header is not None:
        return {rule.header: {"exact": rule.value}}
    assert rule.cookie is not None
    return {"cookie": {"regex": cookie_regex(rule.cookie, rule.value)}}


def route_weights(vs: Mapping[str, Any]) -> dict[str, int]:
    """subset -> weight of the weighted route of a VirtualService this module wrote (for
    checks and the e2e); `canary_match` routes come before it."""
    (http,) = [h for h in vs["spec"]["http"] if h.get("name") == "rollout"]
    return {r["destination"]["subset"]: int(r.get("weight", 0)) for r in http["route"]}


def to_yaml(objects: Iterable[Mapping[str, Any]]) -> str:
    """A multi-document YAML stream, as `kubectl apply -f -` takes it."""
    return yaml.safe_dump_all([dict(o) for o in objects], sort_keys=False, explicit_start=True)

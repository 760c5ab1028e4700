"""The snapshot builder: mesh spec + traffic weights -> Envoy resources for one region.

Pure functions, no I/O. Everything the ADS server sends is made here, so the shape of
what Envoy receives can be read (and tested) in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2 as grpc_stats_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as upstream_http_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, message, wrappers_pb2

from xds_server.spec import (
    ARM_HEADER,
    POOL_NAMES,
    HealthCheck,
    MatchRule,
    MeshSpec,
    Protocol,
    Service,
)
from xds_server.spec.rollout import CANARY_MATCH_HEADER
from xds_server.traffic import Split, TrafficState
from xds_server.xds.endpoints import LoadAssignments, socket_address
from xds_server.xds.health_checks import (
    build_health_check,
    envoy_health_check,
    health_ports,
)
from xds_server.xds.sticky import STICKY_HEADER as STICKY_HEADER
from xds_server.xds.sticky import STICKY_MODULUS as STICKY_MODULUS
from xds_server.xds.sticky import sticky_hash as sticky_hash
from xds_server.xds.sticky import sticky_lua
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

LISTENER_NAME = "ingress"
ROUTE_CONFIG_NAME = "ingress"
LUA_FILTER = "envoy.filters.http.lua"
GRPC_STATS_FILTER = "envoy.filters.http.grpc_stats"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def cluster_name(service: str, pool: str) -> str:
    """`service|pool`: unique (service names have no '|') and readable in Envoy stats."""
    return f"{service}|{pool}"


def direct_cluster_name(service: str) -> str:
    """`service|canary-direct`: the canary's endpoints for `canary_match` requests, so
    that they are counted apart from the analysed `service|canary` (its stats, its
    Prometheus series) and never enter the analysis."""
    return cluster_name(service, "canary") + "-direct"


def service_clusters(svc: Service) -> list[tuple[str, str]]:
    """(cluster, pool whose endpoints and options it has) for every cluster of a service:
    one per pool, and the canary's direct cluster when `canary_match` routes use it."""
    out = [(cluster_name(svc.name, pool), pool) for pool in svc.pools]
    if "canary" in svc.pools and svc.rollout.canary_match:
        out.append((direct_cluster_name(svc.name), "canary"))
    return out


@dataclass(frozen=True)
class RegionResources:
    """Resources by type URL, then by name, for one region.

    Listeners are not here: a node may ask for its own listen address (several Envoys
    share one host in the lab), so listeners are made per node by `build_listener`.
    """

    region: str
    by_type: Mapping[str, Mapping[str, message.Message]]

    def route_targets(self) -> set[str]:
        """Every cluster that some route of this region sends traffic to."""
        targets: set[str] = set()
        for rc in self.by_type[ROUTE].values():
            assert isinstance(rc, route_pb2.RouteConfiguration)
            for vh in rc.virtual_hosts:
                for route in vh.routes:
                    targets.update(c.name for c in route.route.weighted_clusters.clusters)
                    targets.update(m.cluster for m in route.route.request_mirror_policies)
                    if route.route.cluster:
                        targets.add(route.route.cluster)
        return targets


def build_region(spec: MeshSpec, traffic: TrafficState, region: str) -> RegionResources:
    return RegionBuilder(region).build(spec, traffic)


class RegionBuilder:
    """Builds one region's resources, reusing the message of every unchanged part.

    Parts are memoized by their inputs (a cluster by its name, endpoints by their
    addresses, a virtual host by its match and split), so a weight change to one service
    builds one virtual host and the route configuration around it, and an unchanged
    resource is the very same object as in the previous snapshot, which makes comparing
    snapshots cheap. Memoizing does not change what is built: `build_region` without a
    memo gives equal resources.
    """

    def __init__(self, region: str) -> None:
        self.region = region
        self._clusters: dict[tuple[str, ClusterOptions], message.Message] = {}
        self._endpoints = LoadAssignments(region)
        self._vhosts: dict[tuple[Any, ...], message.Message] = {}
        self._routes: tuple[tuple[Any, ...], message.Message] | None = None
        """The route configuration, keyed by its virtual hosts' keys (values, not ids)."""
        self._last: tuple[MeshSpec, TrafficState, RegionResources, list[Any]] | None = None

    def build(self, spec: MeshSpec, traffic: TrafficState) -> RegionResources:
        if self._last is not None and self._last[0] is spec:
            return self._reweigh(traffic)
        clusters: dict[str, message.Message] = {}
        endpoints: dict[str, message.Message] = {}
        used_clusters = set()
        for svc in spec.services:
            for name, pool in service_clusters(svc):
                ckey = (name, cluster_options(svc, pool))
                if ckey not in self._clusters:
                    self._clusters[ckey] = build_cluster(name, ckey[1])
                clusters[name] = self._clusters[ckey]
                used_clusters.add(ckey)
                endpoints[name] = self._endpoints.get(
                    name,
                    svc.pools[pool].endpoints.get(self.region, ()),
                    health_ports(ckey[1].health_check),
                )
        vkeys = [self._vhost_key(spec, svc, traffic) for svc in spec.services]
        # Forget what the spec no longer has, so the memo stays the size of the spec.
        self._clusters = {k: v for k, v in self._clusters.items() if k in used_clusters}
        self._endpoints.keep_only(endpoints)
        built = RegionResources(
            self.region,
            {
                CLUSTER: clusters,
                ENDPOINT: endpoints,
                ROUTE: self._route_config(vkeys),
                LISTENER: {},
            },
        )
        self._last = (spec, traffic, built, vkeys)
        return built

    def _reweigh(self, traffic: TrafficState) -> RegionResources:
        """Same spec, new weights: only the virtual hosts whose split changed are built."""
        assert self._last is not None
        spec, old_traffic, old, vkeys = self._last
        changed = {
            svc
            for (svc, region) in set(traffic.splits) | set(old_traffic.splits)
            if region == self.region
            and traffic.split(svc, region) != old_traffic.split(svc, region)
        }
        if changed:
            vkeys = [
                self._vhost_key(spec, svc, traffic) if svc.name in changed else key
                for svc, key in zip(spec.services, vkeys, strict=True)
            ]
            old = RegionResources(self.region, {**old.by_type, ROUTE: self._route_config(vkeys)})
        self._last = (spec, traffic, old, vkeys)
        return old

    def _vhost_key(self, spec: MeshSpec, svc: Service, traffic: TrafficState) -> tuple[Any, ...]:
        """Build (or reuse) a service's virtual host; return its memo key."""
        split = traffic.effective(svc, self.region)
        plan = svc.rollout
        consistent = is_consistent(spec, svc.name)
        key = (
            svc.name,
            svc.domains,
            svc.prefix,
            tuple(svc.pools),
            split,
            plan.canary_match,
            plan.sticky,
            consistent,
        )
        if key not in self._vhosts:
            self._vhosts[key] = virtual_host(svc, split, consistent)
        return key

    def _route_config(self, vkeys: list[Any]) -> dict[str, message.Message]:
        keys = tuple(vkeys)
        if self._routes is None or self._routes[0] != keys:
            self._vhosts = {k: self._vhosts[k] for k in keys}
            self._routes = (
                keys,
                route_pb2.RouteConfiguration(
                    name=ROUTE_CONFIG_NAME, virtual_hosts=[self._vhosts[k] for k in keys]
                ),
            )
        return {ROUTE_CONFIG_NAME: self._routes[1]}


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


@dataclass(frozen=True)
class ClusterOptions:
    """What a pool's cluster carries besides its name: the service's warm-up settings
    and protocol."""

    health_check: HealthCheck | None = None
    """The active check Envoy runs (None: none, or one only the control plane can ask)."""
    slow_start: float = 0.0
    grpc: bool = False
    """HTTP/2 to the hosts."""


def cluster_options(svc: Service, pool: str) -> ClusterOptions:
    grpc = svc.protocol == Protocol.GRPC
    warmup = svc.rollout.warmup
    # Slow start ramps up the new version's hosts: only the canary's cluster gets it.
    slow_start = warmup.slow_start if pool == "canary" else 0.0
    return ClusterOptions(envoy_health_check(svc, pool), slow_start, grpc)


def build_cluster(name: str, options: ClusterOptions = ClusterOptions()) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=duration_pb2.Duration(seconds=1),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        # A host an EDS update drops leaves at once, even while its active health check
        # passes (Envoy would keep it, `/pending_dynamic_removal`, serving requests).
        ignore_health_on_host_removal=True,
    )
    if options.grpc:
        protocol = upstream_http_pb2.HttpProtocolOptions()
        protocol.explicit_http_config.http2_protocol_options.SetInParent()
        cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].Pack(protocol)
    if options.health_check is not None:
        cluster.health_checks.append(build_health_check(options.health_check, options.grpc))
    if options.slow_start > 0:
        cluster.round_robin_lb_config.slow_start_config.slow_start_window.CopyFrom(
            _duration(options.slow_start)
        )
    return cluster


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def virtual_host(
    svc: Service, split: Split, consistent: bool = False
) -> route_components_pb2.VirtualHost:
    """A service's routes: its `canary_match` routes (they win over the split), then the
    weighted route of its prefix. A member of a `consistent` rollout group puts the
    routes of the arm a request carries (`arm_routes`) before even those: a request an
    earlier member sent to production must not meet this member's canary because it
    also matches a `canary_match` rule here (a tester's request, sent to the canary
    there, carries the canary arm and still reaches the canary)."""
    arms = arm_routes(svc, split) if consistent else []
    matched = canary_match_routes(svc, consistent)
    return route_components_pb2.VirtualHost(
        name=svc.name,
        domains=list(svc.domains),
        routes=[*arms, *matched, split_route(svc, split, consistent)],
    )


def is_consistent(spec: MeshSpec, service: str) -> bool:
    """Is `service` a member of a rollout group with version-consistent routing?"""
    group = spec.group_of(service)
    return group is not None and group.consistent


def arm_mark(pool: str) -> base_pb2.HeaderValueOption:
    """ARM_HEADER set to `pool` (overwriting what a caller sent): the arm the upstream
    and everything it calls through Envoy will see."""
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=ARM_HEADER, value=pool),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


ARMS = ("canary", "baseline", "production")
"""The values of ARM_HEADER that a consistent member's routes honour, in route order."""


def arm_routes(svc: Service, split: Split) -> list[route_components_pb2.Route]:
    """A consistent member's routes by the arm a request already carries (set by the
    previous member's route): `canary` to the canary's cluster, `baseline` to the
    baseline's (production's without one), `production` to production's. Only while
    the split gives the canary weight in the region: without it every request goes to
    production and the weighted route marks it so. The header passes on unchanged.
    These are the real pools' clusters (the member's traffic, judged like the split's);
    the group's members share their steps, so the shares stay the configured ones."""
    if split.canary == 0:
        return []
    routes = []
    for arm in ARMS:
        pool = arm if arm in svc.pools else "production"
        route = route_components_pb2.Route(
            name=f"{svc.name}-arm-{arm}",
            match=route_components_pb2.RouteMatch(
                prefix=svc.prefix,
                headers=[
                    route_components_pb2.HeaderMatcher(
                        name=ARM_HEADER, string_match=string_pb2.StringMatcher(exact=arm)
                    )
                ],
            ),
            route=route_components_pb2.RouteAction(
                cluster=cluster_name(svc.name, pool), retry_policy=SAFE_RETRY
            ),
            request_headers_to_remove=[CANARY_MATCH_HEADER],
        )
        if svc.rollout.sticky is not None:
            route.request_headers_to_remove.append(STICKY_HEADER)
        routes.append(route)
    return routes


def split_route(svc: Service, split: Split, consistent: bool = False) -> route_components_pb2.Route:
    # Pools at 0% are left out of the route: the route then never names a cluster it does
    # not use, which keeps make-before-break simple. Production carries the rest.
    # Production, baseline, canary, in this order: with sticky users Envoy picks the
    # cluster whose interval of [0, total) holds the user's hash % total, so the canary,
    # last, owns [total - canary, total), which only grows as its share grows.
    # A consistent member's request carries the pool it was sent to (`arm_routes`).
    weighted = [
        route_components_pb2.WeightedCluster.ClusterWeight(
            name=cluster_name(svc.name, pool),
            weight=wrappers_pb2.UInt32Value(value=w),
            request_headers_to_add=[arm_mark(pool)] if consistent else [],
        )
        for pool in POOL_NAMES
        if pool in svc.pools and (w := split.get(pool)) > 0
    ]
    # Shadow traffic: Envoy copies a share of requests to canary and baseline and drops
    # their answers, so the new version warms up and is judged before any user sees it.
    mirrors = [
        route_components_pb2.RouteAction.RequestMirrorPolicy(
            cluster=cluster_name(svc.name, pool),
            runtime_fraction=base_pb2.RuntimeFractionalPercent(
                default_value=percent_pb2.FractionalPercent(
                    numerator=split.shadow,
                    denominator=percent_pb2.FractionalPercent.TEN_THOUSAND,
                )
            ),
            # A consistent member's copy is the pool's own: it carries its arm, not the
            # arm of the request it copies.
            request_headers_mutations=[mutation_rules_pb2.HeaderMutation(append=arm_mark(pool))]
            if consistent
            else [],
        )
        for pool in ("canary", "baseline")
        if split.shadow > 0 and pool in svc.pools
    ]
    sticky = svc.rollout.sticky
    route = route_components_pb2.Route(
        name=f"{svc.name}-split",
        match=route_components_pb2.RouteMatch(prefix=svc.prefix),
        route=route_components_pb2.RouteAction(
            weighted_clusters=route_components_pb2.WeightedCluster(
                clusters=weighted, header_name=STICKY_HEADER if sticky else ""
            ),
            request_mirror_policies=mirrors,
            retry_policy=SAFE_RETRY,
        ),
        # Only a `canary_match` route may mark a request as its own: a caller cannot.
        request_headers_to_remove=[CANARY_MATCH_HEADER],
    )
    if sticky is not None:
        # The Lua filter (disabled on the listener) runs for this route only: it turns the
        # user's id into STICKY_HEADER, which the upstream never sees.
        lua = lua_pb2.LuaPerRoute(source_code=base_pb2.DataSource(inline_string=sticky_lua(sticky)))
        route.typed_per_filter_config[LUA_FILTER].CopyFrom(
            pack(route_components_pb2.FilterConfig(config=pack(lua), is_optional=True))
        )
        route.request_headers_to_remove.append(STICKY_HEADER)
    return route


SAFE_RETRY = route_components_pb2.RetryPolicy(
    retry_on="connect-failure,refused-stream,reset-before-request",
    num_retries=wrappers_pb2.UInt32Value(value=2),
    retry_host_predicate=[
        route_components_pb2.RetryPolicy.RetryHostPredicate(
            name="envoy.retry_host_predicates.previous_hosts",
            typed_config=any_pb2.Any(),
        )
    ],
    host_selection_retry_max_attempts=5,
    # Another host is tried at once: nothing to wait out, it is not the one that refused.
    retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
        base_interval=duration_pb2.Duration(nanos=2_000_000),
        max_interval=duration_pb2.Duration(nanos=20_000_000),
    ),
)
"""Requests that never reached a host (it refused the connection or the stream) go to
another host of the same pool: a dead instance costs no request while its endpoints
are still served (a registered one's lease takes its TTL to run out). Never a request
a host may have processed: inference is not assumed idempotent."""
SAFE_RETRY.retry_host_predicate[0].typed_config.Pack(previous_hosts_pb2.PreviousHostsPredicate())


def canary_match_routes(svc: Service, consistent: bool = False) -> list[route_components_pb2.Route]:
    """One route per `canary_match` rule, to the canary's direct cluster, whatever the
    split (at 0% and during warm-up too) while the spec has a canary pool. Each marks its
    requests with CANARY_MATCH_HEADER (overwriting one a caller sent), which model
    servers label their series with: the analysis leaves them out (spec.SPLIT_ONLY).
    A consistent member's also sets the arm to `canary`: a tester reaches the canary of
    every member its request goes through (the next members count it as their canary's)."""
    if "canary" not in svc.pools:
        return []
    marks = [CANARY_MATCH_MARK, arm_mark("canary")] if consistent else [CANARY_MATCH_MARK]
    return [
        route_components_pb2.Route(
            name=f"{svc.name}-canary-match-{i}",
            match=route_components_pb2.RouteMatch(prefix=svc.prefix, headers=[match_header(rule)]),
            route=route_components_pb2.RouteAction(cluster=direct_cluster_name(svc.name)),
            request_headers_to_add=marks,
        )
        for i, rule in enumerate(svc.rollout.canary_match)
    ]


CANARY_MATCH_MARK = base_pb2.HeaderValueOption(
    header=base_pb2.HeaderValue(key=CANARY_MATCH_HEADER, value="true"),
    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
)


def match_header(rule: MatchRule) -> route_components_pb2.HeaderMatcher:
    if rule.header is not None:
        return route_components_pb2.HeaderMatcher(
            name=rule.header, string_match=string_pb2.StringMatcher(exact=rule.value)
        )
    assert rule.cookie is not None
    return route_components_pb2.HeaderMatcher(
        name="cookie",
        string_match=string_pb2.StringMatcher(
            safe_regex=regex_pb2.RegexMatcher(regex=cookie_regex(rule.cookie, rule.value))
        ),
    )


def cookie_regex(name: str, value: str) -> str:
    """An RE2 pattern that the whole `cookie` header matches (Envoy's and Istio's regex
    matches are full matches) when it has the cookie `name=value`, wherever it is."""
    return rf"(.*;\s*)?{re2_escape(name)}={re2_escape(value)}(;.*)?"


def re2_escape(text: str) -> str:
    """`text` as an RE2 literal: ASCII punctuation escaped with a backslash, other ASCII
    that is not a letter or digit (spaces, controls) as `\\x{..}`."""
    out = []
    for c in text:
        if not c.isascii() or c.isalnum() or c == "_":
            out.append(c)
        elif c.isprintable() and c != " ":
            out.append("\\" + c)
        else:
            out.append(f"\\x{{{ord(c):02x}}}")
    return "".join(out)


def build_listener(address: str, port: int) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="ingress_http",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=ROUTE_CONFIG_NAME),
        http_filters=[
            # Counts gRPC calls by their final status (`envoy_cluster_grpc_<code>`), local
            # replies included: what a gRPC service's error queries read. First, so it
            # sees every response; a no-op for requests that are not gRPC.
            hcm_pb2.HttpFilter(
                name=GRPC_STATS_FILTER,
                typed_config=pack(
                    grpc_stats_pb2.FilterConfig(
                        stats_for_all_methods=wrappers_pb2.BoolValue(value=False)
                    )
                ),
            ),
            # Disabled unless a route enables it (sticky services' routes do): a no-op for
            # every other route, so the listener need not depend on the spec.
            hcm_pb2.HttpFilter(name=LUA_FILTER, typed_config=pack(lua_pb2.Lua()), disabled=True),
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())
            ),
        ],
    )
    return listener_pb2.Listener(
        name=LISTENER_NAME,
        address=socket_address(address, port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm)
                    )
                ]
            )
        ],
    )


def pack(msg: message.Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


# ---- proxyless gRPC clients ----
#
# A gRPC application dialing `xds:///NAME` asks for the listener NAME by name, then for
# the route configuration that listener names, then for the clusters and endpoints its
# routes use. It gets an API listener (no address: the application is the listener) and
# a route configuration of its service alone, whose one virtual host matches any
# authority: gRPC chooses the virtual host by the target's authority, which a service's
# `domains` need not name (the default is `*`, and `*` of one service would catch the
# others' clients in Envoy's `ingress`). Both are derived from Envoy's route
# configuration, so Envoy's resources stay exactly what they are.

PROXYLESS_ROUTE_PREFIX = "grpc/"
"""Route configurations for proxyless clients are `grpc/SERVICE`: a service name has no
'/', so they never clash with Envoy's `ingress`."""


def proxyless_route_name(service: str) -> str:
    return PROXYLESS_ROUTE_PREFIX + service


def proxyless_targets(routes: route_pb2.RouteConfiguration | None) -> dict[str, str]:
    """Target name -> service, for the API listeners: every service by its name, then by
    each of its domains (a service's name wins over another's domain; never `*`, which
    in a listener subscription means "every listener"). From Envoy's route configuration,
    whose virtual hosts are the services (named after them, with their domains)."""
    if routes is None:
        return {}
    out = {vh.name: vh.name for vh in routes.virtual_hosts}
    for vh in routes.virtual_hosts:
        for domain in vh.domains:
            if domain != "*":
                out.setdefault(domain, vh.name)
    return out


def build_api_listener(name: str, service: str) -> listener_pb2.Listener:
    """The listener a proxyless gRPC client of `service` asks for as `name`: RDS over ADS
    for the service's own route configuration, and the router, the only HTTP filter gRPC
    needs (Envoy's listener filters are Envoy's: gRPC would reject the Lua filter)."""
    hcm = hcm_pb2.HttpConnectionManager(
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=proxyless_route_name(service)),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())
            )
        ],
    )
    listener = listener_pb2.Listener(name=name)
    listener.api_listener.api_listener.CopyFrom(pack(hcm))
    return listener


def proxyless_route_config(
    vhost: route_components_pb2.VirtualHost,
) -> route_pb2.RouteConfiguration:
    """A service's route configuration for proxyless clients: its virtual host (same
    routes, same weights: the split Envoys of the region apply), matching any authority.

    What gRPC does not implement it ignores: mirror policies, the sticky hash header
    (gRPC clients get the plain weighted split), the Lua filter's per-route config,
    which is marked optional (`FilterConfig.is_optional`) for this reason, and header
    manipulation: a consistent member's weighted clusters set ARM_HEADER for Envoy only
    (gRPC's pick is not told to the server). Its arm routes, header matches, gRPC
    honours: a client that forwards the arm it was called with keeps the request on it."""
    mine = route_components_pb2.VirtualHost()
    mine.CopyFrom(vhost)
    del mine.domains[:]
    mine.domains.append("*")
    return route_pb2.RouteConfiguration(name=proxyless_route_name(vhost.name), virtual_hosts=[mine])

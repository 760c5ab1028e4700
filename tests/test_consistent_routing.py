"""Version-consistent routing (issue 31): a member of a `consistent` rollout group routes a
request carrying `x-xds-arm` to that arm, and tells the upstream the arm it was sent to.

The builder's routes for every split, a hypothesis property over specs and splits, a real
Envoy 1.40 routing with them (upstreams that answer with the arm they were told), and
the Istio rendering validated against Istio's CRD schemas."""

from __future__ import annotations

import copy
import http.client
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.istio_schema import problems as schema_problems
from tests.support import wait_for
from tests.test_builder_properties import specs as random_specs
from tests.test_proxyless import bootstrap
from xds_server.lab.background import BackgroundServer
from xds_server.lab.procs import Envoy
from xds_server.render import istio
from xds_server.rollout import decide as sm
from xds_server.rollout.state import PROGRESSING, RegionState, RolloutState
from xds_server.spec import ARM_HEADER, MeshSpec, RolloutGroup, validate_spec
from xds_server.spec.rollout import CANARY_MATCH_HEADER
from xds_server.traffic import WEIGHT_TOTAL, Split, TrafficState
from xds_server.xds.publisher import XdsPublisher
from xds_server.xds.resources import (
    STICKY_HEADER,
    RegionBuilder,
    build_region,
    cluster_name,
    direct_cluster_name,
    proxyless_route_config,
)
from xds_server.xds.types import CLUSTER, ROUTE

from .conftest import EnvoyFactory

REGION = "us-east"
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def mesh(
    ports: dict[tuple[str, str], int] | None = None,
    *,
    consistent: bool = True,
    baseline: bool = True,
    rollout: dict[str, Any] | None = None,
    protocol: str = "http",
    outsider: bool = True,
) -> MeshSpec:
    """`features` and `recommender` in group `ranking` (`features` without a baseline
    when `baseline` is False), and `search`, outside any group. Built directly: the
    spec's `rollout_groups:` section is parsed by another part of issue 31."""
    ports = ports or {}
    port = iter(range(9100, 9200))

    def service(name: str, pools: tuple[str, ...]) -> dict[str, Any]:
        return {
            "name": name,
            "domains": [name],
            "prefix": "/",
            "protocol": protocol,
            "rollout": rollout or {},
            "pools": {
                p: {
                    "version": "v2" if p == "canary" else "v1",
                    "endpoints": {REGION: [f"127.0.0.1:{ports.get((name, p)) or next(port)}"]},
                }
                for p in pools
            },
        }

    three = ("production", "baseline", "canary")
    services = [
        service("features", three if baseline else ("production", "canary")),
        service("recommender", three),
    ]
    if outsider:
        services.append(service("search", three))
    spec = validate_spec({"regions": [REGION], "services": services}, "test")
    group = RolloutGroup("ranking", ("features", "recommender"), consistent=consistent)
    return replace(spec, rollout_groups=(group,))


def at(
    percent: float, services: tuple[str, ...] = ("features", "recommender", "search")
) -> TrafficState:
    """Every service of `services` at the rollout's split for `percent` (with a baseline
    share where it has a baseline pool)."""
    state = TrafficState()
    for name in services:
        state = state.with_split(name, [REGION], Split.at_canary_percent(percent, True))
    return state


def vhosts(spec: MeshSpec, traffic: TrafficState) -> dict[str, route_components_pb2.VirtualHost]:
    (rc,) = build_region(spec, traffic, REGION).by_type[ROUTE].values()
    assert isinstance(rc, route_pb2.RouteConfiguration)
    return {vh.name: vh for vh in rc.virtual_hosts}


def arm_of(route: route_components_pb2.Route) -> str | None:
    """The arm a route matches on (None: it matches no arm)."""
    for h in route.match.headers:
        if h.name == ARM_HEADER:
            return str(h.string_match.exact)
    return None


def marks(options: Any) -> dict[str, str]:
    """Headers a route (or weighted cluster) sets, all of them overwriting."""
    assert all(o.append_action == OVERWRITE for o in options)
    return {o.header.key: o.header.value for o in options}


# ---- the builder ----


def test_arm_routes_come_before_the_weighted_route_that_sets_each_pools_arm() -> None:
    vh = vhosts(mesh(), at(20))["recommender"]
    *arms, split = vh.routes
    assert [(arm_of(r), r.route.cluster) for r in arms] == [
        ("canary", cluster_name("recommender", "canary")),
        ("baseline", cluster_name("recommender", "baseline")),
        ("production", cluster_name("recommender", "production")),
    ]
    for r in arms:
        assert r.match.prefix == "/" and len(r.match.headers) == 1
        assert r.route.retry_policy.num_retries.value == 2  # as the weighted route's
        # The arm passes on as it came; a caller's canary_match mark does not.
        assert not r.request_headers_to_add
        assert list(r.request_headers_to_remove) == [CANARY_MATCH_HEADER]
    assert arm_of(split) is None
    weighted = split.route.weighted_clusters.clusters
    assert [(c.name, c.weight.value) for c in weighted] == [
        (cluster_name("recommender", "production"), 6000),
        (cluster_name("recommender", "baseline"), 2000),
        (cluster_name("recommender", "canary"), 2000),
    ]
    for c in weighted:
        assert marks(c.request_headers_to_add) == {ARM_HEADER: c.name.split("|")[1]}


def test_the_baseline_arm_falls_back_to_production_without_a_baseline_pool() -> None:
    vh = vhosts(mesh(baseline=False), at(20))["features"]
    routes = {arm_of(r): r.route.cluster for r in vh.routes[:-1]}
    assert routes == {
        "canary": "features|canary",
        "baseline": "features|production",
        "production": "features|production",
    }
    weighted = vh.routes[-1].route.weighted_clusters.clusters
    assert [marks(c.request_headers_to_add)[ARM_HEADER] for c in weighted] == [
        "production",
        "canary",
    ]


def test_each_mirrored_copy_carries_its_own_pools_arm() -> None:
    traffic = TrafficState().with_split("recommender", [REGION], Split(shadow=500))
    for spec, consistent in ((mesh(), True), (mesh(consistent=False), False)):
        (route,) = vhosts(spec, traffic)["recommender"].routes
        mirrors = route.route.request_mirror_policies
        assert [m.cluster for m in mirrors] == ["recommender|canary", "recommender|baseline"]
        for m in mirrors:
            want = {ARM_HEADER: m.cluster.split("|")[1]} if consistent else {}
            assert marks([h.append for h in m.request_headers_mutations]) == want


@pytest.mark.parametrize("split", [Split(), Split(shadow=500)], ids=["0%", "shadow"])
def test_without_canary_weight_no_arm_routes_and_every_request_is_production(
    split: Split,
) -> None:
    traffic = TrafficState().with_split("recommender", [REGION], split)
    (route,) = vhosts(mesh(), traffic)["recommender"].routes
    (only,) = route.route.weighted_clusters.clusters
    assert only.name == cluster_name("recommender", "production")
    assert marks(only.request_headers_to_add) == {ARM_HEADER: "production"}


def test_at_100_percent_the_arms_still_route_to_their_pools() -> None:
    """A request marked by a member still at its previous step goes to its own arm."""
    vh = vhosts(mesh(), at(100))["recommender"]
    assert [(arm_of(r), r.route.cluster.split("|")[1]) for r in vh.routes[:-1]] == [
        ("canary", "canary"),
        ("baseline", "baseline"),
        ("production", "production"),
    ]
    (canary,) = vh.routes[-1].route.weighted_clusters.clusters
    assert marks(canary.request_headers_to_add) == {ARM_HEADER: "canary"}


def test_arm_routes_first_then_canary_match_routes_which_set_the_canary_arm() -> None:
    """The arm a request carries wins over this member's canary_match rules: a request
    an earlier member sent to production stays on production here even if it matches."""
    rules = {"canary_match": [{"header": "x-canary", "value": "always"}]}
    vh = vhosts(mesh(rollout=rules), at(5))["recommender"]
    order = [(r.name, arm_of(r)) for r in vh.routes]
    assert order == [
        ("recommender-arm-canary", "canary"),
        ("recommender-arm-baseline", "baseline"),
        ("recommender-arm-production", "production"),
        ("recommender-canary-match-0", None),
        ("recommender-split", None),
    ]
    match = vh.routes[3]
    assert match.route.cluster == direct_cluster_name("recommender")
    assert marks(match.request_headers_to_add) == {
        CANARY_MATCH_HEADER: "true",
        ARM_HEADER: "canary",
    }
    # Outside a consistent group the canary_match route sets no arm.
    assert marks(vhosts(mesh(rollout=rules), at(5))["search"].routes[0].request_headers_to_add) == {
        CANARY_MATCH_HEADER: "true"
    }


def test_sticky_members_keep_the_hash_on_the_weighted_route_only() -> None:
    vh = vhosts(mesh(rollout={"sticky": {"header": "x-user-id"}}), at(20))["recommender"]
    *arms, split = vh.routes
    assert split.route.weighted_clusters.header_name == STICKY_HEADER
    assert split.typed_per_filter_config  # the Lua hash
    for r in arms:  # the arm decides: no hash, and a caller's hash header is dropped
        assert not r.typed_per_filter_config
        assert list(r.request_headers_to_remove) == [CANARY_MATCH_HEADER, STICKY_HEADER]


def test_grpc_members_route_by_the_arm_the_same_way() -> None:
    """gRPC metadata is HTTP/2 headers: the same matches and marks serve a gRPC service."""
    http, grpc = (vhosts(mesh(protocol=p), at(20)) for p in ("http", "grpc"))
    assert grpc["recommender"] == http["recommender"]
    built = build_region(mesh(protocol="grpc"), at(20), REGION)
    assert built.by_type[CLUSTER]["recommender|canary"].typed_extension_protocol_options  # type: ignore[attr-defined]


def test_services_outside_consistent_groups_are_built_byte_for_byte_as_before() -> None:
    plain = replace(mesh(), rollout_groups=())
    shadow = TrafficState({(s, REGION): Split(shadow=500) for s in ("features", "search")})
    for traffic in (at(0), at(20), at(100), shadow):
        before = vhosts(plain, traffic)
        for spec in (mesh(), mesh(consistent=False)):
            after = vhosts(spec, traffic)
            assert after["search"].SerializeToString() == before["search"].SerializeToString()
        unmarked = vhosts(mesh(consistent=False), traffic)
        for name in ("features", "recommender"):  # a group without `consistent`
            assert unmarked[name].SerializeToString() == before[name].SerializeToString()


def test_proxyless_route_configs_carry_the_arm_routes() -> None:
    """gRPC matches headers (gRFC A28) and ignores header manipulation, which it does not
    implement: a proxyless client forwarding the arm it was called with keeps it."""
    vh = vhosts(mesh(protocol="grpc"), at(20))["recommender"]
    config = proxyless_route_config(vh)
    (mine,) = config.virtual_hosts
    assert list(mine.domains) == ["*"]
    assert list(mine.routes) == list(vh.routes)


def test_the_memoized_builder_follows_steps_and_group_changes() -> None:
    builder = RegionBuilder(REGION)
    spec = mesh()
    for traffic in (at(0), at(5), at(20), at(0)):
        assert builder.build(spec, traffic) == build_region(spec, traffic, REGION)
    for edited in (mesh(consistent=False), mesh()):
        assert builder.build(edited, at(0)) == build_region(edited, at(0), REGION)


# ---- for every spec and split ----


@st.composite
def grouped(draw: st.DrawFn) -> tuple[MeshSpec, TrafficState]:
    """A random spec (test_builder_properties') with a random consistent group, and
    random splits."""
    spec = draw(random_specs())
    names = [s.name for s in spec.services]
    members = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    if members:
        group = RolloutGroup("g", tuple(members), consistent=draw(st.booleans()))
        spec = replace(spec, rollout_groups=(group,))
    traffic = TrafficState()
    for svc in spec.services:
        for region in spec.regions:
            c = draw(st.sampled_from([0, 0, 1, 500, 2000, 5000, WEIGHT_TOTAL]))
            b = draw(st.integers(0, WEIGHT_TOTAL - c))
            shadow = draw(st.sampled_from([0, 500]))
            traffic = traffic.with_split(
                svc.name, [region], Split(WEIGHT_TOTAL - b - c, b, c, shadow)
            )
    return spec, traffic


@given(grouped())
@settings(max_examples=150, deadline=None)
def test_every_route_uses_a_cluster_of_the_snapshot_and_arms_match_pools(
    case: tuple[MeshSpec, TrafficState],
) -> None:
    spec, traffic = case
    for region in spec.regions:
        built = build_region(spec, traffic, region)
        clusters = set(built.by_type[CLUSTER])
        assert built.route_targets() <= clusters  # make-before-break's premise
        (rc,) = built.by_type[ROUTE].values()
        for vh in rc.virtual_hosts:  # type: ignore[attr-defined]
            group = spec.group_of(vh.name)
            consistent = group is not None and group.consistent
            split = traffic.effective(spec.service(vh.name), region)
            *arms, weighted = vh.routes
            # Every weighted cluster of a consistent member names its own pool as the arm;
            # nothing else sets one.
            for c in weighted.route.weighted_clusters.clusters:
                pool = c.name.split("|")[1]
                assert marks(c.request_headers_to_add) == ({ARM_HEADER: pool} if consistent else {})
            for m in weighted.route.request_mirror_policies:  # shadow copies: their own
                mine = {ARM_HEADER: m.cluster.split("|")[1]} if consistent else {}
                assert marks([h.append for h in m.request_headers_mutations]) == mine
            # Arm routes exist exactly while the canary has weight, each to its own pool
            # (baseline's to production's when there is none).
            pools = spec.service(vh.name).pools
            want = (
                [
                    (a, a if a in pools else "production")
                    for a in ("canary", "baseline", "production")
                ]
                if consistent and split.canary > 0
                else []
            )
            assert [(arm_of(r), r.route.cluster.split("|")[1]) for r in arms] == want
        memo = RegionBuilder(region)  # from no canary to these splits: rebuilt in part
        memo.build(spec, TrafficState())
        assert memo.build(spec, traffic) == built


# ---- a real Envoy ----


class ArmEcho(ThreadingHTTPServer):
    """An upstream of one pool that answers with its pool and the arm(s) it was told;
    `shadowed` keeps the arms of the requests Envoy mirrored to it (their answers are
    dropped)."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.shadowed: list[str | None] = []
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes
    server: ArmEcho

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        # Every value it got: a caller's header the route failed to overwrite would show.
        arm = ",".join(self.headers.get_all(ARM_HEADER) or []) or None
        if (self.headers.get("host") or "").endswith("-shadow"):
            self.server.shadowed.append(arm)
        body = json.dumps({"pool": self.server.pool, "arm": arm})
        data = body.encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def echoes() -> Iterator[dict[str, ArmEcho]]:
    servers = {p: ArmEcho(p) for p in ("production", "baseline", "canary")}
    yield servers
    for s in servers.values():
        s.shutdown()
        s.server_close()


class Through:
    """GETs to one service through one Envoy, on one keep-alive connection: (the pool
    that answered, the arm it was told)."""

    def __init__(self, envoy: Envoy, service: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", envoy.listen_port, timeout=5)  # type: ignore[attr-defined]
        self.service = service

    def get(self, arm: str | None = None) -> tuple[str, str | None]:
        headers = {"host": self.service, **({ARM_HEADER: arm} if arm is not None else {})}
        self.conn.request("GET", "/predict", headers=headers)
        resp = self.conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200, body
        return body["pool"], body["arm"]

    def many(self, n: int, arm: str | None = None) -> Counter[tuple[str, str | None]]:
        return Counter(self.get(arm) for _ in range(n))


def test_a_real_envoy_routes_by_the_arm_and_tells_each_pool_its_arm(
    tmp_path: Path, echoes: dict[str, ArmEcho]
) -> None:
    ports = {(s, p): e.server_port for s in ("features", "recommender") for p, e in echoes.items()}
    spec = mesh(ports, outsider=False)
    server = BackgroundServer(spec, publisher=XdsPublisher)
    envoys = EnvoyFactory(tmp_path / "envoy")
    try:
        server.start()
        envoy = envoys.start(REGION, server.port)
        envoy.wait_ready()
        rec = Through(envoy, "recommender")

        def step(percent: float, shadow: int = 0) -> None:
            split = replace(Split.at_canary_percent(percent, has_baseline=True), shadow=shadow)
            server.call(lambda: server.server.set_split("recommender", split, urgent=True))
            want = server.route_version(REGION)
            wait_for(
                lambda: envoy.applied_versions().get("route") == want,
                f"the Envoy to apply route version {want}",
                timeout=10,
            )

        step(20)  # 60/20/20
        for arm in ("canary", "baseline", "production"):
            assert rec.many(100, arm) == Counter({(arm, arm): 100})
        # Without the header (or with a value that is no arm): split by weight, and every
        # upstream is told its own pool, whatever the caller claimed.
        plain = rec.many(300) + rec.many(100, "canary2")
        assert all(pool == arm for pool, arm in plain), plain
        pools: Counter[str] = Counter()
        for (pool, _), n in plain.items():
            pools[pool] += n
        # Binomial(400, 0.2): mean 80, sd 8; 40..120 is 5 sd either side.
        assert set(pools) == {"production", "baseline", "canary"}, pools
        assert 40 <= pools["canary"] <= 120 and 40 <= pools["baseline"] <= 120, pools
        # Without canary weight: no arm routes; everything production, and told so.
        step(0)
        assert rec.many(50, "canary") == Counter({("production", "production"): 50})
        # Shadow traffic (warm-up): each pool's copy carries its own arm.
        step(0, shadow=WEIGHT_TOTAL)
        assert rec.many(20, "canary") == Counter({("production", "production"): 20})
        copies = {p: echoes[p].shadowed for p in ("canary", "baseline")}
        wait_for(
            lambda: all(len(arms) == 20 for arms in copies.values()),
            "20 requests mirrored to canary and to baseline",
            timeout=5,
        )
        assert copies == {p: [p] * 20 for p in copies}
        assert not echoes["production"].shadowed
        rec.conn.close()
    finally:
        envoys.stop_all()
        server.close()


# ---- Istio ----


def rollouts_at(spec: MeshSpec, step: int | None) -> dict[str, RolloutState]:
    """Every service's rollout in REGION at `step` (None: no rollouts)."""
    if step is None:
        return {}
    out = {}
    for svc in spec.services:
        state = sm.start(svc.rollout, svc.name, "v2", spec.regions, 1000.0).state
        out[svc.name] = replace(state, regions={REGION: RegionState(PROGRESSING, step)})
    return out


def virtual_services(spec: MeshSpec, rollouts: dict[str, RolloutState]) -> dict[str, Any]:
    objects = istio.region_objects(spec, REGION, rollouts)
    for obj in objects:
        assert schema_problems(obj) == [], obj["metadata"]["name"]
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "VirtualService"}


@pytest.mark.parametrize("step", [None, 0, 1, 2, 3])
def test_istio_arm_routes_and_marks_valid_against_istios_schemas(step: int | None) -> None:
    rules = {"canary_match": [{"header": "x-canary", "value": "always"}]}
    spec = mesh(baseline=False, rollout=rules)
    rollouts = rollouts_at(spec, step)
    vs = virtual_services(spec, rollouts)
    plain = virtual_services(replace(spec, rollout_groups=()), rollouts)
    assert vs["search-us-east"] == plain["search-us-east"]  # outside the group: as before
    canary_weight = istio.route_weights(vs["recommender-us-east"])["canary"]
    assert (canary_weight > 0) == (step is not None)
    for name in ("features", "recommender"):
        http = vs[f"{name}-us-east"]["spec"]["http"]
        *arms, match, weighted = http
        assert match["name"] == "canary-match"
        assert match["headers"]["request"]["set"] == {
            CANARY_MATCH_HEADER: "true",
            ARM_HEADER: "canary",
        }
        subsets = {
            a["match"][0]["headers"][ARM_HEADER]["exact"]: a["route"][0]["destination"]["subset"]
            for a in arms
        }
        want = {"canary": "canary", "baseline": "baseline", "production": "production"}
        if name == "features":  # no baseline pool
            want["baseline"] = "production"
        assert subsets == (want if canary_weight else {})
        assert [a["name"] for a in arms] == [f"arm-{a}" for a in want if canary_weight]
        for d in weighted["route"]:
            assert d["headers"] == {"request": {"set": {ARM_HEADER: d["destination"]["subset"]}}}
        # The weighted route is what it was, but for the marks.
        bare = copy.deepcopy(weighted)
        for d in bare["route"]:
            del d["headers"]
        assert bare == plain[f"{name}-us-east"]["spec"]["http"][-1]


# ---- a proxyless gRPC client ----

PROXYLESS_SCRIPT = """
import collections, json, sys
import grpc

call = grpc.insecure_channel(sys.argv[1]).unary_unary(sys.argv[2])


def one(metadata):
    try:
        return call(b"", timeout=10, metadata=metadata, wait_for_ready=True).decode()
    except grpc.RpcError as exc:
        return "error " + exc.code().name


out = {}
for arm in ("canary", "baseline", "production", ""):
    metadata = [("x-xds-arm", arm)] if arm else []
    out[arm or "none"] = collections.Counter(one(metadata) for _ in range(int(sys.argv[3])))
print(json.dumps(out))
"""


def _grpc_echo(pool: str) -> tuple[grpc.Server, int]:
    """A gRPC server answering `POOL ARM`: its pool and the arm its caller sent ("-")."""

    def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
        arms = [str(v) for k, v in context.invocation_metadata() if k == ARM_HEADER]
        return f"{pool} {','.join(arms) or '-'}".encode()

    handler = grpc.method_handlers_generic_handler(
        "test.Arm", {"Get": grpc.unary_unary_rpc_method_handler(answer)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_a_proxyless_grpc_client_honours_the_arm_but_cannot_tell_it(tmp_path: Path) -> None:
    """grpcio's xDS client takes a consistent member's routes (no NACK): metadata
    `x-xds-arm: canary` reaches the canary; its weighted pick sets no header (gRPC does
    no header rewriting), so the server it picked is not told its arm."""
    made = {p: _grpc_echo(p) for p in ("production", "baseline", "canary")}
    ports = {(s, p): port for s in ("features", "recommender") for p, (_, port) in made.items()}
    server = BackgroundServer(mesh(ports, outsider=False, protocol="grpc"))
    try:
        server.start()
        split = Split.at_canary_percent(20, has_baseline=True)
        server.call(lambda: server.server.set_split("recommender", split, urgent=True))
        boot_args = ("--xds-address", f"127.0.0.1:{server.port}")
        boot = bootstrap("--proxyless", "--region", REGION, "--node-id", "grpc-1", *boot_args)
        assert boot.returncode == 0, boot.stderr
        (tmp_path / "bootstrap.json").write_text(boot.stdout)
        (tmp_path / "client.py").write_text(PROXYLESS_SCRIPT)
        argv = [sys.executable, str(tmp_path / "client.py"), "xds:///recommender"]
        run = subprocess.run(
            [*argv, "/test.Arm/Get", "100"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(tmp_path / "bootstrap.json")},
        )
        assert run.returncode == 0, run.stderr[-2000:]
        got = json.loads(run.stdout)
        for arm in ("canary", "baseline", "production"):
            assert got[arm] == {f"{arm} {arm}": 100}, got  # the caller's metadata, forwarded
        assert set(got["none"]) == {"production -", "baseline -", "canary -"}, got
    finally:
        server.close()
        for s, _ in made.values():
            s.stop(0)

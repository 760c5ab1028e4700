"""`canary_match` routes and sticky users: the builder's routes, a real Envoy 1.40 routing
with them (one region, over loopback), and their Istio rendering."""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.istio_schema import problems as schema_problems
from tests.support import wait_for
from xds_server.lab.background import BackgroundServer
from xds_server.lab.procs import Envoy
from xds_server.lab.upstream import ModelServer
from xds_server.render import istio
from xds_server.spec import MeshSpec, parse_spec, validate_spec
from xds_server.spec.rollout import CANARY_MATCH_HEADER
from xds_server.traffic import WEIGHT_TOTAL, Split, TrafficState
from xds_server.xds.publisher import XdsPublisher
from xds_server.xds.resources import (
    LUA_FILTER,
    STICKY_HEADER,
    build_region,
    cluster_name,
    direct_cluster_name,
    sticky_hash,
)
from xds_server.xds.types import CLUSTER, ENDPOINT, ROUTE

from .conftest import EnvoyFactory, make_spec_doc

REGION = "us-east"
SERVICE = "recommender"
MATCH_RULES = [{"header": "x-canary", "value": "always"}, {"cookie": "canary", "value": "1"}]
RANK = {"production": 0, "baseline": 1, "canary": 2}


# ---- a server, one Envoy, and keep-alive clients ----


@dataclass
class Lab:
    server: BackgroundServer
    envoy: Envoy

    @property
    def region_snapshot(self) -> Any:
        return self.server.call(lambda: self.server.server.snapshot(REGION))

    def set_split(self, split: Split) -> None:
        self.server.call(lambda: self.server.server.set_split(SERVICE, split, urgent=True))
        self.wait_applied()

    def apply(self, spec: MeshSpec) -> None:
        def push() -> None:
            self.server.server.apply_spec(spec, "test")
            self.server.server.flush()

        self.server.call(push)

    def wait_applied(self) -> None:
        want = self.server.route_version(REGION, self.envoy.opts.delta)
        wait_for(
            lambda: self.envoy.applied_versions().get("route") == want,
            f"the Envoy to apply route version {want}",
            timeout=10,
        )

    def upstream_rq(self) -> dict[str, int]:
        """cluster -> upstream_rq_total, from the Envoy's admin /stats."""
        regex = quote(r"^cluster\..*\.upstream_rq_total$")
        text = self.envoy.admin_get(f"/stats?filter={regex}")
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            out[name.removeprefix("cluster.").removesuffix(".upstream_rq_total")] = int(value)
        return out


def mesh_doc(
    upstreams: dict[tuple[str, str], ModelServer], pools: tuple[str, ...], rollout: dict[str, Any]
) -> dict[str, Any]:
    doc = make_spec_doc({k: s.port for k, s in upstreams.items()}, pools, (REGION,))
    doc["services"][0]["rollout"] = rollout
    return doc


@contextmanager
def lab(tmp_path: Path, doc: dict[str, Any], delta: bool = False) -> Iterator[Lab]:
    server = BackgroundServer(validate_spec(doc, "test"), publisher=XdsPublisher)
    envoys = EnvoyFactory(tmp_path / "envoy", delta=delta)
    try:
        server.start()
        envoy = envoys.start(REGION, server.port)
        envoy.wait_ready()
        yield Lab(server, envoy)
    finally:
        envoys.stop_all()
        server.close()


class Clients:
    """GETs through one Envoy from a few threads, each on its own keep-alive connection;
    the answer is the pool that served it (the model server's `x-pool` header)."""

    def __init__(self, port: int, threads: int = 8) -> None:
        self.port = port
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads)

    def _conn(self, fresh: bool = False) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def pool_of(self, headers: dict[str, str]) -> str:
        for attempt in range(2):  # a keep-alive connection the other side closed: once more
            conn = self._conn(fresh=attempt > 0)
            try:
                conn.request("GET", "/predict", headers=headers)
                resp = conn.getresponse()
                resp.read()
                return resp.getheader("x-pool") or f"HTTP {resp.status}"
            except (http.client.HTTPException, ConnectionError):
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def pools(self, header_sets: Sequence[dict[str, str]]) -> list[str]:
        return list(self._pool.map(self.pool_of, header_sets, timeout=60))

    def close(self) -> None:
        self._pool.shutdown()
        for conn in self._conns:
            conn.close()


@pytest.fixture
def clients() -> Iterator[list[Clients]]:
    made: list[Clients] = []
    yield made
    for c in made:
        c.close()


def clients_for(made: list[Clients], envoy: Envoy) -> Clients:
    made.append(Clients(envoy.listen_port))  # type: ignore[attr-defined]
    return made[-1]


# ---- canary_match through a real Envoy ----


@pytest.mark.parametrize("xds", ["sotw", "delta"])
def test_canary_match_requests_reach_the_canary_counted_apart(
    tmp_path: Path,
    upstreams: dict[tuple[str, str], ModelServer],
    clients: list[Clients],
    xds: str,
) -> None:
    doc = mesh_doc(upstreams, ("production", "canary"), {"canary_match": MATCH_RULES})
    with lab(tmp_path, doc, delta=xds == "delta") as the:
        c = clients_for(clients, the.envoy)
        the.set_split(Split.from_percent({"canary": 5}))
        by_header = c.pools([{"x-canary": "always"}] * 200)
        cookies = ["canary=1", "a=b; canary=1", "canary=1; z=9", "a=b;canary=1;z=9"]
        by_cookie = c.pools([{"cookie": cookies[i % 4]} for i in range(200)])
        assert Counter(by_header) == Counter({"canary": 200})
        assert Counter(by_cookie) == Counter({"canary": 200})
        # Near misses match nothing: they take the split, 5% canary (Binomial(200, 0.05):
        # mean 10, sd 3.1; 30 is over 6 sd away).
        misses = [
            {},
            {"x-canary": "always2"},
            {"cookie": "canary=12"},
            {"cookie": "xcanary=1; canary=0"},
        ]
        by_split = Counter(c.pools([misses[i % 4] for i in range(200)]))
        assert set(by_split) <= {"production", "canary"} and by_split["canary"] <= 30, by_split
        # Matched requests are on the direct cluster only; the analysed canary cluster
        # counts exactly the split's canary requests.
        want = {
            direct_cluster_name(SERVICE): 400,
            cluster_name(SERVICE, "canary"): by_split["canary"],
        }
        wait_for(
            lambda: {k: the.upstream_rq().get(k, 0) for k in want} == want,
            f"Envoy's upstream_rq_total to be {want} (last: {the.upstream_rq()})",
            timeout=5,
        )
        # At 0% too: the match routes do not depend on the step.
        the.set_split(Split())
        assert Counter(c.pools([{"x-canary": "always"}, {"cookie": "canary=1"}] * 10)) == Counter(
            {"canary": 20}
        )
        assert Counter(c.pools([{}] * 20)) == Counter({"production": 20})


def test_the_direct_cluster_is_kept_until_envoy_has_routes_without_it(
    tmp_path: Path, upstreams: dict[tuple[str, str], ModelServer], clients: list[Clients]
) -> None:
    doc = mesh_doc(upstreams, ("production", "canary"), {"canary_match": MATCH_RULES})
    direct = direct_cluster_name(SERVICE)
    with lab(tmp_path, doc) as the:
        snap = the.region_snapshot
        assert direct in snap.route_targets
        assert direct in snap.resources.by_type[CLUSTER]
        doc["services"][0]["rollout"] = {}
        the.apply(validate_spec(doc, "no canary_match"))
        # Pushed in the same loop turn as the spec: no Envoy can have ACKed it yet.
        snap = the.region_snapshot
        assert direct not in snap.route_targets
        assert direct in snap.retained and direct in snap.resources.by_type[ENDPOINT]
        wait_for(
            lambda: direct not in the.region_snapshot.resources.by_type[CLUSTER],
            "the direct cluster to go once the Envoy has routes without it",
            timeout=10,
        )
        the.wait_applied()
        c = clients_for(clients, the.envoy)
        assert Counter(c.pools([{"x-canary": "always"}] * 20)) == Counter({"production": 20})


# ---- sticky users through a real Envoy ----


def expected_pool(user: str, split: Split) -> str:
    """Envoy's choice: hash % total in [0, production) [.., + baseline) [.., total)."""
    v = sticky_hash(user) % WEIGHT_TOTAL
    if v < split.production:
        return "production"
    return "baseline" if v < split.production + split.baseline else "canary"


def test_sticky_users_stay_within_a_step_and_only_move_towards_the_canary(
    tmp_path: Path, upstreams: dict[tuple[str, str], ModelServer], clients: list[Clients]
) -> None:
    doc = mesh_doc(
        upstreams, ("production", "baseline", "canary"), {"sticky": {"header": "x-user-id"}}
    )
    users = [f"user-{i}" for i in range(1000)]
    with lab(tmp_path, doc) as the:
        c = clients_for(clients, the.envoy)
        history: dict[str, list[str]] = {u: [] for u in users}
        for percent in (5, 20, 50):
            split = Split.at_canary_percent(percent, has_baseline=True)
            the.set_split(split)
            got = c.pools([{"x-user-id": u} for u in users] * 2)
            first, second = got[: len(users)], got[len(users) :]
            assert first == second, f"a user changed version within the {percent}% step"
            # The Lua hash is the builder's: Envoy picks what sticky_hash predicts.
            assert first == [expected_pool(u, split) for u in users], percent
            for u, pool in zip(users, first, strict=True):
                history[u].append(pool)
            share = Counter(first)["canary"] / len(users)
            assert abs(share - percent / 100) < 0.05, (percent, share)
        for u, pools in history.items():
            ranks = [RANK[p] for p in pools]
            assert ranks == sorted(ranks), (u, pools)  # never back towards production
        # No user, or a user's own x-xds-sticky: no stable choice (Envoy's random one).
        # 50%: 0/50/50; 40 requests all on one side is a 2^-39 event.
        assert set(c.pools([{}] * 40)) == {"baseline", "canary"}
        assert set(c.pools([{STICKY_HEADER: "9999"}] * 40)) == {"baseline", "canary"}


def test_sticky_cookie_users(
    tmp_path: Path, upstreams: dict[tuple[str, str], ModelServer], clients: list[Clients]
) -> None:
    doc = mesh_doc(upstreams, ("production", "canary"), {"sticky": {"cookie": "user"}})
    users = [f"u{i}@example.com" for i in range(300)]
    with lab(tmp_path, doc) as the:
        c = clients_for(clients, the.envoy)
        split = Split.from_percent({"canary": 30})
        the.set_split(split)
        got = c.pools([{"cookie": f"a=1; user={u}; theme=dark"} for u in users])
        assert got == [expected_pool(u, split) for u in users]
        assert c.pools([{"cookie": f"user={u}"} for u in users]) == got


# ---- the builder, for every split ----


def sticky_spec(pools: Sequence[str], sticky: dict[str, str], match: bool) -> MeshSpec:
    rollout: dict[str, Any] = {"sticky": sticky}
    if match:
        rollout["canary_match"] = MATCH_RULES
    return validate_spec(
        {
            "regions": [REGION],
            "services": [
                {
                    "name": SERVICE,
                    "domains": ["*"],
                    "pools": {
                        p: {"version": "v1", "endpoints": {REGION: [f"127.0.0.1:{9000 + i}"]}}
                        for i, p in enumerate(pools)
                    },
                    "rollout": rollout,
                }
            ],
        },
        "property",
    )


def split_routes(spec: MeshSpec, traffic: TrafficState) -> list[route_components_pb2.Route]:
    (rc,) = build_region(spec, traffic, REGION).by_type[ROUTE].values()
    assert isinstance(rc, route_pb2.RouteConfiguration)
    (vh,) = rc.virtual_hosts
    return list(vh.routes)


def sticky_weights(spec: MeshSpec, split: Split, matches: int) -> list[tuple[str, int]]:
    """The sticky route's (pool, weight) list, after checking what every split shares:
    the match routes first, the header Envoy hashes on, the Lua code, the sum."""
    *match_routes, route = split_routes(spec, TrafficState().with_split(SERVICE, [REGION], split))
    assert [m.route.cluster for m in match_routes] == [direct_cluster_name(SERVICE)] * matches
    wc = route.route.weighted_clusters
    assert wc.header_name == STICKY_HEADER
    assert sum(x.weight.value for x in wc.clusters) == WEIGHT_TOTAL
    lua = route_components_pb2.FilterConfig()
    assert route.typed_per_filter_config[LUA_FILTER].Unpack(lua)
    per_route = lua_pb2.LuaPerRoute()
    assert lua.config.Unpack(per_route) and STICKY_HEADER in per_route.source_code.inline_string
    return [(x.name.split("|")[1], x.weight.value) for x in wc.clusters]


@given(
    pools=st.sampled_from([("production", "canary"), ("production", "baseline", "canary")]),
    sticky=st.sampled_from([{"header": "x-user-id"}, {"cookie": "user"}]),
    match=st.booleans(),
    canary=st.integers(0, WEIGHT_TOTAL),
    more=st.integers(0, WEIGHT_TOTAL),
    by_hand=st.tuples(st.integers(0, WEIGHT_TOTAL), st.integers(0, WEIGHT_TOTAL)),
)
@settings(max_examples=200, deadline=None)
def test_sticky_canary_is_last_and_its_interval_only_grows(
    pools: tuple[str, ...],
    sticky: dict[str, str],
    match: bool,
    canary: int,
    more: int,
    by_hand: tuple[int, int],
) -> None:
    spec = sticky_spec(pools, sticky, match)
    has_baseline = "baseline" in pools
    # Any split (an operator's too): production, baseline, canary, in this order.
    c = by_hand[0]
    b = min(by_hand[1], WEIGHT_TOTAL - c) if has_baseline else 0
    split = Split(WEIGHT_TOTAL - b - c, b, c)
    weights = sticky_weights(spec, split, 2 if match else 0)
    assert weights == [(p, split.get(p)) for p in pools if split.get(p) > 0]
    assert c == 0 or weights[-1] == ("canary", c)
    # The rollout's steps: the canary's interval [total - canary, total) only grows.
    starts = []
    for share in sorted((canary, min(WEIGHT_TOTAL, canary + more))):
        split = Split.at_canary_percent(share * 100 / WEIGHT_TOTAL, has_baseline)
        weights = sticky_weights(spec, split, 2 if match else 0)
        assert share == 0 or weights[-1] == ("canary", share)
        starts.append(WEIGHT_TOTAL - sum(w for p, w in weights if p == "canary"))
    assert starts[1] <= starts[0]


def test_without_sticky_or_rules_the_routes_are_as_before() -> None:
    spec = validate_spec(
        {
            "regions": [REGION],
            "services": [
                {
                    "name": SERVICE,
                    "domains": ["*"],
                    "pools": {
                        "production": {"version": "v1", "endpoints": {REGION: ["127.0.0.1:9000"]}}
                    },
                    "rollout": {"canary_match": MATCH_RULES},
                }
            ],
        },
        "no canary pool",
    )
    (route,) = split_routes(spec, TrafficState())
    assert not route.route.weighted_clusters.header_name
    assert not route.typed_per_filter_config
    # (Every split route strips the canary_match mark: no caller can set it.)
    assert list(route.request_headers_to_remove) == [CANARY_MATCH_HEADER]
    assert set(build_region(spec, TrafficState(), REGION).by_type[CLUSTER]) == {
        cluster_name(SERVICE, "production")
    }


def test_direct_cluster_is_the_canary_under_another_name() -> None:
    spec = sticky_spec(("production", "canary"), {"header": "x-user-id"}, match=True)
    built = build_region(spec, TrafficState(), REGION)
    direct, canary = direct_cluster_name(SERVICE), cluster_name(SERVICE, "canary")
    assert direct == "recommender|canary-direct"
    assert direct in built.route_targets() and canary not in built.route_targets()  # at 0%
    cluster = cluster_pb2.Cluster()
    cluster.CopyFrom(built.by_type[CLUSTER][canary])
    cluster.name = direct
    assert built.by_type[CLUSTER][direct] == cluster
    cla = endpoint_pb2.ClusterLoadAssignment()
    cla.CopyFrom(built.by_type[ENDPOINT][canary])
    cla.cluster_name = direct
    assert built.by_type[ENDPOINT][direct] == cla


# ---- Istio ----


def test_istio_renders_canary_match_before_the_weighted_route() -> None:
    eps = '{us-east: ["127.0.0.1:9100"]}'
    text = (
        "regions: [us-east]\nistio: {namespace: models}\nservices:\n"
        "  - name: recommender\n    prefix: /score\n    domains: [rec]\n    pools:\n"
        f"      production: {{version: v1, endpoints: {eps}}}\n"
        f"      canary: {{version: v2, endpoints: {eps}}}\n"
        "    rollout:\n"
        "      canary_match: [{header: X-Canary, value: always}, {cookie: canary, value: '1'}]\n"
        "      sticky: {header: x-user-id}\n"
    )
    spec = parse_spec(text, "mesh.yaml")
    objs = istio.region_objects(spec, REGION, {})
    assert [schema_problems(o) for o in objs] == [[], []]
    dr, vs = objs
    assert "trafficPolicy" not in dr["spec"]  # sticky: nothing Istio can express
    match, weighted = vs["spec"]["http"]
    assert weighted["name"] == "rollout" and istio.route_weights(vs) == {
        "production": 100,
        "canary": 0,
    }
    host = "recommender.models.svc.cluster.local"
    assert match == {
        "name": "canary-match",
        "match": [
            {"uri": {"prefix": "/score"}, "headers": {"x-canary": {"exact": "always"}}},
            {
                "uri": {"prefix": "/score"},
                "headers": {"cookie": {"regex": r"(.*;\s*)?canary=1(;.*)?"}},
            },
        ],
        "route": [{"destination": {"host": host, "subset": "canary"}, "weight": 100}],
        # Marked for the model servers' series (the analysis leaves them out), as over xDS.
        "headers": {"request": {"set": {CANARY_MATCH_HEADER: "true"}}},
    }
    assert weighted["headers"] == {"request": {"remove": [CANARY_MATCH_HEADER]}}

"""Rules of the snapshot builder that must hold for every spec and every split."""

from __future__ import annotations

from typing import Any

from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from xds_server.spec import POOL_NAMES, MeshSpec, validate_spec
from xds_server.traffic import WEIGHT_TOTAL, Split, TrafficState
from xds_server.xds.resources import RegionBuilder, build_region
from xds_server.xds.snapshot import Snapshot, with_nonce
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, SEND_ORDER

REGION_NAMES = ["r1", "r2", "r3"]


@st.composite
def specs(draw: st.DrawFn) -> MeshSpec:
    regions = draw(st.lists(st.sampled_from(REGION_NAMES), min_size=1, max_size=3, unique=True))
    n = draw(st.integers(1, 4))
    port = iter(range(20000, 30000))
    services = []
    for i in range(n):
        extra = draw(st.lists(st.sampled_from(["baseline", "canary"]), unique=True))
        services.append(
            {
                "name": f"svc-{i}",
                "domains": [f"svc-{i}.example"],
                "prefix": "/",
                "pools": {
                    p: {
                        "version": "v1",
                        "endpoints": {
                            r: [f"127.0.0.1:{next(port)}" for _ in range(draw(st.integers(1, 2)))]
                            for r in regions
                        },
                    }
                    for p in ["production", *extra]
                },
            }
        )
    warmup = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "health_check": st.sampled_from([True, {"path": "/ready", "interval": "2s"}]),
                "slow_start": st.sampled_from(["0s", "30s"]),
            },
        )
    )
    return validate_spec({"regions": regions, "services": services, "rollout": {"warmup": warmup}})


splits = st.tuples(
    st.integers(0, WEIGHT_TOTAL), st.integers(0, WEIGHT_TOTAL), st.sampled_from([0, 0, 500])
).map(
    lambda t: Split(
        WEIGHT_TOTAL - min(t[0], WEIGHT_TOTAL - t[1]) - t[1],
        min(t[0], WEIGHT_TOTAL - t[1]),
        t[1],
        t[2],
    )
)


@st.composite
def traffic_for(draw: st.DrawFn, spec: MeshSpec) -> TrafficState:
    state = TrafficState()
    for svc in spec.services:
        for region in spec.regions:
            if draw(st.booleans()):
                state = state.with_split(svc.name, [region], draw(splits))
    return state


def route_weights(snap: Snapshot) -> dict[str, dict[str, int]]:
    (rc,) = snap.resources.by_type[ROUTE].values()
    out = {}
    for vh in rc.virtual_hosts:  # type: ignore[attr-defined]
        out[vh.name] = {
            c.name: c.weight.value for c in vh.routes[0].route.weighted_clusters.clusters
        }
    return out


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_weights_sum_to_total_and_targets_exist(data: Any) -> None:
    spec = data.draw(specs())
    traffic = data.draw(traffic_for(spec))
    for region in spec.regions:
        snap = Snapshot.first(build_region(spec, traffic, region), ("127.0.0.1", 10000))
        clusters = set(snap.resources.by_type[CLUSTER])
        assert clusters == set(snap.resources.by_type[ENDPOINT])
        for svc_name, weights in route_weights(snap).items():
            assert sum(weights.values()) == WEIGHT_TOTAL
            assert all(w > 0 for w in weights.values())
            assert set(weights) <= clusters
            svc = spec.service(svc_name)
            assert all(name.split("|")[1] in svc.pools for name in weights)
        # Mirrored (shadow) clusters are route targets too: they exist before the route.
        assert snap.resources.route_targets() <= clusters
        (rc,) = snap.resources.by_type[ROUTE].values()
        for vh in rc.virtual_hosts:  # type: ignore[attr-defined]
            split = traffic.effective(spec.service(vh.name), region)
            mirrors = {m.cluster for m in vh.routes[0].route.request_mirror_policies}
            if split.shadow == 0:
                assert not mirrors
            else:
                pools = spec.service(vh.name).pools
                assert mirrors == {f"{vh.name}|{p}" for p in ("canary", "baseline") if p in pools}


@given(st.data())
@settings(max_examples=80, deadline=None)
def test_versions_only_grow_and_unchanged_types_keep_theirs(data: Any) -> None:
    spec = data.draw(specs())
    region = spec.regions[0]
    snap = Snapshot.first(build_region(spec, TrafficState(), region), ("127.0.0.1", 10000))
    for _ in range(data.draw(st.integers(1, 6))):
        if data.draw(st.booleans()):
            nxt_spec = data.draw(specs().filter(lambda s, r=region: r in s.regions))
        else:
            nxt_spec = spec
        traffic = data.draw(traffic_for(nxt_spec))
        nxt = snap.successor(build_region(nxt_spec, traffic, region), snap.listen)
        assert nxt.version > snap.version
        for t in SEND_ORDER:
            assert nxt.type_versions[t] >= snap.type_versions[t]
            if t != LISTENER:
                same = nxt.resources.by_type[t] == snap.resources.by_type[t]
                cluster_changed = nxt.type_versions[CLUSTER] != snap.type_versions[CLUSTER]
                if same and not (t == ENDPOINT and cluster_changed):
                    assert nxt.type_versions[t] == snap.type_versions[t]
                else:
                    assert nxt.type_versions[t] == nxt.version
        if nxt.type_versions[CLUSTER] == nxt.version:
            assert nxt.type_versions[ENDPOINT] == nxt.version
        snap, spec = nxt, nxt_spec


@given(st.dictionaries(st.sampled_from(["baseline", "canary"]), st.floats(0, 50, allow_nan=False)))
def test_percent_splits_sum_to_total(shares: dict[str, float]) -> None:
    split = Split.from_percent(shares)
    assert sum(split.as_dict().values()) == WEIGHT_TOTAL
    assert set(split.as_dict()) == set(POOL_NAMES)


@given(st.text(max_size=300), st.text(min_size=0, max_size=40))
def test_nonce_is_appended_to_encoded_responses(version: str, nonce: str) -> None:
    body = discovery_pb2.DiscoveryResponse(version_info=version, type_url=CLUSTER)
    out = discovery_pb2.DiscoveryResponse.FromString(with_nonce(body.SerializeToString(), nonce))
    assert (out.version_info, out.type_url, out.nonce) == (version, CLUSTER, nonce)


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_memoized_builder_builds_what_a_fresh_one_does(data: Any) -> None:
    spec = data.draw(specs())
    region = spec.regions[0]
    builder = RegionBuilder(region)
    for _ in range(data.draw(st.integers(1, 5))):
        if data.draw(st.booleans()):
            spec = data.draw(specs().filter(lambda s, r=region: r in s.regions))
        traffic = data.draw(traffic_for(spec))
        assert builder.build(spec, traffic).by_type == build_region(spec, traffic, region).by_type

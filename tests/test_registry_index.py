"""A replica's registry, kept up to date change by change (`RegistryIndex`), and load
assignments assembled from their hosts' encodings (`LoadAssignments`): each must serve
exactly what the spec and the registry say, as if built from scratch, whatever came
before (issue 28: 10,000 churning instances cost a replica what changed, not the fleet)."""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_registry import INSTANCE, SERVICE, mesh_and_instances, registry_key, unit_spec
from xds_server.ha.instances import Instance, RegistryIndex, Served, with_registered
from xds_server.spec import Endpoint, MeshSpec
from xds_server.traffic import TrafficState
from xds_server.xds.endpoints import LoadAssignments, build_load_assignment
from xds_server.xds.health_checks import HealthPorts


def reference(
    spec: MeshSpec,
    instances: Iterable[Instance],
    previous: MeshSpec | None,
    traffic: TrafficState,
) -> tuple[dict[tuple[str, str, str], list[Endpoint]], frozenset[tuple[str, str, str]]]:
    """The rule as `with_registered` applied it before the index (every instance sorted
    by registration, then grouped): each pool's hosts per region, and the held pools."""
    registered: dict[tuple[str, str, str], list[tuple[str, Endpoint]]] = {}
    for i in sorted(instances, key=lambda i: (i.revision, i.address)):
        registered.setdefault((i.region, i.service, i.version), []).append((i.pool, i.endpoint))
    hosts, held = {}, set()
    for svc in spec.services:
        for name, pool in svc.pools.items():
            for region in spec.regions:
                eps = list(pool.endpoints.get(region, ()))
                at = {(e.host, e.port) for e in eps}
                mine = registered.get((region, svc.name, pool.version), [])
                eps += [e for hint, e in mine if hint in ("", name) and (e.host, e.port) not in at]
                split = traffic.split(svc.name, region)
                weighted = getattr(split, name, 0) > 0 or (name != "production" and split.shadow)
                if not eps and weighted and previous is not None:
                    kept = previous.service(svc.name).pools[name].endpoints.get(region, ())
                    if kept:
                        eps, _ = list(kept), held.add((region, svc.name, name))
                hosts[(region, svc.name, name)] = eps
    return hosts, frozenset(held)


def pool_hosts(served: Served) -> dict[tuple[str, str, str], list[Endpoint]]:
    return {
        (region, svc.name, name): list(pool.endpoints.get(region, ()))
        for svc in served.spec.services
        for name, pool in svc.pools.items()
        for region in served.spec.regions
    }


@settings(max_examples=60, deadline=None)
@given(
    case=mesh_and_instances(),
    steps=st.lists(st.lists(INSTANCE, max_size=6, unique_by=registry_key), max_size=5),
    data=st.data(),
)
def test_an_index_updated_change_by_change_serves_what_the_registry_says(
    case: tuple[MeshSpec, list[Instance], MeshSpec, TrafficState],
    steps: list[list[Instance]],
    data: st.DataObject,
) -> None:
    spec, first, previous, traffic = case
    index = RegistryIndex()
    registry: dict[str, Instance] = {}
    for step in [first, *steps]:
        # Some keys stay (the very same objects, as in the store's view), some go, some
        # are put again (a new object), some are new.
        kept = (
            data.draw(st.lists(st.sampled_from(sorted(registry)), unique=True)) if registry else []
        )
        registry = {k: registry[k] for k in kept}
        registry.update({"/".join(registry_key(i)): i for i in step})
        index.update(registry)
        served = index.serve(spec, previous, traffic)
        hosts, held = reference(spec, registry.values(), previous, traffic)
        assert pool_hosts(served) == hosts
        assert served.held == held
        assert served.spec == with_registered(spec, registry.values(), previous, traffic).spec
        counts: dict[tuple[str, str, str], int] = {}
        for i in registry.values():
            key = (i.region, i.service, i.version)
            counts[key] = counts.get(key, 0) + 1
        assert index.counts() == counts
        previous = served.spec


def test_an_unchanged_pool_keeps_its_endpoint_tuple_and_its_load_assignment() -> None:
    """What makes a churning registry cheap: a pool whose hosts did not change is served
    with the same tuple, so the builder reuses its load assignment without a look."""
    spec, index = unit_spec(), RegistryIndex()
    a = Instance(SERVICE, "v2", "us-east", "10.7.0.1:80", 0, 10)
    b = Instance(SERVICE, "v9", "us-east", "10.7.0.2:80", 0, 10)
    index.update({"a": a})
    before = index.serve(spec).spec
    index.update({"a": a, "b": b})  # (v9: no pool selects it)
    after = index.serve(spec).spec
    old = before.service(SERVICE).pools["canary"].endpoints["us-east"]
    assert [str(e) for e in old] == ["10.7.0.1:80"]
    assert after.service(SERVICE).pools["canary"].endpoints["us-east"] is old
    assignments = LoadAssignments("us-east")
    message = assignments.get("c", old, None)
    assert assignments.get("c", old, None) is message
    assert assignments.get("c", tuple(old), None) is message


ENDPOINTS = [
    Endpoint(f"10.0.{i // 7}.{i % 7 + 1}", 80 + i % 3, (None, 9000)[i % 2]) for i in range(30)
]


@settings(max_examples=80, deadline=None)
@given(
    changes=st.lists(
        st.tuples(
            st.lists(st.sampled_from(ENDPOINTS), max_size=12, unique=True),
            st.sampled_from([None, HealthPorts(None), HealthPorts(8081)]),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_assembled_load_assignments_equal_the_ones_built_host_by_host(
    changes: list[tuple[list[Endpoint], HealthPorts | None]],
) -> None:
    assignments = LoadAssignments("us-east")
    for hosts, checked in changes:
        got = assignments.get("svc|canary", tuple(hosts), checked)
        want = build_load_assignment("svc|canary", "us-east", tuple(hosts), checked)
        assert got == want
        assert got.SerializeToString(deterministic=True) == want.SerializeToString(
            deterministic=True
        )
    assignments.keep_only([])
    assert assignments.get("svc|canary", (), None) == build_load_assignment(
        "svc|canary", "us-east", ()
    )

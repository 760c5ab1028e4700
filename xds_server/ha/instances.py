"""The shared registry's data, pure: instances, and the spec a replica serves with them.

A pool selects the registered instances of its service whose version is the pool's, in
each region (as an Istio subset selects pods by their version label). A pool that lists
no endpoints in the spec has only those; one that lists some has both.

One rule keeps an update from emptying a pool that takes traffic: a pool that had hosts
in a region and has none left while the weights give it traffic there keeps its last
hosts (`held`). Envoy would answer "no healthy upstream" for an empty cluster anyway; the
held pool also tells the rollout to hold there (`Registry.live_hosts`), and a hold that
lasts past `max_hold` fails the step.

A replica serves a registry of thousands of instances that changes many times a second
(a fleet starting, churning): `RegistryIndex` keeps the instances grouped by region,
service and version from one change to the next, so each update costs the instances
that changed, and a pool whose hosts did not change keeps the very same tuple (which the
snapshot builder then recognises without looking at its hosts).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from itertools import compress
from operator import is_not, itemgetter

from xds_server.spec import MeshSpec, parse_host_port
from xds_server.spec.model import Endpoint
from xds_server.traffic import TrafficState


@dataclass(frozen=True)
class Instance:
    service: str
    version: str
    region: str
    address: str
    """HOST:PORT, the host an IP address (Envoy does not resolve EDS endpoints)."""
    registered_at: float
    ttl: float
    lease: int = 0
    revision: int = 0
    """The key's create revision: when this registration began, in store order."""
    pool: str = ""
    """Only this pool selects it ("baseline": a fresh deploy of production's version);
    "": every pool of its version."""
    health_port: int | None = None
    """Where the warm-up's health check asks it, when not on its traffic port (a gRPC
    model server's REST port: `register --health-port`); an endpoint's `health_port`."""

    @cached_property
    def endpoint(self) -> Endpoint:
        """Parsed once: an instance is served at every update while its key lives."""
        host, port = parse_host_port(self.address, port_from=1)
        return Endpoint(host, port, self.health_port)


def instance_to_json(i: Instance) -> bytes:
    doc = {
        "service": i.service,
        "version": i.version,
        "region": i.region,
        "address": i.address,
        "registered_at": i.registered_at,
        "ttl": i.ttl,
        "pool": i.pool,
    }
    if i.health_port is not None:
        doc["health_port"] = i.health_port
    return json.dumps(doc).encode()


def instance_from_json(value: bytes, lease: int = 0, revision: int = 0) -> Instance:
    doc = json.loads(value)
    return Instance(
        doc["service"],
        doc["version"],
        doc["region"],
        doc["address"],
        float(doc["registered_at"]),
        float(doc["ttl"]),
        lease,
        revision,
        str(doc.get("pool", "")),
        int(doc["health_port"]) if doc.get("health_port") else None,
    )


PoolKey = tuple[str, str, str]
"""(region, service, pool)."""


@dataclass(frozen=True)
class Served:
    spec: MeshSpec
    """The stored spec with every pool's registered instances added."""
    held: frozenset[PoolKey]
    """Pools that lost every host while taking traffic: their last hosts are kept."""
    live: Mapping[PoolKey, int]
    """Hosts per pool and region that are really there (static or registered)."""


GroupKey = tuple[str, str, str]
"""(region, service, version): the instances a pool of that version selects there."""


@dataclass(frozen=True, eq=False)
class Group:
    """A group's instances in registration order (the key's create revision, then the
    address), as a pool takes them."""

    selected: tuple[tuple[str, Endpoint], ...]
    """(pool hint, endpoint) of each."""
    endpoints: tuple[Endpoint, ...]
    """Their endpoints: what a pool without static endpoints serves when no instance
    names a pool (`hinted` False), the same tuple for every such pool."""
    hinted: bool


EMPTY = Group((), (), False)

_Member = tuple[int, str, str, Endpoint]
"""(create revision, address, pool hint, endpoint): sorted, registration order."""
_REGISTRATION = itemgetter(0, 1)
_SELECTED = itemgetter(2, 3)
_ENDPOINT = itemgetter(3)
_HINT = itemgetter(2)

_PoolMemo = tuple[tuple[Endpoint, ...], Group, tuple[Endpoint, ...]]


class RegistryIndex:
    """The registry grouped by (region, service, version), updated change by change.

    `update` finds the keys that changed (an unchanged key is the very same `Instance`
    object in the store's view: compared by identity, at C speed) and sorts only the
    groups that changed; `serve` reuses each pool's endpoint tuple while its group and
    static endpoints are the same objects. Equal to `with_registered` from scratch
    (`tests/test_registry_index.py`)."""

    def __init__(self) -> None:
        self._seen: dict[str, Instance] = {}
        self._members: dict[GroupKey, dict[str, _Member]] = {}
        self.groups: dict[GroupKey, Group] = {}
        self._pools: dict[PoolKey, _PoolMemo] = {}
        """(region, service, pool) -> (its static endpoints, its group, what it served)."""

    def update(self, registry: Mapping[str, Instance]) -> frozenset[GroupKey]:
        """Take the registry as it is now (key -> instance); the groups that changed."""
        seen = self._seen
        touched: set[GroupKey] = set()
        changed = list(compress(registry, map(is_not, registry.values(), map(seen.get, registry))))
        gone = len(seen) + sum(1 for key in changed if key not in seen) - len(registry)
        if gone:
            for key in seen.keys() - registry.keys():
                self._leave(key, seen.pop(key), touched)
        for key in changed:
            old = seen.get(key)
            if old is not None:
                self._leave(key, old, touched)
            seen[key] = inst = registry[key]
            group = (inst.region, inst.service, inst.version)
            member = (inst.revision, inst.address, inst.pool, inst.endpoint)
            self._members.setdefault(group, {})[key] = member
            touched.add(group)
        for group in touched:
            members = self._members.get(group)
            if members:
                ordered = sorted(members.values(), key=_REGISTRATION)
                self.groups[group] = Group(
                    tuple(map(_SELECTED, ordered)),
                    tuple(map(_ENDPOINT, ordered)),
                    any(map(_HINT, ordered)),
                )
            else:
                self._members.pop(group, None)
                self.groups.pop(group, None)
        return frozenset(touched)

    def _leave(self, key: str, inst: Instance, touched: set[GroupKey]) -> None:
        group = (inst.region, inst.service, inst.version)
        self._members.get(group, {}).pop(key, None)
        touched.add(group)

    def counts(self) -> dict[GroupKey, int]:
        """Instances per (region, service, version)."""
        return {group: len(members) for group, members in self._members.items()}

    def serve(
        self,
        spec: MeshSpec,
        previous: MeshSpec | None = None,
        traffic: TrafficState | None = None,
    ) -> Served:
        """The spec to serve: each pool's static endpoints plus its registered instances;
        a pool emptied while `traffic` weights it keeps its hosts from `previous`."""
        held: set[PoolKey] = set()
        live: dict[PoolKey, int] = {}
        pools_seen: dict[PoolKey, _PoolMemo] = {}
        services = []
        for svc in spec.services:
            pools = {}
            for name, pool in svc.pools.items():
                endpoints = {}
                for region in spec.regions:
                    key = (region, svc.name, name)
                    static = pool.endpoints.get(region, ())
                    group = self.groups.get((region, svc.name, pool.version), EMPTY)
                    memo = self._pools.get(key)
                    if memo is not None and memo[0] is static and memo[1] is group:
                        eps = memo[2]
                    else:
                        eps = _pool_endpoints(static, group, name)
                    pools_seen[key] = (static, group, eps)
                    live[key] = len(eps)
                    if not eps and _weighted(traffic, svc.name, region, name):
                        kept = _hosts(previous, svc.name, name, region)
                        if kept:
                            eps = kept
                            held.add(key)
                    if eps:
                        endpoints[region] = eps
                pools[name] = replace(pool, endpoints=endpoints)
            services.append(replace(svc, pools=pools))
        self._pools = pools_seen  # (only the spec's pools: the memo stays its size)
        return Served(replace(spec, services=tuple(services)), frozenset(held), live)


def _pool_endpoints(static: tuple[Endpoint, ...], group: Group, pool: str) -> tuple[Endpoint, ...]:
    """A pool's hosts: its static endpoints, then the registered ones it selects; one host
    per address (a static endpoint wins over its registration)."""
    if group.hinted:
        mine: tuple[Endpoint, ...] = tuple(e for h, e in group.selected if h in ("", pool))
    else:
        mine = group.endpoints
    if not static:
        return mine
    at = {(e.host, e.port) for e in static}
    return static + tuple(e for e in mine if (e.host, e.port) not in at)


def with_registered(
    spec: MeshSpec,
    instances: Iterable[Instance],
    previous: MeshSpec | None = None,
    traffic: TrafficState | None = None,
) -> Served:
    """The spec to serve: each pool's static endpoints plus its registered instances;
    a pool emptied while `traffic` weights it keeps its hosts from `previous`. (From
    scratch: a replica keeps a `RegistryIndex` instead.)"""
    index = RegistryIndex()
    index.update({str(n): i for n, i in enumerate(instances)})
    return index.serve(spec, previous, traffic)


def _weighted(traffic: TrafficState | None, service: str, region: str, pool: str) -> bool:
    if traffic is None:
        return False
    split = traffic.split(service, region)
    # (canary and baseline take mirrored requests while shadowing)
    return getattr(split, pool, 0) > 0 or (pool != "production" and split.shadow > 0)


def _hosts(spec: MeshSpec | None, service: str, pool: str, region: str) -> tuple[Endpoint, ...]:
    if spec is None:
        return ()
    try:
        found = spec.service(service).pools.get(pool)
    except KeyError:
        return ()
    return found.endpoints.get(region, ()) if found is not None else ()

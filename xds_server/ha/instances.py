"""The shared registry's data, pure: instances, and the spec a replica serves with them.

A pool selects the registered instances of its service whose version is the pool's, in
each region (as an Istio subset selects pods by their version label). A pool that lists
no endpoints in the spec has only those; one that lists some has both.

One rule keeps an update from emptying a pool that takes traffic: a pool that had hosts
in a region and has none left while the weights give it traffic there keeps its last
hosts (`held`). Envoy would answer "no healthy upstream" for an empty cluster anyway; the
held pool also tells the rollout to hold there (`Registry.live_hosts`), and a hold that
lasts past `max_hold` fails the step.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

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

    @property
    def endpoint(self) -> Endpoint:
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


def with_registered(
    spec: MeshSpec,
    instances: Iterable[Instance],
    previous: MeshSpec | None = None,
    traffic: TrafficState | None = None,
) -> Served:
    """The spec to serve: each pool's static endpoints plus its registered instances;
    a pool emptied while `traffic` weights it keeps its hosts from `previous`."""
    registered: dict[tuple[str, str, str], list[tuple[str, Endpoint]]] = {}
    for i in sorted(instances, key=lambda i: (i.revision, i.address)):
        registered.setdefault((i.region, i.service, i.version), []).append((i.pool, i.endpoint))
    held: set[PoolKey] = set()
    live: dict[PoolKey, int] = {}
    services = []
    for svc in spec.services:
        pools = {}
        for name, pool in svc.pools.items():
            endpoints = {}
            for region in spec.regions:
                eps = list(pool.endpoints.get(region, ()))
                mine = registered.get((region, svc.name, pool.version), [])
                # One host per address: a static endpoint wins over its registration.
                at = {(e.host, e.port) for e in eps}
                eps += [e for hint, e in mine if hint in ("", name) and (e.host, e.port) not in at]
                live[(region, svc.name, name)] = len(eps)
                if not eps and _weighted(traffic, svc.name, region, name):
                    kept = _hosts(previous, svc.name, name, region)
                    if kept:
                        eps = list(kept)
                        held.add((region, svc.name, name))
                if eps:
                    endpoints[region] = tuple(eps)
            pools[name] = replace(pool, endpoints=endpoints)
        services.append(replace(svc, pools=pools))
    return Served(replace(spec, services=tuple(services)), frozenset(held), live)


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

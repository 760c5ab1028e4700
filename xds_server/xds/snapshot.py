"""Immutable, versioned snapshots of one region's resources, and their encoded responses.

A snapshot has one version (strictly increasing per region) and a version per type: a
type keeps its old version while its content is unchanged, so a weight change re-sends
routes only. Endpoints always get a new version when clusters change, because Envoy keeps
an updated cluster warming until it receives that cluster's endpoints again.

Responses are encoded once per (type, requested names, listen address) and shared by
every stream, nonce included: every stream that is sent a type's new version gets the
very same bytes object (`Encoded.body`, with a nonce of its own, `Encoded.nonce`), so a
push costs each stream nothing but the write, and holds no copy per stream. A stream
sent the same version again (a new subscription, a node re-asking) needs a nonce no
earlier response of its type had: that one is appended to a copy (`with_nonce`; a
protobuf field given twice takes its last value), so no stream re-serializes anything.

What a snapshot caches for its streams is bounded by what streams hold: an encoding for
a requested name set lives only while some stream holds that `NameSet` (a weak
reference), and per listen address (which nodes choose) at most
`MAX_LISTEN_ADDRESSES_CACHED` addresses are cached.

Proxyless gRPC clients ask by name for resources Envoy never gets: an API listener per
target and a route configuration per service (`xds/resources.py`). They are derived
from the snapshot's routes when first asked for, and carried over to the next snapshot
while what they are made from is unchanged, so they cost nothing without gRPC clients,
and a weight change rebuilds only the route configurations whose virtual host changed.
What they can hold is bounded by the spec (its services and domains), not by clients.
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import message

from xds_server.xds.resources import (
    PROXYLESS_ROUTE_PREFIX,
    ROUTE_CONFIG_NAME,
    RegionResources,
    build_api_listener,
    build_listener,
    pack,
    proxyless_route_config,
    proxyless_route_name,
    proxyless_targets,
)
from xds_server.xds.types import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    PROXYLESS_TYPES,
    ROUTE,
    SEND_ORDER,
    WILDCARD,
    WILDCARD_TYPES,
)

ListenAddress = tuple[str, int]

_nonces = itertools.count(1)


def next_nonce() -> str:
    """A nonce unique in this process: for one response on one stream, or for a shared
    encoding (`Encoded.nonce`), which a stream is sent once at most (see `with_nonce`)."""
    return str(next(_nonces))


MAX_LISTEN_ADDRESSES_CACHED = 1_024
"""Listen addresses (besides the spec's) whose listener a snapshot caches; nodes choose
them, so a churn of addresses must not grow the cache. Past it, a listener is encoded
per request (one small message)."""


FleetStanding = tuple[str, "ListenAddress | None", bool, "NameSet", Mapping[str, str]]
"""Where a delta stream stands on a type, as a fleet in step shares it: the type, the
listen address (listeners only), the wildcard, the subscription's shared NameSet, and
the shared mapping of what the node holds (`xds/delta.py`)."""

MAX_FLEET_STANDINGS = 256
"""Delta responses a snapshot keeps for standings streams share (a fleet in step has a
handful; past this, each stream's response is made for it)."""

MAX_READY_ANSWERS = 64
"""Answers of `routes_ready` a snapshot keeps: a fleet in step shares a handful of ACKed
sets; nodes that differ (proxyless clients, a churn) are answered afresh."""


class NameSet(frozenset[str]):
    """Resource names a stream asks for, one object shared by every stream asking for the
    same ones (`stream.shared_names`); a snapshot caches encodings per NameSet, weakly, so
    they go when the last stream holding the set does."""

    __slots__ = ()


class _PerNameSet:
    """Encodings per requested `NameSet`, by identity (a lookup never compares thousands
    of names), each dropped when its name set is no longer held by any stream."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref[NameSet], Encoded]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, names: NameSet) -> Encoded | None:
        entry = self._entries.get(id(names))
        return entry[1] if entry is not None and entry[0]() is names else None

    def put(self, names: NameSet, encoded: Encoded) -> None:
        key, owner = id(names), weakref.ref(self)

        def drop(ref: weakref.ref[NameSet]) -> None:
            me = owner()
            if me is not None and (entry := me._entries.get(key)) and entry[0] is ref:
                del me._entries[key]

        self._entries[key] = (weakref.ref(names, drop), encoded)


class SnapshotError(ValueError):
    """A snapshot that would send Envoy an inconsistent configuration."""


@dataclass(frozen=True)
class Encoded:
    """One encoded response and the names of the resources in it. `body` carries
    `nonce`, a nonce of its own, drawn once: every stream sent this version of the type
    for the first time is written these very bytes (one object for the whole fleet)."""

    body: bytes
    version: str
    names: frozenset[str]
    nonce: str


@dataclass(frozen=True)
class DeltaItem:
    """One resource for delta xDS: its version (a content hash) and its encoded Resource."""

    version: str
    encoded: bytes


def delta_item(name: str, msg: message.Message) -> DeltaItem:
    packed = pack(msg)
    version = hashlib.blake2b(packed.SerializeToString(), digest_size=8).hexdigest()
    encoded = discovery_pb2.Resource(name=name, version=version, resource=packed)
    return DeltaItem(version, encoded.SerializeToString())


@dataclass
class _ProxylessMemo:
    """The proxyless resources built so far, each with what it was made from; a successor
    snapshot starts from a copy and rebuilds only what changed (see `Snapshot.proxyless`)."""

    named: bool = False
    """Some client has asked for listeners by name: from then on the listeners' version
    follows the API listeners (without gRPC clients that costs nothing)."""
    listeners: dict[str, tuple[str, message.Message]] = field(default_factory=dict)
    """Target name -> (its service, its API listener)."""
    routes: dict[str, tuple[message.Message, message.Message]] = field(default_factory=dict)
    """Route configuration name -> (Envoy's virtual host it was made from, it)."""
    delta: dict[str, dict[str, tuple[message.Message, DeltaItem]]] = field(default_factory=dict)
    """Per type: name -> (the message, its delta encoding)."""

    def carried(self, targets: Mapping[str, str], vhosts: Mapping[str, Any]) -> _ProxylessMemo:
        """What a successor with these targets and virtual hosts may keep: the rest would
        only be rebuilt, and dropping it keeps the memo the size of the spec."""
        listeners = {n: e for n, e in self.listeners.items() if targets.get(n) == e[0]}
        routes = {n: e for n, e in self.routes.items() if _same(vhosts.get(n), e[0])}
        current = {LISTENER: {n: e[1] for n, e in listeners.items()}}
        current[ROUTE] = {n: e[1] for n, e in routes.items()}
        delta = {
            t: {n: e for n, e in memo.items() if current[t].get(n) is e[0]}
            for t, memo in self.delta.items()
        }
        return _ProxylessMemo(self.named, listeners, routes, delta)


def _same(a: message.Message | None, b: message.Message) -> bool:
    """The same content: each route configuration holds copies of its virtual hosts, so
    an unchanged service's virtual host is an equal message, not the same object."""
    return a is b or a == b


@dataclass(frozen=True, eq=False)
class Snapshot:
    region: str
    version: int
    resources: RegionResources
    type_versions: Mapping[str, int]
    listen: ListenAddress
    """The listener address for nodes that do not ask for their own."""
    retained: frozenset[str] = frozenset()
    """Clusters no route uses any more, kept until every node has routes without them."""
    _encoded: dict[tuple[str, frozenset[str] | None, ListenAddress], Encoded] = field(
        default_factory=dict, repr=False
    )
    """Responses for every resource of a type (names None), per listen address."""
    _by_names: dict[str, _PerNameSet] = field(default_factory=dict, repr=False)
    """Responses for requested names, per type; each while a stream holds its names."""
    _listens: set[ListenAddress] = field(default_factory=set, repr=False)
    """The nodes' own listen addresses cached for (at most MAX_LISTEN_ADDRESSES_CACHED)."""
    _delta: dict[tuple[str, ListenAddress | None], dict[str, tuple[Any, DeltaItem]]] = field(
        default_factory=dict, repr=False
    )
    """Delta items per (type, listen), with the message each was made from. A successor
    starts from its predecessor's, so an unchanged resource is never encoded again."""
    _delta_out: dict[tuple[str, ListenAddress | None], dict[str, DeltaItem]] = field(
        default_factory=dict, repr=False
    )
    _delta_versions: dict[tuple[str, ListenAddress | None], Mapping[str, str]] = field(
        default_factory=dict, repr=False
    )
    _delta_names: dict[tuple[str, ListenAddress | None], frozenset[str]] = field(
        default_factory=dict, repr=False
    )
    _proxyless: _ProxylessMemo = field(default_factory=_ProxylessMemo, repr=False)
    """What proxyless gRPC clients were given, carried over from the predecessor."""
    _ready: dict[tuple[int, int], tuple[bool, Any, Any]] = field(default_factory=dict, repr=False)
    """`routes_ready` answered per pair of ACKed sets (by identity: a fleet shares them)."""
    _fleet: dict[tuple[Any, ...], tuple[FleetStanding, Any]] = field(
        default_factory=dict, repr=False
    )
    """Delta responses per standing (`fleet_delta`), by the identity of its sets."""

    @classmethod
    def first(cls, resources: RegionResources, listen: ListenAddress, version: int = 1) -> Snapshot:
        snap = cls(resources.region, version, resources, {t: version for t in SEND_ORDER}, listen)
        snap.check()
        return snap

    def successor(
        self,
        resources: RegionResources,
        listen: ListenAddress,
        retained: frozenset[str] = frozenset(),
        routes_version: int = 0,
    ) -> Snapshot:
        """The next snapshot: version + 1; unchanged types keep their versions.

        `routes_version` (replicas on a shared store): when it is above this snapshot's
        version, the successor takes it, and its routes take it even if unchanged, so
        that every replica gives the same routes the same version."""
        version = max(self.version + 1, routes_version)
        versions = dict(self.type_versions)
        if routes_version > self.version:
            versions[ROUTE] = version
        memo, targets = self._proxyless, None
        if memo.named or memo.routes:  # (some gRPC client asked: else none of this)
            targets = MappingProxyType(
                proxyless_targets(resources.by_type[ROUTE].get(ROUTE_CONFIG_NAME))
            )
            memo = memo.carried(targets, _vhosts_by_route(resources))
        for type_url in SEND_ORDER:  # clusters before endpoints: see below
            if type_url == LISTENER:
                # API listeners follow the services' names and domains.
                changed = listen != self.listen or (
                    memo.named and targets != self.proxyless_targets
                )
            else:
                changed = resources.by_type[type_url] != self.resources.by_type[type_url]
            if changed or (type_url == ENDPOINT and versions[CLUSTER] == version):
                versions[type_url] = version
        snap = Snapshot(
            self.region,
            version,
            resources,
            versions,
            listen,
            retained,
            # A listener is built anew for each snapshot, so its memo would never hit.
            _delta={k: dict(v) for k, v in self._delta.items() if k[0] != LISTENER},
            _proxyless=memo if targets is not None else _ProxylessMemo(),
        )
        if targets is not None:  # computed already (a cached_property lives in __dict__)
            snap.__dict__["proxyless_targets"] = targets
        snap.check()
        return snap

    @cached_property
    def proxyless_targets(self) -> Mapping[str, str]:
        """Target name -> service: the API listeners proxyless gRPC clients may ask for."""
        routes = self.resources.by_type[ROUTE].get(ROUTE_CONFIG_NAME)
        return MappingProxyType(proxyless_targets(routes))

    @cached_property
    def _proxyless_vhosts(self) -> Mapping[str, Any]:
        """Proxyless route configuration name -> the virtual host it is made from."""
        return MappingProxyType(_vhosts_by_route(self.resources))

    def proxyless(self, type_url: str, names: Iterable[str]) -> dict[str, message.Message]:
        """Those of `names` that are resources only proxyless gRPC clients get: API
        listeners (by target name) and per-service route configurations; each built
        once, and reused by successors while what it is made from is unchanged."""
        memo, out = self._proxyless, {}
        if type_url == LISTENER:
            memo.named = True
            for name in names:
                service = self.proxyless_targets.get(name)
                if service is None:
                    continue
                hit = memo.listeners.get(name)
                if hit is None or hit[0] != service:
                    hit = memo.listeners[name] = (service, build_api_listener(name, service))
                out[name] = hit[1]
        elif type_url == ROUTE:
            for name in names:
                if not name.startswith(PROXYLESS_ROUTE_PREFIX):  # (Envoy's `ingress`)
                    continue
                vhost = self._proxyless_vhosts.get(name)
                if vhost is None:
                    continue
                got = memo.routes.get(name)
                if got is None or not _same(vhost, got[0]):
                    got = memo.routes[name] = (vhost, proxyless_route_config(vhost))
                out[name] = got[1]
        return out

    def proxyless_delta_items(self, type_url: str, names: Iterable[str]) -> dict[str, DeltaItem]:
        """`proxyless` as delta items, each encoded once while its message is unchanged."""
        if type_url not in PROXYLESS_TYPES:
            return {}
        memo = self._proxyless.delta.setdefault(type_url, {})
        out = {}
        for name, msg in self.proxyless(type_url, names).items():
            hit = memo.get(name)
            if hit is None or hit[0] is not msg:
                hit = memo[name] = (msg, delta_item(name, msg))
            out[name] = hit[1]
        return out

    @cached_property
    def route_targets(self) -> frozenset[str]:
        """Every cluster some route of this snapshot sends traffic to."""
        return frozenset(self.resources.route_targets())

    def routes_ready(
        self,
        acked_clusters: frozenset[str] | None,
        acked_endpoints: frozenset[str] | None,
        scope: Collection[str] | None = None,
    ) -> bool:
        """May a node get these routes? Only once it has ACKed every cluster they use, and
        those clusters' endpoints. None: the node does not subscribe to that type (a
        proxyless gRPC client asks for routes before any cluster), so it is not checked.

        `scope`: the clusters a node subscribes to by name (None: all, as Envoy does). A
        proxyless gRPC client asks for the clusters its routes use only once it has the
        routes, so it is judged on the ones it asked for: waiting for the others would
        never end. (gRPC itself holds calls to a new cluster until it has connected.)"""
        if scope is None:  # (Envoy's question, asked by every stream at every push)
            key = (id(acked_clusters), id(acked_endpoints))
            hit = self._ready.get(key)
            if hit is not None and hit[1] is acked_clusters and hit[2] is acked_endpoints:
                return hit[0]
        targets = self.route_targets if scope is None else self.route_targets & set(scope)
        acked_sets = (acked_clusters, acked_endpoints)
        ready = all(acked is None or targets <= acked for acked in acked_sets)
        if scope is None and len(self._ready) < MAX_READY_ANSWERS:
            self._ready[key] = (ready, acked_clusters, acked_endpoints)
        return ready

    def check(self) -> None:
        """Every route target is a cluster here, and every cluster has its endpoints."""
        clusters = set(self.resources.by_type[CLUSTER])
        missing = self.route_targets - clusters
        if missing:
            raise SnapshotError(
                f"region {self.region}: routes use unknown clusters {sorted(missing)}"
            )
        no_endpoints = clusters - set(self.resources.by_type[ENDPOINT])
        if no_endpoints:
            raise SnapshotError(
                f"region {self.region}: clusters without endpoints {sorted(no_endpoints)}"
            )
        unknown = self.retained - clusters
        if unknown:
            raise SnapshotError(
                f"region {self.region}: retained clusters not in snapshot {sorted(unknown)}"
            )

    def fleet_delta(self, standing: FleetStanding) -> Any | None:
        """The delta response made for a stream in `standing` from this snapshot, which
        every stream standing there is sent as it is (one bytes object, one nonce: a
        stream leaves the standing once sent it, so none is sent it twice); None: none
        made yet."""
        hit = self._fleet.get(_identity(standing))
        if hit is None or hit[0][3] is not standing[3] or hit[0][4] is not standing[4]:
            return None
        return hit[1]

    def keep_fleet_delta(self, standing: FleetStanding, response: Any) -> None:
        if len(self._fleet) < MAX_FLEET_STANDINGS:
            self._fleet[_identity(standing)] = (standing, response)

    def type_version(self, type_url: str) -> str:
        return self.type_version_texts[type_url]

    @cached_property
    def type_version_texts(self) -> Mapping[str, str]:
        """Each type's version as sent (asked by every stream at every wake-up)."""
        return MappingProxyType({t: str(v) for t, v in self.type_versions.items()})

    def encoded(
        self, type_url: str, names: frozenset[str] | None, listen: ListenAddress | None = None
    ) -> Encoded:
        """The response for `names` (None: every resource of the type), encoded once
        per snapshot for a `NameSet` (while a stream holds it) or every resource; other
        name sets are encoded on each call (and listeners asked for with `*` among other
        names: the Envoy listener in them depends on `listen`, which NameSets ignore)."""
        listen = (listen or self.listen) if type_url == LISTENER else self.listen
        if names is not None:
            if not isinstance(names, NameSet) or (type_url == LISTENER and WILDCARD in names):
                return self._encode(type_url, names, listen)
            per_names = self._by_names.get(type_url)
            if per_names is None:  # (not setdefault: that made one at every call)
                per_names = self._by_names[type_url] = _PerNameSet()
            hit = per_names.get(names)
            if hit is None:
                hit = self._encode(type_url, names, listen)
                per_names.put(names, hit)
            return hit
        key = (type_url, names, listen)
        hit = self._encoded.get(key)
        if hit is None:
            hit = self._encode(type_url, names, listen)
            if self._cacheable(listen):
                self._encoded[key] = hit
        return hit

    def _cacheable(self, listen: ListenAddress | None) -> bool:
        """May this snapshot cache something for this listen address? Always for the
        spec's (and None: not per address); for the first MAX_LISTEN_ADDRESSES_CACHED others."""
        if listen is None or listen == self.listen or listen in self._listens:
            return True
        if len(self._listens) < MAX_LISTEN_ADDRESSES_CACHED:
            self._listens.add(listen)
            return True
        return False

    def delta_items(
        self, type_url: str, listen: ListenAddress | None = None
    ) -> Mapping[str, DeltaItem]:
        """Every resource of the type, each encoded once as a delta `Resource`."""
        key = (type_url, (listen or self.listen) if type_url == LISTENER else None)
        done = self._delta_out.get(key)
        if done is not None:
            return done
        keep = self._cacheable(key[1])
        memo = self._delta.setdefault(key, {}) if keep else {}
        items = self._items(type_url, key[1] or self.listen)
        out = {}
        for name, msg in items.items():
            hit = memo.get(name)
            if hit is None or hit[0] is not msg:
                hit = memo[name] = (msg, delta_item(name, msg))
            out[name] = hit[1]
        for gone in set(memo) - set(items):
            del memo[gone]
        if keep:
            self._delta_out[key] = out
        return out

    def delta_versions(
        self, type_url: str, listen: ListenAddress | None = None
    ) -> Mapping[str, str]:
        """name -> version of every resource of the type; one shared mapping per snapshot."""
        key = (type_url, (listen or self.listen) if type_url == LISTENER else None)
        hit = self._delta_versions.get(key)
        if hit is None:
            items = self.delta_items(type_url, listen)
            hit = MappingProxyType({n: item.version for n, item in items.items()})
            if self._cacheable(key[1]):
                self._delta_versions[key] = hit
        return hit

    def delta_names(self, type_url: str, listen: ListenAddress | None = None) -> frozenset[str]:
        """The names of `delta_versions`, as one shared frozenset per snapshot."""
        versions = self.delta_versions(type_url, listen)
        key = (type_url, (listen or self.listen) if type_url == LISTENER else None)
        hit = self._delta_names.get(key)
        if hit is None:
            hit = frozenset(versions)
            if self._cacheable(key[1]):
                self._delta_names[key] = hit
        return hit

    def _items(self, type_url: str, listen: ListenAddress) -> Mapping[str, message.Message]:
        if type_url == LISTENER:
            listener = build_listener(*listen)
            return {listener.name: listener}
        return self.resources.by_type.get(type_url, {})

    def _select(
        self, type_url: str, names: frozenset[str] | None, listen: ListenAddress
    ) -> Mapping[str, message.Message]:
        """The resources a subscription gets. None: the type's own (Envoy's), all of them.
        Named: those of the names that exist, and the proxyless ones named; listeners by
        name are API listeners only (Envoy asks for its listener as a wildcard, and a
        gRPC client would reject it); `*` among names adds what the wildcard gets."""
        items = self._items(type_url, listen)
        if names is None:
            return items
        every = type_url in WILDCARD_TYPES and WILDCARD in names
        if type_url == LISTENER and not every:
            items = {}
        chosen = dict(items) if every else {n: items[n] for n in names & items.keys()}
        if type_url in PROXYLESS_TYPES:
            chosen.update(self.proxyless(type_url, names - chosen.keys()))
        return chosen

    def _encode(
        self, type_url: str, names: frozenset[str] | None, listen: ListenAddress
    ) -> Encoded:
        items = self._select(type_url, names, listen)
        chosen = sorted(items)
        version = self.type_version(type_url)
        response = discovery_pb2.DiscoveryResponse(
            version_info=version,
            type_url=type_url,
            resources=[pack(items[n]) for n in chosen],
        )
        nonce = next_nonce()
        return Encoded(
            with_nonce(response.SerializeToString(), nonce), version, frozenset(chosen), nonce
        )


def _identity(standing: FleetStanding) -> tuple[Any, ...]:
    """A standing as a dict key: its sets by identity (never compared element by element)."""
    type_url, listen, wildcard, names, client = standing
    return (type_url, listen, wildcard, id(names), id(client))


def _vhosts_by_route(resources: RegionResources) -> dict[str, Any]:
    """Proxyless route configuration name -> the virtual host of Envoy's routes it is
    made from (one per service)."""
    routes = resources.by_type[ROUTE].get(ROUTE_CONFIG_NAME)
    hosts = getattr(routes, "virtual_hosts", ())
    return {proxyless_route_name(vh.name): vh for vh in hosts}


def delta_response(
    type_url: str, system_version: str, items: list[bytes], removed: list[str], nonce: str
) -> bytes:
    """An encoded DeltaDiscoveryResponse, put together from already encoded resources."""
    out = [_field(1, system_version.encode())]
    out += [_field(2, item) for item in items]
    out.append(_field(4, type_url.encode()))
    out.append(_field(5, nonce.encode()))
    out += [_field(6, name.encode()) for name in removed]
    return b"".join(out)


def _field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def with_nonce(body: bytes, nonce: str) -> bytes:
    """Append DiscoveryResponse.nonce (field 5, length-delimited) to an encoded response:
    a copy. On a body that has a nonce already, this one wins (a singular field given
    twice takes its last value, in every protobuf parser)."""
    raw = nonce.encode()
    return body + b"\x2a" + _varint(len(raw)) + raw


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)

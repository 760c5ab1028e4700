"""Immutable, versioned snapshots of one region's resources, and their encoded responses.

A snapshot has one version (strictly increasing per region) and a version per type: a
type keeps its old version while its content is unchanged, so a weight change re-sends
routes only. Endpoints always get a new version when clusters change, because Envoy keeps
an updated cluster warming until it receives that cluster's endpoints again.

Responses are encoded once per (type, requested names, listen address) and shared by
every stream; the per-stream nonce is appended to the encoded bytes (a protobuf message
may be extended by concatenating fields), so no stream re-serializes anything.

What a snapshot caches for its streams is bounded by what streams hold: an encoding for
a requested name set lives only while some stream holds that `NameSet` (a weak
reference), and per listen address (which nodes choose) at most
`MAX_LISTEN_ADDRESSES_CACHED` addresses are cached.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import message

from xds_server.xds.resources import RegionResources, build_listener, pack
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER, SEND_ORDER, WILDCARD_TYPES

ListenAddress = tuple[str, int]

MAX_LISTEN_ADDRESSES_CACHED = 1_024
"""Listen addresses (besides the spec's) whose listener a snapshot caches; nodes choose
them, so a churn of addresses must not grow the cache. Past it, a listener is encoded
per request (one small message)."""


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
    """One encoded response (without nonce) and the names of the resources in it."""

    body: bytes
    version: str
    names: frozenset[str]


@dataclass(frozen=True)
class DeltaItem:
    """One resource for delta xDS: its version (a content hash) and its encoded Resource."""

    version: str
    encoded: bytes


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
    ) -> Snapshot:
        """The next snapshot: version + 1; unchanged types keep their versions."""
        version = self.version + 1
        versions = dict(self.type_versions)
        for type_url in SEND_ORDER:  # clusters before endpoints: see below
            if type_url == LISTENER:
                changed = listen != self.listen
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
        )
        snap.check()
        return snap

    @cached_property
    def route_targets(self) -> frozenset[str]:
        """Every cluster some route of this snapshot sends traffic to."""
        return frozenset(self.resources.route_targets())

    def routes_ready(
        self, acked_clusters: frozenset[str] | None, acked_endpoints: frozenset[str] | None
    ) -> bool:
        """May a node get these routes? Only once it has ACKed every cluster they use, and
        those clusters' endpoints. None: the node does not subscribe to that type (a
        proxyless gRPC client asks for routes before any cluster), so it is not checked."""
        return all(
            acked is None or self.route_targets <= acked
            for acked in (acked_clusters, acked_endpoints)
        )

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

    def type_version(self, type_url: str) -> str:
        return str(self.type_versions[type_url])

    def encoded(
        self, type_url: str, names: frozenset[str] | None, listen: ListenAddress | None = None
    ) -> Encoded:
        """The response for `names` (None: every resource of the type), encoded once
        per snapshot for a `NameSet` (while a stream holds it) or every resource; other
        name sets are encoded on each call."""
        if type_url in WILDCARD_TYPES:
            names = None
        listen = (listen or self.listen) if type_url == LISTENER else self.listen
        if names is not None:
            if not isinstance(names, NameSet):
                return self._encode(type_url, names, listen)
            per_names = self._by_names.setdefault(type_url, _PerNameSet())
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
                packed = pack(msg)
                raw = packed.SerializeToString()
                version = hashlib.blake2b(raw, digest_size=8).hexdigest()
                encoded = discovery_pb2.Resource(
                    name=name, version=version, resource=packed
                ).SerializeToString()
                hit = memo[name] = (msg, DeltaItem(version, encoded))
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

    def _encode(
        self, type_url: str, names: frozenset[str] | None, listen: ListenAddress
    ) -> Encoded:
        items = self._items(type_url, listen)
        chosen = sorted(items if names is None else names & items.keys())
        version = self.type_version(type_url)
        response = discovery_pb2.DiscoveryResponse(
            version_info=version,
            type_url=type_url,
            resources=[pack(items[n]) for n in chosen],
        )
        return Encoded(response.SerializeToString(), version, frozenset(chosen))


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
    """Append DiscoveryResponse.nonce (field 5, length-delimited) to an encoded response."""
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

"""Immutable, versioned snapshots of one region's resources, and their encoded responses.

A snapshot has one version (strictly increasing per region) and a version per type: a
type keeps its old version while its content is unchanged, so a weight change re-sends
routes only. Endpoints always get a new version when clusters change, because Envoy keeps
an updated cluster warming until it receives that cluster's endpoints again.

Responses are encoded once per (type, requested names, listen address) and shared by
every stream; the per-stream nonce is appended to the encoded bytes (a protobuf message
may be extended by concatenating fields), so no stream re-serializes anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import message

from xds_server.xds.resources import RegionResources, build_listener, pack
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER, SEND_ORDER, WILDCARD_TYPES

ListenAddress = tuple[str, int]


class SnapshotError(ValueError):
    """A snapshot that would send Envoy an inconsistent configuration."""


@dataclass(frozen=True)
class Encoded:
    """One encoded response (without nonce) and the names of the resources in it."""

    body: bytes
    version: str
    names: frozenset[str]


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
        snap = Snapshot(self.region, version, resources, versions, listen, retained)
        snap.check()
        return snap

    @cached_property
    def route_targets(self) -> frozenset[str]:
        """Every cluster some route of this snapshot sends traffic to."""
        return frozenset(self.resources.route_targets())

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
        """The response for `names` (None: every resource of the type), encoded once."""
        if type_url in WILDCARD_TYPES:
            names = None
        listen = (listen or self.listen) if type_url == LISTENER else self.listen
        key = (type_url, names, listen)
        hit = self._encoded.get(key)
        if hit is None:
            hit = self._encoded[key] = self._encode(type_url, names, listen)
        return hit

    def _encode(
        self, type_url: str, names: frozenset[str] | None, listen: ListenAddress
    ) -> Encoded:
        items: Mapping[str, message.Message]
        if type_url == LISTENER:
            listener = build_listener(*listen)
            items = {listener.name: listener}
        else:
            items = self.resources.by_type.get(type_url, {})
        chosen = sorted(items if names is None else names & items.keys())
        version = self.type_version(type_url)
        response = discovery_pb2.DiscoveryResponse(
            version_info=version,
            type_url=type_url,
            resources=[pack(items[n]) for n in chosen],
        )
        return Encoded(response.SerializeToString(), version, frozenset(chosen))


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

"""Load assignments (EDS): a pool's hosts in one region, as Envoy gets them.

`build_load_assignment` says what a cluster's `ClusterLoadAssignment` is. A replica
serving the shared registry rebuilds them many times a second, and a pool may hold
thousands of hosts of which a few changed, so `LoadAssignments` keeps each cluster's
last assignment with every host's encoding: an unchanged pool costs nothing, a changed
one a join of its hosts' bytes and one parse (a message built host by host took ~15 ms
per 2,500 hosts, `benchmarks/registry_churn.py`). Pure, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import compress, repeat
from operator import is_, itemgetter
from typing import cast

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import wrappers_pb2

from xds_server.spec import Endpoint
from xds_server.xds.health_checks import HealthPorts


def build_load_assignment(
    name: str, region: str, eps: tuple[Endpoint, ...], checked: HealthPorts | None = None
) -> endpoint_pb2.ClusterLoadAssignment:
    """One locality (the region) with the pool's endpoints. The locality has a weight:
    proxyless gRPC clients drop a locality without one (Envoy uses locality weights only
    with locality-weighted balancing, which these clusters do not enable). `checked`:
    the cluster is health-checked; each host on its health port, when it has one."""
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region=region),
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
                lb_endpoints=[lb_endpoint(ep, checked) for ep in eps],
            )
        ],
    )


def lb_endpoint(ep: Endpoint, checked: HealthPorts | None) -> endpoint_components_pb2.LbEndpoint:
    endpoint = endpoint_components_pb2.Endpoint(address=socket_address(ep.host, ep.port))
    port = ep.health_port or (checked.default if checked is not None else None)
    if checked is not None and port:
        endpoint.health_check_config.port_value = port
    return endpoint_components_pb2.LbEndpoint(endpoint=endpoint)


def socket_address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


@dataclass(frozen=True)
class Assigned:
    """A cluster's load assignment and what it was made from: its hosts, whether they are
    health-checked, and each host's encoding (a `LocalityLbEndpoints.lb_endpoints` field)."""

    endpoints: tuple[Endpoint, ...]
    checked: HealthPorts | None
    message: endpoint_pb2.ClusterLoadAssignment
    encoded: Mapping[int, tuple[Endpoint, bytes]]
    """id(endpoint) -> (the endpoint, its encoding). By identity, which is cheap to look up
    (an Endpoint's hash is computed in Python) and safe: the endpoint is held here, so no
    other object can have its id; an equal endpoint that is another object is encoded
    again. A registry replica's unchanged hosts are the same objects from one update to
    the next (`ha.instances.Instance.endpoint`)."""


class LoadAssignments:
    """One region's load assignments, each reused while its hosts are the same and
    otherwise assembled from its hosts' encodings (`assemble`)."""

    def __init__(self, region: str) -> None:
        self.region = region
        self._assigned: dict[str, Assigned] = {}

    def get(
        self, name: str, eps: tuple[Endpoint, ...], checked: HealthPorts | None
    ) -> endpoint_pb2.ClusterLoadAssignment:
        """The cluster's assignment: the previous one while its hosts are the same (the
        same tuple, which a registry replica keeps for an unchanged pool, or an equal
        one); else assembled, each host encoded once while the cluster has it."""
        last = self._assigned.get(name)
        known: Mapping[int, tuple[Endpoint, bytes]] = {}
        if last is not None and last.checked == checked:
            if last.endpoints is eps or last.endpoints == eps:
                return last.message
            known = last.encoded
        self._assigned[name] = done = assemble(name, self.region, eps, checked, known)
        return done.message

    def keep_only(self, names: Iterable[str]) -> None:
        """Forget the clusters not in `names` (the memo stays the size of the spec)."""
        wanted = set(names)
        if len(self._assigned) > len(wanted):
            self._assigned = {k: v for k, v in self._assigned.items() if k in wanted}


_SECOND = itemgetter(1)
_CLUSTER_NAME = endpoint_pb2.ClusterLoadAssignment.DESCRIPTOR.fields_by_name["cluster_name"]
_LOCALITIES = endpoint_pb2.ClusterLoadAssignment.DESCRIPTOR.fields_by_name["endpoints"]
_LB_ENDPOINTS = endpoint_components_pb2.LocalityLbEndpoints.DESCRIPTOR.fields_by_name[
    "lb_endpoints"
]


def assemble(
    name: str,
    region: str,
    eps: tuple[Endpoint, ...],
    checked: HealthPorts | None,
    known: Mapping[int, tuple[Endpoint, bytes]],
) -> Assigned:
    """`build_load_assignment`, from the hosts' encodings (those in `known` reused): a
    message's fields may come in any order, and a repeated field's elements are its
    occurrences, so the assignment is its parts' bytes joined and parsed once. Equal to
    `build_load_assignment` (tests/test_registry_index.py)."""
    ids = list(map(id, eps))
    found = list(map(known.get, ids))
    for k in compress(range(len(found)), map(is_, found, repeat(None))):  # (the new hosts)
        raw = lb_endpoint(eps[k], checked).SerializeToString()
        found[k] = (eps[k], field_bytes(_LB_ENDPOINTS.number, raw))
    parts = cast(list[tuple[Endpoint, bytes]], found)
    encoded = dict(zip(ids, parts, strict=True))
    locality = build_load_assignment(name, region, ()).endpoints[0].SerializeToString()
    hosts = b"".join(map(_SECOND, parts))
    body = field_bytes(_CLUSTER_NAME.number, name.encode())
    body += field_bytes(_LOCALITIES.number, locality + hosts)
    cla = endpoint_pb2.ClusterLoadAssignment.FromString(body)
    return Assigned(eps, checked, cla, encoded)


def field_bytes(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2): its key, its length, its bytes."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)

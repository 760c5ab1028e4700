"""State of the world: the protocol state of one StreamAggregatedResources stream. No I/O.

Each stream is level-triggered: whenever a request arrives or the region's snapshot
changes, `SotwStream.due` compares what the node should have with what it was sent and
sends what is missing, in make-before-break order (clusters, endpoints, listeners,
routes):

- each type has at most one response awaiting the node's answer;
- routes are sent only when every cluster they use has been ACKed by the node, with its
  endpoints, so Envoy never routes to a cluster it has not warmed;
- ACK and NACK are told apart by `error_detail`, never by comparing versions; a NACKed
  version is not sent again: the node keeps its last good config until the config
  changes;
- a request whose nonce is not the last one sent for its type is stale and ignored;
- listeners and clusters asked for naming nothing (or `*`) are a wildcard subscription
  (Envoy's); asked for by name (a proxyless gRPC client), only those named are sent,
  listeners by name being API listeners (`Snapshot.proxyless`);
- a request with an empty type_url ends the stream (INVALID_ARGUMENT), one for a type
  this server does not serve gets an empty response, one naming more than
  `MAX_NAMES_PER_TYPE` resources ends the stream (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from envoy.service.discovery.v3 import discovery_pb2

from xds_server.xds.snapshot import NameSet, Snapshot, next_nonce, with_nonce
from xds_server.xds.stream import (
    UNKNOWN_TYPE_VERSION,
    StreamBase,
    check_names,
    check_type_url,
    record_answer,
    shared_names,
    stale,
)
from xds_server.xds.types import WILDCARD, WILDCARD_TYPES

log = logging.getLogger("xds_server.sotw")

SAME_NAMES_CHECKED = 64
"""Up to this many names, a request naming the stream's current names is found so by
comparing them (a frozenset of a few names); longer lists go through `shared_names`."""


@dataclass
class _TypeState:
    subscribed: bool = False
    names: NameSet | None = None
    """Requested resource names; None asks for every resource (wildcard)."""
    nonce: str = ""
    in_flight: bool = False
    sent_version: str = ""
    sent_names: NameSet | None = None
    sent_resources: frozenset[str] = frozenset()
    acked_resources: frozenset[str] = frozenset()
    answer_due: bool = False
    """A fresh request (empty nonce) always gets an answer, even at the same version."""
    recorded: bool | None = None
    """Whether the registry was last told the node subscribes to the type (None: never)."""

    def named(self) -> NameSet | None:
        return None if self.names is None or WILDCARD in self.names else self.names

    def up_to_date(self, version: str) -> bool:
        return (
            self.sent_version == version
            and (self.sent_names is self.names or self.sent_names == self.names)
            and not self.answer_due
        )


class SotwStream(StreamBase[_TypeState]):
    """The protocol state of one state-of-the-world stream; no I/O."""

    def new_type_state(self) -> _TypeState:
        return _TypeState()

    def on_request(self, req: discovery_pb2.DiscoveryRequest) -> bool:
        """Apply a request; True when it may have made something due (worth a `due`).
        Raises StreamError for a request that ends the stream. (Every ACK of a fleet
        comes here: the fields are read once, and the checks cost nothing when met.)"""
        type_url = req.type_url
        if not type_url:
            check_type_url(req)
        if len(req.resource_names) > self.max_names:
            check_names(type_url, len(req.resource_names), self.max_names)
        ts = self.types.get(type_url)
        if ts is None:
            return self.unknown.request(type_url, (), answer=not req.response_nonce)
        names = self._requested(req, ts)
        nonce = req.response_nonce
        if nonce:
            if nonce != ts.nonce and stale(self.status, req, ts.nonce):
                return False
            ts.in_flight = False
            if record_answer(self.registry, self.status, req, ts.sent_version, req.version_info):
                ts.acked_resources = ts.sent_resources
            # A plain ACK makes nothing due unless something waited for it.
            wake = self.held or (names is not ts.names and names != ts.names)
        else:  # a new subscription, or the node re-asking: it gets an answer
            ts.answer_due, ts.in_flight = True, False
            wake = True
        ts.subscribed = True
        ts.names = names
        subscribed = names is None or bool(names)
        if ts.recorded is not subscribed:
            ts.recorded = subscribed
            self.registry.record_subscription(self.status, type_url, subscribed)
        return wake

    @staticmethod
    def _requested(req: discovery_pb2.DiscoveryRequest, ts: _TypeState) -> NameSet | None:
        """The names a request subscribes to; None: every resource of a wildcard type.

        Envoy asks for clusters and listeners naming nothing (or `*`); proxyless gRPC
        clients name the ones they want, and get only those. Naming nothing is the
        wildcard only in a first request, or when the stream was a wildcard already; a
        stream that named names and names none any more has unsubscribed from all."""
        names = req.resource_names
        star = len(names) == 1 and names[0] == WILDCARD
        legacy = not names and (not ts.subscribed or ts.names is None)
        if req.type_url in WILDCARD_TYPES and (star or legacy):
            return None
        current = ts.names  # (an ACK repeats the names: keep them, found at little cost)
        if (
            current is not None
            and len(names) == len(current) <= SAME_NAMES_CHECKED
            and frozenset(names) == current
        ):
            return current
        return shared_names(names)

    def due(self, snap: Snapshot) -> list[bytes]:
        """The responses to send now, in make-before-break order.

        Each type has at most one response awaiting its answer. Only routes wait for
        other types: Envoy holds its CDS ACK until a warming cluster has its endpoints,
        so endpoints must flow while clusters are unanswered.
        """
        out = (
            [
                discovery_pb2.DiscoveryResponse(
                    version_info=UNKNOWN_TYPE_VERSION, type_url=type_url, nonce=next_nonce()
                ).SerializeToString()
                for type_url in self.unknown.take()
            ]
            if self.unknown.pending
            else []
        )
        for type_url, ts, version in self.sendable(snap):
            encoded = snap.encoded(type_url, ts.names, self.listen)
            if version != ts.sent_version:  # the fleet's bytes: nothing of this stream's own
                ts.nonce, body = encoded.nonce, encoded.body
            else:  # sent this version before: a nonce its earlier response did not have
                ts.nonce = next_nonce()
                body = with_nonce(encoded.body, ts.nonce)
            ts.in_flight, ts.answer_due = True, False
            ts.sent_version, ts.sent_names = version, ts.names
            ts.sent_resources = encoded.names
            self.registry.record_sent(self.status, type_url, version, encoded.body)
            out.append(body)
        return out

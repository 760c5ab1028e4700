"""Delta (incremental) xDS: the protocol state of one DeltaAggregatedResources stream.

Same rules as state of the world (make-before-break order, routes only once the node
has ACKed the clusters and endpoints they use, ACK and NACK told apart by error_detail,
a NACKed version not sent again), with delta's own: each resource has its own version
(a hash of its content), a response carries only the resources the node lacks and the
names of those it must drop, and a node that reconnects with `initial_resource_versions`
gets only what changed meanwhile, and a name asked for that does not exist comes back in
`removed_resources` (the protocol's way to say so).

Streams in step share their responses: a stream in sync with a snapshot's whole type,
with the subscription of others and nothing owed or told missing, stands where they
stand, and every stream standing there is sent the one response made for the first
(`Snapshot.fleet_delta`: one bytes object, one nonce); a stream elsewhere gets its own.

Subscription changes are applied from every request, whatever its nonce: in delta a
request both answers a response and changes the subscription, and a lost subscription
change would never be repeated.

A request with an empty type_url ends the stream (INVALID_ARGUMENT); one for a type
this server does not serve is answered with the names it asks for in
removed_resources; a stream subscribed to more than `MAX_NAMES_PER_TYPE` names of a type
(or reconnecting with more initial_resource_versions) ends (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from xds_server.xds.snapshot import (
    DeltaItem,
    FleetStanding,
    NameSet,
    Snapshot,
    delta_response,
    next_nonce,
)
from xds_server.xds.stream import (
    UNKNOWN_TYPE_VERSION,
    StreamBase,
    check_names,
    check_type_url,
    record_answer,
    shared_names,
    stale,
)
from xds_server.xds.types import LISTENER, WILDCARD, WILDCARD_TYPES

log = logging.getLogger("xds_server.delta")


@dataclass
class _DeltaType:
    subscribed: bool = False
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    """Resources asked for by name (besides the wildcard)."""
    client: Mapping[str, str] = field(default_factory=dict)
    """What the node holds (or was last sent): name -> version. When that is everything
    the snapshot has, this is the snapshot's own shared mapping (never mutated): a fleet
    in sync then costs no memory per stream; a change makes a private copy first."""
    client_names: frozenset[str] | None = None
    """The names of `client` when it is the snapshot's shared mapping (shared too)."""
    synced_to: str = ""
    """The type version of the snapshot `client` was last brought up to date with."""
    dirty: bool = True
    """The subscription changed since; compare everything again."""
    nonce: str = ""
    in_flight: bool = False
    sent_version: str = ""
    acked_resources: frozenset[str] = frozenset()
    answer_due: bool = False
    told_missing: frozenset[str] = frozenset()
    """Names asked for that do not exist, which the node was told (in removed_resources)."""
    sent_names: NameSet | None = None
    """`names` when last sent, shared: keeps the snapshot's encoding of them alive."""
    names_set: NameSet | None = None
    """`names` as the NameSet every stream asking for them shares (made when first
    needed after a change; None: not made yet)."""
    recorded: bool | None = None
    """Whether the registry was last told the node subscribes to the type (None: never)."""

    def named(self) -> Collection[str] | None:
        return None if self.wildcard else self.names

    def up_to_date(self, version: str) -> bool:
        return self.synced_to == version and not self.dirty and not self.answer_due


class DeltaStream(StreamBase[_DeltaType]):
    def new_type_state(self) -> _DeltaType:
        return _DeltaType()

    def on_request(self, req: Any) -> bool:
        """Apply a request; True when it may have made something due (worth a `due`).
        Raises StreamError for a request that ends the stream. (Every ACK of a fleet
        comes here: the fields are read once, and the checks cost nothing when met.)"""
        type_url = req.type_url
        if not type_url:
            check_type_url(req)
        subscribe, unsubscribe = req.resource_names_subscribe, req.resource_names_unsubscribe
        initial = req.initial_resource_versions
        for asked in (subscribe, initial):
            if len(asked) > self.max_names:
                check_names(type_url, len(asked), self.max_names)
        ts = self.types.get(type_url)
        if ts is None:
            asks = not req.response_nonce or bool(subscribe)
            return self.unknown.request(type_url, subscribe, asks)
        wake = False
        if not ts.subscribed:
            ts.subscribed = True
            ts.answer_due = True
            ts.client, ts.client_names = dict(initial), None
            if type_url in WILDCARD_TYPES and not subscribe:
                ts.wildcard = True  # the legacy wildcard: a first request naming nothing
        if subscribe or unsubscribe:
            self._subscribe(ts, subscribe, unsubscribe)
            check_names(type_url, len(ts.names), self.max_names)
        subscribed = ts.wildcard or bool(ts.names)
        if ts.recorded is not subscribed:
            ts.recorded = subscribed
            self.registry.record_subscription(self.status, type_url, subscribed)
        if subscribe or unsubscribe or ts.answer_due:
            ts.dirty = wake = True
        nonce = req.response_nonce
        if not nonce:
            return wake
        if nonce != ts.nonce and stale(self.status, req, ts.nonce):
            return wake
        ts.in_flight = False
        if record_answer(self.registry, self.status, req, ts.sent_version, ts.sent_version):
            ts.acked_resources = ts.client_names or frozenset(ts.client)
        return wake or self.held  # a plain ACK matters only if something waited for it

    @staticmethod
    def _subscribe(ts: _DeltaType, subscribe: Any, unsubscribe: Any) -> None:
        """A request's subscription changes, applied to the type's state."""
        for name in subscribe:
            if name == WILDCARD:
                ts.wildcard = True
            else:
                ts.names.add(sys.intern(name))  # one string for every stream
        for name in unsubscribe:
            if name == WILDCARD:
                ts.wildcard = False
            else:
                ts.names.discard(name)
                if name in ts.client:
                    ts.client = {k: v for k, v in ts.client.items() if k != name}
                    ts.client_names = None
        ts.names_set = None

    def due(self, snap: Snapshot) -> list[bytes]:
        out = (
            [
                delta_response(type_url, UNKNOWN_TYPE_VERSION, [], sorted(names), next_nonce())
                for type_url, names in self.unknown.take().items()
            ]
            if self.unknown.pending
            else []
        )
        for type_url, ts, version in self.sendable(snap):
            standing = self._standing(type_url, ts)
            sent = snap.fleet_delta(standing) if standing is not None else None
            if sent is None:
                sent = self._response(snap, type_url, ts, version, standing is not None)
                if sent is not None and sent.shared and standing is not None:
                    snap.keep_fleet_delta(standing, sent)
            ts.synced_to, ts.dirty = version, False
            if sent is None:
                continue
            ts.client, ts.client_names, ts.told_missing = sent.client, sent.client_names, sent.told
            ts.nonce = sent.nonce
            ts.in_flight, ts.answer_due, ts.sent_version = True, False, version
            ts.sent_names = sent.sent_names
            self.registry.record_sent(self.status, type_url, version, sent.shown)
            out.append(sent.body)
        return out

    def _standing(self, type_url: str, ts: _DeltaType) -> FleetStanding | None:
        """Where this stream stands, as every stream in the same place shares it: in sync
        with a snapshot's whole type (its shared mapping), with the same subscription
        (its shared NameSet), nothing owed and nothing told missing. None: a place of its
        own (its response is made for it alone)."""
        if ts.client_names is None or ts.told_missing or ts.answer_due:
            return None
        if ts.names_set is None:
            ts.names_set = shared_names(ts.names)
        listen = self.listen if type_url == LISTENER else None
        return (type_url, listen, ts.wildcard, ts.names_set, ts.client)

    def _response(
        self, snap: Snapshot, type_url: str, ts: _DeltaType, version: str, standing: bool
    ) -> _Response | None:
        """What the node lacks of the type, as one response; None when it lacks nothing
        and is owed no answer (what it was told missing is updated either way). A stream
        in a shared `standing` that ends in sync with the whole type gets a response
        every stream in its standing can be sent (`shared`: one nonce, one bytes object)."""
        own = snap.delta_items(type_url, self.listen)
        items = self._with_proxyless(snap, type_url, ts, own)
        wanted = items.keys() if ts.wildcard else items.keys() & ts.names
        changed = sorted(n for n in wanted if ts.client.get(n) != items[n].version)
        gone = sorted(n for n in ts.client if n not in wanted)
        # A name asked for that does not exist is answered in removed_resources too, so
        # the node need not wait for its initial fetch to time out; once.
        missing = sorted(ts.names - items.keys() - ts.told_missing - set(gone))
        told = (ts.told_missing | set(missing)) & (ts.names - items.keys())
        if not changed and not gone and not missing and not ts.answer_due:
            ts.told_missing = told
            return None
        client = dict(ts.client)
        for name in changed:
            client[name] = items[name].version
        for name in gone:
            del client[name]
        versions = snap.delta_versions(type_url, self.listen)
        # In sync with all of it: share, don't copy. (Only the type's own resources
        # may be shared: then the node holds only names of `versions`.)
        held: Mapping[str, str] = client
        held_names = None
        if len(client) == len(versions) and items is own:
            held, held_names = versions, snap.delta_names(type_url, self.listen)
        nonce = next_nonce()
        sent_names = self._sent_names(ts)
        body = delta_response(
            type_url, version, [items[n].encoded for n in changed], gone + missing, nonce
        )
        shown = snap.encoded(type_url, sent_names, self.listen).body
        shared = standing and not told and held_names is not None
        return _Response(body, nonce, held, held_names, told, sent_names, shown, shared)

    @staticmethod
    def _with_proxyless(
        snap: Snapshot, type_url: str, ts: _DeltaType, own: Mapping[str, DeltaItem]
    ) -> Mapping[str, DeltaItem]:
        """What the subscription may get, by name: the type's own resources (`own`), with
        the proxyless ones it names (API listeners, per-service route configurations). A
        listener subscription by name gets API listeners only: Envoy's listener is for
        the wildcard (Envoy's way to ask), and a gRPC client would reject it."""
        extra = snap.proxyless_delta_items(type_url, ts.names) if ts.names else {}
        if type_url == LISTENER and not ts.wildcard:
            return extra
        return {**own, **extra} if extra else own

    @staticmethod
    def _sent_names(ts: _DeltaType) -> NameSet | None:
        """The subscription as the snapshot's `encoded` takes it (for what CSDS shows)."""
        if ts.wildcard:
            return shared_names({*ts.names, WILDCARD}) if ts.names else None
        if ts.names_set is None:
            ts.names_set = shared_names(ts.names)
        return ts.names_set


@dataclass(frozen=True)
class _Response:
    """One delta response and the stream's standing once it is sent."""

    body: bytes
    nonce: str
    client: Mapping[str, str]
    client_names: frozenset[str] | None
    told: frozenset[str]
    sent_names: NameSet | None
    shown: bytes
    """What CSDS shows of it: the state-of-the-world encoding of the subscription."""
    shared: bool
    """Every stream in the standing it was made for may be sent it, as it is."""
